//! Layer: sim (feature `sim`; imports core, store, node).
//!
//! A deterministic simulator of a peerconf cluster. Each simulated node is the production code
//! minus its sockets and threads:
//! - its store is a real [`Store`] on a [`SimDisk`], so a commit is durable only once its log
//!   record (or a redb sync) is, and a crash reopens the store through the log's real recovery
//!   rule;
//! - its writes, peers' requests and replication jobs are [`Cmd`]s run by the real [`Driver`] in
//!   batches (`Driver::step`, as the driver thread runs them), so push-before-commit, answers
//!   after commit and group commit are what run;
//! - each peer link is the core's [`PeerLink`], fed by a loop that does what
//!   `cluster::replicator` does with sockets; digest requests are answered by the core's
//!   responder ([`repl::answer_digest`]) as the IPC server answers them.
//!
//! This module holds no replication decision of its own: it moves messages (dropping,
//! duplicating, delaying, cutting them as the scenario says), schedules events in virtual time,
//! crashes and restarts nodes, and checks the outcome. `tests/it/architecture.rs` holds it to
//! that.
//!
//! Every choice comes from a [`Source`]: a seeded generator (one seed is one scenario, replayed
//! exactly), or a fuzzer's bytes (`fuzzing::simulation`), so coverage guidance can steer the
//! schedule, the faults and the edits.

use crate::core::clock::Clock;
use crate::core::health::Cause;
use crate::core::link::{Claims, Ctx, Failure, Input, Output, PeerLink, Then, Token};
use crate::core::proto::{Request, Response};
use crate::core::repl;
use crate::node::driver::{Cmd, Driver, IngestDoc, SyncThen, BATCH_MAX};
use crate::node::state::{LinkWork, PeerInbox, Published};
use crate::node::Error as NodeError;
use crate::store::simdisk::SimDisk;
use crate::store::Store;
use automerge::ChangeHash;
use crdt_schema::doc::{self, EntityState};
use crdt_schema::testing::{random_body, Source};
use crdt_schema::{doc_id, Kind, WriteMode};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// How hostile a scenario's network is.
#[derive(Debug, Clone)]
pub struct Faults {
    pub drop_pct: usize,
    pub dup_pct: usize,
    pub delay_ms_max: u64,
    pub partitions: bool,
    pub crashes: bool,
    /// Chance (percent) that a batch holding local writes fails its commit and the node crashes
    /// right after: the writes' pushes have left, the node lost them (the driver pushes before
    /// it commits). Only with `crashes`.
    pub commit_crash_pct: usize,
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub seed: u64,
    pub nodes: usize,
    pub writes: usize,
    /// Virtual milliseconds of faulty operation before the network heals for good.
    pub duration_ms: u64,
    pub faults: Faults,
}

/// A seeded generator as a [`Source`].
pub struct Seeded(pub ChaCha8Rng);

impl Source for Seeded {
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            self.0.random_range(0..n)
        }
    }
}

fn range(src: &mut dyn Source, lo: u64, hi: u64) -> u64 {
    lo + src.below((hi - lo + 1) as usize) as u64
}

fn draw_u64(src: &mut dyn Source) -> u64 {
    (0..4).fold(0u64, |v, _| (v << 16) | src.below(1 << 16) as u64)
}

impl Scenario {
    /// A scenario drawn from a seed.
    pub fn from_seed(seed: u64) -> Scenario {
        Scenario::draw(&mut Seeded(ChaCha8Rng::seed_from_u64(seed)), seed)
    }

    /// A scenario drawn from any source of choices.
    pub fn draw(src: &mut dyn Source, seed: u64) -> Scenario {
        let nodes = range(src, 2, 4) as usize;
        let writes = range(src, 1, 30) as usize;
        let duration_ms = range(src, 500, 4000);
        let drop_pct = src.below(31);
        let dup_pct = src.below(11);
        let delay_ms_max = range(src, 1, 80);
        let partitions = src.chance(50);
        let crashes = src.chance(50);
        let commit_crash_pct = if crashes { src.below(21) } else { 0 };
        Scenario {
            seed,
            nodes,
            writes,
            duration_ms,
            faults: Faults {
                drop_pct,
                dup_pct,
                delay_ms_max,
                partitions,
                crashes,
                commit_crash_pct,
            },
        }
    }
}

