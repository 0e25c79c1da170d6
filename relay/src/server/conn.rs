//! Drives one SMTP session over a socket: reads bytes into the session, writes its replies, and carries
//! out its actions. The read buffer is reused for the whole connection; replies to pipelined commands are
//! written together, once the input at hand has been processed.

use std::io;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use chrono::Utc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::auth::Checked;
use super::inbound::Inbound;
use super::tls::version_name;
use super::{ListenerContext, ListenerSettings};
use crate::cleanup;
use crate::policy::SessionPolicy;
use crate::queue::NewEntry;
use crate::spool::MessageMeta;
use herald_config::TlsMode;
use herald_smtp::{Action, Envelope, Refusal, RejectReason, Reply};

type Session = herald_smtp::Session<SessionPolicy>;

const SPOOL_FAILURE: Reply = Reply::new(
    452,
    "4.3.1",
    "Insufficient system storage, message not accepted; try again later",
);

/// The read buffer a session starts with, and the least room a read is given.
const FIRST_READ: usize = 8 * 1024;
const MIN_READ: usize = 4 * 1024;

/// How a drive over one stream ended.
enum Exit {
    Close,
    StartTls,
}

pub(super) async fn run(
    mut tcp: TcpStream,
    peer: SocketAddr,
    trusted: bool,
    ctx: &ListenerContext,
    cfg: &ListenerSettings,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let handshake_timeout = cfg.session.limits.command_timeout;
    let deadline = tokio::time::Instant::now() + cfg.max_session;
    let relaying = trusted.then(|| cfg.senders.clone());
    let policy = SessionPolicy::new(cfg.policy.clone(), ctx.suppressions.clone(), relaying);
    if ctx.tls_mode == TlsMode::Implicit {
        let tls = ctx
            .tls
            .as_ref()
            .ok_or_else(|| io::Error::other("no TLS configured"))?;
        let mut stream = tokio::time::timeout(handshake_timeout, tls.acceptor().accept(tcp))
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        let version = version_name(stream.get_ref().1.protocol_version());
        let mut session = Session::new(cfg.session.clone(), policy, peer, Some(version));
        drive(&mut stream, &mut session, ctx, cfg, deadline, &mut shutdown).await?;
        return stream.shutdown().await;
    }
    let mut session = Session::new(cfg.session.clone(), policy, peer, None);
    match drive(&mut tcp, &mut session, ctx, cfg, deadline, &mut shutdown).await? {
        // Closing the socket (on drop) sends the FIN; a shutdown first is one more system call per
        // session, and fails when the client has already gone after QUIT, as most have.
        Exit::Close => Ok(()),
        Exit::StartTls => {
            let tls = ctx
                .tls
                .as_ref()
                .ok_or_else(|| io::Error::other("no TLS configured"))?;
            let mut stream = tokio::time::timeout(handshake_timeout, tls.acceptor().accept(tcp))
                .await
                .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
            session.tls_started(version_name(stream.get_ref().1.protocol_version()));
            drive(&mut stream, &mut session, ctx, cfg, deadline, &mut shutdown).await?;
            stream.shutdown().await
        }
    }
}

