//! The names and paths that a relay's Kubernetes objects and its rendered config must agree on: where the
//! pod mounts the config, the TLS certificate and the DKIM keys, which Secret holds what under which key,
//! and the file a domain's signing key is found in.
//!
//! `objects` (the StatefulSet's volumes and mounts) and `render` (the paths inside the config file) both
//! take them from here, so neither has to import the other: a path changed in one place moves in both.

use kube::ResourceExt;

use crate::crd::{SendingDomain, SmtpRelay};

/// Where the config Secret is mounted, and the config file's name in it.
pub const CONFIG_DIR: &str = "/etc/herald/config";
pub const CONFIG_FILE: &str = "relay.yaml";
/// The key in the config Secret that holds the return-path token keys (one per line).
pub const BOUNCE_KEYS: &str = "bounce-keys";
/// Where the `kubernetes.io/tls` Secret is mounted.
pub const TLS_DIR: &str = "/etc/herald/tls";
/// Where every domain's DKIM key is projected, one file per domain and selector.
pub const DKIM_DIR: &str = "/etc/herald/dkim";
/// Where the smarthost credentials Secret is mounted, and the password file in it.
pub const SMARTHOST_DIR: &str = "/etc/herald/smarthost";
pub const SMARTHOST_PASSWORD: &str = "/etc/herald/smarthost/password";
/// The spool volume of each replica.
pub const SPOOL_DIR: &str = "/var/lib/herald/spool";
/// The relay's metrics listener (`/metrics`, `/healthz`, `/readyz`), and its container port's name: what
/// Prometheus scrapes and the kubelet probes.
pub const METRICS_PORT: u16 = 9090;
pub const METRICS_PORT_NAME: &str = "metrics";
/// The relay's admin listener (the queue and suppression API, behind a bearer token), and its port's name.
pub const ADMIN_PORT: u16 = 9091;
pub const ADMIN_PORT_NAME: &str = "admin";
/// Where the admin token Secret is mounted, the key that holds the token, and the file the relay reads.
pub const ADMIN_DIR: &str = "/etc/herald/admin";
pub const ADMIN_TOKEN_KEY: &str = "token";
pub const ADMIN_TOKEN_FILE: &str = "/etc/herald/admin/token";

/// The key in a DKIM Secret that holds the private key.
pub const DKIM_KEY: &str = "private.key";
/// The key in a generated DKIM Secret holding the `p=` value, so the public key is not re-derived each time.
pub const DKIM_PUBLIC: &str = "public.b64";

/// The Secret holding a relay's config file and its return-path token keys.
pub fn config_secret_name(relay: &SmtpRelay) -> String {
    format!("{}-config", relay.name_any())
}

/// The Secret holding a relay's admin API token (generated once, kept until deleted).
pub fn admin_token_secret_name(relay: &SmtpRelay) -> String {
    format!("{}-admin-token", relay.name_any())
}

/// The name of the Secret holding a domain's DKIM key (generated or given).
pub fn dkim_secret_name(domain: &SendingDomain) -> String {
    match &domain.spec.dkim.secret_ref {
        Some(r) => r.name.clone(),
        None => format!("{}-dkim", domain.name_any()),
    }
}

/// The selector a domain signs with now: the one the operator promoted last, or the spec's.
pub fn active_selector(d: &SendingDomain) -> String {
    d.status
        .as_ref()
        .and_then(|s| s.active_selector.clone())
        .unwrap_or_else(|| d.spec.dkim.selector.clone())
}

/// The file of a domain's DKIM key under [`DKIM_DIR`].
pub fn dkim_key_file(domain: &str, selector: &str) -> String {
    format!("{DKIM_DIR}/{}", dkim_key_file_name(domain, selector))
}

/// The file name alone, as the StatefulSet's projected volume names it.
pub fn dkim_key_file_name(domain: &str, selector: &str) -> String {
    format!("{domain}.{selector}.pem")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_smarthost_password_and_admin_token_are_in_their_mounted_directories() {
        assert_eq!(
            SMARTHOST_PASSWORD,
            format!("{SMARTHOST_DIR}/password"),
            "objects mounts the Secret's `password` key at SMARTHOST_DIR"
        );
        assert_eq!(ADMIN_TOKEN_FILE, format!("{ADMIN_DIR}/{ADMIN_TOKEN_KEY}"));
    }

    #[test]
    fn the_active_selector_is_the_promoted_one_once_there_is_one() {
        let mut d = SendingDomain::new("example", crate::fixtures::domain_spec());
        assert_eq!(active_selector(&d), "herald1");
        d.status = Some(crate::crd::SendingDomainStatus {
            active_selector: Some("herald1-20260101000000".into()),
            ..Default::default()
        });
        assert_eq!(active_selector(&d), "herald1-20260101000000");
        assert_eq!(dkim_secret_name(&d), "example-dkim");
        assert_eq!(
            dkim_key_file("example.test", "s1"),
            "/etc/herald/dkim/example.test.s1.pem"
        );
    }
}