/// What a finished scenario measured.
#[derive(Debug, Default)]
pub struct Report {
    pub virtual_ms_to_converge: u64,
    pub messages: u64,
    pub dropped: u64,
    pub crashes: u64,
    /// Driver batches run, and commits that made a log record durable or checkpointed.
    pub batches: u64,
    /// Local writes whose commit failed after their push left (their node then crashed).
    pub lost_before_commit: u64,
    /// Of those, the ones every node holds in the end (a peer had received the push).
    pub recovered: u64,
    pub acknowledged: usize,
    /// Replication cycles that completed, and exchanges that failed.
    pub cycles: u64,
    pub failures: u64,
}

/// Why a scenario failed. The seed in the scenario replays it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SimError {
    #[error("seed {seed}: no convergence {ms} virtual ms after the faults stopped (sync stalled)")]
    Stalled { seed: u64, ms: u64 },
    #[error("seed {seed}: {what}")]
    Diverged { seed: u64, what: String },
    #[error("seed {seed}: acknowledged change {hash} of {id} is missing on {node}")]
    Lost {
        seed: u64,
        id: String,
        hash: String,
        node: String,
    },
    #[error("seed {seed}: node {node} cannot reopen its store: {error}")]
    Reopen {
        seed: u64,
        node: String,
        error: String,
    },
}

/// A node's index: document ID to (entity JSON, heads hash).
type Rows = BTreeMap<String, (Vec<u8>, [u8; 32])>;

/// Replication timeout: an exchange unanswered for this long has failed.
const TIMEOUT_MS: u64 = 300;
/// The replication interval in the simulation (the link adds its jitter).
const CYCLE_MS: u64 = 200;
/// After the faults stop, the cluster must converge within this much virtual time.
const CONVERGE_MS_MAX: u64 = 30_000;
/// A small log, so full logs and checkpoints happen in most scenarios.
const LOG_BYTES: u64 = 48 * 4096;
/// Commands that arrive within this many virtual ms of each other share a driver batch.
const BATCH_WINDOW_MS: u64 = 2;

/// Virtual time, as the driver's clock.
struct SimClock(Arc<AtomicU64>);

impl Clock for SimClock {
    fn wall_ms(&self) -> i64 {
        1_800_000_000_000 + self.0.load(Ordering::Relaxed) as i64
    }
    fn mono_ms(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A link's mailbox, as the driver sees it.
#[derive(Default)]
struct Inbox {
    accepting: AtomicBool,
    work: Mutex<Vec<LinkWork>>,
}

impl PeerInbox for Inbox {
    fn accepting(&self) -> bool {
        self.accepting.load(Ordering::Relaxed)
    }
    fn deliver(&self, work: LinkWork) {
        self.work
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(work);
    }
}

/// A driver reply the simulator waits for.
enum Pending {
    Made {
        peer: usize,
        token: Token,
        rx: oneshot::Receiver<crate::core::link::Msgs>,
    },
    Applied {
        peer: usize,
        token: Token,
        rx: oneshot::Receiver<Result<crate::core::link::Msgs, NodeError>>,
    },
    Ingested {
        peer: usize,
        token: Token,
        rx: oneshot::Receiver<Result<usize, NodeError>>,
    },
    Served {
        from: usize,
        req_id: u64,
        rx: oneshot::Receiver<Response>,
    },
    Write {
        id: String,
        rx: oneshot::Receiver<Result<EntityState, NodeError>>,
    },
}

/// A node that is up: what a process holds.
struct Running {
    store: Arc<Store>,
    published: Arc<Published>,
    driver: Driver,
    links: Vec<Option<PeerLink>>,
    inboxes: Vec<Option<Arc<Inbox>>>,
    claims: Claims,
    cmds: VecDeque<Cmd>,
    driver_due: bool,
    pending: Vec<Pending>,
    /// Per peer: the request in flight (its network ID and the link's token).
    inflight: Vec<Option<(u64, Token)>>,
    /// Per peer: when its link's next tick is scheduled.
    tick_at: Vec<Option<u64>>,
    /// Per peer: the peer's incarnation when our connection to it was made; a request over a
    /// connection to an older incarnation fails (the connection was reset by its restart).
    conn: Vec<u32>,
}

struct SimNode {
    id: String,
    disk: SimDisk,
    incarnation: u32,
    run: Option<Running>,
}

enum Event {
    Write {
        node: usize,
    },
    RunDriver {
        node: usize,
        incarnation: u32,
    },
    LinkTick {
        node: usize,
        peer: usize,
        incarnation: u32,
    },
    Deliver {
        from: usize,
        to: usize,
        req_id: u64,
        req: Request,
        conn: u32,
    },
    Answer {
        to: usize,
        from: usize,
        req_id: u64,
        resp: Response,
    },
    /// The connection the request went over was reset: the peer restarted since.
    Reset {
        to: usize,
        from: usize,
        req_id: u64,
    },
    Timeout {
        node: usize,
        peer: usize,
        req_id: u64,
    },
    Crash {
        node: usize,
    },
    Restart {
        node: usize,
    },
    Partition {
        a: usize,
        b: usize,
    },
    Heal {
        a: usize,
        b: usize,
    },
}

struct Sim<'a> {
    sc: Scenario,
    src: Box<dyn Source + 'a>,
    now: Arc<AtomicU64>,
    seq: u64,
    queue: BinaryHeap<std::cmp::Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Event>,
    nodes: Vec<SimNode>,
    cut: BTreeSet<(usize, usize)>,
    calm: bool,
    next_req: u64,
    /// (document, heads) of every acknowledged write, as committed on its node.
    acknowledged: Vec<(String, Vec<ChangeHash>)>,
    /// (document, heads pushed) of writes lost at their origin by a failed commit.
    lost: Vec<(String, Vec<ChangeHash>)>,
    report: Report,
}

impl Sim<'_> {
    fn now(&self) -> u64 {
        self.now.load(Ordering::Relaxed)
    }

