//! Review and release (issue 7): a tube's computed result becomes a *candidate*,
//! which policy or a reviewer releases, sends back for a rerun, or rejects.
//!
//! - Candidates are staged in the same transaction as what produced them (a
//!   watched-folder import today, a PCR run through [`stage_from_judgement`]).
//! - On a valid plate, a not-detected tube with no curve QC hold is released at
//!   staging when `[review] auto_release_negatives = true` (released_by `auto`);
//!   everything else waits for a user with the reviewer (or admin) role.
//! - On an invalid plate nothing is released: every tube of it goes on the rerun
//!   list and back into the plating queue.
//! - Inconclusive, retest and invalid calls go on the rerun list (and back into the
//!   queue) at once, so the lab does not wait for the reviewer; the candidate still
//!   waits for a decision (an inconclusive may be reported as such).
//! - A positive pool (pool size > 1) gets a follow-up entry: the lab tests its
//!   members, which arrive as new tubes (pcrd knows no member's identity).
//! - Early calls ([`release_early`], from `crate::runs::early`): a settled strong
//!   positive mid-run becomes a candidate in state `preliminary` with version 1
//!   released as preliminary; the run's end stages the final over it (version 2),
//!   held for a reviewer when it disagrees with the preliminary one.
//! - A release writes the result version and its outbox entry in the same
//!   transaction as the candidate's new state ([`crate::lab::ReviewTx::release`]), so
//!   a crash leaves either both or neither; a release is never repeated.
//!
//! Store layout (tree `review`):
//! - `c` ++ result id -> [`Candidate`]
//! - `r` ++ entry id -> [`RerunEntry`] (entry id = `rerun:` or `follow-up:` ++ result id)
//!
//! docs/review.md is the operator's version of this text.

pub mod due;
pub mod index;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use pcrd_protocol::domain::{Barcode, Well, WellContent};
use pcrd_protocol::interpret::{Call, PlateValidity, PoolOutcome, WellCall};
use pcrd_protocol::run_analysis::RunJudgement;
use pcrd_protocol::upstream::{
    Interpretation, KitRef, RESULT_SCHEMA_VERSION, ResultRecord, ResultStatus, TargetCall,
    TargetResult,
};
use serde::{Deserialize, Serialize};

use crate::lab::{Actor, Lab, LabError, ReviewTx};
use crate::model::{PlateId, PlateRecord};
use crate::store::{StoreError, Versioned, decode, encode};

/// `released_by` of a release by policy.
pub const AUTO: &str = "auto";
/// Longest reason kept for a decision.
const MAX_REASON: usize = 1000;

// ----- policy and runtime -----

/// `[review]` in the config.
#[derive(Clone, Debug, PartialEq)]
pub struct ReviewPolicy {
    /// Release not-detected tubes of valid plates without QC holds at staging.
    pub auto_release_negatives: bool,
    /// A tube not yet released is *at risk* this long before its due time.
    pub at_risk_before: std::time::Duration,
    /// How often the due-time watcher looks for tubes newly at risk.
    pub check_every: std::time::Duration,
    /// Report strong positives whose Ct is settled mid-run as preliminary
    /// (docs/runs.md, "Early call"). Off unless the lab opts in.
    pub early_calls: bool,
    /// The early-call rule (margin in cycles before the last cycle read).
    pub early_call_rule: pcrd_protocol::early_call::EarlyCallRule,
    /// Evaluate early calls after every this many stored cycles.
    pub early_call_every: u32,
}

impl Default for ReviewPolicy {
    fn default() -> ReviewPolicy {
        ReviewPolicy {
            auto_release_negatives: false,
            at_risk_before: std::time::Duration::from_secs(3600),
            check_every: std::time::Duration::from_secs(30),
            early_calls: false,
            early_call_rule: pcrd_protocol::early_call::EarlyCallRule::default(),
            early_call_every: 3,
        }
    }
}

/// `[review]` as written in the file.
/// Unknown keys are collected by the config parser (serde_ignored), like every table.
#[derive(Debug, Default, Deserialize)]
pub struct RawReview {
    auto_release_negatives: Option<bool>,
    /// e.g. "1h", "45min".
    at_risk_before: Option<String>,
    check_every: Option<String>,
    /// Preliminary results for settled strong positives mid-run.
    early_calls: Option<bool>,
    /// Cycles between a settled crossing and the last cycle read (default 5).
    early_call_margin_cycles: Option<u32>,
    /// Evaluate after every this many stored cycles (default 3).
    early_call_every: Option<u32>,
}

/// Validates `[review]`, adding each problem to `problems`.
pub fn parse_policy(raw: Option<RawReview>, problems: &mut Vec<String>) -> ReviewPolicy {
    let raw = raw.unwrap_or_default();
    let mut policy = ReviewPolicy::default();
    if let Some(auto) = raw.auto_release_negatives {
        policy.auto_release_negatives = auto;
    }
    let mut duration = |name: &str, text: Option<String>, into: &mut std::time::Duration| {
        if let Some(text) = text {
            match humantime::parse_duration(&text) {
                Ok(d) if d >= std::time::Duration::from_secs(1) => *into = d,
                Ok(_) => problems.push(format!("review.{name}: {text:?} must be at least 1s")),
                Err(e) => problems.push(format!(
                    "review.{name}: {text:?} is not a duration like 1h: {e}"
                )),
            }
        }
    };
    duration(
        "at_risk_before",
        raw.at_risk_before,
        &mut policy.at_risk_before,
    );
    duration("check_every", raw.check_every, &mut policy.check_every);
    if let Some(on) = raw.early_calls {
        policy.early_calls = on;
    }
    match raw.early_call_margin_cycles {
        Some(m) if (1..=40).contains(&m) => policy.early_call_rule.margin_cycles = m,
        Some(m) => problems.push(format!(
            "review.early_call_margin_cycles: {m} must be 1..=40 (cycles between a settled crossing and the last cycle read)"
        )),
        None => {}
    }
    match raw.early_call_every {
        Some(n) if (1..=20).contains(&n) => policy.early_call_every = n,
        Some(n) => problems.push(format!(
            "review.early_call_every: {n} must be 1..=20 (stored cycles between evaluations)"
        )),
        None => {}
    }
    policy
}

