//! Analysis of a whole run: every reaction and target of one RDML run, one
//! threshold per target, and one record per reaction and target.
//!
//! [`analyze_curve`](crate::analysis::analyze_curve) judges one curve; a run
//! needs more. Every curve of a target is read at the same threshold (a fixed
//! one from the kit or the caller, or one chosen from all of that target's
//! curves by [`common_threshold`](analysis::common_threshold)), because
//! replicates read at per-curve thresholds scatter more than the wells
//! differ (Ruijter et al. 2013 compare methods at one threshold per target
//! for that reason). The instrument's own Cq, when the file has one, is
//! kept beside pcrd's and a disagreement is flagged.
//!
//! A reaction whose curve cannot be analysed (empty, too short, a reading
//! that is not a number) gets a record with `ct` = None and the reason in
//! `error`: it is reported, never given a made-up Ct, and the rest of the run
//! is still analysed.
//!
//! With a kit, [`judge_run`] turns the records into calls: each reaction is
//! a well, the kit's layout says which wells are controls, and
//! [`crate::interpret`] applies the kit's rules.
//!
//! What this module does not do: read files (the caller hands it a parsed
//! [`Document`]), or combine wells: a singleplex layout with one target per
//! well (the CDC panel as run on a 7500) must be exported with the markers
//! as targets of one reaction to be judged here.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::analysis::{
    self, AnalysisError, AnalysisSettings, Baseline, Chooser, Ct, DEFAULT_INSTRUMENT_TOLERANCE,
    Method, Need, Prepared, QcFlag,
};
use crate::domain::{PlateFormat, Well};
use crate::interpret::{PlateJudgement, Reading, Target};
use crate::kit::KitDefinition;
use crate::rdml::{Document, Run};

/// How a run is analysed.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSettings {
    /// Method, baseline window and (unless overridden per target) automatic
    /// threshold.
    pub curve: AnalysisSettings,
    /// Per RDML target id: what the kit (or the caller) fixes for it.
    pub targets: BTreeMap<String, TargetSettings>,
    /// Largest |pcrd Ct − instrument Cq| accepted without a flag, for
    /// targets that do not set their own.
    pub instrument_tolerance: f64,
}

/// What is fixed for one target; `None` takes the run's setting.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TargetSettings {
    /// A fixed threshold on the baseline-corrected curve (the kit's
    /// validated value). Without one, the target's curves share their
    /// [`common_threshold`](analysis::common_threshold).
    pub threshold: Option<f64>,
    /// Threshold crossing or Cp for this target.
    pub method: Option<Method>,
    /// Instrument-Ct tolerance for this target.
    pub instrument_tolerance: Option<f64>,
}

impl Default for RunSettings {
    fn default() -> Self {
        RunSettings {
            curve: AnalysisSettings::default(),
            targets: BTreeMap::new(),
            instrument_tolerance: DEFAULT_INSTRUMENT_TOLERANCE,
        }
    }
}

impl RunSettings {
    /// Adds what `kit` fixes (threshold, method, instrument tolerance) for
    /// every target of `doc` that maps to one of the kit's targets (see
    /// [`kit_target`]). What is already set (by the command line) stays.
    pub fn with_kit(mut self, kit: &KitDefinition, doc: &Document) -> Self {
        for target in &doc.targets {
            let Some(kit_target) = kit_target(kit, &target.id, &target.dye_id) else {
                continue;
            };
            let entry = self.targets.entry(target.id.clone()).or_default();
            entry.threshold = entry.threshold.or(kit_target.threshold);
            entry.method = entry.method.or(kit_target.ct_method);
            entry.instrument_tolerance = entry
                .instrument_tolerance
                .or(Some(kit_target.instrument_tolerance));
        }
        self
    }
}

/// The kit target an RDML target stands for: the one of the same name, else
/// the one read in its dye's channel (or an alias of it).
pub fn kit_target<'k>(kit: &'k KitDefinition, target_id: &str, dye: &str) -> Option<&'k Target> {
    kit.target(target_id)
        .or_else(|| kit.target_for_channel(dye))
}

