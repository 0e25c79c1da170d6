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

use super::{Context, Error, Recheck, chrono_time, condition, patch_status};
use crate::crd::{AddressStatus, IpPool, IpPoolStatus, RecordState};
use crate::verify::check_reverse;

/// The warm-up day (1-based) and today's cap for an address that started warming up on `start`.
pub fn warmup(
    schedule: &[u64],
    start: Option<&str>,
    today: chrono::NaiveDate,
) -> (Option<u32>, Option<u64>) {
    let Some(start) = start.and_then(|s| chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").ok())
    else {
        return (None, None);
    };
    let days = (today - start).num_days();
    if days < 0 || schedule.is_empty() {
        return (None, None);
    }
    let day = days as u32 + 1;
    (Some(day), schedule.get(days as usize).copied())
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
    let today = chrono_time(now).date_naive();
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
            let (warmup_day, daily_cap) =
                warmup(&pool.spec.warmup, a.warmup_start.as_deref(), today);
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
    let status = IpPoolStatus {
        address_count: addresses.len() as i32,
        addresses,
        conditions: vec![condition(
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
        )],
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
        let d = |s: &str| chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
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
        assert_eq!(
            warmup(&schedule, Some("2026-11-21"), d("2026-11-20")),
            (None, None)
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
