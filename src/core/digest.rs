//! Layer: core (sans-IO; imports only other core modules and `crdt-schema`).
//!
//! The replication digest: a summary of `{document -> hash(heads)}` two nodes compare before
//! syncing anything, so an in-sync pair exchanges a constant number of bytes whatever the number
//! of documents.
//!
//! 256 buckets keyed by the first byte of SHA-256(document ID). A bucket's hash is the XOR of
//! SHA-256(ID || heads hash) over its documents, updated in O(1) at every commit; the root is the
//! SHA-256 of the 256 bucket hashes.

use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;

pub type Hash = [u8; 32];
pub const BUCKETS: usize = 256;

pub fn bucket_of(id: &str) -> u8 {
    Sha256::digest(id.as_bytes())[0]
}

fn leaf(id: &str, heads: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update((id.len() as u32).to_be_bytes());
    h.update(id.as_bytes());
    h.update(heads);
    h.finalize().into()
}

fn xor(a: &mut Hash, b: &Hash) {
    for (x, y) in a.iter_mut().zip(b) {
        *x ^= y;
    }
}

#[derive(Clone)]
pub struct Digest {
    buckets: Vec<Hash>,
    docs: Vec<BTreeMap<String, Hash>>,
    root: Option<Hash>,
}

impl Default for Digest {
    fn default() -> Self {
        Digest {
            buckets: vec![[0; 32]; BUCKETS],
            docs: vec![BTreeMap::new(); BUCKETS],
            root: None,
        }
    }
}

impl Digest {
    /// Records the heads hash of a document (new or changed).
    pub fn set(&mut self, id: &str, heads: Hash) {
        let b = bucket_of(id) as usize;
        if let Some(old) = self.docs[b].insert(id.to_string(), heads) {
            if old == heads {
                return;
            }
            xor(&mut self.buckets[b], &leaf(id, &old));
        }
        xor(&mut self.buckets[b], &leaf(id, &heads));
        self.root = None;
    }

    pub fn get(&self, id: &str) -> Option<&Hash> {
        self.docs[bucket_of(id) as usize].get(id)
    }

    pub fn len(&self) -> usize {
        self.docs.iter().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn root(&mut self) -> Hash {
        if let Some(r) = self.root {
            return r;
        }
        let mut h = Sha256::new();
        for b in &self.buckets {
            h.update(b);
        }
        let r: Hash = h.finalize().into();
        self.root = Some(r);
        r
    }

    pub fn buckets(&self) -> &[Hash] {
        &self.buckets
    }

    /// Buckets whose hashes differ from `theirs` (every bucket if `theirs` is malformed).
    pub fn differing(&self, theirs: &[Hash]) -> Vec<u8> {
        (0..BUCKETS)
            .filter(|&b| theirs.get(b) != Some(&self.buckets[b]))
            .map(|b| b as u8)
            .collect()
    }

    /// `(id, heads hash)` of every document in the given buckets.
    pub fn entries(&self, buckets: &[u8]) -> Vec<(String, Hash)> {
        buckets
            .iter()
            .flat_map(|&b| self.docs[b as usize].iter().map(|(k, v)| (k.clone(), *v)))
            .collect()
    }
}

/// What to do about the documents of some buckets, given both sides' entries.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Only the peer has them: fetch their saved bytes.
    pub fetch: Vec<String>,
    /// Both have them, with different heads: run sync. Documents only we have are left out: the
    /// peer fetches them in its own cycle, which costs a fraction of a sync from nothing (and a
    /// new node is not flooded by every member at once).
    pub sync: Vec<String>,
}

pub fn plan(ours: &[(String, Hash)], theirs: &[(String, Hash)]) -> Plan {
    let ours: BTreeMap<&str, &Hash> = ours.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let theirs_map: BTreeMap<&str, &Hash> = theirs.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut p = Plan::default();
    for (id, h) in &theirs_map {
        match ours.get(id) {
            None => p.fetch.push(id.to_string()),
            Some(o) if o != h => p.sync.push(id.to_string()),
            Some(_) => {}
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_independent_and_updatable() {
        let mut a = Digest::default();
        let mut b = Digest::default();
        for i in 0..100 {
            a.set(&format!("user/u{i}"), [i as u8; 32]);
        }
        for i in (0..100).rev() {
            b.set(&format!("user/u{i}"), [0; 32]);
            b.set(&format!("user/u{i}"), [i as u8; 32]);
        }
        assert_eq!(a.root(), b.root());
        b.set("user/u5", [9; 32]);
        assert_ne!(a.root(), b.root());
        let diff = a.differing(b.buckets());
        assert_eq!(diff, vec![bucket_of("user/u5")]);
        let p = plan(&a.entries(&diff), &b.entries(&diff));
        assert_eq!(p.sync, vec!["user/u5".to_string()]);
        b.set("user/u5", [5; 32]);
        assert_eq!(a.root(), b.root());
    }

    #[test]
    fn plan_fetches_what_only_the_peer_has() {
        let ours = vec![("a".to_string(), [1; 32]), ("b".to_string(), [2; 32])];
        let theirs = vec![("b".to_string(), [3; 32]), ("c".to_string(), [4; 32])];
        let p = plan(&ours, &theirs);
        assert_eq!(p.fetch, vec!["c"]);
        assert_eq!(
            p.sync,
            vec!["b"],
            "what only we have is for the peer to fetch"
        );
    }
}
