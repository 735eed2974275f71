//! Layer: net (imports core only).
//!
//! Who may hold a connection to the IPC port, and how many. The TLS server admits clients without
//! a certificate (a joiner has none yet), so until a handshake proves otherwise a connection is
//! anyone's: this module bounds what such connections can cost the node.
//!
//! - Per address, a token bucket ([`RATE_BURST`], [`RATE_PER_SEC`]): charged when a connection is
//!   accepted, given back when its handshake presents a certificate of the cluster CA (members
//!   never spend it). A connection over it is closed right after accept, before its handshake.
//!   The table of addresses is bounded ([`ADDRESSES_MAX`]); idle entries are evicted.
//! - Globally, caps sized from the open-file limit ([`Limits::for_file_limit`]): connections in
//!   their TLS handshake (not yet classified), uncertified connections, and certified ones (in
//!   total and per node ID). A connection over a cap is closed at once, with one exception: when
//!   every handshake slot is taken, the oldest handshake, if it has been running for
//!   [`HANDSHAKE_EVICT_AFTER`] (a real client finishes in milliseconds), is closed to make room,
//!   so connections that stall their handshake cannot keep members from reconnecting.
//! - Every refused connection is counted by [`Reason`] in [`CONNECTIONS`]; the log gets at most
//!   one line per address (rate limit) or per reason (the rest) every [`LOG_INTERVAL`], carrying
//!   how many were refused since the previous line: never one line per refused connection.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Connections one address may open at once without a certificate before it is limited: a
/// member's reconnections are given back, but only once their handshake ends, so a host running
/// several nodes that all reconnect at once needs some room.
pub const RATE_BURST: f64 = 16.0;
/// Connections a second one address may open without a certificate, in the long run. A joiner
/// needs one; a member's reconnections are given back.
pub const RATE_PER_SEC: f64 = 2.0;
/// Addresses whose bucket is tracked at once: each is a few dozen bytes. An address whose bucket
/// is full again (idle for `RATE_BURST / RATE_PER_SEC` = 5 s) is forgotten when room is needed.
pub const ADDRESSES_MAX: usize = 4096;
/// One log line per address (rate limit) or per reason (the rest) in this interval, at most.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Connections without a proven certificate (in their handshake, or uncertified) at most, if the
/// open-file limit allows that many: a quarter of it at most, so the rest stays for members,
/// the admin API and the store.
pub const UNAUTHENTICATED_MAX: usize = 256;
/// Certified connections at most, if the file limit allows (a quarter of it at most). Each member
/// holds a few (replication, heartbeats, member list): this is room for hundreds of peers.
pub const CERTIFIED_MAX: usize = 1024;
/// Certified connections one node ID may hold: a member opens about three.
pub const CERTIFIED_PER_NODE_MAX: usize = 64;
/// A handshake running this long may be closed to make room for a new connection when every
/// handshake slot is taken: a real client (a member, a joiner) finishes in a few milliseconds on
/// a LAN and in a few round trips across a WAN. To keep a member's handshake from completing,
/// a client would have to open more than `handshakes_max` connections in this time, again and
/// again: from many addresses, since each one's rate is limited.
pub const HANDSHAKE_EVICT_AFTER: Duration = Duration::from_millis(500);
/// The table of addresses is swept for idle entries at most this often when it is full.
const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// Why a connection was closed before it was served (or, for the last reasons, after one refused
/// request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Its address opened more connections than its token bucket allows.
    RateLimited,
    /// Too many addresses are being tracked: a new one is refused until some go idle.
    AddressesFull,
    /// Too many connections are in their TLS handshake, none of them old enough to be closed.
    HandshakesFull,
    /// Its TLS handshake was still running after [`HANDSHAKE_EVICT_AFTER`] while every handshake
    /// slot was taken: closed to make room for a new connection.
    Evicted,
    /// Too many connections without a certificate are open.
    UncertifiedFull,
    /// Too many certified connections are open (in total, or from this node ID).
    CertifiedFull,
    /// The TLS handshake failed (not TLS, a certificate of another CA, ...).
    HandshakeFailed,
    /// The TLS handshake did not complete in time.
    HandshakeTimeout,
    /// An uncertified connection sent no request in time.
    Idle,
    /// An uncertified connection asked for something other than a join.
    NotJoin,
    /// An uncertified connection's request was over its size cap.
    TooLarge,
    /// An uncertified connection's request body did not arrive in time.
    TooSlow,
}

