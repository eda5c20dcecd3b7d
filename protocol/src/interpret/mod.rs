//! Interpretation: Ct values in, calls out (protocols.md §8-§10).
//!
//! Everything here is a pure function of a kit definition and the readings
//! handed in. A kit (see [`crate::kit`]) brings its targets with their
//! cut-offs and grey zones, a decision table for specimens, what each run
//! control must show, and the largest pool it accepts; this module applies
//! them:
//!
//! - [`KitDefinition::interpret_sample`]: one specimen well's per-target
//!   Cts to a [`WellCall`] (detected, not detected, inconclusive, retest or
//!   invalid), with the reason in words, the state of every target and the
//!   kit id and version that decided it.
//! - [`KitDefinition::check_controls`]: a plate's control wells to a
//!   [`PlateValidity`] listing every control that failed, where and why.
//! - [`KitDefinition::judge_plate`]: both at once; on an invalid plate every
//!   specimen is invalid with the plate's reason.
//! - [`KitDefinition::pool_outcome`]: what a pooled tube's call means for
//!   its members (CDC App. B-C deconvolution).
//!
//! Cut-offs are applied to the Ct rounded to two decimals exactly as it is
//! reported (protocols.md §6), so 40.004 is judged as the 40.00 a reader
//! sees ([`CtValue`]).
//!
//! What this module does not do: compute Cts (see [`crate::analysis`]),
//! decide who may release a result, remember earlier runs (a retest's
//! second result is the caller's to combine with the first), or talk to a
//! LIS. Curve QC flags do not change a call; they are listed in
//! [`WellCall::qc_holds`] and block release until a person has looked
//! (protocols.md §6).

mod controls;
mod plate;
mod pool;
mod rules;
mod target;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

pub use controls::{ControlFailure, ControlProblem, Expectation, PlateValidity};
pub(crate) use controls::{RawExpectation, validate_control_table};
pub use plate::PlateJudgement;
pub use pool::{MemberRelease, PoolError, PoolOutcome};
pub use rules::{CountRange, MAX_RULES, MAX_TARGETS, Rule, StateSet};
pub(crate) use rules::{RawRule, check_table, target_names};
pub use target::{CtValue, Cutoff, CutoffOp, GreyZone, Target, TargetKind, TargetState};
pub(crate) use target::{RawTarget, check_loinc};

use crate::analysis::{Ct, QcFlag};
use crate::domain::{PlateFormat, Well};
use crate::kit::{KitDefinition, KitId};

/// The outcome of one specimen (or pool) under a kit's rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Call {
    /// SARS-CoV-2 RNA detected (positive).
    Detected,
    /// SARS-CoV-2 RNA not detected (negative).
    NotDetected,
    /// Neither: reported as inconclusive once a repeat gives the same
    /// (the CDC panel's single-marker result).
    Inconclusive,
    /// Test the specimen again before anything is reported.
    Retest,
    /// The specimen (or the run) failed: nothing can be said about it.
    Invalid,
}

impl fmt::Display for Call {
    /// The snake_case name, e.g. "not_detected".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Call::Detected => "detected",
            Call::NotDetected => "not_detected",
            Call::Inconclusive => "inconclusive",
            Call::Retest => "retest",
            Call::Invalid => "invalid",
        })
    }
}

/// Which kit definition decided a result: stored with every result
/// (protocols.md §8, "Store the rule version with every result").
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct KitRef {
    /// The kit's id.
    pub id: KitId,
    /// The kit definition's version.
    pub version: String,
}

impl fmt::Display for KitRef {
    /// "id@version", as [`KitDefinition::key`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.id, self.version)
    }
}

/// One target's reading in one well: its Ct and any curve QC flags.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Reading {
    /// The Ct (or Undetermined).
    pub ct: Ct,
    /// Curve QC findings; each blocks release until reviewed.
    pub qc_flags: Vec<QcFlag>,
}

impl From<Ct> for Reading {
    fn from(ct: Ct) -> Self {
        Reading {
            ct,
            qc_flags: Vec::new(),
        }
    }
}

/// What the interpretation functions accept per target: a bare [`Ct`], or a
/// [`Reading`] with QC flags.
pub trait Observed {
    /// The Ct.
    fn ct(&self) -> Ct;

