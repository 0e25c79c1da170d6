//! The SMTP client side: one connection to one server, with replies parsed and time limits per phase.
//!
//! Written here rather than taken from mail-send because an MTA needs what a submission client does not:
//! a reply per recipient (mail-send's `send` stops at the first refused RCPT), PIPELINING of MAIL, RCPT and
//! DATA in one write, a bound source address, opportunistic STARTTLS that falls back, and the server's
//! extensions (SIZE, 8BITMIME, SMTPUTF8) to decide before sending, and the sender's DSN parameters passed on
//! to a server that takes them (RFC 3461 section 5.3.1: RET and ENVID on MAIL, NOTIFY and ORCPT on RCPT).
//!
//! The message is never held whole: a [`Body`] (the spool's reader) hands it over a piece at a time after the
//! 354, and a [`DotStuffer`] stuffs each piece as it goes out, carrying "at the start of a line" from one
//! piece to the next.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use herald_smtp::dsn::{MailDsn, RcptDsn, xtext_encode};
use memchr::memchr;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::tls::{Assurance, TlsClient};

/// A parsed server reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub code: u16,
    pub enhanced: Option<String>,
    /// The text of all lines, joined by spaces, without the code and enhanced code.
    pub text: String,
    /// The text of each line (for EHLO keywords).
    pub lines: Vec<String>,
}

impl Response {
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }
}

impl std::fmt::Display for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.enhanced {
            Some(e) => write!(f, "{} {} {}", self.code, e, self.text),
            None => write!(f, "{} {}", self.code, self.text),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("connection closed by the server")]
    Closed,
    #[error("malformed reply from the server: {0:?}")]
    Protocol(String),
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    /// The server's certificate did not verify (a verifying config only: the smarthost's).
    #[error("certificate not verified: {0}")]
    Certificate(rustls::CertificateError),
    /// AUTH was asked for over a connection whose server is not authenticated; nothing was sent.
    #[error("credentials withheld: the server's certificate was not verified")]
    Unverified,
    /// The message could not be read while it was being sent; the connection is mid-DATA and unusable.
    #[error("{0}")]
    Body(Box<dyn std::error::Error + Send + Sync>),
}

/// What the server advertised in its EHLO reply.
#[derive(Debug, Clone, Default)]
pub struct Extensions {
    pub esmtp: bool,
    pub pipelining: bool,
    pub starttls: bool,
    pub eight_bit: bool,
    pub smtputf8: bool,
    pub chunking: bool,
    /// DSN (RFC 3461): the server takes the sender's DSN parameters, and reporting on the message is then
    /// its job.
    pub dsn: bool,
    /// The SIZE limit, when one was given (0 means none).
    pub size: Option<u64>,
    pub auth_plain: bool,
    pub auth_login: bool,
}

