//! Run-control acceptance (protocols.md §9): what each control well must
//! show per target, and whether a plate's controls did.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::target::{CtValue, Target, TargetState, kit_ct};
use super::{Call, DecidedBy, InterpretError, Observed, WellCall};
use crate::domain::{ControlKind, PlateFormat, Well};
use crate::kit::{KitDefinition, ProblemKind, Problems};

/// What one target of one control must show.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "expect", rename_all = "snake_case")]
pub enum Expectation {
    /// Amplified: with no window, the reported Ct passes the target's
    /// cut-off (grey fails); with a window, it lies in `[min, max]`.
    Positive {
        /// Lowest accepted Ct, if bounded (a positive control far too
        /// early suggests contamination or a concentrated control).
        #[serde(skip_serializing_if = "Option::is_none")]
        min: Option<CtValue>,
        /// Highest accepted Ct, if bounded.
        #[serde(skip_serializing_if = "Option::is_none")]
        max: Option<CtValue>,
    },
    /// Not amplified: Undetermined, or (if `above` is given) a Ct above it.
    Negative {
        /// A determined Ct above this still counts as negative.
        #[serde(skip_serializing_if = "Option::is_none")]
        above: Option<CtValue>,
    },
    /// Ignored (e.g. an internal-control blip in a no-template control,
    /// broadinstitute/covid19-testing#22).
    Any,
}

impl Expectation {
    /// "positive (< 40.00)", "positive (Ct 20.00 to 30.00)", "negative
    /// (Undetermined)", "negative (Undetermined or Ct > 40.00)", "any".
    pub fn describe(self, target: &Target) -> String {
        match self {
            Expectation::Positive { min, max } => match (min, max) {
                (None, None) => format!("positive ({})", target.cutoff),
                (Some(min), Some(max)) => format!("positive (Ct {min} to {max})"),
                (Some(min), None) => format!("positive (Ct >= {min})"),
                (None, Some(max)) => format!("positive (Ct <= {max})"),
            },
            Expectation::Negative { above: None } => "negative (Undetermined)".to_owned(),
            Expectation::Negative { above: Some(above) } => {
                format!("negative (Undetermined or Ct > {above})")
            }
            Expectation::Any => "any".to_owned(),
        }
    }

    /// Whether a reported Ct (`None` = Undetermined) meets the expectation.
    pub fn accepts(self, target: &Target, reported: Option<CtValue>) -> bool {
        match (self, reported) {
            (Expectation::Any, _) => true,
            (Expectation::Positive { .. }, None) => false,
            (
                Expectation::Positive {
                    min: None,
                    max: None,
                },
                Some(ct),
            ) => target.state_of(Some(ct)) == TargetState::Positive,
            (Expectation::Positive { min, max }, Some(ct)) => {
                min.is_none_or(|min| ct >= min) && max.is_none_or(|max| ct <= max)
            }
            (Expectation::Negative { .. }, None) => true,
            (Expectation::Negative { above }, Some(ct)) => above.is_some_and(|above| ct > above),
        }
    }
}

/// Why a control failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ControlProblem {
    /// The kit's layout has this control here, but no reading was given
    /// for the well (not read, not exported, or the plate map is wrong).
    Missing,
    /// A reading was given as this control in a well where the kit's layout
    /// has no such control (a rotated plate, a wrong layout).
    NotInLayout,
    /// The same well was given twice.
    Repeated,
    /// The control's reading lacks a target the kit expects something of.
    NoReading,
    /// The reading names a target the kit does not have.
    UnknownTarget,
    /// The Ct is not a cycle number (NaN, zero, negative).
    NotACycle,
    /// The target's Ct is not what the control must show.
    OutsideExpectation,
}

/// One control that failed, where, and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ControlFailure {
    /// Which control.
    pub control: ControlKind,
    /// Its well.
    pub well: Well,
    /// The target at fault, if the failure is about one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The kind of failure.
    pub problem: ControlProblem,
    /// The same in words: "NTC G12: N1 35.10, expected negative
    /// (Undetermined)".
    pub reason: String,
}

/// Whether a plate's run controls passed.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "validity", rename_all = "snake_case")]
pub enum PlateValidity {
    /// Every control showed what the kit expects.
    Valid,
    /// At least one control failed; no specimen on the plate may be
    /// released.
    Invalid {
        /// Every failure, by well, then target.
        failures: Vec<ControlFailure>,
    },
}

impl PlateValidity {
    /// True for [`PlateValidity::Valid`].
    pub fn is_valid(&self) -> bool {
        matches!(self, PlateValidity::Valid)
    }

    /// The failures (empty when valid).
    pub fn failures(&self) -> &[ControlFailure] {
        match self {
            PlateValidity::Valid => &[],
            PlateValidity::Invalid { failures } => failures,
        }
    }