    fn at(&mut self, t: u64, e: Event) {
        self.seq += 1;
        self.events.insert(self.seq, e);
        self.queue.push(std::cmp::Reverse((t, self.seq)));
    }

    fn is_cut(&self, a: usize, b: usize) -> bool {
        self.cut.contains(&(a.min(b), a.max(b)))
    }

    /// Sends over the network: maybe dropped, maybe duplicated, delayed either way.
    fn send(&mut self, from: usize, to: usize, e: impl Fn() -> Event) {
        self.report.messages += 1;
        let f = self.sc.faults.clone();
        let lost = self.is_cut(from, to) || (!self.calm && self.src.below(100) < f.drop_pct);
        if lost {
            self.report.dropped += 1;
            return;
        }
        let copies = if !self.calm && self.src.below(100) < f.dup_pct {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let d = range(&mut *self.src, 0, f.delay_ms_max);
            let t = self.now() + d;
            self.at(t, e());
        }
    }

    fn running(&mut self, node: usize) -> Option<&mut Running> {
        self.nodes[node].run.as_mut()
    }

    /// Queues a command for a node's driver; the driver runs once the batch window closes.
    fn command(&mut self, node: usize, cmd: Cmd) {
        let inc = self.nodes[node].incarnation;
        let Some(r) = self.running(node) else { return };
        r.cmds.push_back(cmd);
        if !r.driver_due {
            r.driver_due = true;
            let t = self.now() + range(&mut *self.src, 0, BATCH_WINDOW_MS);
            self.at(
                t,
                Event::RunDriver {
                    node,
                    incarnation: inc,
                },
            );
        }
    }

    /// Opens a node's store (recovering it from its disk) and starts its driver and links.
    fn start(&mut self, node: usize) -> Result<(), SimError> {
        let n = self.nodes.len();
        let disk = self.nodes[node].disk.clone();
        let reopen = |error: String| SimError::Reopen {
            seed: self.sc.seed,
            node: self.nodes[node].id.clone(),
            error,
        };
        let store = Arc::new(Store::open_sim(&disk, LOG_BYTES).map_err(|e| reopen(e.to_string()))?);
        let (published, damaged) =
            Driver::load_published(&store).map_err(|e| reopen(e.to_string()))?;
        if !damaged.is_empty() {
            return Err(reopen(format!(
                "index rows fail their checksum: {damaged:?}"
            )));
        }
        let published = Arc::new(published);
        let clock: Arc<dyn Clock> = Arc::new(SimClock(self.now.clone()));
        let rng = ChaCha8Rng::seed_from_u64(draw_u64(&mut *self.src));
        let id = self.nodes[node].id.clone();
        let driver = Driver::new(store.clone(), published.clone(), &id, clock, rng);
        let mut links = Vec::with_capacity(n);
        let mut inboxes = Vec::with_capacity(n);
        for peer in 0..n {
            if peer == node {
                links.push(None);
                inboxes.push(None);
                continue;
            }
            let peer_id = self.nodes[peer].id.clone();
            links.push(Some(PeerLink::new(&peer_id, draw_u64(&mut *self.src))));
            let inbox = Arc::new(Inbox {
                accepting: AtomicBool::new(true),
                ..Default::default()
            });
            published.peers.register(&peer_id, inbox.clone());
            inboxes.push(Some(inbox));
        }
        let conn = self.nodes.iter().map(|x| x.incarnation).collect();
        self.nodes[node].incarnation += 1;
        self.nodes[node].run = Some(Running {
            store,
            published,
            driver,
            links,
            inboxes,
            claims: Claims::default(),
            cmds: VecDeque::new(),
            driver_due: false,
            pending: Vec::new(),
            inflight: vec![None; n],
            tick_at: vec![None; n],
            conn,
        });
        for peer in 0..n {
            if peer != node {
                self.feed(node, peer, Input::Tick);
            }
        }
        Ok(())
    }

