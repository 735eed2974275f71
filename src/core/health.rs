//! Layer: core (sans-IO).
//!
//! Peer health: failure detection from heartbeats, clock-offset estimation, version
//! compatibility. Time comes in as arguments: `mono` (milliseconds on a monotonic clock) drives
//! every timeout; wall-clock readings are used only to estimate clock offsets.
//!
//! Liveness: a peer heard from within `offline_timeout_ms / 2` is ONLINE; silent longer it is
//! SUSPECT; silent for `offline_timeout_ms` it is OFFLINE. SUSPECT sits between the two so one late
//! heartbeat never flips a peer to OFFLINE and back. Any heartbeat heard makes it ONLINE again; a
//! return from OFFLINE counts as a flap.

use std::collections::VecDeque;

/// Samples kept for the offset estimate: the one with the smallest round trip of the last eight
/// is used (its offset error is bounded by half its round trip).
const SAMPLES_MAX: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthConfig {
    pub heartbeat_interval_ms: u64,
    pub offline_timeout_ms: u64,
    pub clock_drift_warn_ms: u64,
}

impl HealthConfig {
    /// The health settings of `settings/global` (whose defaults the schema states).
    pub fn from_settings(s: &crdt_schema::typed::Settings) -> HealthConfig {
        let ms = |v: i64| v.max(1) as u64;
        HealthConfig {
            heartbeat_interval_ms: ms(s.heartbeat_interval_ms),
            offline_timeout_ms: ms(s.offline_timeout_ms),
            clock_drift_warn_ms: ms(s.clock_drift_warn_ms),
        }
    }
}

impl Default for HealthConfig {
    /// The schema's defaults.
    fn default() -> Self {
        HealthConfig::from_settings(&crdt_schema::typed::schema_defaults())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Online,
    Suspect,
    Offline,
}

/// What status shows for a peer, most severe first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Online,
    Suspect,
    Offline,
    Draining,
    ClockDrift,
    Incompatible,
    /// The peer is heard (its heartbeats arrive) but does not answer ours: a one-way cut.
    Unreachable,
    /// The peer's disk is full: it refuses writes (its own and replicated ones).
    DiskFull,
}

/// Why the last exchange with a peer failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    ConnectionRefused,
    TlsFailure,
    Timeout,
    Version,
    Refused,
    Other,
}

/// One heartbeat exchange: our send and receive wall times (t1, t4), the peer's receive and send
/// wall times (t2, t3), and the round trip measured on our monotonic clock.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub t1: i64,
    pub t2: i64,
    pub t3: i64,
    pub t4: i64,
    pub rtt_mono_ms: f64,
}

impl Sample {
    /// NTP: how far the peer's clock is ahead of ours, compensating for the round trip (exact when
    /// the delays both ways are equal; off by at most half the asymmetry otherwise).
    pub fn offset_ms(&self) -> f64 {
        ((self.t2 - self.t1) + (self.t3 - self.t4)) as f64 / 2.0
    }
}

/// A transition worth logging.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Suspect,
    Offline,
    Online { was_offline: bool },
    DriftStarted { offset_ms: f64 },
    DriftEnded,
    Incompatible { version: String },
    Unreachable,
    Reachable,
    DiskFull,
    DiskOk,
}

#[derive(Debug, Clone)]
pub struct PeerHealth {
    started_mono: u64,
    last_heard_mono: Option<u64>,
    pub liveness: Liveness,
    pub flaps: u32,
    samples: VecDeque<Sample>,
    pub version: Option<String>,
    pub draining: bool,
    drifting: bool,
    incompatible: bool,
    pub last_error: Option<(Cause, String, i64)>,
    pub docs_out_of_sync: Option<u64>,
    pub last_cycle_wall_ms: Option<i64>,
    /// Heartbeats in a row whose digest root differed from ours.
    pub root_mismatches: u32,
    /// Since when our heartbeats to the peer have gone unanswered (None: the last one was).
    unanswered_since: Option<u64>,
    unreachable: bool,
    /// The peer says its disk is full.
    pub disk_full: bool,
}

impl PeerHealth {
    pub fn new(now_mono: u64) -> PeerHealth {
        PeerHealth {
            started_mono: now_mono,
            last_heard_mono: None,
            liveness: Liveness::Suspect,
            flaps: 0,
            samples: VecDeque::new(),
            version: None,
            draining: false,
            drifting: false,
            incompatible: false,
            last_error: None,
            docs_out_of_sync: None,
            last_cycle_wall_ms: None,
            root_mismatches: 0,
            unanswered_since: None,
            unreachable: false,
            disk_full: false,
        }
    }

