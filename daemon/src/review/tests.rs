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

#[test]
fn early_calls_are_off_unless_the_lab_opts_in_and_their_numbers_are_checked() {
    let mut problems = Vec::new();
    let policy = parse_policy(None, &mut problems);
    assert!(!policy.early_calls);
    assert_eq!(policy.early_call_rule.margin_cycles, 5);
    let raw: RawReview =
        toml::from_str("early_calls = true\nearly_call_margin_cycles = 7\nearly_call_every = 2\n")
            .unwrap();
    let policy = parse_policy(Some(raw), &mut problems);
    assert!(problems.is_empty(), "{problems:?}");
    assert!(policy.early_calls);
    assert_eq!(policy.early_call_rule.margin_cycles, 7);
    assert_eq!(policy.early_call_every, 2);
    let raw: RawReview =
        toml::from_str("early_call_margin_cycles = 0\nearly_call_every = 99\n").unwrap();
    parse_policy(Some(raw), &mut problems);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].contains("early_call_margin_cycles"));
    assert!(problems[1].contains("early_call_every"));
}

#[tokio::test]
async fn an_early_call_is_released_once_as_preliminary_and_the_final_is_version_2() {
    let dir = tempfile::tempdir().unwrap();
    let lab = open_lab(dir.path());
    lab.review().set_policy(ReviewPolicy {
        auto_release_negatives: true,
        early_calls: true,
        ..ReviewPolicy::default()
    });
    let tubes = [
        ("A1", "E-AGREE", 1),
        ("B1", "E-DISAGREE", 1),
        ("C1", "E-ORPHAN", 1),
        ("D1", "E-NEG", 1),
    ];
    let positive = || cts(Some(18.0), Some(19.0), Some(27.0));
    // Mid-run: three positives (the caller, crate::runs::early, picks the
    // settled ones); a negative offered too is never called early.
    let (plate, mid) = judged_plate(
        &lab,
        "PL-E1",
        &tubes,
        &[
            ("A1", positive()),
            ("B1", positive()),
            ("C1", positive()),
            ("D1", cts(None, None, Some(26.0))),
        ],
        true,
    )
    .await;
    let offered = candidates_from_judgement(&lab, &plate, &mid, &provenance("R9")).unwrap();
    assert_eq!(offered.len(), 4);
    let n = release_early(&lab, user("run:9"), offered.clone(), 30, 45, || true)
        .await
        .unwrap();
    assert_eq!(n, 3, "the negative is not called early");
    for tube in ["E-AGREE", "E-DISAGREE", "E-ORPHAN"] {
        let id = result_id(
            "LAB",
            "R9",
            tubes.iter().find(|t| t.1 == tube).unwrap().0,
            tube,
        );
        let c = load_candidate(&lab, &id).unwrap().unwrap();
        assert_eq!(c.state, CandidateState::Preliminary);
        assert_eq!(c.versions.len(), 1);
        assert_eq!(c.versions[0].status, "preliminary");
        assert_eq!(c.versions[0].version, 1);
        assert_eq!(released_versions(&lab, &id), Some(1));
    }
    assert!(load_candidate(&lab, "LAB-R9-D1-E-NEG").unwrap().is_none());
    // A re-evaluation (or one after a crash) releases nothing again.
    let next = lab.outbox().next_seq();
    assert_eq!(
        release_early(&lab, user("run:9"), offered, 33, 45, || true)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        lab.outbox().next_seq(),
        next,
        "no second preliminary version"
    );
    assert_eq!(released_versions(&lab, "LAB-R9-A1-E-AGREE"), Some(1));
    // Not the reviewer's to release before the run ends.
    let early = decide(
        &lab,
        user("rev"),
        "LAB-R9-A1-E-AGREE".into(),
        Decision::Release,
    )
    .await
    .unwrap_err();
    assert!(matches!(early, LabError::Conflict { .. }), "{early:?}");

    // The run ends: A1 positive (agrees), B1 negative (disagrees), C1 got no
    // call at all, D1 negative.
    let kit = lab.kits().find(KIT).unwrap();
    let mut readings: BTreeMap<Well, BTreeMap<String, Ct>> = BTreeMap::from([
        ("A1".parse().unwrap(), positive()),
        ("B1".parse().unwrap(), cts(None, None, Some(26.0))),
        ("D1".parse().unwrap(), cts(None, None, Some(26.0))),
    ]);
    readings.insert("G12".parse().unwrap(), cts(None, None, None));
    readings.insert(
        "H12".parse().unwrap(),
        cts(Some(28.0), Some(28.5), Some(27.0)),
    );
    let end = RunJudgement {
        plate: kit.judge_plate(plate.format, &readings).unwrap(),
        unjudged: Vec::new(),
    };
    let outcome = stage_from_judgement(&lab, user("run:9"), &plate, &end, provenance("R9"))
        .await
        .unwrap();
    assert_eq!(outcome.early_disagreed, 2, "{outcome:?}");
    assert_eq!(outcome.auto_released, 1, "only D1: {outcome:?}");
    let agree = load_candidate(&lab, "LAB-R9-A1-E-AGREE").unwrap().unwrap();
    assert_eq!(agree.state, CandidateState::AwaitingReview);
    assert_eq!(agree.versions.len(), 1);
    let disagree = load_candidate(&lab, "LAB-R9-B1-E-DISAGREE")
        .unwrap()
        .unwrap();
    assert_eq!(disagree.interpretation, "negative");
    assert_eq!(
        disagree.state,
        CandidateState::AwaitingReview,
        "a negative that contradicts its preliminary is never released by policy"
    );
    assert!(
        disagree
            .decision_reason
            .as_deref()
            .unwrap()
            .contains("disagrees with preliminary version 1 (positive)"),
        "{disagree:?}"
    );
    assert_eq!(released_versions(&lab, "LAB-R9-B1-E-DISAGREE"), Some(1));
    let orphan = load_candidate(&lab, "LAB-R9-C1-E-ORPHAN").unwrap().unwrap();
    assert_eq!(orphan.state, CandidateState::AwaitingReview);
    assert!(orphan.decision_reason.unwrap().contains("no call"));
    assert_eq!(released_versions(&lab, "LAB-R9-D1-E-NEG"), Some(1));

    // The reviewer releases the agreeing final: version 2, final.
    let released = decide(
        &lab,
        user("rev"),
        "LAB-R9-A1-E-AGREE".into(),
        Decision::Release,
    )
    .await
    .unwrap();
    assert_eq!(released.versions.len(), 2);
    assert_eq!(released.versions[1].version, 2);
    assert_eq!(released.versions[1].status, "final");
    assert_eq!(released_versions(&lab, "LAB-R9-A1-E-AGREE"), Some(2));
    // And the disagreeing one, after a look, as version 2 final (negative).
    let released = decide(
        &lab,
        user("rev"),
        "LAB-R9-B1-E-DISAGREE".into(),
        Decision::Release,
    )
    .await
    .unwrap();
    assert_eq!(released.versions[1].status, "final");
    assert_eq!(released.versions[1].interpretation, "negative");
    assert_eq!(released_versions(&lab, "LAB-R9-B1-E-DISAGREE"), Some(2));

    // The end staged again (a restart): nothing changes.
    let next = lab.outbox().next_seq();
    let again = stage_from_judgement(&lab, user("run:9"), &plate, &end, provenance("R9"))
        .await
        .unwrap();
    assert_eq!(again.staged, 0, "{again:?}");
    assert_eq!(again.early_disagreed, 0);
    assert_eq!(lab.outbox().next_seq(), next);
    assert_eq!(lab.review().early_calls.load(Ordering::Relaxed), 3);
    assert_eq!(
        lab.review().early_calls_disagreed.load(Ordering::Relaxed),
        2
    );
    let mut metrics = String::new();
    lab.review().render_metrics(&mut metrics);
    assert!(metrics.contains("pcrd_early_calls_total 3"), "{metrics}");
}

