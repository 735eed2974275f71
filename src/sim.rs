//! A deterministic simulator of a peerconf cluster: N nodes running the real replication core
//! (`core::repl`, `core::digest`) over a seeded network that drops, duplicates, reorders and delays
//! messages, with partitions that heal and crashes that lose everything not durable.
//!
//! One seed is one scenario; the same seed replays it exactly. Used by the simulation tests and
//! the `sim` fuzz target.

use crate::core::digest::{Digest, Plan};
use crate::core::proto::{Request, Response, FETCH_DOCS_MAX, SYNC_DOCS_MAX, SYNC_ROUNDS_MAX};
use crate::core::repl::{self, Cycle, Dir, Docs, Next, Sessions};
use automerge::{ActorId, AutoCommit, ChangeHash};
use crdt_schema::testing::{random_write, Source};
use crdt_schema::{doc, Kind};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

/// How hostile a scenario's network is.
#[derive(Debug, Clone)]
pub struct Faults {
    pub drop_pct: u32,
    pub dup_pct: u32,
    pub delay_ms_max: u64,
    pub partitions: bool,
    pub crashes: bool,
    /// Chance (percent) that a node crashes during a local write, after the write's push left
    /// and before its commit: the node loses the change, peers may hold it (as the driver pushes
    /// before its own commit). Only with `crashes`.
    pub commit_crash_pct: u32,
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

impl Scenario {
    /// A scenario drawn from a seed.
    pub fn from_seed(seed: u64) -> Scenario {
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        let (nodes, writes, duration_ms) = (
            r.random_range(2..=4),
            r.random_range(1..=30),
            r.random_range(500..=4000),
        );
        let (drop_pct, dup_pct, delay_ms_max) = (
            r.random_range(0..=30),
            r.random_range(0..=10),
            r.random_range(1..=80),
        );
        let partitions = r.random_bool(0.5);
        let crashes = r.random_bool(0.5);
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
                commit_crash_pct: if crashes { r.random_range(0..=20) } else { 0 },
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
    /// Local writes lost at their origin by a crash after their push left.
    pub lost_before_commit: u64,
    /// Of those, the ones every node holds in the end (a peer had received the push).
    pub recovered: u64,
    pub acknowledged: usize,
}

/// Replication timeout: an exchange unanswered for this long has failed.
const TIMEOUT_MS: u64 = 300;
/// Period of the replication cycle in the simulation (with jitter).
const CYCLE_MS: u64 = 200;
/// After the faults stop, the cluster must converge within this much virtual time.
const CONVERGE_MS_MAX: u64 = 30_000;

/// A push message waiting for a link: document, message, heads announced.
type ReadyPush = (String, Vec<u8>, Vec<automerge::ChangeHash>);

struct Node {
    id: String,
    docs: BTreeMap<String, AutoCommit>,
    digest: Digest,
    sessions: Sessions,
    up: bool,
    incarnation: u32,
    actor: ActorId,
    /// Documents changed since last pushed, per peer (volatile).
    push: Vec<BTreeSet<String>>,
    /// Push messages of local writes waiting for each peer's link (volatile), as the driver makes
    /// them.
    ready: Vec<Vec<ReadyPush>>,
    links: Vec<Link>,
}

#[derive(Default)]
enum Link {
    #[default]
    Idle,
    Busy {
        req_id: u64,
        work: Work,
    },
}

enum Work {
    Push {
        ids: Vec<String>,
        rounds: usize,
    },
    /// Push messages of local writes, with the heads each announced.
    Pushed {
        pushed: Vec<(String, Vec<automerge::ChangeHash>)>,
    },
    Cycle(Cycle),
    Fetch {
        ids: Vec<String>,
        then: Vec<String>,
    },
    Sync {
        ids: Vec<String>,
        rounds: usize,
    },
}

/// A node's documents as the replication core sees them.
struct MemDocs<'a> {
    docs: &'a mut BTreeMap<String, AutoCommit>,
    actor: &'a ActorId,
    changed: BTreeSet<String>,
    created: BTreeSet<String>,
}

impl Docs for MemDocs<'_> {
    fn get(&mut self, id: &str) -> Result<Option<&mut AutoCommit>, String> {
        Ok(self.docs.get_mut(id))
    }
    fn get_or_create(&mut self, id: &str) -> Result<&mut AutoCommit, String> {
        if !self.docs.contains_key(id) {
            self.created.insert(id.to_string());
        }
        let actor = self.actor.clone();
        Ok(self
            .docs
            .entry(id.to_string())
            .or_insert_with(|| AutoCommit::new().with_actor(actor)))
    }
    fn insert(&mut self, id: &str, mut doc: AutoCommit) {
        doc.set_actor(self.actor.clone());
        self.docs.insert(id.to_string(), doc);
        self.changed.insert(id.to_string());
    }
    fn changed(&mut self, id: &str) {
        self.changed.insert(id.to_string());
    }
    fn saved(&mut self, id: &str) -> Result<Option<Vec<u8>>, String> {
        Ok(self.docs.get_mut(id).map(|d| d.save()))
    }
}