impl Extensions {
    fn parse(r: &Response) -> Extensions {
        let mut e = Extensions {
            esmtp: true,
            ..Extensions::default()
        };
        for line in r.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(kw) = words.next() else { continue };
            match kw.to_ascii_uppercase().as_str() {
                "PIPELINING" => e.pipelining = true,
                "STARTTLS" => e.starttls = true,
                "8BITMIME" => e.eight_bit = true,
                "SMTPUTF8" => e.smtputf8 = true,
                "CHUNKING" => e.chunking = true,
                "DSN" => e.dsn = true,
                "SIZE" => e.size = words.next().and_then(|s| s.parse().ok()),
                "AUTH" => {
                    for m in words {
                        match m.to_ascii_uppercase().as_str() {
                            "PLAIN" => e.auth_plain = true,
                            "LOGIN" => e.auth_login = true,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        e
    }
}

/// A plain or TLS connection.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Message text held back before a write, so small pieces share one: a write costs the same system call
/// and the server a wake-up whatever its size.
const SEND_COALESCE: usize = 32 * 1024;

/// Time limits per phase.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub command: Duration,
    pub data: Duration,
}

/// One client connection.
pub struct Client {
    stream: Stream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    limits: Limits,
    pub extensions: Extensions,
    /// The negotiated TLS version, once STARTTLS or implicit TLS is up.
    pub tls: Option<String>,
    /// What the TLS session established about the server; None in clear.
    assurance: Option<Assurance>,
    /// A transaction was sent; the next one starts with RSET, so each begins from a known state.
    used: bool,
    /// The message is being sent and its end of data has not gone out: a QUIT now would be message text.
    in_data: bool,
    /// Replies read on this connection so far.
    replies: u64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// One recipient's line in a transaction.
#[derive(Debug)]
pub struct Rcpt<'a> {
    pub address: &'a str,
    /// Sent as NOTIFY and ORCPT when the server supports DSN.
    pub dsn: Option<&'a RcptDsn>,
}

/// A message to send. Its content comes separately, as a [`Body`].
#[derive(Debug)]
pub struct Transaction<'a> {
    pub sender: &'a str,
    pub recipients: Vec<Rcpt<'a>>,
    /// The message's size in bytes, for the SIZE parameter.
    pub size: u64,
    pub eight_bit: bool,
    pub smtputf8: bool,
    /// Sent as RET and ENVID when the server supports DSN.
    pub dsn: &'a MailDsn,
}

/// A message's content, handed to [`Client::send`] a piece at a time as it goes out, so that the client
/// never holds the message whole (only one stuffed piece).
pub trait Body: Send {
    type Error: std::error::Error + Send + Sync + 'static;

    /// The next piece of the message, or None after the last.
    fn next_piece(
        &mut self,
    ) -> impl std::future::Future<Output = Result<Option<&[u8]>, Self::Error>> + Send;
}

impl Body for crate::spool::MessageReader {
    type Error = crate::spool::SpoolError;

    fn next_piece(
        &mut self,
    ) -> impl std::future::Future<Output = Result<Option<&[u8]>, Self::Error>> + Send {
        crate::spool::MessageReader::next_piece(self)
    }
}

/// Per-recipient replies: the RCPT reply if refused, else the final reply to the data.
#[derive(Debug)]
pub struct TransactionResult {
    pub replies: Vec<Response>,
}

impl Client {
    pub fn new(stream: Stream, limits: Limits) -> Client {
        Client {
            stream,
            buf: vec![0; 16 * 1024],
            start: 0,
            end: 0,
            limits,
            extensions: Extensions::default(),
            tls: None,
            assurance: None,
            used: false,
            in_data: false,
            replies: 0,
        }
    }

    /// Implicit TLS (RFC 8314): the handshake before the greeting.
    pub async fn connect_tls(
        tcp: TcpStream,
        tls: &TlsClient,
        name: ServerName<'static>,
        limits: Limits,
    ) -> Result<Client, ClientError> {
        let stream = handshake(tcp, tls, name, limits.command).await?;
        Ok(Client::over_tls(stream, tls, limits))
    }

    fn over_tls(stream: TlsStream<TcpStream>, tls: &TlsClient, limits: Limits) -> Client {
        let version = crate::server::tls::version_name(stream.get_ref().1.protocol_version());
        let mut client = Client::new(Stream::Tls(Box::new(stream)), limits);
        client.tls = Some(version);
        client.assurance = Some(tls.assurance());
        client
    }

    /// Is the server authenticated: TLS with a certificate that verified?
    pub fn verified(&self) -> bool {
        self.assurance == Some(Assurance::Verified)
    }

    /// Reads one (possibly multi-line) reply.
    pub async fn read_response(
        &mut self,
        what: &'static str,
        limit: Duration,
    ) -> Result<Response, ClientError> {
        let mut lines: Vec<String> = Vec::with_capacity(1);
        let mut code = 0u16;
        loop {
            let mut line = self.read_line(what, limit).await?;
            let b = line.as_bytes();
            if b.len() < 3 || !b[..3].iter().all(u8::is_ascii_digit) {
                return Err(ClientError::Protocol(line));
            }
            let c: u16 = line[..3]
                .parse()
                .map_err(|_| ClientError::Protocol(line.clone()))?;
            if code != 0 && c != code {
                return Err(ClientError::Protocol(line));
            }
            code = c;
            let more = b.get(3) == Some(&b'-');
            // The text after the code and its separator, in the line's own allocation.
            match line.get(4..) {
                Some(_) => drop(line.drain(..4)),
                None => line.clear(),
            }
            lines.push(line);
            if !more {
                break;
            }
            if lines.len() > 256 {
                return Err(ClientError::Protocol("reply with too many lines".into()));
            }
        }
        // The enhanced code is only on lines of replies whose class it matches (RFC 2034).
        let class = char::from(b'0' + (code / 100) as u8);
        let mut enhanced = None;
        let mut text = String::new();
        for (i, l) in lines.iter().enumerate() {
            if i > 0 {
                text.push(' ');
            }
            let (first, rest) = l.split_once(' ').unwrap_or((l.as_str(), ""));
            let looks_enhanced = first.starts_with(class)
                && first.split('.').count() == 3
                && first
                    .split('.')
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
            if looks_enhanced {
                enhanced.get_or_insert_with(|| first.to_owned());
                text.push_str(rest.trim());
            } else {
                text.push_str(l.trim());
            }
        }
        self.replies += 1;
        Ok(Response {
            code,
            enhanced,
            text,
            lines,
        })
    }

    /// Replies read on this connection so far: unchanged across a transaction, the server said nothing
    /// about it (and, having answered no DATA, cannot have taken the message).
    pub fn replies(&self) -> u64 {
        self.replies
    }

    async fn read_line(
        &mut self,
        what: &'static str,
        limit: Duration,
    ) -> Result<String, ClientError> {
        loop {
            if let Some(nl) = memchr(b'\n', &self.buf[self.start..self.end]) {
                let raw = &self.buf[self.start..self.start + nl];
                let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
                let line = String::from_utf8_lossy(raw).into_owned();
                self.start += nl + 1;
                return Ok(line);
            }
            if self.end - self.start >= 4096 {
                return Err(ClientError::Protocol("reply line too long".into()));
            }
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let n = tokio::time::timeout(limit, self.stream.read(&mut self.buf[self.end..]))
                .await
                .map_err(|_| ClientError::Timeout(what))??;
            if n == 0 {
                return Err(ClientError::Closed);
            }
            self.end += n;
        }
    }

    async fn write(
        &mut self,
        data: &[u8],
        limit: Duration,
        what: &'static str,
    ) -> Result<(), ClientError> {
        tokio::time::timeout(limit, self.stream.write_all(data))
            .await
            .map_err(|_| ClientError::Timeout(what))??;
        Ok(())
    }

    /// Sends one command line and reads its reply.
    pub async fn command(
        &mut self,
        line: &str,
        what: &'static str,
    ) -> Result<Response, ClientError> {
        let mut l = String::with_capacity(line.len() + 2);
        l.push_str(line);
        l.push_str("\r\n");
        self.write(l.as_bytes(), self.limits.command, what).await?;
        self.read_response(what, self.limits.command).await
    }

    /// EHLO, falling back to HELO when the server refuses EHLO.
    pub async fn hello(&mut self, name: &str) -> Result<Response, ClientError> {
        let r = self
            .command(&format!("EHLO {name}"), "the EHLO reply")
            .await?;
        if r.is_positive() {
            self.extensions = Extensions::parse(&r);
            return Ok(r);
        }
        if r.code >= 500 {
            let r = self
                .command(&format!("HELO {name}"), "the HELO reply")
                .await?;
            self.extensions = Extensions::default();
            return Ok(r);
        }
        Ok(r)
    }

    /// STARTTLS and the handshake. On success the caller must EHLO again.
    pub async fn starttls(
        self,
        tls: &TlsClient,
        name: ServerName<'static>,
    ) -> Result<(Client, Option<Response>), ClientError> {
        let mut this = self;
        let r = this.command("STARTTLS", "the STARTTLS reply").await?;
        if r.code != 220 {
            return Ok((this, Some(r)));
        }
        let Stream::Plain(tcp) = this.stream else {
            return Err(ClientError::Protocol("STARTTLS on a TLS connection".into()));
        };
        let stream = handshake(tcp, tls, name, this.limits.command).await?;
        Ok((Client::over_tls(stream, tls, this.limits), None))
    }

    /// AUTH PLAIN (or LOGIN) with the given credentials, only to a server whose certificate verified: the
    /// credentials go nowhere else, whatever the caller's policy.
    pub async fn authenticate(
        &mut self,
        user: &str,
        password: &str,
    ) -> Result<Response, ClientError> {
        if !self.verified() {
            return Err(ClientError::Unverified);
        }
        if self.extensions.auth_plain || !self.extensions.auth_login {
            let token = BASE64.encode(format!("\0{user}\0{password}"));
            return self
                .command(&format!("AUTH PLAIN {token}"), "the AUTH reply")
                .await;
        }
        let r = self.command("AUTH LOGIN", "the AUTH reply").await?;
        if r.code != 334 {
            return Ok(r);
        }
        let r = self.command(&BASE64.encode(user), "the AUTH reply").await?;
        if r.code != 334 {
            return Ok(r);
        }
        self.command(&BASE64.encode(password), "the AUTH reply")
            .await
    }

    /// One mail transaction with a reply per recipient. With PIPELINING, MAIL, every RCPT and DATA go out in
    /// one write. The message is read from `body` only once the server said 354.
    pub async fn send<B: Body>(
        &mut self,
        tx: &Transaction<'_>,
        body: &mut B,
    ) -> Result<TransactionResult, ClientError> {
        let mut mail = format!("MAIL FROM:<{}>", tx.sender);
        if self.extensions.size.is_some() {
            mail.push_str(&format!(" SIZE={}", tx.size));
        }
        if tx.eight_bit && self.extensions.eight_bit {
            mail.push_str(" BODY=8BITMIME");
        }
        if tx.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        if self.extensions.dsn {
            if let Some(ret) = tx.dsn.ret {
                mail.push_str(" RET=");
                mail.push_str(ret.as_str());
            }
            if let Some(id) = &tx.dsn.envid {
                mail.push_str(" ENVID=");
                mail.push_str(&xtext_encode(id));
            }
        }
        let n = tx.recipients.len();
        let mut rcpt_replies = Vec::with_capacity(n);
        let mail_reply;
        let data_reply;
        let rset = std::mem::replace(&mut self.used, true);
        if self.extensions.pipelining {
            let mut batch = String::with_capacity(64 + 48 * n);
            if rset {
                batch.push_str("RSET\r\n");
            }
            batch.push_str(&mail);
            batch.push_str("\r\n");
            for r in &tx.recipients {
                batch.push_str(&self.rcpt_line(r));
                batch.push_str("\r\n");
            }
            batch.push_str("DATA\r\n");
            self.write(batch.as_bytes(), self.limits.command, "sending MAIL")
                .await?;
            if rset {
                let r = self
                    .read_response("the RSET reply", self.limits.command)
                    .await?;
                if !r.is_positive() {
                    return Err(ClientError::Protocol(format!("RSET refused: {r}")));
                }
            }
            mail_reply = self
                .read_response("the MAIL reply", self.limits.command)
                .await?;
            for _ in 0..n {
                rcpt_replies.push(
                    self.read_response("a RCPT reply", self.limits.command)
                        .await?,
                );
            }
            data_reply = self
                .read_response("the DATA reply", self.limits.command)
                .await?;
        } else {
            if rset {
                let r = self.command("RSET", "the RSET reply").await?;
                if !r.is_positive() {
                    return Err(ClientError::Protocol(format!("RSET refused: {r}")));
                }
            }
            mail_reply = self.command(&mail, "the MAIL reply").await?;
            if !mail_reply.is_positive() {
                return Ok(TransactionResult {
                    replies: vec![mail_reply; n],
                });
            }
            for r in &tx.recipients {
                rcpt_replies.push(self.command(&self.rcpt_line(r), "a RCPT reply").await?);
            }
            if !rcpt_replies.iter().any(Response::is_positive) {
                return Ok(TransactionResult {
                    replies: rcpt_replies,
                });
            }
            data_reply = self.command("DATA", "the DATA reply").await?;
        }
        if !mail_reply.is_positive() {
            // With pipelining the RCPT and DATA replies were refusals too; the MAIL reply is the reason.
            if data_reply.code == 354 {
                self.finish_empty_data().await?;
            }
            return Ok(TransactionResult {
                replies: vec![mail_reply; n],
            });
        }
        let any_ok = rcpt_replies.iter().any(Response::is_positive);
        if data_reply.code != 354 {
            if any_ok {
                // Accepted recipients get the DATA refusal.
                for r in rcpt_replies.iter_mut() {
                    if r.is_positive() {
                        *r = data_reply.clone();
                    }
                }
            }
            return Ok(TransactionResult {
                replies: rcpt_replies,
            });
        }
        if !any_ok {
            // RFC 2920 section 3.1: a server should not say 354 here, but some do; send an empty message end.
            self.finish_empty_data().await?;
            return Ok(TransactionResult {
                replies: rcpt_replies,
            });
        }
        self.send_body(body).await?;
        let end = self
            .read_response("the reply to the end of data", self.limits.data)
            .await?;
        for r in rcpt_replies.iter_mut() {
            if r.is_positive() {
                *r = end.clone();
            }
        }
        Ok(TransactionResult {
            replies: rcpt_replies,
        })
    }

    /// `RCPT TO:<address>`, with the recipient's DSN parameters if the server takes them.
    fn rcpt_line(&self, r: &Rcpt<'_>) -> String {
        let mut line = format!("RCPT TO:<{}>", r.address);
        if let Some(d) = r.dsn.filter(|_| self.extensions.dsn) {
            if let Some(n) = d.notify {
                line.push_str(&format!(" NOTIFY={n}"));
            }
            if let Some(o) = &d.orcpt {
                line.push_str(&format!(" ORCPT={o}"));
            }
        }
        line
    }

    /// Sends the message after 354, dot-stuffed piece by piece, each write under the data time limit (RFC
    /// 5321 section 4.5.3.2 times each send, not the whole message). What is pending is written once the
    /// next piece is read, so the end of data goes out with the last piece. When the body fails, the end of
    /// data is never sent: the caller must drop the connection, and the server discards what it got.
    async fn send_body<B: Body>(&mut self, body: &mut B) -> Result<(), ClientError> {
        let mut stuffer = DotStuffer::new();
        let mut out = Vec::new();
        self.in_data = true;
        loop {
            let piece = body
                .next_piece()
                .await
                .map_err(|e| ClientError::Body(Box::new(e)))?;
            match piece {
                Some(p) => {
                    // Small pieces wait for the next, so a small message and its end of data go out in one
                    // write (one segment for the server to read, not two).
                    if out.len() >= SEND_COALESCE {
                        self.write(&out, self.limits.data, "sending the message")
                            .await?;
                        out.clear();
                    }
                    stuffer.push(p, &mut out);
                }
                None => {
                    stuffer.finish(&mut out);
                    self.write(&out, self.limits.data, "sending the message")
                        .await?;
                    self.in_data = false;
                    return Ok(());
                }
            }
        }
    }

    async fn finish_empty_data(&mut self) -> Result<(), ClientError> {
        self.write(b".\r\n", self.limits.command, "ending DATA")
            .await?;
        self.read_response("the reply to the end of data", self.limits.data)
            .await?;
        Ok(())
    }

    /// QUIT, best effort, within the command time limit: a connection that will not close cleanly must not
    /// hold its delivery slot. Cut off mid-message, it only closes, so the server discards what it got.
    pub async fn quit(mut self) {
        let limit = self.limits.command;
        let _ = tokio::time::timeout(limit, async {
            if !self.in_data {
                let _ = self.command("QUIT", "the QUIT reply").await;
            }
            let _ = self.stream.shutdown().await;
        })
        .await;
    }
}

/// The message as it goes after DATA: lines starting with "." doubled, a final CRLF, and ".CRLF".
pub fn dot_stuff(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut stuffer = DotStuffer::new();
    stuffer.push(data, &mut out);
    stuffer.finish(&mut out);
    out
}

/// [`dot_stuff`] for a message that arrives in pieces: whether the next byte starts a line is carried from
/// one piece to the next, so any split of the message gives the same bytes as stuffing it whole.
#[derive(Debug, Clone, Copy)]
pub struct DotStuffer {
    line_start: bool,
}

impl Default for DotStuffer {
    fn default() -> Self {
        DotStuffer::new()
    }
}

impl DotStuffer {
    pub fn new() -> DotStuffer {
        DotStuffer { line_start: true }
    }

    /// Appends the stuffed form of the next piece of the message to `out`.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<u8>) {
        // Room for the usual case (a dot now and then) up front, not a reallocation every few lines.
        out.reserve(data.len() + data.len() / 64 + 5);
        let mut pos = 0;
        while pos < data.len() {
            if self.line_start && data[pos] == b'.' {
                out.push(b'.');
            }
            match memchr(b'\n', &data[pos..]) {
                Some(i) => {
                    out.extend_from_slice(&data[pos..=pos + i]);
                    pos += i + 1;
                    self.line_start = true;
                }
                None => {
                    out.extend_from_slice(&data[pos..]);
                    pos = data.len();
                    self.line_start = false;
                }
            }
        }
    }

    /// Appends the end of the data: CRLF if the message did not end a line, then ".CRLF".
    pub fn finish(self, out: &mut Vec<u8>) {
        if !self.line_start {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}

async fn handshake(
    tcp: TcpStream,
    tls: &TlsClient,
    name: ServerName<'static>,
    limit: Duration,
) -> Result<TlsStream<TcpStream>, ClientError> {
    match tokio::time::timeout(limit, tls.handshake(name, tcp)).await {
        Err(_) => Err(ClientError::Timeout("the TLS handshake")),
        Ok(Ok(stream)) => Ok(stream),
        // tokio-rustls hands rustls's error over inside the io::Error: a certificate that did not verify is
        // told apart from a failed handshake, so the reason names it.
        Ok(Err(e)) => match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(rustls::Error::InvalidCertificate(c)) => Err(ClientError::Certificate(c.clone())),
            _ => Err(ClientError::Tls(e)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn dot_stuffing() {
        assert_eq!(dot_stuff(b"a\r\n.b\r\n"), b"a\r\n..b\r\n.\r\n");
        assert_eq!(dot_stuff(b".\r\n"), b"..\r\n.\r\n");
        assert_eq!(dot_stuff(b"no end"), b"no end\r\n.\r\n");
        assert_eq!(dot_stuff(b""), b".\r\n");
    }

    /// RFC 5321 section 4.5.2 read literally, line by line: the oracle for the stuffers.
    fn stuffed_by_lines(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for line in data.split_inclusive(|&b| b == b'\n') {
            if line.first() == Some(&b'.') {
                out.push(b'.');
            }
            out.extend_from_slice(line);
        }
        if !data.is_empty() && data.last() != Some(&b'\n') {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
        out
    }

    /// Message bytes rich in what matters to stuffing: dots, CR, LF, and lines that are only a dot.
    fn message_bytes() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(
            prop::sample::select(vec![b'.', b'.', b'\r', b'\n', b'\n', b'a', b' ']),
            0..200,
        )
    }

    proptest! {
        #[test]
        fn stuffing_in_pieces_equals_stuffing_whole(
            data in message_bytes(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let whole = dot_stuff(&data);
            prop_assert_eq!(&whole, &stuffed_by_lines(&data));
            let mut at: Vec<usize> = cuts.iter().map(|c| c.index(data.len() + 1)).collect();
            at.sort_unstable();
            let mut stuffer = DotStuffer::new();
            let mut out = Vec::new();
            let mut from = 0;
            for &to in at.iter().chain(std::iter::once(&data.len())) {
                // Empty pieces too: a reader may hand one over at a boundary.
                stuffer.push(&data[from..to], &mut out);
                from = to;
            }
            stuffer.finish(&mut out);
            prop_assert_eq!(out, whole);
        }
    }

    /// A body in fixed pieces that fails, when told, instead of handing out piece `fail_at`.
    struct Pieces {
        pieces: Vec<Vec<u8>>,
        next: usize,
        fail_at: Option<usize>,
    }

    impl Body for Pieces {
        type Error = io::Error;

        async fn next_piece(&mut self) -> Result<Option<&[u8]>, io::Error> {
            if self.fail_at == Some(self.next) {
                return Err(io::Error::other("disk on fire"));
            }
            self.next += 1;
            Ok(self.pieces.get(self.next - 1).map(Vec::as_slice))
        }
    }

    /// A minimal SMTP server on loopback for one transaction: returns the MAIL line and every byte that
    /// followed the 354, until the end of data or the client's close.
    async fn one_transaction(listener: tokio::net::TcpListener) -> (String, Vec<u8>) {
        let (mut sock, _) = listener.accept().await.unwrap();
        sock.write_all(b"220 test\r\n").await.unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut mail = String::new();
        // Commands: EHLO, then MAIL, RCPT, DATA (one per line; the client pipelines them).
        let mut answered = 0;
        while answered < 4 {
            let n = sock.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before DATA");
            got.extend_from_slice(&buf[..n]);
            while let Some(nl) = memchr(b'\n', &got) {
                let line = String::from_utf8_lossy(&got[..nl]).trim_end().to_owned();
                got.drain(..=nl);
                let reply: &[u8] = match answered {
                    0 => b"250-test\r\n250-PIPELINING\r\n250 SIZE 100000000\r\n",
                    1 => {
                        mail = line;
                        b"250 ok\r\n"
                    }
                    2 => b"250 ok\r\n",
                    _ => b"354 go on\r\n",
                };
                sock.write_all(reply).await.unwrap();
                answered += 1;
                if answered == 4 {
                    break;
                }
            }
        }
        loop {
            if got.ends_with(b"\r\n.\r\n") {
                sock.write_all(b"250 queued\r\n").await.unwrap();
                return (mail, got);
            }
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => return (mail, got),
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    }

    async fn send_pieces(
        pieces: Vec<Vec<u8>>,
        fail_at: Option<usize>,
    ) -> (Result<u16, String>, String, Vec<u8>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(one_transaction(listener));
        let limits = Limits {
            command: Duration::from_secs(10),
            data: Duration::from_secs(10),
        };
        let mut c = Client::new(
            Stream::Plain(TcpStream::connect(addr).await.unwrap()),
            limits,
        );
        c.read_response("the greeting", limits.command)
            .await
            .unwrap();
        c.hello("client.test").await.unwrap();
        let size = pieces.iter().map(|p| p.len() as u64).sum();
        let tx = Transaction {
            sender: "a@b.test",
            recipients: vec![Rcpt {
                address: "c@d.test",
                dsn: None,
            }],
            size,
            eight_bit: false,
            smtputf8: false,
            dsn: &MailDsn::default(),
        };
        let mut body = Pieces {
            pieces,
            next: 0,
            fail_at,
        };
        let result = match c.send(&tx, &mut body).await {
            Ok(r) => Ok(r.replies[0].code),
            Err(e) => Err(e.to_string()),
        };
        c.quit().await;
        let (mail, data) = server.await.unwrap();
        (result, mail, data)
    }

    #[tokio::test]
    async fn a_message_in_pieces_goes_out_stuffed_with_its_size() {
        let pieces = vec![
            b"Subject: x\r\n\r\na\r".to_vec(),
            b"\n.".to_vec(),
            b"\r\n".to_vec(),
            b".b".to_vec(),
        ];
        let (result, mail, data) = send_pieces(pieces.clone(), None).await;
        assert_eq!(result, Ok(250));
        assert_eq!(mail, "MAIL FROM:<a@b.test> SIZE=22");
        assert_eq!(data, dot_stuff(&pieces.concat()));
    }

    #[tokio::test]
    async fn a_body_that_fails_midway_never_ends_the_data() {
        // The first piece is past what is held back, so it is written before the failure.
        let mut first = b"Subject: x\r\n\r\n".to_vec();
        first.extend(b"0123456789abcdef\r\n".repeat(SEND_COALESCE / 16));
        let pieces = vec![first.clone(), b"line\r\n".to_vec(), b"more\r\n".to_vec()];
        let (result, _, data) = send_pieces(pieces, Some(2)).await;
        let err = result.unwrap_err();
        assert!(err.contains("disk on fire"), "{err}");
        // What went out is a prefix of the message and nothing else: no end of data, no QUIT as message text.
        assert_eq!(data, first);
    }

    #[test]
    fn extensions_from_ehlo() {
        let r = Response {
            code: 250,
            enhanced: None,
            text: String::new(),
            lines: vec![
                "mx.test hi".into(),
                "PIPELINING".into(),
                "SIZE 1000".into(),
                "auth login PLAIN".into(),
                "STARTTLS".into(),
            ],
        };
        let e = Extensions::parse(&r);
        assert!(e.pipelining && e.starttls && e.auth_plain && e.auth_login);
        assert_eq!(e.size, Some(1000));
        assert!(!e.eight_bit);
    }

    #[tokio::test]
    async fn credentials_are_not_sent_in_clear_whatever_the_server_offers() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let limits = Limits {
            command: Duration::from_secs(5),
            data: Duration::from_secs(5),
        };
        let mut client = Client::new(Stream::Plain(tcp), limits);
        client.extensions.auth_plain = true;
        let e = client.authenticate("user", "secret").await.unwrap_err();
        assert!(matches!(e, ClientError::Unverified), "{e}");
        drop(client);
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    }
}