    /// Curve QC flags (none for a bare Ct).
    fn qc_flags(&self) -> &[QcFlag] {
        &[]
    }
}

impl Observed for Ct {
    fn ct(&self) -> Ct {
        *self
    }
}

impl Observed for Reading {
    fn ct(&self) -> Ct {
        self.ct
    }

    fn qc_flags(&self) -> &[QcFlag] {
        &self.qc_flags
    }
}

/// One target in a [`WellCall`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TargetCall {
    /// The target's name.
    pub target: String,
    /// Its channel.
    pub channel: String,
    /// Viral, internal control or human control.
    pub kind: TargetKind,
    /// The Ct as given (`null` = Undetermined).
    pub ct: Ct,
    /// The Ct as reported and judged (two decimals).
    pub reported_ct: Option<CtValue>,
    /// Its state under the kit's cut-off and grey zone.
    pub state: TargetState,
    /// The LOINC code of the target's Ct observation, if the kit has one.
    pub loinc: Option<String>,
}

/// Which part of the kit decided a call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum DecidedBy {
    /// A rule of the decision table.
    Rule {
        /// Its position in the table, from 0.
        index: usize,
        /// Its name.
        name: String,
    },
    /// The plate's run controls failed, overriding the rule.
    RunControls {
        /// What the well's own reading gave before the override.
        sample_call: Call,
    },
}

/// A curve QC flag that holds a well's result for review.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct QcHold {
    /// The target whose curve was flagged.
    pub target: String,
    /// The flag.
    pub flag: QcFlag,
}

/// The call for one specimen well.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WellCall {
    /// Kit id and version that decided it.
    pub kit: KitRef,
    /// The call.
    pub call: Call,
    /// What to do next, from the rule (or the run-control override).
    pub action: String,
    /// Why, in words naming every target and its Ct.
    pub reason: String,
    /// The rule (or run-control failure) that decided.
    pub decided_by: DecidedBy,
    /// Every target, in the kit's channel order.
    pub targets: Vec<TargetCall>,
    /// Curve QC flags; while any is present the result waits for review.
    pub qc_holds: Vec<QcHold>,
}

impl WellCall {
    /// Whether curve QC flags hold the result for review.
    pub fn is_held(&self) -> bool {
        !self.qc_holds.is_empty()
    }
}

/// Why readings could not be interpreted. These are the caller's input
/// problems, not lab outcomes: a failed specimen is a [`Call`], never an
/// error.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum InterpretError {
    /// A target of the kit has no reading: the channel was not read, not
    /// exported, or mapped to another name.
    #[error("kit {kit}: no reading for target {target:?}")]
    MissingTarget {
        /// "id@version".
        kit: String,
        /// The target without a reading.
        target: String,
    },
    /// A reading names a target the kit does not have (often a channel
    /// mapped to the wrong kit).
    #[error("kit {kit}: {target:?} is not a target of this kit; its targets are {known}")]
    UnknownTarget {
        /// "id@version".
        kit: String,
        /// The name given (cut to 40 characters).
        target: String,
        /// The kit's targets, comma-separated.
        known: String,
    },
    /// A determined Ct that is not a cycle number: NaN, infinite, zero or
    /// less, or above [`CtValue::MAX_CYCLES`]. Undetermined is a value of
    /// its own, never a number.
    #[error("kit {kit}: target {target:?} has Ct {value}, which is not a cycle number")]
    NotACycle {
        /// "id@version".
        kit: String,
        /// The target.
        target: String,
        /// The number given.
        value: f64,
    },
    /// The kit has no layout for the plate format, so it cannot say where
    /// the controls are.
    #[error("kit {kit} has no {format}-well layout")]
    NoLayout {
        /// "id@version".
        kit: String,
        /// The format asked for.
        format: PlateFormat,
    },
    /// A well outside the plate format was given.
    #[error("kit {kit}: well {well} is not on a {format}-well plate")]
    WellOutsidePlate {
        /// "id@version".
        kit: String,
        /// The well.
        well: Well,
        /// The plate's format.
        format: PlateFormat,
    },
    /// One well of a plate could not be interpreted.
    #[error("well {well}: {source}")]
    Well {
        /// The well.
        well: Well,
        /// Why.
        source: Box<InterpretError>,
    },
}

