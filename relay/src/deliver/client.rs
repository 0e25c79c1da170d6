//! The SMTP client side: one connection to one server, with replies parsed and time limits per phase.
//!
//! Written here rather than taken from mail-send because an MTA needs what a submission client does not:
//! a reply per recipient (mail-send's `send` stops at the first refused RCPT), PIPELINING of MAIL, RCPT and
//! DATA in one write, a bound source address, opportunistic STARTTLS that falls back, and the server's
//! extensions (SIZE, 8BITMIME, SMTPUTF8) to decide before sending.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
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
}

/// A message to send.
#[derive(Debug)]
pub struct Transaction<'a> {
    pub sender: &'a str,
    pub recipients: Vec<Rcpt<'a>>,
    pub data: &'a [u8],
    pub eight_bit: bool,
    pub smtputf8: bool,
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
        let mut lines: Vec<String> = Vec::new();
        let mut code = 0u16;
        loop {
            let line = self.read_line(what, limit).await?;
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
            lines.push(line.get(4..).unwrap_or("").to_owned());
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
        let mut texts = Vec::with_capacity(lines.len());
        for l in &lines {
            let (first, rest) = l.split_once(' ').unwrap_or((l.as_str(), ""));
            let looks_enhanced = first.starts_with(class)
                && first.split('.').count() == 3
                && first
                    .split('.')
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
            if looks_enhanced {
                enhanced.get_or_insert_with(|| first.to_owned());
                texts.push(rest.trim().to_owned());
            } else {
                texts.push(l.trim().to_owned());
            }
        }
        Ok(Response {
            code,
            enhanced,
            text: texts.join(" "),
            lines,
        })
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
    /// one write.
    pub async fn send(&mut self, tx: &Transaction<'_>) -> Result<TransactionResult, ClientError> {
        let mut mail = format!("MAIL FROM:<{}>", tx.sender);
        if self.extensions.size.is_some() {
            mail.push_str(&format!(" SIZE={}", tx.data.len()));
        }
        if tx.eight_bit && self.extensions.eight_bit {
            mail.push_str(" BODY=8BITMIME");
        }
        if tx.smtputf8 {
            mail.push_str(" SMTPUTF8");
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
                batch.push_str(&format!("RCPT TO:<{}>\r\n", r.address));
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
                rcpt_replies.push(
                    self.command(&format!("RCPT TO:<{}>", r.address), "a RCPT reply")
                        .await?,
                );
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
        let stuffed = dot_stuff(tx.data);
        self.write(&stuffed, self.limits.data, "sending the message")
            .await?;
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

    async fn finish_empty_data(&mut self) -> Result<(), ClientError> {
        self.write(b".\r\n", self.limits.command, "ending DATA")
            .await?;
        self.read_response("the reply to the end of data", self.limits.data)
            .await?;
        Ok(())
    }

    /// QUIT, best effort.
    pub async fn quit(mut self) {
        let _ = self.command("QUIT", "the QUIT reply").await;
        let _ = self.stream.shutdown().await;
    }
}

/// The message as it goes after DATA: lines starting with "." doubled, a final CRLF, and ".CRLF".
pub fn dot_stuff(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 64 + 5);
    let mut line_start = true;
    let mut pos = 0;
    while pos < data.len() {
        if line_start && data[pos] == b'.' {
            out.push(b'.');
        }
        match memchr(b'\n', &data[pos..]) {
            Some(i) => {
                out.extend_from_slice(&data[pos..=pos + i]);
                pos += i + 1;
                line_start = true;
            }
            None => {
                out.extend_from_slice(&data[pos..]);
                pos = data.len();
                line_start = false;
            }
        }
    }
    if !line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
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

    #[test]
    fn dot_stuffing() {
        assert_eq!(dot_stuff(b"a\r\n.b\r\n"), b"a\r\n..b\r\n.\r\n");
        assert_eq!(dot_stuff(b".\r\n"), b"..\r\n.\r\n");
        assert_eq!(dot_stuff(b"no end"), b"no end\r\n.\r\n");
        assert_eq!(dot_stuff(b""), b".\r\n");
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