    /// The power goes: whatever was not durable is lost, and so is everything in memory.
    fn crash(&mut self, node: usize) {
        let Some(r) = self.nodes[node].run.take() else {
            return;
        };
        self.nodes[node].disk.freeze();
        r.store.crash();
        drop(r);
        self.report.crashes += 1;
    }

    fn restart(&mut self, node: usize) -> Result<(), SimError> {
        if self.nodes[node].run.is_some() {
            return Ok(());
        }
        self.nodes[node].disk.restore();
        self.start(node)
    }

    /// One input to one link, and its outputs carried out.
    fn feed(&mut self, node: usize, peer: usize, input: Input) {
        let now = self.now();
        let incompatible = false;
        let Some(r) = self.nodes[node].run.as_mut() else {
            return;
        };
        let Some(link) = r.links[peer].as_mut() else {
            return;
        };
        let outputs = {
            let mut digest = r.published.digest();
            let mut ctx = Ctx {
                now_ms: now,
                digest: &mut digest,
                claims: &mut r.claims,
                interval_ms: CYCLE_MS,
                incompatible,
            };
            link.handle(&mut ctx, input)
        };
        if let Some(inbox) = &r.inboxes[peer] {
            inbox.accepting.store(link.accepting(), Ordering::Relaxed);
        }
        let wake = link.wake_at();
        for o in outputs {
            self.carry_out(node, peer, o);
        }
        self.schedule_tick(node, peer, wake);
    }

    fn schedule_tick(&mut self, node: usize, peer: usize, wake: Option<u64>) {
        let now = self.now();
        let inc = self.nodes[node].incarnation;
        let Some(r) = self.running(node) else { return };
        let Some(t) = wake else { return };
        let t = t.max(now + 1);
        if r.tick_at[peer].is_some_and(|s| s <= t && s > now) {
            return;
        }
        r.tick_at[peer] = Some(t);
        self.at(
            t,
            Event::LinkTick {
                node,
                peer,
                incarnation: inc,
            },
        );
    }

    /// What `cluster::replicator` does with each output, without sockets.
    fn carry_out(&mut self, node: usize, peer: usize, out: Output) {
        let peer_id = self.nodes[peer].id.clone();
        match out {
            Output::Send { token, req } => {
                self.next_req += 1;
                let req_id = self.next_req;
                let now = self.now();
                let Some(r) = self.running(node) else { return };
                r.inflight[peer] = Some((req_id, token));
                let conn = r.conn[peer];
                self.at(now + TIMEOUT_MS, Event::Timeout { node, peer, req_id });
                self.send(node, peer, || Event::Deliver {
                    from: node,
                    to: peer,
                    req_id,
                    req: req.clone(),
                    conn,
                });
            }
            Output::Make { token, ids } => {
                let (reply, rx) = oneshot::channel();
                self.await_reply(node, Pending::Made { peer, token, rx });
                self.command(
                    node,
                    Cmd::SyncOut {
                        peer: peer_id,
                        ids,
                        reply,
                    },
                );
            }
            Output::Apply {
                token,
                msgs,
                ids,
                then,
            } => {
                let then = match then {
                    Then::Reply => {
                        let (reply, rx) = oneshot::channel();
                        self.await_reply(node, Pending::Applied { peer, token, rx });
                        SyncThen::Reply(reply)
                    }
                    Then::Queue { round } => SyncThen::Queue { round },
                };
                self.command(
                    node,
                    Cmd::SyncBack {
                        peer: peer_id,
                        msgs,
                        ids,
                        then,
                    },
                );
            }
            Output::Ingest { token, docs } => {
                let (reply, rx) = oneshot::channel();
                self.await_reply(node, Pending::Ingested { peer, token, rx });
                let docs = docs
                    .into_iter()
                    .map(|(id, bytes)| IngestDoc::prepare(id, bytes))
                    .collect();
                self.command(
                    node,
                    Cmd::Ingest {
                        peer: peer_id,
                        docs,
                        reply,
                    },
                );
            }
            Output::ResetSessions => self.command(node, Cmd::ResetPeer { peer: peer_id }),
            Output::CycleDone(Ok(_)) => self.report.cycles += 1,
            Output::CycleDone(Err(_)) => {}
            Output::Reach(Some(_)) => self.report.failures += 1,
            Output::Reach(None) => {}
        }
    }

