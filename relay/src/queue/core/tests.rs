//! The queue core against its contract: every recipient reaches exactly one final outcome or stays queued;
//! none is both delivered and bounced; each retry delay stays within the jitter band around
//! `min(max, first × factor^n)` (and never past expiry); expiry and bounces yield a DSN for every sender
//! but the null sender and return-path senders. Unit tests for the cases, property tests for the rest.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::spool::{Location, MessageMeta, QueueId, RcptState, RcptStatus};

const T0: u64 = 1_700_000_000_000;
const DAY: u64 = 86_400_000;

fn settings() -> Settings {
    Settings {
        retry: Retry {
            first: Duration::from_secs(60),
            max: Duration::from_secs(3600),
            factor: 2.0,
        },
        max_age: Duration::from_millis(DAY),
        delay_warning: Duration::from_secs(4 * 3600),
        per_destination: 2,
        total_connections: 100,
        warmups: HashMap::new(),
        routing: Routing {
            smarthost: false,
            pools: HashMap::new(),
            sources: HashMap::new(),
            local: HashSet::from(["bounces.test".to_owned()]),
        },
    }
}

fn message(id: u64, sender: &str, recipients: &[&str]) -> NewEntry {
    NewEntry {
        meta: MessageMeta::new(
            QueueId(id),
            T0,
            "test".into(),
            "127.0.0.1:1",
            sender.into(),
            recipients.iter().collect(),
        ),
        states: Vec::new().into(),
        location: Location {
            segment: 1,
            offset: id * 100,
            len: 100,
        },
    }
}

fn reply(code: u16) -> Reply {
    Reply {
        code,
        enhanced: Some(format!("{}.0.0", code / 100)),
        text: "test".to_owned(),
        remote: true,
    }
}

fn attempt(job: &Job, code: u16) -> Attempt {
    Attempt {
        id: job.id,
        results: job.rcpts.iter().map(|&i| (i, reply(code))).collect(),
        remote_mta: Some("mx.test".to_owned()),
        domain: job.domain.clone(),
        tls: None,
        next_hop_dsn: false,
        verdicts: Vec::new(),
    }
}

fn verdicts(a: &Attempt) -> Vec<Option<Verdict>> {
    a.results
        .iter()
        .map(|(_, r)| match r.code {
            550 => Some((Class::Hard, Category::InvalidRecipient)),
            554 => Some((Class::Hard, Category::PolicyBlock)),
            c if c >= 400 => Some((Class::Soft, Category::TransientOther)),
            _ => None,
        })
        .collect()
}

