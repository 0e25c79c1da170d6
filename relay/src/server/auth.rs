//! Password checks for AUTH. argon2 is slow and large on purpose (about 19 MiB and tens of milliseconds
//! per check), which makes it a lever for whoever can open connections: checks run at most one per core at
//! a time, and a client address that keeps failing is refused without a check until its failures age out,
//! so a password-guessing flood costs the relay little and other clients still get in.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::metrics::Metrics;
use crate::policy::Policy;
use herald_config::Limits;

/// How long a check waits for a free slot before the client is asked to come back.
const BUSY_WAIT: Duration = Duration::from_secs(10);

/// Client addresses tracked before expired ones are swept.
const SWEEP_AT: usize = 4096;

/// What a check came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Checked {
    /// The password matches; the user name.
    Valid(String),
    Invalid,
    /// Too many recent failures from this client address: not checked.
    Throttled,
    /// Every check slot stayed busy: not checked.
    Busy,
}

impl Checked {
    /// The `result` label of `herald_auth_attempts_total`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Checked::Valid(_) => "accepted",
            Checked::Invalid => "failed",
            Checked::Throttled => "throttled",
            Checked::Busy => "busy",
        }
    }
}

#[derive(Debug)]
struct Failures {
    count: u32,
    first: Instant,
}

/// The relay's password checker, shared by every listener.
#[derive(Debug)]
pub struct AuthGate {
    slots: Semaphore,
    failures: Mutex<HashMap<IpAddr, Failures>>,
    max_failures: AtomicU32,
    window_ms: AtomicU64,
    metrics: Arc<Metrics>,
}

impl AuthGate {
    pub fn new(limits: &Limits, metrics: Arc<Metrics>) -> AuthGate {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        let gate = AuthGate {
            slots: Semaphore::new(cores),
            failures: Mutex::new(HashMap::new()),
            max_failures: AtomicU32::new(0),
            window_ms: AtomicU64::new(0),
            metrics,
        };
        gate.set_limits(limits);
        gate
    }

    /// New limits from a reloaded config.
    pub fn set_limits(&self, limits: &Limits) {
        self.max_failures
            .store(limits.auth_failures_per_client, Ordering::Relaxed);
        self.window_ms.store(
            limits.auth_failure_window.as_millis() as u64,
            Ordering::Relaxed,
        );
    }

    /// Checks `password` for `username` on behalf of a client at `ip`, unless that client is throttled or
    /// no slot frees up in time.
    pub async fn check(
        &self,
        ip: IpAddr,
        policy: Arc<Policy>,
        username: String,
        password: String,
    ) -> Checked {
        let checked = if self.throttled(ip) {
            Checked::Throttled
        } else {
            match tokio::time::timeout(BUSY_WAIT, self.slots.acquire()).await {
                Ok(Ok(_slot)) => {
                    let valid = tokio::task::spawn_blocking(move || {
                        policy
                            .verify_password(&username, &password)
                            .then_some(username)
                    })
                    .await
                    .unwrap_or(None);
                    match valid {
                        Some(user) => Checked::Valid(user),
                        None => {
                            self.failed(ip);
                            Checked::Invalid
                        }
                    }
                }
                _ => Checked::Busy,
            }
        };
        self.metrics
            .auth_attempts
            .with_label_values(&[checked.as_str()])
            .inc();
        checked
    }

    fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms.load(Ordering::Relaxed))
    }

    fn throttled(&self, ip: IpAddr) -> bool {
        let map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&ip).is_some_and(|f| {
            f.first.elapsed() < self.window()
                && f.count >= self.max_failures.load(Ordering::Relaxed)
        })
    }

    fn failed(&self, ip: IpAddr) {
        let window = self.window();
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= SWEEP_AT {
            map.retain(|_, f| f.first.elapsed() < window);
        }
        let f = map.entry(ip).or_insert(Failures {
            count: 0,
            first: Instant::now(),
        });
        if f.first.elapsed() >= window {
            *f = Failures {
                count: 0,
                first: Instant::now(),
            };
        }
        f.count += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(max: u32, window: Duration) -> AuthGate {
        let limits = Limits {
            auth_failures_per_client: max,
            auth_failure_window: window,
            ..Limits::default()
        };
        AuthGate::new(&limits, Arc::new(Metrics::new(&[])))
    }

    #[test]
    fn a_client_is_throttled_after_its_failures_and_others_are_not() {
        let g = gate(3, Duration::from_secs(60));
        let (bad, good): (IpAddr, IpAddr) =
            ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        for _ in 0..2 {
            g.failed(bad);
        }
        assert!(!g.throttled(bad));
        g.failed(bad);
        assert!(g.throttled(bad));
        assert!(!g.throttled(good));
    }

    #[test]
    fn failures_age_out_with_the_window() {
        let g = gate(1, Duration::from_millis(20));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        g.failed(ip);
        assert!(g.throttled(ip));
        std::thread::sleep(Duration::from_millis(30));
        assert!(!g.throttled(ip));
    }
}