/// The result for one reaction and one target.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReactionRecord {
    /// RDML reaction id (wells numbered row by row from 1).
    pub reaction: u32,
    /// Well label ("B3"), from the run's plate format.
    pub well: String,
    /// RDML sample id.
    pub sample: String,
    /// RDML sample type (unkn, ntc, pos, std, ...).
    pub sample_type: String,
    /// RDML target id.
    pub target: String,
    /// The target's dye (the channel it was read in).
    pub dye: String,
    /// pcrd's Ct: a number, or None when Undetermined or not analysed (see
    /// `error`).
    pub ct: Option<f64>,
    /// Threshold crossing or Cp.
    pub method: Method,
    /// Threshold used on the baseline-corrected curve; None when the curve
    /// was not analysed.
    pub threshold: Option<f64>,
    /// The baseline line subtracted and the window it was fitted over
    /// (protocols.md §6: store threshold, window and method with the Ct);
    /// None when the curve was not analysed.
    pub baseline: Option<Baseline>,
    /// Curve QC flags (empty when the curve is clean).
    pub qc: Vec<QcFlag>,
    /// The Cq the instrument wrote in the file (None when absent or −1).
    pub instrument_cq: Option<f64>,
    /// The file's exclusion note for this reaction, if any.
    pub excluded: Option<String>,
    /// Why the curve could not be analysed; `ct` is then None and means
    /// "no result", not "Undetermined".
    pub error: Option<String>,
}

impl ReactionRecord {
    /// The Ct as analysed, or None when the curve was not analysed.
    pub fn analysed_ct(&self) -> Option<Ct> {
        if self.error.is_some() {
            return None;
        }
        Some(self.ct.map_or(Ct::Undetermined, Ct::Determined))
    }
}

