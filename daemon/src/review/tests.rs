#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use pcrd_protocol::analysis::Ct;
use pcrd_protocol::domain::Well;
use pcrd_protocol::run_analysis::RunJudgement;

use super::due::{DueStatus, sort_key, status};
use super::*;
use crate::kits::KitRegistry;
use crate::lab::TubeIntake;

const KIT: &str = "sarscov2-orf1ab-n-ic";

fn open_lab(dir: &Path) -> Arc<Lab> {
    let store = crate::store::Store::open(&crate::store::StoreOptions {
        path: dir.join("store"),
        cache_bytes: 1024 * 1024,
    })
    .unwrap();
    Lab::open(store, KitRegistry::load(None).unwrap(), "LAB".into()).unwrap()
}

fn user(name: &str) -> Actor {
    Actor {
        user: name.into(),
        reason: None,
    }
}

fn cts(orf: Option<f64>, n: Option<f64>, ic: Option<f64>) -> BTreeMap<String, Ct> {
    let ct = |v: Option<f64>| v.map_or(Ct::Undetermined, Ct::Determined);
    BTreeMap::from([
        ("ORF1ab".to_string(), ct(orf)),
        ("N".to_string(), ct(n)),
        ("IC".to_string(), ct(ic)),
    ])
}

/// A plate with tubes (well, barcode, pool size) and the kit's judgement of `wells`
/// plus its controls (`pc_ok` false fails the positive control).
async fn judged_plate(
    lab: &Arc<Lab>,
    id: &str,
    tubes: &[(&str, &str, u32)],
    wells: &[(&str, BTreeMap<String, Ct>)],
    pc_ok: bool,
) -> (PlateRecord, RunJudgement) {
    lab.receive_tubes(
        user("t"),
        tubes
            .iter()
            .map(|(_, b, pool)| TubeIntake {
                barcode: (*b).into(),
                pool_size: Some(*pool),
                priority: None,
                due: None,
            })
            .collect(),
    )
    .await
    .unwrap();
    lab.create_plate(user("t"), KIT.into(), None, Some(id.into()))
        .await
        .unwrap();
    lab.assign(
        user("t"),
        id.into(),
        Vec::new(),
        tubes
            .iter()
            .map(|(w, b, _)| ((*w).to_string(), (*b).to_string()))
            .collect(),
    )
    .await
    .unwrap();
    lab.seal(user("t"), id.into()).await.unwrap();
    let plate = lab.plate(id).unwrap();
    let kit = lab.kits().find(KIT).unwrap();
    let mut readings: BTreeMap<Well, BTreeMap<String, Ct>> = wells
        .iter()
        .map(|(w, r)| (w.parse().unwrap(), r.clone()))
        .collect();
    readings.insert("G12".parse().unwrap(), cts(None, None, None));
    readings.insert(
        "H12".parse().unwrap(),
        if pc_ok {
            cts(Some(28.0), Some(28.5), Some(27.0))
        } else {
            cts(None, None, None)
        },
    );
    let judgement = kit.judge_plate(plate.format, &readings).unwrap();
    (
        plate,
        RunJudgement {
            plate: judgement,
            unjudged: Vec::new(),
        },
    )
}

fn provenance(run: &str) -> Provenance {
    Provenance {
        run: run.into(),
        instrument: "cycler-1".into(),
        source: CandidateSource {
            kind: "pcr_run".into(),
            id: run.into(),
            detail: String::new(),
        },
        tested_at_ms: 1_764_000_000_000,
    }
}

fn released_versions(lab: &Lab, id: &str) -> Option<u32> {
    crate::outbox::latest_version(lab.store(), id).unwrap()
}

#[test]
fn result_ids_are_one_path_segment() {
    assert_eq!(result_id("LAB1", "R-7", "A1", "T-1"), "LAB1-R-7-A1-T-1");
    assert_eq!(
        result_id("Lab Nord", "run:7/b", "A1", "T-1"),
        "Lab_Nord-run_7_b-A1-T-1"
    );
}

