//! Which namespaces the operator serves, and one watch over them that a single cache can take.
//!
//! Cluster-wide (the default) each kind is one watch of `Api::all`, which needs list and watch on it in
//! every namespace (a ClusterRole). Given namespaces (`--watch-namespace`), each kind is one watch per
//! namespace, so that a Role in each of them is enough, and [`Union`] folds their events into the events of
//! one watch over all of them: a kube reflector takes one stream, and its cache is replaced by each listing
//! (`Init` .. `InitDone`), so passing each namespace's listing through would leave the cache holding the
//! last namespace listed only.
//!
//! [`Union`] is pure (events in, events out) and unit-tested; [`Scope::watch`] wires it to the watches.

use std::collections::BTreeMap;
use std::fmt::Debug;

use futures::stream::{self, BoxStream};
use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::NamespaceResourceScope;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

/// The namespaces the operator serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every namespace.
    Cluster,
    /// Only these (sorted, without repeats).
    Namespaces(Vec<String>),
}

impl Scope {
    /// No namespaces named means the whole cluster.
    pub fn new(namespaces: &[String]) -> Scope {
        let mut ns: Vec<String> = namespaces
            .iter()
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .collect();
        ns.sort();
        ns.dedup();
        if ns.is_empty() {
            Scope::Cluster
        } else {
            Scope::Namespaces(ns)
        }
    }

    /// The events of one watch of kind `K` over the scope, `managedFields` dropped (nothing in the operator
    /// reads them, and they are a large part of each object), each namespace's watch backed off on its own.
    pub fn watch<K>(
        &self,
        client: &Client,
        config: watcher::Config,
    ) -> BoxStream<'static, Result<Event<K>, watcher::Error>>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + Debug
            + Send
            + Sync
            + 'static,
    {
        // A watch that keeps failing (a Role missing in one namespace: 403) keeps the caches from ever
        // being filled, and with them every reconcile: say so at warn, not only in the controllers' debug
        // lines.
        fn one<K>(
            api: Api<K>,
            config: watcher::Config,
            namespace: Option<String>,
        ) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static
        where
            K: Resource<DynamicType = ()>
                + Clone
                + DeserializeOwned
                + Debug
                + Send
                + Sync
                + 'static,
        {
            watcher(api, config)
                .modify(|o| o.meta_mut().managed_fields = None)
                .inspect_err(move |e| {
                    let namespace = namespace.as_deref().unwrap_or("(all)");
                    tracing::warn!(kind = %K::kind(&()), namespace, error = %e, "watch failed; retrying with backoff");
                })
                .default_backoff()
        }
        match self {
            Scope::Cluster => one(Api::all(client.clone()), config, None).boxed(),
            Scope::Namespaces(namespaces) => {
                let watches = namespaces.iter().enumerate().map(|(i, ns)| {
                    one(
                        Api::namespaced(client.clone(), ns),
                        config.clone(),
                        Some(ns.clone()),
                    )
                    .map(move |e| (i, e))
                    .boxed()
                });
                let mut union = Union::new(namespaces.len());
                stream::select_all(watches)
                    .flat_map(move |(i, event)| {
                        let out: Vec<Result<Event<K>, watcher::Error>> = match event {
                            Ok(e) => union.observe(i, e).into_iter().map(Ok).collect(),
                            Err(e) => vec![Err(e)],
                        };
                        stream::iter(out)
                    })
                    .boxed()
            }
        }
    }
}

/// The events of several namespaces' watches as the events of one watch over all of them.
///
/// Nothing comes out until every namespace has been listed once; then one listing of the union (`Init`,
/// an `InitApply` per object, `InitDone`). After that, `Apply` and `Delete` pass through, and a namespace
/// listed again (its watch restarted) is another listing of the union, so that what was deleted meanwhile
/// leaves the cache.
#[derive(Debug)]
pub struct Union<K> {
    /// Per namespace: its objects by name, as last seen.
    known: Vec<BTreeMap<String, K>>,
    /// Per namespace: the objects of a listing in progress.
    listing: Vec<Option<BTreeMap<String, K>>>,
    /// Per namespace: whether it has been listed once.
    listed: Vec<bool>,
}

impl<K: Resource + Clone> Union<K> {
    pub fn new(namespaces: usize) -> Union<K> {
        Union {
            known: (0..namespaces).map(|_| BTreeMap::new()).collect(),
            listing: (0..namespaces).map(|_| None).collect(),
            listed: vec![false; namespaces],
        }
    }

    /// What the union's watch says after namespace `ns`'s watch said `event`.
    pub fn observe(&mut self, ns: usize, event: Event<K>) -> Vec<Event<K>> {
        let all_listed = self.listed.iter().all(|l| *l);
        match event {
            Event::Init => {
                self.listing[ns] = Some(BTreeMap::new());
                Vec::new()
            }
            Event::InitApply(o) => match &mut self.listing[ns] {
                Some(listing) => {
                    listing.insert(o.name_any(), o);
                    Vec::new()
                }
                // Not inside a listing (a watcher never does this): an ordinary change.
                None => self.observe(ns, Event::Apply(o)),
            },
            Event::InitDone => {
                if let Some(listing) = self.listing[ns].take() {
                    self.known[ns] = listing;
                }
                self.listed[ns] = true;
                if self.listed.iter().all(|l| *l) {
                    self.relist()
                } else {
                    Vec::new()
                }
            }
            Event::Apply(o) => {
                self.known[ns].insert(o.name_any(), o.clone());
                if all_listed {
                    vec![Event::Apply(o)]
                } else {
                    Vec::new()
                }
            }
            Event::Delete(o) => {
                self.known[ns].remove(&o.name_any());
                if all_listed {
                    vec![Event::Delete(o)]
                } else {
                    Vec::new()
                }
            }
        }
    }