/// Analyses every reaction of `run` in `doc`. Records come in reaction
/// order, then in the order of the reaction's data elements.
pub fn analyze_run(doc: &Document, run: &Run, settings: &RunSettings) -> Vec<ReactionRecord> {
    let dye_of: BTreeMap<&str, &str> = doc
        .targets
        .iter()
        .map(|t| (t.id.as_str(), t.dye_id.as_str()))
        .collect();
    let sample_type: BTreeMap<&str, &str> = doc
        .samples
        .iter()
        .map(|s| (s.id.as_str(), s.kind.as_str()))
        .collect();

    // Each curve's threshold-free part (checks, spikes, robust noise, first
    // baseline fit) once, in record order: both the common threshold and
    // the reading at it start from there, so no curve is analysed twice.
    let prepared: Vec<Result<Prepared, AnalysisError>> = run
        .reactions
        .iter()
        .flat_map(|reaction| &reaction.data)
        .map(|data| analysis::prepare(&data.fluorescence, &settings.curve))
        .collect();

    // One threshold per target: fixed, or chosen from all of its curves
    // that can be analysed (the others get their error in their record).
    let mut choosers: BTreeMap<&str, Chooser> = BTreeMap::new();
    if settings.curve.fixed_threshold.is_none() {
        let data = run.reactions.iter().flat_map(|reaction| &reaction.data);
        for (data, prepared) in data.zip(&prepared) {
            let target = data.target_id.as_str();
            if settings
                .targets
                .get(target)
                .is_some_and(|t| t.threshold.is_some())
            {
                continue;
            }
            choosers
                .entry(target)
                .or_insert_with(|| Chooser::new(&settings.curve, run.reactions.len()))
                .add(&data.fluorescence, prepared);
        }
    }
    let common_of: BTreeMap<&str, Option<f64>> = choosers
        .into_iter()
        .map(|(target, chooser)| (target, chooser.threshold().ok().flatten()))
        .collect();

    let mut records = Vec::with_capacity(prepared.len());
    let mut prepared = prepared.iter();
    // Scratch for the corrected curves, reused from curve to curve.
    let mut corrected = Vec::new();
    for reaction in &run.reactions {
        let well = run
            .format
            .well_label(reaction.id)
            .unwrap_or_else(|| format!("#{}", reaction.id));
        for data in &reaction.data {
            // One per data element, in the same order.
            let Some(prepared) = prepared.next() else {
                break;
            };
            let target = data.target_id.as_str();
            let fixed = settings.targets.get(target);
            let method = fixed
                .and_then(|t| t.method)
                .unwrap_or(settings.curve.method);
            let tolerance = fixed
                .and_then(|t| t.instrument_tolerance)
                .unwrap_or(settings.instrument_tolerance);
            let curve_settings = AnalysisSettings {
                method,
                fixed_threshold: fixed
                    .and_then(|t| t.threshold)
                    .or_else(|| common_of.get(target).copied().flatten())
                    .or(settings.curve.fixed_threshold),
                ..settings.curve.clone()
            };
            let mut record = ReactionRecord {
                reaction: reaction.id,
                well: well.clone(),
                sample: reaction.sample_id.clone(),
                sample_type: sample_type
                    .get(reaction.sample_id.as_str())
                    .map_or_else(String::new, |s| (*s).to_owned()),
                target: data.target_id.clone(),
                dye: dye_of
                    .get(target)
                    .map_or_else(String::new, |d| (*d).to_owned()),
                ct: None,
                method,
                threshold: None,
                baseline: None,
                qc: Vec::new(),
                instrument_cq: data.cq,
                excluded: data.excluded.clone(),
                error: None,
            };
            let readings = &data.fluorescence;
            let analysed = analysis::admit(prepared, readings.len(), &curve_settings).map(|p| {
                corrected.clear();
                corrected.resize(readings.len(), 0.0);
                analysis::finish(readings, p, &curve_settings, &mut corrected, Need::Full)
            });
            match analysed {
                Ok(result) => {
                    record.ct = result.ct.value();
                    record.threshold = Some(result.threshold);
                    record.baseline = Some(result.baseline);
                    record.qc = result.flags;
                    let instrument = data.cq.map(Ct::Determined);
                    if let Some(flag) =
                        analysis::compare_instrument(result.ct, instrument, tolerance)
                    {
                        record.qc.push(flag);
                        record.qc.sort_unstable();
                        record.qc.dedup();
                    }
                }
                Err(e) => {
                    record.error = Some(format!(
                        "reaction {} ({well}) target {:?}: {e}",
                        reaction.id, data.target_id
                    ));
                }
            }
            records.push(record);
        }
    }
    records
}

/// `run` with pcrd's results in place of the instrument's, to be written as
/// RDML (`rdml::write`) so the analysis can be checked or redone elsewhere:
/// each data element's `cq` becomes pcrd's Ct (absent when Undetermined or
/// not analysed: RDML has no "undetermined" value), `quantFluor` the
/// threshold and `bgFluor` / `bgFluorSlp` the baseline line; the run's
/// `cqDetectionMethod` says how. Curves, samples and targets are unchanged.
/// `records` are [`analyze_run`]'s for this run.
pub fn run_with_results(run: &Run, records: &[ReactionRecord]) -> Run {
    let mut out = run.clone();
    let mut by_key: BTreeMap<(u32, &str), &ReactionRecord> = BTreeMap::new();
    for record in records {
        by_key.insert((record.reaction, record.target.as_str()), record);
    }
    let mut methods = Vec::new();
    for reaction in &mut out.reactions {
        for data in &mut reaction.data {
            let Some(record) = by_key.get(&(reaction.id, data.target_id.as_str())) else {
                continue;
            };
            data.cq = record.ct;
            data.threshold = record.threshold;
            data.background = record.baseline.map(|b| b.intercept);
            data.background_slope = record.baseline.map(|b| b.slope);
            methods.push(record.method);
        }
    }
    methods.dedup();
    out.cq_detection_method = Some(
        match methods.as_slice() {
            [Method::Cp] => "second derivative maximum",
            [Method::Threshold] => "automated threshold and baseline settings",
            _ => "other",
        }
        .to_owned(),
    );
    out
}

