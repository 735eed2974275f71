//! Layer: admin (imports node, store; the HTTP API's router mounts it).
//!
//! `GET /v1/watch`: the node's committed changes as Server-Sent Events, in commit order.
//!
//! - Each event: `id:` its number in the node's change feed ([`crate::store::feed`]), `event:`
//!   `put` or `delete`, `data:` one line of JSON: `seq`, `kind`, `name`, `origin` (`local`, or
//!   the node that made it, from the change's note; the peer that sent it where no note says),
//!   `by` where known (the principal, for peers' changes too), and `entity` as `GET /v1/entities/{kind}/{name}`
//!   reads it when the event is sent (null once deleted). Secrets are never in it.
//! - Resume: `Last-Event-ID` (or `?since=SEQ`) replays the feed rows after it, then follows live
//!   events, skipping any the replay already sent: the live subscription starts before the
//!   replay reads the store, so nothing falls between them. A position the node cannot replay
//!   from (older than the rows kept, from before an unclean stop, or not yet reached) gets a
//!   first `event: reset`, and the stream goes on from now: the client re-lists.
//! - A reader that falls [`STREAM_BUFFER_BYTES`] of events behind live changes is sent `reset`
//!   and closed; a writer never waits for a reader (the node's change feed is a broadcast channel
//!   and each stream copies from it into its own bounded buffer). The feeder takes every event
//!   already published at once into one chunk, so a commit of many changes (a peer's push of
//!   hundreds of documents) costs one write to the socket, and a reader that keeps up is never
//!   reset for the size of one commit. The bound is in bytes, the memory a stream may hold.
//! - `: keep-alive` comments every [`KEEP_ALIVE`].

use super::auth::Caller;
use crate::node::{ChangeEvent, Node, Origin};
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use crdt_schema::Kind;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

/// Bytes of events a stream holds for a slow reader before it is reset: 4,096 events of 256
/// bytes, as many as the node's change feed keeps for a lagging stream
/// ([`crate::node::state::EVENTS_MAX`]).
pub const STREAM_BUFFER_BYTES: usize = 1 << 20;
/// Chunks a stream's buffer holds (a bound the byte budget normally reaches first).
const STREAM_CHUNKS: usize = 4096;
/// Events published together go out in chunks of about this size.
const CHUNK_BYTES: usize = 64 << 10;
/// A comment line this often keeps proxies and clients from closing an idle stream.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Feed rows read from the store at a time while replaying.
const REPLAY_PAGE: usize = 512;

/// What the watch streams cost, for `/metrics`.
#[derive(Default)]
pub struct WatchMetrics {
    pub open: AtomicI64,
    pub events: AtomicU64,
    pub bytes: AtomicU64,
    pub resets: AtomicU64,
    /// Events buffered in all streams now.
    pub buffered: AtomicI64,
}

pub static METRICS: WatchMetrics = WatchMetrics {
    open: AtomicI64::new(0),
    events: AtomicU64::new(0),
    bytes: AtomicU64::new(0),
    resets: AtomicU64::new(0),
    buffered: AtomicI64::new(0),
};

/// Why a watch request is refused (400).
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("{0}")]
    Kind(#[from] crdt_schema::SchemaError),
    #[error("name={0:?} needs kind=KIND beside it")]
    NameWithoutKind(String),
    #[error("since / Last-Event-ID {0:?} is not an event number")]
    BadSince(String),
}

/// The stream's filters and starting point.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WatchQuery {
    pub kinds: Vec<Kind>,
    pub name: Option<String>,
    pub since: Option<u64>,
}

fn decode(s: &str) -> String {
    let s = s.replace('+', " ");
    percent_encoding::percent_decode_str(&s)
        .decode_utf8_lossy()
        .into_owned()
}