    fn await_reply(&mut self, node: usize, p: Pending) {
        if let Some(r) = self.running(node) {
            r.pending.push(p);
        }
    }

    /// Runs one batch on a node's driver, then hands what it produced to the links and the
    /// network. With `crash`, the batch's commit fails (its disk fails the log write) and the
    /// node crashes right after, its pushes gone out.
    fn run_driver(&mut self, node: usize) {
        let crash_roll = self.sc.faults.commit_crash_pct;
        let Some(r) = self.nodes[node].run.as_mut() else {
            return;
        };
        r.driver_due = false;
        let n = r.cmds.len().min(BATCH_MAX);
        let cmds: Vec<Cmd> = r.cmds.drain(..n).collect();
        let has_writes = cmds.iter().any(|c| matches!(c, Cmd::Write { .. }));
        let crash = has_writes && !self.calm && crash_roll > 0 && self.src.below(100) < crash_roll;
        let disk = self.nodes[node].disk.clone();
        if crash {
            disk.set_failing(true);
        }
        let r = self.nodes[node].run.as_mut().expect("checked above");
        let committed = r.driver.step(cmds);
        self.report.batches += 1;
        // What the batch handed to each link (pushes before the commit, follow-ups after it).
        let mut pushed: BTreeMap<String, Vec<ChangeHash>> = BTreeMap::new();
        let mut deliveries = Vec::new();
        for (peer, inbox) in r.inboxes.iter().enumerate() {
            let Some(inbox) = inbox else { continue };
            let work: Vec<LinkWork> =
                std::mem::take(&mut *inbox.work.lock().unwrap_or_else(|p| p.into_inner()));
            for w in work {
                if let LinkWork::Ready(ready) = &w {
                    for x in ready {
                        if let Some(h) = &x.pushed {
                            pushed.insert(x.id.clone(), h.clone());
                        }
                    }
                }
                deliveries.push((peer, w));
            }
        }
        self.collect(node, &pushed);
        for (peer, w) in deliveries {
            let input = match w {
                LinkWork::Ready(r) => Input::Ready(r),
                LinkWork::Dirty(ids) => Input::Dirty(ids),
            };
            self.feed(node, peer, input);
        }
        if crash {
            disk.set_failing(false);
            if committed.is_err() {
                self.crash(node);
                let down = range(&mut *self.src, 50, 1000);
                let t = (self.now() + down).min(self.sc.duration_ms);
                self.at(t, Event::Restart { node });
                return;
            }
        }
        let inc = self.nodes[node].incarnation;
        if let Some(r) = self.running(node) {
            if !r.cmds.is_empty() && !r.driver_due {
                r.driver_due = true;
                let t = self.now();
                self.at(
                    t,
                    Event::RunDriver {
                        node,
                        incarnation: inc,
                    },
                );
            }
        }
    }

