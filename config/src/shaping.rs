//! Traffic shaping: the warm-up of new source addresses (`ip_pools[].warmup`,
//! `ip_pools[].sources[].warmup_start`) and the `shaping` section.
//!
//! A warm-up day is a period of `shaping.day_length` counted from the Unix epoch: with the default of 24
//! hours, a UTC calendar day. An address on day `n` of its warm-up (day 1 is the day of its
//! `warmup_start`) may send the schedule's `n`th cap that day; past the schedule's last day it has no cap.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, UNIX_EPOCH};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The `shaping` section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Shaping {
    /// The length of a warm-up day and of every per-day count (messages per source address, deliveries
    /// and bounces per sending domain). Days are counted from 1970-01-01 00:00 UTC, so the default of 24h
    /// turns at midnight UTC. Shorter days are for tests: a warm-up of weeks runs in minutes. Changing it
    /// takes a restart.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::schema::HumanDuration")]
    pub day_length: Duration,
}

impl Default for Shaping {
    fn default() -> Self {
        Shaping {
            day_length: Duration::from_secs(86_400),
        }
    }
}

impl Shaping {
    pub fn is_default(&self) -> bool {
        *self == Shaping::default()
    }
}

/// The largest daily cap a schedule may give.
pub const MAX_DAILY_CAP: u64 = 1_000_000_000_000;

/// The shortest day: counts keyed by day must not turn faster than the store can be asked.
pub const MIN_DAY_LENGTH: Duration = Duration::from_secs(1);
/// The longest day.
pub const MAX_DAY_LENGTH: Duration = Duration::from_secs(7 * 86_400);

/// An IP pool's warm-up: the daily caps of a new address, from a shipped preset or written out.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Warmup {
    /// A shipped schedule: `standard` ramps from 50 messages on day 1 to 750,000 on day 30 (roughly
    /// doubling every few days, the pace large mailbox providers recommend), then no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<WarmupPreset>,
    /// Messages an address may send on each day of its warm-up, day 1 first; never decreasing. After the
    /// last day there is no cap.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedule: Vec<u64>,
}

/// The shipped warm-up schedules.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum WarmupPreset {
    /// Thirty days from 50 to 750,000 messages a day.
    Standard,
}

/// `warmupPreset: standard`: day 1 first.
pub const STANDARD_WARMUP: [u64; 30] = [
    50, 100, 200, 400, 750, 1_000, 1_500, 2_000, 3_000, 4_000, 5_000, 7_500, 10_000, 15_000,
    20_000, 25_000, 30_000, 40_000, 50_000, 60_000, 75_000, 100_000, 125_000, 150_000, 200_000,
    250_000, 300_000, 400_000, 500_000, 750_000,
];

impl WarmupPreset {
    pub fn schedule(self) -> &'static [u64] {
        match self {
            WarmupPreset::Standard => &STANDARD_WARMUP,
        }
    }
}

impl Warmup {
    /// The daily caps, day 1 first.
    pub fn caps(&self) -> &[u64] {
        match self.preset {
            Some(p) => p.schedule(),
            None => &self.schedule,
        }
    }

    /// The cap of warm-up day `index` (0 for day 1); None past the schedule.
    pub fn cap(&self, index: u64) -> Option<u64> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.caps().get(i).copied())
    }
}

/// When an address started its warm-up: an RFC 3339 date (`2026-12-01`, midnight UTC) or date and time
/// (`2026-12-01T08:00:00Z`), kept as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmupStart {
    /// Seconds since the Unix epoch.
    pub unix: u64,
    text: String,
}

impl WarmupStart {
    /// The 0-based warm-up day of an address that started at `self`, on the day that holds `now_unix`
    /// (seconds), with days of `day_length`. Before its start an address counts as on its first day.
    pub fn day_index(&self, now_unix: u64, day_length: Duration) -> u64 {
        let len = day_length.as_secs().max(1);
        (now_unix / len).saturating_sub(self.unix / len)
    }
}

/// Why a warm-up start did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "a warm-up start is an RFC 3339 date (2026-12-01) or date and time (2026-12-01T08:00:00Z) after 1970; got {0:?}"
)]
pub struct WarmupStartError(String);

impl FromStr for WarmupStart {
    type Err = WarmupStartError;

    fn from_str(s: &str) -> Result<WarmupStart, WarmupStartError> {
        let text = s.trim();
        let full = if text.len() == 10 {
            format!("{text}T00:00:00Z")
        } else {
            text.to_owned()
        };
        let unix = humantime::parse_rfc3339(&full)
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .ok_or_else(|| WarmupStartError(s.to_owned()))?
            .as_secs();
        Ok(WarmupStart {
            unix,
            text: text.to_owned(),
        })
    }
}

impl fmt::Display for WarmupStart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for WarmupStart {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for WarmupStart {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<WarmupStart, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for WarmupStart {
    fn schema_name() -> Cow<'static, str> {
        "WarmupStart".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": r"^\s*[0-9]{4}-[0-9]{2}-[0-9]{2}([Tt ].*)?$",
            "description": "An RFC 3339 date (2026-12-01, midnight UTC) or date and time (2026-12-01T08:00:00Z).",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn a_start_is_a_date_or_a_date_and_time() {
        let d: WarmupStart = "2026-12-01".parse().expect("date");
        assert_eq!(d.unix, 1_796_083_200);
        assert_eq!(d.to_string(), "2026-12-01");
        let t: WarmupStart = "2026-12-01T08:00:00Z".parse().expect("date and time");
        assert_eq!(t.unix, 1_796_083_200 + 8 * 3600);
        for bad in [
            "yesterday",
            "2026-13-01",
            "1969-12-31",
            "2026-12-01T25:00:00Z",
            "",
        ] {
            assert!(bad.parse::<WarmupStart>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_warm_up_day_turns_with_the_day_not_with_the_hour_of_the_start() {
        let start: WarmupStart = "2026-12-01T23:00:00Z".parse().expect("start");
        let dec1 = 1_796_083_200;
        assert_eq!(start.day_index(dec1 + 23 * 3600 + 1, DAY), 0);
        // One hour later it is 2 December: day 2.
        assert_eq!(start.day_index(dec1 + 86_400, DAY), 1);
        assert_eq!(start.day_index(dec1 + 10 * 86_400 + 5, DAY), 10);
        // Before the start: the first day.
        assert_eq!(start.day_index(dec1 - 5 * 86_400, DAY), 0);
        // Days of ten seconds.
        let short = Duration::from_secs(10);
        let s: WarmupStart = "2026-12-01T00:00:00Z".parse().expect("start");
        assert_eq!(s.day_index(dec1 + 35, short), 3);
    }

    #[test]
    fn the_cap_follows_the_schedule_then_ends() {
        let w = Warmup {
            preset: None,
            schedule: vec![10, 20, 20, 50],
        };
        assert_eq!(w.cap(0), Some(10));
        assert_eq!(w.cap(3), Some(50));
        assert_eq!(w.cap(4), None);
        let standard = Warmup {
            preset: Some(WarmupPreset::Standard),
            schedule: Vec::new(),
        };
        assert_eq!(standard.cap(0), Some(50));
        assert_eq!(standard.cap(29), Some(750_000));
        assert_eq!(standard.cap(30), None);
        assert!(STANDARD_WARMUP.windows(2).all(|w| w[0] < w[1]));
    }
}