    /// What the peer said of its disk, in a heartbeat or an answer to ours.
    pub fn disk(&mut self, full: bool) -> Vec<Event> {
        let was = std::mem::replace(&mut self.disk_full, full);
        match (was, full) {
            (false, true) => vec![Event::DiskFull],
            (true, false) => vec![Event::DiskOk],
            _ => Vec::new(),
        }
    }

    /// A heartbeat we sent went unanswered (failed or timed out).
    pub fn unanswered(&mut self, now_mono: u64) {
        self.unanswered_since.get_or_insert(now_mono);
    }

    /// The peer was heard from (a heartbeat answered, or one received).
    pub fn heard(
        &mut self,
        now_mono: u64,
        version: &str,
        draining: bool,
        our_version: &str,
    ) -> Vec<Event> {
        let mut ev = Vec::new();
        self.last_heard_mono = Some(now_mono.max(self.last_heard_mono.unwrap_or(0)));
        if self.liveness != Liveness::Online {
            let was_offline = self.liveness == Liveness::Offline;
            if was_offline {
                self.flaps += 1;
            }
            self.liveness = Liveness::Online;
            ev.push(Event::Online { was_offline });
        }
        self.draining = draining;
        let incompatible = !super::proto::compatible(version, our_version);
        if incompatible && !self.incompatible {
            ev.push(Event::Incompatible {
                version: version.to_string(),
            });
        }
        self.incompatible = incompatible;
        self.version = Some(version.to_string());
        ev
    }

    /// A heartbeat we sent was answered.
    pub fn answered(
        &mut self,
        now_mono: u64,
        s: Sample,
        version: &str,
        draining: bool,
        our_version: &str,
        cfg: &HealthConfig,
    ) -> Vec<Event> {
        let mut ev = self.heard(now_mono, version, draining, our_version);
        self.last_error = None;
        self.unanswered_since = None;
        if self.unreachable {
            self.unreachable = false;
            ev.push(Event::Reachable);
        }
        self.samples.push_back(s);
        while self.samples.len() > SAMPLES_MAX {
            self.samples.pop_front();
        }
        if let Some(off) = self.offset_ms() {
            let drifting = off.abs() > cfg.clock_drift_warn_ms as f64;
            if drifting && !self.drifting {
                ev.push(Event::DriftStarted { offset_ms: off });
            } else if !drifting && self.drifting {
                ev.push(Event::DriftEnded);
            }
            self.drifting = drifting;
        }
        ev
    }

    pub fn failed(&mut self, cause: Cause, msg: String, now_wall: i64) {
        self.last_error = Some((cause, msg, now_wall));
    }

    /// Re-evaluates liveness at `now_mono`.
    pub fn tick(&mut self, now_mono: u64, cfg: &HealthConfig) -> Vec<Event> {
        let since = self.last_heard_mono.unwrap_or(self.started_mono);
        let silent = now_mono.saturating_sub(since);
        let want = if silent >= cfg.offline_timeout_ms {
            Liveness::Offline
        } else if silent > cfg.offline_timeout_ms / 2 || self.last_heard_mono.is_none() {
            Liveness::Suspect
        } else {
            Liveness::Online
        };
        let mut ev = Vec::new();
        // Ticks only ever degrade liveness; hearing from the peer restores it.
        let worse = matches!(
            (self.liveness, want),
            (Liveness::Online, Liveness::Suspect | Liveness::Offline)
                | (Liveness::Suspect, Liveness::Offline)
        );
        if worse {
            self.liveness = want;
            ev.push(match want {
                Liveness::Offline => Event::Offline,
                _ => Event::Suspect,
            });
        }
        // Heard, yet our heartbeats have gone unanswered for half the timeout: a one-way cut.
        let unreachable = self.liveness == Liveness::Online
            && self
                .unanswered_since
                .is_some_and(|t| now_mono.saturating_sub(t) > cfg.offline_timeout_ms / 2);
        if unreachable != self.unreachable {
            self.unreachable = unreachable;
            ev.push(if unreachable {
                Event::Unreachable
            } else {
                Event::Reachable
            });
        }
        ev
    }