/// Why a run could not be judged with a kit. A failed control or a bad
/// specimen is a call, not an error; these are mismatches between the file
/// and the kit.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum JudgeError {
    /// The run's plate is neither 8 × 12 nor 16 × 24, so the kit's control
    /// layout cannot be placed on it.
    #[error("run {run:?}: a {rows} x {columns} plate has no kit layout (96 or 384 wells only)")]
    UnsupportedFormat {
        /// RDML run id.
        run: String,
        /// Rows in the run's pcrFormat.
        rows: u32,
        /// Columns in the run's pcrFormat.
        columns: u32,
    },
    /// A kit target has no data in the run, by name or by channel.
    #[error(
        "run {run:?}: kit {kit} needs target {target:?} (channel {channel}), \
         but the run has no such target or dye; the run has: {present}"
    )]
    MissingTarget {
        /// RDML run id.
        run: String,
        /// "id@version".
        kit: String,
        /// The kit's target name.
        target: String,
        /// The kit's channel for it.
        channel: String,
        /// The run's targets and dyes, as "target (dye)".
        present: String,
    },
    /// A reaction's well label is not a well of the plate.
    #[error("run {run:?}: reaction {reaction}: {source}")]
    BadWell {
        /// RDML run id.
        run: String,
        /// RDML reaction id.
        reaction: u32,
        /// Why.
        source: crate::domain::WellError,
    },
    /// The kit refused the readings (names the well).
    #[error("run {run:?}: {source}")]
    Interpret {
        /// RDML run id.
        run: String,
        /// Why.
        source: crate::interpret::InterpretError,
    },
}

/// A well the kit could not judge because one of its curves could not be
/// analysed: reported as such, never given a call.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UnjudgedWell {
    /// Well label.
    pub well: String,
    /// RDML sample id.
    pub sample: String,
    /// Why (the analysis errors of its curves).
    pub reason: String,
}

/// A run judged with a kit.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunJudgement {
    /// Controls, validity and the call of every specimen well.
    pub plate: PlateJudgement,
    /// Specimen wells with a curve that could not be analysed.
    pub unjudged: Vec<UnjudgedWell>,
}