#[test]
fn due_status_boundaries_and_order() {
    let hour = 3_600_000;
    assert_eq!(status(Some(1000), false, 1001, hour), DueStatus::PastDue);
    assert_eq!(status(Some(1000), false, 1000, hour), DueStatus::AtRisk);
    assert_eq!(status(Some(hour + 10), false, 10, hour), DueStatus::AtRisk);
    assert_eq!(status(Some(hour + 11), false, 10, hour), DueStatus::OnTime);
    assert_eq!(status(None, false, 10, hour), DueStatus::NoDueTime);
    assert_eq!(status(Some(0), true, 10, hour), DueStatus::Done);
    let mut keys = [
        sort_key(DueStatus::NoDueTime, None),
        sort_key(DueStatus::OnTime, Some(50)),
        sort_key(DueStatus::AtRisk, Some(20)),
        sort_key(DueStatus::PastDue, Some(5)),
        sort_key(DueStatus::PastDue, Some(1)),
    ];
    keys.sort();
    assert_eq!(
        keys.iter().map(|k| k.0).collect::<Vec<_>>(),
        [
            DueStatus::PastDue,
            DueStatus::PastDue,
            DueStatus::AtRisk,
            DueStatus::OnTime,
            DueStatus::NoDueTime
        ]
    );
    assert_eq!(keys[0].1, 1, "most overdue first");
}

#[test]
fn the_review_table_is_validated() {
    let mut problems = Vec::new();
    let policy = parse_policy(None, &mut problems);
    assert!(
        !policy.auto_release_negatives,
        "off unless the config says so"
    );
    let raw: RawReview = toml::from_str(
        "auto_release_negatives = true\nat_risk_before = \"soon\"\ncheck_every = \"0s\"\n",
    )
    .unwrap();
    let policy = parse_policy(Some(raw), &mut problems);
    assert!(policy.auto_release_negatives);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(
        problems[0].contains("review.at_risk_before"),
        "{problems:?}"
    );
    assert!(problems[1].contains("review.check_every"), "{problems:?}");
}

#[test]
fn candidates_round_trip_through_the_store_encoding() {
    let c = Candidate {
        result_id: "LAB-R1-A1-T1".into(),
        tube: "T1".into(),
        pool_size: 5,
        plate: "P1".into(),
        well: "A1".into(),
        run: "R1".into(),
        instrument: "c".into(),
        kit_id: KIT.into(),
        kit_version: "1.0".into(),
        source: CandidateSource {
            kind: "pcr_run".into(),
            id: "R1".into(),
            detail: String::new(),
        },
        targets: vec![CandidateTarget {
            name: "N".into(),
            dye: "VIC".into(),
            loinc: None,
            ct: None,
            call: "not_detected".into(),
        }],
        call: "not_detected".into(),
        interpretation: "negative".into(),
        action: "report".into(),
        reason: "r".into(),
        plate_valid: true,
        plate_invalid_reason: None,
        qc_holds: vec!["N: late_rise".into()],
        tested_at_ms: 1,
        staged_at_ms: 2,
        state: CandidateState::AwaitingReview,
        decided_by: None,
        decided_at_ms: None,
        decision_reason: Some("x".into()),
        versions: Vec::new(),
    };
    let back: Candidate = decode(b"k", &encode(&c)).unwrap();
    assert_eq!(back, c);
}

#[tokio::test]
async fn policy_releases_clean_negatives_only_and_a_repeat_stages_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let lab = open_lab(dir.path());
    lab.review().set_policy(ReviewPolicy {
        auto_release_negatives: true,
        ..ReviewPolicy::default()
    });
    let (plate, judged) = judged_plate(
        &lab,
        "PL-U1",
        &[
            ("A1", "U-POS", 1),
            ("B1", "U-NEG", 1),
            ("C1", "U-POOL-NEG", 10),
            ("D1", "U-POOL-POS", 5),
        ],
        &[
            ("A1", cts(Some(22.0), Some(23.0), Some(27.0))),
            ("B1", cts(None, None, Some(26.0))),
            ("C1", cts(None, None, Some(26.0))),
            ("D1", cts(Some(30.0), Some(31.0), Some(27.0))),
        ],
        true,
    )
    .await;
    let entries = lab.verify_audit().unwrap().entries;
    let outcome = stage_from_judgement(&lab, user("cycler"), &plate, &judged, provenance("R1"))
        .await
        .unwrap();
    assert_eq!(outcome.staged, 4);
    assert_eq!(outcome.follow_ups, 1, "{outcome:?}");
    let state = |tube: &str| {
        let id = result_id("LAB", "R1", "", tube);
        candidates(&lab, None)
            .unwrap()
            .into_iter()
            .find(|c| c.tube == tube)
            .map(|c| (c.state, c.call, c.result_id))
            .unwrap_or_else(|| panic!("no candidate {id}"))
    };
    let (neg_state, _, neg_id) = state("U-NEG");
    assert_eq!(neg_state, CandidateState::Released);
    assert_eq!(neg_id, "LAB-R1-B1-U-NEG");
    assert_eq!(released_versions(&lab, &neg_id), Some(1));
    assert_eq!(state("U-POS").0, CandidateState::AwaitingReview);
    // The kit accepts pools up to some size; whichever it is, a pool's negative is
    // released by policy only when the kit's pool outcome says not detected.
    let (pool_state, pool_call, pool_id) = state("U-POOL-NEG");
    assert_eq!(
        pool_state == CandidateState::Released,
        pool_call == "not_detected",
        "{pool_call}"
    );
    assert_eq!(
        released_versions(&lab, &pool_id).is_some(),
        pool_state == CandidateState::Released
    );
    let follow_ups: Vec<_> = reruns(&lab)
        .unwrap()
        .into_iter()
        .filter(|r| r.kind == "pool_follow_up")
        .collect();
    assert_eq!(follow_ups.len(), 1);
    assert_eq!(follow_ups[0].tube, "U-POOL-POS");
    assert!(lab.verify_audit().unwrap().entries > entries);

    // The same run staged again (a restart of the PCR-run path): nothing changes.
    let next = lab.outbox().next_seq();
    let entries = lab.verify_audit().unwrap().entries;
    let again = stage_from_judgement(&lab, user("cycler"), &plate, &judged, provenance("R1"))
        .await
        .unwrap();
    assert_eq!(again.staged, 0);
    assert_eq!(again.already_staged, 4);
    assert_eq!(lab.outbox().next_seq(), next, "nothing released twice");
    assert_eq!(lab.verify_audit().unwrap().entries, entries);
}