/// Parses `?kind=K&kind=K2&name=N&since=SEQ` and the `Last-Event-ID` header (which wins).
pub fn parse_query(query: Option<&str>, headers: &HeaderMap) -> Result<WatchQuery, WatchError> {
    let mut q = WatchQuery::default();
    let mut since = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match decode(k).as_str() {
            "kind" => {
                let kind = Kind::parse(&decode(v))?;
                if !q.kinds.contains(&kind) {
                    q.kinds.push(kind);
                }
            }
            "name" => q.name = Some(decode(v)),
            "since" => since = Some(decode(v)),
            _ => {}
        }
    }
    if let Some(id) = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.trim().is_empty())
    {
        since = Some(id.trim().to_string());
    }
    if let Some(s) = since {
        q.since = Some(
            s.trim()
                .parse()
                .map_err(|_| WatchError::BadSince(s.chars().take(40).collect::<String>()))?,
        );
    }
    if let Some(n) = &q.name {
        if q.kinds.is_empty() {
            return Err(WatchError::NameWithoutKind(n.chars().take(40).collect()));
        }
    }
    Ok(q)
}

impl WatchQuery {
    fn wants(&self, ev: &ChangeEvent) -> bool {
        (self.kinds.is_empty() || self.kinds.contains(&ev.kind))
            && self.name.as_ref().is_none_or(|n| *n == ev.name)
    }
}

/// One event in SSE form, or None when the caller may not see it.
fn event_text(node: &Node, who: &Caller, ev: &ChangeEvent) -> Option<String> {
    // The entity's JSON text: as its commit left it (live), or as it reads now (replayed).
    let replayed;
    let raw: Option<&[u8]> = match (&ev.entity, ev.alive) {
        (_, false) => None,
        (Some(json), true) => Some(json),
        (None, true) => {
            replayed = node
                .get(ev.kind, &ev.name)
                .ok()
                .flatten()
                .and_then(|v| serde_json::to_vec(&v).ok());
            replayed.as_deref()
        }
    };
    let fields = match raw {
        Some(r) if who.may_see_reads_fields(ev.kind) => serde_json::from_slice::<Value>(r)
            .map(|mut v| v["fields"].take())
            .unwrap_or(Value::Null),
        _ => Value::Null,
    };
    if !who.may_see(ev.kind, &ev.name, &fields) {
        return None;
    }
    // The node that made the change: its note says so; else the peer that sent it.
    let origin = match &ev.origin {
        Origin::Local => "local".to_string(),
        Origin::Remote { peer } => ev.made_on.clone().unwrap_or_else(|| peer.clone()),
    };
    let head = json!({
        "seq": ev.seq,
        "kind": ev.kind.as_str(),
        "name": ev.name,
        "origin": origin,
        "by": ev.by,
    });
    // The entity's text goes in as it is (compact JSON from serde_json: one line), not parsed
    // and printed again.
    let mut data = head.to_string();
    data.pop();
    data.push_str(",\"entity\":");
    match raw.and_then(|r| std::str::from_utf8(r).ok()) {
        Some(text) => data.push_str(text),
        None => data.push_str("null"),
    }
    data.push('}');
    let kind = if ev.alive { "put" } else { "delete" };
    Some(format!("id: {}\nevent: {kind}\ndata: {data}\n\n", ev.seq))
}

fn reset_text(reason: &str, since: Option<u64>, next: u64) -> String {
    let data = json!({"reason": reason, "since": since, "next": next});
    format!("event: reset\ndata: {data}\n\n")
}

/// Counts a stream open while it lives.
struct Open;

impl Open {
    fn new() -> Open {
        METRICS.open.fetch_add(1, Relaxed);
        Open
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        METRICS.open.fetch_sub(1, Relaxed);
    }
}

