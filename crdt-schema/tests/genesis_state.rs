//! `read_mut` answers a genesis-only document from a cache: it must read exactly as `read` does,
//! for every kind, and stop using the cache once the document has any other change.

use automerge::transaction::Transactable;
use automerge::ROOT;
use crdt_schema::{doc, Kind};

#[test]
fn read_mut_of_a_genesis_document_equals_read_for_every_kind() {
    for kind in Kind::ALL {
        let mut d = doc::genesis(kind);
        let fresh = doc::read(&d, kind, "some-name").expect("read");
        let cached = doc::read_mut(&mut d, kind, "some-name").expect("read_mut");
        assert_eq!(cached, fresh, "{kind:?}");
        assert_eq!(cached.name, "some-name");
        assert!(!cached.alive);
    }
}

#[test]
fn read_mut_reads_the_document_once_it_changed() {
    let kind = Kind::Group;
    let mut d = doc::genesis(kind);
    d.set_actor(automerge::ActorId::from([7u8; 16].as_slice()));
    d.put(ROOT, "_alive", true).expect("put");
    d.put(ROOT, "description", "changed").expect("put");
    d.commit();
    let state = doc::read_mut(&mut d, kind, "g").expect("read_mut");
    assert!(state.alive);
    assert_eq!(state.fields["description"], "changed");
    assert_eq!(state, doc::read(&d, kind, "g").expect("read"));
}