    /// Takes the driver's answers that arrived and routes them: to links, to the network, to the
    /// record of acknowledged and lost writes.
    fn collect(&mut self, node: usize, pushed: &BTreeMap<String, Vec<ChangeHash>>) {
        let Some(r) = self.running(node) else { return };
        let pending = std::mem::take(&mut r.pending);
        let store = r.store.clone();
        let mut keep = Vec::new();
        for p in pending {
            match p {
                Pending::Made {
                    peer,
                    token,
                    mut rx,
                } => match rx.try_recv() {
                    Ok(msgs) => self.feed(node, peer, Input::Made { token, msgs }),
                    Err(oneshot::error::TryRecvError::Empty) => {
                        keep.push(Pending::Made { peer, token, rx })
                    }
                    Err(_) => {}
                },
                Pending::Applied {
                    peer,
                    token,
                    mut rx,
                } => match rx.try_recv() {
                    Ok(Ok(msgs)) => self.feed(node, peer, Input::Made { token, msgs }),
                    Ok(Err(e)) => self.feed(
                        node,
                        peer,
                        Input::Failed {
                            token,
                            failure: Failure::new(Cause::Other, e.to_string()),
                        },
                    ),
                    Err(oneshot::error::TryRecvError::Empty) => {
                        keep.push(Pending::Applied { peer, token, rx })
                    }
                    Err(_) => {}
                },
                Pending::Ingested {
                    peer,
                    token,
                    mut rx,
                } => match rx.try_recv() {
                    Ok(result) => self.feed(
                        node,
                        peer,
                        Input::Ingested {
                            token,
                            result: result.map_err(|e| Failure::new(Cause::Other, e.to_string())),
                        },
                    ),
                    Err(oneshot::error::TryRecvError::Empty) => {
                        keep.push(Pending::Ingested { peer, token, rx })
                    }
                    Err(_) => {}
                },
                Pending::Served {
                    from,
                    req_id,
                    mut rx,
                } => match rx.try_recv() {
                    Ok(resp) => self.send(node, from, || Event::Answer {
                        to: from,
                        from: node,
                        req_id,
                        resp: resp.clone(),
                    }),
                    Err(oneshot::error::TryRecvError::Empty) => {
                        keep.push(Pending::Served { from, req_id, rx })
                    }
                    Err(_) => {}
                },
                Pending::Write { id, mut rx } => match rx.try_recv() {
                    Ok(Ok(_)) => {
                        let heads = store
                            .load_doc(&id)
                            .ok()
                            .flatten()
                            .map(|mut d| d.get_heads())
                            .unwrap_or_default();
                        self.acknowledged.push((id, heads));
                    }
                    Ok(Err(NodeError::Unknown(_))) => {
                        if let Some(h) = pushed.get(&id) {
                            self.lost.push((id, h.clone()));
                            self.report.lost_before_commit += 1;
                        }
                    }
                    Ok(Err(_)) => {}
                    Err(oneshot::error::TryRecvError::Empty) => {
                        keep.push(Pending::Write { id, rx })
                    }
                    Err(_) => {}
                },
            }
        }
        if let Some(r) = self.running(node) {
            keep.append(&mut r.pending);
            r.pending = keep;
        }
    }

    /// A random write, as an admin would make it (secrets left out: hashing them is slow and
    /// they merge like any other register).
    fn write(&mut self, node: usize) {
        let Some(r) = self.nodes[node].run.as_ref() else {
            return;
        };
        let store = r.store.clone();
        let kind = Kind::ALL[self.src.below(Kind::ALL.len())];
        let name = kind
            .singleton()
            .map(str::to_string)
            .unwrap_or_else(|| format!("e{}", self.src.below(3)));
        let id = doc_id(kind, &name);
        let cur = store
            .load_doc(&id)
            .ok()
            .flatten()
            .unwrap_or_else(|| doc::genesis(kind));
        let Ok(cur) = doc::read(&cur, kind, &name) else {
            return;
        };
        let choice = self.src.below(10);
        let op = if choice == 0 {
            crate::core::entity::Op::Delete
        } else {
            let mode = if choice < 5 || !cur.alive {
                WriteMode::Put
            } else {
                WriteMode::Patch
            };
            let mut body = random_body(&mut *self.src, kind, mode, &cur);
            if let Some(o) = body.as_object_mut() {
                o.retain(|k, _| !kind.field(k).is_some_and(|f| f.secret));
            }
            match mode {
                WriteMode::Put => crate::core::entity::Op::Put(body),
                WriteMode::Patch => crate::core::entity::Op::Patch(body),
            }
        };
        let (reply, rx) = oneshot::channel();
        self.await_reply(node, Pending::Write { id, rx });
        self.command(
            node,
            Cmd::Write {
                kind,
                name,
                op,
                by: None,
                reply,
            },
        );
    }

    fn deliver(&mut self, from: usize, to: usize, req_id: u64, req: Request, conn: u32) {
        let inc = self.nodes[to].incarnation;
        let peer_id = self.nodes[from].id.clone();
        let Some(r) = self.nodes[to].run.as_mut() else {
            return;
        };
        if conn != inc {
            // The connection predates the node's restart.
            self.send(to, from, || Event::Reset {
                to: from,
                from: to,
                req_id,
            });
            return;
        }
        let catching_up = r.claims.busy();
        let answer = repl::answer_digest(&req, &mut r.published.digest(), catching_up);
        match answer {
            Some(resp) => self.send(to, from, || Event::Answer {
                to: from,
                from: to,
                req_id,
                resp: resp.clone(),
            }),
            None => {
                let (reply, rx) = oneshot::channel();
                self.await_reply(to, Pending::Served { from, req_id, rx });
                self.command(
                    to,
                    Cmd::Serve {
                        peer: peer_id,
                        req,
                        reply,
                    },
                );
            }
        }
    }

