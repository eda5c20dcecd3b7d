//! The end of a PCR run: analysis of the stored cycles with the plate's kit.
//!
//! When a cycler run finishes (every cycle durable in the `cycles` tree), the
//! curves are read back per well and channel, each channel is mapped to the
//! kit target read in it, each well to its tube or control through the
//! plate's layout, and the run is analysed ([`analyze_run`]: one threshold per
//! target) and judged with the kit ([`judge_run`]: run controls, plate
//! validity, a call per specimen well). The outcome is stored in one sled
//! transaction and made durable before [`on_run_judged`] is called, so what
//! is handed on can always be read back (`GET /api/v1/runs/{id}/analysis`).
//!
//! A run finished before a crash but not yet analysed is analysed when the
//! daemon starts again (the analysis is a pure function of the stored cycles,
//! the plate and the kit, so doing it again gives the same answer).
//!
//! Key layout, in the `cycles` tree beside the run's readings (big-endian):
//!
//! - run id (u64 BE) ++ `b'a'` ++ well index (u16 BE, column-major) ->
//!   [`WellAnalysis`]: one value per used well keeps every value far below
//!   64 KiB whatever the plate size.
//! - run id (u64 BE) ++ `b'p'` -> [`PlateAnalysis`]: written in the same
//!   transaction as the wells; its presence means the analysis is complete.
//!
//! What this does NOT do: release anything at the end of a run.
//! [`on_run_judged`] is the one place the review stage is connected there;
//! [`early`] releases preliminary results of settled strong positives while
//! a run goes on (docs/runs.md, "Early call").

pub mod early;

use std::collections::BTreeMap;
use std::sync::Arc;

use pcrd_protocol::domain::{ControlKind, WellContent};
use pcrd_protocol::rdml::{
    Document, Dye, Experiment, PcrFormat, Reaction, ReactionData, Run, Sample, Target,
};
use pcrd_protocol::run_analysis::{RunJudgement, RunSettings, analyze_run, judge_run};
use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::ConflictableTransactionError;
use tracing::{Instrument as _, error, info, warn};

use crate::cyclers::{RunRecord, RunState, RunStore};
use crate::lab::Lab;
use crate::model::PlateRecord;
use crate::store::{StoreError, Versioned, decode, encode};

/// sled writes values above this to blob files it never fsyncs (helpers' rule).
const MAX_VALUE_BYTES: usize = 64 * 1024;

/// Why a run could not be analysed. A failed control or an invalid plate is
/// an analysis outcome, not one of these.
#[derive(Debug, thiserror::Error)]
pub enum AnalysisError {
    #[error("run {0} is not finished ({1}): only a finished run is analysed")]
    NotFinished(u64, &'static str),
    #[error("run {run}: plate {plate} cannot be read: {detail}")]
    Plate {
        run: u64,
        plate: String,
        detail: String,
    },
    #[error("run {run}: kit {kit} of plate {plate} is not known to this daemon: {detail}")]
    Kit {
        run: u64,
        plate: String,
        kit: String,
        detail: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One target of one well as analysed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TargetResult {
    /// The kit's target name (the channel's name when the kit has none for it).
    pub target: String,
    pub channel: String,
    /// pcrd's Ct; `null` when undetermined or not analysed.
    pub ct: Option<f64>,
    /// The threshold the Ct was read at.
    pub threshold: Option<f64>,
    /// Curve QC flags (snake_case names).
    pub qc: Vec<String>,
    /// Why the curve could not be analysed, if it could not.
    pub error: Option<String>,
}

/// One used well of the plate as analysed and judged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WellAnalysis {
    pub well: String,
    /// `sample` or `control`.
    pub kind: String,
    /// The tube's barcode, or the control's label (PC, NTC, ...).
    pub content: String,
    pub targets: Vec<TargetResult>,
    /// The kit's call for a specimen (`detected`, `not_detected`, `retest`,
    /// `inconclusive`, `invalid`); `null` for a control or an unjudged well.
    pub call: Option<String>,
    pub action: Option<String>,
    pub reason: Option<String>,
    /// Curve QC holds ("target: flag"): while any is present the result waits
    /// for review.
    pub qc_holds: Vec<String>,
    /// Why the well got no call (a curve that could not be analysed).
    pub unjudged: Option<String>,
}

impl Versioned for WellAnalysis {
    const TREE: &'static str = "cycles";
    const VERSION: u8 = 1;
}

/// The run's analysis as a whole.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PlateAnalysis {
    pub run: u64,
    pub plate: String,
    /// "id@version".
    pub kit: String,
    pub instrument: String,
    /// Whether every run control passed. False also when the run could not
    /// be judged at all (see `error`).
    pub valid: bool,
    /// Every control failure, in words.
    pub failures: Vec<String>,
    /// Why the kit could not judge the run (a target the run did not read,
    /// a plate format without a kit layout); the Cts are still stored.
    pub error: Option<String>,
    pub cycles: u32,
    /// Calls per kind (`detected` -> 12, ...).
    pub calls: BTreeMap<String, u32>,
    /// Milliseconds since the epoch.
    pub analysed_at: i64,
}

impl Versioned for PlateAnalysis {
    const TREE: &'static str = "cycles";
    const VERSION: u8 = 1;
}

/// A stored analysis: the plate's outcome and every used well.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunAnalysis {
    pub plate: PlateAnalysis,
    pub wells: Vec<WellAnalysis>,
}