fn starts(actions: &[Action]) -> Vec<Job> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Start(j) => Some(j.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_message_is_handed_out_once_per_destination_within_the_connection_cap() {
    let mut core = Core::new(settings());
    let jobs = starts(&core.insert(
        message(
            1,
            "a@example.test",
            &["x@one.test", "y@two.test", "z@one.test"],
        ),
        T0,
    ));
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    let one = jobs.iter().find(|j| &*j.domain == "one.test").unwrap();
    assert_eq!(one.rcpts, vec![0, 2]);
    // A third message to one.test while both slots of one.test are not taken: per_destination is 2.
    let more = starts(&core.insert(message(2, "a@example.test", &["w@one.test"]), T0));
    assert_eq!(more.len(), 1);
    assert!(starts(&core.insert(message(3, "a@example.test", &["v@one.test"]), T0)).is_empty());
}

#[test]
fn weighted_sources_split_a_pools_mail_and_a_message_keeps_its_source() {
    let a: std::net::IpAddr = "192.0.2.1".parse().unwrap();
    let b: std::net::IpAddr = "192.0.2.2".parse().unwrap();
    let retired: std::net::IpAddr = "192.0.2.3".parse().unwrap();
    let sources = [(a, 3), (b, 1), (retired, 0)];
    // Queue ids are accept times in µs: close together, as a busy relay makes them.
    let ids = (0..4000u64).map(|k| QueueId(T0 * 1000 + k * 7));
    let picks: Vec<_> = ids.clone().map(|id| source_of(&sources, id)).collect();
    let from_a = picks.iter().filter(|p| **p == Some(a)).count();
    assert!(
        (2850..=3150).contains(&from_a),
        "{from_a} of 4000 from a, weight 3 of 4"
    );
    assert!(
        !picks.contains(&Some(retired)),
        "a weight of 0 sends nothing"
    );
    assert!(picks.iter().all(Option::is_some));
    // The same message, the same source: nothing is stored, the id decides.
    for (id, pick) in ids.zip(&picks).take(100) {
        assert_eq!(source_of(&sources, id), *pick);
    }
    assert_eq!(source_of(&[(a, 0)], QueueId(1)), None);
    // A third address added: only mail that moves to it changes address, none moves between a and b.
    let c: std::net::IpAddr = "192.0.2.4".parse().unwrap();
    let grown = [(a, 3), (b, 1), (retired, 0), (c, 1)];
    let ids = (0..4000u64).map(|k| QueueId(T0 * 1000 + k * 7));
    for (id, before) in ids.zip(&picks) {
        let after = source_of(&grown, id);
        assert!(
            after == *before || after == Some(c),
            "{id}: {before:?} -> {after:?}"
        );
    }
}

#[test]
fn a_pooled_message_goes_to_a_destination_of_its_source_and_a_retry_keeps_it() {
    let mut s = settings();
    let a: std::net::IpAddr = "192.0.2.1".parse().unwrap();
    let b: std::net::IpAddr = "192.0.2.2".parse().unwrap();
    s.routing
        .pools
        .insert("example.test".to_owned(), Arc::from("pool1"));
    s.routing
        .sources
        .insert(Arc::from("pool1"), Arc::from([(a, 1), (b, 1)]));
    let mut core = Core::new(s);
    let mut seen = HashSet::new();
    for id in 1..=20u64 {
        let [job] = &starts(&core.insert(message(id, "x@example.test", &["y@one.test"]), T0))[..]
        else {
            panic!("one job per message");
        };
        let source = job.source.expect("a source from the pool");
        assert_eq!(&*job.dest, format!("pool1/{source}/one.test"));
        seen.insert(source);
        // Deferred and due again: the same source and destination.
        let tried = attempt(job, 451);
        core.record(tried.clone(), &verdicts(&tried), T0, 0.5);
        core.connection_closed(&job.dest, T0);
        let later = T0 + DAY / 2;
        let again = starts(&core.due(later));
        let retry = again.iter().find(|j| j.id == job.id).expect("retried");
        assert_eq!((retry.source, &retry.dest), (job.source, &job.dest));
        let done = attempt(retry, 250);
        core.record(done.clone(), &verdicts(&done), later, 0.5);
        core.connection_closed(&retry.dest, later);
    }
    assert_eq!(seen.len(), 2, "both sources carry mail: {seen:?}");
}

/// Settings with `example.test`'s mail sent from pool1: 192.0.2.1 (weight 1) and 192.0.2.2 (weight 2).
fn pooled(mut s: Settings) -> Settings {
    s.routing
        .pools
        .insert("example.test".to_owned(), Arc::from("pool1"));
    s.routing.sources.insert(
        Arc::from("pool1"),
        Arc::from([(ip("192.0.2.1"), 1), (ip("192.0.2.2"), 2)]),
    );
    for a in ["192.0.2.1", "192.0.2.2"] {
        s.warmups.insert(ip(a), "[10]@2026-12-01;".to_owned());
    }
    s
}

fn ip(s: &str) -> std::net::IpAddr {
    s.parse().unwrap()
}

#[test]
fn a_suspended_source_sends_that_domain_from_the_others_and_every_other_domain_itself() {
    let (first_ip, second_ip) = (ip("192.0.2.1"), ip("192.0.2.2"));
    let mut s = pooled(settings());
    s.per_destination = 1;
    let mut core = Core::new(s);
    let sources = [(first_ip, 1), (second_ip, 2)];
    let mine: Vec<u64> = (1..400u64)
        .filter(|&id| source_of(&sources, QueueId(id)) == Some(first_ip))
        .take(4)
        .collect();
    let mut started = Vec::new();
    for &id in &mine[..2] {
        started.extend(starts(
            &core.insert(message(id, "a@example.test", &["x@one.test"]), T0),
        ));
    }
    let [job] = &started[..] else {
        panic!("one connection: {started:?}");
    };
    let until = T0 + 5_000;
    let moved = starts(&core.source_suspended(job, first_ip, until, T0));
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert_eq!(&*moved[0].dest, format!("pool1/{second_ip}/one.test"));
    assert_eq!(core.state(job.id, 0).unwrap().attempts, 0, "not an attempt");
    core.connection_closed(&job.dest, T0);
    // Both messages go from the other address; then its connection closes.
    let mut job2 = moved[0].clone();
    let mut sent = vec![job2.id];
    while let Some(next) = {
        let done = attempt(&job2, 250);
        core.record(done.clone(), &verdicts(&done), T0, 0.5);
        core.next_job(&job2.dest, T0)
    } {
        sent.push(next.id);
        job2 = next;
    }
    sent.sort_unstable();
    assert_eq!(sent, vec![QueueId(mine[0]), QueueId(mine[1])]);
    core.connection_closed(&job2.dest, T0);
    // Another domain is not the suspended provider's (as far as the queue knows): the address sends it.
    let other = starts(&core.insert(message(mine[2], "a@example.test", &["y@two.test"]), T0));
    assert_eq!(other.len(), 1, "{other:?}");
    assert_eq!(other[0].source, Some(first_ip));
    // A new message to the suspended domain goes from the other address too.
    let next = starts(&core.insert(message(mine[3], "a@example.test", &["z@one.test"]), T0));
    assert_eq!(next.len(), 1, "{next:?}");
    assert_eq!(next[0].source, Some(second_ip));
    let done = attempt(&next[0], 250);
    core.record(done.clone(), &verdicts(&done), T0, 0.5);
    core.connection_closed(&next[0].dest, T0);
    // The suspension ends: the address sends to the domain again.
    assert_eq!(core.next_due(), Some(until));
    core.due(until);
    let after: u64 = (mine[3] + 1..2000)
        .find(|&id| source_of(&sources, QueueId(id)) == Some(first_ip))
        .unwrap();
    let later = starts(&core.insert(message(after, "a@example.test", &["w@one.test"]), until));
    assert_eq!(later.len(), 1, "{later:?}");
    assert_eq!(later[0].source, Some(first_ip));
}

#[test]
fn a_full_source_sends_its_mail_from_the_others_until_the_day_turns() {
    let (cold, warm) = (ip("192.0.2.1"), ip("192.0.2.2"));
    let mut s = pooled(settings());
    s.per_destination = 1;
    let mut core = Core::new(s);
    // Messages whose pick is the cold address, and one whose pick is the warm one.
    let sources = [(cold, 1), (warm, 2)];
    let ids: Vec<u64> = (1..200u64)
        .filter(|&id| source_of(&sources, QueueId(id)) == Some(cold))
        .take(3)
        .collect();
    let other = (1..200u64)
        .find(|&id| source_of(&sources, QueueId(id)) == Some(warm))
        .unwrap();
    let mut started = Vec::new();
    for &id in &ids {
        started.extend(starts(
            &core.insert(message(id, "a@example.test", &["x@one.test"]), T0),
        ));
    }
    let [first] = &started[..] else {
        panic!("one connection for the cold source: {started:?}");
    };
    assert_eq!(first.source, Some(cold));
    let until = T0 + 1000;
    // The cold address is over its cap: its job and its waiting messages go from the warm one.
    let moved = starts(&core.source_full(first, cold, until, T0));
    assert_eq!(
        moved.len(),
        1,
        "one connection of the warm destination: {moved:?}"
    );
    assert_eq!(moved[0].source, Some(warm));
    assert_eq!(&*moved[0].dest, format!("pool1/{warm}/one.test"));
    let state = core.state(first.id, 0).unwrap();
    assert_eq!(state.attempts, 0, "a full source is not a delivery attempt");
    core.connection_closed(&first.dest, T0);
    let mut sent = vec![moved[0].id];
    let mut job = moved[0].clone();
    while let Some(next) = {
        let done = attempt(&job, 250);
        core.record(done.clone(), &verdicts(&done), T0, 0.5);
        core.next_job(&job.dest, T0)
    } {
        assert_eq!(next.source, Some(warm));
        sent.push(next.id);
        job = next;
    }
    sent.sort_unstable();
    assert_eq!(sent, ids.iter().map(|&i| QueueId(i)).collect::<Vec<_>>());
    core.connection_closed(&job.dest, T0);
    // Mail that picks the warm address is not moved by any of this.
    let w = starts(&core.insert(message(other, "a@example.test", &["y@two.test"]), T0));
    assert_eq!(w[0].source, Some(warm));
    // The day turns: the cold address is the pick of its mail again.
    assert_eq!(core.next_due(), Some(until));
    core.due(until);
    assert!(core.full_sources().is_empty());
    let later = (1000..2000u64)
        .find(|&id| source_of(&sources, QueueId(id)) == Some(cold))
        .unwrap();
    let again = starts(&core.insert(message(later, "a@example.test", &["z@one.test"]), until));
    assert_eq!(again[0].source, Some(cold));
}

#[test]
fn when_every_source_is_full_mail_waits_untried_for_the_next_day_and_expires_at_max_age() {
    let (cold, warm) = (ip("192.0.2.1"), ip("192.0.2.2"));
    let mut core = Core::new(pooled(settings()));
    let jobs = starts(&core.insert(message(1, "a@example.test", &["x@one.test"]), T0));
    let until = T0 + 5000;
    let mut after = core.source_full(&jobs[0], jobs[0].source.unwrap(), until, T0);
    // Its job went to the other address, which is full too.
    let other = starts(&after).pop().expect("moved to the other source");
    assert_ne!(other.source, jobs[0].source);
    core.connection_closed(&jobs[0].dest, T0);
    after = core.source_full(&other, other.source.unwrap(), until, T0);
    assert!(
        starts(&after).is_empty(),
        "nothing goes while every source is full"
    );
    core.connection_closed(&other.dest, T0);
    assert!(starts(&core.insert(message(2, "a@example.test", &["y@one.test"]), T0)).is_empty());
    let mut full = core.full_sources();
    full.sort();
    assert_eq!(full, [(cold, until), (warm, until)]);
    assert!(starts(&core.due(until - 1)).is_empty());
    let next = starts(&core.due(until));
    assert_eq!(
        next.len(),
        2,
        "both messages go when the day turns: {next:?}"
    );
    assert!(
        next.iter()
            .all(|j| core.state(j.id, 0).unwrap().attempts == 0)
    );

    // A wait longer than the message may live: it expires at max_age, untried, with a DSN.
    let mut core = Core::new(pooled(settings()));
    let jobs = starts(&core.insert(message(3, "a@example.test", &["x@one.test"]), T0));
    let late = T0 + 2 * DAY;
    let moved = starts(&core.source_full(&jobs[0], jobs[0].source.unwrap(), late, T0));
    core.connection_closed(&jobs[0].dest, T0);
    assert!(starts(&core.source_full(&moved[0], moved[0].source.unwrap(), late, T0)).is_empty());
    core.connection_closed(&moved[0].dest, T0);
    assert_eq!(core.next_due(), Some(T0 + DAY), "woken at max_age");
    let actions = core.due(T0 + DAY);
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Outcome(o) if o.status == RcptStatus::Expired)),
        "{actions:?}"
    );
    assert!(actions.iter().any(|a| matches!(a, Action::Dsn { .. })));
}