impl Reason {
    pub const ALL: [Reason; 12] = [
        Reason::RateLimited,
        Reason::AddressesFull,
        Reason::HandshakesFull,
        Reason::Evicted,
        Reason::UncertifiedFull,
        Reason::CertifiedFull,
        Reason::HandshakeFailed,
        Reason::HandshakeTimeout,
        Reason::Idle,
        Reason::NotJoin,
        Reason::TooLarge,
        Reason::TooSlow,
    ];

    /// A label for metrics (`reason="rate_limited"`).
    pub fn label(self) -> &'static str {
        match self {
            Reason::RateLimited => "rate_limited",
            Reason::AddressesFull => "addresses_full",
            Reason::HandshakesFull => "handshakes_full",
            Reason::Evicted => "handshake_evicted",
            Reason::UncertifiedFull => "uncertified_full",
            Reason::CertifiedFull => "certified_full",
            Reason::HandshakeFailed => "handshake_failed",
            Reason::HandshakeTimeout => "handshake_timeout",
            Reason::Idle => "idle",
            Reason::NotJoin => "not_join",
            Reason::TooLarge => "too_large",
            Reason::TooSlow => "too_slow",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What kind of connection holds a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Accepted, in its TLS handshake: not yet classified.
    Handshaking,
    /// Its handshake presented no certificate: it may only join.
    Uncertified,
    /// Its handshake presented a certificate of the cluster CA.
    Certified,
}

impl Class {
    pub const ALL: [Class; 3] = [Class::Handshaking, Class::Uncertified, Class::Certified];

