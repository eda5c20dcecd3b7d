//! Golden vectors for the shipped kits: `tests/golden/<kit id>.toml` lists
//! readings and the outcome they must give (specimen calls, run-control
//! failures, whole plates, pool outcomes). The files are data, written from
//! the kits' sources (protocols.md §8-§10), not from this code's output.
//!
//! Besides checking each case, this test checks the vectors are complete:
//! every rule of every kit is reached by some specimen vector, every grey
//! zone is hit, every (control, target) the kit expects something of fails
//! in some control case, and every shipped kit has a golden file.
//!
//! File format (TOML), in brief:
//!
//! ```toml
//! kit = "cdc-n1-n2-rp"                  # the kit under test (file stem)
//!
//! [[sample]]                            # one specimen well
//! name = "N1 and N2 positive"
//! cts = { N1 = 25.1, N2 = "undetermined", RP = 28.0 }
//! call = "detected"                     # or: error = "missing_target"
//! rule = "N1 and N2 positive"           # optional: the deciding rule's name
//! states = { N1 = "positive" }          # optional: some targets' states
//! reason = ["N1 25.10 positive"]        # optional: text the reason holds
//!
//! [controls]                            # a passing set of control wells
//! format = 96
//! wells = [{ well = "H12", control = "positive_control", cts = { .. } }]
//!
//! [[control_case]]                      # the passing set, changed
//! name = "NTC amplifies N1"
//! set = [{ well = "G12", control = "no_template_control", cts = { .. } }]
//! remove = ["F12"]                      # wells dropped
//! format = 384                          # optional: start empty, on this format
//! failures = ["G12 N1 outside_expectation", "F12 - missing"]   # [] = valid
//!
//! [[plate_case]]                        # controls as a control_case, plus specimens
//! name = ".."
//! valid = false
//! samples = [{ well = "A1", cts = { .. }, call = "invalid" }]
//! action = ["re-extract"]               # optional: text every specimen's action holds
//!
//! [[pool]]
//! name = ".."
//! cts = { .. }                          # the pooled tube's readings
//! pool_size = 4
//! members = ["POOL-M1", ..]             # optional
//! outcome = "members_released"          # reported | members_released | members_retest
//! call = "not_detected"                 # reported call, or the members' call
//! # or: error = "member_count"
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use pcrd_protocol::analysis::Ct;
use pcrd_protocol::domain::{Barcode, ControlKind, PlateFormat, PoolSize, Well};
use pcrd_protocol::interpret::{
    Call, DecidedBy, Expectation, InterpretError, PlateValidity, PoolError, PoolOutcome,
    TargetState,
};
use pcrd_protocol::kit::KitDefinition;
use serde::Deserialize;

const KITS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../kits");
const GOLDEN_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden");

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Golden {
    kit: String,
    #[serde(default)]
    sample: Vec<SampleCase>,
    controls: ControlSet,
    #[serde(default)]
    control_case: Vec<ControlCase>,
    #[serde(default)]
    plate_case: Vec<PlateCase>,
    #[serde(default)]
    pool: Vec<PoolCase>,
}

/// A Ct as written: a number, or "undetermined".
#[derive(Clone, Deserialize)]
#[serde(untagged)]
enum CtIn {
    Value(f64),
    Word(String),
}

type Cts = BTreeMap<String, CtIn>;

fn ct(value: &CtIn) -> Ct {
    match value {
        CtIn::Value(v) => Ct::Determined(*v),
        CtIn::Word(w) if w == "undetermined" => Ct::Undetermined,
        CtIn::Word(w) => panic!("Ct {w:?}: write a number or \"undetermined\""),
    }
}