    fn relist(&self) -> Vec<Event<K>> {
        let mut out = vec![Event::Init];
        out.extend(
            self.known
                .iter()
                .flat_map(|objects| objects.values().cloned().map(Event::InitApply)),
        );
        out.push(Event::InitDone);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{IpPool, IpPoolSpec};

    fn pool(ns: &str, name: &str) -> IpPool {
        let mut p = IpPool::new(
            name,
            IpPoolSpec {
                addresses: vec![],
                warmup: vec![],
                warmup_preset: None,
            },
        );
        p.metadata.namespace = Some(ns.into());
        p
    }

    /// The events as `kind ns/name`, to compare.
    fn said(events: &[Event<IpPool>]) -> Vec<String> {
        let id = |o: &IpPool| format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any());
        events
            .iter()
            .map(|e| match e {
                Event::Init => "Init".to_owned(),
                Event::InitApply(o) => format!("InitApply {}", id(o)),
                Event::InitDone => "InitDone".to_owned(),
                Event::Apply(o) => format!("Apply {}", id(o)),
                Event::Delete(o) => format!("Delete {}", id(o)),
            })
            .collect()
    }

    fn listing(u: &mut Union<IpPool>, ns: usize, objects: &[IpPool]) -> Vec<String> {
        let mut out = u.observe(ns, Event::Init);
        for o in objects {
            out.extend(u.observe(ns, Event::InitApply(o.clone())));
        }
        out.extend(u.observe(ns, Event::InitDone));
        said(&out)
    }

    #[test]
    fn no_names_is_the_whole_cluster_and_names_are_sorted_once() {
        assert_eq!(Scope::new(&[]), Scope::Cluster);
        assert_eq!(Scope::new(&[" ".into()]), Scope::Cluster);
        assert_eq!(
            Scope::new(&["b".into(), "a".into(), "b".into()]),
            Scope::Namespaces(vec!["a".into(), "b".into()])
        );
    }

    #[test]
    fn the_first_listing_is_one_listing_of_every_namespace_once_all_are_listed() {
        let mut u = Union::new(2);
        assert!(listing(&mut u, 1, &[pool("b", "p2")]).is_empty());
        // A change in a listed namespace before the other is listed is held, not lost.
        assert!(u.observe(1, Event::Apply(pool("b", "p3"))).is_empty());
        assert_eq!(
            listing(&mut u, 0, &[pool("a", "p1")]),
            [
                "Init",
                "InitApply a/p1",
                "InitApply b/p2",
                "InitApply b/p3",
                "InitDone"
            ]
        );
    }

    #[test]
    fn changes_pass_through_once_every_namespace_is_listed() {
        let mut u = Union::new(2);
        listing(&mut u, 0, &[pool("a", "p1")]);
        listing(&mut u, 1, &[]);
        assert_eq!(
            said(&u.observe(1, Event::Apply(pool("b", "p2")))),
            ["Apply b/p2"]
        );
        assert_eq!(
            said(&u.observe(0, Event::Delete(pool("a", "p1")))),
            ["Delete a/p1"]
        );
    }

    #[test]
    fn a_namespace_listed_again_relists_the_union_without_what_it_lost() {
        let mut u = Union::new(2);
        listing(&mut u, 0, &[pool("a", "p1"), pool("a", "gone")]);
        listing(&mut u, 1, &[pool("b", "p2")]);
        // Namespace a's watch restarts; "gone" was deleted while it was down.
        assert_eq!(
            listing(&mut u, 0, &[pool("a", "p1")]),
            ["Init", "InitApply a/p1", "InitApply b/p2", "InitDone"]
        );
    }

    #[test]
    fn the_union_fills_one_reflector_with_every_namespace() {
        use kube::runtime::reflector;
        let (store, mut writer) = reflector::store::<IpPool>();
        let mut u = Union::new(2);
        let mut feed = |ns, e| {
            for out in u.observe(ns, e) {
                writer.apply_watcher_event(&out);
            }
        };
        for (ns, name) in [(0, "a"), (1, "b")] {
            feed(ns, Event::Init);
            feed(ns, Event::InitApply(pool(name, "p")));
            feed(ns, Event::InitDone);
        }
        assert_eq!(store.state().len(), 2);
        // A relist of one namespace leaves the other's objects in the cache.
        feed(1, Event::Init);
        feed(1, Event::InitDone);
        let left: Vec<String> = store
            .state()
            .iter()
            .map(|p| p.namespace().unwrap())
            .collect();
        assert_eq!(left, ["a"]);
    }
}