#[test]
fn a_held_destination_opens_nothing_until_its_time_and_the_job_is_no_attempt() {
    let mut core = Core::new(settings());
    let jobs = starts(&core.insert(message(1, "a@example.test", &["x@one.test"]), T0));
    let job = jobs[0].clone();
    // The fleet had no lease: the job goes back, and neither it nor the freed place starts a connection.
    assert!(starts(&core.hold(&job, T0 + 1000, T0)).is_empty());
    assert!(starts(&core.connection_closed(&job.dest, T0)).is_empty());
    assert!(starts(&core.insert(message(2, "a@example.test", &["y@one.test"]), T0)).is_empty());
    // Another destination is not held.
    assert_eq!(
        starts(&core.insert(message(3, "a@example.test", &["z@two.test"]), T0)).len(),
        1
    );
    assert_eq!(core.next_due(), Some(T0 + 1000));
    assert!(starts(&core.due(T0 + 999)).is_empty());
    let again = starts(&core.due(T0 + 1000));
    assert_eq!(
        again.len(),
        2,
        "both of one.test's messages go, up to its cap: {again:?}"
    );
    let state = core.state(job.id, 0).unwrap();
    assert_eq!(state.attempts, 0, "a hold is not a delivery attempt");
}

#[test]
fn a_deferral_waits_the_nominal_delay_times_the_jitter() {
    let mut core = Core::new(settings());
    let job = starts(&core.insert(message(1, "a@example.test", &["x@one.test"]), T0)).remove(0);
    let a = attempt(&job, 451);
    core.record(a.clone(), &verdicts(&a), T0, 0.5);
    let st = core.state(QueueId(1), 0).unwrap();
    assert_eq!((st.status, st.attempts), (RcptStatus::Deferred, 1));
    assert_eq!(st.next_attempt_ms, T0 + 60_000);
    assert_eq!(core.next_due(), Some(T0 + 60_000));
    assert!(starts(&core.due(T0 + 59_999)).is_empty());
    // The connection that carried it still holds one slot; the second slot takes the retry.
    let again = starts(&core.due(T0 + 60_000));
    assert_eq!(
        again.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![QueueId(1)]
    );
}