fn well_key(run: u64, index: u16) -> [u8; 11] {
    let mut key = [0u8; 11];
    key[..8].copy_from_slice(&run.to_be_bytes());
    key[8] = b'a';
    key[9..].copy_from_slice(&index.to_be_bytes());
    key
}

fn plate_key(run: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[..8].copy_from_slice(&run.to_be_bytes());
    key[8] = b'p';
    key
}

/// Present once the run's judgement was staged for review (`review::stage_from_judgement`
/// committed): a run analysed but not yet staged (a crash in between) is staged at the
/// next start.
fn staged_key(run: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[..8].copy_from_slice(&run.to_be_bytes());
    key[8] = b's';
    key
}

fn is_staged(runs: &RunStore, run: u64) -> Result<bool, StoreError> {
    Ok(runs.store().trees().cycles.contains_key(staged_key(run))?)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn snake(value: &impl Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(e) => format!("unnamed ({e})"),
    }
}

/// The stored analysis of `run`, if it has one.
pub fn stored(runs: &RunStore, run: u64) -> Result<Option<RunAnalysis>, StoreError> {
    let tree = &runs.store().trees().cycles;
    let key = plate_key(run);
    let Some(raw) = tree.get(key)? else {
        return Ok(None);
    };
    let plate: PlateAnalysis = decode(&key, &raw)?;
    let mut prefix = run.to_be_bytes().to_vec();
    prefix.push(b'a');
    let mut wells = Vec::new();
    for item in tree.scan_prefix(prefix) {
        let (k, v) = item?;
        wells.push(decode(&k, &v)?);
    }
    Ok(Some(RunAnalysis { plate, wells }))
}

/// The RDML view of a stored run: one reaction per used well (sample id the
/// tube's barcode or the control's label at its well), one target per
/// channel named after the kit target read in it.
fn document(
    run: &RunRecord,
    plate: &PlateRecord,
    kit: &pcrd_protocol::kit::KitDefinition,
    curves: &[Vec<Vec<f64>>],
) -> (Document, BTreeMap<u32, (u16, String, String)>) {
    let target_of = |channel: &str| {
        kit.target_for_channel(channel)
            .map_or_else(|| channel.to_owned(), |t| t.name.clone())
    };
    let columns = u32::from(run.format.columns());
    let mut samples = Vec::new();
    let mut reactions = Vec::new();
    // reaction id -> (well index, kind, content)
    let mut wells = BTreeMap::new();
    for (index, well) in run.format.wells_column_major().enumerate() {
        let Some(content) = plate.layout.get(well) else {
            continue;
        };
        let (kind, label, sample_type) = match content {
            WellContent::Sample { barcode } => ("sample", barcode.as_str().to_owned(), "unkn"),
            WellContent::Control { control } => (
                "control",
                control.short_label().to_owned(),
                match control {
                    ControlKind::NoTemplateControl => "ntc",
                    ControlKind::PositiveControl => "pos",
                    ControlKind::ExtractionNegativeControl => "ntp",
                },
            ),
        };
        let sample_id = format!("{label}@{well}");
        samples.push(Sample {
            id: sample_id.clone(),
            kind: sample_type.to_owned(),
            quantity: None,
        });
        let id = u32::from(well.row()) * columns + u32::from(well.column()) + 1;
        reactions.push(Reaction {
            id,
            sample_id,
            data: run
                .channels
                .iter()
                .enumerate()
                .map(|(ch, name)| ReactionData {
                    target_id: target_of(name),
                    cq: None,
                    excluded: None,
                    threshold: None,
                    background: None,
                    background_slope: None,
                    fluorescence: curves
                        .get(ch)
                        .and_then(|c| c.get(index))
                        .cloned()
                        .unwrap_or_default(),
                })
                .collect(),
        });
        wells.insert(id, (index as u16, kind.to_owned(), label));
    }
    reactions.sort_by_key(|r| r.id);
    let doc = Document {
        version: "1.3".to_owned(),
        dyes: run.channels.iter().map(|c| Dye { id: c.clone() }).collect(),
        samples,
        targets: run
            .channels
            .iter()
            .map(|c| Target {
                id: target_of(c),
                dye_id: c.clone(),
                kind: "toi".to_owned(),
            })
            .collect(),
        experiments: vec![Experiment {
            id: format!("run-{}", run.id),
            runs: vec![Run {
                id: run.id.to_string(),
                instrument: Some(run.instrument.clone()),
                cq_detection_method: None,
                format: PcrFormat {
                    rows: u32::from(run.format.rows()),
                    columns,
                    row_label: "ABC".to_owned(),
                    column_label: "123".to_owned(),
                },
                reactions,
            }],
        }],
    };
    (doc, wells)
}