    pub fn label(self) -> &'static str {
        match self {
            Class::Handshaking => "handshaking",
            Class::Uncertified => "uncertified",
            Class::Certified => "certified",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Counters of the IPC port, for `/metrics`: connections refused by reason, connections open by
/// class, failed accepts.
#[derive(Debug)]
pub struct Counters {
    refused: [AtomicU64; Reason::ALL.len()],
    open: [AtomicU64; Class::ALL.len()],
    accept_failed: AtomicU64,
}

/// The counters of every IPC server of this process.
pub static CONNECTIONS: Counters = Counters::new();

impl Counters {
    pub const fn new() -> Counters {
        Counters {
            refused: [const { AtomicU64::new(0) }; Reason::ALL.len()],
            open: [const { AtomicU64::new(0) }; Class::ALL.len()],
            accept_failed: AtomicU64::new(0),
        }
    }

    /// Connections refused for this reason since the process started.
    pub fn refused(&self, r: Reason) -> u64 {
        self.refused[r.index()].load(Ordering::Relaxed)
    }

    /// Every reason with its count, in [`Reason::ALL`]'s order.
    pub fn refused_all(&self) -> [(Reason, u64); Reason::ALL.len()] {
        Reason::ALL.map(|r| (r, self.refused(r)))
    }

    /// Connections of this class open now.
    pub fn open(&self, c: Class) -> u64 {
        self.open[c.index()].load(Ordering::Relaxed)
    }

    /// `accept` calls that failed (file limit reached, ...).
    pub fn accept_failed(&self) -> u64 {
        self.accept_failed.load(Ordering::Relaxed)
    }

    pub(crate) fn count_refused(&self, r: Reason) {
        self.refused[r.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_accept_failed(&self) {
        self.accept_failed.fetch_add(1, Ordering::Relaxed);
    }
}

impl Default for Counters {
    fn default() -> Self {
        Counters::new()
    }
}

/// The caps of one IPC server.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Connections in their TLS handshake at once.
    pub handshakes_max: usize,
    /// Uncertified connections open at once (after their handshake).
    pub uncertified_max: usize,
    /// Certified connections open at once.
    pub certified_max: usize,
    /// Certified connections of one node ID open at once.
    pub certified_per_node_max: usize,
    /// Token bucket per address: its size and refill rate (connections a second).
    pub burst: f64,
    pub per_sec: f64,
    /// Addresses tracked at once.
    pub addresses_max: usize,
}

impl Limits {
    /// The caps for a process allowed `soft` open files: connections without a proven certificate
    /// (half in their handshake, half uncertified) take at most min(256, soft / 4) descriptors,
    /// certified ones at most min(1024, soft / 4), so at least half of the limit stays for the
    /// admin API, the store, outgoing connections to peers and whatever embeds the node.
    pub fn for_file_limit(soft: u64) -> Limits {
        let quarter = usize::try_from(soft / 4).unwrap_or(usize::MAX);
        let unauthenticated = quarter.clamp(2, UNAUTHENTICATED_MAX);
        let handshakes_max = unauthenticated / 2;
        Limits {
            handshakes_max,
            uncertified_max: unauthenticated - handshakes_max,
            certified_max: quarter.clamp(1, CERTIFIED_MAX),
            certified_per_node_max: CERTIFIED_PER_NODE_MAX,
            burst: RATE_BURST,
            per_sec: RATE_PER_SEC,
            addresses_max: ADDRESSES_MAX,
        }
    }
}

/// The key of an address's bucket: IPv4 addresses (mapped ones too) as they are, IPv6 by their
/// /64 (one host usually has a whole /64).
fn bucket_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[derive(Debug, Clone)]
struct Bucket {
    tokens: f64,
    at: Instant,
    /// Connections refused since the last log line about this address.
    refused: u64,
    logged: Option<Instant>,
}

impl Bucket {
    fn refill(&mut self, now: Instant, l: &Limits) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * l.per_sec).min(l.burst);
        self.at = now;
    }

    /// Forgetting it changes nothing: it is full and owes no log line.
    fn idle(&self, now: Instant, l: &Limits) -> bool {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens + dt * l.per_sec >= l.burst
            && self
                .logged
                .is_none_or(|t| now.saturating_duration_since(t) >= LOG_INTERVAL)
    }
}

/// What the bucket table says about a new connection.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Verdict {
    Pass,
    /// Over the rate; `Some(n)`: write a log line, `n` refused since the previous one.
    Limited(Option<u64>),
    /// The table is full of active addresses.
    Full,
}

/// The per-address token buckets: sans-IO, the time is an argument.
#[derive(Debug, Default)]
struct Buckets {
    map: HashMap<IpAddr, Bucket>,
    swept: Option<Instant>,
}

impl Buckets {
    fn take(&mut self, ip: IpAddr, now: Instant, l: &Limits) -> Verdict {
        let key = bucket_key(ip);
        if !self.map.contains_key(&key) && self.map.len() >= l.addresses_max {
            let due = self
                .swept
                .is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_EVERY);
            if due {
                self.swept = Some(now);
                self.map.retain(|_, b| !b.idle(now, l));
            }
            if self.map.len() >= l.addresses_max {
                return Verdict::Full;
            }
        }
        let b = self.map.entry(key).or_insert(Bucket {
            tokens: l.burst,
            at: now,
            refused: 0,
            logged: None,
        });
        b.refill(now, l);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Verdict::Pass;
        }
        b.refused += 1;
        let due = b
            .logged
            .is_none_or(|t| now.saturating_duration_since(t) >= LOG_INTERVAL);
        if !due {
            return Verdict::Limited(None);
        }
        let n = b.refused;
        b.refused = 0;
        b.logged = Some(now);
        Verdict::Limited(Some(n))
    }

    /// Gives a token back (a connection that proved a certificate).
    fn refund(&mut self, ip: IpAddr, now: Instant, l: &Limits) {
        if let Some(b) = self.map.get_mut(&bucket_key(ip)) {
            b.refill(now, l);
            b.tokens = (b.tokens + 1.0).min(l.burst);
        }
    }
}

/// Log lines due per reason: at most one per [`LOG_INTERVAL`], with the count since the last.
/// The log gate's topic for failed accepts (after the reasons').
const ACCEPT_FAILED: usize = Reason::ALL.len();

#[derive(Debug, Default)]
struct LogGate {
    last: [(Option<Instant>, u64); Reason::ALL.len() + 1],
}

impl LogGate {
    /// `topic`: a [`Reason`]'s index, or [`ACCEPT_FAILED`].
    fn note(&mut self, topic: usize, now: Instant) -> Option<u64> {
        let (at, n) = self.last.get_mut(topic)?;
        *n += 1;
        if at.is_some_and(|t| now.saturating_duration_since(t) < LOG_INTERVAL) {
            return None;
        }
        *at = Some(now);
        Some(std::mem::take(n))
    }
}

/// The connections in their TLS handshake, oldest first (sequence numbers only grow).
#[derive(Debug, Default)]
struct Handshakes {
    next: u64,
    live: BTreeMap<u64, (Instant, Arc<Notify>)>,
}