impl Node {
    fn new(i: usize, n: usize) -> Node {
        let mut node = Node {
            id: format!("node{i}"),
            docs: BTreeMap::new(),
            digest: Digest::default(),
            sessions: Sessions::default(),
            up: true,
            incarnation: 0,
            actor: ActorId::from(vec![0u8; 16]),
            push: vec![BTreeSet::new(); n],
            ready: vec![Vec::new(); n],
            links: (0..n).map(|_| Link::Idle).collect(),
        };
        node.restart(i);
        node
    }

    /// Crash and restart: only the documents survive (they were durable when acknowledged).
    fn restart(&mut self, i: usize) {
        self.incarnation += 1;
        let mut a = vec![0u8; 16];
        a[0] = i as u8 + 1;
        a[1..5].copy_from_slice(&self.incarnation.to_be_bytes());
        self.actor = ActorId::from(a);
        self.sessions = Sessions::default();
        for p in self.push.iter_mut() {
            p.clear();
        }
        for r in self.ready.iter_mut() {
            r.clear();
        }
        for l in self.links.iter_mut() {
            *l = Link::Idle;
        }
        self.digest = Digest::default();
        for (id, d) in self.docs.iter_mut() {
            d.set_actor(self.actor.clone());
            self.digest.set(id, crate::node::heads_hash(d));
        }
        self.up = true;
    }

    /// Runs `f` over the node's documents, then "persists": drops created-but-unchanged documents
    /// and updates the digest and push sets of the changed ones.
    /// `local`: the changes are this node's own writes, which it pushes to every peer; changes
    /// received from a peer are not forwarded (full mesh; cycles repair what a push missed).
    fn with_docs<T>(
        &mut self,
        local: bool,
        f: impl FnOnce(&mut MemDocs<'_>, &mut Sessions, &mut Digest) -> T,
    ) -> T {
        let mut md = MemDocs {
            docs: &mut self.docs,
            actor: &self.actor,
            changed: BTreeSet::new(),
            created: BTreeSet::new(),
        };
        let out = f(&mut md, &mut self.sessions, &mut self.digest);
        let (changed, created) = (md.changed, md.created);
        for id in created.difference(&changed) {
            self.docs.remove(id);
        }
        for id in &changed {
            if let Some(d) = self.docs.get_mut(id) {
                self.digest.set(id, crate::node::heads_hash(d));
            }
            if local {
                for p in self.push.iter_mut() {
                    p.insert(id.clone());
                }
            }
        }
        out
    }
}

enum Event {
    Write {
        node: usize,
    },
    Tick {
        node: usize,
    },
    Deliver {
        from: usize,
        to: usize,
        req_id: u64,
        req: Request,
    },
    Answer {
        to: usize,
        from: usize,
        req_id: u64,
        resp: Response,
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

struct Sim {
    sc: Scenario,
    rng: ChaCha8Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<std::cmp::Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Event>,
    nodes: Vec<Node>,
    cut: BTreeSet<(usize, usize)>,
    calm: bool,
    next_req: u64,
    acknowledged: Vec<(String, ChangeHash)>,
    /// Writes lost at their origin by a crash before their commit.
    lost: Vec<(String, ChangeHash)>,
    report: Report,
}

struct Choices<'a>(&'a mut ChaCha8Rng);

impl Source for Choices<'_> {
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            self.0.random_range(0..n)
        }
    }
}