/// Analyses a finished run from its stored cycles; stores nothing.
pub fn analyse(
    lab: &Lab,
    runs: &RunStore,
    run: &RunRecord,
) -> Result<(RunAnalysis, Option<RunJudgement>), AnalysisError> {
    if run.state != RunState::Finished {
        return Err(AnalysisError::NotFinished(run.id, run.state.as_str()));
    }
    let plate = lab.plate(&run.plate).map_err(|e| AnalysisError::Plate {
        run: run.id,
        plate: run.plate.clone(),
        detail: e.to_string(),
    })?;
    let kit_spec = format!("{}@{}", plate.kit_id.as_str(), plate.kit_version);
    let kit = lab
        .kits()
        .find(&kit_spec)
        .map_err(|detail| AnalysisError::Kit {
            run: run.id,
            plate: run.plate.clone(),
            kit: kit_spec.clone(),
            detail,
        })?;
    let curves = runs.curves(run)?;
    let (doc, wells) = document(run, &plate, kit, &curves);
    let rdml_run = &doc.experiments[0].runs[0];
    let settings = RunSettings::default().with_kit(kit, &doc);
    let records = analyze_run(&doc, rdml_run, &settings);
    let judged = judge_run(kit, rdml_run, &records);

    let mut out: BTreeMap<u32, WellAnalysis> = BTreeMap::new();
    for record in &records {
        let Some((_, kind, content)) = wells.get(&record.reaction) else {
            continue;
        };
        let entry = out.entry(record.reaction).or_insert_with(|| WellAnalysis {
            well: record.well.clone(),
            kind: kind.clone(),
            content: content.clone(),
            targets: Vec::new(),
            call: None,
            action: None,
            reason: None,
            qc_holds: Vec::new(),
            unjudged: None,
        });
        entry.targets.push(TargetResult {
            target: record.target.clone(),
            channel: record.dye.clone(),
            ct: record.ct,
            threshold: record.threshold,
            qc: record.qc.iter().map(snake).collect(),
            error: record.error.clone(),
        });
    }
    let mut plate_out = PlateAnalysis {
        run: run.id,
        plate: run.plate.clone(),
        kit: kit_spec,
        instrument: run.instrument.clone(),
        valid: false,
        failures: Vec::new(),
        error: None,
        cycles: run.cycles_stored,
        calls: BTreeMap::new(),
        analysed_at: now_ms(),
    };
    let judgement = match judged {
        Ok(judgement) => {
            plate_out.valid = judgement.plate.validity.is_valid();
            plate_out.failures = judgement
                .plate
                .validity
                .failures()
                .iter()
                .map(|f| format!("{f:?}"))
                .collect();
            if let Some(reason) = judgement.plate.validity.reason() {
                plate_out.failures = vec![reason];
            }
            let by_label: BTreeMap<String, u32> =
                out.iter().map(|(id, w)| (w.well.clone(), *id)).collect();
            for (well, call) in &judgement.plate.samples {
                let Some(entry) = by_label
                    .get(&well.to_string())
                    .and_then(|id| out.get_mut(id))
                else {
                    continue;
                };
                entry.call = Some(call.call.to_string());
                entry.action = Some(call.action.clone());
                entry.reason = Some(call.reason.clone());
                entry.qc_holds = call
                    .qc_holds
                    .iter()
                    .map(|h| format!("{}: {}", h.target, snake(&h.flag)))
                    .collect();
                *plate_out.calls.entry(call.call.to_string()).or_default() += 1;
            }
            for unjudged in &judgement.unjudged {
                if let Some(entry) = by_label.get(&unjudged.well).and_then(|id| out.get_mut(id)) {
                    entry.unjudged = Some(unjudged.reason.clone());
                }
                *plate_out.calls.entry("unjudged".to_owned()).or_default() += 1;
            }
            Some(judgement)
        }
        Err(e) => {
            warn!(run = run.id, plate = %run.plate, error = %e, "The kit could not judge the run; Cts are stored, no call is made.");
            plate_out.error = Some(e.to_string());
            None
        }
    };
    let wells_out = out
        .into_iter()
        .map(|(id, w)| (wells.get(&id).map_or(0, |(index, ..)| *index), w))
        .collect::<Vec<_>>();
    let mut sorted = wells_out;
    sorted.sort_by_key(|(index, _)| *index);
    Ok((
        RunAnalysis {
            plate: plate_out,
            wells: sorted.into_iter().map(|(_, w)| w).collect(),
        },
        judgement,
    ))
}