#[test]
fn a_hard_invalid_recipient_bounce_is_an_outcome_with_its_verdict_and_reports_to_the_sender() {
    // The outcome carries the verdict; whether it suppresses is the suppression policy's to decide.
    let mut core = Core::new(settings());
    let job = starts(&core.insert(message(1, "a@example.test", &["x@one.test"]), T0)).remove(0);
    let a = attempt(&job, 550);
    let actions = core.record(a.clone(), &verdicts(&a), T0 + 5, 0.0);
    assert!(actions.iter().any(|a| matches!(a, Action::Outcome(o)
        if o.recipient() == "x@one.test"
            && o.status == RcptStatus::Bounced
            && o.verdict == Some((Class::Hard, Category::InvalidRecipient)))));
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Dsn { notices, .. } if notices.len() == 1))
    );
    assert!(core.is_empty());
}

#[test]
fn null_and_return_path_senders_get_no_dsn() {
    for sender in ["", "b+token@bounces.test"] {
        let mut core = Core::new(settings());
        let job = starts(&core.insert(message(1, sender, &["x@one.test"]), T0)).remove(0);
        let a = attempt(&job, 550);
        let actions = core.record(a.clone(), &verdicts(&a), T0, 0.0);
        assert!(
            !actions.iter().any(|a| matches!(a, Action::Dsn { .. })),
            "{sender:?}"
        );
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::NoDsn { failed: 1, .. })),
            "{sender:?}"
        );
    }
}

/// A message to one recipient whose sender gave `NOTIFY=notify`.
fn message_notifying(notify: &str) -> NewEntry {
    use herald_smtp::dsn::{Notify, RcptDsn};
    let mut m = message(1, "a@example.test", &["x@one.test"]);
    m.meta = m.meta.with_dsn(
        Default::default(),
        vec![RcptDsn {
            notify: Some(Notify::parse(notify).unwrap()),
            orcpt: None,
        }],
    );
    m
}

fn notices(actions: &[Action]) -> Vec<(String, dsn::Action)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Dsn { notices, .. } => Some(notices),
            _ => None,
        })
        .flatten()
        .map(|n| (n.recipient.clone(), n.action))
        .collect()
}

#[test]
fn notify_without_failure_gets_no_failure_dsn() {
    for notify in ["NEVER", "SUCCESS", "DELAY", "SUCCESS,DELAY"] {
        for code in [550, 451] {
            let mut core = Core::new(settings());
            let job = starts(&core.insert(message_notifying(notify), T0)).remove(0);
            let a = attempt(&job, code);
            // 451 a day on: expired.
            let actions = core.record(a.clone(), &verdicts(&a), T0 + DAY, 0.0);
            assert_eq!(notices(&actions), [], "{notify} {code}");
            assert!(
                actions
                    .iter()
                    .any(|a| matches!(a, Action::NoDsn { failed: 1, .. })),
                "{notify} {code}"
            );
            // The final state is recorded at once: no DSN will.
            assert!(actions.iter().any(|a| matches!(a, Action::Record { .. })));
            assert!(core.is_empty());
        }
    }
    let mut core = Core::new(settings());
    let job = starts(&core.insert(message_notifying("FAILURE,DELAY"), T0)).remove(0);
    let a = attempt(&job, 550);
    let actions = core.record(a.clone(), &verdicts(&a), T0, 0.0);
    assert_eq!(
        notices(&actions),
        [("x@one.test".to_owned(), dsn::Action::Failed)]
    );
}

#[test]
fn notify_success_is_answered_by_a_relayed_dsn_unless_the_next_hop_took_the_request() {
    for (notify, next_hop_dsn, expected) in [
        ("SUCCESS", false, true),
        ("SUCCESS,FAILURE", false, true),
        ("SUCCESS", true, false),
        ("FAILURE", false, false),
        ("NEVER", false, false),
    ] {
        let mut core = Core::new(settings());
        let job = starts(&core.insert(message_notifying(notify), T0)).remove(0);
        let a = Attempt {
            next_hop_dsn,
            ..attempt(&job, 250)
        };
        let actions = core.record(a.clone(), &verdicts(&a), T0, 0.0);
        let want: Vec<(String, dsn::Action)> = if expected {
            vec![("x@one.test".to_owned(), dsn::Action::Relayed)]
        } else {
            vec![]
        };
        assert_eq!(notices(&actions), want, "{notify} {next_hop_dsn}");
        // The delivery is recorded at once, not after the DSN: a crash may lose the notice, never
        // deliver twice.
        assert!(actions.iter().any(|a| matches!(a, Action::Record { .. })));
    }
    // Nor does the null sender hear of a success.
    let mut core = Core::new(settings());
    let mut m = message_notifying("SUCCESS");
    m.meta.sender = "".into();
    let job = starts(&core.insert(m, T0)).remove(0);
    let a = attempt(&job, 250);
    assert_eq!(notices(&core.record(a.clone(), &verdicts(&a), T0, 0.0)), []);
}

#[test]
fn a_delay_notice_goes_once_past_delay_warning_and_only_when_asked_for() {
    const HOUR: u64 = 3_600_000;
    for (notify, expected) in [
        (Some("DELAY"), 1),
        (Some("FAILURE,DELAY"), 1),
        (Some("FAILURE"), 0),
        (Some("NEVER"), 0),
        (None, 0),
    ] {
        let mut core = Core::new(settings());
        let m = match notify {
            Some(n) => message_notifying(n),
            None => message(1, "a@example.test", &["x@one.test"]),
        };
        let mut job = starts(&core.insert(m, T0)).remove(0);
        let mut delayed = Vec::new();
        // Attempts at 0 h (before delay_warning, 4 h), 5 h (the first past it), 6 h and 7 h.
        for t in [T0, T0 + 5 * HOUR, T0 + 6 * HOUR, T0 + 7 * HOUR] {
            let a = attempt(&job, 451);
            let actions = core.record(a.clone(), &verdicts(&a), t, 0.0);
            delayed.extend(
                notices(&actions)
                    .into_iter()
                    .filter(|(_, a)| matches!(a, dsn::Action::Delayed { .. }))
                    .map(|_| t),
            );
            let mut next = core.connection_closed(&job.dest, t + HOUR - 1);
            next.extend(core.due(t + HOUR - 1));
            job = match starts(&next).pop() {
                Some(j) => j,
                None => core.next_job(&job.dest, t + HOUR).expect("due again"),
            };
        }
        let want: Vec<u64> = if expected == 1 {
            vec![T0 + 5 * HOUR]
        } else {
            vec![]
        };
        assert_eq!(delayed, want, "{notify:?}");
    }
    // A message loaded (after a restart) past the point counts as told: the spool does not say whether it
    // was, and a second notice is the worse mistake.
    let mut core = Core::new(settings());
    let job = starts(&core.insert(message_notifying("DELAY"), T0 + 5 * HOUR)).remove(0);
    let a = attempt(&job, 451);
    let actions = core.record(a.clone(), &verdicts(&a), T0 + 5 * HOUR, 0.0);
    assert_eq!(notices(&actions), []);
}

