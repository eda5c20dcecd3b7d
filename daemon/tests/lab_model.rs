//! Model-based test of the lab's state changes, in the manner of sled's own tests:
//! random sequences of operations, some valid and many not, with reboots (close and
//! reopen the store) in between. After every step it checks that
//! - an operation that was refused left the store byte for byte as it was,
//! - a reboot loses nothing,
//! - tubes, plates and the plating queue agree with each other, controls are intact,
//! - the audit trail's hash chain is intact and its sequence has no gaps.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed check

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use pcrd::kits::KitRegistry;
use pcrd::lab::{Actor, AuditQuery, Lab, LabError, TubeIntake};
use pcrd::model::{PlateKind, PlateState, TubeRecord};
use pcrd::store::{Store, StoreOptions, decode};
use pcrd_protocol::domain::{ControlKind, WellContent};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Receive(Vec<(usize, u8, bool)>),
    CreatePlate(bool),
    Fill(usize, Option<usize>),
    Assign(usize, Vec<usize>),
    AssignAt(usize, usize, u8, u8),
    Unassign(usize, u8, u8),
    Seal(usize),
    Transfer(usize),
    Reboot,
}

const BARCODES: usize = 40;

fn barcode(i: usize) -> String {
    // Index 39 is deliberately invalid, so batches containing it must be refused whole.
    if i == BARCODES - 1 {
        "BAD!".into()
    } else {
        format!("TUBE-{i:04}")
    }
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec((0..BARCODES, prop_oneof![Just(1u8), Just(5), Just(10)], any::<bool>()), 1..6)
            .prop_map(Op::Receive),
        2 => any::<bool>().prop_map(Op::CreatePlate),
        2 => (0..4usize, prop::option::of(1..40usize)).prop_map(|(p, m)| Op::Fill(p, m)),
        2 => (0..4usize, prop::collection::vec(0..BARCODES, 1..4)).prop_map(|(p, b)| Op::Assign(p, b)),
        2 => (0..4usize, 0..BARCODES, 0..9u8, 0..13u8).prop_map(|(p, b, r, c)| Op::AssignAt(p, b, r, c)),
        2 => (0..4usize, 0..9u8, 0..13u8).prop_map(|(p, r, c)| Op::Unassign(p, r, c)),
        1 => (0..4usize).prop_map(Op::Seal),
        1 => (0..4usize).prop_map(Op::Transfer),
        1 => Just(Op::Reboot),
    ]
}

fn open(path: &Path) -> Arc<Lab> {
    let store = Store::open(&StoreOptions {
        path: path.to_path_buf(),
        cache_bytes: 4 * 1024 * 1024,
    })
    .expect("open store");
    Lab::open(store, KitRegistry::load(None).expect("kits"), "LAB".into()).expect("open lab")
}

/// Every key and value of every tree.
fn snapshot(lab: &Lab) -> Snapshot {
    let t = lab.store().trees();
    let trees = [
        ("tubes", &t.tubes),
        ("waiting", &t.waiting),
        ("plates", &t.plates),
        ("audit", &t.audit),
        ("audit_by_plate", &t.audit_by_plate),
        ("meta", &t.meta),
    ];
    let mut all = BTreeMap::new();
    for (name, tree) in trees {
        for item in tree.iter() {
            let (k, v) = item.expect("read");
            all.insert((name, k.to_vec()), v.to_vec());
        }
    }
    all
}

fn check_invariants(lab: &Lab) {
    let t = lab.store().trees();
    let mut tubes = BTreeMap::new();
    for item in t.tubes.iter() {
        let (k, v) = item.unwrap();
        let tube: TubeRecord = decode(&k, &v).unwrap();
        tubes.insert(tube.barcode.to_string(), tube);
    }
    // The queue holds exactly the tubes without a placement, each under its own key.
    let waiting: BTreeSet<Vec<u8>> = t.waiting.iter().map(|i| i.unwrap().0.to_vec()).collect();
    let expected: BTreeSet<Vec<u8>> = tubes
        .values()
        .filter(|t| t.placement.is_none())
        .map(TubeRecord::waiting_key)
        .collect();
    assert_eq!(
        waiting, expected,
        "plating queue disagrees with tube records"
    );

    let kit = lab.kits().find("sarscov2-orf1ab-n-ic").unwrap();
    let mut placed_on_plates = BTreeMap::new();
    for plate in lab.plates().unwrap() {
        let layout = &plate.layout;
        if plate.kind == PlateKind::Extraction {
            let template = kit.template(plate.format).unwrap();
            for (well, control) in &template.controls {
                assert_eq!(
                    layout.get(*well),
                    Some(&WellContent::Control { control: *control }),
                    "control missing on {}",
                    plate.id
                );
            }
            for (well, barcode) in layout.samples() {
                let previous =
                    placed_on_plates.insert(barcode.to_string(), (plate.id.to_string(), well));
                assert!(
                    previous.is_none(),
                    "tube {barcode} on two extraction plates"
                );
            }
        } else {
            assert_eq!(plate.state, PlateState::Sealed);
        }
    }
    for (barcode, tube) in &tubes {
        let on_plate = placed_on_plates.get(barcode);
        let recorded = tube
            .placement
            .as_ref()
            .map(|p| (p.plate.to_string(), p.well));
        assert_eq!(
            on_plate.cloned(),
            recorded,
            "tube {barcode} placement disagrees with plates"
        );
    }
    assert_eq!(
        placed_on_plates.len(),
        tubes.values().filter(|t| t.placement.is_some()).count()
    );

    // The start-up scrub must accept every state the operations can produce.
    let report = lab.scrub().expect("scrub of a consistent store");
    assert_eq!(report.tubes, tubes.len() as u64);
    let verification = lab.verify_audit().unwrap();
    assert_eq!(verification.first_broken, None, "audit chain broken");
    let entries = lab
        .audit(&AuditQuery {
            limit: usize::MAX,
            ..AuditQuery::default()
        })
        .unwrap();
    for (i, entry) in entries.iter().enumerate() {
        assert_eq!(entry.seq, i as u64 + 1, "audit sequence has a gap");
    }
    // Each tube's history names exactly the entries that list it, in order.
    let mut listed: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for entry in &entries {
        for tube in &entry.tubes {
            listed.entry(tube.to_string()).or_default().push(entry.seq);
        }
    }
    for (barcode, tube) in &tubes {
        assert_eq!(
            listed.get(barcode).cloned().unwrap_or_default(),
            tube.history,
            "history of {barcode} disagrees with the audit trail"
        );
    }
    // Every stored tube has its receipt in its own audit trail.
    for barcode in tubes.keys() {
        let trail = lab
            .audit(&AuditQuery {
                tube: Some(barcode.clone()),
                limit: 1000,
                ..AuditQuery::default()
            })
            .unwrap();
        assert_eq!(
            trail.first().map(|e| e.action.as_str()),
            Some("tube.received")
        );
    }
    let _ = ControlKind::ALL;
}