/// Writes `analysis` in one transaction and waits until it is durable.
pub async fn store(runs: &RunStore, analysis: &RunAnalysis) -> Result<(), StoreError> {
    let run = analysis.plate.run;
    let mut writes: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(analysis.wells.len() + 1);
    let format_wells: Vec<String> = match runs.get(run)? {
        Some(r) => r
            .format
            .wells_column_major()
            .map(|w| w.to_string())
            .collect(),
        None => Vec::new(),
    };
    for well in &analysis.wells {
        let index = format_wells
            .iter()
            .position(|w| *w == well.well)
            .unwrap_or(0) as u16;
        let key = well_key(run, index);
        writes.push((key.to_vec(), sized(&key, encode(well))?));
    }
    let key = plate_key(run);
    writes.push((key.to_vec(), sized(&key, encode(&analysis.plate))?));
    let tree = &runs.store().trees().cycles;
    (tree,)
        .transaction(|(cycles,)| {
            for (k, v) in &writes {
                cycles.insert(k.as_slice(), v.as_slice())?;
            }
            Ok::<(), ConflictableTransactionError<()>>(())
        })
        .map_err(|e| match e {
            sled::transaction::TransactionError::Storage(e) => StoreError::Sled(e),
            sled::transaction::TransactionError::Abort(()) => StoreError::BadRecord {
                tree: "cycles",
                key: format!("run {run} analysis"),
                detail: "transaction aborted".into(),
            },
        })?;
    runs.store().durable().await
}

fn sized(key: &[u8], value: Vec<u8>) -> Result<Vec<u8>, StoreError> {
    if value.len() >= MAX_VALUE_BYTES {
        return Err(StoreError::BadRecord {
            tree: "cycles",
            key: key.escape_ascii().to_string(),
            detail: format!("value of {} bytes is too large", value.len()),
        });
    }
    Ok(value)
}

/// Analyses a finished run, stores the outcome durably, then hands it on.
/// A run already analysed is left as it is (and not handed on again).
pub async fn finish(lab: Arc<Lab>, runs: Arc<RunStore>, run: RunRecord) {
    let span = tracing::info_span!("analysis", run = run.id, plate = %run.plate, instrument = %run.instrument);
    finish_in_span(lab, runs, run).instrument(span).await
}

async fn finish_in_span(lab: Arc<Lab>, runs: Arc<RunStore>, run: RunRecord) {
    let already_stored = match (stored(&runs, run.id), is_staged(&runs, run.id)) {
        (Ok(_), Ok(true)) => return,
        (Ok(analysis), Ok(false)) => analysis.is_some(),
        (Err(e), _) | (_, Err(e)) => {
            error!(error = %e, "The run's analysis cannot be read.");
            return;
        }
    };
    // The analysis is a pure function of the stored cycles, the plate and the kit, so
    // a run analysed before a crash is analysed again to the same judgement.
    let (analysis, judgement) = match analyse(&lab, &runs, &run) {
        Ok(done) => done,
        Err(e) => {
            error!(error = %e, "The finished run could not be analysed; its cycles are kept and it is analysed again at the next start.");
            return;
        }
    };
    if !already_stored {
        if let Err(e) = store(&runs, &analysis).await {
            error!(error = %e, "The run's analysis could not be stored.");
            return;
        }
        info!(valid = analysis.plate.valid, calls = ?analysis.plate.calls, "Run analysed and stored.");
    }
    // The plate was read for the analysis a moment ago; its layout is what
    // review needs to map wells to tubes.
    match lab.plate(&run.plate) {
        Ok(plate) => {
            if let Err(e) =
                on_run_judged(&lab, &runs, &run, &plate, &analysis, judgement.as_ref()).await
            {
                error!(error = %e, "The judged run could not be staged for review; it is staged again at the next start.");
            }
        }
        Err(e) => {
            error!(error = %e, "The plate cannot be read to hand the judged run on; its analysis is stored and it is staged at the next start.")
        }
    }
}

