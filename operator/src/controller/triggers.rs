//! What SendingDomain and IpPool watch events mean for the relays: which SmtpRelay has to render its config
//! again, and which domains are gone; and what SmtpRelay events mean for the domains ([`route_view`]).
//!
//! A relay's config and StatefulSet depend on a little of each of its domains (the spec, and the selector
//! that signs now) and on the spec of the pools they use, not on the records and conditions that the other
//! controllers write to status whenever DNS changes. Re-rendering on every domain event made a relay with
//! 1,000 domains render its whole config on every status write of any of them. [`Changes`] remembers, per
//! object, a small view of what the relays read, and reports an object only when that view changed; the
//! relay controller's debounce then folds a burst of such changes (a thousand domains applied at once) into
//! one render.
//!
//! Pure: watch events in, what they imply out, so the decisions are unit-tested.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};

use kube::runtime::reflector::{Lookup, ObjectRef};
use kube::runtime::watcher::Event;

use crate::crd::{IpPool, SendingDomain, SmtpRelay};
use crate::layout::signing_key;

/// One object whose view changed: what it was and what it is (`None`: not there).
#[derive(Debug, Clone, PartialEq)]
pub struct Change<K: Lookup<DynamicType = ()>, V> {
    pub object: ObjectRef<K>,
    pub before: Option<V>,
    pub after: Option<V>,
}

/// Per-object memory of a view, fed with every watch event of a kind; reports the objects whose view
/// changed, appeared or went.
#[derive(Debug)]
pub struct Changes<K: Lookup<DynamicType = ()>, V> {
    view: fn(&K) -> V,
    seen: HashMap<ObjectRef<K>, V>,
    /// Between `Init` and `InitDone`: a new listing after the watch (re)started.
    relist: Option<Relist<K, V>>,
}

/// A listing in progress: the objects listed so far, and the changes to report once it is complete. The
/// shared cache swaps in the new listing only at `InitDone`, so a relay rendered earlier would still see
/// the old one.
#[derive(Debug)]
struct Relist<K: Lookup<DynamicType = ()>, V> {
    listed: HashSet<ObjectRef<K>>,
    changes: Vec<Change<K, V>>,
}

impl<K, V> Changes<K, V>
where
    K: Lookup<DynamicType = ()> + Clone,
    V: PartialEq + Clone,
{
    pub fn new(view: fn(&K) -> V) -> Self {
        Changes {
            view,
            seen: HashMap::new(),
            relist: None,
        }
    }

    pub fn observe(&mut self, event: &Event<K>) -> Vec<Change<K, V>> {
        let mut out = Vec::new();
        match event {
            Event::Init => {
                self.relist = Some(Relist {
                    listed: HashSet::new(),
                    changes: Vec::new(),
                })
            }
            Event::InitApply(obj) => {
                let change = self.applied(obj);
                match &mut self.relist {
                    Some(relist) => {
                        relist.listed.insert(ObjectRef::from_obj(obj));
                        relist.changes.extend(change);
                    }
                    None => out.extend(change),
                }
            }
            Event::InitDone => {
                if let Some(Relist { listed, changes }) = self.relist.take() {
                    out = changes;
                    // Deleted while the watch was down: no Delete event ever comes for these.
                    let missing: Vec<ObjectRef<K>> = self
                        .seen
                        .keys()
                        .filter(|k| !listed.contains(*k))
                        .cloned()
                        .collect();
                    out.extend(missing.into_iter().filter_map(|k| self.gone(k)));
                }
            }
            Event::Apply(obj) => out.extend(self.applied(obj)),
            Event::Delete(obj) => out.extend(self.gone(ObjectRef::from_obj(obj))),
        }
        out
    }

    fn applied(&mut self, obj: &K) -> Option<Change<K, V>> {
        let object = ObjectRef::from_obj(obj);
        let after = (self.view)(obj);
        let before = self.seen.insert(object.clone(), after.clone());
        (before.as_ref() != Some(&after)).then_some(Change {
            object,
            before,
            after: Some(after),
        })
    }

    fn gone(&mut self, object: ObjectRef<K>) -> Option<Change<K, V>> {
        let before = self.seen.remove(&object)?;
        Some(Change {
            object,
            before: Some(before),
            after: None,
        })
    }
}

/// What a relay reads of a domain: which relay it names, and a hash of the rest.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainView {
    pub relay: Option<ObjectRef<SmtpRelay>>,
    hash: u64,
}

/// The view of a SendingDomain: its relay, its spec and the key it signs with. The whole spec rather than
/// the fields rendered today, so a field the rendering starts to read later cannot be missed; specs change
/// rarely, so this costs a render now and then, not one per status write.
pub fn domain_view(sd: &SendingDomain) -> DomainView {
    let mut h = DefaultHasher::new();
    serde_json::to_vec(&sd.spec)
        .unwrap_or_default()
        .hash(&mut h);
    signing_key(sd).hash(&mut h);
    DomainView {
        relay: sd
            .metadata
            .namespace
            .as_deref()
            .map(|ns| ObjectRef::new(&sd.spec.relay_ref.name).within(ns)),
        hash: h.finish(),
    }
}

