//! IpPool: per address, whether reverse DNS is forward-confirmed for its EHLO name, and where it stands
//! in its warm-up schedule.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::{Context, Error, MANAGER, condition};
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
    let started = Instant::now();
    ctx.metrics.reconciles.with_label_values(&["IpPool"]).inc();
    let ns = pool
        .namespace()
        .ok_or_else(|| Error::Invalid("IpPool without a namespace".into()))?;
    let previous = pool.status.clone().unwrap_or_default();
    let generation = pool.metadata.generation;
    let today = chrono::Utc::now().date_naive();
    let mut addresses = Vec::new();
    for a in &pool.spec.addresses {
        let (reverse_dns, observed_ptr) = match a.address.parse::<std::net::IpAddr>() {
            Ok(ip) => {
                let (state, observed, ns_) = check_reverse(&ctx.dns, ip, &a.ehlo).await;
                (
                    state,
                    observed.map(|o| match ns_ {
                        Some(n) => format!("{o} (from {n})"),
                        None => o,
                    }),
                )
            }
            Err(_) => (RecordState::Mismatch, Some("not an IP address".into())),
        };
        let (warmup_day, daily_cap) = warmup(&pool.spec.warmup, a.warmup_start.as_deref(), today);
        addresses.push(AddressStatus {
            address: a.address.clone(),
            reverse_dns,
            observed_ptr,
            warmup_day,
            daily_cap,
        });
    }
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
        )],
        observed_generation: generation,
    };
    if status != previous {
        let api: Api<IpPool> = Api::namespaced(ctx.client.clone(), &ns);
        api.patch_status(
            &pool.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(
                json!({ "apiVersion": "herald.dev/v1alpha1", "kind": "IpPool", "status": status }),
            ),
        )
        .await?;
    }
    ctx.succeeded(pool.as_ref());
    ctx.metrics
        .duration
        .with_label_values(&["IpPool"])
        .observe(started.elapsed().as_secs_f64());
    // The warm-up day changes at midnight; reverse DNS is rechecked like other records.
    Ok(Action::requeue(if ok {
        ctx.recheck_verified.min(Duration::from_secs(3600))
    } else {
        ctx.recheck_pending
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
