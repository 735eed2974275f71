//! Layer: store (imports core only).
//!
//! The change feed: one row per committed change of an entity, numbered by a per-node sequence,
//! written in the transaction of the change itself, so a row is durable exactly when its change
//! is. `GET /v1/watch` replays rows after a client's last event, then follows live events.
//!
//! Rows are not in the write-ahead log. A clean stop checkpoints, so every row survives it; an
//! unclean one loses the rows of the commits redb had not made durable, although the log
//! brings their changes back. Recovery therefore moves the sequence's **base** past every
//! number handed out before (by 2^32): numbers are never reused, and a client resuming from
//! before the base is told to re-list (the node cannot know what it missed).
//!
//! The newest [`FEED_KEEP`] rows are kept; resuming from before the oldest kept also re-lists.

use super::{StoreError, WriteTxn, FEED, META};
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};

const FEED_BASE: &str = "feed_base";
/// Rows kept: a client may resume from any of the last this many changes.
pub const FEED_KEEP: u64 = 100_000;
/// How far an unclean recovery moves the base: more numbers than a node hands out between two
/// checkpoints.
const FEED_GAP: u64 = 1 << 32;

/// The numbering of the feed as stored: `next` is the number of the next change, `floor` the
/// earliest position a client may resume after and still get every later change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedBounds {
    pub next: u64,
    pub floor: u64,
}

fn bounds(
    feed: &impl ReadableTable<u64, &'static [u8]>,
    meta: Option<&impl ReadableTable<&'static str, u64>>,
) -> Result<FeedBounds, StoreError> {
    let base = match meta {
        Some(m) => m.get(FEED_BASE)?.map(|v| v.value()).unwrap_or(1),
        None => 1,
    }
    .max(1);
    let first = feed.first()?.map(|(k, _)| k.value());
    let last = feed.last()?.map(|(k, _)| k.value());
    let next = last.map_or(base, |l| (l + 1).max(base));
    let floor = first.unwrap_or(next).max(base) - 1;
    Ok(FeedBounds { next, floor })
}

impl super::Store {
    /// The feed's numbering as committed.
    pub fn feed_bounds(&self) -> Result<FeedBounds, StoreError> {
        let db = self.db();
        let txn = db.begin_read()?;
        let feed = match txn.open_table(FEED) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => {
                return Ok(FeedBounds { next: 1, floor: 0 })
            }
            Err(e) => return Err(e.into()),
        };
        let meta = txn.open_table(META).ok();
        bounds(&feed, meta.as_ref())
    }

    /// Up to `limit` rows after `after`, in order.
    pub fn feed_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let db = self.db();
        let txn = db.begin_read()?;
        let feed = match txn.open_table(FEED) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for r in feed.range(after.saturating_add(1)..)?.take(limit) {
            let (k, v) = r?;
            out.push((k.value(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Rows kept now (for tests and metrics).
    pub fn feed_len(&self) -> Result<u64, StoreError> {
        let db = self.db();
        let txn = db.begin_read()?;
        match txn.open_table(FEED) {
            Ok(t) => Ok(t.len()?),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }
}

impl WriteTxn {
    /// The feed's numbering as this transaction sees it.
    pub fn feed_bounds(&self) -> Result<FeedBounds, StoreError> {
        let feed = self.txn.open_table(FEED)?;
        let meta = self.txn.open_table(META)?;
        bounds(&feed, Some(&meta))
    }

    /// Appends rows (numbered by the caller, above every row stored) and drops those older than
    /// the newest [`FEED_KEEP`].
    pub fn feed_append(&mut self, rows: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
        let Some(last) = rows.last().map(|r| r.0) else {
            return Ok(());
        };
        let mut feed = self.txn.open_table(FEED)?;
        for (seq, row) in rows {
            feed.insert(*seq, row.as_slice())?;
        }
        if let Some(cut) = last.checked_sub(FEED_KEEP) {
            // Whole ranges at a time: a batch every few thousand changes does the work.
            let first = feed.first()?.map(|(k, _)| k.value());
            if first.is_some_and(|f| f + 1024 <= cut) {
                feed.retain_in(..=cut, |_, _| false)?;
            }
        }
        Ok(())
    }

    /// After an unclean stop: moves the base past every number handed out before.
    pub(super) fn feed_after_crash(&mut self) -> Result<(), StoreError> {
        let b = self.feed_bounds()?;
        let base = b.next.saturating_add(FEED_GAP);
        self.txn.open_table(META)?.insert(FEED_BASE, base)?;
        tracing::info!(
            base,
            "change feed: numbers after an unclean stop start at a new base; watchers resuming from before it re-list"
        );
        Ok(())
    }
}