/// What a SendingDomain reads of its relay for the return-path MX and `ReturnPathRoutable`: the public
/// name, the inbound Service asked for and the addresses its load balancer got. A relay's status changes
/// (ready replicas, the config hash) are no change to it, so its domains are not re-checked for those.
pub fn route_view(relay: &SmtpRelay) -> u64 {
    let mut h = DefaultHasher::new();
    serde_json::to_vec(&(
        &relay.spec.hostname,
        &relay.spec.inbound_service,
        relay.status.as_ref().map(|s| &s.inbound),
    ))
    .unwrap_or_default()
    .hash(&mut h);
    h.finish()
}

/// The view of an IpPool: a hash of its spec (its addresses and EHLO names go into the config).
pub fn pool_view(pool: &IpPool) -> u64 {
    let mut h = DefaultHasher::new();
    serde_json::to_vec(&pool.spec)
        .unwrap_or_default()
        .hash(&mut h);
    h.finish()
}

/// The relays to render again after these domain changes: a domain's relay, and the one it left when it
/// moved.
pub fn relays_of(changes: &[Change<SendingDomain, DomainView>]) -> Vec<ObjectRef<SmtpRelay>> {
    let mut out = Vec::new();
    for c in changes {
        for view in [&c.before, &c.after].into_iter().flatten() {
            if let Some(r) = &view.relay
                && !out.contains(r)
            {
                out.push(r.clone());
            }
        }
    }
    out
}

/// The domains these changes removed.
pub fn gone(changes: &[Change<SendingDomain, DomainView>]) -> Vec<ObjectRef<SendingDomain>> {
    changes
        .iter()
        .filter(|c| c.after.is_none())
        .map(|c| c.object.clone())
        .collect()
}