/// Bounds in seconds for turnaround histograms: minutes to two days.
const TAT_BOUNDS: [f64; 10] = [
    300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 43200.0, 86400.0, 172800.0,
];

/// A histogram of turnaround times (hours, not the milliseconds of
/// [`crate::metrics::Histogram`]).
#[derive(Debug, Default)]
pub struct TatHistogram {
    buckets: [AtomicU64; TAT_BOUNDS.len() + 1],
    sum_ms: AtomicU64,
}

impl TatHistogram {
    pub fn observe_ms(&self, ms: i64) {
        let ms = ms.max(0) as u64;
        let seconds = ms as f64 / 1000.0;
        let slot = TAT_BOUNDS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(TAT_BOUNDS.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        self.sum_ms.fetch_add(ms, Ordering::Relaxed);
    }

    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        use std::fmt::Write as _;
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (slot, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            match TAT_BOUNDS.get(slot) {
                Some(bound) => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let sum = self.sum_ms.load(Ordering::Relaxed) as f64 / 1000.0;
        let _ = writeln!(out, "{name}_sum {sum:.3}\n{name}_count {cumulative}");
    }
}

/// The review's live state: policy, due-time gauges, metrics.
#[derive(Debug, Default)]
pub struct ReviewRuntime {
    policy: RwLock<ReviewPolicy>,
    pub tubes_at_risk: AtomicU64,
    pub tubes_past_due: AtomicU64,
    pub awaiting_review: AtomicU64,
    pub auto_released: AtomicU64,
    pub reviewer_released: AtomicU64,
    pub reruns: AtomicU64,
    /// Results released as preliminary by an early call.
    pub early_calls: AtomicU64,
    /// Finals of early-called results that disagree with the preliminary
    /// version (sent to a reviewer).
    pub early_calls_disagreed: AtomicU64,
    /// From a tube's receipt to the release of its first result version.
    pub received_to_released: TatHistogram,
    /// From staging (the result computed) to its release.
    pub staged_to_released: TatHistogram,
    /// Tubes already alerted as at risk (or past due), so each alerts once per state.
    pub(crate) alerted: std::sync::Mutex<std::collections::HashMap<String, due::DueStatus>>,
}

impl ReviewRuntime {
    pub fn policy(&self) -> ReviewPolicy {
        self.policy
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn set_policy(&self, policy: ReviewPolicy) {
        *self
            .policy
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = policy;
    }

    /// Appends the review's metrics in the Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let mut gauge = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        gauge(
            "pcrd_tubes_at_risk",
            "gauge",
            "Tubes without a released result within review.at_risk_before of their due time (as of the last check).",
            self.tubes_at_risk.load(Ordering::Relaxed),
        );
        gauge(
            "pcrd_tubes_past_due",
            "gauge",
            "Tubes past their due time without a released result (as of the last check).",
            self.tubes_past_due.load(Ordering::Relaxed),
        );
        gauge(
            "pcrd_results_awaiting_review",
            "gauge",
            "Result candidates waiting for a reviewer (as of the last check).",
            self.awaiting_review.load(Ordering::Relaxed),
        );
        gauge(
            "pcrd_results_auto_released_total",
            "counter",
            "Results released by policy since start.",
            self.auto_released.load(Ordering::Relaxed),
        );
        gauge(
            "pcrd_results_reviewer_released_total",
            "counter",
            "Results released by a reviewer since start.",
            self.reviewer_released.load(Ordering::Relaxed),
        );
        gauge(
            "pcrd_reruns_total",
            "counter",
            "Tubes put back into the plating queue for a rerun since start.",
            self.reruns.load(Ordering::Relaxed),
        );
        gauge(
            "pcrd_early_calls_total",
            "counter",
            "Results released as preliminary by an early call (a settled strong positive before its run ended) since start.",
            self.early_calls.load(Ordering::Relaxed),
        );
        gauge(
            "pcrd_early_calls_disagreed_total",
            "counter",
            "Final results that disagree with their early-called preliminary version (held for a reviewer) since start.",
            self.early_calls_disagreed.load(Ordering::Relaxed),
        );
        self.received_to_released.render(
            out,
            "pcrd_tube_received_to_released_seconds",
            "From a tube's receipt to the release of its result.",
        );
        self.staged_to_released.render(
            out,
            "pcrd_result_staged_to_released_seconds",
            "From a result being computed to its release.",
        );
    }
}

// ----- records -----

/// Where a candidate came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CandidateSource {
    /// pcr_run, analyser or file_import.
    pub kind: String,
    /// The run id, the analyser message id, or the imported file's SHA-256.
    pub id: String,
    /// For a file import: folder/file.
    pub detail: String,
}

/// One kit target of a candidate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CandidateTarget {
    pub name: String,
    pub dye: String,
    pub loinc: Option<String>,
    /// Two decimals as reported; `null` = undetermined.
    pub ct: Option<f64>,
    /// detected, not_detected, inconclusive, invalid.
    pub call: String,
}

/// Where a candidate stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CandidateState {
    AwaitingReview,
    Released,
    RerunRequested,
    Rejected,
    /// Called early: version 1 released as preliminary while its run goes
    /// on; the run's end stages the final (last in the enum so records
    /// written before it decode unchanged).
    Preliminary,
}

impl CandidateState {
    /// Every state, in declaration order.
    pub const ALL: [CandidateState; 5] = [
        CandidateState::AwaitingReview,
        CandidateState::Released,
        CandidateState::RerunRequested,
        CandidateState::Rejected,
        CandidateState::Preliminary,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CandidateState::AwaitingReview => "awaiting_review",
            CandidateState::Released => "released",
            CandidateState::RerunRequested => "rerun_requested",
            CandidateState::Rejected => "rejected",
            CandidateState::Preliminary => "preliminary",
        }
    }

    pub fn parse(text: &str) -> Option<CandidateState> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// A released version of a candidate's result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReleasedVersion {
    pub version: u32,
    /// preliminary, final or corrected.
    pub status: String,
    pub idempotency_key: String,
    pub released_at_ms: i64,
    pub released_by: String,
    pub interpretation: String,
    pub correction_reason: Option<String>,
}

