//! The SMTP protocol, without I/O.
//!
//! [`Session`] is the server side of RFC 5321 with the extensions senders expect (PIPELINING, SIZE,
//! 8BITMIME, SMTPUTF8, ENHANCEDSTATUSCODES, CHUNKING, STARTTLS, AUTH). It takes bytes and produces reply bytes
//! and [`Action`]s; the caller (`server`) owns sockets, TLS, timers and the spool. Keeping the state machine
//! free of I/O lets the unit tests drive every path, byte by byte, with no network.
//!
//! # Layout
//! - `address`: mailbox and path syntax (RFC 5321 section 4.1.2, RFC 6531 for UTF-8).
//! - `command`: one command line to a [`command::Command`].
//! - `reply`: reply codes with enhanced status codes (RFC 3463).
//! - `body`: the DATA and BDAT readers: dot-unstuffing, CRLF discipline, size and line limits.
//! - `session`: the state machine.

pub mod address;
pub mod body;
pub mod command;
pub mod reply;
pub mod session;

pub use address::{Mailbox, ReversePath};
pub use reply::Reply;
pub use session::{Action, Envelope, Session, SessionConfig};