impl KitDefinition {
    /// Which kit definition this is, for results.
    pub fn kit_ref(&self) -> KitRef {
        KitRef {
            id: self.id.clone(),
            version: self.version.clone(),
        }
    }

    /// Interprets one specimen well: `readings` maps every kit target's
    /// name to its Ct (a bare [`Ct`]) or [`Reading`]. Each target gets a
    /// state from its cut-off and grey zone, on the Ct as reported; the first
    /// rule of the kit's table whose conditions hold gives the call.
    ///
    /// Errors when a kit target has no reading, a reading names a target
    /// the kit does not have, or a Ct is not a cycle number.
    pub fn interpret_sample<R: Observed>(
        &self,
        readings: &BTreeMap<String, R>,
    ) -> Result<WellCall, InterpretError> {
        let targets = self.targets();
        let mut states = Vec::with_capacity(targets.len());
        let mut calls = Vec::with_capacity(targets.len());
        let mut described = Vec::with_capacity(targets.len());
        let mut qc_holds = Vec::new();
        for target in targets {
            let reading =
                readings
                    .get(&target.name)
                    .ok_or_else(|| InterpretError::MissingTarget {
                        kit: self.key(),
                        target: target.name.clone(),
                    })?;
            let ct = reading.ct();
            let reported = Target::reported(ct).map_err(|value| InterpretError::NotACycle {
                kit: self.key(),
                target: target.name.clone(),
                value,
            })?;
            let state = target.state_of(reported);
            states.push(state);
            described.push(target.describe(reported, state));
            calls.push(TargetCall {
                target: target.name.clone(),
                channel: target.channel.clone(),
                kind: target.kind,
                ct,
                reported_ct: reported,
                state,
                loinc: target.loinc.clone(),
            });
            qc_holds.extend(reading.qc_flags().iter().map(|&flag| QcHold {
                target: target.name.clone(),
                flag,
            }));
        }
        if let Some(unknown) = readings.keys().find(|name| self.target(name).is_none()) {
            return Err(InterpretError::UnknownTarget {
                kit: self.key(),
                target: crate::echo(unknown),
                known: target_names(targets),
            });
        }
        let rules = self.rules();
        // The table is total and ends with a catch-all (checked at load), so
        // a match always exists; the fallback is that catch-all.
        let index = rules::first_match(rules, targets, &states)
            .unwrap_or_else(|| rules.len().saturating_sub(1));
        let rule = &rules[index];
        Ok(WellCall {
            kit: self.kit_ref(),
            call: rule.call,
            action: rule.action.clone(),
            reason: format!("{}: {}", rule.name, described.join("; ")),
            decided_by: DecidedBy::Rule {
                index,
                name: rule.name.clone(),
            },
            targets: calls,
            qc_holds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Barcode, ControlKind, PoolSize};

    const TWO_TARGET_KIT: &str = include_str!("../../../kits/sarscov2-orf1ab-n-ic.toml");

    fn kit() -> KitDefinition {
        KitDefinition::from_toml_str(TWO_TARGET_KIT).unwrap()
    }

    fn w(s: &str) -> Well {
        s.parse().unwrap()
    }

    fn readings(orf1ab: Ct, n: Ct, ic: Ct) -> BTreeMap<String, Ct> {
        BTreeMap::from([
            ("ORF1ab".to_owned(), orf1ab),
            ("N".to_owned(), n),
            ("IC".to_owned(), ic),
        ])
    }

    const U: Ct = Ct::Undetermined;

    fn d(v: f64) -> Ct {
        Ct::Determined(v)
    }

    #[test]
    fn qc_flags_hold_the_call_without_changing_it() {
        let kit = kit();
        let mut with_flags: BTreeMap<String, Reading> = readings(d(25.0), d(26.0), d(30.0))
            .into_iter()
            .map(|(k, ct)| (k, Reading::from(ct)))
            .collect();
        let plain = kit.interpret_sample(&with_flags).unwrap();
        assert!(!plain.is_held());
        with_flags.get_mut("N").unwrap().qc_flags = vec![QcFlag::NoPlateau, QcFlag::Drift];
        let held = kit.interpret_sample(&with_flags).unwrap();
        assert_eq!(held.call, plain.call);
        assert!(held.is_held());
        assert_eq!(
            held.qc_holds,
            [
                QcHold {
                    target: "N".into(),
                    flag: QcFlag::NoPlateau
                },
                QcHold {
                    target: "N".into(),
                    flag: QcFlag::Drift
                }
            ]
        );
    }

    #[test]
    fn a_well_call_serializes_in_snake_case() {
        let call = kit().interpret_sample(&readings(U, U, d(30.004))).unwrap();
        let json = serde_json::to_value(&call).unwrap();
        assert_eq!(json["call"], "not_detected");
        assert_eq!(json["kit"]["id"], "sarscov2-orf1ab-n-ic");
        assert_eq!(json["kit"]["version"], "1.0");
        assert_eq!(json["decided_by"]["by"], "rule");
        assert_eq!(json["decided_by"]["index"], 2);
        assert_eq!(json["targets"][0]["ct"], serde_json::Value::Null);
        assert_eq!(json["targets"][2]["ct"], 30.004);
        assert_eq!(json["targets"][2]["reported_ct"], 30.0);
        assert_eq!(json["targets"][2]["kind"], "internal_control");
        assert_eq!(json["targets"][1]["loinc"], "94510-5");
        assert_eq!(json["targets"][1]["state"], "negative");
        assert_eq!(
            call.reason,
            "ORF1ab, N negative, IC positive: ORF1ab Undetermined negative; N Undetermined negative; IC 30.00 positive (<= 40.00)"
        );
    }

    #[test]
    fn input_errors_name_kit_and_target() {
        let kit = kit();
        let mut cts = readings(d(25.0), U, U);
        cts.remove("N");
        let e = kit.interpret_sample(&cts).unwrap_err();
        assert_eq!(
            e.to_string(),
            "kit sarscov2-orf1ab-n-ic@1.0: no reading for target \"N\""
        );
        let mut cts = readings(d(25.0), U, U);
        cts.insert("VIC".into(), d(20.0));
        let e = kit.interpret_sample(&cts).unwrap_err();
        assert_eq!(
            e.to_string(),
            "kit sarscov2-orf1ab-n-ic@1.0: \"VIC\" is not a target of this kit; its targets are ORF1ab, N, IC"
        );
        for bad in [f64::NAN, f64::INFINITY, 0.0, -3.0, 1e9] {
            let e = kit.interpret_sample(&readings(d(bad), U, U)).unwrap_err();
            assert!(
                matches!(e, InterpretError::NotACycle { .. }),
                "{bad}: {e:?}"
            );
        }
    }

    #[test]
    fn controls_given_twice_or_on_a_format_without_a_layout() {
        let kit = kit();
        let ntc = readings(U, U, U);
        let pc = readings(d(27.0), d(28.0), U);
        let controls = [
            (ControlKind::PositiveControl, w("H12"), pc.clone()),
            (ControlKind::NoTemplateControl, w("G12"), ntc.clone()),
            (ControlKind::NoTemplateControl, w("G12"), ntc),
        ];
        let validity = kit.check_controls(PlateFormat::Wells96, &controls).unwrap();
        assert_eq!(validity.failures().len(), 1);
        assert_eq!(validity.failures()[0].problem, ControlProblem::Repeated);
        assert_eq!(
            validity.reason().unwrap(),
            "NTC G12: the well is given more than once"
        );

        let cdc =
            KitDefinition::from_toml_str(include_str!("../../../kits/cdc-n1-n2-rp.toml")).unwrap();
        let e = cdc
            .check_controls::<Ct>(PlateFormat::Wells384, &[])
            .unwrap_err();
        assert_eq!(e.to_string(), "kit cdc-n1-n2-rp@1.0 has no 384-well layout");
        let json = serde_json::to_value(&validity).unwrap();
        assert_eq!(json["validity"], "invalid");
        assert_eq!(json["failures"][0]["problem"], "repeated");
        assert_eq!(json["failures"][0]["control"], "no_template_control");
        assert_eq!(json["failures"][0]["well"], "G12");
        assert_eq!(
            serde_json::to_value(PlateValidity::Valid).unwrap()["validity"],
            "valid"
        );
    }

    #[test]
    fn an_invalid_plate_voids_a_call_once_and_keeps_the_wells_own_call() {
        let kit = kit();
        let call = kit
            .interpret_sample(&readings(d(25.0), d(26.0), d(30.0)))
            .unwrap();
        assert_eq!(PlateValidity::Valid.apply(call.clone()), call);
        let ntc = readings(d(35.0), U, U);
        let validity = kit
            .check_controls(
                PlateFormat::Wells96,
                &[
                    (
                        ControlKind::PositiveControl,
                        w("H12"),
                        readings(d(27.0), d(28.0), U),
                    ),
                    (ControlKind::NoTemplateControl, w("G12"), ntc),
                ],
            )
            .unwrap();
        let voided = validity.apply(call.clone());
        assert_eq!(voided.call, Call::Invalid);
        assert_eq!(
            voided.decided_by,
            DecidedBy::RunControls {
                sample_call: Call::Detected
            }
        );
        assert_eq!(voided.targets, call.targets);
        assert_eq!(voided.kit, call.kit);
        assert!(
            voided.reason.starts_with(
                "run controls failed: NTC G12: ORF1ab 35.00, expected negative (Undetermined). The well's own reading was detected: ORF1ab and N positive: "
            ),
            "{}",
            voided.reason
        );
        // Voided by a second batch's controls, the well's own call is kept.
        let twice = validity.apply(voided);
        assert_eq!(
            twice.decided_by,
            DecidedBy::RunControls {
                sample_call: Call::Detected
            }
        );
    }

    #[test]
    fn judge_plate_errors_name_the_well() {
        let kit = kit();
        let mut wells = BTreeMap::from([
            (w("H12"), readings(d(27.0), d(28.0), U)),
            (w("G12"), readings(U, U, U)),
            (w("A1"), readings(d(25.0), d(26.0), U)),
        ]);
        let judged = kit.judge_plate(PlateFormat::Wells96, &wells).unwrap();
        assert!(judged.validity.is_valid());
        assert_eq!(judged.samples.len(), 1);
        assert_eq!(judged.samples[&w("A1")].call, Call::Detected);
        let json = serde_json::to_value(&judged).unwrap();
        assert_eq!(json["samples"]["A1"]["call"], "detected");
        assert_eq!(json["format"], 96);

        wells.insert(w("B1"), BTreeMap::from([("ORF1ab".to_owned(), U)]));
        let e = kit.judge_plate(PlateFormat::Wells96, &wells).unwrap_err();
        assert_eq!(
            e.to_string(),
            "well B1: kit sarscov2-orf1ab-n-ic@1.0: no reading for target \"N\""
        );
        wells.remove(&w("B1"));
        wells.insert(w("I1"), readings(U, U, U));
        let e = kit.judge_plate(PlateFormat::Wells96, &wells).unwrap_err();
        assert!(
            matches!(e, InterpretError::WellOutsidePlate { .. }),
            "{e:?}"
        );
        // On a 384-well plate the same wells are all specimens and the
        // plate's own control wells are missing.
        let judged = kit.judge_plate(PlateFormat::Wells384, &wells).unwrap();
        assert_eq!(judged.validity.failures().len(), 4);
        assert!(judged.samples.values().all(|c| c.call == Call::Invalid));
    }

    #[test]
    fn pool_outcomes_need_the_deciding_kit_and_carry_notes() {
        let kit = kit();
        let call = kit.interpret_sample(&readings(U, U, d(30.0))).unwrap();
        let members: Vec<Barcode> = ["AB-01", "AB-02"]
            .into_iter()
            .map(|b| Barcode::new(b).unwrap())
            .collect();
        let two = PoolSize::new(2).unwrap();
        let outcome = kit.pool_outcome(&call, two, &members).unwrap();
        let PoolOutcome::MembersReleased {
            members: released, ..
        } = &outcome
        else {
            panic!("{outcome:?}")
        };
        assert_eq!(
            released[0].note,
            "pooled: tested in a pool of 2 that was not detected (kit sarscov2-orf1ab-n-ic@1.0)"
        );
        let json = serde_json::to_value(&outcome).unwrap();
        assert_eq!(json["outcome"], "members_released");
        assert_eq!(json["members"][1]["barcode"], "AB-02");
        assert_eq!(json["members"][1]["call"], "not_detected");

        let cdc =
            KitDefinition::from_toml_str(include_str!("../../../kits/cdc-n1-n2-rp.toml")).unwrap();
        let e = cdc.pool_outcome(&call, two, &members).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the pool's call was made with kit sarscov2-orf1ab-n-ic@1.0, not cdc-n1-n2-rp@1.0"
        );
    }
}
