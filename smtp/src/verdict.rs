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
    /// What the refusal is counted under (see [`crate::Session::take_rejections`]).
    pub reason: RejectReason,
}

impl Refusal {
    pub fn new(reply: Reply, reason: RejectReason) -> Refusal {
        Refusal { reply, reason }
    }
}

/// Why a command, message or connection was refused: the `reason` label of the host's rejection metric
/// (`herald_smtp_rejections_total`). A closed set, so every series can exist from the start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// A client outside the listener's `allow_networks`, at connect.
    NetworkDenied,
    /// Too many connections, in total or from one client, at connect.
    ConnectionLimit,
    /// A recipient the client may not relay to.
    RelayDenied,
    /// A sender domain (MAIL FROM or From:) the client may not use: outside an authenticated user's allowed
    /// domains, or a trusted listener's senders.
    SenderNotAllowed,
    /// AUTH refused, or required first.
    Authentication,
    /// Over the size limit.
    MessageTooLarge,
    /// Over the recipient limit of a transaction.
    TooManyRecipients,
    /// A non-ASCII address without SMTPUTF8.
    Smtputf8Required,
    /// A message that breaks the line rules or lacks what it must have.
    MalformedMessage,
    /// A recipient on the suppression list.
    Suppressed,
    /// A mailbox that does not exist at a domain the relay receives for.
    UnknownRecipient,
    /// The session's limit of bad commands was reached.
    TooManyErrors,
    /// The client was silent too long.
    Timeout,
    /// The message could not be stored.
    SpoolError,
    /// The relay's memory budget for message bodies was spent (452 4.3.1; the client retries later).
    MemoryBudget,
    /// The relay is stopping.
    ShuttingDown,
    /// A command out of sequence, malformed or unknown.
    Protocol,
    /// Anything else.
    Other,
}

impl RejectReason {
    /// Every reason, in a stable order.
    pub const ALL: [RejectReason; 18] = [
        RejectReason::NetworkDenied,
        RejectReason::ConnectionLimit,
        RejectReason::RelayDenied,
        RejectReason::SenderNotAllowed,
        RejectReason::Authentication,
        RejectReason::MessageTooLarge,
        RejectReason::TooManyRecipients,
        RejectReason::Smtputf8Required,
        RejectReason::MalformedMessage,
        RejectReason::Suppressed,
        RejectReason::UnknownRecipient,
        RejectReason::TooManyErrors,
        RejectReason::Timeout,
        RejectReason::SpoolError,
        RejectReason::MemoryBudget,
        RejectReason::ShuttingDown,
        RejectReason::Protocol,
        RejectReason::Other,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::NetworkDenied => "network_denied",
            RejectReason::ConnectionLimit => "connection_limit",
            RejectReason::RelayDenied => "relay_denied",
            RejectReason::SenderNotAllowed => "sender_not_allowed",
            RejectReason::Authentication => "authentication",
            RejectReason::MessageTooLarge => "message_too_large",
            RejectReason::TooManyRecipients => "too_many_recipients",
            RejectReason::Smtputf8Required => "smtputf8_required",
            RejectReason::MalformedMessage => "malformed_message",
            RejectReason::Suppressed => "suppressed",
            RejectReason::UnknownRecipient => "unknown_recipient",
            RejectReason::TooManyErrors => "too_many_errors",
            RejectReason::Timeout => "timeout",
            RejectReason::SpoolError => "spool_error",
            RejectReason::MemoryBudget => "memory_budget",
            RejectReason::ShuttingDown => "shutting_down",
            RejectReason::Protocol => "protocol",
            RejectReason::Other => "other",
        }
    }
}