    /// Every failure's reason, joined: `None` when valid.
    pub fn reason(&self) -> Option<String> {
        match self {
            PlateValidity::Valid => None,
            PlateValidity::Invalid { failures } => Some(
                failures
                    .iter()
                    .map(|f| f.reason.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
        }
    }

    /// A sample's call under these controls: unchanged on a valid plate;
    /// on an invalid plate `invalid`, with the plate's reason first and the
    /// well's own reading kept in the reason (and in
    /// [`DecidedBy::RunControls`]) for the record. Re-extraction is asked
    /// for when an extraction control failed (the specimen's extract is
    /// suspect too), re-amplification otherwise (protocols.md §9).
    pub fn apply(&self, call: WellCall) -> WellCall {
        let Some(reason) = self.reason() else {
            return call;
        };
        let extraction = self
            .failures()
            .iter()
            .any(|f| f.control == ControlKind::ExtractionNegativeControl);
        let action = if extraction {
            "Run controls failed, including the extraction control: re-extract and re-test this specimen."
        } else {
            "Run controls failed: repeat the PCR for this specimen from its extract (re-amplify)."
        };
        let own = match &call.decided_by {
            DecidedBy::RunControls { sample_call } => *sample_call,
            DecidedBy::Rule { .. } => call.call,
        };
        WellCall {
            call: Call::Invalid,
            action: action.to_owned(),
            reason: format!(
                "run controls failed: {reason}. The well's own reading was {own}: {}",
                call.reason
            ),
            decided_by: DecidedBy::RunControls { sample_call: own },
            ..call
        }
    }
}

impl KitDefinition {
    /// Judges a plate's run controls (protocols.md §9): each `(control,
    /// well, readings)` is checked against the kit's expectations for that
    /// control, every control well of the kit's `format` layout must be
    /// given, and a reading given as a control in a well the layout does not
    /// have it in fails too (a rotated plate). Every failure is listed.
    ///
    /// QC flags on control readings are not judged here; the Ct is.
    pub fn check_controls<R: Observed>(
        &self,
        format: PlateFormat,
        controls: &[(ControlKind, Well, BTreeMap<String, R>)],
    ) -> Result<PlateValidity, InterpretError> {
        self.check_control_readings(
            format,
            controls
                .iter()
                .map(|(kind, well, readings)| (*kind, *well, readings)),
        )
    }

    /// [`KitDefinition::check_controls`] over borrowed readings.
    pub(crate) fn check_control_readings<'a, R: Observed + 'a>(
        &self,
        format: PlateFormat,
        controls: impl IntoIterator<Item = (ControlKind, Well, &'a BTreeMap<String, R>)>,
    ) -> Result<PlateValidity, InterpretError> {
        let template = self
            .template(format)
            .ok_or_else(|| InterpretError::NoLayout {
                kit: self.key(),
                format,
            })?;
        let mut failures = Vec::new();
        let mut seen = BTreeSet::new();
        for (control, well, readings) in controls {
            let label = control.short_label();
            let mut fail = |target: Option<&str>, problem, reason: String| {
                failures.push(ControlFailure {
                    control,
                    well,
                    target: target.map(str::to_owned),
                    problem,
                    reason,
                });
            };
            if !seen.insert(well) {
                fail(
                    None,
                    ControlProblem::Repeated,
                    format!("{label} {well}: the well is given more than once"),
                );
                continue;
            }
            if template.controls.get(&well) != Some(&control) {
                fail(
                    None,
                    ControlProblem::NotInLayout,
                    format!(
                        "{label} {well}: kit {} has no {control} in {well} on a {format}-well plate (is the plate rotated?)",
                        self.key()
                    ),
                );
                continue;
            }
            for name in readings.keys() {
                if self.target(name).is_none() {
                    fail(
                        Some(name),
                        ControlProblem::UnknownTarget,
                        format!(
                            "{label} {well}: target {name:?} is not one of kit {}'s targets",
                            self.key()
                        ),
                    );
                }
            }
            let expectations = self.control_expectations(control);
            for target in self.targets() {
                // Load-time validation gives every target an expectation for
                // every control a layout uses; a gap would mean "any".
                let expectation = expectations
                    .and_then(|e| e.get(&target.name))
                    .copied()
                    .unwrap_or(Expectation::Any);
                if expectation == Expectation::Any {
                    continue;
                }
                let name = target.name.as_str();
                let Some(reading) = readings.get(name) else {
                    fail(
                        Some(name),
                        ControlProblem::NoReading,
                        format!(
                            "{label} {well}: no reading for {name}, expected {}",
                            expectation.describe(target)
                        ),
                    );
                    continue;
                };
                let ct = reading.ct();
                match Target::reported(ct) {
                    Err(value) => fail(
                        Some(name),
                        ControlProblem::NotACycle,
                        format!("{label} {well}: {name} Ct {value} is not a cycle number"),
                    ),
                    Ok(reported) if !expectation.accepts(target, reported) => {
                        let shown =
                            reported.map_or_else(|| "Undetermined".to_owned(), |v| v.to_string());
                        fail(
                            Some(name),
                            ControlProblem::OutsideExpectation,
                            format!(
                                "{label} {well}: {name} {shown}, expected {}",
                                expectation.describe(target)
                            ),
                        );
                    }
                    Ok(_) => {}
                }
            }
        }
        for (&well, &control) in &template.controls {
            if !seen.contains(&well) {
                failures.push(ControlFailure {
                    control,
                    well,
                    target: None,
                    problem: ControlProblem::Missing,
                    reason: format!(
                        "{} {well}: no reading for the {control} well",
                        control.short_label()
                    ),
                });
            }
        }
        if failures.is_empty() {
            return Ok(PlateValidity::Valid);
        }
        // By well (pipetting order), then target, whatever order the caller
        // gave: reports and golden files compare equal.
        failures.sort_by(|a, b| (a.well, &a.target).cmp(&(b.well, &b.target)));
        Ok(PlateValidity::Invalid { failures })
    }
}

/// The expectation kinds as written.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ExpectKind {
    Positive,
    Negative,
    Any,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExpectationTable {
    expect: ExpectKind,
    #[serde(default)]
    min: Option<f64>,
    #[serde(default)]
    max: Option<f64>,
    #[serde(default)]
    above: Option<f64>,
}

/// An expectation as written: `"positive"`, or a table such as `{ expect =
/// "positive", max = 37.0 }` or `{ expect = "negative", above = 40.0 }`.
pub(crate) struct RawExpectation(RawExpectationTable);

impl<'de> Deserialize<'de> for RawExpectation {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ExpectationVisitor;

        impl<'de> Visitor<'de> for ExpectationVisitor {
            type Value = RawExpectation;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "\"positive\", \"negative\", \"any\", or a table like { expect = \"positive\", max = 37.0 }",
                )
            }

            fn visit_str<E: de::Error>(self, s: &str) -> Result<RawExpectation, E> {
                let expect = ExpectKind::deserialize(de::value::StrDeserializer::<E>::new(s))?;
                Ok(RawExpectation(RawExpectationTable {
                    expect,
                    min: None,
                    max: None,
                    above: None,
                }))
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawExpectation, A::Error> {
                RawExpectationTable::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(RawExpectation)
            }
        }

        deserializer.deserialize_any(ExpectationVisitor)
    }
}

impl RawExpectation {
    /// Checks one expectation; `field` is "controls.positive_control.N1".
    pub(crate) fn validate(self, field: &str, problems: &mut Problems) -> Option<Expectation> {
        let raw = self.0;
        let before = problems.len();
        let mut ct = |key: &str, value: Option<f64>| {
            value.and_then(|v| kit_ct(v, &format!("{field}.{key}"), problems))
        };
        let min = ct("min", raw.min);
        let max = ct("max", raw.max);
        let above = ct("above", raw.above);
        let misplaced: &[(&str, bool)] = match raw.expect {
            ExpectKind::Positive => &[("above", raw.above.is_some())],
            ExpectKind::Negative => &[("min", raw.min.is_some()), ("max", raw.max.is_some())],
            ExpectKind::Any => &[
                ("min", raw.min.is_some()),
                ("max", raw.max.is_some()),
                ("above", raw.above.is_some()),
            ],
        };
        for &(key, present) in misplaced {
            if present {
                problems.push(
                    format!("{field}.{key}"),
                    ProblemKind::Misplaced {
                        key,
                        expect: match raw.expect {
                            ExpectKind::Positive => "positive",
                            ExpectKind::Negative => "negative",
                            ExpectKind::Any => "any",
                        },
                    },
                );
            }
        }
        if let (Some(min), Some(max)) = (min, max)
            && min > max
        {
            problems.push(
                field,
                ProblemKind::EmptyWindow {
                    min: min.to_string(),
                    max: max.to_string(),
                },
            );
        }
        if problems.len() > before {
            return None;
        }
        let expectation = match raw.expect {
            ExpectKind::Positive => Expectation::Positive { min, max },
            ExpectKind::Negative => Expectation::Negative { above },
            ExpectKind::Any => Expectation::Any,
        };
        Some(expectation)
    }
}

/// Checks a `[controls.<kind>]` table against the kit's targets.
pub(crate) fn validate_control_table(
    control: ControlKind,
    raw: BTreeMap<String, RawExpectation>,
    targets: &[Target],
    problems: &mut Problems,
) -> BTreeMap<String, Expectation> {
    let mut table = BTreeMap::new();
    for (name, raw) in raw {
        let field = format!("controls.{control}.{name}");
        if !targets.iter().any(|t| t.name == name) {
            problems.push(
                field,
                ProblemKind::UnknownTarget {
                    target: crate::echo(&name),
                    known: super::rules::target_names(targets),
                },
            );
            continue;
        }
        if let Some(expectation) = raw.validate(&field, problems) {
            table.insert(name, expectation);
        }
    }
    table
}
