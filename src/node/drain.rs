//! Layer: node (imports core, store, net).
//!
//! Draining a node's client-facing service (the embedding server's SFTP, FTPS... listeners): no
//! new connections, existing ones finish, and after an optional deadline the ones still open are
//! told to close. Replication, the admin API and IPC are not affected, so a draining node can be
//! watched and undrained.
//!
//! The embedding server asks [`Drain::admit`] for every new connection (None: refuse it), keeps
//! the [`ConnectionGuard`] for the connection's life, and selects on [`ConnectionGuard::closing`]
//! to close it when the deadline passes. [`Drain::drained`] completes when the last guard is
//! gone or the deadline passes.

use serde::Serialize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// Longest drain deadline: a drain is an operation of minutes, and an instant this far ahead is
/// always representable (a deadline of years would overflow the clock).
pub const DEADLINE_MAX: Duration = Duration::from_secs(24 * 3600);

/// Why a drain was not started. Nothing changed: the node serves (or drains) as before.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DrainError {
    #[error("deadline {}: must be at most {} (24h); omit it to drain without one", humantime::format_duration(*.deadline), humantime::format_duration(*.max))]
    DeadlineTooLong { deadline: Duration, max: Duration },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainState {
    Serving,
    Draining { deadline: Option<Instant> },
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainOutcome {
    /// Every connection finished.
    Idle,
    /// The deadline passed with connections still open (they were told to close).
    DeadlinePassed { open: usize },
    /// The node was undrained first.
    Undrained,
}

struct Inner {
    state: watch::Sender<DrainState>,
    active: AtomicUsize,
    idle: Notify,
}

/// The drain switch of one node. Cheap to clone.
#[derive(Clone)]
pub struct Drain {
    inner: Arc<Inner>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            inner: Arc::new(Inner {
                state: watch::Sender::new(DrainState::Serving),
                active: AtomicUsize::new(0),
                idle: Notify::new(),
            }),
        }
    }
}

impl Drain {
    pub fn is_draining(&self) -> bool {
        matches!(*self.inner.state.borrow(), DrainState::Draining { .. })
    }

    /// Whether a new client connection may be accepted.
    pub fn accepting(&self) -> bool {
        !self.is_draining()
    }

    /// A guard for a new connection, or None while draining (refuse the connection).
    pub fn admit(&self) -> Option<ConnectionGuard> {
        if self.is_draining() {
            return None;
        }
        self.inner.active.fetch_add(1, Ordering::SeqCst);
        Some(ConnectionGuard {
            inner: self.inner.clone(),
        })
    }

    /// Connections open now.
    pub fn active(&self) -> usize {
        self.inner.active.load(Ordering::SeqCst)
    }

    /// Starts draining; with a deadline, connections still open then are told to close. A
    /// deadline over [`DEADLINE_MAX`] is refused (nothing changes).
    pub fn try_start(&self, deadline: Option<Duration>) -> Result<(), DrainError> {
        let too_long = |d: Duration| DrainError::DeadlineTooLong {
            deadline: d,
            max: DEADLINE_MAX,
        };
        let deadline = match deadline {
            None => None,
            Some(d) if d > DEADLINE_MAX => return Err(too_long(d)),
            Some(d) => Some(Instant::now().checked_add(d).ok_or_else(|| too_long(d))?),
        };
        self.inner
            .state
            .send_replace(DrainState::Draining { deadline });
        self.inner.idle.notify_waiters();
        Ok(())
    }

    /// Starts draining, as [`Drain::try_start`] does, with a deadline over [`DEADLINE_MAX`]
    /// shortened to it.
    pub fn start(&self, deadline: Option<Duration>) {
        let deadline = deadline.map(|d| d.min(DEADLINE_MAX));
        if let Err(e) = self.try_start(deadline) {
            // Unreachable with a deadline within the bound; drain without one rather than not.
            tracing::warn!(error = %e, "draining without a deadline");
            let _ = self.try_start(None);
        }
    }

