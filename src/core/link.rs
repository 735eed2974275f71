//! Layer: core (sans-IO; imports only other core modules and `crdt-schema`).
//!
//! The replication link to one peer, as a state machine. It decides everything a node does
//! towards one peer: which pushes go out and in what batches, when a replication cycle runs, which
//! documents it fetches (claimed node-wide, so a new node fetches each document from one peer),
//! how fetched batches are pipelined into the driver, and how long to back off after a failure.
//!
//! It performs nothing itself. [`PeerLink::handle`] takes one [`Input`] (a push made by the
//! driver, an answer, a failure with its cause, the driver's result, a tick) and returns
//! [`Output`]s: a request to send, work for the driver, a session reset, a finished cycle. The
//! production replicator (`cluster::replicator`) and the simulator (`sim`) are both thin loops that
//! feed it and carry its outputs out, so the decisions exist once.
//!
//! Invariants:
//! - At most one request is in flight to the peer.
//! - Every request, driver job and answer carries a token; an input whose token is not the one
//!   awaited (a late answer, a duplicate, a result for a job that failed meanwhile) is ignored.
//! - After any failure the peer's sync sessions are reset ([`Output::ResetSessions`]) before
//!   anything else is sent: a lost message must never stall a pair.
//! - Documents whose push did not complete are listed again (`dirty`), never forgotten.
//! - Fetch claims taken by a cycle are released when its fetches end, failed or not.

use super::digest::{Digest, Plan};
use super::health::Cause;
use super::proto::{Request, Response, FETCH_DOCS_MAX, SYNC_DOCS_MAX, SYNC_ROUNDS_MAX};
use super::repl::{Cycle, Next, Sessions};
use automerge::ChangeHash;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

/// Sync messages, one per document.
pub type Msgs = Vec<(String, Vec<u8>)>;

/// Messages the driver made that wait for a peer: the most a peer that does not answer can hold
/// before the driver lists the documents instead (bounds memory per peer).
pub const READY_MAX: usize = 4096;
/// Backoff after a failed exchange: doubles from the first to the second bound.
pub const BACKOFF_MIN_MS: u64 = 100;
pub const BACKOFF_MAX_MS: u64 = 2000;
/// Fetched batches handed to the driver and not yet stored: two keep the driver busy while the
/// next batch is on the wire, without holding more than a few MB per peer.
pub const INGESTS_MAX: usize = 2;
/// The replication interval varies by this much either way, so nodes do not align.
const JITTER_PCT: u64 = 20;

/// A sync message the driver made for a peer.
#[derive(Debug, Clone)]
pub struct Ready {
    pub id: String,
    pub msg: Vec<u8>,
    /// 1 for a push; n + 1 for what the answer to a round-n message called for.
    pub round: usize,
    /// For a push, the heads it announces.
    pub pushed: Option<Vec<ChangeHash>>,
}

/// Why an exchange with the peer failed.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub cause: Cause,
    pub message: String,
}

