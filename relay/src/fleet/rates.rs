//! Message rates: `delivery.per_domain.max_message_rate` for one relay, or for the whole fleet through the
//! store.
//!
//! The limit is GCRA (the generic cell rate algorithm, a token bucket kept as one timestamp): a rate of
//! `count/per` lets one message go every `per / count`, with bursts of up to `count`. In the store the
//! timestamp is the string key `rate:{<destination>}` (after the key prefix), in microseconds of the
//! store's clock, changed only by a Lua script so relays never race and their clocks do not matter.
//!
//! Turns are taken in batches, not per message: a relay asks the store for a few at once and spends them
//! on its connections to that destination for up to `BANK_LIFE`; what is left then goes unused (the fleet
//! sends a little under its rate, never over). Without the store (none configured, or not answering) a
//! relay keeps the timestamp itself, for its share of the rate (`count / fleet_size`, at least one per
//! period).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herald_config::Rate;

use super::{Link, ScriptConnection};

/// How long turns taken from the store in a batch may be spent.
const BANK_LIFE: Duration = Duration::from_secs(1);
/// The most turns one request to the store takes.
const MAX_BATCH: u32 = 16;
/// Destinations remembered before the full buckets are dropped.
const PRUNE_AT: usize = 4096;
/// The shortest wait a message over the rate is given (the store answers in milliseconds).
const MIN_WAIT: Duration = Duration::from_millis(10);

/// KEYS: the destination's timestamp. ARGV: interval (µs), burst tolerance (µs), turns wanted.
/// Returns {turns taken, µs until the next one} (the wait only when none was taken).
const TAKE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local room = math.floor((now + tolerance - tat) / interval)
if room < 1 then
  return {0, math.ceil(tat + interval - tolerance - now)}
end
local n = math.min(tonumber(ARGV[3]), room)
tat = tat + n * interval
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
return {n, 0}
"#;

/// Whether a message may go now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    Go,
    /// Over the rate: the destination's next turn comes in this long.
    Wait(Duration),
}

/// A destination's state on this relay.
#[derive(Debug)]
struct Bucket {
    /// The local limit's theoretical arrival time (GCRA).
    tat: Instant,
    /// Turns taken from the store and not yet spent, and when.
    banked: u32,
    banked_at: Instant,
}

/// This relay's side of the message rates.
#[derive(Debug)]
pub struct Rates {
    store: Option<ScriptConnection>,
    take: redis::Script,
    fleet_size: u32,
    buckets: Mutex<HashMap<Arc<str>, Bucket>>,
}

