//! IpPool: per address, whether reverse DNS is forward-confirmed for its EHLO name, and where it stands
//! in its warm-up schedule.
//!
//! - **Fetch**: the reverse and forward DNS of each address.
//! - **Decide**: [`decide`] turns those and today's date into the status, without I/O.
//! - **Apply**: the status, when it changed.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};

use super::{Context, Error, Recheck, condition, patch_status};
use crate::crd::{AddressStatus, IpPool, IpPoolStatus, RecordState};
use crate::verify::check_reverse;

/// The pool's daily caps, day 1 first: its preset's or its own.
pub fn schedule(spec: &crate::crd::IpPoolSpec) -> &[u64] {
    match spec.warmup_preset {
        Some(crate::crd::WarmupPreset::Standard) => &herald_config::STANDARD_WARMUP,
        None => &spec.warmup,
    }
}

/// The warm-up day (1-based) and today's cap at `now` (Unix seconds) for an address that started
/// warming up at `start`, as the relay counts them (days of 24 hours from midnight UTC; before its start an
/// address is on its first day). Past the schedule the day goes on and the cap is gone.
pub fn warmup(schedule: &[u64], start: Option<&str>, now: u64) -> (Option<u32>, Option<u64>) {
    let Some(start) = start.and_then(|s| s.parse::<herald_config::WarmupStart>().ok()) else {
        return (None, None);
    };
    if schedule.is_empty() {
        return (None, None);
    }
    let index = start.day_index(now, Duration::from_secs(86_400));
    (
        Some(u32::try_from(index + 1).unwrap_or(u32::MAX)),
        usize::try_from(index)
            .ok()
            .and_then(|i| schedule.get(i).copied()),
    )
}

pub async fn reconcile(pool: Arc<IpPool>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.reconciling(pool.as_ref(), reconcile_pool(&pool, &ctx))
        .await
}

async fn reconcile_pool(pool: &IpPool, ctx: &Context) -> Result<Action, Error> {
    let ns = pool
        .namespace()
        .ok_or_else(|| Error::Invalid("IpPool without a namespace".into()))?;
    let now = Timestamp::now();

    // Fetch.
    let mut reverse = Vec::with_capacity(pool.spec.addresses.len());
    for a in &pool.spec.addresses {
        reverse.push(match a.address.parse::<std::net::IpAddr>() {
            Ok(ip) => Some(check_reverse(&ctx.dns, ip, &a.ehlo).await),
            Err(_) => None,
        });
    }

    // Decide.
    let decision = decide(pool, &reverse, ctx.recheck, now);

    // Apply.
    if pool.status.as_ref() != Some(&decision.status) {
        let api: Api<IpPool> = Api::namespaced(ctx.client.clone(), &ns);
        patch_status(&api, &pool.name_any(), &decision.status).await?;
    }
    Ok(Action::requeue(decision.requeue))
}

/// The reverse DNS check of one address: its state, what was served, and the nameserver that served it;
/// `None` for an address that does not parse.
pub type ReverseCheck = Option<(RecordState, Option<String>, Option<String>)>;

/// What to write for an IpPool.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub status: IpPoolStatus,
    pub requeue: Duration,
}