#[tokio::test]
async fn decisions_follow_the_state_and_refusals_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let lab = open_lab(dir.path());
    let (plate, judged) = judged_plate(
        &lab,
        "PL-U2",
        &[("A1", "D-POS", 1), ("B1", "D-NEG", 1), ("C1", "D-POS-2", 1)],
        &[
            ("A1", cts(Some(22.0), Some(23.0), Some(27.0))),
            ("B1", cts(None, None, Some(26.0))),
            ("C1", cts(Some(25.0), Some(26.0), Some(27.0))),
        ],
        true,
    )
    .await;
    let outcome = stage_from_judgement(&lab, user("cycler"), &plate, &judged, provenance("R2"))
        .await
        .unwrap();
    assert_eq!(outcome.auto_released, 0, "auto release is off by default");
    assert_eq!(outcome.awaiting_review, 3);
    let pos = "LAB-R2-A1-D-POS".to_string();
    let entries = lab.verify_audit().unwrap().entries;
    // Refusals: no reason, unknown result, correcting what was never released.
    for (id, decision) in [
        (pos.clone(), Decision::Reject { reason: " ".into() }),
        ("NOPE".to_string(), Decision::Release),
        (
            pos.clone(),
            Decision::Correct {
                reason: "r".into(),
                interpretation: None,
            },
        ),
        (
            pos.clone(),
            Decision::Correct {
                reason: "r".into(),
                interpretation: Some("maybe".into()),
            },
        ),
    ] {
        assert!(decide(&lab, user("rob"), id, decision).await.is_err());
    }
    assert_eq!(
        lab.verify_audit().unwrap().entries,
        entries,
        "nothing written"
    );
    assert_eq!(released_versions(&lab, &pos), None);

    let c = decide(&lab, user("rob"), pos.clone(), Decision::Release)
        .await
        .unwrap();
    assert_eq!(c.state, CandidateState::Released);
    assert_eq!(released_versions(&lab, &pos), Some(1));
    let (_, record) = crate::outbox::load_result(lab.store(), &pos, 1)
        .unwrap()
        .unwrap();
    assert_eq!(record.released_by, "rob");
    assert_eq!(record.status, ResultStatus::Final);
    assert_eq!(record.interpretation, Interpretation::Positive);
    assert_eq!(record.targets.len(), 3);
    assert!(matches!(
        decide(&lab, user("rob"), pos.clone(), Decision::Release).await,
        Err(LabError::Conflict { .. })
    ));
    let c = decide(
        &lab,
        user("rob"),
        pos.clone(),
        Decision::Correct {
            reason: "wrong well read".into(),
            interpretation: Some("negative".into()),
        },
    )
    .await
    .unwrap();
    assert_eq!(c.versions.len(), 2);
    let (_, v2) = crate::outbox::load_result(lab.store(), &pos, 2)
        .unwrap()
        .unwrap();
    assert_eq!(v2.status, ResultStatus::Corrected);
    assert_eq!(v2.interpretation, Interpretation::Negative);
    assert_eq!(v2.correction_reason.as_deref(), Some("wrong well read"));

    // A rerun puts the tube back into the queue, urgent; a rejection does not.
    let c = decide(
        &lab,
        user("rob"),
        "LAB-R2-C1-D-POS-2".into(),
        Decision::Rerun {
            reason: "late curve".into(),
        },
    )
    .await
    .unwrap();
    assert_eq!(c.state, CandidateState::RerunRequested);
    let waiting: Vec<String> = lab
        .waiting(10)
        .unwrap()
        .iter()
        .map(|t| t.barcode.to_string())
        .collect();
    assert_eq!(waiting, ["D-POS-2"]);
    let c = decide(
        &lab,
        user("rob"),
        "LAB-R2-B1-D-NEG".into(),
        Decision::Reject {
            reason: "sample leaked".into(),
        },
    )
    .await
    .unwrap();
    assert_eq!(c.state, CandidateState::Rejected);
    assert_eq!(lab.waiting(10).unwrap().len(), 1);
    assert_eq!(released_versions(&lab, "LAB-R2-B1-D-NEG"), None);
    // The lab's own check still agrees: the requeued tube is counted once.
    lab.scrub().unwrap();
}