#[tokio::test]
async fn an_invalid_plate_after_an_early_call_releases_nothing_more_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let lab = open_lab(dir.path());
    let positive = || cts(Some(18.0), Some(19.0), Some(27.0));
    let (plate, mid) = judged_plate(
        &lab,
        "PL-E2",
        &[("A1", "E2-POS", 1)],
        &[("A1", positive())],
        true,
    )
    .await;
    let offered = candidates_from_judgement(&lab, &plate, &mid, &provenance("R10")).unwrap();
    // Once the run has ended, its final staging decides: nothing early.
    let next = lab.outbox().next_seq();
    assert_eq!(
        release_early(&lab, user("run:10"), offered.clone(), 44, 45, || false)
            .await
            .unwrap(),
        0
    );
    assert_eq!(lab.outbox().next_seq(), next);
    assert!(load_candidate(&lab, "LAB-R10-A1-E2-POS").unwrap().is_none());
    assert_eq!(
        release_early(&lab, user("run:10"), offered, 30, 45, || true)
            .await
            .unwrap(),
        1
    );
    // At the end the NTC crossed: the plate is invalid.
    let kit = lab.kits().find(KIT).unwrap();
    let readings: BTreeMap<Well, BTreeMap<String, Ct>> = BTreeMap::from([
        ("A1".parse().unwrap(), positive()),
        ("G12".parse().unwrap(), cts(Some(38.0), Some(38.0), None)),
        (
            "H12".parse().unwrap(),
            cts(Some(28.0), Some(28.5), Some(27.0)),
        ),
    ]);
    let end = RunJudgement {
        plate: kit.judge_plate(plate.format, &readings).unwrap(),
        unjudged: Vec::new(),
    };
    let outcome = stage_from_judgement(&lab, user("run:10"), &plate, &end, provenance("R10"))
        .await
        .unwrap();
    assert_eq!(outcome.early_disagreed, 1, "{outcome:?}");
    let c = load_candidate(&lab, "LAB-R10-A1-E2-POS").unwrap().unwrap();
    assert_eq!(c.state, CandidateState::RerunRequested);
    assert!(
        c.decision_reason
            .as_deref()
            .unwrap()
            .contains("preliminary version 1 (positive)"),
        "{c:?}"
    );
    assert_eq!(released_versions(&lab, "LAB-R10-A1-E2-POS"), Some(1));
}

