//! Early calls during a PCR run (issue 7; docs/runs.md, "Early call").
//!
//! After every `[review] early_call_every` stored cycles of a running PCR
//! run (with `early_calls = true`), the stored cycles so far are analysed and
//! judged with the plate's kit exactly as at the end of a run (one threshold
//! per target over the curves so far), and
//! [`pcrd_protocol::early_call::decide`] says which detected tubes are
//! settled. Those are released as preliminary (version 1) through
//! [`crate::review::release_early`]: the same release path and outbox as
//! every result, in one transaction with the candidate, so a result is
//! called early at most once whatever crashes and re-evaluations happen.
//!
//! Evaluations are cheap to repeat and never hold the driver: the cycle sink
//! starts one in its own task after a cycle is durable, and skips it while
//! the previous one of the same cycler is still going.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use pcrd_protocol::domain::{ControlKind, WellContent};
use pcrd_protocol::early_call::{ControlsSoFar, TargetSoFar, decide};
use pcrd_protocol::interpret::{Call, TargetKind};
use pcrd_protocol::run_analysis::{ReactionRecord, RunSettings, analyze_run, judge_run};
use tracing::{Instrument as _, debug, error, info};

use crate::cyclers::{RunRecord, RunState, RunStore};
use crate::lab::Lab;

/// Fewest cycles before an evaluation is worth it: the analysis needs 10,
/// and a crossing needs its margin after that.
const FIRST_CYCLE: u32 = 15;

/// What the cycle sink holds to start early-call evaluations.
#[derive(Debug)]
pub struct EarlyCalls {
    lab: Arc<Lab>,
    /// An evaluation is under way for this cycler.
    busy: Arc<AtomicBool>,
}

