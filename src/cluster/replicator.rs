//! Layer: cluster (imports core, store, net, node).
//!
//! One peer's replicator: a thin async loop around the core's [`PeerLink`], which decides
//! everything. The loop feeds it inputs (work from the driver through [`Inbox`], answers and
//! failures of its one request in flight, results of driver jobs, ticks) and carries its outputs
//! out (the request, driver jobs, session resets, health records). It holds no replication logic
//! of its own: the simulator drives the same `PeerLink`.

use super::state::{ClusterState, KindLabel, RequestLabels};
use crate::core::link::{Ctx, Failure, Input, Output, PeerLink, Then, Token};
use crate::core::members::Member;
use crate::core::proto::{Request, Response};
use crate::net::ipc::{CallError, PeerClient};
use crate::node::state::{LinkWork, PeerInbox};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

/// The longest the loop sleeps without a tick, so a changed replication interval takes effect.
const TICK_MAX: Duration = Duration::from_secs(1);

/// What reaches a replicator from outside its loop.
pub enum Mail {
    Work(LinkWork),
    /// Heartbeats saw the digests differ, or the peer came back.
    CycleNow,
}

/// The replicator's mailbox, as the driver (a [`PeerInbox`]) and the heartbeater see it.
pub struct Inbox {
    tx: mpsc::UnboundedSender<Mail>,
    /// The link's [`PeerLink::accepting`], as of its last step.
    accepting: AtomicBool,
    /// The link's [`PeerLink::backlog`], as of its last step.
    backlog: AtomicUsize,
}

impl Inbox {
    pub fn new() -> (Arc<Inbox>, mpsc::UnboundedReceiver<Mail>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Arc::new(Inbox {
                tx,
                accepting: AtomicBool::new(true),
                backlog: AtomicUsize::new(0),
            }),
            rx,
        )
    }

    pub fn cycle_now(&self) {
        let _ = self.tx.send(Mail::CycleNow);
    }
}

impl PeerInbox for Inbox {
    fn accepting(&self) -> bool {
        self.accepting.load(Ordering::Relaxed)
    }
    fn deliver(&self, work: LinkWork) {
        let _ = self.tx.send(Mail::Work(work));
    }
    fn backlog(&self) -> usize {
        self.backlog.load(Ordering::Relaxed)
    }
}

/// A request on the wire: it gives back the client, the link's token, and the outcome.
type Call = Pin<Box<dyn Future<Output = (PeerClient, Token, Result<Response, CallError>)> + Send>>;

/// Runs the link to `peer` until `stop`.
pub async fn run(
    state: Arc<ClusterState>,
    peer: Member,
    tls: Arc<rustls::ClientConfig>,
    inbox: Arc<Inbox>,
    mut rx: mpsc::UnboundedReceiver<Mail>,
    mut stop: watch::Receiver<bool>,
) {
    let node = state.node.clone();
    let cfg = node.config().clone();
    let mut link = PeerLink::new(&peer.id, rand::random());
    let mut client =
        Some(PeerClient::new(&peer.addr, tls, &cfg.cluster_id, &cfg.node_id).expect_key(&peer.key));
    let mut call: Option<Call> = None;
    let mut jobs: JoinSet<Input> = JoinSet::new();
    let mut input = Some(Input::Tick);
    loop {
        if let Some(i) = input.take() {
            let outputs = step(&state, &mut link, i);
            let accepting = link.accepting();
            let backlog = link.backlog();
            let was_accepting = inbox.accepting.swap(accepting, Ordering::Relaxed);
            let was = inbox.backlog.swap(backlog, Ordering::Relaxed);
            if backlog < was || (was_accepting && !accepting) {
                node.published().peers.room_made(&peer.id);
            }
            for o in outputs {
                carry_out(&state, &peer, o, &mut client, &mut call, &mut jobs).await;
            }
        }
        let now = node.clock().mono_ms();
        let sleep = link
            .wake_at()
            .map_or(TICK_MAX, |t| Duration::from_millis(t.saturating_sub(now)))
            .min(TICK_MAX);
        input = tokio::select! {
            mail = rx.recv() => match mail {
                Some(Mail::Work(LinkWork::Ready(r))) => Some(Input::Ready(r)),
                Some(Mail::Work(LinkWork::Dirty(ids))) => Some(Input::Dirty(ids)),
                Some(Mail::CycleNow) => Some(Input::CycleNow),
                None => return,
            },
            (c, token, r) = async { call.as_mut().expect("guarded").await }, if call.is_some() => {
                call = None;
                client = Some(c);
                tracing::debug!(peer = %peer.name, token, answer = %r.as_ref().map(|a| a.name()).unwrap_or("failed"), "link");
                Some(match r {
                    Ok(resp) => Input::Answer { token, resp },
                    Err(e) => Input::Failed { token, failure: Failure::new(e.cause(), e.to_string()) },
                })
            }
            Some(done) = jobs.join_next(), if !jobs.is_empty() => match done {
                Ok(input) => Some(input),
                Err(e) => {
                    tracing::error!(peer = %peer.name, error = %e, "a replication job failed");
                    None
                }
            },
            _ = tokio::time::sleep(sleep) => Some(Input::Tick),
            _ = stop.changed() => return,
        };
    }
}