    /// Milliseconds since last heard, if ever.
    pub fn silent_ms(&self, now_mono: u64) -> Option<u64> {
        self.last_heard_mono.map(|t| now_mono.saturating_sub(t))
    }

    /// The sample with the smallest round trip among the recent ones.
    fn best(&self) -> Option<&Sample> {
        self.samples
            .iter()
            .min_by(|a, b| a.rtt_mono_ms.total_cmp(&b.rtt_mono_ms))
    }

    pub fn offset_ms(&self) -> Option<f64> {
        self.best().map(Sample::offset_ms)
    }

    pub fn rtt_ms(&self) -> Option<f64> {
        self.samples.back().map(|s| s.rtt_mono_ms)
    }

    pub fn incompatible(&self) -> bool {
        self.incompatible
    }

    pub fn status(&self) -> Status {
        match self.liveness {
            Liveness::Offline => Status::Offline,
            Liveness::Suspect => Status::Suspect,
            Liveness::Online if self.incompatible => Status::Incompatible,
            Liveness::Online if self.unreachable => Status::Unreachable,
            Liveness::Online if self.disk_full => Status::DiskFull,
            Liveness::Online if self.drifting => Status::ClockDrift,
            Liveness::Online if self.draining => Status::Draining,
            Liveness::Online => Status::Online,
        }
    }
}

/// The clock check of a join: refused when the joiner's clock is further off than the limit.
/// `offset_ms` is the joiner's clock minus ours.
pub fn check_join_clock(offset_ms: i64, limit_ms: i64) -> Result<(), ClockOffset> {
    if offset_ms.abs() > limit_ms {
        Err(ClockOffset {
            offset_ms,
            limit_ms,
        })
    } else {
        Ok(())
    }
}

/// A joiner's clock is too far off.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the joining node's clock is {:.1} s {} this member's; at most {:.1} s is allowed (settings.join_clock_offset_max_ms): synchronize the clocks (NTP) and retry",
    offset_ms.abs() as f64 / 1000.0,
    if *offset_ms > 0 { "ahead of" } else { "behind" },
    *limit_ms as f64 / 1000.0
)]
pub struct ClockOffset {
    pub offset_ms: i64,
    pub limit_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    const V: &str = "1.0.0";