#[test]
fn a_temporary_failure_past_expiry_expires_with_status_4_4_7() {
    let mut core = Core::new(settings());
    let job = starts(&core.insert(message(1, "a@example.test", &["x@one.test"]), T0)).remove(0);
    let a = attempt(&job, 451);
    let actions = core.record(a.clone(), &verdicts(&a), T0 + DAY, 0.0);
    let failures = actions.iter().find_map(|a| match a {
        Action::Dsn { notices, .. } => Some(notices),
        _ => None,
    });
    assert_eq!(failures.map(|f| f[0].status.as_str()), Some("4.4.7"));
}

#[test]
fn a_reload_to_a_smarthost_routes_waiting_mail_there() {
    let mut s = settings();
    s.per_destination = 1;
    let mut core = Core::new(s.clone());
    let first = starts(&core.insert(message(1, "a@example.test", &["x@one.test"]), T0));
    assert_eq!(first.len(), 1);
    // Waiting behind the first: the one.test slot is taken.
    assert!(starts(&core.insert(message(2, "a@example.test", &["y@one.test"]), T0)).is_empty());
    s.routing.smarthost = true;
    let moved = starts(&core.reconfigure(s, T0));
    assert_eq!(moved.len(), 1);
    assert_eq!((&*moved[0].dest, moved[0].id), ("[smarthost]", QueueId(2)));
}

#[test]
fn a_larger_connection_cap_from_a_reload_is_used_at_once() {
    let mut s = settings();
    s.per_destination = 1;
    let mut core = Core::new(s.clone());
    for id in 1..=3 {
        core.insert(message(id, "a@example.test", &["x@one.test"]), T0);
    }
    s.per_destination = 3;
    assert_eq!(starts(&core.reconfigure(s, T0)).len(), 2);
}

#[test]
fn stopping_hands_out_nothing_and_waits_for_open_connections() {
    let mut s = settings();
    s.per_destination = 1;
    let mut core = Core::new(s);
    let job = starts(&core.insert(message(1, "a@example.test", &["x@one.test"]), T0)).remove(0);
    core.insert(message(2, "a@example.test", &["y@one.test"]), T0);
    core.stop();
    assert!(!core.idle());
    assert!(core.next_job(&job.dest, T0).is_none());
    let a = attempt(&job, 250);
    core.record(a.clone(), &verdicts(&a), T0, 0.0);
    assert!(starts(&core.connection_closed(&job.dest, T0)).is_empty());
    assert!(core.idle());
}

fn domains(jobs: &[Job]) -> Vec<&str> {
    jobs.iter().map(|j| &*j.domain).collect()
}

/// Records a delivered attempt of `job` and closes its connection, as a connection without more work does.
fn deliver_and_close(core: &mut Core, job: &Job) -> Vec<Job> {
    let a = attempt(job, 250);
    let mut out = starts(&core.record(a.clone(), &verdicts(&a), T0, 0.0));
    out.extend(starts(&core.connection_closed(&job.dest, T0)));
    out
}

#[test]
fn at_the_total_cap_destinations_wait_and_closed_connections_serve_them_in_order() {
    let mut s = settings();
    s.total_connections = 2;
    let mut core = Core::new(s);
    let first = starts(&core.insert(
        message(
            1,
            "a@example.test",
            &["x@a.test", "x@b.test", "x@c.test", "x@d.test"],
        ),
        T0,
    ));
    assert_eq!(domains(&first), ["a.test", "b.test"]);
    assert_eq!(core.connections(), 2);
    core.audit(&first, &[], T0).unwrap();
    // Each place that comes free goes to the next destination in line.
    let next = deliver_and_close(&mut core, &first[0]);
    assert_eq!(domains(&next), ["c.test"]);
    let last = deliver_and_close(&mut core, &first[1]);
    assert_eq!(domains(&last), ["d.test"]);
    assert_eq!(core.connections(), 2);
    core.audit(&[next[0].clone(), last[0].clone()], &[], T0)
        .unwrap();
}

#[test]
fn a_destination_with_more_work_waits_behind_those_already_waiting() {
    let mut s = settings();
    s.total_connections = 1;
    let mut core = Core::new(s);
    let a1 = starts(&core.insert(message(1, "s@example.test", &["x@a.test"]), T0)).remove(0);
    assert!(starts(&core.insert(message(2, "s@example.test", &["x@b.test"]), T0)).is_empty());
    // a.test has room of its own (2 per destination) but the total is at its cap: it waits, behind b.test.
    assert!(starts(&core.insert(message(3, "s@example.test", &["y@a.test"]), T0)).is_empty());
    core.audit(std::slice::from_ref(&a1), &[], T0).unwrap();
    let b = deliver_and_close(&mut core, &a1);
    assert_eq!((domains(&b), b[0].id), (vec!["b.test"], QueueId(2)));
    let a2 = deliver_and_close(&mut core, &b[0]);
    assert_eq!((domains(&a2), a2[0].id), (vec!["a.test"], QueueId(3)));
    assert!(deliver_and_close(&mut core, &a2[0]).is_empty());
    assert!(core.idle() && core.is_empty());
    core.audit(&[], &[], T0).unwrap();
}