/// The response: headers now, then the events as the feeder task makes them.
pub fn stream(node: Node, who: Caller, q: WatchQuery) -> Response {
    // Subscribed before anything is read: every change committed from now on reaches `live`.
    let live = node.subscribe();
    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(STREAM_CHUNKS);
    let held = std::sync::Arc::new(AtomicUsize::new(0));
    // The last words of a stream the feeder ended (a reset), sent once the buffer is read.
    let tail: Tail = Default::default();
    tokio::spawn(feed(
        node,
        who,
        q,
        live,
        Out {
            tx,
            tail: tail.clone(),
            held: held.clone(),
        },
    ));
    let body = futures_util::stream::unfold((rx, tail, held), |(mut rx, tail, held)| async move {
        let b = match rx.recv().await {
            Some(c) => {
                release(&held, &c);
                c.bytes
            }
            None => Bytes::from(tail.lock().ok()?.take()?),
        };
        METRICS.bytes.fetch_add(b.len() as u64, Relaxed);
        Some((Ok::<_, std::convert::Infallible>(b), (rx, tail, held)))
    });
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

type Tail = std::sync::Arc<std::sync::Mutex<Option<String>>>;

/// Text of `events` events (or none: a comment) that goes out as one write.
struct Chunk {
    bytes: Bytes,
    events: usize,
}

/// Where a stream's feeder writes: the bounded buffer, the bytes it holds, and the tail read
/// after it.
struct Out {
    tx: tokio::sync::mpsc::Sender<Chunk>,
    tail: Tail,
    held: std::sync::Arc<AtomicUsize>,
}

/// `text` as a chunk counted as held: counted before the reader can take it, so that its
/// release never comes first.
fn hold(out: &Out, text: String, events: usize) -> Chunk {
    out.held.fetch_add(text.len(), Relaxed);
    METRICS.buffered.fetch_add(events as i64, Relaxed);
    Chunk {
        bytes: Bytes::from(text),
        events,
    }
}

/// Uncounts a chunk the reader took, or one that was not queued.
fn release(held: &AtomicUsize, c: &Chunk) {
    held.fetch_sub(c.bytes.len(), Relaxed);
    METRICS.buffered.fetch_sub(c.events as i64, Relaxed);
}

/// Sends `text` into the stream, waiting for room (replay); false once the reader is gone.
async fn send_wait(out: &Out, text: String) -> bool {
    match out.tx.send(hold(out, text, 1)).await {
        Ok(()) => true,
        Err(e) => {
            release(&out.held, &e.0);
            false
        }
    }
}

/// Copies replayed and live events into one stream's buffer (see the module doc).
async fn feed(
    node: Node,
    who: Caller,
    q: WatchQuery,
    mut live: tokio::sync::broadcast::Receiver<ChangeEvent>,
    out: Out,
) {
    let tx = &out;
    let _open = Open::new();
    let store = node.store().clone();
    let bounds = match store.feed_bounds() {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "watch: the change feed cannot be read");
            return;
        }
    };
    // The last number sent (or skipped as filtered): live events up to it were replayed.
    let mut last = bounds.next - 1;
    match q.since {
        None => {}
        Some(s) if s < bounds.floor || s >= bounds.next => {
            let reason = if s >= bounds.next {
                "not_yet"
            } else {
                "too_old"
            };
            METRICS.resets.fetch_add(1, Relaxed);
            if !send_wait(tx, reset_text(reason, Some(s), bounds.next)).await {
                return;
            }
        }
        Some(s) => {
            // Everything after `s`, from the store, then whatever the live feed adds.
            let mut at = s;
            loop {
                let s2 = store.clone();
                let page = match tokio::task::spawn_blocking(move || s2.feed_after(at, REPLAY_PAGE))
                    .await
                {
                    Ok(Ok(p)) => p,
                    _ => return,
                };
                if page.is_empty() {
                    break;
                }
                for (seq, row) in page {
                    at = seq;
                    let Ok(ev) = serde_json::from_slice::<ChangeEvent>(&row) else {
                        continue;
                    };
                    if q.wants(&ev) {
                        if let Some(t) = event_text(&node, &who, &ev) {
                            METRICS.events.fetch_add(1, Relaxed);
                            if !send_wait(tx, t).await {
                                return;
                            }
                        }
                    }
                }
            }
            last = at.max(s);
        }
    }
    let mut tick = tokio::time::interval(KEEP_ALIVE);
    tick.reset();
    loop {
        let first = tokio::select! {
            r = live.recv() => r,
            _ = tick.tick() => {
                match offer(tx, ": keep-alive\n\n".to_string(), 0) {
                    Offered::Gone => return,
                    Offered::Taken | Offered::NoRoom => continue,
                }
            }
        };
        // This event and every one published with it, as one chunk.
        let mut text = String::new();
        let mut events = 0;
        let mut next = first;
        let end = loop {
            let ev = match next {
                Ok(ev) => ev,
                Err(e) => break Some(e),
            };
            if ev.seq > last {
                last = ev.seq;
                if q.wants(&ev) {
                    if let Some(t) = event_text(&node, &who, &ev) {
                        METRICS.events.fetch_add(1, Relaxed);
                        text.push_str(&t);
                        events += 1;
                    }
                }
            }
            if text.len() >= CHUNK_BYTES {
                break None;
            }
            next = match live.try_recv() {
                Ok(ev) => Ok(ev),
                Err(TryRecvError::Empty) => break None,
                Err(TryRecvError::Lagged(n)) => Err(RecvError::Lagged(n)),
                Err(TryRecvError::Closed) => Err(RecvError::Closed),
            };
        };
        if events > 0 {
            match offer(tx, text, events) {
                Offered::Taken => {}
                Offered::Gone => return,
                Offered::NoRoom => {
                    overflow(tx, last);
                    return;
                }
            }
        }
        match end {
            None => {}
            Some(RecvError::Lagged(_)) => {
                overflow(tx, last);
                return;
            }
            Some(RecvError::Closed) => return,
        }
    }
}

