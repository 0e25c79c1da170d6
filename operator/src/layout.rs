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
/// Where the `ca.crt` of `spec.delivery.smarthost.caSecretRef` is mounted.
pub const SMARTHOST_CA_DIR: &str = "/etc/herald/smarthost-ca";
pub const SMARTHOST_CA: &str = "/etc/herald/smarthost-ca/ca.crt";
/// Where the Secret of `spec.store.passwordSecretRef` is mounted, and the file its key becomes.
pub const STORE_DIR: &str = "/etc/herald/store";
pub const STORE_PASSWORD: &str = "/etc/herald/store/password";
/// Where the `ca.crt` of `spec.store.caSecretRef` is mounted.
pub const STORE_CA_DIR: &str = "/etc/herald/store-ca";
pub const STORE_CA: &str = "/etc/herald/store-ca/ca.crt";
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

/// The key in a DKIM Secret the user brings (`spec.dkim.secretRef`) that holds the private key; also where
/// generated Secrets kept their one key before keys were stored per selector.
pub const DKIM_KEY: &str = "private.key";
/// Where generated Secrets kept the `p=` value before keys were stored per selector.
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

/// In a generated DKIM Secret, the key holding `selector`'s private key (PKCS#8 PEM). Every key is stored
/// under its own selector's name and never written under another's, so the file the pods get for a
/// selector can only ever hold that selector's key, whatever else the Secret holds during a rotation.
pub fn dkim_private_key(selector: &str) -> String {
    format!("{selector}.pem")
}

/// In a generated DKIM Secret, the key holding `selector`'s `p=` value (so it is not re-derived each time).
pub fn dkim_public_key(selector: &str) -> String {
    format!("{selector}.pub")
}

/// The DKIM key a domain signs with: its selector, and the Secret and the key in it that hold that
/// selector's private key. The rendered config (selector, key file) and the StatefulSet (which Secret key
/// is projected to that file) are both made from this one value, so a private key can never be paired
/// with another key's selector: a rotation changes the selector, and with it the Secret key it reads.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SigningKey {
    pub selector: String,
    /// The Secret holding the private key.
    pub secret: String,
    /// The key in that Secret.
    pub secret_key: String,
}

impl SigningKey {
    /// The file of the key under [`DKIM_DIR`], as the StatefulSet's projected volume names it.
    pub fn file_name(&self, domain: &str) -> String {
        dkim_key_file_name(domain, &self.selector)
    }

    /// The file's path in the pod, as the config's `key_file` names it.
    pub fn file(&self, domain: &str) -> String {
        dkim_key_file(domain, &self.selector)
    }
}

/// The key a domain signs with now. A brought key: the spec's selector with the spec's Secret, both from
/// the one edit that set them. A generated key: the selector the operator promoted last (the spec's until
/// the first rotation) with that selector's own key in the generated Secret.
pub fn signing_key(d: &SendingDomain) -> SigningKey {
    match &d.spec.dkim.secret_ref {
        Some(r) => SigningKey {
            selector: d.spec.dkim.selector.clone(),
            secret: r.name.clone(),
            secret_key: DKIM_KEY.to_owned(),
        },
        None => {
            let selector = d
                .status
                .as_ref()
                .and_then(|s| s.active_selector.clone())
                .unwrap_or_else(|| d.spec.dkim.selector.clone());
            SigningKey {
                secret: dkim_secret_name(d),
                secret_key: dkim_private_key(&selector),
                selector,
            }
        }
    }
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
        assert_eq!(SMARTHOST_CA, format!("{SMARTHOST_CA_DIR}/ca.crt"));
        assert_eq!(STORE_PASSWORD, format!("{STORE_DIR}/password"));
        assert_eq!(STORE_CA, format!("{STORE_CA_DIR}/ca.crt"));
    }

    #[test]
    fn a_generated_key_is_the_promoted_selectors_own_key_once_there_is_one() {
        let mut d = SendingDomain::new("example", crate::fixtures::domain_spec());
        let key = |selector: &str| SigningKey {
            selector: selector.into(),
            secret: "example-dkim".into(),
            secret_key: format!("{selector}.pem"),
        };
        assert_eq!(signing_key(&d), key("herald1"));
        d.status = Some(crate::crd::SendingDomainStatus {
            active_selector: Some("herald1-20260101000000".into()),
            ..Default::default()
        });
        let k = signing_key(&d);
        assert_eq!(k, key("herald1-20260101000000"));
        assert_eq!(
            k.file("example.test"),
            "/etc/herald/dkim/example.test.herald1-20260101000000.pem"
        );
        assert_eq!(k.file(""), format!("{DKIM_DIR}/{}", k.file_name("")));
    }

    #[test]
    fn a_brought_key_is_the_specs_selector_with_the_specs_secret_whatever_the_status_says() {
        let mut d = SendingDomain::new("example", crate::fixtures::domain_spec());
        d.spec.dkim.secret_ref = Some(crate::crd::LocalRef {
            name: "mine".into(),
        });
        d.spec.dkim.selector = "s2".into();
        // The status still names the selector of before the edit.
        d.status = Some(crate::crd::SendingDomainStatus {
            active_selector: Some("s1".into()),
            ..Default::default()
        });
        assert_eq!(
            signing_key(&d),
            SigningKey {
                selector: "s2".into(),
                secret: "mine".into(),
                secret_key: "private.key".into(),
            }
        );
    }
}