type Snapshot = BTreeMap<(&'static str, Vec<u8>), Vec<u8>>;

/// Fails naming the keys that differ, rather than printing two whole stores.
fn assert_same(before: &Snapshot, after: &Snapshot, what: &str) {
    let changed: Vec<_> = before
        .keys()
        .chain(after.keys())
        .filter(|k| before.get(*k) != after.get(*k))
        .map(|(tree, key)| format!("{tree}/{}", String::from_utf8_lossy(key)))
        .collect();
    assert!(changed.is_empty(), "{what} changed the store: {changed:?}");
}

async fn apply(lab: &Arc<Lab>, op: &Op, plates: &[String]) -> Option<Result<(), LabError>> {
    let actor = Actor {
        user: "model".into(),
        reason: None,
    };
    let plate = |i: usize| plates.get(i).cloned().unwrap_or_else(|| "PL-999999".into());
    let well = |r: u8, c: u8| format!("{}{}", char::from(b'A' + r), c);
    Some(match op {
        Op::Receive(items) => lab
            .receive_tubes(
                actor,
                items
                    .iter()
                    .map(|(i, pool, urgent)| TubeIntake {
                        barcode: barcode(*i),
                        pool_size: Some(u32::from(*pool)),
                        priority: Some(if *urgent { "urgent" } else { "routine" }.into()),
                        due: None,
                    })
                    .collect(),
            )
            .await
            .map(drop),
        Op::CreatePlate(big) => lab
            .create_plate(
                actor,
                "sarscov2-orf1ab-n-ic".into(),
                Some(if *big { 384 } else { 96 }),
                None,
            )
            .await
            .map(drop),
        Op::Fill(p, max) => lab.fill(actor, plate(*p), *max).await.map(drop),
        Op::Assign(p, tubes) => lab
            .assign(
                actor,
                plate(*p),
                tubes.iter().map(|i| barcode(*i)).collect(),
                Vec::new(),
            )
            .await
            .map(drop),
        Op::AssignAt(p, b, r, c) => lab
            .assign(
                actor,
                plate(*p),
                Vec::new(),
                vec![(well(*r, *c), barcode(*b))],
            )
            .await
            .map(drop),
        Op::Unassign(p, r, c) => lab
            .unassign(actor, plate(*p), vec![well(*r, *c)])
            .await
            .map(drop),
        Op::Seal(p) => lab.seal(actor, plate(*p)).await.map(drop),
        Op::Transfer(p) => lab.transfer(actor, plate(*p), None).await.map(drop),
        Op::Reboot => return None,
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn refused_operations_change_nothing_and_reboots_lose_nothing(ops in prop::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(async {
            let mut lab = open(&path);
            for op in &ops {
                let plates: Vec<String> = {
                    let mut all = lab.plates().unwrap();
                    all.sort_by_key(|p| p.created_at);
                    all.into_iter().filter(|p| p.kind == PlateKind::Extraction).map(|p| p.id.to_string()).collect()
                };
                let before = snapshot(&lab);
                match apply(&lab, op, &plates).await {
                    None => {
                        lab.store().close().unwrap();
                        drop(lab);
                        lab = open(&path);
                        assert_same(&before, &snapshot(&lab), "a reboot");
                    }
                    Some(Err(LabError::Store(e))) => panic!("store failure: {e}"),
                    Some(Err(_refused)) => {
                        assert_same(&before, &snapshot(&lab), &format!("refused {op:?}"));
                    }
                    // A receive of tubes already received identically is a retry and
                    // rightly changes nothing; every other success changes something.
                    Some(Ok(())) if !matches!(op, Op::Receive(_)) => {
                        assert!(snapshot(&lab) != before, "{op:?} succeeded without a change");
                    }
                    Some(Ok(())) => {}
                }
                check_invariants(&lab);
            }
            lab.store().close().unwrap();
        });
    }
}
