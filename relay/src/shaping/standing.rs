//! Where a source stands with a provider after pushing back: suspended until a time, then sending at a
//! share of the provider's limits that doubles every `shaping.recovery` until it is whole.
//!
//! A standing is a few numbers from which every relay computes the same share at the same time, so the
//! fleet needs to share only the standing, never a timer: the store keeps it until it has recovered.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use herald_config::BackoffAction;

/// The smallest share halvings go down to: a sixteenth of the limits.
pub const MIN_SHARE: f64 = 1.0 / 16.0;

/// A source's standing with one provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Standing {
    /// Nothing is sent before this (ms since the epoch); 0 when it was never suspended.
    pub until_ms: u64,
    /// The share of the limits from `from_ms` (and, once suspended, from `until_ms`).
    pub share: f64,
    pub from_ms: u64,
    /// The action and the reply that brought it, for `GET /shaping`.
    pub action: String,
    pub reply: String,
}

impl Standing {
    /// Whether nothing may be sent at `now_ms`.
    pub fn suspended(&self, now_ms: u64) -> bool {
        now_ms < self.until_ms
    }

    /// The share of the limits in force at `now_ms`: 0 while suspended, then doubling each `recovery`.
    pub fn share_at(&self, now_ms: u64, recovery: Duration) -> f64 {
        if self.suspended(now_ms) {
            return 0.0;
        }
        let step = recovery.as_millis().max(1) as u64;
        let steps = now_ms.saturating_sub(self.from_ms.max(self.until_ms)) / step;
        (self.share * 2f64.powi(steps.min(16) as i32)).min(1.0)
    }

    /// When the share is whole again (ms): what the store keeps it for.
    pub fn recovered_ms(&self, recovery: Duration) -> u64 {
        let step = recovery.as_millis().max(1) as u64;
        let doublings = (1.0 / self.share.max(MIN_SHARE)).log2().ceil().max(0.0) as u64;
        self.from_ms.max(self.until_ms) + doublings * step
    }

    /// The standing after `action` at `now_ms`, from `previous` (none: a whole share). A suspension keeps
    /// a later end it already had; a halving during a suspension changes nothing (the reply came from a
    /// connection that was under way when the suspension began).
    pub fn after(
        previous: Option<&Standing>,
        action: BackoffAction,
        duration: Option<Duration>,
        now_ms: u64,
        recovery: Duration,
        reply: String,
    ) -> Option<Standing> {
        let base = match previous {
            Some(p) if p.suspended(now_ms) => p.share,
            Some(p) => p.share_at(now_ms, recovery),
            None => 1.0,
        };
        let halved = (base / 2.0).max(MIN_SHARE);
        match action {
            BackoffAction::Suspend => {
                let until = now_ms.saturating_add(duration.map_or(0, |d| d.as_millis() as u64));
                // Connections under way when the suspension began draw the same reply: they may push its
                // end out, never its share down again.
                let (until, share) = match previous {
                    Some(p) if p.suspended(now_ms) => (p.until_ms.max(until), p.share),
                    Some(p) => (p.until_ms.max(until), halved),
                    None => (until, halved),
                };
                Some(Standing {
                    until_ms: until,
                    share,
                    from_ms: until,
                    action: action.as_str().to_owned(),
                    reply,
                })
            }
            BackoffAction::Halve => match previous {
                Some(p) if p.suspended(now_ms) => None,
                _ => Some(Standing {
                    until_ms: previous.map_or(0, |p| p.until_ms),
                    share: halved,
                    from_ms: now_ms,
                    action: action.as_str().to_owned(),
                    reply,
                }),
            },
            BackoffAction::Bounce => None,
        }
    }
}

/// `limit` scaled by `share`, at least 1.
pub fn scaled(limit: u32, share: f64) -> u32 {
    ((f64::from(limit) * share).floor() as u32).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STEP: Duration = Duration::from_secs(10);

    #[test]
    fn a_suspension_ends_at_half_and_doubles_back_each_step() {
        let s = Standing::after(
            None,
            BackoffAction::Suspend,
            Some(Duration::from_secs(30)),
            1_000,
            STEP,
            "421 4.7.28".into(),
        )
        .expect("suspended");
        assert!(s.suspended(1_000) && s.suspended(30_999));
        assert_eq!(s.share_at(20_000, STEP), 0.0);
        assert_eq!(s.share_at(31_000, STEP), 0.5);
        assert_eq!(s.share_at(40_999, STEP), 0.5);
        assert_eq!(s.share_at(41_000, STEP), 1.0);
        assert_eq!(s.recovered_ms(STEP), 41_000);
        assert_eq!(s.share_at(10_000_000, STEP), 1.0);
    }

    #[test]
    fn halvings_compound_down_to_a_sixteenth_and_a_suspension_keeps_its_end() {
        let mut s: Option<Standing> = None;
        for _ in 0..6 {
            s = Standing::after(
                s.as_ref(),
                BackoffAction::Halve,
                None,
                0,
                STEP,
                String::new(),
            );
        }
        let s = s.expect("halved");
        assert_eq!(s.share_at(0, STEP), MIN_SHARE);
        assert_eq!(s.recovered_ms(STEP), 40_000);
        let long = Standing::after(
            None,
            BackoffAction::Suspend,
            Some(Duration::from_secs(60)),
            0,
            STEP,
            String::new(),
        );
        let short = Standing::after(
            long.as_ref(),
            BackoffAction::Suspend,
            Some(Duration::from_secs(5)),
            1_000,
            STEP,
            String::new(),
        )
        .expect("suspended");
        assert_eq!(short.until_ms, 60_000);
        // A burst of the same reply while suspended does not halve the share again.
        assert_eq!(short.share, 0.5);
        let later = Standing::after(
            Some(&short),
            BackoffAction::Suspend,
            Some(Duration::from_secs(90)),
            2_000,
            STEP,
            String::new(),
        )
        .expect("suspended");
        assert_eq!((later.until_ms, later.share), (92_000, 0.5));
        // A halving while suspended changes nothing.
        assert!(
            Standing::after(
                Some(&short),
                BackoffAction::Halve,
                None,
                2_000,
                STEP,
                String::new()
            )
            .is_none()
        );
        assert!(
            Standing::after(None, BackoffAction::Bounce, None, 0, STEP, String::new()).is_none()
        );
        assert_eq!(scaled(10, 0.5), 5);
        assert_eq!(scaled(1, MIN_SHARE), 1);
    }
}