impl Sim {
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
        let lost =
            self.is_cut(from, to) || (!self.calm && self.rng.random_range(0..100) < f.drop_pct);
        if lost {
            self.report.dropped += 1;
            return;
        }
        let copies = if !self.calm && self.rng.random_range(0..100) < f.dup_pct {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let d = self.rng.random_range(0..=f.delay_ms_max);
            let t = self.now + d;
            self.at(t, e());
        }
    }

    fn request(&mut self, from: usize, to: usize, req: Request, work: Work) {
        self.next_req += 1;
        let req_id = self.next_req;
        self.nodes[from].links[to] = Link::Busy { req_id, work };
        let t = self.now + TIMEOUT_MS;
        self.at(
            t,
            Event::Timeout {
                node: from,
                peer: to,
                req_id,
            },
        );
        self.send(from, to, || Event::Deliver {
            from,
            to,
            req_id,
            req: req.clone(),
        });
    }

    /// Starts the next piece of work on an idle link: a push of changed documents first, else
    /// nothing (cycles start on ticks).
    fn kick(&mut self, node: usize, peer: usize) {
        let n = &mut self.nodes[node];
        if !n.up || !matches!(n.links[peer], Link::Idle) {
            return;
        }
        if !n.ready[peer].is_empty() {
            let k = n.ready[peer].len().min(SYNC_DOCS_MAX);
            let mut msgs = Vec::with_capacity(k);
            let mut pushed = Vec::with_capacity(k);
            for (id, m, heads) in n.ready[peer].drain(..k) {
                msgs.push((id.clone(), m));
                pushed.push((id, heads));
            }
            self.request(node, peer, Request::Sync { msgs }, Work::Pushed { pushed });
            return;
        }
        if n.push[peer].is_empty() {
            return;
        }
        let ids: Vec<String> = n.push[peer].iter().take(SYNC_DOCS_MAX).cloned().collect();
        for id in &ids {
            n.push[peer].remove(id);
        }
        self.start_sync(node, peer, ids, true);
    }

    fn start_sync(&mut self, node: usize, peer: usize, ids: Vec<String>, push: bool) {
        let peer_id = self.nodes[peer].id.clone();
        let msgs = self.nodes[node].with_docs(false, |docs, sessions, _| {
            sessions.generate(docs, &peer_id, Dir::Out, &ids)
        });
        if msgs.is_empty() {
            self.nodes[node].links[peer] = Link::Idle;
            return;
        }
        let work = if push {
            Work::Push { ids, rounds: 1 }
        } else {
            Work::Sync { ids, rounds: 1 }
        };
        self.request(node, peer, Request::Sync { msgs }, work);
    }

    fn step(&mut self, e: Event) {
        match e {
            Event::Write { node } => {
                if !self.nodes[node].up {
                    return;
                }
                let kind = Kind::ALL[self.rng.random_range(0..Kind::ALL.len())];
                let name = kind
                    .singleton()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("e{}", self.rng.random_range(0..3)));
                let id = crdt_schema::doc_id(kind, &name);
                let now = self.now as i64;
                let pct = self.sc.faults.commit_crash_pct;
                let crash = pct > 0 && self.rng.random_range(0..100) < pct;
                // What the node has durably, to go back to if it crashes before the commit.
                let before_write = crash.then(|| self.nodes[node].docs.get(&id).cloned());
                let n = &mut self.nodes[node];
                let actor = n.actor.clone();
                let node_id = n.id.clone();
                let rng = &mut self.rng;
                let hash = n.with_docs(false, |docs, _, _| {
                    let is_new = !docs.docs.contains_key(&id);
                    let d = docs.docs.entry(id.clone()).or_insert_with(|| {
                        let mut g = doc::genesis(kind);
                        g.set_actor(actor.clone());
                        g
                    });
                    // A document known only from an empty sync exchange has no genesis yet.
                    if d.get_heads().is_empty() {
                        let mut g = doc::genesis(kind);
                        d.merge(&mut g).ok();
                    }
                    let before = d.get_heads();
                    random_write(&mut Choices(rng), d, kind, &node_id, now);
                    let after = d.get_heads();
                    let hash = if after != before {
                        d.get_last_local_change().map(|c| c.hash())
                    } else {
                        None
                    };
                    // The push, made as the driver makes it: a new document whole, otherwise
                    // the write's changes.
                    let changes = if is_new {
                        d.save()
                    } else {
                        d.save_after(&before)
                    };
                    if hash.is_some() {
                        docs.changed(&id);
                    }
                    hash.map(|h| (h, after, changes))
                });
                let hash = hash.map(|(h, heads, changes)| {
                    let msg = Sessions::push_message(heads.clone(), changes);
                    for p in 0..n.ready.len() {
                        if p != node {
                            let pid = format!("node{p}");
                            n.sessions.pushed(&pid, &id, &heads);
                            n.ready[p].push((id.clone(), msg.clone(), heads.clone()));
                        }
                    }
                    h
                });
                // The driver hands the push to the replicators before it commits.
                for p in 0..self.nodes.len() {
                    if p != node {
                        self.kick(node, p);
                    }
                }
                if let (Some(prev), Some(h)) = (before_write, hash) {
                    self.lost.push((id.clone(), h));
                    // A crash before the commit: the write is not acknowledged and the node
                    // restarts without it; whatever push already left may still arrive.
                    let n = &mut self.nodes[node];
                    match prev {
                        Some(d) => n.docs.insert(id, d),
                        None => n.docs.remove(&id),
                    };
                    n.up = false;
                    self.report.crashes += 1;
                    self.report.lost_before_commit += 1;
                    let down = self.rng.random_range(50..=1000);
                    let t = (self.now + down).min(self.sc.duration_ms);
                    self.at(t, Event::Restart { node });
                    return;
                }
                // Acknowledged: once committed, which in the simulation is the moment it is made.
                if let Some(h) = hash {
                    self.acknowledged.push((id, h));
                }
            }
            Event::Tick { node } => {
                let jitter = self.rng.random_range(0..CYCLE_MS / 2);
                let t = self.now + CYCLE_MS + jitter;
                self.at(t, Event::Tick { node });
                if !self.nodes[node].up {
                    return;
                }
                for peer in 0..self.nodes.len() {
                    if peer == node || !matches!(self.nodes[node].links[peer], Link::Idle) {
                        continue;
                    }
                    if !self.nodes[node].push[peer].is_empty()
                        || !self.nodes[node].ready[peer].is_empty()
                    {
                        self.kick(node, peer);
                        continue;
                    }
                    let (cycle, req) = Cycle::start(&mut self.nodes[node].digest);
                    self.request(node, peer, req, Work::Cycle(cycle));
                }
            }
            Event::Deliver {
                from,
                to,
                req_id,
                req,
            } => {
                if !self.nodes[to].up {
                    return;
                }
                let peer_id = self.nodes[from].id.clone();
                let resp = self.nodes[to].with_docs(false, |docs, sessions, digest| {
                    repl::serve(req, &peer_id, digest, sessions, docs)
                });
                self.send(to, from, || Event::Answer {
                    to: from,
                    from: to,
                    req_id,
                    resp: resp.clone(),
                });
            }
            Event::Answer {
                to,
                from,
                req_id,
                resp,
            } => {
                let n = &mut self.nodes[to];
                if !n.up {
                    return;
                }
                let work = match std::mem::take(&mut n.links[from]) {
                    Link::Busy { req_id: r, work } if r == req_id => work,
                    other => {
                        // A duplicate or a late answer: the exchange is over.
                        n.links[from] = other;
                        return;
                    }
                };
                self.on_answer(to, from, work, resp);
                self.kick(to, from);
            }
            Event::Timeout { node, peer, req_id } => {
                let n = &mut self.nodes[node];
                if let Link::Busy { req_id: r, work } = &n.links[peer] {
                    if *r == req_id {
                        // The exchange failed: reset the sessions so nothing stays in flight, and
                        // put pushed documents back.
                        match work {
                            Work::Push { ids, .. } => n.push[peer].extend(ids.iter().cloned()),
                            Work::Pushed { pushed } => {
                                n.push[peer].extend(pushed.iter().map(|(id, _)| id.clone()))
                            }
                            _ => {}
                        }
                        // Push messages not sent yet are stale once the sessions are reset.
                        let stale: Vec<String> =
                            n.ready[peer].drain(..).map(|(id, _, _)| id).collect();
                        n.push[peer].extend(stale);
                        n.links[peer] = Link::Idle;
                        let pid = self.nodes[peer].id.clone();
                        self.nodes[node].sessions.reset_peer(&pid);
                    }
                }
            }
            Event::Crash { node } => {
                if self.nodes[node].up {
                    self.nodes[node].up = false;
                    self.report.crashes += 1;
                }
            }
            Event::Restart { node } => {
                if !self.nodes[node].up {
                    self.nodes[node].restart(node);
                    // The peers notice the reconnect and reset their sessions with it.
                    let id = self.nodes[node].id.clone();
                    for other in self.nodes.iter_mut() {
                        other.sessions.reset_peer(&id);
                    }
                }
            }
            Event::Partition { a, b } => {
                self.cut.insert((a.min(b), a.max(b)));
            }
            Event::Heal { a, b } => {
                self.cut.remove(&(a.min(b), a.max(b)));
            }
        }
    }

    fn on_answer(&mut self, node: usize, peer: usize, work: Work, resp: Response) {
        let peer_id = self.nodes[peer].id.clone();
        match work {
            Work::Pushed { pushed } => {
                // As the replicator does: answers that end a push are dropped, the rest go
                // through the sessions.
                let Response::Sync { msgs } = resp else {
                    return;
                };
                let (ended, back): (Vec<_>, Vec<_>) = msgs.into_iter().partition(|(id, m)| {
                    pushed
                        .iter()
                        .any(|(p, h)| p == id && Sessions::ends_push(m, h))
                });
                let ids: Vec<String> = pushed
                    .iter()
                    .map(|(id, _)| id.clone())
                    .filter(|id| {
                        !ended.iter().any(|(e, _)| e == id) && back.iter().any(|(b, _)| b == id)
                    })
                    .collect();
                if ids.is_empty() {
                    return;
                }
                let next = self.nodes[node].with_docs(false, |docs, sessions, _| {
                    sessions.receive(docs, &peer_id, Dir::Out, back);
                    sessions.generate(docs, &peer_id, Dir::Out, &ids)
                });
                if !next.is_empty() {
                    let work = Work::Sync { ids, rounds: 2 };
                    self.request(node, peer, Request::Sync { msgs: next }, work);
                }
            }
            Work::Push { ids, rounds } | Work::Sync { ids, rounds } => {
                let Response::Sync { msgs } = resp else {
                    return;
                };
                let next = self.nodes[node].with_docs(false, |docs, sessions, _| {
                    sessions.receive(docs, &peer_id, Dir::Out, msgs);
                    sessions.generate(docs, &peer_id, Dir::Out, &ids)
                });
                if !next.is_empty() && rounds < SYNC_ROUNDS_MAX {
                    self.request(
                        node,
                        peer,
                        Request::Sync { msgs: next },
                        Work::Sync {
                            ids,
                            rounds: rounds + 1,
                        },
                    );
                }
            }
            Work::Cycle(mut cycle) => {
                let step = cycle.step(&self.nodes[node].digest, resp);
                match step {
                    Ok(Next::Send(req)) => self.request(node, peer, req, Work::Cycle(cycle)),
                    Ok(Next::Done(Plan { fetch, sync })) => {
                        self.fetch_then_sync(node, peer, fetch, sync)
                    }
                    Err(_) => {}
                }
            }
            Work::Fetch { ids, then } => {
                if let Response::Docs { docs } = resp {
                    self.nodes[node].with_docs(false, |d, _, _| {
                        for (id, bytes) in docs {
                            let _ = repl::ingest(d, &id, &bytes);
                        }
                    });
                }
                self.fetch_then_sync(node, peer, ids, then);
            }
        }
    }

    fn fetch_then_sync(
        &mut self,
        node: usize,
        peer: usize,
        mut fetch: Vec<String>,
        mut sync: Vec<String>,
    ) {
        if !fetch.is_empty() {
            let batch: Vec<String> = fetch.drain(..fetch.len().min(FETCH_DOCS_MAX)).collect();
            self.request(
                node,
                peer,
                Request::Fetch { ids: batch },
                Work::Fetch {
                    ids: fetch,
                    then: sync,
                },
            );
        } else if !sync.is_empty() {
            let batch: Vec<String> = sync.drain(..sync.len().min(SYNC_DOCS_MAX)).collect();
            // Whatever does not fit in this exchange waits for the next cycle.
            self.start_sync(node, peer, batch, false);
        }
    }

    fn converged(&mut self) -> Result<(), String> {
        let (first, rest) = self.nodes.split_first_mut().expect("nodes");
        for other in rest.iter_mut() {
            let a: Vec<&String> = first.docs.keys().collect();
            let b: Vec<&String> = other.docs.keys().collect();
            if a != b {
                return Err(format!(
                    "{} has documents {a:?}, {} has {b:?}",
                    first.id, other.id
                ));
            }
            for (id, d) in first.docs.iter_mut() {
                let o = other.docs.get_mut(id).expect("same keys");
                let (mut h1, mut h2) = (d.get_heads(), o.get_heads());
                h1.sort();
                h2.sort();
                if h1 != h2 {
                    return Err(format!(
                        "{id}: heads differ between {} and {}",
                        first.id, other.id
                    ));
                }
                if id != crate::core::members::MEMBERS_DOC {
                    let (kind, name) = crdt_schema::parse_doc_id(id).map_err(|e| e.to_string())?;
                    let s1 = doc::read(d, kind, name).map_err(|e| e.to_string())?;
                    let s2 = doc::read(o, kind, name).map_err(|e| e.to_string())?;
                    if s1 != s2 {
                        return Err(format!("{id}: entities differ"));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Runs one scenario. Err names what broke; the seed in the scenario replays it.
pub fn run(sc: &Scenario) -> Result<Report, String> {
    let mut sim = Sim {
        rng: ChaCha8Rng::seed_from_u64(sc.seed ^ 0x5eed),
        sc: sc.clone(),
        now: 0,
        seq: 0,
        queue: BinaryHeap::new(),
        events: BTreeMap::new(),
        nodes: (0..sc.nodes).map(|i| Node::new(i, sc.nodes)).collect(),
        cut: BTreeSet::new(),
        calm: false,
        next_req: 0,
        acknowledged: Vec::new(),
        lost: Vec::new(),
        report: Report::default(),
    };
    let n = sc.nodes;
    for i in 0..n {
        let t = sim.rng.random_range(0..CYCLE_MS);
        sim.at(t, Event::Tick { node: i });
    }
    for _ in 0..sc.writes {
        let t = sim.rng.random_range(0..sc.duration_ms);
        let node = sim.rng.random_range(0..n);
        sim.at(t, Event::Write { node });
    }
    if sc.faults.partitions {
        for _ in 0..sim.rng.random_range(1..=3) {
            let a = sim.rng.random_range(0..n);
            let b = (a + sim.rng.random_range(1..n)) % n;
            let t = sim.rng.random_range(0..sc.duration_ms);
            let len = sim.rng.random_range(100..=sc.duration_ms);
            sim.at(t, Event::Partition { a, b });
            sim.at((t + len).min(sc.duration_ms), Event::Heal { a, b });
        }
    }
    if sc.faults.crashes {
        for _ in 0..sim.rng.random_range(1..=2) {
            let node = sim.rng.random_range(0..n);
            let t = sim.rng.random_range(0..sc.duration_ms);
            let down = sim.rng.random_range(50..=1000);
            sim.at(t, Event::Crash { node });
            sim.at((t + down).min(sc.duration_ms), Event::Restart { node });
        }
    }
    let deadline = sc.duration_ms + CONVERGE_MS_MAX;
    let mut converged_at = None;
    while let Some(std::cmp::Reverse((t, seq))) = sim.queue.pop() {
        if t > deadline {
            break;
        }
        sim.now = t;
        if !sim.calm && t >= sc.duration_ms {
            // The faults stop: every node is up, every partition healed, no more loss.
            sim.calm = true;
            sim.cut.clear();
            for i in 0..n {
                if !sim.nodes[i].up {
                    sim.nodes[i].restart(i);
                }
            }
        }
        let e = sim.events.remove(&seq).expect("queued event");
        sim.step(e);
        if sim.calm {
            let roots: BTreeSet<_> = sim.nodes.iter_mut().map(|x| x.digest.root()).collect();
            if roots.len() == 1 {
                converged_at = Some(sim.now);
                break;
            }
        }
    }
    let Some(t) = converged_at else {
        return Err(format!(
            "seed {}: no convergence {} virtual ms after the faults stopped (sync stalled)",
            sc.seed, CONVERGE_MS_MAX
        ));
    };
    sim.converged()
        .map_err(|e| format!("seed {}: {e}", sc.seed))?;
    for (id, h) in &sim.acknowledged {
        for node in sim.nodes.iter_mut() {
            let present = node
                .docs
                .get_mut(id)
                .is_some_and(|d| d.get_change_by_hash(h).is_some());
            if !present {
                return Err(format!(
                    "seed {}: acknowledged change {h} of {id} is missing on {}",
                    sc.seed, node.id
                ));
            }
        }
    }
    // Converged means identical heads, so a lost write is on every node or on none.
    for (id, h) in &sim.lost {
        if sim.nodes[0]
            .docs
            .get_mut(id)
            .is_some_and(|d| d.get_change_by_hash(h).is_some())
        {
            sim.report.recovered += 1;
        }
    }
    sim.report.virtual_ms_to_converge = t.saturating_sub(sc.duration_ms);
    sim.report.acknowledged = sim.acknowledged.len();
    Ok(sim.report)
}