fn cts(values: &Cts) -> BTreeMap<String, Ct> {
    values.iter().map(|(k, v)| (k.clone(), ct(v))).collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SampleCase {
    name: String,
    cts: Cts,
    #[serde(default)]
    call: Option<Call>,
    #[serde(default)]
    rule: Option<String>,
    #[serde(default)]
    states: BTreeMap<String, TargetState>,
    #[serde(default)]
    reason: Vec<String>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlWell {
    well: String,
    control: ControlKind,
    cts: Cts,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlSet {
    format: u16,
    wells: Vec<ControlWell>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlCase {
    name: String,
    #[serde(default)]
    format: Option<u16>,
    #[serde(default)]
    set: Vec<ControlWell>,
    #[serde(default)]
    remove: Vec<String>,
    failures: Vec<String>,
    #[serde(default)]
    reason: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlateSample {
    well: String,
    cts: Cts,
    call: Call,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlateCase {
    name: String,
    #[serde(default)]
    set: Vec<ControlWell>,
    #[serde(default)]
    remove: Vec<String>,
    valid: bool,
    samples: Vec<PlateSample>,
    #[serde(default)]
    action: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolCase {
    name: String,
    cts: Cts,
    pool_size: u8,
    #[serde(default)]
    members: Vec<String>,
    #[serde(default)]
    outcome: Option<String>,
    #[serde(default)]
    call: Option<Call>,
    #[serde(default)]
    error: Option<String>,
}

fn well(s: &str) -> Well {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn format(n: u16) -> PlateFormat {
    PlateFormat::try_from(n).expect("96 or 384")
}

fn kits() -> BTreeMap<String, KitDefinition> {
    let mut kits = BTreeMap::new();
    for entry in fs::read_dir(KITS_DIR).expect("kits directory") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = fs::read_to_string(&path).expect("readable");
            let kit = KitDefinition::from_toml_str(&text)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            kits.insert(kit.id.to_string(), kit);
        }
    }
    kits
}

fn golden_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(GOLDEN_DIR)
        .expect("golden directory")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

fn load(path: &Path) -> Golden {
    let text = fs::read_to_string(path).expect("readable");
    toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn interpret_error_name(e: &InterpretError) -> &'static str {
    match e {
        InterpretError::MissingTarget { .. } => "missing_target",
        InterpretError::UnknownTarget { .. } => "unknown_target",
        InterpretError::NotACycle { .. } => "not_a_cycle",
        InterpretError::NoLayout { .. } => "no_layout",
        InterpretError::WellOutsidePlate { .. } => "well_outside_plate",
        InterpretError::Well { .. } => "well",
        _ => "other",
    }
}

fn pool_error_name(e: &PoolError) -> &'static str {
    match e {
        PoolError::MemberCount { .. } => "member_count",
        PoolError::DuplicateMember { .. } => "duplicate_member",
        PoolError::OtherKit { .. } => "other_kit",
        _ => "other",
    }
}

/// The control wells of a case: the file's passing set (or nothing, on
/// another format) with `remove` dropped and `set` replacing or adding.
fn control_wells(
    base: &ControlSet,
    case_format: Option<u16>,
    set: &[ControlWell],
    remove: &[String],
) -> (PlateFormat, Vec<ControlWell>) {
    let (fmt, mut wells) = match case_format {
        Some(n) => (format(n), Vec::new()),
        None => (format(base.format), base.wells.clone()),
    };
    wells.retain(|w| !remove.iter().any(|r| well(r) == well(&w.well)));
    for replacement in set {
        wells.retain(|w| well(&w.well) != well(&replacement.well));
        wells.push(replacement.clone());
    }
    (fmt, wells)
}

/// "G12 N1 outside_expectation" per failure.
fn failure_lines(validity: &PlateValidity) -> BTreeSet<String> {
    validity
        .failures()
        .iter()
        .map(|f| {
            let problem = serde_json::to_value(f.problem).expect("serializes");
            format!(
                "{} {} {}",
                f.well,
                f.target.as_deref().unwrap_or("-"),
                problem.as_str().expect("a string")
            )
        })
        .collect()
}

/// What one golden file exercised, for the completeness checks.
#[derive(Default)]
struct Coverage {
    rules: BTreeSet<usize>,
    grey: BTreeSet<String>,
    control_targets: BTreeSet<(ControlKind, String)>,
    missing_well: bool,
}

fn check_samples(kit: &KitDefinition, golden: &Golden, coverage: &mut Coverage) {
    for case in &golden.sample {
        let name = &case.name;
        let result = kit.interpret_sample(&cts(&case.cts));
        match (&case.error, result) {
            (Some(expected), Err(e)) => {
                assert_eq!(interpret_error_name(&e), expected, "{name}: {e}");
                assert!(e.to_string().contains(&kit.key()), "{name}: {e}");
            }
            (Some(expected), Ok(call)) => {
                panic!("{name}: expected error {expected}, got {call:?}")
            }
            (None, Err(e)) => panic!("{name}: {e}"),
            (None, Ok(call)) => {
                let expected = case.call.unwrap_or_else(|| panic!("{name}: no call"));
                assert_eq!(call.call, expected, "{name}: {}", call.reason);
                assert_eq!(call.kit, kit.kit_ref(), "{name}");
                let DecidedBy::Rule { index, name: rule } = &call.decided_by else {
                    panic!("{name}: decided by {:?}", call.decided_by);
                };
                assert_eq!(kit.rules()[*index].call, call.call);
                assert_eq!(call.action, kit.rules()[*index].action);
                coverage.rules.insert(*index);
                if let Some(expected_rule) = &case.rule {
                    assert_eq!(rule, expected_rule, "{name}");
                }
                assert!(
                    call.reason.starts_with(rule.as_str()),
                    "{name}: {}",
                    call.reason
                );
                // The reason names every target with its Ct as reported.
                for target in &call.targets {
                    let shown = target
                        .reported_ct
                        .map_or_else(|| "Undetermined".to_owned(), |v| v.to_string());
                    let words = format!("{} {shown} {}", target.target, target.state);
                    assert!(
                        call.reason.contains(&words),
                        "{name}: {words:?} in {}",
                        call.reason
                    );
                    if target.state == TargetState::Grey {
                        coverage.grey.insert(target.target.clone());
                    }
                }
                let order: Vec<&str> = call.targets.iter().map(|t| t.target.as_str()).collect();
                let kit_order: Vec<&str> = kit.targets().iter().map(|t| t.name.as_str()).collect();
                assert_eq!(order, kit_order, "{name}: targets in channel order");
                for (target, state) in &case.states {
                    let got = call
                        .targets
                        .iter()
                        .find(|t| t.target == *target)
                        .unwrap_or_else(|| panic!("{name}: no target {target}"));
                    assert_eq!(got.state, *state, "{name}: {target}");
                }
                for text in &case.reason {
                    assert!(
                        call.reason.contains(text),
                        "{name}: {text:?} in {}",
                        call.reason
                    );
                }
            }
        }
    }
}

fn check_control_cases(kit: &KitDefinition, golden: &Golden, coverage: &mut Coverage) {
    for case in &golden.control_case {
        let name = &case.name;
        let (fmt, wells) = control_wells(&golden.controls, case.format, &case.set, &case.remove);
        let input: Vec<(ControlKind, Well, BTreeMap<String, Ct>)> = wells
            .iter()
            .map(|w| (w.control, well(&w.well), cts(&w.cts)))
            .collect();
        let validity = kit
            .check_controls(fmt, &input)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let expected: BTreeSet<String> = case.failures.iter().cloned().collect();
        assert_eq!(failure_lines(&validity), expected, "{name}: {validity:#?}");
        assert_eq!(validity.is_valid(), expected.is_empty(), "{name}");
        let reason = validity.reason().unwrap_or_default();
        for text in &case.reason {
            assert!(reason.contains(text), "{name}: {text:?} in {reason}");
        }
        for failure in validity.failures() {
            assert!(
                failure.reason.contains(&failure.well.to_string()),
                "{name}: {}",
                failure.reason
            );
            if let Some(target) = &failure.target {
                assert!(failure.reason.contains(target.as_str()), "{name}");
                coverage
                    .control_targets
                    .insert((failure.control, target.clone()));
            }
            if failure.problem == pcrd_protocol::interpret::ControlProblem::Missing {
                coverage.missing_well = true;
            }
        }
    }
}

fn check_plate_cases(kit: &KitDefinition, golden: &Golden) {
    for case in &golden.plate_case {
        let name = &case.name;
        let (fmt, controls) = control_wells(&golden.controls, None, &case.set, &case.remove);
        let mut wells: BTreeMap<Well, BTreeMap<String, Ct>> = controls
            .iter()
            .map(|w| (well(&w.well), cts(&w.cts)))
            .collect();
        for sample in &case.samples {
            wells.insert(well(&sample.well), cts(&sample.cts));
        }
        let judged = kit
            .judge_plate(fmt, &wells)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            judged.validity.is_valid(),
            case.valid,
            "{name}: {:?}",
            judged.validity
        );
        assert_eq!(judged.kit, kit.kit_ref());
        assert_eq!(judged.samples.len(), case.samples.len(), "{name}");
        for sample in &case.samples {
            let call = &judged.samples[&well(&sample.well)];
            assert_eq!(
                call.call, sample.call,
                "{name} {}: {}",
                sample.well, call.reason
            );
            assert_eq!(call.kit, kit.kit_ref());
            if !case.valid {
                assert!(
                    call.reason.starts_with("run controls failed: "),
                    "{name}: {}",
                    call.reason
                );
                let plate_reason = judged.validity.reason().expect("invalid has a reason");
                assert!(call.reason.contains(&plate_reason), "{name}");
                assert!(matches!(call.decided_by, DecidedBy::RunControls { .. }));
            }
            for text in &case.action {
                assert!(
                    call.action.contains(text),
                    "{name}: {text:?} in {}",
                    call.action
                );
            }
        }
    }
}

fn check_pools(kit: &KitDefinition, golden: &Golden) {
    for case in &golden.pool {
        let name = &case.name;
        let call = kit
            .interpret_sample(&cts(&case.cts))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let size = PoolSize::new(case.pool_size).expect("valid pool size");
        let members: Vec<Barcode> = case
            .members
            .iter()
            .map(|m| Barcode::new(m.as_str()).expect("valid barcode"))
            .collect();
        let result = kit.pool_outcome(&call, size, &members);
        match (&case.error, result) {
            (Some(expected), Err(e)) => assert_eq!(pool_error_name(&e), expected, "{name}: {e}"),
            (Some(expected), Ok(o)) => panic!("{name}: expected error {expected}, got {o:?}"),
            (None, Err(e)) => panic!("{name}: {e}"),
            (None, Ok(outcome)) => {
                let json = serde_json::to_value(&outcome).expect("serializes");
                assert_eq!(
                    json["outcome"].as_str(),
                    case.outcome.as_deref(),
                    "{name}: {json}"
                );
                assert_eq!(json["kit"]["id"], kit.id.as_str(), "{name}");
                assert_eq!(json["pool_size"], case.pool_size, "{name}");
                match outcome {
                    PoolOutcome::Reported { call, .. } => {
                        assert_eq!(Some(call), case.call, "{name}");
                        assert!(members.len() <= 1 || case.pool_size == 1, "{name}");
                    }
                    PoolOutcome::MembersReleased {
                        members: released, ..
                    } => {
                        assert_eq!(
                            released.iter().map(|m| &m.barcode).collect::<Vec<_>>(),
                            members.iter().collect::<Vec<_>>(),
                            "{name}"
                        );
                        for m in &released {
                            assert_eq!(Some(m.call), case.call, "{name}");
                            assert!(m.note.starts_with("pooled"), "{name}: {}", m.note);
                        }
                    }
                    PoolOutcome::MembersRetest {
                        members: retest,
                        pool_call,
                        ..
                    } => {
                        assert_eq!(retest, members, "{name}");
                        assert_eq!(Some(pool_call), case.call, "{name}");
                    }
                }
            }
        }
    }
}

#[test]
fn every_shipped_kit_has_golden_vectors() {
    let kits = kits();
    let covered: BTreeSet<String> = golden_files()
        .iter()
        .map(|p| {
            p.file_stem()
                .and_then(|s| s.to_str())
                .expect("name")
                .to_owned()
        })
        .collect();
    let shipped: BTreeSet<String> = kits.keys().cloned().collect();
    assert_eq!(covered, shipped);
}

#[test]
fn golden_vectors_hold_and_cover_every_branch() {
    let kits = kits();
    let files = golden_files();
    assert!(!files.is_empty());
    for path in files {
        let golden = load(&path);
        let kit = kits
            .get(&golden.kit)
            .unwrap_or_else(|| panic!("{}: no kit {}", path.display(), golden.kit));
        assert_eq!(
            path.file_stem().and_then(|s| s.to_str()),
            Some(golden.kit.as_str())
        );
        let mut coverage = Coverage::default();
        check_samples(kit, &golden, &mut coverage);
        check_control_cases(kit, &golden, &mut coverage);
        check_plate_cases(kit, &golden);
        check_pools(kit, &golden);

        let key = kit.key();
        let all_rules: BTreeSet<usize> = (0..kit.rules().len()).collect();
        assert_eq!(
            coverage.rules, all_rules,
            "{key}: rules without a golden vector"
        );
        for target in kit.targets().iter().filter(|t| t.grey_zone.is_some()) {
            assert!(
                coverage.grey.contains(&target.name),
                "{key}: no vector puts {} in its grey zone",
                target.name
            );
        }
        for control in ControlKind::ALL {
            for (target, expectation) in kit.control_expectations(control).into_iter().flatten() {
                if *expectation != Expectation::Any {
                    assert!(
                        coverage
                            .control_targets
                            .contains(&(control, target.clone())),
                        "{key}: no control case fails {control} on {target}"
                    );
                }
            }
        }
        assert!(
            coverage.missing_well,
            "{key}: no case with a missing control well"
        );
        assert!(!golden.plate_case.is_empty(), "{key}: no plate case");
        let outcomes: BTreeSet<String> = golden
            .pool
            .iter()
            .filter_map(|p| p.outcome.clone())
            .collect();
        for needed in ["reported", "members_released", "members_retest"] {
            assert!(
                outcomes.contains(needed),
                "{key}: no pool case with outcome {needed}"
            );
        }
    }
}