    /// The request in flight from `node` to `peer` ended: answered, or failed.
    fn ended(&mut self, node: usize, peer: usize, req_id: u64, outcome: Result<Response, Failure>) {
        let peer_inc = self.nodes[peer].incarnation;
        let Some(r) = self.running(node) else { return };
        let Some((id, token)) = r.inflight[peer] else {
            return;
        };
        if id != req_id {
            // A late or duplicated answer: that exchange is over.
            return;
        }
        r.inflight[peer] = None;
        let input = match outcome {
            Ok(resp) => Input::Answer { token, resp },
            Err(failure) => {
                // The next request opens a new connection.
                r.conn[peer] = peer_inc;
                Input::Failed { token, failure }
            }
        };
        self.feed(node, peer, input);
    }

    fn step(&mut self, e: Event) -> Result<(), SimError> {
        match e {
            Event::Write { node } => self.write(node),
            Event::RunDriver { node, incarnation } => {
                if self.nodes[node].incarnation == incarnation {
                    self.run_driver(node);
                }
            }
            Event::LinkTick {
                node,
                peer,
                incarnation,
            } => {
                let now = self.now();
                if self.nodes[node].incarnation != incarnation {
                    return Ok(());
                }
                let Some(r) = self.running(node) else {
                    return Ok(());
                };
                if r.tick_at[peer] != Some(now) {
                    return Ok(());
                }
                r.tick_at[peer] = None;
                self.feed(node, peer, Input::Tick);
            }
            Event::Deliver {
                from,
                to,
                req_id,
                req,
                conn,
            } => self.deliver(from, to, req_id, req, conn),
            Event::Answer {
                to,
                from,
                req_id,
                resp,
            } => self.ended(to, from, req_id, Ok(resp)),
            Event::Reset { to, from, req_id } => self.ended(
                to,
                from,
                req_id,
                Err(Failure::new(Cause::Other, "connection reset by peer")),
            ),
            Event::Timeout { node, peer, req_id } => self.ended(
                node,
                peer,
                req_id,
                Err(Failure::new(Cause::Timeout, "request timed out")),
            ),
            Event::Crash { node } => self.crash(node),
            Event::Restart { node } => self.restart(node)?,
            Event::Partition { a, b } => {
                self.cut.insert((a.min(b), a.max(b)));
            }
            Event::Heal { a, b } => {
                self.cut.remove(&(a.min(b), a.max(b)));
            }
        }
        Ok(())
    }

    fn roots(&mut self) -> BTreeSet<[u8; 32]> {
        self.nodes
            .iter()
            .filter_map(|n| n.run.as_ref())
            .map(|r| r.published.digest().root())
            .collect()
    }