async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    session: &mut Session,
    ctx: &ListenerContext,
    cfg: &ListenerSettings,
    deadline: tokio::time::Instant,
    shutdown: &mut watch::Receiver<bool>,
) -> io::Result<Exit> {
    // Reads fill the buffer's spare capacity, which starts small and doubles while reads fill it, up to a
    // whole line at the limit plus a good read's worth. Most clients send one message per connection:
    // a full-size buffer for each (and zeroing it) was a measurable share of the relay's CPU.
    let room = cfg.session.limits.max_line_length + 64 * 1024;
    let mut buf: Vec<u8> = Vec::with_capacity(FIRST_READ.min(room));
    let mut start = 0usize;
    let mut filled = false;
    let mut inbound: Option<Inbound> = None;
    loop {
        let (used, action) = session.process(&buf[start..]);
        start += used;
        match session.body_in_progress() {
            Some((number, body)) => {
                let inb = match &mut inbound {
                    Some(i) if i.number() == number => i,
                    _ => inbound.insert(Inbound::new(number)),
                };
                inb.progress(body, &cfg.signers, &ctx.spool).await;
            }
            // Between bodies; what was seen of a body that ended without being accepted goes.
            None if !matches!(action, Action::Accept(_)) => inbound = None,
            None => {}
        }
        match action {
            Action::NeedInput => {
                flush(stream, session, ctx).await?;
                if *shutdown.borrow() && session.is_idle() {
                    session.shutting_down();
                    continue;
                }
                if start == buf.len() {
                    buf.clear();
                    start = 0;
                } else if buf.capacity() - buf.len() < MIN_READ {
                    buf.drain(..start);
                    start = 0;
                }
                if filled || buf.capacity() - buf.len() < MIN_READ {
                    let target = (buf.capacity() * 2).min(room).max(buf.len() + MIN_READ);
                    buf.reserve_exact(target - buf.len());
                }
                let spare = buf.capacity() - buf.len();
                let stopping = *shutdown.borrow();
                // The client's silence is bounded by the timeout, the whole session by its lifetime.
                let wait = session
                    .timeout()
                    .min(deadline.saturating_duration_since(tokio::time::Instant::now()));
                let read = tokio::select! {
                    r = tokio::time::timeout(wait, stream.read_buf(&mut buf)) => r,
                    _ = shutdown.changed(), if !stopping => continue,
                };
                match read {
                    Err(_) => session.timed_out(),
                    Ok(Ok(0)) => return Ok(Exit::Close),
                    Ok(Ok(n)) => filled = n == spare,
                    Ok(Err(e)) => return Err(e),
                }
            }
            Action::StartTls => {
                flush(stream, session, ctx).await?;
                // RFC 3207 section 4.2: anything the client pipelined after STARTTLS is discarded.
                return Ok(Exit::StartTls);
            }
            Action::Authenticate { username, password } => {
                let ip = session.peer().ip().to_canonical();
                let checked = ctx
                    .auth
                    .check(ip, cfg.policy.clone(), username, password)
                    .await;
                match checked {
                    Checked::Valid(user) => session.auth_result(Some(user)),
                    Checked::Invalid => {
                        tracing::info!(listener = %ctx.name, client = %ip, "authentication failed");
                        session.auth_result(None);
                    }
                    Checked::Throttled => {
                        tracing::info!(listener = %ctx.name, client = %ip, "authentication refused: too many failures from this address");
                        session.auth_refused(Refusal::new(
                            Reply::new(
                                454,
                                "4.7.0",
                                "Too many failed authentications from your address; try again later",
                            ),
                            RejectReason::Authentication,
                        ));
                    }
                    Checked::Busy => session.auth_refused(Refusal::new(
                        Reply::new(454, "4.7.0", "Authentication is busy; try again later"),
                        RejectReason::Authentication,
                    )),
                }
            }
            Action::Accept(envelope) => {
                let seen = match inbound.take() {
                    Some(i) if i.number() == envelope.body_number => i,
                    _ => Inbound::new(envelope.body_number),
                };
                let reply = accept(ctx, cfg, session.policy(), *envelope, seen).await;
                session.message_result(reply);
            }
            Action::Close => {
                flush(stream, session, ctx).await?;
                return Ok(Exit::Close);
            }
        }
    }
}

async fn flush<S: AsyncWrite + Unpin>(
    stream: &mut S,
    session: &mut Session,
    ctx: &ListenerContext,
) -> io::Result<()> {
    for reason in session.take_rejections() {
        ctx.telemetry.metrics.rejected(reason);
    }
    let limit = session.command_timeout();
    let out = session.output();
    if !out.is_empty() {
        // A client that stops reading would hold the session (and its buffers) for ever.
        match tokio::time::timeout(limit, stream.write_all(out)).await {
            Ok(r) => r?,
            Err(_) => {
                ctx.telemetry.metrics.rejected(RejectReason::Timeout);
                return Err(io::Error::from(io::ErrorKind::TimedOut));
            }
        }
        out.clear();
    }
    Ok(())
}