    /// Stops draining: new connections are accepted again.
    pub fn stop(&self) {
        self.inner.state.send_replace(DrainState::Serving);
        self.inner.idle.notify_waiters();
    }

    /// The deadline of the current drain, if any.
    pub fn deadline(&self) -> Option<Instant> {
        match *self.inner.state.borrow() {
            DrainState::Draining { deadline } => deadline,
            DrainState::Serving => None,
        }
    }

    /// Completes when the drain is over: every connection gone, the deadline passed, or undrained.
    pub async fn drained(&self) -> DrainOutcome {
        let mut rx = self.inner.state.subscribe();
        loop {
            let idle = self.inner.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            let state = *rx.borrow_and_update();
            let deadline = match state {
                DrainState::Serving => return DrainOutcome::Undrained,
                DrainState::Draining { deadline } => deadline,
            };
            if self.active() == 0 {
                return DrainOutcome::Idle;
            }
            let until_deadline = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = idle => {}
                _ = rx.changed() => {}
                _ = until_deadline => return DrainOutcome::DeadlinePassed { open: self.active() },
            }
        }
    }
}

/// Held for the life of one client connection.
pub struct ConnectionGuard {
    inner: Arc<Inner>,
}

impl ConnectionGuard {
    /// Resolves when this connection must close: the node is draining and its deadline passed.
    pub async fn closing(&self) {
        let mut rx = self.inner.state.subscribe();
        loop {
            let state = *rx.borrow_and_update();
            match state {
                DrainState::Draining { deadline: Some(d) } => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(d) => return,
                        r = rx.changed() => if r.is_err() { std::future::pending::<()>().await },
                    }
                }
                _ => {
                    if rx.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            }
        }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self.inner.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.inner.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_connections_then_the_deadline() {
        let d = Drain::default();
        let g1 = d.admit().unwrap();
        let g2 = d.admit().unwrap();
        d.start(Some(Duration::from_secs(10)));
        assert!(
            d.admit().is_none(),
            "a draining node refuses new connections"
        );
        drop(g1);
        let closing = tokio::spawn(async move {
            g2.closing().await;
            Instant::now()
        });
        let t0 = Instant::now();
        assert_eq!(d.drained().await, DrainOutcome::DeadlinePassed { open: 1 });
        assert_eq!(closing.await.unwrap() - t0, Duration::from_secs(10));
        d.stop();
        assert!(d.admit().is_some());
    }

    /// A deadline past the bound is refused (the error says the bound) and changes nothing; the
    /// largest one the API can be sent never panics; the bound itself works.
    #[tokio::test(start_paused = true)]
    async fn deadlines_are_bounded_and_never_overflow() {
        let d = Drain::default();
        for huge in [
            DEADLINE_MAX + Duration::from_secs(1),
            Duration::from_secs(u64::MAX),
            Duration::MAX,
        ] {
            let e = d.try_start(Some(huge)).expect_err("refused");
            assert!(e.to_string().contains("at most 1day"), "{e}");
            assert!(!d.is_draining(), "a refused drain started");
        }
        // The embedding API shortens it instead, without panicking.
        d.start(Some(Duration::MAX));
        let deadline = d.deadline().expect("a deadline");
        assert_eq!(deadline - Instant::now(), DEADLINE_MAX);
        d.stop();
        d.try_start(Some(DEADLINE_MAX)).expect("the bound itself");
        let g = d.admit();
        assert!(g.is_none(), "draining refuses connections");
        d.stop();
        let g = d.admit().expect("serving again");
        d.try_start(Some(Duration::ZERO)).expect("zero");
        assert_eq!(d.drained().await, DrainOutcome::DeadlinePassed { open: 1 });
        drop(g);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_ends_when_the_last_connection_ends() {
        let d = Drain::default();
        let g = d.admit().unwrap();
        d.start(None);
        let waiter = {
            let d = d.clone();
            tokio::spawn(async move { d.drained().await })
        };
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!waiter.is_finished());
        drop(g);
        assert_eq!(waiter.await.unwrap(), DrainOutcome::Idle);
    }
}