/// One step of the link, with the node's digest, the claims and the settings in view.
fn step(state: &ClusterState, link: &mut PeerLink, input: Input) -> Vec<Output> {
    let node = &state.node;
    let interval_ms = node.settings().replication_interval_ms.max(1) as u64;
    let incompatible = state.incompatible(link.peer());
    let now_ms = node.clock().mono_ms();
    let published = node.published().clone();
    let mut digest = published.digest();
    let mut claims = state.claims();
    let mut ctx = Ctx {
        now_ms,
        digest: &mut digest,
        claims: &mut claims,
        interval_ms,
        incompatible,
    };
    link.handle(&mut ctx, input)
}

async fn carry_out(
    state: &Arc<ClusterState>,
    peer: &Member,
    out: Output,
    client: &mut Option<PeerClient>,
    call: &mut Option<Call>,
    jobs: &mut JoinSet<Input>,
) {
    let node = state.node.clone();
    let id = peer.id.clone();
    if tracing::enabled!(tracing::Level::DEBUG) {
        tracing::debug!(peer = %peer.name, output = %describe(&out), "link");
    }
    match out {
        Output::Send { token, req } => {
            let Some(mut c) = client.take() else {
                // The link sends one request at a time; this cannot happen.
                tracing::error!(peer = %peer.name, "a second request while one is in flight");
                return;
            };
            let kind = match &req {
                Request::Sync { msgs } => {
                    state.metrics.documents_sent.inc_by(msgs.len() as u64);
                    "sync"
                }
                Request::Fetch { .. } => "fetch",
                _ => "digest",
            };
            let (metrics_state, name) = (state.clone(), peer.name.clone());
            *call = Some(Box::pin(async move {
                let started = std::time::Instant::now();
                let r = c.call(req).await;
                let m = &metrics_state.metrics;
                m.request_seconds
                    .get_or_create(&KindLabel { kind: kind.into() })
                    .observe(started.elapsed().as_secs_f64());
                let outcome = match &r {
                    Ok(Response::Refused { .. }) => "refused",
                    Ok(_) => "ok",
                    Err(_) => "failed",
                };
                m.requests
                    .get_or_create(&RequestLabels {
                        peer: name,
                        kind: kind.into(),
                        outcome: outcome.into(),
                    })
                    .inc();
                (c, token, r)
            }));
        }
        Output::Make { token, ids } => {
            jobs.spawn(async move {
                let msgs = node.sync_out(&id, ids).await.unwrap_or_default();
                Input::Made { token, msgs }
            });
        }
        Output::Apply {
            msgs,
            ids,
            then: Then::Queue { round },
            ..
        } => node.sync_back_later(&id, msgs, ids, round),
        Output::Apply {
            token,
            msgs,
            ids,
            then: Then::Reply,
        } => {
            jobs.spawn(async move {
                match node.sync_back(&id, msgs, ids).await {
                    Ok(msgs) => Input::Made { token, msgs },
                    Err(e) => Input::Failed {
                        token,
                        failure: Failure::new(
                            crate::core::health::Cause::Other,
                            format!("applying the answer: {e}"),
                        ),
                    },
                }
            });
        }
        Output::Ingest { token, docs } => {
            jobs.spawn(async move {
                let result = node
                    .ingest(&id, docs)
                    .await
                    .map_err(|e| Failure::new(crate::core::health::Cause::Other, e.to_string()));
                Input::Ingested { token, result }
            });
        }
        Output::ResetSessions => {
            if let Some(c) = client.as_mut() {
                c.disconnect();
            }
            node.reset_peer(&id).await;
        }
        Output::CycleDone(r) => state.cycle_done(&id, &r),
        Output::Reach(Some(f)) => {
            tracing::warn!(peer = %peer.name, addr = %peer.addr, error = %f, "replication to peer failed");
        }
        Output::Reach(None) => {
            tracing::info!(peer = %peer.name, addr = %peer.addr, "peer reachable again");
        }
    }
}

/// An output in a few words, for debug logs (never the bytes it carries).
fn describe(out: &Output) -> String {
    match out {
        Output::Send { token, req } => format!(
            "send #{token} {}",
            match req {
                Request::Sync { msgs } => format!("sync of {} documents", msgs.len()),
                Request::Fetch { ids } => format!("fetch of {} documents", ids.len()),
                Request::DigestRoot { .. } => "digest root".into(),
                Request::BucketDocs { buckets } => format!("heads of {} buckets", buckets.len()),
                Request::Join(_) => "join".into(),
                Request::Heartbeat(_) => "heartbeat".into(),
            }
        ),
        Output::Make { token, ids } => format!("make #{token} for {} documents", ids.len()),
        Output::Apply {
            token, ids, then, ..
        } => {
            format!("apply #{token} for {} documents, then {then:?}", ids.len())
        }
        Output::Ingest { token, docs } => format!("ingest #{token} of {} documents", docs.len()),
        Output::ResetSessions => "reset sessions".into(),
        Output::CycleDone(r) => format!("cycle done: {r:?}"),
        Output::Reach(r) => format!("reach: {r:?}"),
    }
}
