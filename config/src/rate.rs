//! Message rates as written in the file: `600/min`, `10/s`, `5000/h`, `20000/d`, or a count per any
//! duration, `100/30s`.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `count` messages per `per` on average, with bursts of up to `count`: a token bucket that holds
/// `count` and refills evenly over `per`, so a destination idle for a period can take a burst of `count`
/// and then one every `per / count` (up to twice `count` within one period, never more).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl Rate {
    /// The time one message's allowance takes to come back.
    pub fn interval(&self) -> Duration {
        self.per / self.count.max(1)
    }

    /// This rate divided among `parts` relays, each keeping at least one message per period.
    pub fn share(&self, parts: u32) -> Rate {
        Rate {
            count: (self.count / parts.max(1)).max(1),
            per: self.per,
        }
    }
}

/// Why a rate did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    #[error("a rate is COUNT/PERIOD, such as 600/min, 10/s or 100/30s; got {0:?}")]
    Form(String),
    #[error("the count of a rate must be a whole number from 1 to 4294967295; got {0:?}")]
    Count(String),
    #[error("the period of a rate must be s, min, h, d or a duration from 1ms to 7d; got {0:?}")]
    Period(String),
}

impl FromStr for Rate {
    type Err = RateError;

    fn from_str(s: &str) -> Result<Rate, RateError> {
        let (count, per) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| RateError::Form(s.to_owned()))?;
        let count: u32 = count
            .trim()
            .parse()
            .ok()
            .filter(|&c| c > 0)
            .ok_or_else(|| RateError::Count(count.trim().to_owned()))?;
        let per = per.trim();
        let period = match per {
            "s" | "sec" | "second" => Some(Duration::from_secs(1)),
            "m" | "min" | "minute" => Some(Duration::from_secs(60)),
            "h" | "hour" => Some(Duration::from_secs(3600)),
            "d" | "day" => Some(Duration::from_secs(86_400)),
            other => humantime::parse_duration(other).ok(),
        }
        .filter(|d| *d >= Duration::from_millis(1) && *d <= Duration::from_secs(7 * 86_400))
        .ok_or_else(|| RateError::Period(per.to_owned()))?;
        Ok(Rate { count, per: period })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_millis() {
            1_000 => "s".to_owned(),
            60_000 => "min".to_owned(),
            3_600_000 => "h".to_owned(),
            86_400_000 => "d".to_owned(),
            _ => humantime::format_duration(self.per).to_string(),
        };
        write!(f, "{}/{unit}", self.count)
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Rate, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Rate {
    fn schema_name() -> Cow<'static, str> {
        "Rate".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": r"^\s*[0-9]+\s*/\s*\S.*$",
            "description": "Messages per period: 600/min, 10/s, 5000/h, 20000/d, or per any duration, 100/30s.",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_in_every_written_form_and_print_back() {
        for (text, count, secs, printed) in [
            ("600/min", 600, 60.0, "600/min"),
            ("10/s", 10, 1.0, "10/s"),
            (" 5000 / h ", 5000, 3600.0, "5000/h"),
            ("20000/day", 20000, 86400.0, "20000/d"),
            ("100/30s", 100, 30.0, "100/30s"),
            ("1/500ms", 1, 0.5, "1/500ms"),
        ] {
            let r: Rate = text.parse().expect(text);
            assert_eq!((r.count, r.per.as_secs_f64()), (count, secs), "{text}");
            assert_eq!(r.to_string(), printed);
            assert_eq!(printed.parse::<Rate>(), Ok(r));
        }
    }

    #[test]
    fn a_bad_rate_says_which_part_is_wrong() {
        assert!(matches!("600".parse::<Rate>(), Err(RateError::Form(_))));
        assert!(matches!("0/s".parse::<Rate>(), Err(RateError::Count(_))));
        assert!(matches!("-1/s".parse::<Rate>(), Err(RateError::Count(_))));
        assert!(matches!(
            "10/fortnight".parse::<Rate>(),
            Err(RateError::Period(_))
        ));
        assert!(matches!("10/0s".parse::<Rate>(), Err(RateError::Period(_))));
        assert!(matches!(
            "10/30d".parse::<Rate>(),
            Err(RateError::Period(_))
        ));
    }

    #[test]
    fn a_share_keeps_at_least_one_message_per_period() {
        let r: Rate = "10/s".parse().expect("rate");
        assert_eq!(r.share(3).count, 3);
        assert_eq!(r.share(30).count, 1);
        assert_eq!(r.share(0).count, 10);
        assert_eq!(r.interval(), Duration::from_millis(100));
    }
}