/// A tube's computed result awaiting (or past) a decision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Candidate {
    /// Stable: lab, run, well and tube.
    pub result_id: String,
    pub tube: String,
    pub pool_size: u8,
    pub plate: String,
    pub well: String,
    pub run: String,
    pub instrument: String,
    pub kit_id: String,
    pub kit_version: String,
    pub source: CandidateSource,
    pub targets: Vec<CandidateTarget>,
    /// The kit's call (pool size taken into account): detected, not_detected,
    /// inconclusive, retest, invalid.
    pub call: String,
    /// positive, negative, inconclusive, invalid: what a release reports.
    pub interpretation: String,
    /// What the kit says to do next, and why.
    pub action: String,
    pub reason: String,
    pub plate_valid: bool,
    /// Why the plate's run controls failed, when they did.
    pub plate_invalid_reason: Option<String>,
    /// Curve QC flags ("target: flag"); any blocks release by policy.
    pub qc_holds: Vec<String>,
    pub tested_at_ms: i64,
    pub staged_at_ms: i64,
    pub state: CandidateState,
    /// `auto` or the user who decided, when, and why.
    pub decided_by: Option<String>,
    pub decided_at_ms: Option<i64>,
    pub decision_reason: Option<String>,
    pub versions: Vec<ReleasedVersion>,
}

impl Versioned for Candidate {
    const TREE: &'static str = "review";
    const VERSION: u8 = 1;
}

/// An entry of the rerun list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RerunEntry {
    /// `rerun:` or `follow-up:` ++ result id.
    pub id: String,
    /// rerun (the tube is tested again) or pool_follow_up (the pool's members are
    /// to be tested; they arrive as new tubes).
    pub kind: String,
    pub tube: String,
    pub pool_size: u8,
    pub result_id: String,
    pub plate: String,
    pub well: String,
    pub call: String,
    pub reason: String,
    pub requested_by: String,
    pub requested_at_ms: i64,
    /// Whether the tube went back into the plating queue with this entry (false when
    /// it was already waiting, and for a pool follow-up).
    pub requeued: bool,
}

impl Versioned for RerunEntry {
    const TREE: &'static str = "review";
    const VERSION: u8 = 1;
}

pub fn candidate_key(result_id: &str) -> Vec<u8> {
    let mut key = vec![b'c'];
    key.extend_from_slice(result_id.as_bytes());
    key
}

pub fn rerun_key(entry_id: &str) -> Vec<u8> {
    let mut key = vec![b'r'];
    key.extend_from_slice(entry_id.as_bytes());
    key
}

/// The stable result id: lab, run, well and tube. Characters other than letters,
/// digits, '-', '_' and '.' (a lab id with a space, a run id with a colon) become
/// '_', so the id is one URL path segment and one CSV field as it is.
pub fn result_id(lab: &str, run: &str, well: &str, tube: &str) -> String {
    format!("{lab}-{run}-{well}-{tube}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

pub(crate) fn interpretation_of(call: Call) -> Interpretation {
    match call {
        Call::Detected => Interpretation::Positive,
        Call::NotDetected => Interpretation::Negative,
        Call::Inconclusive | Call::Retest => Interpretation::Inconclusive,
        Call::Invalid => Interpretation::Invalid,
    }
}

fn parse_interpretation(text: &str) -> Option<Interpretation> {
    [
        Interpretation::Positive,
        Interpretation::Negative,
        Interpretation::Inconclusive,
        Interpretation::Invalid,
    ]
    .into_iter()
    .find(|i| i.as_str() == text)
}

fn parse_target_call(text: &str) -> TargetCall {
    match text {
        "detected" => TargetCall::Detected,
        "not_detected" => TargetCall::NotDetected,
        "inconclusive" => TargetCall::Inconclusive,
        _ => TargetCall::Invalid,
    }
}

pub(crate) fn target_call_name(call: TargetCall) -> &'static str {
    match call {
        TargetCall::Detected => "detected",
        TargetCall::NotDetected => "not_detected",
        TargetCall::Inconclusive => "inconclusive",
        TargetCall::Invalid => "invalid",
    }
}

// ----- building candidates -----

/// What produced a plate's calls.
#[derive(Clone, Debug)]
pub struct Provenance {
    pub run: String,
    pub instrument: String,
    pub source: CandidateSource,
    pub tested_at_ms: i64,
}

/// The candidate for the tube `barcode` in `well` of `plate`, from the kit's call.
/// The pool size comes from the tube's record; a pool's call is the kit's pool
/// outcome (a not-detected pool larger than the kit accepts is invalid).
pub fn candidate_for_well(
    lab: &Lab,
    plate: &PlateRecord,
    well: Well,
    barcode: &Barcode,
    call: &WellCall,
    validity: &PlateValidity,
    from: &Provenance,
) -> Result<Candidate, LabError> {
    let tube = lab.tube(barcode.as_str())?;
    let pool_size = tube.pool_size;
    let mut effective = call.call;
    let mut reason = call.reason.clone();
    if let Ok(kit) = lab.kits().find(&call.kit.to_string())
        && let Ok(PoolOutcome::Reported {
            call: pooled, note, ..
        }) = kit.pool_outcome(call, pool_size, &[])
    {
        if pool_size.get() > 1 {
            reason = format!("{reason}; {note}");
        }
        effective = pooled;
    }
    let invalid_plate = !validity.is_valid();
    let targets = call
        .targets
        .iter()
        .map(|t| {
            let target_call = if effective == Call::Invalid {
                TargetCall::Invalid
            } else {
                match t.state {
                    pcrd_protocol::interpret::TargetState::Positive => TargetCall::Detected,
                    pcrd_protocol::interpret::TargetState::Grey => TargetCall::Inconclusive,
                    pcrd_protocol::interpret::TargetState::Negative => TargetCall::NotDetected,
                }
            };
            CandidateTarget {
                name: t.target.clone(),
                dye: t.channel.clone(),
                loinc: t.loinc.clone(),
                ct: t.reported_ct.map(|c| c.as_f64()).or_else(|| t.ct.value()),
                call: target_call_name(target_call).to_owned(),
            }
        })
        .collect();
    let well_text = well.to_string();
    Ok(Candidate {
        result_id: result_id(lab.lab_id(), &from.run, &well_text, barcode.as_str()),
        tube: barcode.to_string(),
        pool_size: pool_size.get(),
        plate: plate.id.to_string(),
        well: well_text,
        run: from.run.clone(),
        instrument: from.instrument.clone(),
        kit_id: call.kit.id.to_string(),
        kit_version: call.kit.version.clone(),
        source: from.source.clone(),
        targets,
        call: effective.to_string(),
        interpretation: interpretation_of(effective).as_str().to_owned(),
        action: call.action.clone(),
        reason,
        plate_valid: !invalid_plate,
        plate_invalid_reason: invalid_plate.then(|| validity.reason().unwrap_or_default()),
        qc_holds: call
            .qc_holds
            .iter()
            .map(|h| {
                format!(
                    "{}: {}",
                    h.target,
                    serde_json::to_value(h.flag)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default()
                )
            })
            .collect(),
        tested_at_ms: from.tested_at_ms,
        staged_at_ms: 0,
        state: CandidateState::AwaitingReview,
        decided_by: None,
        decided_at_ms: None,
        decision_reason: None,
        versions: Vec::new(),
    })
}

/// Candidates for every specimen well of a judged run that holds a tube on `plate`.
/// Wells without a tube are skipped (the caller reports them).
pub fn candidates_from_judgement(
    lab: &Lab,
    plate: &PlateRecord,
    judgement: &RunJudgement,
    from: &Provenance,
) -> Result<Vec<Candidate>, LabError> {
    let mut out = Vec::new();
    for (well, call) in &judgement.plate.samples {
        if let Some(WellContent::Sample { barcode }) = plate.layout.get(*well) {
            out.push(candidate_for_well(
                lab,
                plate,
                *well,
                barcode,
                call,
                &judgement.plate.validity,
                from,
            )?);
        }
    }
    Ok(out)
}

// ----- staging -----

/// What a staging did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct StageOutcome {
    pub staged: usize,
    /// Already staged before (the same result id): left as they were.
    pub already_staged: usize,
    pub auto_released: usize,
    pub awaiting_review: usize,
    pub reruns: usize,
    pub follow_ups: usize,
    /// Finals that disagree with their early-called preliminary version.
    pub early_disagreed: usize,
}

