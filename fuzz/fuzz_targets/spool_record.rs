//! The spool's record format (`herald_relay::spool::record`), which replay reads back from disk after a
//! crash or a damaged sector: any bytes may be there.
//!
//! Checked, on arbitrary bytes: decoding a frame and its payload never panics or over-allocates, and a
//! payload that decodes encodes back to a frame that decodes to the same record. On a record the fuzzer
//! builds: decode(encode(x)) == x, for message (with and without DSN parameters), results and delete records. Replaying the bytes as a
//! segment (skipping damaged records, stopping at a torn tail) never panics, places every message's data
//! inside the records it keeps, and gives the same messages again once the torn tail is cut off (as the
//! next start after a crash sees the segment).

#![no_main]

use herald_relay::spool::record::{self, MessageMeta, QueueId, RcptState, RcptStatus, RcptUpdate};
use herald_relay::spool::{self, Loaded};
use herald_smtp::dsn::{MailDsn, Notify, Orcpt, RcptDsn, Ret};
use libfuzzer_sys::arbitrary::{Arbitrary, Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    decode_arbitrary(data);
    replay(data);
    let _ = round_trip(&mut Unstructured::new(data));
});

fn decode_arbitrary(data: &[u8]) {
    let Ok(frame) = record::decode_frame(data) else {
        return;
    };
    assert!(frame.len <= data.len() && frame.len == record::FRAME_LEN + frame.payload.len());
    match frame.kind {
        record::KIND_MESSAGE | record::KIND_MESSAGE_DSN => {
            let Ok(d) = record::decode_message(frame.kind, frame.payload) else {
                return;
            };
            let end = d.data_offset + usize::try_from(d.data_len).expect("data within the payload");
            assert_eq!(end, frame.payload.len());
            let mut out = Vec::new();
            let offset = record::encode_message(
                &mut out,
                &d.meta,
                &d.states,
                &[&frame.payload[d.data_offset..end]],
            );
            let again = record::decode_frame(&out).expect("an encoded frame decodes");
            let d2 = record::decode_message(again.kind, again.payload)
                .expect("an encoded message decodes");
            assert_eq!(
                (&d2.meta, &d2.states, d2.data_len),
                (&d.meta, &d.states, d.data_len)
            );
            assert_eq!(offset, record::FRAME_LEN + d2.data_offset);
        }
        record::KIND_RESULTS => {
            let Ok((id, updates)) = record::decode_results(frame.payload) else {
                return;
            };
            let mut out = Vec::new();
            record::encode_results(&mut out, id, &updates);
            let again = record::decode_frame(&out).expect("an encoded frame decodes");
            assert_eq!(record::decode_results(again.payload), Ok((id, updates)));
        }
        record::KIND_DELETE => {
            let _ = record::decode_delete(frame.payload);
        }
        _ => {}
    }
}

fn replay(data: &[u8]) {
    let (loaded, _, end) = spool::replay_bytes(data);
    assert!(end <= data.len());
    for l in &loaded {
        assert_eq!(l.states.len(), l.meta.recipients.len());
        assert!(
            l.location.offset + l.location.len <= end as u64,
            "message data outside the segment: {l:?}"
        );
    }
    let (again, _, end_again) = spool::replay_bytes(&data[..end]);
    assert_eq!(end_again, end, "cutting the torn tail off left another");
    let key = |l: &Loaded| (l.meta.clone(), l.states.clone(), l.location);
    assert_eq!(
        again.iter().map(key).collect::<Vec<_>>(),
        loaded.iter().map(key).collect::<Vec<_>>(),
        "the next start finds other messages"
    );
}