/// The Secrets in its own namespace a relay's config and objects are made from: a change to any of them
/// (a rotated password, a new store URL, a Secret created after the relay that named it) renders the relay
/// again at once, not at its periodic resync.
pub fn secret_names(relay: &SmtpRelay) -> Vec<&str> {
    let spec = &relay.spec;
    let mut names: Vec<&str> = spec
        .users
        .iter()
        .map(|u| u.password_secret_ref.name.as_str())
        .collect();
    names.extend(spec.tls_secret_ref.as_ref().map(|r| r.name.as_str()));
    if let Some(s) = &spec.delivery.smarthost {
        names.extend(s.credentials_secret_ref.as_ref().map(|r| r.name.as_str()));
        names.extend(s.ca_secret_ref.as_ref().map(|r| r.name.as_str()));
    }
    if let Some(s) = &spec.store {
        names.extend(s.password_secret_ref.as_ref().map(|r| r.name.as_str()));
        names.extend(s.secret_ref.as_ref().map(|r| r.name.as_str()));
        names.extend(s.ca_secret_ref.as_ref().map(|r| r.name.as_str()));
    }
    names.sort_unstable();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{DnsRecord, RecordPurpose, RecordState, SendingDomainStatus};

    fn domain(name: &str, relay: &str) -> SendingDomain {
        let mut d = SendingDomain::new(name, crate::fixtures::domain_spec());
        d.metadata.namespace = Some("mail".into());
        d.spec.relay_ref.name = relay.into();
        d
    }

    fn relay(name: &str) -> ObjectRef<SmtpRelay> {
        ObjectRef::new(name).within("mail")
    }

    fn domains() -> Changes<SendingDomain, DomainView> {
        Changes::new(domain_view)
    }

    fn listed<K: Lookup<DynamicType = ()> + Clone, V: PartialEq + Clone>(
        changes: &mut Changes<K, V>,
        objects: &[K],
    ) -> Vec<Change<K, V>> {
        assert!(changes.observe(&Event::Init).is_empty());
        for o in objects {
            assert!(
                changes.observe(&Event::InitApply(o.clone())).is_empty(),
                "nothing is reported before the listing is complete"
            );
        }
        changes.observe(&Event::InitDone)
    }

    #[test]
    fn the_first_listing_names_each_relay_once_when_it_is_complete() {
        let mut e = domains();
        let all: Vec<SendingDomain> = (0..1000)
            .map(|i| domain(&format!("d{i}"), if i % 2 == 0 { "a" } else { "b" }))
            .collect();
        let c = listed(&mut e, &all);
        assert_eq!(relays_of(&c), vec![relay("a"), relay("b")]);
        assert!(gone(&c).is_empty());
    }

    #[test]
    fn status_writes_of_records_and_conditions_render_nothing() {
        let mut e = domains();
        let d = domain("example", "relay");
        listed(&mut e, std::slice::from_ref(&d));
        let mut written = d.clone();
        written.status = Some(SendingDomainStatus {
            records: vec![DnsRecord {
                name: "herald1._domainkey.example.test".into(),
                record_type: "TXT".into(),
                value: "\"v=DKIM1\"".into(),
                purpose: RecordPurpose::Dkim,
                state: RecordState::Missing,
                observed: None,
                nameserver: None,
            }],
            // The spec's selector written down as the active one changes nothing the relay reads.
            active_selector: Some("herald1".into()),
            ..SendingDomainStatus::default()
        });
        written.metadata.resource_version = Some("2".into());
        assert!(e.observe(&Event::Apply(written.clone())).is_empty());
        if let Some(s) = written.status.as_mut() {
            s.records[0].state = RecordState::Published;
        }
        assert!(e.observe(&Event::Apply(written)).is_empty());
    }

    #[test]
    fn a_promoted_selector_or_a_spec_edit_renders_the_relay() {
        let mut e = domains();
        let d = domain("example", "relay");
        listed(&mut e, std::slice::from_ref(&d));
        let mut promoted = d.clone();
        promoted.status = Some(SendingDomainStatus {
            active_selector: Some("herald1-20260101000000".into()),
            ..SendingDomainStatus::default()
        });
        let c = e.observe(&Event::Apply(promoted.clone()));
        assert_eq!(relays_of(&c), vec![relay("relay")]);
        let mut edited = promoted;
        edited.spec.return_path = "mail".into();
        let c = e.observe(&Event::Apply(edited));
        assert_eq!(relays_of(&c), vec![relay("relay")]);
    }

    #[test]
    fn a_domain_moving_to_another_relay_renders_both() {
        let mut e = domains();
        listed(&mut e, &[domain("example", "a")]);
        let c = e.observe(&Event::Apply(domain("example", "b")));
        assert_eq!(relays_of(&c), vec![relay("a"), relay("b")]);
    }

    #[test]
    fn a_deleted_domain_renders_its_relay_and_is_gone() {
        let mut e = domains();
        let d = domain("example", "relay");
        listed(&mut e, std::slice::from_ref(&d));
        let c = e.observe(&Event::Delete(d));
        assert_eq!(relays_of(&c), vec![relay("relay")]);
        assert_eq!(
            gone(&c),
            vec![ObjectRef::<SendingDomain>::new("example").within("mail")]
        );
        // A domain created afterwards is new again.
        let c = e.observe(&Event::Apply(domain("other", "relay")));
        assert_eq!(relays_of(&c), vec![relay("relay")]);
        assert!(gone(&c).is_empty());
    }

    #[test]
    fn a_domain_deleted_while_the_watch_was_down_is_found_by_the_next_listing() {
        let mut e = domains();
        listed(&mut e, &[domain("kept", "a"), domain("deleted", "b")]);
        let c = listed(&mut e, &[domain("kept", "a")]);
        assert_eq!(
            relays_of(&c),
            vec![relay("b")],
            "unchanged domains render nothing"
        );
        assert_eq!(
            gone(&c),
            vec![ObjectRef::<SendingDomain>::new("deleted").within("mail")]
        );
    }

    #[test]
    fn a_pool_is_reported_when_its_spec_changes_not_its_status() {
        let mut e = Changes::new(pool_view);
        let mut p = crate::fixtures::pool();
        p.metadata.namespace = Some("mail".into());
        assert_eq!(listed(&mut e, std::slice::from_ref(&p)).len(), 1);
        let mut status = p.clone();
        status.status = Some(crate::crd::IpPoolStatus {
            address_count: 1,
            ..Default::default()
        });
        assert!(e.observe(&Event::Apply(status.clone())).is_empty());
        status.spec.addresses[0].ehlo = "mta2.example.test".into();
        let c = e.observe(&Event::Apply(status.clone()));
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].object, ObjectRef::new("pool").within("mail"));
        let c = e.observe(&Event::Delete(status));
        assert_eq!(c[0].after, None);
    }

    #[test]
    fn a_relay_is_made_from_the_secrets_its_spec_names_and_no_others() {
        let mut r = crate::fixtures::relay();
        assert_eq!(secret_names(&r), ["relay-tls"]);
        r.spec.users = serde_json::from_value(serde_json::json!([
            {"name": "a", "passwordSecretRef": {"name": "app-password"}},
            {"name": "b", "passwordSecretRef": {"name": "app-password", "key": "other"}},
        ]))
        .unwrap();
        r.spec.store = Some(
            serde_json::from_value(serde_json::json!({
                "secretRef": {"name": "cache-url"}, "caSecretRef": {"name": "cache-ca"}
            }))
            .unwrap(),
        );
        r.spec.delivery.smarthost = Some(
            serde_json::from_value(serde_json::json!({
                "host": "smtp.example.test", "tls": "starttls",
                "credentialsSecretRef": {"name": "upstream"}, "caSecretRef": {"name": "upstream-ca"}
            }))
            .unwrap(),
        );
        assert_eq!(
            secret_names(&r),
            [
                "app-password",
                "cache-ca",
                "cache-url",
                "relay-tls",
                "upstream",
                "upstream-ca"
            ]
        );
    }
}