impl Rates {
    /// Rates kept by this relay alone (no store): the whole rate is its own.
    pub fn local() -> Arc<Rates> {
        Arc::new(Rates {
            store: None,
            take: redis::Script::new(TAKE),
            fleet_size: 1,
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// Rates for the whole fleet through `link`; this relay's share of them while the store is away.
    pub fn shared(link: Arc<Link>, fleet_size: u32) -> Arc<Rates> {
        let take = redis::Script::new(TAKE);
        Arc::new(Rates {
            store: Some(ScriptConnection::new(
                link,
                "rate",
                "message rates are kept by this relay, for its share, until the store answers",
                vec![take.clone()],
            )),
            take,
            fleet_size: fleet_size.max(1),
            buckets: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Bucket>> {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A turn for one message to `dest` under `rate`.
    pub async fn take(&self, dest: &Arc<str>, rate: Rate) -> Turn {
        let now = Instant::now();
        {
            let mut buckets = self.lock();
            if buckets.len() >= PRUNE_AT {
                // Full buckets (time caught up, nothing banked) hold nothing a new one would not.
                buckets.retain(|_, b| {
                    b.tat > now || (b.banked > 0 && now.duration_since(b.banked_at) < BANK_LIFE)
                });
            }
            if let Some(b) = buckets.get_mut(dest)
                && b.banked > 0
                && now.duration_since(b.banked_at) < BANK_LIFE
            {
                b.banked -= 1;
                return Turn::Go;
            }
        }
        if let Some(store) = &self.store
            && let Some((taken, wait)) = self.take_in_store(store, dest, rate).await
        {
            if taken == 0 {
                return Turn::Wait(wait.max(MIN_WAIT));
            }
            let mut buckets = self.lock();
            let b = buckets
                .entry(dest.clone())
                .or_insert_with(|| Bucket::new(now));
            b.banked = taken - 1;
            b.banked_at = now;
            return Turn::Go;
        }
        let share = rate.share(self.fleet_size);
        let mut buckets = self.lock();
        let b = buckets
            .entry(dest.clone())
            .or_insert_with(|| Bucket::new(now));
        match gcra(&mut b.tat, now, share) {
            None => Turn::Go,
            Some(wait) => Turn::Wait(wait.max(MIN_WAIT)),
        }
    }

    /// Some((turns taken, wait when none)) from the store; None when it cannot be asked now.
    async fn take_in_store(
        &self,
        store: &ScriptConnection,
        dest: &str,
        rate: Rate,
    ) -> Option<(u32, Duration)> {
        let mut con = store.get().await?;
        let interval = rate.interval().as_micros().max(1) as u64;
        let tolerance = interval * u64::from(rate.count);
        let batch = (rate.count / (4 * self.fleet_size)).clamp(1, MAX_BATCH);
        let key = store.link().key(&format!("rate:{{{dest}}}"));
        let mut call = self.take.key(key);
        call.arg(interval).arg(tolerance).arg(batch);
        match store.timed(call.invoke_async::<(u32, u64)>(&mut con)).await {
            Ok((taken, wait)) => Some((taken, Duration::from_micros(wait))),
            Err(e) => {
                store.failed(&e).await;
                None
            }
        }
    }
}

impl Bucket {
    fn new(now: Instant) -> Bucket {
        Bucket {
            tat: now,
            banked: 0,
            banked_at: now,
        }
    }
}

/// One message under `rate` at `now`, with the theoretical arrival time `tat`: None when it may go (and
/// `tat` moves on), else how long until it may.
fn gcra(tat: &mut Instant, now: Instant, rate: Rate) -> Option<Duration> {
    let interval = rate.interval().max(Duration::from_micros(1));
    let tolerance = interval * rate.count;
    let start = (*tat).max(now);
    let next = start + interval;
    let ahead = next.duration_since(now);
    if ahead <= tolerance {
        *tat = next;
        None
    } else {
        Some(ahead - tolerance)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(s: &str) -> Rate {
        s.parse().expect("rate")
    }

    #[test]
    fn a_burst_of_the_count_goes_then_one_per_interval() {
        let r = rate("4/s");
        let t0 = Instant::now();
        let mut tat = t0;
        for _ in 0..4 {
            assert_eq!(gcra(&mut tat, t0, r), None);
        }
        assert_eq!(gcra(&mut tat, t0, r), Some(Duration::from_millis(250)));
        // A quarter of a second later one turn has come back, and only one.
        let t1 = t0 + Duration::from_millis(250);
        assert_eq!(gcra(&mut tat, t1, r), None);
        assert_eq!(gcra(&mut tat, t1, r), Some(Duration::from_millis(250)));
        // After a quiet period the whole burst is back, no more.
        let t2 = t1 + Duration::from_secs(10);
        for _ in 0..4 {
            assert_eq!(gcra(&mut tat, t2, r), None);
        }
        assert!(gcra(&mut tat, t2, r).is_some());
    }

    #[test]
    fn over_a_long_run_the_count_per_period_holds() {
        let r = rate("30/min");
        let t0 = Instant::now();
        let mut tat = t0;
        let mut now = t0;
        let mut sent = 0u32;
        // Ask every 100 ms for ten minutes: a burst of 30, then one every 2 s.
        while now < t0 + Duration::from_secs(600) {
            if gcra(&mut tat, now, r).is_none() {
                sent += 1;
            }
            now += Duration::from_millis(100);
        }
        assert!((329..=331).contains(&sent), "{sent}");
    }

    #[tokio::test]
    async fn without_a_store_a_relay_keeps_the_whole_rate_itself() {
        let rates = Rates::local();
        let dest: Arc<str> = "example.com".into();
        let other: Arc<str> = "example.net".into();
        let r = rate("3/h");
        for _ in 0..3 {
            assert_eq!(rates.take(&dest, r).await, Turn::Go);
        }
        let Turn::Wait(wait) = rates.take(&dest, r).await else {
            panic!("a fourth message within the hour went");
        };
        assert!(wait > Duration::from_secs(1150) && wait <= Duration::from_secs(1200));
        // Each destination has its own.
        assert_eq!(rates.take(&other, r).await, Turn::Go);
    }
}