/// The status of a pool from the reverse DNS of its addresses (in spec order) and today's date.
pub fn decide(
    pool: &IpPool,
    reverse: &[ReverseCheck],
    recheck: Recheck,
    now: Timestamp,
) -> Decision {
    let previous = pool.status.clone().unwrap_or_default();
    let generation = pool.metadata.generation;
    let now_unix = u64::try_from(now.as_second()).unwrap_or(0);
    let caps = schedule(&pool.spec);
    let addresses: Vec<AddressStatus> = pool
        .spec
        .addresses
        .iter()
        .zip(reverse)
        .map(|(a, check)| {
            let (reverse_dns, observed_ptr) = match check {
                Some((state, observed, ns)) => (
                    *state,
                    observed.as_ref().map(|o| match ns {
                        Some(n) => format!("{o} (from {n})"),
                        None => o.clone(),
                    }),
                ),
                None => (RecordState::Mismatch, Some("not an IP address".into())),
            };
            let (warmup_day, daily_cap) = warmup(caps, a.warmup_start.as_deref(), now_unix);
            AddressStatus {
                address: a.address.clone(),
                reverse_dns,
                observed_ptr,
                warmup_day,
                daily_cap,
            }
        })
        .collect();
    let bad: Vec<String> = addresses
        .iter()
        .filter(|a| a.reverse_dns != RecordState::Published)
        .map(|a| {
            format!(
                "{} ({:?}{})",
                a.address,
                a.reverse_dns,
                a.observed_ptr
                    .as_deref()
                    .map(|o| format!(": {o}"))
                    .unwrap_or_default()
            )
        })
        .collect();
    let ok = bad.is_empty();
    let warming: Vec<String> = addresses
        .iter()
        .filter_map(|a| {
            Some(format!(
                "{} (day {} of {}, {} today)",
                a.address,
                a.warmup_day?,
                caps.len(),
                a.daily_cap?
            ))
        })
        .collect();
    let complete = warming.is_empty();
    let status = IpPoolStatus {
        address_count: addresses.len() as i32,
        addresses,
        conditions: vec![
            condition(
                &previous.conditions,
                "Ready",
                ok,
                if ok {
                    "ReverseDnsConfirmed"
                } else {
                    "ReverseDnsMismatch"
                },
                if ok {
                    "every address has forward-confirmed reverse DNS".into()
                } else {
                    format!("reverse DNS not confirmed for {}", bad.join("; "))
                },
                generation,
                now,
            ),
            condition(
                &previous.conditions,
                "WarmupComplete",
                complete,
                if complete {
                    "NoAddressWarmingUp"
                } else {
                    "WarmingUp"
                },
                if complete {
                    "no address of the pool has a daily cap".into()
                } else {
                    format!("warming up: {}", warming.join("; "))
                },
                generation,
                now,
            ),
        ],
        observed_generation: generation,
    };
    Decision {
        status,
        // The warm-up day changes at midnight; reverse DNS is rechecked like other records.
        requeue: if ok {
            recheck.verified.min(Duration::from_secs(3600))
        } else {
            recheck.pending
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{IpPoolSpec, PoolAddress};

    #[test]
    fn warmup_days_and_caps() {
        let d = |s: &str| {
            u64::try_from(
                format!("{s}T12:00:00Z")
                    .parse::<Timestamp>()
                    .unwrap()
                    .as_second(),
            )
            .unwrap()
        };
        let schedule = [100, 500, 2000];
        assert_eq!(
            warmup(&schedule, Some("2026-11-20"), d("2026-11-20")),
            (Some(1), Some(100))
        );
        assert_eq!(
            warmup(&schedule, Some("2026-11-20"), d("2026-11-22")),
            (Some(3), Some(2000))
        );
        assert_eq!(
            warmup(&schedule, Some("2026-11-20"), d("2026-11-30")),
            (Some(11), None)
        );
        // Before its start an address is on its first day, as the relay counts it.
        assert_eq!(
            warmup(&schedule, Some("2026-11-21"), d("2026-11-20")),
            (Some(1), Some(100))
        );
        // A start with a time of day: the day turns at midnight UTC all the same.
        assert_eq!(
            warmup(&schedule, Some("2026-11-20T23:00:00Z"), d("2026-11-21")),
            (Some(2), Some(500))
        );
        assert_eq!(
            warmup(
                &herald_config::STANDARD_WARMUP,
                Some("2026-11-20"),
                d("2026-11-20")
            ),
            (Some(1), Some(50))
        );
        assert_eq!(warmup(&schedule, None, d("2026-11-20")), (None, None));
    }

    const RECHECK: Recheck = Recheck {
        pending: Duration::from_secs(30),
        verified: Duration::from_secs(7200),
    };

    fn pool() -> IpPool {
        let address = |a: &str, ehlo: &str| PoolAddress {
            address: a.into(),
            ehlo: ehlo.into(),
            weight: 1,
            warmup_start: Some("2026-01-01".into()),
        };
        let mut p = IpPool::new(
            "pool",
            IpPoolSpec {
                addresses: vec![
                    address("192.0.2.10", "mta1.example.test"),
                    address("192.0.2.11", "mta2.example.test"),
                ],
                warmup: vec![100, 1000],
                warmup_preset: None,
            },
        );
        p.metadata.generation = Some(2);
        p
    }

    #[test]
    fn a_pool_is_ready_when_every_address_is_forward_confirmed() {
        let now: Timestamp = "2026-01-02T12:00:00Z".parse().unwrap();
        let published = Some((RecordState::Published, None, None));
        let d = decide(&pool(), &[published.clone(), published], RECHECK, now);
        assert_eq!(d.status.address_count, 2);
        assert_eq!(d.status.addresses[0].warmup_day, Some(2));
        assert_eq!(d.status.addresses[0].daily_cap, Some(1000));
        assert_eq!(d.status.conditions[0].reason, "ReverseDnsConfirmed");
        let warm = &d.status.conditions[1];
        assert_eq!(
            (
                warm.type_.as_str(),
                warm.status.as_str(),
                warm.message.as_str()
            ),
            (
                "WarmupComplete",
                "False",
                "warming up: 192.0.2.10 (day 2 of 2, 1000 today); 192.0.2.11 (day 2 of 2, 1000 today)"
            )
        );
        assert_eq!(d.status.observed_generation, Some(2));
        assert_eq!(
            d.requeue,
            Duration::from_secs(3600),
            "rechecked at least hourly for the warm-up day"
        );
    }

    #[test]
    fn an_unconfirmed_address_is_named_with_what_its_nameserver_served() {
        let now: Timestamp = "2026-03-01T00:00:00Z".parse().unwrap();
        let d = decide(
            &pool(),
            &[
                Some((RecordState::Published, None, None)),
                Some((
                    RecordState::Mismatch,
                    Some("mta2.example.test does not resolve: NXDOMAIN".into()),
                    Some("127.0.0.1:53".into()),
                )),
            ],
            RECHECK,
            now,
        );
        let c = &d.status.conditions[0];
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "ReverseDnsMismatch")
        );
        assert_eq!(
            c.message,
            "reverse DNS not confirmed for 192.0.2.11 (Mismatch: mta2.example.test does not resolve: NXDOMAIN (from 127.0.0.1:53))"
        );
        assert_eq!(d.status.addresses[1].daily_cap, None, "warm-up is over");
        let warm = &d.status.conditions[1];
        assert_eq!(
            (
                warm.type_.as_str(),
                warm.status.as_str(),
                warm.reason.as_str()
            ),
            ("WarmupComplete", "True", "NoAddressWarmingUp")
        );
        assert_eq!(d.requeue, RECHECK.pending);
    }

    #[test]
    fn an_address_that_does_not_parse_is_a_mismatch() {
        let now: Timestamp = "2026-03-01T00:00:00Z".parse().unwrap();
        let mut p = pool();
        p.spec.addresses.truncate(1);
        p.spec.addresses[0].address = "nonsense".into();
        let d = decide(&p, &[None], RECHECK, now);
        assert_eq!(d.status.addresses[0].reverse_dns, RecordState::Mismatch);
        assert_eq!(
            d.status.addresses[0].observed_ptr.as_deref(),
            Some("not an IP address")
        );
    }
}