impl EarlyCalls {
    pub fn new(lab: Arc<Lab>) -> EarlyCalls {
        EarlyCalls {
            lab,
            busy: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Called after cycle `run.cycles_stored` of `run` is durable: starts an
    /// evaluation when the policy asks for one at this cycle and none is
    /// under way.
    pub fn after_cycle(&self, runs: &Arc<RunStore>, run: &RunRecord) {
        let policy = self.lab.review().policy();
        let cycle = run.cycles_stored;
        if !policy.early_calls
            || run.is_extraction()
            || run.state != RunState::Running
            || cycle < FIRST_CYCLE
            // The last cycle: the run's end stages the final now.
            || cycle >= run.cycles_expected
            || !cycle.is_multiple_of(policy.early_call_every.max(1))
        {
            return;
        }
        if self.busy.swap(true, Ordering::AcqRel) {
            debug!(
                run = run.id,
                cycle, "Early-call evaluation still under way; skipped."
            );
            return;
        }
        let lab = Arc::clone(&self.lab);
        let runs = Arc::clone(runs);
        let busy = Arc::clone(&self.busy);
        let run = run.clone();
        let span = tracing::info_span!("early_call", run = run.id, plate = %run.plate, instrument = %run.instrument, cycle);
        tokio::spawn(
            async move {
                match evaluate(&lab, runs, &run).await {
                    Ok(0) => {}
                    Ok(n) => info!(released = n, "Results called early: released as preliminary."),
                    Err(e) => error!(error = %e, "Early calls could not be evaluated; the final results follow at the end of the run as usual."),
                }
                busy.store(false, Ordering::Release);
            }
            .instrument(span),
        );
    }
}

/// Why an evaluation could not be done.
#[derive(Debug, thiserror::Error)]
pub enum EarlyCallError {
    #[error("plate {plate} cannot be read: {detail}")]
    Plate { plate: String, detail: String },
    #[error("kit {kit} is not known to this daemon: {detail}")]
    Kit { kit: String, detail: String },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Lab(#[from] crate::lab::LabError),
}

/// The plate's run controls on the readings so far: every positive-control
/// well crossed in every kit target, no no-template-control well crossed in
/// any.
fn controls_so_far(
    run: &RunRecord,
    plate: &crate::model::PlateRecord,
    records: &BTreeMap<String, Vec<&ReactionRecord>>,
    kit_valid: bool,
) -> ControlsSoFar {
    let mut positive_seen = false;
    let mut positive_crossed = true;
    let mut ntc_crossed = false;
    for well in run.format.wells_column_major() {
        let Some(WellContent::Control { control }) = plate.layout.get(well) else {
            continue;
        };
        let of_well = records
            .get(&well.to_string())
            .map_or(&[][..], Vec::as_slice);
        match control {
            ControlKind::PositiveControl => {
                positive_seen = true;
                positive_crossed &= !of_well.is_empty() && of_well.iter().all(|r| r.ct.is_some());
            }
            ControlKind::NoTemplateControl => {
                ntc_crossed |= of_well.iter().any(|r| r.ct.is_some());
            }
            ControlKind::ExtractionNegativeControl => {}
        }
    }
    ControlsSoFar {
        positive_control_crossed: positive_seen && positive_crossed,
        no_template_control_crossed: ntc_crossed,
        valid_so_far: kit_valid,
    }
}

/// Evaluates the early calls of `run` on the cycles stored so far and
/// releases the new ones; returns how many were released.
pub async fn evaluate(
    lab: &Arc<Lab>,
    runs: Arc<RunStore>,
    run: &RunRecord,
) -> Result<usize, EarlyCallError> {
    let policy = lab.review().policy();
    let plate = lab.plate(&run.plate).map_err(|e| EarlyCallError::Plate {
        plate: run.plate.clone(),
        detail: e.to_string(),
    })?;
    let kit_spec = format!("{}@{}", plate.kit_id.as_str(), plate.kit_version);
    let kit = lab
        .kits()
        .find(&kit_spec)
        .map_err(|detail| EarlyCallError::Kit {
            kit: kit_spec.clone(),
            detail,
        })?;
    let curves = runs.curves(run)?;
    let (doc, _) = super::document(run, &plate, kit, &curves);
    let rdml_run = &doc.experiments[0].runs[0];
    let settings = RunSettings::default().with_kit(kit, &doc);
    let records = analyze_run(&doc, rdml_run, &settings);
    let judgement = match judge_run(kit, rdml_run, &records) {
        Ok(j) => j,
        Err(e) => {
            debug!(error = %e, "The kit cannot judge the run so far; no early call.");
            return Ok(0);
        }
    };
    let mut by_well: BTreeMap<String, Vec<&ReactionRecord>> = BTreeMap::new();
    for record in &records {
        by_well.entry(record.well.clone()).or_default().push(record);
    }
    let controls = controls_so_far(run, &plate, &by_well, judgement.plate.validity.is_valid());
    let wells: Vec<_> = run.format.wells_column_major().collect();
    let from = crate::review::Provenance {
        run: run.id.to_string(),
        instrument: run.instrument.clone(),
        source: crate::review::CandidateSource {
            kind: "pcr_run".into(),
            id: run.id.to_string(),
            detail: run.plate.clone(),
        },
        tested_at_ms: super::now_ms(),
    };
    let mut early = Vec::new();
    for (well, call) in &judgement.plate.samples {
        if call.call != Call::Detected {
            continue;
        }
        let Some(WellContent::Sample { barcode }) = plate.layout.get(*well) else {
            continue;
        };
        let Some(index) = wells.iter().position(|w| w == well) else {
            continue;
        };
        let label = well.to_string();
        let of_well = by_well.get(&label).map_or(&[][..], Vec::as_slice);
        let mut targets = Vec::with_capacity(call.targets.len());
        for t in &call.targets {
            let record = of_well.iter().find(|r| r.target == t.target);
            let channel = record.and_then(|r| run.channels.iter().position(|c| *c == r.dye));
            let readings = channel
                .and_then(|ch| curves.get(ch))
                .and_then(|c| c.get(index))
                .map_or(&[][..], Vec::as_slice);
            targets.push(TargetSoFar {
                name: &t.target,
                viral: t.kind == TargetKind::Viral,
                state: t.state,
                readings,
                ct: record.and_then(|r| r.ct),
            });
        }
        let decision = decide(
            call.call,
            call.is_held(),
            &targets,
            controls,
            &policy.early_call_rule,
        );
        if decision.is_early() {
            let candidate = crate::review::candidate_for_well(
                lab,
                &plate,
                *well,
                barcode,
                call,
                &judgement.plate.validity,
                &from,
            )?;
            early.push(candidate);
        } else {
            debug!(well = %label, ?decision, "Not called early.");
        }
    }
    if early.is_empty() {
        return Ok(0);
    }
    // Checked under the writer lock: the run's end (state finished) comes
    // before its final staging, so a preliminary is released only where that
    // staging will see it.
    let id = run.id;
    let still_running = move || {
        runs.get(id)
            .ok()
            .flatten()
            .is_some_and(|r| !r.state.is_terminal())
    };
    let released = crate::review::release_early(
        lab,
        crate::lab::Actor {
            user: format!("run:{}", run.id),
            reason: Some(format!(
                "early call during PCR run {} on {} at cycle {}",
                run.id, run.instrument, run.cycles_stored
            )),
        },
        early,
        run.cycles_stored,
        run.cycles_expected,
        still_running,
    )
    .await?;
    Ok(released)
}