/// Releases observed after commit, for the turnaround histograms.
#[derive(Debug, Default)]
struct ReleaseTimes {
    /// (received at, staged at, released at), ms.
    items: Vec<(i64, i64, i64)>,
}

fn observe(lab: &Lab, times: &ReleaseTimes, by_policy: bool) {
    let review = lab.review();
    for (received, staged, released) in &times.items {
        review.received_to_released.observe_ms(released - received);
        review.staged_to_released.observe_ms(released - staged);
    }
    let counter = if by_policy {
        &review.auto_released
    } else {
        &review.reviewer_released
    };
    counter.fetch_add(times.items.len() as u64, Ordering::Relaxed);
}

/// Stages the candidates of a judged PCR run (the lead's PCR-run path): every
/// tube of `plate` with a call, in one transaction with any releases by policy.
pub async fn stage_from_judgement(
    lab: &Arc<Lab>,
    actor: Actor,
    plate: &PlateRecord,
    judgement: &RunJudgement,
    from: Provenance,
) -> Result<StageOutcome, LabError> {
    let candidates = candidates_from_judgement(lab, plate, judgement, &from)?;
    let staged_ids: BTreeSet<String> = candidates.iter().map(|c| c.result_id.clone()).collect();
    let mut outcome = stage(lab, actor.clone(), candidates, Vec::new(), None)
        .await?
        .unwrap_or_default();
    // An early-called result whose well got no call at the end (its curve
    // could not be analysed in the end) must not stay preliminary for ever.
    let run_prefix = result_id(lab.lab_id(), &from.run, "", "");
    let run_prefix = run_prefix.trim_end_matches('-').to_owned() + "-";
    let orphans: Vec<Candidate> = candidates_with_prefix(lab, &run_prefix)?
        .into_iter()
        .filter(|c| c.state == CandidateState::Preliminary && !staged_ids.contains(&c.result_id))
        .collect();
    if !orphans.is_empty() {
        let n = orphans.len();
        lab.review_change(actor, move |tx| {
            for mut c in orphans {
                // Re-read under the writer lock: only a still-preliminary one changes.
                match load_candidate(tx.lab(), &c.result_id)? {
                    Some(now) if now.state == CandidateState::Preliminary => c = now,
                    _ => continue,
                }
                c.state = CandidateState::AwaitingReview;
                c.decision_reason = Some(
                    "called early (preliminary version released), but the run's final analysis gave this well no call: review before release".into(),
                );
                index::put(tx, &c);
                tx.audit(
                    "result.early_call_unconfirmed",
                    PlateId::new(c.plate.clone()).ok().as_ref(),
                    Barcode::new(c.tube.clone()).ok().into_iter().collect(),
                    format!("result {} has a preliminary version but no final call", c.result_id),
                );
            }
            Ok(())
        })
        .await?;
        outcome.early_disagreed += n;
        outcome.awaiting_review += n;
        lab.review()
            .early_calls_disagreed
            .fetch_add(n as u64, Ordering::Relaxed);
    }
    Ok(outcome)
}

