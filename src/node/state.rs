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
    /// Messages handed to the link that its peer has not answered yet: waiting, or on the wire
    /// (0 where the link does not count them).
    fn backlog(&self) -> usize {
        0
    }
}

/// The links to peers, registered by whoever runs them.
#[derive(Default)]
pub struct Peers {
    map: Mutex<BTreeMap<String, Arc<dyn PeerInbox>>>,
    /// Woken when a link's backlog shrank or it stopped taking messages.
    room: tokio::sync::Notify,
    /// Links a wait ran out on: stuck (the peer silent, its request not yet timed out). Writes
    /// do not wait for them again until they make room.
    stalled: Mutex<std::collections::BTreeSet<String>>,
}

impl Peers {
    /// Whether every link that takes messages has at most `max` unanswered, leaving out the
    /// links a wait ran out on.
    pub fn caught_up(&self, max: usize) -> bool {
        let stalled = self.stalled();
        self.lock()
            .iter()
            .all(|(p, i)| !i.accepting() || i.backlog() <= max || stalled.contains(p))
    }

    /// Called by the link to `peer` when its backlog shrank or it stopped taking messages.
    pub fn room_made(&self, peer: &str) {
        self.stalled().remove(peer);
        self.room.notify_waiters();
    }

    /// Waits until [`Peers::caught_up`] with `max`, or for `at_most`; true when caught up.
    /// Pacing only: a write that waited the whole time goes ahead like any other. The links
    /// still behind then count as stalled, and no write waits for them again until they make
    /// room: a peer gone silent costs the writes of that moment `at_most` once, not every write
    /// until its request times out, whatever the other links do.
    pub async fn wait_for_room(&self, max: usize, at_most: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + at_most;
        loop {
            // Registered before the check, so that a wake-up between the two is not lost.
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.caught_up(max) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let behind: Vec<String> = self
                    .lock()
                    .iter()
                    .filter(|(_, i)| i.accepting() && i.backlog() > max)
                    .map(|(p, _)| p.clone())
                    .collect();
                let caught_up = behind.is_empty();
                self.stalled().extend(behind);
                return caught_up;
            }
        }
    }

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
    fn stalled(&self) -> MutexGuard<'_, std::collections::BTreeSet<String>> {
        self.stalled.lock().unwrap_or_else(|p| p.into_inner())
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    struct Link {
        accepting: AtomicBool,
        backlog: AtomicUsize,
    }

    impl PeerInbox for Link {
        fn accepting(&self) -> bool {
            self.accepting.load(Ordering::SeqCst)
        }
        fn deliver(&self, _work: LinkWork) {}
        fn backlog(&self) -> usize {
            self.backlog.load(Ordering::SeqCst)
        }
    }

    /// A write's wait, running.
    fn spawn_wait(p: &Arc<Peers>, cap: Duration) -> tokio::task::JoinHandle<bool> {
        let p = p.clone();
        tokio::spawn(async move { p.wait_for_room(256, cap).await })
    }

    fn peers(backlog: usize, accepting: bool) -> (Arc<Peers>, Arc<Link>) {
        let peers = Arc::new(Peers::default());
        let link = Arc::new(Link {
            accepting: AtomicBool::new(accepting),
            backlog: AtomicUsize::new(backlog),
        });
        peers.register("b", link.clone());
        (peers, link)
    }

    /// Promise: a write waits while a link that takes messages is over the bound, goes on as
    /// soon as the link says it caught up, and never waits past the cap; a link that takes no
    /// messages (its peer down or failing) is not waited for.
    #[tokio::test(start_paused = true)]
    async fn writes_wait_for_a_link_that_is_behind_and_no_longer_than_the_cap() {
        let cap = Duration::from_millis(100);
        let (p, link) = peers(300, true);
        assert!(!p.caught_up(256));
        let waiting = spawn_wait(&p, cap);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "went ahead while the link was behind"
        );
        link.backlog.store(10, Ordering::SeqCst);
        p.room_made("b");
        let t = tokio::time::Instant::now();
        assert!(waiting.await.expect("joined"), "caught up");
        assert_eq!(t.elapsed(), Duration::ZERO, "woken at once by the link");

        // A link that never catches up costs the cap, then the write goes on; the writes after
        // it do not wait, until the link makes room again.
        let (p, link) = peers(300, true);
        let t = tokio::time::Instant::now();
        assert!(!p.wait_for_room(256, cap).await);
        assert_eq!(t.elapsed(), cap);
        assert!(
            p.wait_for_room(256, cap).await,
            "the stuck link is left out"
        );
        assert_eq!(t.elapsed(), cap, "waited again for a stuck link");
        link.backlog.store(290, Ordering::SeqCst);
        p.room_made("b");
        let t = tokio::time::Instant::now();
        assert!(!p.wait_for_room(256, cap).await);
        assert_eq!(
            t.elapsed(),
            cap,
            "a link that made room is waited for again"
        );

        // A link that takes no messages is not waited for, however far behind.
        let (p, _link) = peers(100_000, false);
        assert!(p.caught_up(256));
        let t = tokio::time::Instant::now();
        assert!(p.wait_for_room(256, cap).await);
        assert_eq!(t.elapsed(), Duration::ZERO);

        // Nor one that stops taking messages while the write waits.
        let (p, link) = peers(300, true);
        let waiting = spawn_wait(&p, cap);
        tokio::time::sleep(Duration::from_millis(10)).await;
        link.accepting.store(false, Ordering::SeqCst);
        p.room_made("b");
        assert!(waiting.await.expect("joined"));

        // A stuck link stays out of the reckoning while another link keeps making room.
        let (p, _stuck) = peers(300, true);
        let busy = Arc::new(Link {
            accepting: AtomicBool::new(true),
            backlog: AtomicUsize::new(0),
        });
        p.register("c", busy.clone());
        let t = tokio::time::Instant::now();
        assert!(!p.wait_for_room(256, cap).await);
        assert_eq!(t.elapsed(), cap);
        p.room_made("c");
        assert!(p.wait_for_room(256, cap).await);
        assert_eq!(t.elapsed(), cap, "waited again for the stuck link");
        busy.backlog.store(300, Ordering::SeqCst);
        let waiting = spawn_wait(&p, cap);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            !waiting.is_finished(),
            "the link that makes room is still waited for"
        );
        busy.backlog.store(0, Ordering::SeqCst);
        p.room_made("c");
        assert!(waiting.await.expect("joined"));
    }
}