/// What the handshake table says about a new connection.
#[derive(Debug)]
enum Entry {
    /// A slot: its number and the signal that closes it.
    In(u64, Arc<Notify>),
    /// A slot taken from the oldest handshake, which must be closed (its signal).
    Evicting(u64, Arc<Notify>, Arc<Notify>),
    /// Every slot is taken by a handshake younger than [`HANDSHAKE_EVICT_AFTER`].
    Full,
}

impl Handshakes {
    fn enter(&mut self, now: Instant, max: usize) -> Entry {
        let mut evicted = None;
        if self.live.len() >= max {
            let oldest_is_stale = self.live.first_key_value().is_some_and(|(_, (at, _))| {
                now.saturating_duration_since(*at) >= HANDSHAKE_EVICT_AFTER
            });
            if !oldest_is_stale {
                return Entry::Full;
            }
            evicted = self.live.pop_first().map(|(_, (_, close))| close);
        }
        let seq = self.next;
        self.next += 1;
        let close = Arc::new(Notify::new());
        self.live.insert(seq, (now, close.clone()));
        match evicted {
            Some(victim) => Entry::Evicting(seq, close, victim),
            None => Entry::In(seq, close),
        }
    }

    /// Whether `seq` still held a slot (an evicted handshake no longer does).
    fn leave(&mut self, seq: u64) -> bool {
        self.live.remove(&seq).is_some()
    }
}

