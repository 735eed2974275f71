//! Layer: sim (feature `sim`).
//!
//! The logic of the fuzz targets, kept in the library so `cargo test` replays minimized inputs
//! (`fuzz/regressions/`) and the fuzz crate stays a thin shell.

use automerge::{ActorId, AutoCommit};
use crdt_schema::doc;
use crdt_schema::testing::{converged, random_write, Source};
use crdt_schema::{Kind, WriteMode};

/// Fuzzer bytes as a source of choices; once exhausted every choice is 0 (or, with
/// [`ByteSource::then_seeded`], drawn from a generator seeded by the bytes).
pub struct ByteSource<'a> {
    data: &'a [u8],
    pos: usize,
    after: Option<rand_chacha::ChaCha8Rng>,
}

impl<'a> ByteSource<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        ByteSource {
            data,
            pos: 0,
            after: None,
        }
    }

    /// Once the bytes are used up, choices come from a generator seeded by them, so a short
    /// input still makes a whole, varied scenario while the bytes steer its beginning.
    pub fn then_seeded(data: &'a [u8]) -> Self {
        use rand::SeedableRng;
        let seed = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ *b as u64).wrapping_mul(0x100_0000_01b3)
        });
        ByteSource {
            data,
            pos: 0,
            after: Some(rand_chacha::ChaCha8Rng::seed_from_u64(seed)),
        }
    }
    pub fn exhausted(&self) -> bool {
        self.pos >= self.data.len()
    }
}

impl Source for ByteSource<'_> {
    fn below(&mut self, n: usize) -> usize {
        if n <= 1 {
            return 0;
        }
        if self.exhausted() {
            if let Some(r) = self.after.as_mut() {
                return rand::Rng::random_range(r, 0..n);
            }
        }
        let mut v = 0usize;
        // Two bytes of choice is plenty for every range used.
        for _ in 0..2 {
            let b = self.data.get(self.pos).copied().unwrap_or(0);
            self.pos += 1;
            v = (v << 8) | b as usize;
        }
        v % n
    }
}

/// Replicas of one entity edited and merged in an order the bytes choose, then merged in
/// further orders the bytes choose: every replica ends equal. Panics otherwise.
pub fn merge_convergence(data: &[u8]) {
    let mut src = ByteSource::new(data);
    let kind = Kind::ALL[src.below(Kind::ALL.len())];
    let n = 2 + src.below(3);
    let mut reps: Vec<AutoCommit> = (0..n)
        .map(|i| {
            let mut d = doc::genesis(kind);
            d.set_actor(ActorId::from(vec![i as u8 + 1; 16]));
            d
        })
        .collect();
    // Bounded so one input stays fast.
    for t in 0..64 {
        if src.exhausted() {
            break;
        }
        let i = src.below(n);
        if src.chance(25) {
            let j = src.below(n);
            if i != j {
                let mut other = reps[j].clone();
                reps[i].merge(&mut other).expect("merge of valid replicas");
            }
        } else {
            random_write(&mut src, &mut reps[i], kind, &format!("node{i}"), t);
        }
    }
    // Every replica receives every other, in an order of its own.
    let originals = reps.clone();
    for (i, r) in reps.iter_mut().enumerate() {
        let mut order: Vec<usize> = (0..n).filter(|&j| j != i).collect();
        let rot = (i * 7 + data.len()) % order.len().max(1);
        order.rotate_left(rot);
        if data.len() % 2 == 1 {
            order.reverse();
        }
        for j in order {
            let mut o = originals[j].clone();
            r.merge(&mut o).expect("merge");
        }
    }
    let (first, rest) = reps.split_first_mut().expect("at least two replicas");
    for r in rest {
        if let Err(e) = converged(kind, first, r) {
            panic!("replicas of {kind} diverged: {e}");
        }
    }
    let _ = WriteMode::Put;
}

/// A simulated cluster whose whole scenario comes from the bytes: its size and faults, the
/// schedule of writes, partitions and crashes, the edits, and the network's every drop, copy and
/// delay (the bytes steer the first choices; a generator seeded by them makes the rest). It must
/// converge with every acknowledged write. Panics otherwise.
pub fn simulation(data: &[u8]) {
    let mut src = ByteSource::then_seeded(data);
    let sc = super::simulator::Scenario::draw(&mut src, 0);
    if let Err(e) = super::simulator::run_with(&sc, Box::new(src)) {
        panic!("{e}\n{sc:?}");
    }
}

/// Every decoder a client or a peer can reach, fed arbitrary bytes: none may panic.
pub fn decode(data: &[u8]) {
    use crate::core::proto::{Envelope, Request, Response};
    let _ = crate::core::wire::decode::<Envelope<Request>>(data);
    let _ = crate::core::wire::decode::<Envelope<Response>>(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::cluster::Token::parse(text);
        let _ = rcgen::CertificateSigningRequestParams::from_pem(text);
    }
    let _ = crate::net::tls::node_id_of(data);
    let _ = crate::core::wire::decode::<crate::store::IndexEntry>(data);
    if let Ok(mut d) = AutoCommit::load(data) {
        let _ = d.get_heads();
        for kind in Kind::ALL {
            let _ = doc::check_layout(&d, kind);
            let _ = doc::read(&d, kind, "x");
        }
    }
    let _ = automerge::sync::Message::decode(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crdt_schema::parse_doc_id(text);
        let _ = Kind::parse(text);
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(text) {
            for kind in Kind::ALL {
                for mode in [WriteMode::Put, WriteMode::Patch] {
                    let _ =
                        crdt_schema::validate_write(kind, &v, mode, data.len().is_multiple_of(2));
                }
                if let Some(o) = v.as_object() {
                    let _ = crdt_schema::check_entity(kind, o);
                }
            }
        }
    }
}
