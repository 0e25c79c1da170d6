//! The server side of an SMTP session as a state machine without I/O.
//!
//! The caller feeds received bytes to [`Session::process`], writes out [`Session::output`] before it waits
//! for more input, and carries out the [`Action`]s the session asks for (TLS handshake, password check,
//! spooling), reporting each result back. Replies to pipelined commands accumulate in the output buffer and
//! go out in one write, as RFC 2920 intends. The session is generic over its [`EnvelopePolicy`] so that the
//! relay's policy and a unit test's double drive the same code, with no dynamic dispatch per command.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use memchr::memchr;

use crate::address::{Mailbox, RcptPath, ReversePath};
use crate::body::{Body, BodyError};
use crate::budget::{Budget, Reservation};
use crate::command::{self, Command, CommandError};
use crate::dsn::{self, MailDsn, Notify, Orcpt, RcptDsn, Ret};
use crate::reply::{self, Reply};
use crate::verdict::{EnvelopePolicy, Refusal, RejectReason, Verdict};

/// What a session needs to know about its listener; shared by the listener's sessions.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The name the server greets with and gives in EHLO.
    pub hostname: String,
    /// Offer STARTTLS (RFC 3207): the listener has a certificate and connections start in plain text.
    pub starttls: bool,
    /// A submission listener: AUTH before MAIL, and messages are completed (Message-ID, Date).
    pub auth_required: bool,
    pub limits: Limits,
    /// The byte budget every session of the relay shares for bodies in memory; none: unbounded.
    pub budget: Option<Arc<Budget>>,
}

/// The limits a session enforces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Bytes; advertised in the EHLO SIZE keyword and checked against MAIL's SIZE and the body.
    pub max_message_size: usize,
    /// RCPT commands per transaction; 452 4.5.3 beyond.
    pub max_recipients: usize,
    /// Bad commands in one session before it is closed with 421.
    pub max_errors: u32,
    /// Octets including CRLF, for command lines and message lines alike.
    pub max_line_length: usize,
    /// Waiting for the client's next command (RFC 5321 section 4.5.3.2).
    pub command_timeout: Duration,
    /// Waiting for the client's next bytes of a message body.
    pub data_timeout: Duration,
}

/// What the session asks its driver to do next.
#[derive(Debug)]
pub enum Action {
    /// Flush the output, then read more input.
    NeedInput,
    /// Flush the output, discard any input already read (RFC 3207 section 4.2), and start the TLS handshake;
    /// then call [`Session::tls_started`].
    StartTls,
    /// Check these credentials (slowly, off the runtime) and call [`Session::auth_result`].
    Authenticate { username: String, password: String },
    /// Spool this message durably, then call [`Session::message_result`] with the reply.
    Accept(Box<Envelope>),
    /// Flush the output and close the connection.
    Close,
}

/// A received message and everything known about how it arrived.
#[derive(Debug)]
pub struct Envelope {
    pub sender: ReversePath,
    pub recipients: Vec<Mailbox>,
    /// MAIL's DSN parameters (RFC 3461).
    pub dsn: MailDsn,
    /// Each recipient's DSN parameters, in the order of `recipients` and as many.
    pub rcpt_dsn: Vec<RcptDsn>,
    /// The message as received, unstuffed, CRLF line endings.
    pub body: Vec<u8>,
    pub smtputf8: bool,
    pub eight_bit: bool,
    pub helo: String,
    pub peer: SocketAddr,
    pub auth_user: Option<String>,
    /// Negotiated TLS protocol version, e.g. `TLSv1.3`.
    pub tls: Option<String>,
    /// RFC 3848 protocol name for the Received: header (ESMTP, ESMTPSA, UTF8SMTPS, ...).
    pub protocol: String,
    /// Received on a submission listener: the message may be completed (Message-ID:, Date:).
    pub submission: bool,
    /// What `body` holds of the shared budget: keep it as long as the bytes (or a copy) are in memory.
    pub held: Option<Reservation>,
    /// The number [`Session::body_in_progress`] gave this body while it was arriving. A driver that took
    /// bytes from it holds them under this number; `body` is then only what came after.
    pub body_number: u64,
}

#[derive(Debug)]
enum State {
    Command,
    Data(Body),
    /// Inside a BDAT chunk. `refusal` is set when the chunk is read only to be discarded.
    Chunk {
        remaining: usize,
        last: bool,
        refusal: Option<Reply>,
    },
    AuthPlain,
    AuthLoginUser,
    AuthLoginPass(String),
    /// An [`Action`] is out with the driver; no input is processed until it reports back.
    Waiting,
}

