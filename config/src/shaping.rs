//! Traffic shaping: the warm-up of new source addresses (`ip_pools[].warmup`,
//! `ip_pools[].sources[].warmup_start`) and the `shaping` section (the day length, limits per mailbox
//! provider, and the back-off rules that slow a source down when a provider pushes back).
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
    /// Limits per mailbox provider and source address, over the shipped ones: a shipped provider's name
    /// (`gmail`, `microsoft`, `yahoo`, ...) replaces the limits it gives and adds the MX hosts it lists; a
    /// new name defines a provider by its MX hosts. Every recipient domain whose MX hosts are the
    /// provider's shares its limits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<ProviderShaping>,
    /// The limits of every other destination, which rolls up by the registrable domain of its best MX
    /// host (every domain hosted at `mx.example.net` is one provider, `example.net`). Absent: none beyond
    /// `delivery.per_domain`.
    #[serde(default, skip_serializing_if = "ProviderLimits::is_empty")]
    pub default: ProviderLimits,
    /// Back-off rules, consulted before the shipped ones: what a reply a provider sends does to the source
    /// it was sent from, for that provider.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<BackoffRule>,
    /// Whether the shipped back-off rules apply (after `rules`).
    #[serde(default = "yes", skip_serializing_if = "is_yes")]
    pub builtin_rules: bool,
    /// After a suspension ends, or after a halving, a source sends at half its provider's limits (or less),
    /// and the share doubles every `recovery` until it is whole again.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "crate::schema::HumanDuration")]
    pub recovery: Duration,
}

fn yes() -> bool {
    true
}

fn is_yes(b: &bool) -> bool {
    *b
}

impl Default for Shaping {
    fn default() -> Self {
        Shaping {
            day_length: Duration::from_secs(86_400),
            providers: Vec::new(),
            default: ProviderLimits::default(),
            rules: Vec::new(),
            builtin_rules: true,
            recovery: Duration::from_secs(600),
        }
    }
}

/// A provider's limits, each per source address (for the whole fleet when the relays share a `store`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderLimits {
    /// Connections open at once from one source address to the provider's MX hosts, whatever the
    /// recipient domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Messages sent on one connection to the provider before it is closed (the smaller of this and
    /// `delivery.per_domain.messages_per_connection`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_per_connection: Option<u32>,
    /// Messages from one source address to the provider per period (`600/min`, `20000/h`); every rate
    /// listed holds. A message over one waits in the queue for its turn, which is not a delivery attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_message_rates: Option<Vec<crate::Rate>>,
}

impl ProviderLimits {
    pub fn is_empty(&self) -> bool {
        *self == ProviderLimits::default()
    }

    /// These limits with the ones `over` gives put in their place.
    pub fn overridden_by(&self, over: &ProviderLimits) -> ProviderLimits {
        ProviderLimits {
            max_connections: over.max_connections.or(self.max_connections),
            messages_per_connection: over
                .messages_per_connection
                .or(self.messages_per_connection),
            max_message_rates: over
                .max_message_rates
                .clone()
                .or_else(|| self.max_message_rates.clone()),
        }
    }
}

/// One entry of `shaping.providers`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderShaping {
    /// A shipped provider's name, or a new one (letters, digits, `-`, `_` and `.`).
    pub name: String,
    /// Host name suffixes of the provider's MX hosts: `mx.example.net` matches that host and every host
    /// under it (`a.mx.example.net`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mx: Vec<String>,
    /// Connections open at once from one source address to the provider's MX hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Messages on one connection to the provider (the smaller of this and `delivery.per_domain`'s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_per_connection: Option<u32>,
    /// Messages from one source address to the provider per period (`600/min`, `20000/h`); every rate
    /// listed holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_message_rates: Option<Vec<crate::Rate>>,
}

impl ProviderShaping {
    pub fn limits(&self) -> ProviderLimits {
        ProviderLimits {
            max_connections: self.max_connections,
            messages_per_connection: self.messages_per_connection,
            max_message_rates: self.max_message_rates.clone(),
        }
    }
}

/// What a back-off rule does to the source a matching reply was sent from, for the provider that sent it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BackoffAction {
    /// The source sends nothing to the provider for `duration` (its mail there goes from the pool's other
    /// addresses, or waits), then resumes at half its limits, recovering by `shaping.recovery`.
    Suspend,
    /// The source's limits for the provider are halved (down to a sixteenth), recovering by
    /// `shaping.recovery`.
    Halve,
    /// The recipients the reply refused bounce now, whatever its code: for replies that say a retry will
    /// never succeed.
    Bounce,
}

impl BackoffAction {
    pub fn as_str(self) -> &'static str {
        match self {
            BackoffAction::Suspend => "suspend",
            BackoffAction::Halve => "halve",
            BackoffAction::Bounce => "bounce",
        }
    }
}

/// One back-off rule: a reply matches when it comes from `provider` (any, when absent), the classifier
/// put it in `category`, and its enhanced status code matches `status` (when given).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BackoffRule {
    /// The provider whose replies the rule reads: a shipped provider's name, one of `shaping.providers`,
    /// or the registrable domain an unknown destination rolls up to. Absent: any provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    pub category: crate::bounce::Category,
    /// An enhanced status code pattern: `4.7.28`, `x.7.28`, `4.7`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    pub action: BackoffAction,
    /// How long a suspension lasts (`suspend` only; 1s to 7d).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<crate::schema::HumanDuration>")]
    pub duration: Option<Duration>,
}

impl Shaping {
    pub fn is_default(&self) -> bool {
        *self == Shaping::default()
    }
}

/// The providers Herald ships (the bounce classifier's tables in the relay, which a relay test keeps equal
/// to this list): what a back-off rule may name besides `shaping.providers` and registrable domains.
pub const SHIPPED_PROVIDERS: [&str; 13] = [
    "gmail",
    "microsoft",
    "yahoo",
    "apple",
    "comcast",
    "orange",
    "gmx",
    "t-online",
    "mailru",
    "yandex",
    "zoho",
    "proton",
    "fastmail",
];

/// The largest daily cap a schedule may give.
pub const MAX_DAILY_CAP: u64 = 1_000_000_000_000;

/// The shortest day: counts keyed by day must not turn faster than the store can be asked.
pub const MIN_DAY_LENGTH: Duration = Duration::from_secs(1);
/// The longest day.
pub const MAX_DAY_LENGTH: Duration = Duration::from_secs(7 * 86_400);
/// The longest suspension and the longest recovery step.
pub const MAX_BACKOFF: Duration = Duration::from_secs(7 * 86_400);

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
