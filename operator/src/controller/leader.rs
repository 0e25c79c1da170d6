//! Leader election with a `coordination.k8s.io/v1` Lease, so two operator replicas are safe: only the
//! holder reconciles. The holder renews every `lease/3`; a replica takes over once the holder has not
//! renewed for a whole lease duration. Updates carry the lease's resourceVersion, so two candidates cannot
//! both win a race. A replica that loses the lease stops (and is restarted) rather than reconcile alongside
//! the new leader.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};

/// One candidate for the lease.
#[derive(Debug, Clone)]
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl Elector {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: String,
        duration: Duration,
    ) -> Elector {
        Elector {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity,
            duration,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// One attempt to take or renew the lease; true if this candidate holds it afterwards.
    pub async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let secs = self.duration.as_secs() as i32;
        let current = self.api.get_opt(&self.name).await?;
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let ours = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
            (Some(MicroTime(t)), Some(d)) => {
                let age = now.as_second() - t.as_second();
                age > i64::from(d)
            }
            _ => true,
        };
        if !ours && !expired {
            return Ok(false);
        }
        let mut next = spec.clone();
        if !ours {
            next.holder_identity = Some(self.identity.clone());
            next.acquire_time = Some(MicroTime(now));
            next.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        next.renew_time = Some(MicroTime(now));
        next.lease_duration_seconds = Some(secs);
        lease.spec = Some(next);
        // replace() sends the resourceVersion we read: a concurrent writer makes this a 409.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this candidate holds the lease.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "leader election: cannot read or write the lease")
                }
            }
            tokio::time::sleep(self.duration / 3).await;
        }
    }

    /// Renews the lease until it is lost; returns then.
    pub async fn hold(&self) {
        let mut failures = 0;
        loop {
            tokio::time::sleep(self.duration / 3).await;
            match self.try_acquire().await {
                Ok(true) => failures = 0,
                Ok(false) => return,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, "leader election: renewal failed");
                    // Past the lease duration another replica may have taken over.
                    if failures >= 3 {
                        return;
                    }
                }
            }
        }
    }
}
