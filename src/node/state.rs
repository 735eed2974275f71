//! Layer: node (imports core, store, net).
//!
//! What the driver publishes after each commit, for everything else to read: the replication
//! digest, the member list, the typed settings and the change feed. Only the driver writes them,
//! and only after the commit that made them true; nothing published can be taken back by a crash.
//!
//! Also the seam between the driver and the links to peers ([`Peers`]): the driver hands each
//! peer's link its pushes through [`PeerInbox`], implemented by the cluster's replicators in
//! production and by the simulator's links in tests, so the driver knows neither.

use super::events::ChangeEvent;
use crate::core::digest::Digest;
use crate::core::link::Ready;
use crate::core::members::Member;
use crdt_schema::typed::{Security, Settings};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{broadcast, watch};

/// Change events buffered per subscriber; a slower subscriber gets `Lagged` and should re-list.
pub const EVENTS_MAX: usize = 4096;

/// Work the driver hands a peer's link.
#[derive(Debug)]
pub enum LinkWork {
    /// Messages made for it: pushes of local writes, and what its answers called for.
    Ready(Vec<Ready>),
    /// Documents whose messages are still to be made (it was not taking messages).
    Dirty(Vec<String>),
}

/// A peer's link as the driver sees it.
pub trait PeerInbox: Send + Sync {
    /// Whether it takes ready messages now (else the driver lists documents instead).
    fn accepting(&self) -> bool;
    fn deliver(&self, work: LinkWork);
}

/// The links to peers, registered by whoever runs them.
#[derive(Default)]
pub struct Peers {
    map: Mutex<BTreeMap<String, Arc<dyn PeerInbox>>>,
}

impl Peers {
    pub fn register(&self, peer: &str, inbox: Arc<dyn PeerInbox>) {
        self.lock().insert(peer.to_string(), inbox);
    }
    pub fn unregister(&self, peer: &str) {
        self.lock().remove(peer);
    }
    pub fn snapshot(&self) -> Vec<(String, Arc<dyn PeerInbox>)> {
        self.lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Arc<dyn PeerInbox>>> {
        // A panic while holding this lock left a map, which is still a map.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The node's published state. Cheap to share; read by any layer above the node.
pub struct Published {
    digest: Mutex<Digest>,
    pub members: watch::Sender<Vec<Member>>,
    pub settings: watch::Sender<Arc<Settings>>,
    pub security: watch::Sender<Arc<Security>>,
    pub events: broadcast::Sender<ChangeEvent>,
    pub peers: Peers,
    pub metrics: super::metrics::NodeMetrics,
    /// Whether the disk takes writes (the driver decides, before each batch and after a
    /// failed commit).
    pub storage: watch::Sender<super::disk::Storage>,
}

impl Published {
    pub fn new(
        digest: Digest,
        members: Vec<Member>,
        settings: Settings,
        security: Security,
    ) -> Self {
        Published {
            digest: Mutex::new(digest),
            members: watch::Sender::new(members),
            settings: watch::Sender::new(Arc::new(settings)),
            security: watch::Sender::new(Arc::new(security)),
            events: broadcast::channel(EVENTS_MAX).0,
            peers: Peers::default(),
            metrics: Default::default(),
            storage: watch::Sender::new(super::disk::Storage::Ok),
        }
    }

    /// The digest of what is committed. Held briefly: the driver updates it after each commit.
    pub fn digest(&self) -> MutexGuard<'_, Digest> {
        self.digest.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn settings(&self) -> Arc<Settings> {
        self.settings.borrow().clone()
    }

    pub fn security(&self) -> Arc<Security> {
        self.security.borrow().clone()
    }

    pub fn storage(&self) -> super::disk::Storage {
        *self.storage.borrow()
    }

    pub fn members(&self) -> Vec<Member> {
        self.members.borrow().clone()
    }
}
