//! The list against its store: paging, durability across reopen and compaction, the old file format,
//! expiry, and streaks.

use std::time::Duration;

use herald_config::Suppression;

use super::*;
use crate::outcome::{Category, Class};

fn open(dir: &Path) -> Suppressions {
    let mut p = Suppression::default();
    p.mailbox_full.replies = 2;
    p.mailbox_full.over = Duration::ZERO;
    Suppressions::open(dir, p).unwrap()
}

use super::testing::reply;

fn failed(code: u16, category: Category) -> Observation {
    super::testing::failed(code, category, reply(code, "5.2.2", "mailbox full"))
}

fn unknown() -> Observation {
    Observation::Failed {
        class: Class::Hard,
        category: Category::InvalidRecipient,
        reply: reply(550, "5.1.1", "no such user"),
    }
}

#[test]
fn pages_follow_the_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    for a in ["c@x.test", "A@x.test", "b@x.test"] {
        s.add_manual(a, "r", None).unwrap();
    }
    let (first, next) = s.page(None, 2);
    let names: Vec<_> = first.iter().map(|e| e.address.as_str()).collect();
    assert_eq!(names, ["A@x.test", "b@x.test"]);
    assert_eq!(next.as_deref(), Some("b@x.test"));
    let (rest, next) = s.page(Some("B@X.TEST"), 2);
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].address, "c@x.test");
    assert_eq!(next, None);
    assert!(s.page(Some("c@x.test"), 2).0.is_empty());
}

#[test]
fn entries_and_streaks_survive_reopen_and_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let e = s.observe("Gone@Dest.test", &unknown()).unwrap().unwrap();
    assert_eq!(e.category, Some(Cause::InvalidRecipient));
    assert!(e.expires_at.is_some());
    s.observe("full@dest.test", &failed(552, Category::MailboxFull))
        .unwrap();
    for i in 0..600 {
        s.add_manual(&format!("t{i}@x.test"), "r", None).unwrap();
        s.remove(&format!("t{i}@x.test")).unwrap();
    }
    assert!(s.contains("gone@dest.test"));
    assert!(!s.remove("nobody@x.test").unwrap());
    drop(s);
    let s = open(dir.path());
    assert_eq!(s.len(), 1);
    let e = s.get("GONE@dest.test").unwrap();
    assert_eq!(e.reason, "550 5.1.1 no such user");
    assert_eq!(e.reply.unwrap().code, Some(550));
    assert_eq!(s.streak("full@dest.test").map(|s| s.replies), Some(1));
    let lines = std::fs::read_to_string(dir.path().join("suppressions"))
        .unwrap()
        .lines()
        .count();
    assert!(lines < 1100, "{lines} lines: never compacted");
}

#[test]
fn the_old_file_format_still_reads_and_never_expires() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("suppressions"),
        concat!(
            r#"{"op":"add","address":"old@x.test","reason":"550 5.1.1 no such user","added_at":"2024-05-01T10:00:00.123456789+00:00"}"#,
            "\n",
            r#"{"op":"add","address":"gone@x.test","reason":"r","added_at":"2024-05-01T10:00:00+00:00"}"#,
            "\n",
            r#"{"op":"remove","address":"gone@x.test"}"#,
            "\n",
        ),
    )
    .unwrap();
    let s = open(dir.path());
    let e = s.get("old@x.test").unwrap();
    assert_eq!(
        (e.category, e.expires_at, e.reason.as_str()),
        (None, None, "550 5.1.1 no such user")
    );
    assert!(!s.contains("gone@x.test"));
}

#[test]
fn an_expired_entry_stops_suppressing_and_is_swept_from_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.add_manual(
        "brief@x.test",
        "r",
        Some(Utc::now() + chrono::Duration::milliseconds(1)),
    )
    .unwrap();
    s.add_manual("kept@x.test", "r", None).unwrap();
    std::thread::sleep(Duration::from_millis(5));
    assert!(!s.contains("brief@x.test"));
    assert_eq!(s.page(None, 10).0.len(), 1);
    assert_eq!(s.sweep().unwrap(), 1);
    let text = std::fs::read_to_string(dir.path().join("suppressions")).unwrap();
    assert!(!text.contains("brief@x.test"), "{text}");
    assert!(text.contains("kept@x.test"), "{text}");
    drop(s);
    assert!(open(dir.path()).contains("kept@x.test"));
}

#[test]
fn a_streak_suppresses_at_its_length_and_a_delivery_resets_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let full = failed(552, Category::MailboxFull);
    assert!(s.concerns("a@x.test", &full));
    assert!(s.observe("a@x.test", &full).unwrap().is_none());
    assert!(s.concerns("a@x.test", &Observation::Delivered));
    assert!(
        s.observe("a@x.test", &Observation::Delivered)
            .unwrap()
            .is_none()
    );
    assert!(s.streak("a@x.test").is_none());
    assert!(!s.concerns("a@x.test", &Observation::Delivered));
    assert!(s.observe("a@x.test", &full).unwrap().is_none());
    let e = s.observe("a@x.test", &full).unwrap().unwrap();
    assert_eq!(e.category, Some(Cause::MailboxFull));
    assert!(s.streak("a@x.test").is_none());
}

#[test]
fn a_bounce_does_not_shorten_a_longer_suppression() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.add_manual("a@x.test", "operator", None).unwrap();
    assert!(s.observe("a@x.test", &unknown()).unwrap().is_none());
    assert_eq!(s.get("a@x.test").unwrap().category, Some(Cause::Manual));
}