fn round_trip(u: &mut Unstructured<'_>) -> Result<()> {
    let n: usize = u.int_in_range(0..=8)?;
    let id = QueueId(u.arbitrary()?);
    let received_at_ms = u.arbitrary()?;
    let (smtputf8, eight_bit) = (u.arbitrary()?, u.arbitrary()?);
    let listener: Arc<str> = u.arbitrary()?;
    // The record stores "" for no user: an empty name cannot be told from none.
    let auth_user = Option::<String>::arbitrary(u)?.filter(|s| !s.is_empty());
    let peer: String = u.arbitrary()?;
    let sender: Arc<str> = u.arbitrary()?;
    let recipients: Vec<String> = (0..n).map(|_| u.arbitrary()).collect::<Result<_>>()?;
    // The record stores "" for none, as for the user.
    let dsn = MailDsn {
        ret: *u.choose(&[None, Some(Ret::Full), Some(Ret::Headers)])?,
        envid: Option::<String>::arbitrary(u)?.filter(|s| !s.is_empty()),
    };
    let rcpt_dsn: Vec<RcptDsn> = (0..n).map(|_| rcpt_dsn(u)).collect::<Result<_>>()?;
    let with_dsn = !dsn.is_empty() || rcpt_dsn.iter().any(|d| !d.is_empty());
    let mut meta = MessageMeta::new(
        id,
        received_at_ms,
        listener,
        &peer,
        sender,
        recipients.iter().collect(),
    )
    .with_auth_user(auth_user)
    .with_dsn(dsn, rcpt_dsn);
    meta.smtputf8 = smtputf8;
    meta.eight_bit = eight_bit;
    assert_eq!(meta.peer(), peer);
    let states: Vec<RcptState> = (0..n).map(|_| state(u)).collect::<Result<_>>()?;
    let data: &[u8] = u.arbitrary()?;
    let mut out = Vec::new();
    let (head, tail) = data.split_at(data.len() / 2);
    record::encode_message(&mut out, &meta, &states, &[head, tail]);
    let id = QueueId(u.arbitrary()?);
    let updates: Vec<RcptUpdate> = (0..u.int_in_range(0..=8)?)
        .map(|_| {
            Ok(RcptUpdate {
                index: u.arbitrary()?,
                state: state(u)?,
            })
        })
        .collect::<Result<_>>()?;
    record::encode_results(&mut out, id, &updates);
    record::encode_delete(&mut out, id);

    let frame = record::decode_frame(&out).expect("message frame");
    let kind = if with_dsn {
        record::KIND_MESSAGE_DSN
    } else {
        record::KIND_MESSAGE
    };
    assert_eq!(frame.kind, kind);
    let d = record::decode_message(frame.kind, frame.payload).expect("message payload");
    assert_eq!((&d.meta, &d.states), (&meta, &states));
    let (off, len) = (d.data_offset, usize::try_from(d.data_len).expect("small"));
    assert_eq!(&frame.payload[off..off + len], data);
    let rest = &out[frame.len..];
    let frame = record::decode_frame(rest).expect("results frame");
    assert_eq!(frame.kind, record::KIND_RESULTS);
    assert_eq!(record::decode_results(frame.payload), Ok((id, updates)));
    let rest = &rest[frame.len..];
    let frame = record::decode_frame(rest).expect("delete frame");
    assert_eq!((frame.kind, frame.len), (record::KIND_DELETE, rest.len()));
    assert_eq!(record::decode_delete(frame.payload), Ok(id));
    Ok(())
}

fn rcpt_dsn(u: &mut Unstructured<'_>) -> Result<RcptDsn> {
    let notify = if u.arbitrary()? {
        Some(Notify {
            success: u.arbitrary()?,
            failure: u.arbitrary()?,
            delay: u.arbitrary()?,
        })
    } else {
        None
    };
    let orcpt = Option::<(String, String)>::arbitrary(u)?
        .filter(|(_, address)| !address.is_empty())
        .map(|(addr_type, address)| Orcpt { addr_type, address });
    Ok(RcptDsn { notify, orcpt })
}

fn state(u: &mut Unstructured<'_>) -> Result<RcptState> {
    let status = *u.choose(&[
        RcptStatus::Queued,
        RcptStatus::Deferred,
        RcptStatus::Delivered,
        RcptStatus::Bounced,
        RcptStatus::Expired,
    ])?;
    Ok(RcptState {
        status,
        attempts: u.arbitrary()?,
        next_attempt_ms: u.arbitrary()?,
    })
}