#[tokio::test]
async fn a_tube_on_a_plate_still_open_is_not_requeued_twice() {
    let dir = tempfile::tempdir().unwrap();
    let lab = open_lab(dir.path());
    // A retest call (from a sealed plate's judgement), for a tube on a plate not
    // sealed in pcrd: an instrument's file for a plate the technician never sealed.
    let (_, judged) = judged_plate(
        &lab,
        "PL-U4",
        &[("A1", "O-RT", 1)],
        &[("A1", cts(None, Some(33.0), Some(27.0)))],
        true,
    )
    .await;
    lab.create_plate(user("t"), KIT.into(), None, Some("PL-U4-OPEN".into()))
        .await
        .unwrap();
    lab.receive_tubes(
        user("t"),
        vec![TubeIntake {
            barcode: "O-RT-2".into(),
            pool_size: None,
            priority: None,
            due: None,
        }],
    )
    .await
    .unwrap();
    lab.assign(
        user("t"),
        "PL-U4-OPEN".into(),
        Vec::new(),
        vec![("A1".into(), "O-RT-2".into())],
    )
    .await
    .unwrap();
    let open_plate = lab.plate("PL-U4-OPEN").unwrap();
    let call = judged.plate.samples.values().next().unwrap().clone();
    let candidate = candidate_for_well(
        &lab,
        &open_plate,
        "A1".parse().unwrap(),
        &pcrd_protocol::domain::Barcode::new("O-RT-2").unwrap(),
        &call,
        &judged.plate.validity,
        &provenance("R4"),
    )
    .unwrap();
    let outcome = stage(&lab, user("cycler"), vec![candidate], Vec::new(), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcome.reruns, 1);
    let entry = reruns(&lab).unwrap().pop().unwrap();
    assert!(!entry.requeued, "the open plate still holds it: {entry:?}");
    assert!(lab.waiting(10).unwrap().is_empty());
    // Taken off the open plate, it waits once.
    lab.unassign(user("t"), "PL-U4-OPEN".into(), vec!["A1".into()])
        .await
        .unwrap();
    assert_eq!(lab.waiting(10).unwrap().len(), 1);
    lab.scrub().unwrap();
}

#[tokio::test]
async fn an_invalid_plate_releases_nothing_even_with_auto_release() {
    let dir = tempfile::tempdir().unwrap();
    let lab = open_lab(dir.path());
    lab.review().set_policy(ReviewPolicy {
        auto_release_negatives: true,
        ..ReviewPolicy::default()
    });
    let (plate, judged) = judged_plate(
        &lab,
        "PL-U3",
        &[("A1", "I-NEG", 1), ("B1", "I-POS", 5)],
        &[
            ("A1", cts(None, None, Some(26.0))),
            ("B1", cts(Some(22.0), Some(23.0), Some(27.0))),
        ],
        false,
    )
    .await;
    let outcome = stage_from_judgement(&lab, user("cycler"), &plate, &judged, provenance("R3"))
        .await
        .unwrap();
    assert_eq!(outcome.auto_released, 0);
    assert_eq!(outcome.reruns, 2);
    assert_eq!(outcome.follow_ups, 0);
    assert_eq!(lab.outbox().next_seq(), 1);
    assert_eq!(lab.waiting(10).unwrap().len(), 2);
    assert!(
        candidates(&lab, None)
            .unwrap()
            .iter()
            .all(|c| c.state == CandidateState::RerunRequested && !c.plate_valid)
    );
    lab.scrub().unwrap();
}
