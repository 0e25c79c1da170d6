//! herald-smtp: the SMTP protocol, without I/O.
//!
//! [`Session`] is the server side of RFC 5321 with the extensions senders expect (PIPELINING, SIZE,
//! 8BITMIME, SMTPUTF8, ENHANCEDSTATUSCODES, CHUNKING, DSN, STARTTLS, AUTH). It takes bytes and produces reply bytes
//! and [`Action`]s; the caller owns sockets, TLS, timers, password checks and the spool. Who may send what to
//! whom is not the protocol's to decide: the session asks an [`EnvelopePolicy`] its host provides, at MAIL
//! and RCPT, and sends the refusal it gets back. Keeping the state machine free of I/O and of the relay's
//! policy lets the unit tests drive every path, byte by byte, with no network and no config.
//!
//! # Layout
//! - `address`: mailbox and path syntax (RFC 5321 section 4.1.2, RFC 6531 for UTF-8).
//! - `command`: one command line to a [`command::Command`].
//! - `dsn`: the DSN extension's parameters (RFC 3461) and xtext.
//! - `reply`: reply codes with enhanced status codes (RFC 3463).
//! - `body`: the DATA and BDAT readers: dot-unstuffing, CRLF discipline, size and line limits.
//! - `budget`: the byte budget all sessions share for message bodies held in memory.
//! - `verdict`: the [`EnvelopePolicy`] the session consults for MAIL FROM and RCPT TO, and its answers.
//! - `session`: the state machine.

#![forbid(unsafe_code)]
#![warn(missing_debug_implementations, rust_2018_idioms)]

pub mod address;
pub mod body;
pub mod budget;
pub mod command;
pub mod dsn;
pub mod reply;
pub mod session;
pub mod verdict;

pub use address::{Mailbox, ReversePath};
pub use reply::Reply;
pub use session::{Action, Envelope, Limits, Session, SessionConfig};
pub use verdict::{EnvelopePolicy, Refusal, RejectReason, Verdict};