/// Analyses every finished run that has no stored analysis (a crash between
/// the run's end and its analysis).
pub async fn catch_up(lab: Arc<Lab>, runs: Arc<RunStore>) -> Result<(), StoreError> {
    for run in runs.all()? {
        if run.state == RunState::Finished && !run.is_extraction() && !is_staged(&runs, run.id)? {
            info!(run = run.id, plate = %run.plate, "A finished run was not analysed or not staged for review yet; doing it now.");
            finish(Arc::clone(&lab), Arc::clone(&runs), run).await;
        }
    }
    Ok(())
}

/// The hand-off to review: stages one candidate per specimen well of the judged run
/// (`review::stage_from_judgement`, idempotent), then marks the run staged. A crash
/// between the two stages it again at the next start, which changes nothing. A run
/// the kit could not judge is stored with its reason and staged with nothing: its
/// plate's tubes wait for a person (the analysis shows why).
pub async fn on_run_judged(
    lab: &Arc<Lab>,
    runs: &RunStore,
    run: &RunRecord,
    plate: &PlateRecord,
    analysis: &RunAnalysis,
    judgement: Option<&RunJudgement>,
) -> Result<(), crate::lab::LabError> {
    let Some(judgement) = judgement else {
        warn!(
            run = run.id,
            plate = %run.plate,
            error = ?analysis.plate.error,
            "The kit could not judge the run; nothing was staged for review."
        );
        return Ok(());
    };
    let outcome = crate::review::stage_from_judgement(
        lab,
        crate::lab::Actor {
            user: format!("run:{}", run.id),
            reason: Some(format!("PCR run {} on {} finished", run.id, run.instrument)),
        },
        plate,
        judgement,
        crate::review::Provenance {
            run: run.id.to_string(),
            instrument: run.instrument.clone(),
            source: crate::review::CandidateSource {
                kind: "pcr_run".into(),
                id: run.id.to_string(),
                detail: run.plate.clone(),
            },
            tested_at_ms: run.ended_at.unwrap_or_else(now_ms),
        },
    )
    .await?;
    runs.store()
        .trees()
        .cycles
        .insert(staged_key(run.id), &[][..])
        .map_err(crate::store::StoreError::from)?;
    runs.store().durable().await?;
    info!(run = run.id, plate = %run.plate, outcome = ?outcome, "Run staged for review.");
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn analysis_keys_sort_by_run_then_well_and_never_collide_with_cycles() {
        assert!(well_key(1, 0) < well_key(1, 383));
        assert!(well_key(1, 383) < well_key(2, 0));
        // The run's readings use b'c' and refused lines b'r' after the id.
        assert_ne!(well_key(1, 0)[8], b'c');
        assert_ne!(plate_key(1)[8], b'r');
        assert_eq!(&plate_key(7)[..8], &7u64.to_be_bytes());
    }

    #[test]
    fn the_largest_well_analysis_is_far_below_64_kib() {
        // Eight targets with long names, every QC flag and long texts.
        let target = TargetResult {
            target: "T".repeat(64),
            channel: "C".repeat(32),
            ct: Some(f64::MAX),
            threshold: Some(f64::MAX),
            qc: vec!["q".repeat(40); 10],
            error: Some("e".repeat(500)),
        };
        let well = WellAnalysis {
            well: "P24".into(),
            kind: "sample".into(),
            content: "B".repeat(64),
            targets: vec![target; 8],
            call: Some("not_detected".into()),
            action: Some("a".repeat(500)),
            reason: Some("r".repeat(1000)),
            qc_holds: vec!["h".repeat(60); 8],
            unjudged: Some("u".repeat(500)),
        };
        let value = encode(&well);
        assert!(value.len() < 16 * 1024, "{}", value.len());
        assert!(sized(b"k", vec![0; MAX_VALUE_BYTES]).is_err());
    }
}