#[derive(Debug)]
struct Transaction {
    sender: ReversePath,
    recipients: Vec<Mailbox>,
    dsn: MailDsn,
    rcpt_dsn: Vec<RcptDsn>,
    smtputf8: bool,
    eight_bit: bool,
    /// The body so far, when the client is sending BDAT chunks.
    chunks: Option<Body>,
}

/// One SMTP session, consulting `P` about senders and recipients.
#[derive(Debug)]
pub struct Session<P> {
    config: Arc<SessionConfig>,
    policy: P,
    peer: SocketAddr,
    out: Vec<u8>,
    state: State,
    helo: Option<String>,
    esmtp: bool,
    tls: Option<String>,
    user: Option<String>,
    tx: Option<Transaction>,
    errors: u32,
    /// Inside a command line too long to buffer; its bytes are dropped until its end.
    skipping_line: bool,
    closing: bool,
    /// Why each refusal since the driver last looked was sent: the `reason` label of the host's rejection
    /// metric, counted by the driver.
    rejections: Vec<RejectReason>,
    /// Bodies begun in this session: the number of the one in progress, see [`Session::body_in_progress`].
    bodies: u64,
}

impl<P: EnvelopePolicy> Session<P> {
    /// A new session; the greeting is already in the output. `tls` is the protocol version when the
    /// connection is already encrypted (implicit TLS).
    pub fn new(
        config: Arc<SessionConfig>,
        policy: P,
        peer: SocketAddr,
        tls: Option<String>,
    ) -> Session<P> {
        let mut s = Session {
            config,
            policy,
            peer,
            out: Vec::with_capacity(512),
            state: State::Command,
            helo: None,
            esmtp: false,
            tls,
            user: None,
            tx: None,
            errors: 0,
            skipping_line: false,
            closing: false,
            rejections: Vec::new(),
            bodies: 0,
        };
        let greeting = format!("220 {} ESMTP Herald\r\n", s.config.hostname);
        s.out.extend_from_slice(greeting.as_bytes());
        s
    }

    /// The reasons of the refusals sent since the last call, for the driver to count.
    pub fn take_rejections(&mut self) -> Vec<RejectReason> {
        std::mem::take(&mut self.rejections)
    }