#[test]
fn a_reload_changes_the_total_cap() {
    let mut s = settings();
    s.total_connections = 1;
    let mut core = Core::new(s.clone());
    let mut open = starts(&core.insert(
        message(1, "s@example.test", &["x@a.test", "x@b.test", "x@c.test"]),
        T0,
    ));
    assert_eq!(open.len(), 1);
    s.total_connections = 3;
    open.extend(starts(&core.reconfigure(s.clone(), T0)));
    assert_eq!(domains(&open), ["a.test", "b.test", "c.test"]);
    core.audit(&open, &[], T0).unwrap();
    // Lowered under what is open: nothing new starts until the total is under the new cap.
    s.total_connections = 1;
    assert!(starts(&core.reconfigure(s, T0)).is_empty());
    core.insert(message(2, "s@example.test", &["y@d.test"]), T0);
    assert!(deliver_and_close(&mut core, &open[0]).is_empty());
    assert!(deliver_and_close(&mut core, &open[1]).is_empty());
    let d = deliver_and_close(&mut core, &open[2]);
    assert_eq!(domains(&d), ["d.test"]);
    core.audit(&d, &[], T0).unwrap();
}

// ---------------------------------------------------------------------------------------------------------
// Properties

#[derive(Debug, Clone)]
enum Step {
    /// The open connection `pick` (modulo their number) reports replies drawn from `codes`, and asks for
    /// more work when `more`; without more it is closing until a `Close` step.
    Answer {
        pick: usize,
        codes: Vec<u16>,
        more: bool,
        jitter: f64,
    },
    /// Time passes.
    Wait(u64),
    /// An operator flushes the queue.
    Flush,
    /// A reload: other connection caps (per destination, in total), perhaps a smarthost, perhaps two.test
    /// turned into a return-path domain (its waiting mail then has nowhere to go).
    Reload {
        cap: usize,
        total: usize,
        smarthost: bool,
        two_is_local: bool,
    },
    /// A connection gives its job back unattempted (the relay is stopping, or the connection failed early),
    /// and is closing.
    GiveBack { pick: usize },
    /// The closing connection `pick` is closed (its QUIT is done): its place is free.
    Close { pick: usize },
    /// An operator deletes a message, perhaps while it is being delivered.
    Delete { pick: u64 },
    /// The source of open connection `pick` is over its daily cap for `ms`: the job goes back untried.
    Full { pick: usize, ms: u64 },
    /// The source of open connection `pick` is suspended for its domain's provider for `ms`: the job goes
    /// back untried.
    Suspended { pick: usize, ms: u64 },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (any::<usize>(), prop::collection::vec(prop::sample::select(vec![250u16, 251, 421, 451, 452, 550, 552, 554]), 1..4), any::<bool>(), 0.0..1.0f64)
            .prop_map(|(pick, codes, more, jitter)| Step::Answer { pick, codes, more, jitter }),
        3 => (1u64..(6 * 3_600_000)).prop_map(Step::Wait),
        1 => Just(Step::Flush),
        1 => (1usize..4, 1usize..6, any::<bool>(), prop::bool::weighted(0.2))
            .prop_map(|(cap, total, smarthost, two_is_local)| Step::Reload { cap, total, smarthost, two_is_local }),
        1 => any::<usize>().prop_map(|pick| Step::GiveBack { pick }),
        4 => any::<usize>().prop_map(|pick| Step::Close { pick }),
        1 => (1u64..10).prop_map(|pick| Step::Delete { pick }),
        2 => (any::<usize>(), 1u64..(30 * 3_600_000)).prop_map(|(pick, ms)| Step::Full { pick, ms }),
        2 => (any::<usize>(), 1u64..(3 * 3_600_000)).prop_map(|(pick, ms)| Step::Suspended { pick, ms }),
    ]
}

fn messages() -> impl Strategy<Value = Vec<(String, Vec<String>)>> {
    let sender = prop::sample::select(vec![
        "",
        "app@example.test",
        "b+tok@bounces.test",
        "other@example.org",
    ]);
    let rcpt = (
        0usize..6,
        prop::sample::select(vec![
            "one.test",
            "two.test",
            "three.test",
            "four.test",
            "five.test",
        ]),
    )
        .prop_map(|(n, d)| format!("r{n}@{d}"));
    prop::collection::vec(
        (
            sender.prop_map(str::to_owned),
            prop::collection::hash_set(rcpt, 1..5).prop_map(|s| s.into_iter().collect()),
        ),
        1..8,
    )
}

/// Drives a core the way the shell does, checking the contract at every step.
struct Sim {
    core: Core,
    settings: Settings,
    now: u64,
    open: Vec<Job>,
    /// Connections done with their work and not yet closed: they still hold their place.
    closing: Vec<DestKey>,
    /// What `open` and `closing` may add up to: the total cap, or more while a reload lowered it under what
    /// was open, until enough of those closed.
    ceiling: usize,
    senders: HashMap<QueueId, String>,
    recipients: HashMap<QueueId, Vec<String>>,
    finals: HashMap<(QueueId, u32), RcptStatus>,
    /// Failed recipients reported to their sender in a DSN.
    reported: HashMap<(QueueId, String), usize>,
    /// Failed recipients whose sender gets no DSN, per message.
    unreported: HashMap<QueueId, usize>,
    deleted: HashSet<QueueId>,
}

impl Sim {
    fn new(msgs: &[(String, Vec<String>)], total: usize) -> Sim {
        let mut s = pooled(settings());
        s.total_connections = total;
        let mut sim = Sim {
            core: Core::new(s.clone()),
            settings: s,
            now: T0,
            open: Vec::new(),
            closing: Vec::new(),
            ceiling: total,
            senders: HashMap::new(),
            recipients: HashMap::new(),
            finals: HashMap::new(),
            reported: HashMap::new(),
            unreported: HashMap::new(),
            deleted: HashSet::new(),
        };
        for (i, (sender, rcpts)) in msgs.iter().enumerate() {
            let id = i as u64 + 1;
            let refs: Vec<&str> = rcpts.iter().map(String::as_str).collect();
            let actions = sim.core.insert(message(id, sender, &refs), T0);
            sim.senders.insert(QueueId(id), sender.clone());
            sim.recipients.insert(QueueId(id), rcpts.clone());
            sim.take(actions);
        }
        sim
    }

