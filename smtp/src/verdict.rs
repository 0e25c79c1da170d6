//! What the session asks its host at MAIL FROM and RCPT TO, and the answers it takes.
//!
//! The protocol checks (sequence, parameters, SIZE, the recipient limit, SMTPUTF8) are the session's; whether
//! this client may send as this sender or to this recipient is the host's: relay access, local mailboxes,
//! suppression lists and allowed sender domains live with the relay's config. The session calls the policy
//! synchronously, in the middle of the input at hand, so replies to pipelined commands (RFC 2920) stay in
//! order and go out in one write; an implementation must therefore answer from memory, without waiting.

use crate::address::{Mailbox, ReversePath};
use crate::reply::Reply;

/// Decides MAIL FROM and RCPT TO for one session. The session has already checked the command itself; the
/// policy sees only well-formed requests it would otherwise accept.
pub trait EnvelopePolicy {
    /// May a transaction start with this reverse-path? `user` is the client's authenticated name, if any.
    fn mail_from(&self, from: &ReversePath, user: Option<&str>) -> Verdict;

    /// May this recipient be added to the transaction? `user` is the client's authenticated name, if any.
    fn rcpt_to(&self, to: &Mailbox, user: Option<&str>) -> Verdict;
}

/// The policy's answer to one MAIL FROM or RCPT TO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// Refused; a client may make such a mistake now and then (a suppressed recipient, a sender domain the
    /// user may not use) and carry on.
    Refuse(Refusal),
    /// Refused, and counted towards the session's limit of bad commands: what a client probing for an open
    /// relay or guessing mailboxes sends, which should not go on for long.
    RefuseAsError(Refusal),
}

/// A refusal to send to the client, and why, for the rejection metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reply: Reply,
    /// The `reason` label the refusal is counted under (see [`crate::Session::take_rejections`]).
    pub reason: &'static str,
}

impl Refusal {
    pub fn new(reply: Reply, reason: &'static str) -> Refusal {
        Refusal { reply, reason }
    }
}