    /// Replies waiting to be written. The driver writes them and clears the buffer.
    pub fn output(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    /// How long to wait for the client's next bytes (RFC 5321 section 4.5.3.2).
    pub fn timeout(&self) -> Duration {
        match self.state {
            State::Data(_) | State::Chunk { .. } => self.config.limits.data_timeout,
            _ => self.config.limits.command_timeout,
        }
    }

    /// How long the client may take to send a command or to take a reply.
    pub fn command_timeout(&self) -> Duration {
        self.config.limits.command_timeout
    }

    /// True between transactions: closing now loses nothing the client was sending.
    pub fn is_idle(&self) -> bool {
        self.tx.is_none() && matches!(self.state, State::Command)
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The policy this session consults.
    pub fn policy(&self) -> &P {
        &self.policy
    }

    /// The client was silent for [`Session::timeout`].
    pub fn timed_out(&mut self) {
        self.reply(&reply::TIMEOUT);
        self.closing = true;
    }

    /// The relay is stopping; called when the session is idle.
    pub fn shutting_down(&mut self) {
        self.reply(&reply::SHUTTING_DOWN);
        self.closing = true;
    }

    /// The TLS handshake that STARTTLS asked for completed. The client must start over (RFC 3207 section 4.2).
    pub fn tls_started(&mut self, version: String) {
        self.tls = Some(version);
        self.helo = None;
        self.esmtp = false;
        self.tx = None;
        self.user = None;
        self.state = State::Command;
    }

    /// The outcome of an [`Action::Authenticate`]: the user name on success.
    pub fn auth_result(&mut self, user: Option<String>) {
        self.state = State::Command;
        match user {
            Some(u) => {
                self.user = Some(u);
                self.reply(&Reply::new(235, "2.7.0", "Authentication successful"));
            }
            None => self.error(&Reply::new(
                535,
                "5.7.8",
                "Authentication credentials invalid",
            )),
        }
    }

    /// The password of an [`Action::Authenticate`] could not be checked now (the host is busy, or throttles
    /// this client after repeated failures): the refusal to send. It counts as a bad command.
    pub fn auth_refused(&mut self, refusal: Refusal) {
        self.state = State::Command;
        self.error_as(&refusal.reply, refusal.reason);
    }

    /// The outcome of an [`Action::Accept`]: the reply to send (250 with the queue id), or the refusal and
    /// the reason it is counted under.
    pub fn message_result(&mut self, result: Result<Reply, Refusal>) {
        self.state = State::Command;
        self.tx = None;
        match result {
            Ok(r) => self.reply(&r),
            Err(refusal) => self.reply_as(&refusal.reply, refusal.reason),
        }
    }

    /// The body being received, with its number (new for every body of the session), for a driver that
    /// moves bytes out of memory as they arrive: read [`Body::buffered`], store it, then
    /// [`Body::take_buffered`]. The [`Envelope`] of an accepted body then holds only the bytes after the
    /// last take, and its `body_number` says which stored bytes go before them. None between bodies.
    pub fn body_in_progress(&mut self) -> Option<(u64, &mut Body)> {
        let body = match &mut self.state {
            State::Data(body) => Some(body),
            _ => self.tx.as_mut().and_then(|t| t.chunks.as_mut()),
        };
        body.map(|b| (self.bodies, b))
    }

    /// Processes as much of `input` as it can. Returns the bytes consumed and what to do next; on
    /// [`Action::NeedInput`] the unconsumed rest is an incomplete line to present again with more bytes.
    pub fn process(&mut self, input: &[u8]) -> (usize, Action) {
        let mut pos = 0;
        loop {
            if self.closing {
                return (pos, Action::Close);
            }
            let rest = &input[pos..];
            match &mut self.state {
                State::Waiting => return (pos, Action::NeedInput),
                State::Data(body) => {
                    let (used, done) = body.feed_data(rest);
                    pos += used;
                    if !done {
                        return (pos, Action::NeedInput);
                    }
                    let State::Data(body) = std::mem::replace(&mut self.state, State::Command)
                    else {
                        unreachable!("state was Data above");
                    };
                    if let Some(action) = self.end_of_message(body.finish_held(false)) {
                        return (pos, action);
                    }
                }
                State::Chunk {
                    remaining,
                    last,
                    refusal,
                } => {
                    let take = (*remaining).min(rest.len());
                    if refusal.is_none()
                        && let Some(body) = self.tx.as_mut().and_then(|t| t.chunks.as_mut())
                    {
                        body.feed_chunk(&rest[..take]);
                    }
                    *remaining -= take;
                    pos += take;
                    if *remaining > 0 {
                        return (pos, Action::NeedInput);
                    }
                    let (last, refusal) = (*last, refusal.take());
                    self.state = State::Command;
                    if let Some(action) = self.end_of_chunk(last, refusal) {
                        return (pos, action);
                    }
                }
                State::Command
                | State::AuthPlain
                | State::AuthLoginUser
                | State::AuthLoginPass(_) => {
                    let max_line = self.config.limits.max_line_length;
                    let Some(nl) = memchr(b'\n', rest) else {
                        if rest.len() >= max_line {
                            if !self.skipping_line {
                                self.skipping_line = true;
                                self.error(&reply::LINE_TOO_LONG);
                            }
                            return (input.len(), Action::NeedInput);
                        }
                        return (pos, Action::NeedInput);
                    };
                    pos += nl + 1;
                    if self.skipping_line {
                        self.skipping_line = false;
                        continue;
                    }
                    if nl + 1 > max_line {
                        self.error(&reply::LINE_TOO_LONG);
                        continue;
                    }
                    // CRLF is the rule; a bare LF ending a command line is tolerated (it cannot smuggle data).
                    let line = &rest[..nl];
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    if let Some(action) = self.line(line) {
                        return (pos, action);
                    }
                }
            }
        }
    }

    fn reply(&mut self, r: &Reply) {
        self.reply_as(r, rejection_reason(r));
    }

    /// A reply whose refusal, if it is one, is counted under `reason`.
    fn reply_as(&mut self, r: &Reply, reason: RejectReason) {
        if r.code >= 400 {
            self.rejections.push(reason);
        }
        r.write_to(&mut self.out);
    }

    /// Sends an error reply that counts towards the bad-command limit.
    fn error(&mut self, r: &Reply) {
        self.error_as(r, rejection_reason(r));
    }

    fn error_as(&mut self, r: &Reply, reason: RejectReason) {
        self.reply_as(r, reason);
        self.errors += 1;
        if self.errors >= self.config.limits.max_errors {
            self.reply(&reply::TOO_MANY_ERRORS);
            self.closing = true;
        }
    }

    /// Sends the policy's refusal, if it is one; true when the request was accepted.
    fn verdict(&mut self, verdict: Verdict) -> bool {
        match verdict {
            Verdict::Accept => true,
            Verdict::Refuse(r) => {
                self.reply_as(&r.reply, r.reason);
                false
            }
            Verdict::RefuseAsError(r) => {
                self.error_as(&r.reply, r.reason);
                false
            }
        }
    }

    fn line(&mut self, line: &[u8]) -> Option<Action> {
        match std::mem::replace(&mut self.state, State::Command) {
            State::AuthPlain => return self.auth_plain(line),
            State::AuthLoginUser => return self.auth_login_user(line),
            State::AuthLoginPass(user) => return self.auth_login_pass(user, line),
            _ => {}
        }
        let cmd = match command::parse(line) {
            Ok(c) => c,
            Err(e) => {
                let r = match &e {
                    CommandError::Unknown => Reply::new(500, "5.5.2", "Command not recognized"),
                    CommandError::NotUtf8 => Reply::new(500, "5.5.2", "Command is not valid UTF-8"),
                    CommandError::Syntax(_) => Reply::with_text(501, "5.5.4", capitalize(&e)),
                    CommandError::BadSender(_) => Reply::with_text(501, "5.1.7", capitalize(&e)),
                    CommandError::BadRecipient(_) => Reply::with_text(501, "5.1.3", capitalize(&e)),
                };
                self.error(&r);
                return None;
            }
        };
        self.command(cmd)
    }

    fn command(&mut self, cmd: Command<'_>) -> Option<Action> {
        match cmd {
            Command::Ehlo(name) => self.hello(name, true),
            Command::Helo(name) => self.hello(name, false),
            Command::Mail { from, params } => self.mail(from, &params),
            Command::Rcpt { to, params } => {
                let to = match to {
                    // The server's own postmaster: the policy decides about it like any address of this host.
                    RcptPath::Postmaster => Mailbox {
                        local: "postmaster".to_owned(),
                        domain: self.config.hostname.clone(),
                    },
                    RcptPath::Mailbox(m) => m,
                };
                self.rcpt(to, &params)
            }
            Command::Data => self.data(),
            Command::Bdat { size, last } => self.bdat(size, last),
            Command::Rset => {
                self.tx = None;
                self.reply(&reply::OK);
            }
            Command::Noop => self.reply(&reply::OK),
            Command::Quit => {
                self.reply(&Reply::new(221, "2.0.0", "Bye"));
                self.closing = true;
            }
            Command::Vrfy => self.reply(&Reply::new(
                252,
                "2.5.0",
                "Cannot VRFY user, but will accept message and attempt delivery",
            )),
            Command::Expn => self.error(&Reply::new(502, "5.5.1", "EXPN is not available")),
            Command::Help => self.reply(&Reply::new(
                214,
                "2.0.0",
                "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH; see RFC 5321",
            )),
            Command::StartTls => return self.starttls(),
            Command::Auth { mechanism, initial } => return self.auth(mechanism, initial),
        }
        None
    }

    fn hello(&mut self, name: &str, esmtp: bool) {
        self.helo = Some(name.to_owned());
        self.esmtp = esmtp;
        self.tx = None;
        let host = &self.config.hostname;
        if !esmtp {
            let line = format!("250 {host}\r\n");
            self.out.extend_from_slice(line.as_bytes());
            return;
        }
        let mut lines = vec![
            format!("{host} Hello {name}"),
            "PIPELINING".to_owned(),
            format!("SIZE {}", self.config.limits.max_message_size),
            "8BITMIME".to_owned(),
            "SMTPUTF8".to_owned(),
            "ENHANCEDSTATUSCODES".to_owned(),
            "CHUNKING".to_owned(),
            "DSN".to_owned(),
        ];
        if self.config.starttls && self.tls.is_none() {
            lines.push("STARTTLS".to_owned());
        }
        if self.config.auth_required && self.tls.is_some() && self.user.is_none() {
            lines.push("AUTH PLAIN LOGIN".to_owned());
        }
        lines.push("HELP".to_owned());
        let n = lines.len();
        for (i, l) in lines.iter().enumerate() {
            let sep = if i + 1 == n { ' ' } else { '-' };
            let line = format!("250{sep}{l}\r\n");
            self.out.extend_from_slice(line.as_bytes());
        }
    }

    fn mail(&mut self, from: ReversePath, params: &[command::Param<'_>]) {
        if self.helo.is_none() {
            self.error(&Reply::new(503, "5.5.1", "Send EHLO or HELO first"));
            return;
        }
        if self.config.auth_required && self.user.is_none() {
            let r = if self.tls.is_none() {
                Reply::new(530, "5.7.0", "Must issue a STARTTLS command first")
            } else {
                Reply::new(530, "5.7.0", "Authentication required")
            };
            self.error(&r);
            return;
        }
        if self.tx.is_some() {
            self.error(&Reply::new(503, "5.5.1", "Nested MAIL command"));
            return;
        }
        let mut smtputf8 = false;
        let mut eight_bit = false;
        let mut dsn = MailDsn::default();
        for (i, p) in params.iter().enumerate() {
            if !self.esmtp {
                self.error(&Reply::new(555, "5.5.4", "Parameters need EHLO"));
                return;
            }
            if self.duplicate(params, i) {
                return;
            }
            match (p.key.as_str(), p.value) {
                // A size too large for u64 is still a well-formed size (RFC 1870 allows 20 digits): too big.
                ("SIZE", Some(v)) => match v.parse::<u64>().or_else(|e| {
                    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
                        Ok(u64::MAX)
                    } else {
                        Err(e)
                    }
                }) {
                    Ok(n) if n > self.config.limits.max_message_size as u64 => {
                        self.reply(&Reply::with_text(
                            552,
                            "5.3.4",
                            format!(
                                "Message size exceeds the limit of {} bytes",
                                self.config.limits.max_message_size
                            ),
                        ));
                        return;
                    }
                    Ok(_) => {}
                    Err(_) => {
                        self.error(&Reply::new(501, "5.5.4", "Bad SIZE value"));
                        return;
                    }
                },
                ("BODY", Some(v)) if v.eq_ignore_ascii_case("8BITMIME") => eight_bit = true,
                ("BODY", Some(v)) if v.eq_ignore_ascii_case("7BIT") => {}
                ("SMTPUTF8", None) => smtputf8 = true,
                // RFC 4954 section 5: accepted; the submitter's identity comes from AUTH itself.
                ("AUTH", Some(_)) => {}
                ("RET", Some(v)) => match Ret::parse(v) {
                    Ok(r) => dsn.ret = Some(r),
                    Err(e) => return self.bad_dsn(&e),
                },
                ("ENVID", Some(v)) => match MailDsn::parse_envid(v) {
                    Ok(id) => dsn.envid = Some(id),
                    Err(e) => return self.bad_dsn(&e),
                },
                ("RET", None) => return self.bad_dsn(&dsn::DsnError::Ret),
                ("ENVID", None) => return self.bad_dsn(&dsn::DsnError::Envid("missing")),
                (key, _) => {
                    self.error(&Reply::with_text(
                        555,
                        "5.5.4",
                        format!("Unsupported parameter {key}"),
                    ));
                    return;
                }
            }
        }
        if let Some(m) = from.mailbox()
            && m.is_utf8()
            && !smtputf8
        {
            self.reply(&Reply::new(
                553,
                "5.6.7",
                "Non-ASCII sender address needs the SMTPUTF8 parameter",
            ));
            return;
        }
        if !self.verdict(self.policy.mail_from(&from, self.user.as_deref())) {
            return;
        }
        self.tx = Some(Transaction {
            sender: from,
            recipients: Vec::new(),
            dsn,
            rcpt_dsn: Vec::new(),
            smtputf8,
            eight_bit,
            chunks: None,
        });
        self.reply(&Reply::new(250, "2.1.0", "Sender ok"));
    }

    fn rcpt(&mut self, to: Mailbox, params: &[command::Param<'_>]) {
        let Some(tx) = &self.tx else {
            self.error(&Reply::new(503, "5.5.1", "Need MAIL before RCPT"));
            return;
        };
        if tx.chunks.is_some() {
            self.error(&Reply::new(503, "5.5.1", "RCPT not allowed during BDAT"));
            return;
        }
        let (count, smtputf8) = (tx.recipients.len(), tx.smtputf8);
        let mut rcpt_dsn = RcptDsn::default();
        for (i, p) in params.iter().enumerate() {
            if !self.esmtp {
                self.error(&Reply::new(555, "5.5.4", "Parameters need EHLO"));
                return;
            }
            if self.duplicate(params, i) {
                return;
            }
            match (p.key.as_str(), p.value) {
                ("NOTIFY", Some(v)) => match Notify::parse(v) {
                    Ok(n) => rcpt_dsn.notify = Some(n),
                    Err(e) => return self.bad_dsn(&e),
                },
                ("ORCPT", Some(v)) => match Orcpt::parse(v) {
                    Ok(o) => rcpt_dsn.orcpt = Some(o),
                    Err(e) => return self.bad_dsn(&e),
                },
                ("NOTIFY", None) => return self.bad_dsn(&dsn::DsnError::Notify),
                ("ORCPT", None) => return self.bad_dsn(&dsn::DsnError::Orcpt("missing")),
                (key, _) => {
                    let text = format!("Unsupported parameter {key}");
                    self.error(&Reply::with_text(555, "5.5.4", text));
                    return;
                }
            }
        }
        if count >= self.config.limits.max_recipients {
            self.reply(&Reply::new(452, "4.5.3", "Too many recipients"));
            return;
        }
        if to.is_utf8() && !smtputf8 {
            self.reply(&Reply::new(
                553,
                "5.6.7",
                "Non-ASCII recipient address needs SMTPUTF8 in MAIL",
            ));
            return;
        }
        if !self.verdict(self.policy.rcpt_to(&to, self.user.as_deref())) {
            return;
        }
        if let Some(tx) = &mut self.tx {
            tx.recipients.push(to);
            tx.rcpt_dsn.push(rcpt_dsn);
        }
        self.reply(&Reply::new(250, "2.1.5", "Recipient ok"));
    }

    /// Refuses parameter `i` if an earlier one has the same keyword (RFC 5321 section 4.1.2 gives each
    /// keyword once); true when it did.
    fn duplicate(&mut self, params: &[command::Param<'_>], i: usize) -> bool {
        let key = &params[i].key;
        if params[..i].iter().any(|p| &p.key == key) {
            let text = format!("Duplicate parameter {key}");
            self.error(&Reply::with_text(501, "5.5.4", text));
            return true;
        }
        false
    }

    /// A DSN parameter with a bad value: 501 5.5.4, naming the parameter.
    fn bad_dsn(&mut self, e: &dsn::DsnError) {
        self.error(&Reply::with_text(501, "5.5.4", e.to_string()));
    }

    fn data(&mut self) {
        match &self.tx {
            None => self.error(&Reply::new(503, "5.5.1", "Need MAIL and RCPT before DATA")),
            Some(tx) if tx.recipients.is_empty() => {
                self.error(&Reply::new(503, "5.5.1", "No valid recipients"))
            }
            Some(tx) if tx.chunks.is_some() => {
                self.error(&Reply::new(503, "5.5.1", "DATA not allowed after BDAT"))
            }
            Some(_) => {
                self.out
                    .extend_from_slice(b"354 End data with <CR><LF>.<CR><LF>\r\n");
                let l = &self.config.limits;
                self.bodies += 1;
                self.state = State::Data(
                    Body::new(l.max_message_size, l.max_line_length)
                        .budgeted(self.config.budget.as_ref()),
                );
            }
        }
    }

    fn bdat(&mut self, size: usize, last: bool) {
        // The chunk follows the command whatever the reply will be, so it is always read (RFC 3030 section 2).
        let refusal = match &mut self.tx {
            None => Some(Reply::new(503, "5.5.1", "Need MAIL and RCPT before BDAT")),
            Some(tx) if tx.recipients.is_empty() => {
                Some(Reply::new(503, "5.5.1", "No valid recipients"))
            }
            Some(tx) => {
                let l = &self.config.limits;
                let budget = self.config.budget.as_ref();
                if tx.chunks.is_none() {
                    self.bodies += 1;
                    tx.chunks =
                        Some(Body::new(l.max_message_size, l.max_line_length).budgeted(budget));
                }
                None
            }
        };
        self.state = State::Chunk {
            remaining: size,
            last,
            refusal,
        };
    }

    fn end_of_chunk(&mut self, last: bool, refusal: Option<Reply>) -> Option<Action> {
        if let Some(r) = refusal {
            self.error(&r);
            return None;
        }
        if !last {
            self.reply(&Reply::new(250, "2.0.0", "Chunk received"));
            return None;
        }
        let body = self.tx.as_mut().and_then(|t| t.chunks.take())?;
        self.end_of_message(body.finish_held(true))
    }

    fn end_of_message(
        &mut self,
        body: Result<(Vec<u8>, Option<Reservation>), BodyError>,
    ) -> Option<Action> {
        let body = match body {
            Ok(b) => b,
            Err(e) => {
                self.tx = None;
                let r = match e {
                    BodyError::TooBig => Reply::with_text(
                        552,
                        "5.3.4",
                        format!(
                            "Message size exceeds the limit of {} bytes",
                            self.config.limits.max_message_size
                        ),
                    ),
                    BodyError::LineTooLong => Reply::with_text(
                        554,
                        "5.6.0",
                        format!(
                            "Message has a line longer than {} octets",
                            self.config.limits.max_line_length
                        ),
                    ),
                    BodyError::BareLineEnding => Reply::new(
                        554,
                        "5.6.0",
                        "Message has a bare CR or LF; lines must end in CRLF",
                    ),
                    BodyError::OverBudget => Reply::new(
                        452,
                        "4.3.1",
                        "Insufficient system resources for this message now; try again later",
                    ),
                };
                self.reply(&r);
                return None;
            }
        };
        let tx = self.tx.take()?;
        let protocol = self.protocol_name(tx.smtputf8);
        self.state = State::Waiting;
        let (body, held) = body;
        Some(Action::Accept(Box::new(Envelope {
            sender: tx.sender,
            recipients: tx.recipients,
            dsn: tx.dsn,
            rcpt_dsn: tx.rcpt_dsn,
            body,
            held,
            smtputf8: tx.smtputf8,
            eight_bit: tx.eight_bit,
            helo: self.helo.clone().unwrap_or_default(),
            peer: self.peer,
            auth_user: self.user.clone(),
            tls: self.tls.clone(),
            protocol,
            submission: self.config.auth_required,
            body_number: self.bodies,
        })))
    }

    /// RFC 3848 / RFC 6531 names: ESMTP, ESMTPS, ESMTPA, ESMTPSA, UTF8SMTP..., or SMTP after HELO.
    fn protocol_name(&self, utf8: bool) -> String {
        if !self.esmtp {
            return "SMTP".to_owned();
        }
        let mut p = String::from(if utf8 { "UTF8SMTP" } else { "ESMTP" });
        if self.tls.is_some() {
            p.push('S');
        }
        if self.user.is_some() {
            p.push('A');
        }
        p
    }

    fn starttls(&mut self) -> Option<Action> {
        if !self.config.starttls {
            self.error(&Reply::new(
                502,
                "5.5.1",
                "STARTTLS is not available on this port",
            ));
            return None;
        }
        if self.tls.is_some() {
            self.error(&Reply::new(503, "5.5.1", "TLS is already active"));
            return None;
        }
        if self.tx.is_some() {
            self.error(&Reply::new(
                503,
                "5.5.1",
                "STARTTLS not allowed inside a transaction",
            ));
            return None;
        }
        self.reply(&Reply::new(220, "2.0.0", "Ready to start TLS"));
        self.state = State::Waiting;
        Some(Action::StartTls)
    }

    fn auth(&mut self, mechanism: &str, initial: Option<&str>) -> Option<Action> {
        if !self.config.auth_required {
            self.error(&Reply::new(
                502,
                "5.5.1",
                "AUTH is not available on this port",
            ));
            return None;
        }
        if self.helo.is_none() || !self.esmtp {
            self.error(&Reply::new(503, "5.5.1", "Send EHLO first"));
            return None;
        }
        if self.tls.is_none() {
            self.error(&Reply::new(
                538,
                "5.7.11",
                "Encryption required for requested authentication mechanism",
            ));
            return None;
        }
        if self.user.is_some() {
            self.error(&Reply::new(503, "5.5.1", "Already authenticated"));
            return None;
        }
        if self.tx.is_some() {
            self.error(&Reply::new(
                503,
                "5.5.1",
                "AUTH not allowed inside a transaction",
            ));
            return None;
        }
        if mechanism.eq_ignore_ascii_case("PLAIN") {
            match initial {
                Some(resp) => self.auth_plain(resp.as_bytes()),
                None => {
                    self.out.extend_from_slice(b"334 \r\n");
                    self.state = State::AuthPlain;
                    None
                }
            }
        } else if mechanism.eq_ignore_ascii_case("LOGIN") {
            match initial {
                Some(resp) => self.auth_login_user(resp.as_bytes()),
                None => {
                    // base64("Username:")
                    self.out.extend_from_slice(b"334 VXNlcm5hbWU6\r\n");
                    self.state = State::AuthLoginUser;
                    None
                }
            }
        } else {
            self.error(&Reply::new(
                504,
                "5.5.4",
                "Unrecognized authentication type",
            ));
            None
        }
    }

    /// Decodes one client response of an AUTH exchange; `None` after replying to a cancel or bad base64.
    fn auth_response(&mut self, line: &[u8]) -> Option<Vec<u8>> {
        if line == b"*" {
            self.error(&Reply::new(501, "5.7.0", "Authentication canceled"));
            return None;
        }
        // "=" is an empty initial response (RFC 4954 section 4).
        if line == b"=" {
            return Some(Vec::new());
        }
        match BASE64.decode(line) {
            Ok(v) => Some(v),
            Err(_) => {
                self.error(&Reply::new(501, "5.5.2", "Cannot decode the response"));
                None
            }
        }
    }

    fn auth_plain(&mut self, line: &[u8]) -> Option<Action> {
        let decoded = self.auth_response(line)?;
        let mut parts = decoded.split(|&b| b == 0);
        let (Some(authz), Some(user), Some(pass), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            self.error(&Reply::new(501, "5.5.2", "Malformed PLAIN response"));
            return None;
        };
        let (Ok(authz), Ok(user), Ok(pass)) = (
            std::str::from_utf8(authz),
            std::str::from_utf8(user),
            std::str::from_utf8(pass),
        ) else {
            self.error(&Reply::new(501, "5.5.2", "Credentials are not valid UTF-8"));
            return None;
        };
        if !authz.is_empty() && authz != user {
            self.error(&Reply::new(
                535,
                "5.7.8",
                "Authorization identity must match the user",
            ));
            return None;
        }
        self.state = State::Waiting;
        Some(Action::Authenticate {
            username: user.to_owned(),
            password: pass.to_owned(),
        })
    }

    fn auth_login_user(&mut self, line: &[u8]) -> Option<Action> {
        let decoded = self.auth_response(line)?;
        let Ok(user) = String::from_utf8(decoded) else {
            self.error(&Reply::new(501, "5.5.2", "User name is not valid UTF-8"));
            return None;
        };
        // base64("Password:")
        self.out.extend_from_slice(b"334 UGFzc3dvcmQ6\r\n");
        self.state = State::AuthLoginPass(user);
        None
    }

    fn auth_login_pass(&mut self, user: String, line: &[u8]) -> Option<Action> {
        let decoded = self.auth_response(line)?;
        let Ok(password) = String::from_utf8(decoded) else {
            self.error(&Reply::new(501, "5.5.2", "Password is not valid UTF-8"));
            return None;
        };
        self.state = State::Waiting;
        Some(Action::Authenticate {
            username: user,
            password,
        })
    }
}

/// The `reason` label for a refusal the session makes itself: a small fixed set, from the reply. Refusals
/// from the policy and the driver carry their own reason ([`Refusal`]).
fn rejection_reason(r: &Reply) -> RejectReason {
    match (r.code, r.status) {
        (_, "5.7.0" | "5.7.8" | "5.7.11") => RejectReason::Authentication,
        (_, "5.3.4") => RejectReason::MessageTooLarge,
        (_, "4.5.3") => RejectReason::TooManyRecipients,
        (_, "5.6.7") => RejectReason::Smtputf8Required,
        (_, "5.6.0") => RejectReason::MalformedMessage,
        (_, "4.7.0") => RejectReason::TooManyErrors,
        (_, "4.4.2") => RejectReason::Timeout,
        (_, "4.3.2") => RejectReason::ShuttingDown,
        (_, "4.3.1") => RejectReason::MemoryBudget,
        (_, s) if s.starts_with("5.5.") || s == "5.1.3" || s == "5.1.7" => RejectReason::Protocol,
        _ => RejectReason::Other,
    }
}

fn capitalize(e: &CommandError) -> String {
    let s = e.to_string();
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => s,
    }
}

#[cfg(test)]
mod tests;