/// Judges the records of one run (from [`analyze_run`]) with `kit`: each
/// reaction is one well; a record belongs to the kit target of the same name,
/// else to the kit target read in its dye's channel; records of other
/// targets (a passive reference dye) are ignored. The kit's control wells
/// for the run's format are its controls. A control well whose curve could
/// not be analysed counts as missing, so the plate is invalid.
pub fn judge_run(
    kit: &KitDefinition,
    run: &Run,
    records: &[ReactionRecord],
) -> Result<RunJudgement, JudgeError> {
    let format = match (run.format.rows, run.format.columns) {
        (8, 12) => PlateFormat::Wells96,
        (16, 24) => PlateFormat::Wells384,
        (rows, columns) => {
            return Err(JudgeError::UnsupportedFormat {
                run: run.id.clone(),
                rows,
                columns,
            });
        }
    };
    let kit_target_of = |record: &ReactionRecord| {
        kit_target(kit, &record.target, &record.dye).map(|t| t.name.clone())
    };
    for target in kit.targets() {
        if !records
            .iter()
            .any(|r| kit_target_of(r).as_deref() == Some(target.name.as_str()))
        {
            let mut present: Vec<String> = records
                .iter()
                .map(|r| format!("{} ({})", r.target, r.dye))
                .collect();
            present.sort();
            present.dedup();
            return Err(JudgeError::MissingTarget {
                run: run.id.clone(),
                kit: kit.key(),
                target: target.name.clone(),
                channel: target.channel.clone(),
                present: present.join(", "),
            });
        }
    }

    let template = kit.template(format);
    let mut wells: BTreeMap<Well, BTreeMap<String, Reading>> = BTreeMap::new();
    let mut errors: BTreeMap<Well, (String, Vec<String>)> = BTreeMap::new();
    for record in records {
        let Some(target) = kit_target_of(record) else {
            continue;
        };
        let well = Well::parse_in(&record.well, format).map_err(|source| JudgeError::BadWell {
            run: run.id.clone(),
            reaction: record.reaction,
            source,
        })?;
        match (record.analysed_ct(), &record.error) {
            (Some(ct), _) => {
                wells.entry(well).or_default().insert(
                    target,
                    Reading {
                        ct,
                        qc_flags: record.qc.clone(),
                    },
                );
            }
            (None, error) => {
                errors
                    .entry(well)
                    .or_insert_with(|| (record.sample.clone(), Vec::new()))
                    .1
                    .push(error.clone().unwrap_or_default());
            }
        }
    }
    // A well with an unanalysable curve is left out whole: half a well must
    // not be judged as if the missing target were negative.
    let mut unjudged = Vec::new();
    for (well, (sample, reasons)) in errors {
        wells.remove(&well);
        let is_control = template.is_some_and(|t| t.controls.contains_key(&well));
        if !is_control {
            unjudged.push(UnjudgedWell {
                well: well.to_string(),
                sample,
                reason: reasons.join("; "),
            });
        }
    }
    let plate = kit
        .judge_plate(format, &wells)
        .map_err(|source| JudgeError::Interpret {
            run: run.id.clone(),
            source,
        })?;
    Ok(RunJudgement { plate, unjudged })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::model::CurveModel;
    use crate::rdml::{Dye, Experiment, PcrFormat, Reaction, ReactionData, Sample, Target};

    /// One run of `wells` reactions with targets N (FAM) and IC (CY5); N's
    /// curve per reaction from `n_curve`, IC always positive.
    fn doc(wells: u32, n_curve: impl Fn(u32) -> (Vec<f64>, Option<f64>)) -> Document {
        let data = |target: &str, fluorescence: Vec<f64>, cq: Option<f64>| ReactionData {
            target_id: target.to_owned(),
            cq,
            excluded: None,
            threshold: None,
            background: None,
            background_slope: None,
            fluorescence,
        };
        let reactions = (1..=wells)
            .map(|id| {
                let (n, cq) = n_curve(id);
                Reaction {
                    id,
                    sample_id: "S".to_owned(),
                    data: vec![
                        data("N", n, cq),
                        data("IC", CurveModel::default().readings(), None),
                    ],
                }
            })
            .collect();
        Document {
            version: "1.3".to_owned(),
            dyes: ["FAM", "CY5"].map(|id| Dye { id: id.to_owned() }).to_vec(),
            samples: vec![Sample {
                id: "S".to_owned(),
                kind: "unkn".to_owned(),
                quantity: None,
            }],
            targets: [("N", "FAM"), ("IC", "CY5")]
                .map(|(id, dye)| Target {
                    id: id.to_owned(),
                    dye_id: dye.to_owned(),
                    kind: "toi".to_owned(),
                })
                .to_vec(),
            experiments: vec![Experiment {
                id: "e".to_owned(),
                runs: vec![Run {
                    id: "r".to_owned(),
                    instrument: None,
                    cq_detection_method: None,
                    format: PcrFormat::plate_96(),
                    reactions,
                }],
            }],
        }
    }

    fn positive(c_half: f64, seed: u64) -> Vec<f64> {
        CurveModel {
            c_half,
            noise_sd: 0.002,
            seed,
            ..CurveModel::default()
        }
        .readings()
    }

    #[test]
    fn one_threshold_per_target_fixed_or_common() {
        let doc = doc(6, |id| {
            (positive(20.0 + f64::from(id), u64::from(id)), None)
        });
        let run = &doc.experiments[0].runs[0];
        let mut settings = RunSettings::default();
        settings.targets.insert(
            "N".to_owned(),
            TargetSettings {
                threshold: Some(0.3),
                ..TargetSettings::default()
            },
        );
        let records = analyze_run(&doc, run, &settings);
        assert_eq!(records.len(), 12);
        let thresholds = |target: &str| -> Vec<Option<f64>> {
            records
                .iter()
                .filter(|r| r.target == target)
                .map(|r| r.threshold)
                .collect()
        };
        assert!(thresholds("N").iter().all(|t| *t == Some(0.3)));
        let ic = thresholds("IC");
        assert!(ic[0].is_some() && ic.iter().all(|t| *t == ic[0]), "{ic:?}");
        // Ct follows the curves' shift, one cycle per reaction (each Ct within
        // the accuracy test's 0.15 of its own truth, so steps within 0.1).
        let cts: Vec<f64> = records
            .iter()
            .filter(|r| r.target == "N")
            .map(|r| r.ct.unwrap())
            .collect();
        for pair in cts.windows(2) {
            assert!((pair[1] - pair[0] - 1.0).abs() < 0.1, "{cts:?}");
        }
    }

    #[test]
    fn unanalysable_curves_get_an_error_naming_the_reaction_and_no_ct() {
        let doc = doc(3, |id| match id {
            2 => (vec![1.0, f64::NAN, 1.0], None),
            3 => (Vec::new(), None),
            _ => (positive(25.0, 1), None),
        });
        let run = &doc.experiments[0].runs[0];
        let records = analyze_run(&doc, run, &RunSettings::default());
        let n: Vec<&ReactionRecord> = records.iter().filter(|r| r.target == "N").collect();
        assert!(n[0].error.is_none() && n[0].ct.is_some());
        for record in &n[1..] {
            let error = record.error.as_deref().unwrap();
            assert!(
                error.contains(&format!("reaction {}", record.reaction)),
                "{error}"
            );
            assert_eq!(record.ct, None);
            assert_eq!(record.analysed_ct(), None, "not Undetermined");
        }
    }

    #[test]
    fn instrument_cq_far_from_pcrds_is_flagged() {
        let curve = positive(25.0, 7);
        let doc0 = doc(1, |_| (curve.clone(), None));
        let run = &doc0.experiments[0].runs[0];
        let ours = analyze_run(&doc0, run, &RunSettings::default())[0]
            .ct
            .unwrap();
        for (offset, flagged) in [(0.1, false), (1.0, true)] {
            let doc = doc(1, |_| (curve.clone(), Some(ours + offset)));
            let run = &doc.experiments[0].runs[0];
            let record = &analyze_run(&doc, run, &RunSettings::default())[0];
            assert_eq!(record.instrument_cq, Some(ours + offset));
            assert_eq!(
                record.qc.contains(&QcFlag::InstrumentDisagreement),
                flagged,
                "{offset}: {record:?}"
            );
        }
    }

    #[test]
    fn a_plate_that_is_not_96_or_384_cannot_be_judged() {
        let mut doc = doc(1, |_| (positive(25.0, 1), None));
        doc.experiments[0].runs[0].format = PcrFormat {
            rows: 4,
            columns: 6,
            row_label: "ABC".to_owned(),
            column_label: "123".to_owned(),
        };
        let run = &doc.experiments[0].runs[0];
        let records = analyze_run(&doc, run, &RunSettings::default());
        let kits = crate::kit::KitDefinition::from_toml_str(include_str!(
            "../../kits/sarscov2-orf1ab-n-ic.toml"
        ))
        .unwrap();
        let err = judge_run(&kits, run, &records).unwrap_err();
        assert!(
            matches!(
                err,
                JudgeError::UnsupportedFormat {
                    rows: 4,
                    columns: 6,
                    ..
                }
            ),
            "{err}"
        );
    }
}