/// Completes, spools and queues one message; returns the reply for the client, or the refusal and the reason
/// it is counted under. The part of it addressed to return-path domains is a report: read and recorded here,
/// not queued.
async fn accept(
    ctx: &ListenerContext,
    cfg: &ListenerSettings,
    policy: &SessionPolicy,
    mut env: Envelope,
    inbound: Inbound,
) -> Result<Reply, Refusal> {
    let listener = &ctx.name;
    let mut received = match inbound.finish(&mut env.body, &cfg.signers).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(%listener, error = %e, "spill write failed; message refused with 452");
            return Err(Refusal::new(SPOOL_FAILURE, RejectReason::SpoolError));
        }
    };
    let mut rcpt_dsn = std::mem::take(&mut env.rcpt_dsn).into_iter();
    let (reports, others): (Vec<_>, Vec<_>) = std::mem::take(&mut env.recipients)
        .into_iter()
        .map(|r| (r, rcpt_dsn.next().unwrap_or_default()))
        .partition(|(r, _)| cfg.policy.receives(r));
    (env.recipients, env.rcpt_dsn) = others.into_iter().unzip();
    if !reports.is_empty() {
        // The sending domain the report is about: the one whose return path it was sent to.
        let return_paths = ctx.rules.return_paths();
        let sending = reports
            .iter()
            .find_map(|(r, _)| return_paths.sending_domain(&r.domain))
            .map(str::to_owned);
        let locals: Vec<String> = reports.into_iter().map(|(r, _)| r.local).collect();
        let rules = ctx.rules.clone();
        let list = ctx.suppressions.clone();
        let telemetry = ctx.telemetry.clone();
        // A report too large to have stayed in memory is read back as far as a report is ever parsed (one
        // byte more says it was cut): the report parts come before any copy of the original message.
        let (body, spilled) = match &mut received.spill {
            Some(spill) => match spill
                .head(crate::outcome::report::MAX_REPORT_BYTES + 1)
                .await
            {
                Ok(head) => (head, true),
                Err(e) => {
                    tracing::error!(%listener, error = %e, "cannot read a spilled report back; message refused with 452");
                    return Err(Refusal::new(SPOOL_FAILURE, RejectReason::SpoolError));
                }
            },
            None => (std::mem::take(&mut env.body), false),
        };
        let done = tokio::task::spawn_blocking(move || {
            crate::outcome::feedback::process(
                &body,
                &locals,
                sending.as_deref(),
                &rules,
                &list,
                &telemetry,
            );
            body
        })
        .await;
        match done {
            Ok(body) => {
                if !spilled {
                    env.body = body;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "report processing task failed; message refused with 451");
                return Err(local_problem());
            }
        }
        if env.recipients.is_empty() {
            ctx.telemetry
                .metrics
                .received
                .with_label_values(&[listener.as_str()])
                .inc();
            return Ok(Reply::new(250, "2.0.0", "Ok: report received"));
        }
    }
    let id = ctx.spool.next_id();
    let hostname = &cfg.session.hostname;
    let prefix = match cleanup::prefix_headers(
        &env,
        &received.header,
        id,
        hostname,
        policy,
        Utc::now(),
    ) {
        Ok(p) => p,
        Err(r) => {
            tracing::info!(%listener, client = %env.peer.ip(), reply = %r.reply, "message refused");
            return Err(r);
        }
    };
    // Signed once, here: the signature is spooled with the message, so no retry or recipient signs again.
    // The body hash was taken as the body arrived; what is left is the header hash and the key operation
    // (an RSA signature is a few hundred microseconds of CPU: off the async runtime).
    let prefix = match received.body_hash {
        None => prefix,
        Some((domain, body_hash)) => {
            let signers = cfg.signers.clone();
            let header = std::mem::take(&mut received.header);
            let signed = tokio::task::spawn_blocking(move || {
                let sig =
                    signers.sign_with_body_hash(&domain, &[prefix.as_bytes(), &header], &body_hash);
                (sig, prefix)
            })
            .await;
            match signed {
                Ok((Some(sig), prefix)) => format!("{sig}{prefix}"),
                Ok((None, prefix)) => prefix,
                Err(e) => {
                    tracing::error!(error = %e, "DKIM signing task failed; message refused with 451");
                    return Err(local_problem());
                }
            }
        }
    };
    let mut meta = MessageMeta::new(
        id,
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        std::sync::Arc::from(listener.as_str()),
        &env.peer.to_string(),
        std::sync::Arc::from(env.sender.to_string()),
        env.recipients.iter().map(|r| r.to_string()).collect(),
    )
    .with_auth_user(env.auth_user.clone())
    .with_dsn(
        std::mem::take(&mut env.dsn),
        std::mem::take(&mut env.rcpt_dsn),
    );
    meta.smtputf8 = env.smtputf8;
    meta.eight_bit = env.eight_bit;
    match ctx
        .spool
        .store_with(&meta, &[], &[prefix.as_bytes(), &env.body], received.spill)
        .await
    {
        Ok(location) => {
            tracing::info!(
                queue_id = %id,
                %listener,
                client = %env.peer.ip(),
                size = location.len,
                recipients = meta.recipients.len(),
                "accepted"
            );
            let states = crate::spool::RcptStates::from(vec![
                crate::spool::RcptState::QUEUED;
                meta.recipients.len()
            ]);
            ctx.telemetry.emit(|| {
                let mut ev =
                    crate::events::Event::new("accepted", id.to_string(), meta.sender.to_string());
                ev.recipients = Some(meta.recipients.len());
                ev.listener = Some(listener.clone());
                ev.size = Some(location.len);
                ev
            });
            ctx.telemetry
                .metrics
                .received
                .with_label_values(&[listener.as_str()])
                .inc();
            ctx.queue.enqueue(NewEntry {
                meta,
                states,
                location,
            });
            Ok(Reply::with_text(
                250,
                "2.0.0",
                format!("Ok: queued as {id}"),
            ))
        }
        Err(e) => {
            tracing::error!(%listener, error = %e, "spool write failed; message refused with 452");
            Err(Refusal::new(SPOOL_FAILURE, RejectReason::SpoolError))
        }
    }
}

/// The refusal when a task of ours failed: temporary, the client may retry; counted under `other`.
fn local_problem() -> Refusal {
    Refusal::new(
        Reply::new(451, "4.3.0", "Temporary local problem, try again later"),
        RejectReason::Other,
    )
}