/// The admission state of one IPC server.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    counters: &'static Counters,
    buckets: Mutex<Buckets>,
    handshakes: Mutex<Handshakes>,
    /// Connections open by class (those in their handshake mirror `handshakes`).
    open: [AtomicUsize; Class::ALL.len()],
    per_node: Mutex<HashMap<String, usize>>,
    logs: Mutex<LogGate>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Admission {
    pub fn new(limits: Limits, counters: &'static Counters) -> Arc<Admission> {
        Arc::new(Admission {
            limits,
            counters,
            buckets: Mutex::new(Buckets::default()),
            handshakes: Mutex::new(Handshakes::default()),
            open: [const { AtomicUsize::new(0) }; Class::ALL.len()],
            per_node: Mutex::new(HashMap::new()),
            logs: Mutex::new(LogGate::default()),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A connection just accepted from `remote`: a slot for its handshake, or the reason to close
    /// it now (counted and, at most once per interval, logged).
    pub fn accept(self: &Arc<Self>, remote: IpAddr) -> Result<Handshaking, Reason> {
        let now = Instant::now();
        let verdict = lock(&self.buckets).take(remote, now, &self.limits);
        match verdict {
            Verdict::Pass => {}
            Verdict::Limited(log) => {
                self.counters.count_refused(Reason::RateLimited);
                if let Some(n) = log {
                    tracing::debug!(
                        peer = %remote,
                        refused = n,
                        burst = self.limits.burst,
                        per_sec = self.limits.per_sec,
                        "IPC connections from this address over the rate limit are closed before their TLS handshake"
                    );
                }
                return Err(Reason::RateLimited);
            }
            Verdict::Full => {
                self.refused(Reason::AddressesFull, remote, "");
                return Err(Reason::AddressesFull);
            }
        }
        let entry = lock(&self.handshakes).enter(now, self.limits.handshakes_max);
        let i = Class::Handshaking.index();
        let (seq, close) = match entry {
            Entry::Full => {
                self.refused(Reason::HandshakesFull, remote, "");
                return Err(Reason::HandshakesFull);
            }
            Entry::Evicting(seq, close, victim) => {
                // The victim's slot is this one now: the count does not change.
                victim.notify_one();
                self.refused(Reason::Evicted, remote, "");
                (seq, close)
            }
            Entry::In(seq, close) => {
                self.open[i].fetch_add(1, Ordering::AcqRel);
                self.counters.open[i].fetch_add(1, Ordering::Relaxed);
                (seq, close)
            }
        };
        Ok(Handshaking {
            remote,
            seq,
            close,
            adm: self.clone(),
        })
    }

    /// Counts a refused connection and logs it if no line was written for this reason in the
    /// last [`LOG_INTERVAL`]. `detail` says more (an error), or is empty.
    pub fn refused(&self, r: Reason, remote: IpAddr, detail: &str) {
        self.counters.count_refused(r);
        let Some(n) = lock(&self.logs).note(r.index(), Instant::now()) else {
            return;
        };
        let l = &self.limits;
        match r {
            Reason::HandshakesFull | Reason::UncertifiedFull | Reason::CertifiedFull => {
                tracing::warn!(
                    peer = %remote,
                    reason = r.label(),
                    refused = n,
                    handshakes_max = l.handshakes_max,
                    uncertified_max = l.uncertified_max,
                    certified_max = l.certified_max,
                    certified_per_node_max = l.certified_per_node_max,
                    "IPC connections over a cap are closed at once (count since the last such line)"
                )
            }
            Reason::Evicted => tracing::warn!(
                peer = %remote,
                refused = n,
                handshakes_max = l.handshakes_max,
                evict_after = ?HANDSHAKE_EVICT_AFTER,
                "IPC handshakes still running long after accept are closed to make room: every handshake slot is taken (count since the last such line)"
            ),
            Reason::AddressesFull => tracing::warn!(
                peer = %remote,
                refused = n,
                addresses_max = l.addresses_max,
                "IPC connections from new addresses are closed: too many addresses opened connections without a certificate in the last seconds"
            ),
            Reason::HandshakeFailed => tracing::warn!(
                peer = %remote,
                refused = n,
                error = %detail,
                "IPC TLS handshake refused (count since the last such line)"
            ),
            _ => tracing::debug!(
                peer = %remote,
                reason = r.label(),
                refused = n,
                detail = %detail,
                "IPC connection closed (count since the last such line)"
            ),
        }
    }

    /// A failed `accept`: counted; logged at most once per interval.
    pub fn accept_failed(&self, e: &std::io::Error) {
        self.counters.count_accept_failed();
        if let Some(n) = lock(&self.logs).note(ACCEPT_FAILED, Instant::now()) {
            tracing::warn!(error = %e, failed = n, "IPC accept failed (count since the last such line)");
        }
    }

    /// A slot of a class of classified connections (handshakes have their own table).
    fn slot(self: &Arc<Self>, class: Class) -> Option<Slot> {
        let max = match class {
            Class::Handshaking => return None,
            Class::Uncertified => self.limits.uncertified_max,
            Class::Certified => self.limits.certified_max,
        };
        self.open[class.index()]
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        self.counters.open[class.index()].fetch_add(1, Ordering::Relaxed);
        Some(Slot {
            adm: self.clone(),
            class,
        })
    }

    /// Connections of this class this server holds now.
    pub fn open(&self, class: Class) -> usize {
        self.open[class.index()].load(Ordering::Acquire)
    }
}

/// A slot of one class, given back when dropped.
#[derive(Debug)]
struct Slot {
    adm: Arc<Admission>,
    class: Class,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let i = self.class.index();
        self.adm.open[i].fetch_sub(1, Ordering::AcqRel);
        self.adm.counters.open[i].fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection in its TLS handshake. Dropped, its slot is given back (unless it was evicted:
/// then the connection that evicted it holds it already).
#[derive(Debug)]
pub struct Handshaking {
    remote: IpAddr,
    seq: u64,
    close: Arc<Notify>,
    adm: Arc<Admission>,
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        if lock(&self.adm.handshakes).leave(self.seq) {
            let i = Class::Handshaking.index();
            self.adm.open[i].fetch_sub(1, Ordering::AcqRel);
            self.adm.counters.open[i].fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A classified connection holding its slot (and, if certified, its node's share) until dropped.
#[derive(Debug)]
pub struct Admitted {
    _slot: Slot,
    node: Option<(Arc<Admission>, String)>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some((adm, node)) = self.node.take() {
            let mut per_node = lock(&adm.per_node);
            if let Some(n) = per_node.get_mut(&node) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    per_node.remove(&node);
                }
            }
        }
    }
}

impl Handshaking {
    /// Completes when this handshake was closed to make room for a newer connection (counted
    /// already): the connection must be dropped.
    pub async fn evicted(&self) {
        self.close.notified().await
    }

    /// The handshake presented a certificate of the cluster CA naming `node`: its address gets
    /// its token back, and it takes a certified slot, or is refused (counted, logged).
    pub fn certified(self, node: &str) -> Result<Admitted, Reason> {
        let adm = self.adm.clone();
        lock(&adm.buckets).refund(self.remote, Instant::now(), &adm.limits);
        let slot = adm.slot(Class::Certified).filter(|_| {
            let mut per_node = lock(&adm.per_node);
            let n = per_node.entry(node.to_string()).or_insert(0);
            let room = *n < adm.limits.certified_per_node_max;
            if room {
                *n += 1;
            }
            room
        });
        let Some(slot) = slot else {
            adm.refused(Reason::CertifiedFull, self.remote, node);
            return Err(Reason::CertifiedFull);
        };
        drop(self);
        Ok(Admitted {
            _slot: slot,
            node: Some((adm, node.to_string())),
        })
    }

    /// The handshake presented no certificate: an uncertified slot, or refused.
    pub fn uncertified(self) -> Result<Admitted, Reason> {
        let Some(slot) = self.adm.slot(Class::Uncertified) else {
            self.adm.refused(Reason::UncertifiedFull, self.remote, "");
            return Err(Reason::UncertifiedFull);
        };
        drop(self);
        Ok(Admitted {
            _slot: slot,
            node: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            handshakes_max: 3,
            uncertified_max: 2,
            certified_max: 4,
            certified_per_node_max: 2,
            burst: 10.0,
            per_sec: 2.0,
            addresses_max: 3,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an address")
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate_and_logs_once_per_interval() {
        let l = limits();
        let mut b = Buckets::default();
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        for _ in 0..10 {
            assert_eq!(b.take(a, t0, &l), Verdict::Pass);
        }
        assert_eq!(b.take(a, t0, &l), Verdict::Limited(Some(1)));
        assert_eq!(b.take(a, t0, &l), Verdict::Limited(None));
        // Half a second later: one more.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(b.take(a, t1, &l), Verdict::Pass);
        assert_eq!(b.take(a, t1, &l), Verdict::Limited(None));
        // Another address is not affected.
        assert_eq!(b.take(ip("192.0.2.2"), t1, &l), Verdict::Pass);
        // After the log interval, the next refusal logs again, with the count since.
        let t2 = t0 + LOG_INTERVAL;
        for _ in 0..10 {
            assert_eq!(b.take(a, t2, &l), Verdict::Pass);
        }
        assert_eq!(b.take(a, t2, &l), Verdict::Limited(Some(3)));
    }

    #[test]
    fn a_refund_gives_a_token_back() {
        let l = limits();
        let mut b = Buckets::default();
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        for _ in 0..10 {
            assert_eq!(b.take(a, t0, &l), Verdict::Pass);
        }
        b.refund(a, t0, &l);
        assert_eq!(b.take(a, t0, &l), Verdict::Pass);
        assert!(matches!(b.take(a, t0, &l), Verdict::Limited(_)));
    }

    #[test]
    fn the_table_is_bounded_and_forgets_idle_addresses() {
        let l = limits();
        let mut b = Buckets::default();
        let t0 = Instant::now();
        for a in ["192.0.2.1", "192.0.2.2", "192.0.2.3"] {
            assert_eq!(b.take(ip(a), t0, &l), Verdict::Pass);
        }
        assert_eq!(b.take(ip("192.0.2.4"), t0, &l), Verdict::Full);
        assert_eq!(b.map.len(), 3);
        // Known addresses still pass.
        assert_eq!(b.take(ip("192.0.2.1"), t0, &l), Verdict::Pass);
        // Once their buckets are full again, they are forgotten for a new one.
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(b.take(ip("192.0.2.4"), t1, &l), Verdict::Pass);
        assert!(b.map.len() <= 3, "{}", b.map.len());
    }

    #[test]
    fn ipv6_addresses_share_their_64_and_mapped_ones_their_ipv4() {
        assert_eq!(
            bucket_key(ip("2001:db8:1:2:aaaa::1")),
            bucket_key(ip("2001:db8:1:2:bbbb::9"))
        );
        assert_ne!(
            bucket_key(ip("2001:db8:1:2::1")),
            bucket_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(bucket_key(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
    }

    #[test]
    fn caps_hold_per_class_and_per_node_and_slots_come_back() {
        static C: Counters = Counters::new();
        let adm = Admission::new(limits(), &C);
        let a = ip("192.0.2.1");
        let h: Vec<_> = (0..3).map(|_| adm.accept(a).expect("a slot")).collect();
        assert_eq!(adm.accept(a).err(), Some(Reason::HandshakesFull));
        assert_eq!(C.refused(Reason::HandshakesFull), 1);
        let mut h = h.into_iter();
        let u1 = h.next().unwrap().uncertified().expect("uncertified");
        let u2 = h.next().unwrap().uncertified().expect("uncertified");
        assert_eq!(adm.open(Class::Uncertified), 2);
        assert_eq!(
            h.next().unwrap().uncertified().err(),
            Some(Reason::UncertifiedFull)
        );
        assert_eq!(adm.open(Class::Handshaking), 0);
        drop((u1, u2));
        assert_eq!(adm.open(Class::Uncertified), 0);
        let c1 = adm.accept(a).unwrap().certified("n1").expect("certified");
        let c2 = adm.accept(a).unwrap().certified("n1").expect("certified");
        assert_eq!(
            adm.accept(a).unwrap().certified("n1").err(),
            Some(Reason::CertifiedFull),
            "a third connection of one node"
        );
        let c3 = adm
            .accept(a)
            .unwrap()
            .certified("n2")
            .expect("another node");
        let c4 = adm
            .accept(a)
            .unwrap()
            .certified("n3")
            .expect("another node");
        assert_eq!(
            adm.accept(a).unwrap().certified("n4").err(),
            Some(Reason::CertifiedFull),
            "over the total"
        );
        drop((c1, c2, c3, c4));
        assert_eq!(adm.open(Class::Certified), 0);
        assert!(lock(&adm.per_node).is_empty());
        assert_eq!(C.open(Class::Certified), 0);
    }

    #[test]
    fn reasons_are_indexed_in_their_order() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r:?}");
        }
        for (i, c) in Class::ALL.iter().enumerate() {
            assert_eq!(c.index(), i, "{c:?}");
        }
    }

    #[test]
    fn a_full_handshake_table_evicts_only_a_stale_handshake_oldest_first() {
        let mut t = Handshakes::default();
        let t0 = Instant::now();
        let a = match t.enter(t0, 2) {
            Entry::In(seq, _) => seq,
            e => panic!("{e:?}"),
        };
        let t1 = t0 + HANDSHAKE_EVICT_AFTER / 2;
        assert!(matches!(t.enter(t1, 2), Entry::In(..)));
        assert!(
            matches!(t.enter(t1, 2), Entry::Full),
            "nothing is stale yet"
        );
        // The first one is stale now; the second is not.
        let t2 = t0 + HANDSHAKE_EVICT_AFTER;
        match t.enter(t2, 2) {
            Entry::Evicting(_, _, _) => {}
            e => panic!("{e:?}"),
        }
        assert_eq!(t.live.len(), 2);
        assert!(!t.leave(a), "the evicted one left its slot already");
        assert!(matches!(t.enter(t2, 2), Entry::Full));
    }

    #[test]
    fn an_evicted_handshake_is_told_and_its_slot_is_not_given_back_twice() {
        static C: Counters = Counters::new();
        let adm = Admission::new(limits(), &C);
        let a = ip("192.0.2.1");
        let first = adm.accept(a).expect("a slot");
        // Make it stale.
        lock(&adm.handshakes)
            .live
            .values_mut()
            .for_each(|(at, _)| *at -= HANDSHAKE_EVICT_AFTER);
        let _more: Vec<_> = (0..2).map(|_| adm.accept(a).expect("a slot")).collect();
        let newest = adm.accept(a).expect("the stale one makes room");
        assert_eq!(C.refused(Reason::Evicted), 1);
        assert_eq!(adm.open(Class::Handshaking), 3);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime");
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(1), first.evicted())
                .await
                .expect("the evicted handshake is told");
        });
        drop(first);
        assert_eq!(adm.open(Class::Handshaking), 3, "given back twice");
        drop(newest);
        assert_eq!(adm.open(Class::Handshaking), 2);
    }

    #[test]
    fn caps_leave_most_of_the_file_limit_to_members_and_the_api() {
        let l = Limits::for_file_limit(1024);
        assert_eq!((l.handshakes_max, l.uncertified_max), (128, 128));
        assert_eq!(l.certified_max, 256);
        let l = Limits::for_file_limit(1 << 20);
        assert_eq!(l.handshakes_max + l.uncertified_max, UNAUTHENTICATED_MAX);
        assert_eq!(l.certified_max, CERTIFIED_MAX);
        let l = Limits::for_file_limit(64);
        assert_eq!(l.handshakes_max + l.uncertified_max, 16);
        let l = Limits::for_file_limit(0);
        assert!(l.handshakes_max >= 1 && l.uncertified_max >= 1 && l.certified_max >= 1);
    }
}