/// The state and tube indexes give what a scan of every candidate gives, after
/// staging and after decisions that move candidates between states; and a store
/// written before the indexes (index keys missing) is indexed by `index::ensure`.
#[tokio::test]
async fn the_indexes_agree_with_a_full_scan_and_an_old_store_is_indexed_once() {
    let dir = tempfile::tempdir().unwrap();
    let lab = open_lab(dir.path());
    let (plate, judged) = judged_plate(
        &lab,
        "PL-IX",
        &[
            ("A1", "IX-POS", 1),
            ("B1", "IX-NEG", 1),
            ("C1", "IX-POS-2", 1),
        ],
        &[
            ("A1", cts(Some(22.0), Some(23.0), Some(27.0))),
            ("B1", cts(None, None, Some(26.0))),
            ("C1", cts(Some(25.0), Some(26.0), Some(27.0))),
        ],
        true,
    )
    .await;
    stage_from_judgement(&lab, user("cycler"), &plate, &judged, provenance("RX"))
        .await
        .unwrap();
    let agree = |lab: &Lab| {
        let all = candidates(lab, None).unwrap();
        for state in CandidateState::ALL {
            let mut by_index: Vec<String> = candidates(lab, Some(state))
                .unwrap()
                .into_iter()
                .map(|c| c.result_id)
                .collect();
            let mut by_scan: Vec<String> = all
                .iter()
                .filter(|c| c.state == state)
                .map(|c| c.result_id.clone())
                .collect();
            by_index.sort();
            by_scan.sort();
            assert_eq!(by_index, by_scan, "{state:?}");
        }
        for tube in ["IX-POS", "IX-NEG", "IX-POS-2"] {
            let of_tube = candidates_of_tube(lab, tube).unwrap();
            assert_eq!(of_tube.len(), 1, "{tube}");
            assert_eq!(of_tube[0].tube, tube);
        }
        all.len()
    };
    assert_eq!(agree(&lab), 3);
    assert_eq!(
        candidates(&lab, Some(CandidateState::AwaitingReview))
            .unwrap()
            .len(),
        3
    );
    decide(
        &lab,
        user("rob"),
        "LAB-RX-A1-IX-POS".into(),
        Decision::Release,
    )
    .await
    .unwrap();
    decide(
        &lab,
        user("rob"),
        "LAB-RX-C1-IX-POS-2".into(),
        Decision::Rerun {
            reason: "late curve".into(),
        },
    )
    .await
    .unwrap();
    agree(&lab);
    assert_eq!(
        candidates(&lab, Some(CandidateState::AwaitingReview))
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        candidates(&lab, Some(CandidateState::Released))
            .unwrap()
            .len(),
        1
    );

    // An index built before these keys existed: remove them, then index again.
    // This store never ran `ensure` (pcrd serve runs it at start): it indexes the
    // candidates again, which changes nothing, and marks the store indexed.
    assert_eq!(index::ensure(&lab).await.unwrap(), 3);
    agree(&lab);
    assert_eq!(index::ensure(&lab).await.unwrap(), 0, "once");
    let tree = &lab.store().trees().review;
    tree.remove(index::BUILT).unwrap();
    let stale: Vec<_> = tree
        .iter()
        .keys()
        .map(Result::unwrap)
        .filter(|k| matches!(k.first(), Some(b's' | b't' | b'x')))
        .collect();
    assert!(!stale.is_empty());
    for k in stale {
        tree.remove(k).unwrap();
    }
    assert!(
        candidates(&lab, Some(CandidateState::Released))
            .unwrap()
            .is_empty()
    );
    assert_eq!(index::ensure(&lab).await.unwrap(), 3);
    agree(&lab);
    assert_eq!(index::ensure(&lab).await.unwrap(), 0, "once");
}