    fn take(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Start(job) => {
                    let total = self.settings.total_connections;
                    assert!(
                        self.open.len() + self.closing.len() < total,
                        "a connection started with {} open and {} closing, total cap {total}",
                        self.open.len(),
                        self.closing.len()
                    );
                    self.open.push(job);
                }
                Action::Outcome(o) => self.outcome(&o),
                Action::Dsn { meta, notices, .. } => {
                    let sender = &self.senders[&meta.id];
                    assert!(
                        !sender.is_empty() && !sender.ends_with("@bounces.test"),
                        "DSN to {sender:?}"
                    );
                    for f in notices {
                        *self.reported.entry((meta.id, f.recipient)).or_default() += 1;
                    }
                }
                Action::NoDsn { id, failed, .. } => {
                    let sender = &self.senders[&id];
                    assert!(
                        sender.is_empty() || sender.ends_with("@bounces.test"),
                        "no DSN to {sender:?}"
                    );
                    *self.unreported.entry(id).or_default() += failed;
                }
                Action::Record { .. } => {}
            }
        }
    }

    fn outcome(&mut self, o: &Outcome) {
        let (id, index) = (o.id(), o.index);
        assert_eq!(self.recipients[&id][index as usize], o.recipient());
        if o.status.is_final() {
            let before = self.finals.insert((id, index), o.status);
            assert!(
                before.is_none(),
                "{} of {id} had {before:?}, now {:?}",
                o.recipient(),
                o.status
            );
        }
        if o.status == RcptStatus::Deferred {
            let st = self.core.state(id, index as usize).unwrap();
            let nominal = self.settings.nominal_delay(st.attempts).as_millis() as f64;
            let expires = T0 + DAY;
            let lo = ((self.now as f64 + nominal * (1.0 - JITTER)) as u64).min(expires);
            let hi = ((self.now as f64 + nominal * (1.0 + JITTER)).ceil() as u64).min(expires);
            assert!(
                (lo.saturating_sub(1)..=hi + 1).contains(&st.next_attempt_ms),
                "attempt {} deferred to +{} ms, band +{}..+{} ms",
                st.attempts,
                st.next_attempt_ms - self.now,
                lo - self.now,
                hi - self.now
            );
        }
    }

    fn answer(&mut self, pick: usize, codes: &[u16], more: bool, jitter: f64) {
        if self.open.is_empty() {
            return;
        }
        let job = self.open.swap_remove(pick % self.open.len());
        let a = Attempt {
            id: job.id,
            results: job
                .rcpts
                .iter()
                .enumerate()
                .map(|(k, &i)| (i, reply(codes[k % codes.len()])))
                .collect(),
            remote_mta: None,
            domain: job.domain.clone(),
            tls: None,
            next_hop_dsn: false,
            verdicts: Vec::new(),
        };
        let v = verdicts(&a);
        let actions = self.core.record(a, &v, self.now, jitter);
        self.take(actions);
        if more && let Some(next) = self.core.next_job(&job.dest, self.now) {
            self.open.push(next);
            return;
        }
        self.closing.push(job.dest);
    }

    fn close(&mut self, pick: usize) {
        if self.closing.is_empty() {
            return;
        }
        let dest = self.closing.swap_remove(pick % self.closing.len());
        let actions = self.core.connection_closed(&dest, self.now);
        self.take(actions);
    }

    /// Every recipient has one final outcome, or is still queued with a non-final state.
    fn reload(&mut self, cap: usize, total: usize, smarthost: bool, two_is_local: bool) {
        let mut s = pooled(settings());
        s.per_destination = cap;
        s.total_connections = total;
        if two_is_local {
            // And the warm-up lifted: full marks go.
            s.warmups.clear();
        }
        self.ceiling = total.max(self.open.len() + self.closing.len());
        self.settings = s.clone();
        s.routing.smarthost = smarthost;
        if two_is_local {
            s.routing.local.insert("two.test".to_owned());
        }
        let actions = self.core.reconfigure(s, self.now);
        self.take(actions);
    }

    fn give_back(&mut self, pick: usize) {
        if self.open.is_empty() {
            return;
        }
        let job = self.open.swap_remove(pick % self.open.len());
        let actions = self.core.give_back(&job, self.now);
        self.take(actions);
        self.closing.push(job.dest);
    }

    fn full(&mut self, pick: usize, ms: u64) {
        if self.open.is_empty() {
            return;
        }
        let job = self.open.swap_remove(pick % self.open.len());
        if let Some(source) = job.source {
            let actions = self.core.source_full(&job, source, self.now + ms, self.now);
            self.take(actions);
        } else {
            let actions = self.core.give_back(&job, self.now);
            self.take(actions);
        }
        self.closing.push(job.dest);
    }

    fn suspended(&mut self, pick: usize, ms: u64) {
        if self.open.is_empty() {
            return;
        }
        let job = self.open.swap_remove(pick % self.open.len());
        if let Some(source) = job.source {
            let actions = self
                .core
                .source_suspended(&job, source, self.now + ms, self.now);
            self.take(actions);
        } else {
            let actions = self.core.give_back(&job, self.now);
            self.take(actions);
        }
        self.closing.push(job.dest);
    }

    fn delete(&mut self, id: QueueId) {
        if self.core.remove(id) {
            self.deleted.insert(id);
        }
    }

    /// Every recipient has one final outcome, or is still queued with a non-final state; and the core's
    /// bookkeeping agrees with the connections that are open.
    fn check_accounted(&mut self) {
        if let Err(e) = self.core.audit(&self.open, &self.closing, self.now) {
            panic!("{e}");
        }
        let held = self.open.len() + self.closing.len();
        assert!(
            held <= self.ceiling,
            "{held} connections, at most {} allowed",
            self.ceiling
        );
        self.ceiling = self.settings.total_connections.max(held);
        for (id, rcpts) in &self.recipients {
            if self.deleted.contains(id) {
                continue;
            }
            for i in 0..rcpts.len() {
                match (self.finals.get(&(*id, i as u32)), self.core.state(*id, i)) {
                    (Some(_), Some(st)) => {
                        assert!(st.status.is_final(), "{id} #{i} final but queued as {st:?}")
                    }
                    (None, Some(st)) => {
                        assert!(!st.status.is_final(), "{id} #{i} final without an outcome")
                    }
                    (Some(_), None) => {}
                    (None, None) => panic!("{id} #{i} left the queue without a final outcome"),
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn every_recipient_ends_once_and_every_failure_reaches_its_sender(
        msgs in messages(),
        total in 1usize..6,
        steps in prop::collection::vec(step(), 0..60),
    ) {
        let mut sim = Sim::new(&msgs, total);
        for s in &steps {
            match s {
                Step::Answer { pick, codes, more, jitter } => sim.answer(*pick, codes, *more, *jitter),
                Step::Wait(ms) => {
                    sim.now += ms;
                    let actions = sim.core.due(sim.now);
                    sim.take(actions);
                }
                Step::Flush => {
                    let (_, actions) = sim.core.flush(None, sim.now);
                    sim.take(actions);
                }
                Step::Reload { cap, total, smarthost, two_is_local } => sim.reload(*cap, *total, *smarthost, *two_is_local),
                Step::GiveBack { pick } => sim.give_back(*pick),
                Step::Close { pick } => sim.close(*pick),
                Step::Delete { pick } => sim.delete(QueueId(*pick)),
                Step::Full { pick, ms } => sim.full(*pick, *ms),
                Step::Suspended { pick, ms } => sim.suspended(*pick, *ms),
            }
            sim.check_accounted();
        }
        // Past the expiry every connection fails temporarily: whatever is left must expire, with a DSN.
        sim.now = sim.now.max(T0 + DAY) + 1;
        let actions = sim.core.due(sim.now);
        sim.take(actions);
        for _ in 0..1000 {
            if !sim.open.is_empty() {
                sim.answer(0, &[451], true, 0.5);
            } else if !sim.closing.is_empty() {
                sim.close(0);
            } else {
                break;
            }
            sim.check_accounted();
        }
        sim.check_accounted();
        prop_assert!(sim.core.is_empty(), "still queued after expiry: {:?}", sim.core.list(None, 10).1);
        prop_assert!(sim.core.idle());
        let total: usize = sim
            .recipients
            .iter()
            .filter(|(id, _)| !sim.deleted.contains(id))
            .map(|(_, r)| r.len())
            .sum();
        let finals = sim.finals.keys().filter(|(id, _)| !sim.deleted.contains(id)).count();
        prop_assert_eq!(finals, total);
        // Each failure of an ordinary sender is in exactly one DSN; the others are counted as unreported.
        let mut failed_ordinary = 0;
        let mut failed_silent = 0;
        for ((id, i), status) in &sim.finals {
            if *status == RcptStatus::Delivered || sim.deleted.contains(id) {
                continue;
            }
            let sender = &sim.senders[id];
            if sender.is_empty() || sender.ends_with("@bounces.test") {
                failed_silent += 1;
            } else {
                failed_ordinary += 1;
                let rcpt = sim.recipients[id][*i as usize].clone();
                prop_assert_eq!(sim.reported.get(&(*id, rcpt)).copied(), Some(1));
            }
        }
        let reported = sim.reported.keys().filter(|(id, _)| !sim.deleted.contains(id)).count();
        prop_assert_eq!(reported, failed_ordinary);
        let unreported: usize = sim
            .unreported
            .iter()
            .filter(|(id, _)| !sim.deleted.contains(id))
            .map(|(_, n)| n)
            .sum();
        prop_assert_eq!(unreported, failed_silent);
    }

    #[test]
    fn the_nominal_delay_follows_the_schedule_and_its_cap(first in 1u64..3600, factor in 1.0f64..4.0, attempts in 1u16..40) {
        let mut s = settings();
        s.retry = Retry { first: Duration::from_secs(first), max: Duration::from_secs(4 * 3600), factor };
        let want = (first as f64 * factor.powi(i32::from(attempts) - 1)).min(4.0 * 3600.0);
        let got = s.nominal_delay(attempts).as_secs_f64();
        prop_assert!((got - want).abs() < 1e-6 * want.max(1.0), "{got} vs {want}");
    }
}

#[test]
fn a_recipient_reported_twice_keeps_its_first_final_outcome() {
    let mut core = Core::new(settings());
    let job = starts(&core.insert(
        message(1, "a@example.test", &["x@one.test", "y@one.test"]),
        T0,
    ))
    .remove(0);
    let a = Attempt {
        id: job.id,
        results: vec![(0, reply(250)), (1, reply(451))],
        remote_mta: None,
        domain: job.domain.clone(),
        tls: None,
        next_hop_dsn: false,
        verdicts: Vec::new(),
    };
    core.record(a.clone(), &verdicts(&a), T0, 0.0);
    // A confused connection reports recipient 0 again, as bounced.
    let again = Attempt {
        results: vec![(0, reply(550))],
        ..a
    };
    let actions = core.record(again.clone(), &verdicts(&again), T0, 0.0);
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::Outcome(_) | Action::Dsn { .. }))
    );
    assert_eq!(
        core.state(QueueId(1), 0).unwrap().status,
        RcptStatus::Delivered
    );
}

#[test]
fn states_loaded_from_the_spool_keep_their_schedule() {
    let mut core = Core::new(settings());
    let mut m = message(1, "a@example.test", &["x@one.test", "y@two.test"]);
    m.states = vec![
        RcptState {
            status: RcptStatus::Delivered,
            attempts: 1,
            next_attempt_ms: 0,
        },
        RcptState {
            status: RcptStatus::Deferred,
            attempts: 2,
            next_attempt_ms: T0 + 1000,
        },
    ]
    .into();
    assert!(starts(&core.insert(m, T0)).is_empty());
    assert_eq!(core.next_due(), Some(T0 + 1000));
    let jobs = starts(&core.due(T0 + 1000));
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        (&*jobs[0].domain, jobs[0].rcpts.clone()),
        ("two.test", vec![1])
    );
    let _ = Arc::clone(&jobs[0].meta);
}