impl Failure {
    pub fn new(cause: Cause, message: impl Into<String>) -> Failure {
        Failure {
            cause,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Identifies one request or driver job; stale ones are ignored.
pub type Token = u64;

/// What happens to the messages that follow a peer's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// They come back to the link as [`Input::Made`] (the exchange goes on now).
    Reply,
    /// They go into the peer's ready queue as round `round + 1` (the answer was to round
    /// `round`); dropped past [`SYNC_ROUNDS_MAX`]: the replication cycle repairs what is left.
    Queue { round: usize },
}

#[derive(Debug)]
pub enum Input {
    /// Messages the driver made for this peer (pushes of local writes, follow-ups).
    Ready(Vec<Ready>),
    /// Documents whose messages are still to be made.
    Dirty(Vec<String>),
    /// Heartbeats saw the digests differ, or the peer came back: run a cycle now.
    CycleNow,
    /// Time passed (see [`PeerLink::wake_at`]).
    Tick,
    /// The answer to request `token`.
    Answer { token: Token, resp: Response },
    /// Request (or driver job) `token` failed.
    Failed { token: Token, failure: Failure },
    /// The driver made the messages asked for by job `token` (empty: nothing more to say).
    Made { token: Token, msgs: Msgs },
    /// The driver stored (or failed to store) the fetched batch of job `token`.
    Ingested {
        token: Token,
        result: Result<usize, Failure>,
    },
}

#[derive(Debug, PartialEq)]
pub enum Output {
    /// Send this request; its answer or failure comes back with the token.
    Send { token: Token, req: Request },
    /// Driver: make this peer's sync messages for `ids` ([`Input::Made`]).
    Make { token: Token, ids: Vec<String> },
    /// Driver: apply the peer's answer for `ids`, then make what follows (see [`Then`]).
    Apply {
        token: Token,
        msgs: Msgs,
        ids: Vec<String>,
        then: Then,
    },
    /// Driver: store these fetched documents ([`Input::Ingested`]).
    Ingest { token: Token, docs: Msgs },
    /// Driver: clear the in-flight state of every sync session with this peer.
    ResetSessions,
    /// A replication cycle ended: how many documents differed, or why it failed.
    CycleDone(Result<usize, Failure>),
    /// Reachability changed: the peer just failed (`Some`), or answers again (`None`).
    Reach(Option<Failure>),
}

/// Documents some link of this node is fetching now: each is fetched from one peer at a time.
#[derive(Debug, Default)]
pub struct Claims {
    ids: HashSet<String>,
}

impl Claims {
    /// Claims what is not claimed yet; returns those.
    pub fn claim(&mut self, ids: Vec<String>) -> Vec<String> {
        ids.into_iter()
            .filter(|id| self.ids.insert(id.clone()))
            .collect()
    }
    pub fn release(&mut self, ids: &[String]) {
        for id in ids {
            self.ids.remove(id);
        }
    }
    /// A fetch is under way: the node is catching up.
    pub fn busy(&self) -> bool {
        !self.ids.is_empty()
    }
}

/// What a step sees of the node.
pub struct Ctx<'a> {
    /// Monotonic milliseconds.
    pub now_ms: u64,
    /// The digest of what this node has committed.
    pub digest: &'a mut Digest,
    pub claims: &'a mut Claims,
    /// `settings/global.replication_interval_ms`.
    pub interval_ms: u64,
    /// The peer runs another major version: nothing is synced either way.
    pub incompatible: bool,
}

#[derive(Debug)]
enum Purpose {
    /// Documents listed for this peer (local changes not sent as ready messages).
    Push,
    /// The documents a cycle found different; `rest` are the batches after this one.
    Cycle {
        rest: VecDeque<Vec<String>>,
        differed: usize,
    },
}

#[derive(Debug)]
enum Job {
    Idle,
    /// Ready messages are on the wire.
    Push {
        token: Token,
        ids: Vec<String>,
        pushed: HashMap<String, Vec<ChangeHash>>,
        round: usize,
    },
    /// A sync exchange of `ids`: waiting for the driver's messages (`making`) or the peer's
    /// answer.
    Sync {
        token: Token,
        ids: Vec<String>,
        rounds: usize,
        making: bool,
        purpose: Purpose,
    },
    /// A cycle's digest comparison is on the wire.
    Cycle {
        token: Token,
        cycle: Cycle,
    },
    Fetch(Fetch),
}

#[derive(Debug)]
struct Fetch {
    /// The request on the wire, if any.
    in_flight: Option<Token>,
    /// Of the current batch, what is still wanted.
    want: Vec<String>,
    /// Batches after the current one.
    batches: VecDeque<Vec<String>>,
    /// Ingest jobs given to the driver and not answered.
    ingesting: HashSet<Token>,
    /// Documents received while every ingest slot was taken.
    held: Option<Msgs>,
    claimed: Vec<String>,
    /// What to sync once the fetches are stored.
    sync: Vec<String>,
}

pub struct PeerLink {
    peer: String,
    dirty: BTreeSet<String>,
    ready: VecDeque<Ready>,
    cycle_now: bool,
    job: Job,
    /// The last exchange failed; cleared by the next one that succeeds.
    failing: bool,
    /// Whether the current job sent anything (only then does its success say the peer is fine).
    sent: bool,
    backoff_ms: u64,
    retry_at: Option<u64>,
    last_cycle: Option<u64>,
    /// The current interval's jitter, in percent of the interval.
    jitter_pct: u64,
    interval_ms: u64,
    next_token: Token,
    rng: ChaCha8Rng,
}

impl PeerLink {
    /// A link to `peer`; `seed` draws the cycle jitter (pass the node's seeded generator's output).
    pub fn new(peer: &str, seed: u64) -> PeerLink {
        PeerLink {
            peer: peer.to_string(),
            dirty: BTreeSet::new(),
            ready: VecDeque::new(),
            cycle_now: false,
            job: Job::Idle,
            failing: false,
            sent: false,
            backoff_ms: BACKOFF_MIN_MS,
            retry_at: None,
            // Catch up at once on start.
            last_cycle: None,
            jitter_pct: 100,
            // Set from the context at every step.
            interval_ms: 0,
            next_token: 0,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Whether the driver should make this peer's messages now (rather than list documents): not
    /// while it is failing, nor once [`READY_MAX`] wait.
    pub fn accepting(&self) -> bool {
        !self.failing && self.ready.len() < READY_MAX
    }

    /// Messages the peer has not answered yet: ready ones, and those of the push or sync
    /// exchange on the wire. The node paces local writes by it.
    pub fn backlog(&self) -> usize {
        self.ready.len()
            + match &self.job {
                Job::Push { ids, .. } | Job::Sync { ids, .. } => ids.len(),
                _ => 0,
            }
    }

    /// Whether anything is under way or waiting.
    pub fn idle(&self) -> bool {
        matches!(self.job, Job::Idle) && self.ready.is_empty() && self.dirty.is_empty()
    }

    /// When the link next wants an [`Input::Tick`] (None: only inputs move it).
    pub fn wake_at(&self) -> Option<u64> {
        if !matches!(self.job, Job::Idle) {
            return None;
        }
        if let Some(t) = self.retry_at {
            return Some(t);
        }
        Some(match self.last_cycle {
            None => 0,
            Some(t) => t + self.interval_ms * self.jitter_pct / 100,
        })
    }

    fn token(&mut self) -> Token {
        self.next_token += 1;
        self.next_token
    }

    pub fn handle(&mut self, ctx: &mut Ctx<'_>, input: Input) -> Vec<Output> {
        self.interval_ms = ctx.interval_ms.max(1);
        let mut out = Vec::new();
        match input {
            Input::Ready(msgs) => self.ready.extend(msgs),
            Input::Dirty(ids) => self.dirty.extend(ids),
            Input::CycleNow => self.cycle_now = true,
            Input::Tick => {}
            Input::Answer { token, resp } => self.on_answer(ctx, token, resp, &mut out),
            Input::Failed { token, failure } => {
                if self.owns(token) {
                    self.fail(ctx, failure, &mut out);
                }
            }
            Input::Made { token, msgs } => self.on_made(ctx, token, msgs, &mut out),
            Input::Ingested { token, result } => self.on_ingested(ctx, token, result, &mut out),
        }
        self.advance(ctx, &mut out);
        out
    }

    fn awaits_answer(&self, t: Token) -> bool {
        match &self.job {
            Job::Push { token, .. } | Job::Cycle { token, .. } => *token == t,
            Job::Sync { token, making, .. } => !*making && *token == t,
            Job::Fetch(f) => f.in_flight == Some(t),
            Job::Idle => false,
        }
    }

    /// Whether `t` is the current job's request or driver job (a failure of either ends it).
    fn owns(&self, t: Token) -> bool {
        match &self.job {
            Job::Sync { token, .. } => *token == t,
            Job::Fetch(f) => f.in_flight == Some(t) || f.ingesting.contains(&t),
            _ => self.awaits_answer(t),
        }
    }

    fn send(&mut self, req: Request, out: &mut Vec<Output>) -> Token {
        let token = self.token();
        self.sent = true;
        out.push(Output::Send { token, req });
        token
    }

    /// Starts the next piece of work if nothing is under way: pushes first, then a cycle when one
    /// is due.
    fn advance(&mut self, ctx: &mut Ctx<'_>, out: &mut Vec<Output>) {
        if !matches!(self.job, Job::Idle) {
            return;
        }
        let now = ctx.now_ms;
        match self.retry_at {
            Some(t) if now < t => return,
            Some(_) => self.retry_at = None,
            None => {}
        }
        let cycle_due = self.cycle_now || self.wake_at().is_some_and(|t| now >= t);
        if ctx.incompatible {
            // Another major version: neither synced to nor from (its server refuses us too).
            if cycle_due {
                self.cycle_now = false;
                self.last_cycle = Some(now);
            }
            return;
        }
        self.sent = false;
        if !self.ready.is_empty() {
            let n = self.ready.len().min(SYNC_DOCS_MAX);
            let mut ids = Vec::with_capacity(n);
            let mut msgs = Vec::with_capacity(n);
            let mut pushed = HashMap::new();
            let mut round = 1;
            for r in self.ready.drain(..n) {
                round = round.max(r.round);
                match r.pushed {
                    Some(h) => {
                        pushed.insert(r.id.clone(), h);
                    }
                    // A document pushed and followed up in one request: its answer goes through
                    // the session.
                    None => {
                        pushed.remove(&r.id);
                    }
                }
                ids.push(r.id.clone());
                msgs.push((r.id, r.msg));
            }
            let token = self.send(Request::Sync { msgs }, out);
            self.job = Job::Push {
                token,
                ids,
                pushed,
                round,
            };
            return;
        }
        if !self.dirty.is_empty() {
            let ids: Vec<String> = self.dirty.iter().take(SYNC_DOCS_MAX).cloned().collect();
            for id in &ids {
                self.dirty.remove(id);
            }
            self.start_sync(ids, Purpose::Push, out);
            return;
        }
        if !cycle_due {
            return;
        }
        self.cycle_now = false;
        self.last_cycle = Some(now);
        self.jitter_pct = 100 - JITTER_PCT + self.rng.random_range(0..=2 * JITTER_PCT);
        if ctx.claims.busy() {
            // Another link is catching this node up: comparing digests now would only list the
            // same missing documents again.
            return;
        }
        let (cycle, req) = Cycle::start(ctx.digest);
        let token = self.send(req, out);
        self.job = Job::Cycle { token, cycle };
    }

    fn start_sync(&mut self, ids: Vec<String>, purpose: Purpose, out: &mut Vec<Output>) {
        let token = self.token();
        out.push(Output::Make {
            token,
            ids: ids.clone(),
        });
        self.job = Job::Sync {
            token,
            ids,
            rounds: 0,
            making: true,
            purpose,
        };
    }

    fn on_answer(&mut self, ctx: &mut Ctx<'_>, t: Token, resp: Response, out: &mut Vec<Output>) {
        if !self.awaits_answer(t) {
            return;
        }
        if let Response::Refused { reason, message } = &resp {
            let cause = match reason {
                super::proto::Refusal::Version => Cause::Version,
                _ => Cause::Refused,
            };
            return self.fail(ctx, Failure::new(cause, message.clone()), out);
        }
        match std::mem::replace(&mut self.job, Job::Idle) {
            Job::Push {
                ids, pushed, round, ..
            } => {
                let Response::Sync { msgs: back } = resp else {
                    self.dirty.extend(ids);
                    return self.fail(ctx, unexpected("sync", &resp), out);
                };
                // Answers that end a push need nothing more, and a push the peer did not answer
                // at all is over too; the rest goes through the sessions, and whatever it calls
                // for comes back as ready messages: the next push does not wait for it.
                let (ended, back): (Msgs, Msgs) = back
                    .into_iter()
                    .partition(|(id, m)| pushed.get(id).is_some_and(|h| Sessions::ends_push(m, h)));
                let ids: Vec<String> = ids
                    .into_iter()
                    .filter(|id| {
                        !ended.iter().any(|(e, _)| e == id)
                            && (!pushed.contains_key(id) || back.iter().any(|(b, _)| b == id))
                    })
                    .collect();
                if !ids.is_empty() {
                    let token = self.token();
                    out.push(Output::Apply {
                        token,
                        msgs: back,
                        ids,
                        then: Then::Queue { round },
                    });
                }
                self.succeeded(out);
            }
            Job::Sync {
                token,
                ids,
                rounds,
                purpose,
                ..
            } => {
                let Response::Sync { msgs: back } = resp else {
                    if matches!(purpose, Purpose::Push) {
                        self.dirty.extend(ids);
                    }
                    return self.fail(ctx, unexpected("sync", &resp), out);
                };
                let _ = token;
                let token = self.token();
                out.push(Output::Apply {
                    token,
                    msgs: back,
                    ids: ids.clone(),
                    then: Then::Reply,
                });
                self.job = Job::Sync {
                    token,
                    ids,
                    rounds,
                    making: true,
                    purpose,
                };
            }
            Job::Cycle { mut cycle, .. } => match cycle.step(ctx.digest, resp) {
                Ok(Next::Send(req)) => {
                    let token = self.send(req, out);
                    self.job = Job::Cycle { token, cycle };
                }
                Ok(Next::Done(Plan { fetch, sync })) => {
                    let claimed = ctx.claims.claim(fetch);
                    let mut batches: VecDeque<Vec<String>> =
                        claimed.chunks(FETCH_DOCS_MAX).map(<[_]>::to_vec).collect();
                    let want = batches.pop_front().unwrap_or_default();
                    self.job = Job::Fetch(Fetch {
                        in_flight: None,
                        want,
                        batches,
                        ingesting: HashSet::new(),
                        held: None,
                        claimed,
                        sync,
                    });
                    self.fetch_next(ctx, out);
                }
                Err(e) => self.fail(ctx, Failure::new(Cause::Other, e.to_string()), out),
            },
            Job::Fetch(mut f) => {
                f.in_flight = None;
                let Response::Docs { docs } = resp else {
                    self.job = Job::Fetch(f);
                    return self.fail(ctx, unexpected("fetch", &resp), out);
                };
                if docs.is_empty() {
                    // The peer has none of what is left of this batch (deleted meanwhile, or
                    // never had them): on to the next.
                    f.want.clear();
                } else {
                    let got: HashSet<&str> = docs.iter().map(|(id, _)| id.as_str()).collect();
                    f.want.retain(|id| !got.contains(id.as_str()));
                    f.held = Some(docs);
                }
                self.job = Job::Fetch(f);
                self.fetch_next(ctx, out);
            }
            Job::Idle => {}
        }
    }

    /// Moves a fetch on: hands held documents to the driver when a slot is free, asks for the
    /// rest of the batch (or the next batch), and once everything is stored releases the claims
    /// and syncs what differed.
    fn fetch_next(&mut self, ctx: &mut Ctx<'_>, out: &mut Vec<Output>) {
        let Job::Fetch(f) = &mut self.job else {
            return;
        };
        if f.held.is_some() && f.ingesting.len() < INGESTS_MAX {
            let docs = f.held.take().expect("held");
            self.next_token += 1;
            let token = self.next_token;
            f.ingesting.insert(token);
            out.push(Output::Ingest { token, docs });
        }
        if f.held.is_some() || f.in_flight.is_some() {
            return;
        }
        if f.want.is_empty() {
            f.want = f.batches.pop_front().unwrap_or_default();
        }
        if !f.want.is_empty() {
            let req = Request::Fetch {
                ids: f.want.clone(),
            };
            let token = self.send(req, out);
            if let Job::Fetch(f) = &mut self.job {
                f.in_flight = Some(token);
            }
            return;
        }
        if !f.ingesting.is_empty() {
            return;
        }
        let Job::Fetch(f) = std::mem::replace(&mut self.job, Job::Idle) else {
            unreachable!("checked above");
        };
        ctx.claims.release(&f.claimed);
        let differed = f.claimed.len() + f.sync.len();
        let mut rest: VecDeque<Vec<String>> =
            f.sync.chunks(SYNC_DOCS_MAX).map(<[_]>::to_vec).collect();
        match rest.pop_front() {
            Some(ids) => self.start_sync(ids, Purpose::Cycle { rest, differed }, out),
            None => self.cycle_finished(differed, out),
        }
    }

    fn cycle_finished(&mut self, differed: usize, out: &mut Vec<Output>) {
        out.push(Output::CycleDone(Ok(differed)));
        self.succeeded(out);
    }

    fn on_made(&mut self, ctx: &mut Ctx<'_>, t: Token, msgs: Msgs, out: &mut Vec<Output>) {
        let Job::Sync {
            token,
            making: true,
            ..
        } = &self.job
        else {
            return;
        };
        if *token != t {
            return;
        }
        let Job::Sync {
            ids,
            rounds,
            purpose,
            ..
        } = std::mem::replace(&mut self.job, Job::Idle)
        else {
            unreachable!("matched above");
        };
        if msgs.is_empty() || rounds >= SYNC_ROUNDS_MAX {
            // Both sides have said everything (or the exchange is left to the next cycle).
            return match purpose {
                Purpose::Push => {
                    if self.sent {
                        self.succeeded(out);
                    }
                }
                Purpose::Cycle { mut rest, differed } => match rest.pop_front() {
                    Some(ids) => self.start_sync(ids, Purpose::Cycle { rest, differed }, out),
                    None => self.cycle_finished(differed, out),
                },
            };
        }
        let _ = ctx;
        let token = self.send(Request::Sync { msgs }, out);
        self.job = Job::Sync {
            token,
            ids,
            rounds: rounds + 1,
            making: false,
            purpose,
        };
    }

    fn on_ingested(
        &mut self,
        ctx: &mut Ctx<'_>,
        t: Token,
        result: Result<usize, Failure>,
        out: &mut Vec<Output>,
    ) {
        let Job::Fetch(f) = &mut self.job else {
            return;
        };
        if !f.ingesting.remove(&t) {
            return;
        }
        match result {
            Ok(_) => self.fetch_next(ctx, out),
            Err(e) => self.fail(
                ctx,
                Failure::new(e.cause, format!("storing fetched documents: {e}")),
                out,
            ),
        }
    }

    fn succeeded(&mut self, out: &mut Vec<Output>) {
        self.job = Job::Idle;
        self.backoff_ms = BACKOFF_MIN_MS;
        if self.failing {
            self.failing = false;
            out.push(Output::Reach(None));
            // Catch up on anything missed while it was away.
            self.last_cycle = None;
        }
    }

    /// The exchange failed: sessions reset, what was not delivered listed again, claims
    /// released, and a backoff before the next try. After it the link retries at once (the
    /// documents put back if any, else a cycle): a peer that was down when first tried (a node
    /// just joining) is reached within a backoff of its return, not one interval later.
    fn fail(&mut self, ctx: &mut Ctx<'_>, failure: Failure, out: &mut Vec<Output>) {
        match std::mem::replace(&mut self.job, Job::Idle) {
            Job::Push { ids, .. } => self.dirty.extend(ids),
            Job::Sync { ids, purpose, .. } => match purpose {
                Purpose::Push => self.dirty.extend(ids),
                Purpose::Cycle { .. } => out.push(Output::CycleDone(Err(failure.clone()))),
            },
            Job::Cycle { .. } => out.push(Output::CycleDone(Err(failure.clone()))),
            Job::Fetch(f) => {
                ctx.claims.release(&f.claimed);
                out.push(Output::CycleDone(Err(failure.clone())));
            }
            Job::Idle => {}
        }
        // Messages made for the old sessions are stale once they are reset: list their
        // documents instead.
        self.dirty.extend(self.ready.drain(..).map(|r| r.id));
        out.push(Output::ResetSessions);
        if !self.failing {
            out.push(Output::Reach(Some(failure)));
        }
        self.failing = true;
        self.retry_at = Some(ctx.now_ms + self.backoff_ms);
        self.backoff_ms = (self.backoff_ms * 2).min(BACKOFF_MAX_MS);
        self.last_cycle = None;
    }
}

fn unexpected(what: &str, resp: &Response) -> Failure {
    Failure::new(
        Cause::Other,
        format!("unexpected answer to {what}: {}", resp.name()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    struct World {
        digest: Digest,
        claims: Claims,
        now: u64,
    }

    impl World {
        fn new() -> World {
            World {
                digest: Digest::default(),
                claims: Claims::default(),
                now: 0,
            }
        }
        fn step(&mut self, link: &mut PeerLink, input: Input) -> Vec<Output> {
            let mut ctx = Ctx {
                now_ms: self.now,
                digest: &mut self.digest,
                claims: &mut self.claims,
                interval_ms: 10_000,
                incompatible: false,
            };
            link.handle(&mut ctx, input)
        }
    }

    fn sent(out: &[Output]) -> Option<(Token, &Request)> {
        out.iter().find_map(|o| match o {
            Output::Send { token, req } => Some((*token, req)),
            _ => None,
        })
    }

    fn ready(id: &str) -> Ready {
        Ready {
            id: id.into(),
            msg: vec![1],
            round: 1,
            pushed: Some(vec![]),
        }
    }

    /// A fresh link starts with a cycle; an in-sync answer ends it.
    fn settled(w: &mut World) -> PeerLink {
        let mut link = PeerLink::new("b", 7);
        let out = w.step(&mut link, Input::Tick);
        let (t, req) = sent(&out).expect("a cycle starts at once");
        assert!(matches!(req, Request::DigestRoot { .. }));
        let out = w.step(
            &mut link,
            Input::Answer {
                token: t,
                resp: Response::InSync,
            },
        );
        assert!(out.contains(&Output::CycleDone(Ok(0))), "{out:?}");
        link
    }

    #[test]
    fn a_push_goes_out_at_once_and_one_request_at_a_time() {
        let mut w = World::new();
        let mut link = settled(&mut w);
        let out = w.step(&mut link, Input::Ready(vec![ready("user/a")]));
        let (t1, req) = sent(&out).expect("pushed at once");
        assert!(matches!(req, Request::Sync { msgs } if msgs.len() == 1));
        // While it is on the wire, more pushes wait.
        assert_eq!(link.backlog(), 1, "the push on the wire is unanswered");
        let out = w.step(&mut link, Input::Ready(vec![ready("user/b")]));
        assert!(
            sent(&out).is_none(),
            "a second request while one is in flight"
        );
        assert_eq!(link.backlog(), 2, "one on the wire, one waiting");
        let out = w.step(
            &mut link,
            Input::Answer {
                token: t1,
                resp: Response::Sync { msgs: vec![] },
            },
        );
        let (t2, req) = sent(&out).expect("the next push follows the answer");
        assert!(matches!(req, Request::Sync { msgs } if msgs[0].0 == "user/b"));
        assert_eq!(link.backlog(), 1, "the answered push no longer counts");
        w.step(
            &mut link,
            Input::Answer {
                token: t2,
                resp: Response::Sync { msgs: vec![] },
            },
        );
        assert_eq!(link.backlog(), 0);
    }

    #[test]
    fn a_failure_resets_lists_again_backs_off_and_retries() {
        let mut w = World::new();
        let mut link = settled(&mut w);
        let out = w.step(&mut link, Input::Ready(vec![ready("user/a")]));
        let (t1, _) = sent(&out).expect("pushed");
        let out = w.step(
            &mut link,
            Input::Failed {
                token: t1,
                failure: Failure::new(Cause::Timeout, "timed out"),
            },
        );
        assert!(out.contains(&Output::ResetSessions));
        assert!(matches!(out.last(), Some(Output::Reach(Some(_)))));
        assert!(
            !link.accepting(),
            "the driver lists documents for a failing peer"
        );
        assert_eq!(link.wake_at(), Some(BACKOFF_MIN_MS));
        // A late answer to the failed request changes nothing.
        let out = w.step(
            &mut link,
            Input::Answer {
                token: t1,
                resp: Response::Sync { msgs: vec![] },
            },
        );
        assert!(out.is_empty(), "{out:?}");
        w.now = BACKOFF_MIN_MS;
        let out = w.step(&mut link, Input::Tick);
        let Some(Output::Make { token, ids }) = out.first() else {
            panic!("the document is synced again: {out:?}");
        };
        assert_eq!(ids, &vec!["user/a".to_string()]);
        let out = w.step(
            &mut link,
            Input::Made {
                token: *token,
                msgs: vec![("user/a".into(), vec![2])],
            },
        );
        let (t, _) = sent(&out).expect("sent");
        let out = w.step(
            &mut link,
            Input::Answer {
                token: t,
                resp: Response::Sync { msgs: vec![] },
            },
        );
        let Some(Output::Apply { token, then, .. }) = out.first() else {
            panic!("{out:?}")
        };
        assert_eq!(*then, Then::Reply);
        let out = w.step(
            &mut link,
            Input::Made {
                token: *token,
                msgs: vec![],
            },
        );
        assert!(out.contains(&Output::Reach(None)), "{out:?}");
        assert!(link.accepting());
        // Back from failing: a catch-up cycle follows at once.
        assert!(matches!(sent(&out), Some((_, Request::DigestRoot { .. }))));
    }

    #[test]
    fn a_cycle_fetches_claimed_documents_and_pipelines_their_ingestion() {
        let mut w = World::new();
        let mut link = PeerLink::new("b", 1);
        let out = w.step(&mut link, Input::Tick);
        let (t, _) = sent(&out).expect("cycle");
        let theirs: Vec<[u8; 32]> = vec![[1; 32]; 256];
        let out = w.step(
            &mut link,
            Input::Answer {
                token: t,
                resp: Response::Buckets { hashes: theirs },
            },
        );
        let (t, req) = sent(&out).expect("bucket docs");
        let Request::BucketDocs { buckets } = req else {
            panic!("{req:?}")
        };
        let ids = ["user/x", "user/y"];
        let docs: Vec<(String, [u8; 32])> = ids
            .iter()
            .filter(|id| buckets.contains(&crate::core::digest::bucket_of(id)))
            .map(|id| (id.to_string(), [2; 32]))
            .collect();
        // Another link already claimed one of them.
        w.claims.claim(vec!["user/y".into()]);
        let out = w.step(
            &mut link,
            Input::Answer {
                token: t,
                resp: Response::BucketDocs { docs },
            },
        );
        let (t, req) = sent(&out).expect("fetch");
        assert_eq!(
            req,
            &Request::Fetch {
                ids: vec!["user/x".into()]
            }
        );
        let out = w.step(
            &mut link,
            Input::Answer {
                token: t,
                resp: Response::Docs {
                    docs: vec![("user/x".into(), vec![9])],
                },
            },
        );
        let Some(Output::Ingest { token, .. }) = out.first() else {
            panic!("{out:?}")
        };
        assert!(w.claims.busy());
        let out = w.step(
            &mut link,
            Input::Ingested {
                token: *token,
                result: Ok(1),
            },
        );
        assert!(out.contains(&Output::CycleDone(Ok(1))), "{out:?}");
        w.claims.release(&["user/y".into()]);
        assert!(!w.claims.busy(), "the link released its claim");
    }
}