    /// A simulated pair: heartbeats every interval with a random delay each way; the peer dies at
    /// `dies_at`. Returns the time OFFLINE was first reported, and whether it ever was before.
    fn run(
        seed: u64,
        cfg: HealthConfig,
        delay_max: u64,
        dies_at: u64,
        end: u64,
    ) -> (Option<u64>, bool) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut h = PeerHealth::new(0);
        let mut next_hb = 0;
        let mut answers: Vec<u64> = Vec::new();
        let mut offline_at = None;
        let mut false_offline = false;
        for now in 0..end {
            if now >= next_hb {
                next_hb = now + cfg.heartbeat_interval_ms;
                if now < dies_at {
                    let d = rng.random_range(0..=delay_max) + rng.random_range(0..=delay_max);
                    answers.push(now + d);
                }
            }
            answers.retain(|&t| {
                if t == now {
                    let s = Sample {
                        t1: 0,
                        t2: 0,
                        t3: 0,
                        t4: 0,
                        rtt_mono_ms: 1.0,
                    };
                    h.answered(now, s, V, false, V, &cfg);
                    false
                } else {
                    true
                }
            });
            for e in h.tick(now, &cfg) {
                if e == Event::Offline {
                    if now < dies_at {
                        false_offline = true;
                    }
                    offline_at.get_or_insert(now);
                }
            }
        }
        (offline_at, false_offline)
    }

    #[test]
    fn detects_a_dead_peer_within_timeout_plus_one_heartbeat() {
        let cfg = HealthConfig {
            heartbeat_interval_ms: 200,
            offline_timeout_ms: 1000,
            clock_drift_warn_ms: 1000,
        };
        for seed in 0..200 {
            let (at, false_offline) = run(seed, cfg, 20, 5000, 8000);
            assert!(!false_offline, "seed {seed}: OFFLINE while alive");
            let at = at.unwrap_or_else(|| panic!("seed {seed}: never OFFLINE"));
            assert!(
                at - 5000 <= 1000 + 200,
                "seed {seed}: detected after {} ms",
                at - 5000
            );
        }
    }

    #[test]
    fn no_false_offline_under_delays_below_the_timeout() {
        let cfg = HealthConfig::default();
        // Round trips up to 3 s, with heartbeats every second and a 5 s timeout.
        for seed in 0..100 {
            let (at, _) = run(seed, cfg, 1500, u64::MAX, 60_000);
            assert_eq!(at, None, "seed {seed}: a live peer was marked OFFLINE");
        }
    }

    #[test]
    fn passes_through_suspect_and_counts_flaps() {
        let cfg = HealthConfig::default();
        let mut h = PeerHealth::new(0);
        h.heard(0, V, false, V);
        assert_eq!(h.tick(2600, &cfg), vec![Event::Suspect]);
        assert_eq!(h.status(), Status::Suspect);
        assert_eq!(h.tick(5000, &cfg), vec![Event::Offline]);
        assert_eq!(
            h.heard(5100, V, false, V),
            vec![Event::Online { was_offline: true }]
        );
        assert_eq!(h.flaps, 1);
        assert_eq!(h.status(), Status::Online);
    }

    #[test]
    fn offset_under_asymmetric_delay_is_within_half_the_asymmetry() {
        // The peer's clock is 10 s ahead; the request takes 7 ms, the answer 1 ms.
        let true_offset = 10_000;
        let mut h = PeerHealth::new(0);
        let cfg = HealthConfig::default();
        for (i, (up, down)) in [(7, 1), (30, 30), (2, 9)].into_iter().enumerate() {
            let t1 = 1_000_000 + i as i64 * 1000;
            let t2 = t1 + up + true_offset;
            let t3 = t2 + 1;
            let t4 = t3 - true_offset + down;
            let s = Sample {
                t1,
                t2,
                t3,
                t4,
                rtt_mono_ms: (up + down + 1) as f64,
            };
            let err = (s.offset_ms() - true_offset as f64).abs();
            assert!(
                err <= ((up - down).abs() as f64) / 2.0 + 0.01,
                "error {err}"
            );
            h.answered(i as u64, s, V, false, V, &cfg);
        }
        // The best sample (smallest round trip) wins: (7, 1) with error 3 ms.
        let est = h.offset_ms().unwrap();
        assert!((est - 10_003.0).abs() < 0.01, "estimate {est}");
        assert_eq!(h.status(), Status::ClockDrift);
    }

    #[test]
    fn drift_and_version_refusals() {
        assert!(check_join_clock(500, 60_000).is_ok());
        let e = check_join_clock(-90_000, 60_000).unwrap_err();
        assert!(e.to_string().contains("90.0 s behind"), "{e}");
        let mut h = PeerHealth::new(0);
        let ev = h.heard(0, "2.0.0", false, "1.4.0");
        assert!(ev.contains(&Event::Incompatible {
            version: "2.0.0".into()
        }));
        assert_eq!(h.status(), Status::Incompatible);
        h.heard(1, "1.9.9", false, "1.4.0");
        assert_eq!(h.status(), Status::Online, "minor versions may differ");
    }

    /// A one-way cut: the peer's heartbeats reach us, ours do not reach it (or its answers do not
    /// come back). It shows UNREACHABLE, not ONLINE, and ONLINE again once an answer arrives.
    #[test]
    fn heard_but_unanswered_is_unreachable() {
        let cfg = HealthConfig {
            heartbeat_interval_ms: 100,
            offline_timeout_ms: 1000,
            clock_drift_warn_ms: 1000,
        };
        let mut h = PeerHealth::new(0);
        h.heard(0, "1.0.0", false, "1.0.0");
        assert_eq!(h.status(), Status::Online);
        h.unanswered(100);
        for t in (100..=1000).step_by(100) {
            h.heard(t, "1.0.0", false, "1.0.0");
            let ev = h.tick(t, &cfg);
            if t <= 600 {
                assert_eq!(h.status(), Status::Online, "at {t} ms: {ev:?}");
            }
        }
        assert_eq!(h.status(), Status::Unreachable);
        let s = Sample {
            t1: 0,
            t2: 0,
            t3: 0,
            t4: 0,
            rtt_mono_ms: 1.0,
        };
        let ev = h.answered(1100, s, "1.0.0", false, "1.0.0", &cfg);
        assert!(ev.contains(&Event::Reachable), "{ev:?}");
        assert_eq!(h.status(), Status::Online);
        assert_eq!(h.disk(true), vec![Event::DiskFull]);
        assert_eq!(h.status(), Status::DiskFull);
    }
}