enum Offered {
    Taken,
    /// The stream holds [`STREAM_BUFFER_BYTES`] already (or its chunk count is reached).
    NoRoom,
    /// The reader is gone.
    Gone,
}

/// Queues `text` (`events` events) if the stream has room for it, without waiting. An empty
/// buffer takes any chunk, so that an event larger than the bound (an entity near the 4 MiB
/// body limit) reaches a reader that keeps up.
fn offer(out: &Out, text: String, events: usize) -> Offered {
    let held = out.held.load(Relaxed);
    if held > 0 && held + text.len() > STREAM_BUFFER_BYTES {
        return Offered::NoRoom;
    }
    match out.tx.try_send(hold(out, text, events)) {
        Ok(()) => Offered::Taken,
        Err(tokio::sync::mpsc::error::TrySendError::Full(c)) => {
            release(&out.held, &c);
            Offered::NoRoom
        }
        Err(tokio::sync::mpsc::error::TrySendError::Closed(c)) => {
            release(&out.held, &c);
            Offered::Gone
        }
    }
}

/// The reader fell behind: once it has read what is buffered, it gets `reset` and the end of
/// the stream.
fn overflow(out: &Out, last: u64) {
    METRICS.resets.fetch_add(1, Relaxed);
    tracing::info!(last, "watch: a reader fell behind; it is reset and closed");
    if let Ok(mut t) = out.tail.lock() {
        *t = Some(reset_text("slow_reader", Some(last), last + 1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_parse_and_refuse_what_they_cannot_mean() {
        let h = HeaderMap::new();
        let q = parse_query(Some("kind=group&kind=user&kind=group&since=7"), &h).unwrap();
        assert_eq!(q.kinds, vec![Kind::Group, Kind::User]);
        assert_eq!(q.since, Some(7));
        let mut h2 = HeaderMap::new();
        h2.insert("last-event-id", "42".parse().unwrap());
        assert_eq!(parse_query(Some("since=7"), &h2).unwrap().since, Some(42));
        assert!(matches!(
            parse_query(Some("kind=nope"), &h),
            Err(WatchError::Kind(_))
        ));
        assert!(matches!(
            parse_query(Some("name=x"), &h),
            Err(WatchError::NameWithoutKind(_))
        ));
        assert!(matches!(
            parse_query(Some("since=abc"), &h),
            Err(WatchError::BadSince(_))
        ));
        let q = parse_query(Some("kind=user&name=a%20b"), &h).unwrap();
        assert_eq!(q.name.as_deref(), Some("a b"));
    }
}