    /// Every node holds the same documents with the same heads, reads them the same, and its
    /// index rows are what its documents say.
    fn converged(&mut self) -> Result<(), String> {
        let mut first: Option<(String, Rows)> = None;
        for n in &self.nodes {
            let r = n.run.as_ref().ok_or_else(|| format!("{} is down", n.id))?;
            let mut rows = BTreeMap::new();
            let mut bad = None;
            r.store
                .index_scan("", |id, e| {
                    rows.insert(id.to_string(), (e.json.clone(), e.heads_hash));
                })
                .map_err(|e| e.to_string())?;
            for (id, (json, hash)) in &rows {
                let mut d = r
                    .store
                    .load_doc(id)
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("{}: {id} is indexed but not stored", n.id))?;
                let row = crate::core::index::row_for(id, &mut d).map_err(|e| e.to_string())?;
                if &row.json != json || &row.heads_hash != hash {
                    bad = Some(format!(
                        "{}: the index row of {id} is not its document's:\n stored  {} (heads {})\n derived {} (heads {})",
                        n.id,
                        String::from_utf8_lossy(json),
                        hex::encode(&hash[..4]),
                        String::from_utf8_lossy(&row.json),
                        hex::encode(&row.heads_hash[..4]),
                    ));
                }
            }
            if let Some(b) = bad {
                return Err(b);
            }
            match &first {
                None => first = Some((n.id.clone(), rows)),
                Some((fid, f)) => {
                    if f.keys().ne(rows.keys()) {
                        return Err(format!(
                            "{fid} has documents {:?}, {} has {:?}",
                            f.keys().collect::<Vec<_>>(),
                            n.id,
                            rows.keys().collect::<Vec<_>>()
                        ));
                    }
                    for (id, v) in f {
                        if rows.get(id) != Some(v) {
                            return Err(format!("{id}: differs between {fid} and {}", n.id));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether every node holds every one of `heads` of `id`.
    fn everywhere(&self, id: &str, heads: &[ChangeHash]) -> Result<(), (String, ChangeHash)> {
        for n in &self.nodes {
            let Some(r) = n.run.as_ref() else { continue };
            let mut d = r.store.load_doc(id).ok().flatten();
            for h in heads {
                if d.as_mut().is_none_or(|d| d.get_change_by_hash(h).is_none()) {
                    return Err((n.id.clone(), *h));
                }
            }
        }
        Ok(())
    }
}

/// Runs one seeded scenario. Err names what broke; the seed in the scenario replays it.
pub fn run(sc: &Scenario) -> Result<Report, SimError> {
    run_with(
        sc,
        Box::new(Seeded(ChaCha8Rng::seed_from_u64(sc.seed ^ 0x5eed))),
    )
}

/// Runs a scenario whose every further choice (schedule, faults, edits) comes from `src`.
pub fn run_with<'a>(sc: &Scenario, src: Box<dyn Source + 'a>) -> Result<Report, SimError> {
    let n = sc.nodes;
    let mut sim = Sim {
        sc: sc.clone(),
        src,
        now: Arc::new(AtomicU64::new(0)),
        seq: 0,
        queue: BinaryHeap::new(),
        events: BTreeMap::new(),
        nodes: (0..n)
            .map(|i| SimNode {
                id: format!("node{i}"),
                disk: SimDisk::new(),
                incarnation: 0,
                run: None,
            })
            .collect(),
        cut: BTreeSet::new(),
        calm: false,
        next_req: 0,
        acknowledged: Vec::new(),
        lost: Vec::new(),
        report: Report::default(),
    };
    for i in 0..n {
        sim.start(i)?;
    }
    let src = &mut *sim.src;
    let mut schedule = Vec::new();
    for _ in 0..sc.writes {
        let t = range(src, 0, sc.duration_ms - 1);
        let node = src.below(n);
        schedule.push((t, Event::Write { node }));
    }
    if sc.faults.partitions {
        for _ in 0..range(src, 1, 3) {
            let a = src.below(n);
            let b = (a + 1 + src.below(n - 1)) % n;
            let t = range(src, 0, sc.duration_ms - 1);
            let len = range(src, 100, sc.duration_ms);
            schedule.push((t, Event::Partition { a, b }));
            schedule.push(((t + len).min(sc.duration_ms), Event::Heal { a, b }));
        }
    }
    if sc.faults.crashes {
        for _ in 0..range(src, 1, 2) {
            let node = src.below(n);
            let t = range(src, 0, sc.duration_ms - 1);
            let down = range(src, 50, 1000);
            schedule.push((t, Event::Crash { node }));
            schedule.push(((t + down).min(sc.duration_ms), Event::Restart { node }));
        }
    }
    for (t, e) in schedule {
        sim.at(t, e);
    }
    let deadline = sc.duration_ms + CONVERGE_MS_MAX;
    let mut converged_at = None;
    while let Some(std::cmp::Reverse((t, seq))) = sim.queue.pop() {
        if t > deadline {
            break;
        }
        sim.now.store(t, Ordering::Relaxed);
        if !sim.calm && t >= sc.duration_ms {
            // The faults stop: every node is up, every partition healed, no more loss.
            sim.calm = true;
            sim.cut.clear();
            for i in 0..n {
                sim.restart(i)?;
            }
        }
        let e = sim.events.remove(&seq).expect("queued event");
        sim.step(e)?;
        if sim.calm {
            let idle = sim.nodes.iter().all(|x| {
                x.run
                    .as_ref()
                    .is_some_and(|r| r.cmds.is_empty() && r.pending.is_empty())
            });
            if idle && sim.roots().len() == 1 {
                converged_at = Some(t);
                break;
            }
        }
    }
    let seed = sc.seed;
    let Some(t) = converged_at else {
        return Err(SimError::Stalled {
            seed,
            ms: CONVERGE_MS_MAX,
        });
    };
    sim.converged()
        .map_err(|what| SimError::Diverged { seed, what })?;
    for (id, heads) in &sim.acknowledged {
        sim.everywhere(id, heads)
            .map_err(|(node, h)| SimError::Lost {
                seed,
                id: id.clone(),
                hash: h.to_string(),
                node,
            })?;
    }
    // Converged means identical heads, so a lost write is on every node or on none.
    let lost = std::mem::take(&mut sim.lost);
    for (id, heads) in &lost {
        if sim.everywhere(id, heads).is_ok() {
            sim.report.recovered += 1;
        }
    }
    sim.report.virtual_ms_to_converge = t.saturating_sub(sc.duration_ms);
    sim.report.acknowledged = sim.acknowledged.len();
    Ok(sim.report)
}
