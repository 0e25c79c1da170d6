//! Resources the unit tests share: a relay and a sending domain in their plainest form, which each test
//! adjusts to what it is about.

use crate::crd::*;

/// example.test sent through relay `relay`: default DKIM, return path `bounces`, no DMARC, no pool.
pub fn domain_spec() -> SendingDomainSpec {
    SendingDomainSpec {
        domain: "example.test".into(),
        relay_ref: LocalRef {
            name: "relay".into(),
        },
        dkim: DkimSpec::default(),
        return_path: "bounces".into(),
        dmarc: None,
        ip_pool_ref: None,
        publish_with_external_dns: false,
    }
}

/// SmtpRelay `relay` in namespace `mail`: 3 replicas, submission on 587 (STARTTLS + AUTH), TLS from
/// `relay-tls`, default delivery.
pub fn relay() -> SmtpRelay {
    let mut r = SmtpRelay::new(
        "relay",
        SmtpRelaySpec {
            replicas: 3,
            image: "herald/relay:test".into(),
            hostname: None,
            listeners: vec![ListenerSpec {
                name: "submission".into(),
                port: 587,
                tls: ListenerTls::Starttls,
                auth: ListenerAuth::Required,
                allow_networks: vec![],
                allow_namespaces: None,
                trusted_senders: None,
            }],
            tls_secret_ref: Some(LocalRef {
                name: "relay-tls".into(),
            }),
            users: vec![],
            delivery: DeliverySpec::default(),
            storage: StorageSpec::default(),
            resources: None,
            metrics: MetricsSpec::default(),
            shutdown: ShutdownSpec::default(),
            suppression: Default::default(),
            inbound_service: None,
            store: None,
        },
    );
    r.metadata.namespace = Some("mail".into());
    r.metadata.uid = Some("1234".into());
    r
}

/// IpPool `pool`: one address, 192.0.2.10 saying `mta1.example.test`, no warm-up.
pub fn pool() -> IpPool {
    IpPool::new(
        "pool",
        IpPoolSpec {
            addresses: vec![PoolAddress {
                address: "192.0.2.10".into(),
                ehlo: "mta1.example.test".into(),
                weight: 1,
                warmup_start: None,
            }],
            warmup: vec![],
            warmup_preset: None,
        },
    )
}