/// Releases the early calls of a running PCR run: each candidate (a detected
/// tube whose viral Cts are settled, from `crate::runs`) not staged before
/// becomes state `preliminary` with version 1, status preliminary, released
/// through the outbox in one transaction with the candidate. A result already
/// staged (an earlier evaluation, before a crash or not) is left as it is, so
/// a result never gets a second preliminary version. Returns how many were
/// released.
///
/// `still_running` is asked under the writer lock, just before anything is
/// planned: once the run has ended its final staging decides (an evaluation
/// that finishes after it must not leave a preliminary no staging will see).
pub async fn release_early(
    lab: &Arc<Lab>,
    actor: Actor,
    candidates: Vec<Candidate>,
    cycle: u32,
    cycles_expected: u32,
    still_running: impl FnOnce() -> bool + Send + 'static,
) -> Result<usize, LabError> {
    let released = lab
        .review_change(actor, move |tx| {
            if !still_running() {
                return Ok(0);
            }
            let at = tx.at.as_millis();
            let mut fresh = Vec::new();
            let mut seen = BTreeSet::new();
            for mut c in candidates {
                let exists = tx
                    .lab()
                    .store()
                    .trees()
                    .review
                    .contains_key(candidate_key(&c.result_id))
                    .map_err(StoreError::from)?;
                if exists || !seen.insert(c.result_id.clone()) || c.call != "detected" {
                    continue;
                }
                c.staged_at_ms = at;
                c.state = CandidateState::Preliminary;
                c.decided_by = Some(AUTO.to_owned());
                c.decided_at_ms = Some(at);
                c.decision_reason = Some(format!(
                    "called early at cycle {cycle} of {cycles_expected}: every viral target crossed and levelled off, the positive control crossed and the no-template control did not; the final follows when the run ends"
                ));
                fresh.push(c);
            }
            if fresh.is_empty() {
                return Ok(0);
            }
            let records = fresh
                .iter()
                .map(|c| {
                    build_record(
                        tx.lab().lab_id(),
                        c,
                        1,
                        ResultStatus::Preliminary,
                        None,
                        None,
                        AUTO,
                        at,
                    )
                })
                .collect::<Result<Vec<_>, _>>()?;
            let released = tx.release(&records)?;
            for c in &mut fresh {
                let key = format!("{}:1", c.result_id);
                c.versions.push(ReleasedVersion {
                    version: 1,
                    status: ResultStatus::Preliminary.as_str().to_owned(),
                    idempotency_key: released
                        .iter()
                        .find(|r| r.key == key)
                        .map_or(key.clone(), |r| r.key.clone()),
                    released_at_ms: at,
                    released_by: AUTO.to_owned(),
                    interpretation: c.interpretation.clone(),
                    correction_reason: None,
                });
                index::put(tx, c);
            }
            let plate = fresh.first().and_then(|c| PlateId::new(c.plate.clone()).ok());
            tx.audit(
                "result.early_called",
                plate.as_ref(),
                fresh
                    .iter()
                    .filter_map(|c| Barcode::new(c.tube.clone()).ok())
                    .collect(),
                format!(
                    "{} result(s) released as preliminary at cycle {cycle} of {cycles_expected}: {}",
                    fresh.len(),
                    fresh
                        .iter()
                        .map(|c| c.result_id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            Ok(fresh.len())
        })
        .await?;
    lab.review()
        .early_calls
        .fetch_add(released as u64, Ordering::Relaxed);
    Ok(released)
}

/// Stages `candidates`, writing `imports` entries in the same transaction. With
/// `unless_import`, nothing is written when that `imports` key exists (another
/// folder imported the same file meanwhile): `Ok(None)`.
pub async fn stage(
    lab: &Arc<Lab>,
    actor: Actor,
    candidates: Vec<Candidate>,
    imports: Vec<(Vec<u8>, Vec<u8>)>,
    unless_import: Option<Vec<u8>>,
) -> Result<Option<StageOutcome>, LabError> {
    let policy = lab.review().policy();
    let (outcome, times) = lab
        .review_change(actor, move |tx| {
            if let Some(key) = &unless_import
                && tx
                    .lab()
                    .store()
                    .trees()
                    .imports
                    .get(key)
                    .map_err(StoreError::from)?
                    .is_some()
            {
                return Ok(None);
            }
            for (key, value) in imports {
                tx.put_import(key, value);
            }
            let (outcome, times) = plan_stage(tx, candidates, &policy)?;
            Ok(Some((outcome, times)))
        })
        .await?
        .map_or((None, ReleaseTimes::default()), |(o, t)| (Some(o), t));
    observe(lab, &times, true);
    if let Some(o) = &outcome {
        lab.review()
            .early_calls_disagreed
            .fetch_add(o.early_disagreed as u64, Ordering::Relaxed);
    }
    Ok(outcome)
}

fn plan_stage(
    tx: &mut ReviewTx<'_>,
    candidates: Vec<Candidate>,
    policy: &ReviewPolicy,
) -> Result<(StageOutcome, ReleaseTimes), LabError> {
    let mut outcome = StageOutcome::default();
    let mut to_release = Vec::new();
    let mut staged = Vec::new();
    let mut seen = BTreeSet::new();
    let at = tx.at.as_millis();
    for mut c in candidates {
        let key = candidate_key(&c.result_id);
        let existing = tx
            .lab()
            .store()
            .trees()
            .review
            .get(&key)
            .map_err(StoreError::from)?;
        // A result called early (state preliminary, version 1 out) gets its
        // final here: the staging goes on with its versions kept.
        let mut preliminary: Option<ReleasedVersion> = None;
        if let Some(raw) = &existing {
            let prev: Candidate = decode(&key, raw)?;
            if prev.state != CandidateState::Preliminary || seen.contains(&c.result_id) {
                outcome.already_staged += 1;
                continue;
            }
            preliminary = prev.versions.last().cloned();
            c.versions = prev.versions;
        }
        if !seen.insert(c.result_id.clone()) {
            outcome.already_staged += 1;
            continue;
        }
        c.staged_at_ms = at;
        let disagrees = preliminary
            .as_ref()
            .is_some_and(|p| !c.plate_valid || p.interpretation != c.interpretation);
        if let Some(p) = preliminary.as_ref().filter(|_| disagrees) {
            outcome.early_disagreed += 1;
            tracing::error!(
                result = %c.result_id,
                tube = %c.tube,
                plate = %c.plate,
                preliminary = %p.interpretation,
                final_call = %c.call,
                plate_valid = c.plate_valid,
                "The final result disagrees with the preliminary version released by an early call; a reviewer must decide."
            );
        }
        let barcode = Barcode::new(c.tube.clone()).map_err(|e| LabError::Invalid {
            message: e.to_string(),
            problems: Vec::new(),
        })?;
        let plate_id = PlateId::new(c.plate.clone()).ok();
        if !c.plate_valid {
            // Nothing of a failed plate is reported: every tube is tested again.
            c.state = CandidateState::RerunRequested;
            c.decided_by = Some(AUTO.to_owned());
            c.decided_at_ms = Some(at);
            c.decision_reason = Some(format!(
                "run controls of plate {} failed: {}",
                c.plate,
                c.plate_invalid_reason.clone().unwrap_or_default()
            ));
            if let Some(p) = &preliminary {
                c.decision_reason = Some(format!(
                    "{}; preliminary version {} ({}) was released by an early call before the run ended and is not confirmed: tell the receiver",
                    c.decision_reason.clone().unwrap_or_default(),
                    p.version,
                    p.interpretation
                ));
            }
            let why = c.decision_reason.clone().unwrap_or_default();
            add_rerun(tx, &c, &barcode, plate_id.as_ref(), AUTO, &why)?;
            outcome.reruns += 1;
        } else {
            let call = c.call.as_str();
            if disagrees {
                // Never released by policy: a person decides what replaces
                // the preliminary version.
                c.decision_reason = preliminary.as_ref().map(|p| {
                    format!(
                        "the final call ({}, {}) disagrees with preliminary version {} ({}) released by an early call: review before release",
                        c.call, c.interpretation, p.version, p.interpretation
                    )
                });
                outcome.awaiting_review += 1;
            } else if call == "not_detected"
                && c.qc_holds.is_empty()
                && policy.auto_release_negatives
            {
                to_release.push(c.result_id.clone());
            } else {
                outcome.awaiting_review += 1;
            }
            if matches!(call, "inconclusive" | "retest" | "invalid") {
                let why = format!("{}: {}", c.call, c.reason);
                add_rerun(tx, &c, &barcode, plate_id.as_ref(), AUTO, &why)?;
                outcome.reruns += 1;
            }
            if call == "detected" && c.pool_size > 1 {
                add_follow_up(tx, &c, AUTO);
                outcome.follow_ups += 1;
            }
        }
        staged.push(c);
    }
    // One release for every auto-released candidate, in this transaction.
    let mut records = Vec::new();
    for c in staged.iter().filter(|c| to_release.contains(&c.result_id)) {
        records.push(build_record(
            tx.lab().lab_id(),
            c,
            c.versions.len() as u32 + 1,
            ResultStatus::Final,
            None,
            None,
            AUTO,
            at,
        )?);
    }
    let released = if records.is_empty() {
        Vec::new()
    } else {
        tx.release(&records)?
    };
    let mut times = ReleaseTimes::default();
    for c in &mut staged {
        let version = c.versions.len() as u32 + 1;
        if let Some(r) = released
            .iter()
            .find(|r| r.key == format!("{}:{version}", c.result_id))
        {
            c.state = CandidateState::Released;
            c.decided_by = Some(AUTO.to_owned());
            c.decided_at_ms = Some(at);
            c.decision_reason = Some("not detected on a valid plate: released by policy".into());
            c.versions.push(ReleasedVersion {
                version,
                status: ResultStatus::Final.as_str().to_owned(),
                idempotency_key: r.key.clone(),
                released_at_ms: at,
                released_by: AUTO.to_owned(),
                interpretation: c.interpretation.clone(),
                correction_reason: None,
            });
            outcome.auto_released += 1;
            let received = tx
                .lab()
                .tube(&c.tube)
                .map(|t| t.received_at.as_millis())
                .unwrap_or(at);
            times.items.push((received, at, at));
        }
        index::put(tx, c);
    }
    outcome.staged = staged.len();
    if !staged.is_empty() {
        let plates: BTreeSet<&str> = staged.iter().map(|c| c.plate.as_str()).collect();
        let plate = match plates.iter().collect::<Vec<_>>().as_slice() {
            [one] => PlateId::new(**one).ok(),
            _ => None,
        };
        tx.audit(
            "result.staged",
            plate.as_ref(),
            staged
                .iter()
                .filter_map(|c| Barcode::new(c.tube.clone()).ok())
                .collect(),
            format!(
                "staged {} result(s) of plate(s) {}: {} released by policy, {} awaiting review, {} to rerun, {} pool follow-up(s)",
                outcome.staged,
                plates.into_iter().collect::<Vec<_>>().join(", "),
                outcome.auto_released,
                outcome.awaiting_review,
                outcome.reruns,
                outcome.follow_ups
            ),
        );
    }
    Ok((outcome, times))
}

fn add_rerun(
    tx: &mut ReviewTx<'_>,
    c: &Candidate,
    barcode: &Barcode,
    plate: Option<&PlateId>,
    by: &str,
    why: &str,
) -> Result<(), LabError> {
    let id = format!("rerun:{}", c.result_id);
    if tx
        .lab()
        .store()
        .trees()
        .review
        .get(rerun_key(&id))
        .map_err(StoreError::from)?
        .is_some()
    {
        return Ok(());
    }
    let requeued = tx.requeue_for_rerun(
        barcode,
        plate,
        format!(
            "tube {} back into the plating queue for a rerun (result {}): {why}",
            c.tube, c.result_id
        ),
    )?;
    let entry = RerunEntry {
        id: id.clone(),
        kind: "rerun".into(),
        tube: c.tube.clone(),
        pool_size: c.pool_size,
        result_id: c.result_id.clone(),
        plate: c.plate.clone(),
        well: c.well.clone(),
        call: c.call.clone(),
        reason: cut(why),
        requested_by: by.to_owned(),
        requested_at_ms: tx.at.as_millis(),
        requeued,
    };
    tx.put_review(rerun_key(&id), encode(&entry));
    Ok(())
}

fn add_follow_up(tx: &mut ReviewTx<'_>, c: &Candidate, by: &str) {
    let id = format!("follow-up:{}", c.result_id);
    let entry = RerunEntry {
        id: id.clone(),
        kind: "pool_follow_up".into(),
        tube: c.tube.clone(),
        pool_size: c.pool_size,
        result_id: c.result_id.clone(),
        plate: c.plate.clone(),
        well: c.well.clone(),
        call: c.call.clone(),
        reason: format!(
            "pool of {} detected: test each of its {} members individually (they arrive as new tubes)",
            c.pool_size, c.pool_size
        ),
        requested_by: by.to_owned(),
        requested_at_ms: tx.at.as_millis(),
        requeued: false,
    };
    tx.put_review(rerun_key(&id), encode(&entry));
}

fn cut(text: &str) -> String {
    text.chars().take(MAX_REASON).collect()
}

/// The upstream record of a candidate's result version.
#[allow(clippy::too_many_arguments)]
fn build_record(
    lab_id: &str,
    c: &Candidate,
    version: u32,
    status: ResultStatus,
    correction_reason: Option<String>,
    interpretation: Option<Interpretation>,
    released_by: &str,
    released_at_ms: i64,
) -> Result<ResultRecord, LabError> {
    let interpretation = match interpretation {
        Some(i) => i,
        None => parse_interpretation(&c.interpretation).ok_or_else(|| LabError::Invalid {
            message: format!(
                "result {} has interpretation {:?}, which is not one of positive, negative, inconclusive, invalid",
                c.result_id, c.interpretation
            ),
            problems: Vec::new(),
        })?,
    };
    Ok(ResultRecord {
        schema_version: RESULT_SCHEMA_VERSION,
        result_id: c.result_id.clone(),
        version,
        tube: c.tube.clone(),
        pool_size: c.pool_size,
        plate: c.plate.clone(),
        well: c.well.clone(),
        run: c.run.clone(),
        instrument: c.instrument.clone(),
        kit: KitRef {
            id: c.kit_id.clone(),
            version: c.kit_version.clone(),
        },
        targets: c
            .targets
            .iter()
            .map(|t| TargetResult {
                name: t.name.clone(),
                dye: t.dye.clone(),
                loinc: t.loinc.clone(),
                ct: t.ct,
                call: parse_target_call(&t.call),
            })
            .collect(),
        interpretation,
        status,
        correction_reason,
        tested_at: crate::outbox::rfc3339_ms(c.tested_at_ms),
        released_at: crate::outbox::rfc3339_ms(released_at_ms),
        released_by: released_by.to_owned(),
        lab_id: lab_id.to_owned(),
    })
}

// ----- decisions -----

/// What a reviewer decides about a candidate.
#[derive(Clone, Debug)]
pub enum Decision {
    /// Release the result as computed (version 1, final).
    Release,
    /// Test the tube again; nothing is released.
    Rerun { reason: String },
    /// Do not report the result (and do not rerun).
    Reject { reason: String },
    /// A new version of a released result with status corrected.
    Correct {
        reason: String,
        interpretation: Option<String>,
    },
}

impl Decision {
    fn name(&self) -> &'static str {
        match self {
            Decision::Release => "release",
            Decision::Rerun { .. } => "rerun",
            Decision::Reject { .. } => "reject",
            Decision::Correct { .. } => "correct",
        }
    }
}

fn invalid(message: String) -> LabError {
    LabError::Invalid {
        message,
        problems: Vec::new(),
    }
}

fn conflict(message: String) -> LabError {
    LabError::Conflict {
        message,
        problems: Vec::new(),
    }
}

/// Applies a reviewer's decision: the candidate's new state, any release and any
/// re-queue in one transaction, durable before this returns. Refusals write nothing:
/// an unknown result (404), a decision its state does not allow (409), a missing
/// reason or an unknown interpretation (422).
pub async fn decide(
    lab: &Arc<Lab>,
    actor: Actor,
    id: String,
    decision: Decision,
) -> Result<Candidate, LabError> {
    match &decision {
        Decision::Rerun { reason }
        | Decision::Reject { reason }
        | Decision::Correct { reason, .. }
            if reason.trim().is_empty() =>
        {
            return Err(invalid(format!("a {} needs a reason", decision.name())));
        }
        Decision::Correct {
            interpretation: Some(text),
            ..
        } if parse_interpretation(text).is_none() => {
            return Err(invalid(format!(
                "interpretation {text:?} is not one of positive, negative, inconclusive, invalid"
            )));
        }
        _ => {}
    }
    let user = actor.user.clone();
    let (candidate, times) = lab
        .review_change(actor, move |tx| {
            let mut c = load_candidate(tx.lab(), &id)?.ok_or_else(|| LabError::NotFound {
                message: format!("no result {id}"),
            })?;
            let at = tx.at.as_millis();
            let barcode = Barcode::new(c.tube.clone()).map_err(|e| invalid(e.to_string()))?;
            let plate_id = PlateId::new(c.plate.clone()).ok();
            let mut times = ReleaseTimes::default();
            let state_refusal = |c: &Candidate, what: &str| {
                conflict(format!(
                    "result {} is {}; only a result awaiting review can be {what}",
                    c.result_id,
                    c.state.as_str()
                ))
            };
            match &decision {
                Decision::Release => {
                    if c.state != CandidateState::AwaitingReview {
                        return Err(state_refusal(&c, "released"));
                    }
                    if !c.plate_valid {
                        return Err(conflict(format!(
                            "plate {} is invalid; nothing of it can be released",
                            c.plate
                        )));
                    }
                    let version = c.versions.len() as u32 + 1;
                    let record = build_record(
                        tx.lab().lab_id(),
                        &c,
                        version,
                        ResultStatus::Final,
                        None,
                        None,
                        &user,
                        at,
                    )?;
                    let released = tx.release(std::slice::from_ref(&record))?;
                    c.state = CandidateState::Released;
                    c.decision_reason = None;
                    c.versions.push(ReleasedVersion {
                        version,
                        status: ResultStatus::Final.as_str().to_owned(),
                        idempotency_key: released
                            .first()
                            .map(|r| r.key.clone())
                            .unwrap_or_else(|| record.idempotency_key()),
                        released_at_ms: at,
                        released_by: user.clone(),
                        interpretation: c.interpretation.clone(),
                        correction_reason: None,
                    });
                    let received = tx
                        .lab()
                        .tube(&c.tube)
                        .map(|t| t.received_at.as_millis())
                        .unwrap_or(at);
                    times.items.push((received, c.staged_at_ms, at));
                }
                Decision::Rerun { reason } => {
                    if c.state != CandidateState::AwaitingReview {
                        return Err(state_refusal(&c, "sent for a rerun"));
                    }
                    c.state = CandidateState::RerunRequested;
                    c.decision_reason = Some(cut(reason));
                    add_rerun(tx, &c, &barcode, plate_id.as_ref(), &user, reason)?;
                }
                Decision::Reject { reason } => {
                    if c.state != CandidateState::AwaitingReview {
                        return Err(state_refusal(&c, "rejected"));
                    }
                    c.state = CandidateState::Rejected;
                    c.decision_reason = Some(cut(reason));
                }
                Decision::Correct {
                    reason,
                    interpretation,
                } => {
                    if c.state != CandidateState::Released {
                        return Err(conflict(format!(
                            "result {} is {}; only a released result can be corrected",
                            c.result_id,
                            c.state.as_str()
                        )));
                    }
                    let interpretation = interpretation.as_deref().and_then(parse_interpretation);
                    let version = c.versions.len() as u32 + 1;
                    let record = build_record(
                        tx.lab().lab_id(),
                        &c,
                        version,
                        ResultStatus::Corrected,
                        Some(cut(reason)),
                        interpretation,
                        &user,
                        at,
                    )?;
                    let released = tx.release(std::slice::from_ref(&record))?;
                    if let Some(i) = interpretation {
                        c.interpretation = i.as_str().to_owned();
                    }
                    c.versions.push(ReleasedVersion {
                        version,
                        status: ResultStatus::Corrected.as_str().to_owned(),
                        idempotency_key: released
                            .first()
                            .map(|r| r.key.clone())
                            .unwrap_or_else(|| record.idempotency_key()),
                        released_at_ms: at,
                        released_by: user.clone(),
                        interpretation: c.interpretation.clone(),
                        correction_reason: Some(cut(reason)),
                    });
                }
            }
            c.decided_by = Some(user.clone());
            c.decided_at_ms = Some(at);
            index::put(tx, &c);
            tx.audit(
                match decision {
                    Decision::Release => "review.released",
                    Decision::Rerun { .. } => "review.rerun",
                    Decision::Reject { .. } => "review.rejected",
                    Decision::Correct { .. } => "review.corrected",
                },
                plate_id.as_ref(),
                vec![barcode],
                format!(
                    "{} result {} ({}, {})",
                    match decision {
                        Decision::Release => "released",
                        Decision::Rerun { .. } => "sent for a rerun",
                        Decision::Reject { .. } => "rejected",
                        Decision::Correct { .. } => "corrected",
                    },
                    c.result_id,
                    c.call,
                    c.interpretation
                ),
            );
            Ok((c, times))
        })
        .await?;
    observe(lab, &times, false);
    if candidate.state == CandidateState::RerunRequested {
        lab.review().reruns.fetch_add(1, Ordering::Relaxed);
    }
    Ok(candidate)
}

// ----- reads -----

pub fn load_candidate(lab: &Lab, result_id: &str) -> Result<Option<Candidate>, StoreError> {
    let key = candidate_key(result_id);
    match lab.store().trees().review.get(&key)? {
        Some(raw) => Ok(Some(decode(&key, &raw)?)),
        None => Ok(None),
    }
}

/// Every candidate (optionally of one state), unordered.
pub fn candidates(lab: &Lab, state: Option<CandidateState>) -> Result<Vec<Candidate>, StoreError> {
    if let Some(state) = state {
        return index::in_state(lab, state);
    }
    let mut out = Vec::new();
    for item in lab.store().trees().review.scan_prefix(b"c") {
        let (key, raw) = item?;
        let c: Candidate = decode(&key, &raw)?;
        if state.is_none_or(|s| s == c.state) {
            out.push(c);
        }
    }
    Ok(out)
}

/// Candidates whose result id starts with `prefix` (one run's: `LAB-RUN-`).
pub fn candidates_with_prefix(lab: &Lab, prefix: &str) -> Result<Vec<Candidate>, StoreError> {
    let mut out = Vec::new();
    for item in lab
        .store()
        .trees()
        .review
        .scan_prefix(candidate_key(prefix))
    {
        let (key, raw) = item?;
        out.push(decode(&key, &raw)?);
    }
    Ok(out)
}

/// The rerun list: reruns and pool follow-ups.
pub fn reruns(lab: &Lab) -> Result<Vec<RerunEntry>, StoreError> {
    let mut out = Vec::new();
    for item in lab.store().trees().review.scan_prefix(b"r") {
        let (key, raw) = item?;
        out.push(decode::<RerunEntry>(&key, &raw)?);
    }
    Ok(out)
}

/// Candidates of one tube.
pub fn candidates_of_tube(lab: &Lab, tube: &str) -> Result<Vec<Candidate>, StoreError> {
    index::of_tube(lab, tube)
}
