//! Turnaround time and due times: stage timestamps per tube and per plate, the
//! tubes at risk of missing their due time (and those past it), and the watcher
//! that counts them for /metrics and logs a warning when a tube becomes at risk.
//!
//! Timestamps come from what is already stored: receipt (the tube record),
//! plating (the audit entry that put it on a plate), sealing (the plate),
//! staging and release (the review candidate), delivery (the outbox's per-sink
//! state; the time of the sink's acknowledgement is in the
//! `pcrd_outbox_turnaround_seconds` histogram, not stored per result).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use pcrd_protocol::domain::Barcode;
use serde::Serialize;

use super::{Candidate, CandidateState, candidates};
use crate::lab::{Lab, LabError};
use crate::model::{AuditEntry, TubeRecord};
use crate::store::{StoreError, decode};

/// Where a tube stands against its due time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DueStatus {
    /// Past its due time without a released result.
    PastDue,
    /// Within `review.at_risk_before` of its due time without a released result.
    AtRisk,
    /// Due later.
    OnTime,
    /// No due time given.
    NoDueTime,
    /// A result was released (or rejected): nothing more is due.
    Done,
}

impl DueStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DueStatus::PastDue => "past_due",
            DueStatus::AtRisk => "at_risk",
            DueStatus::OnTime => "on_time",
            DueStatus::NoDueTime => "no_due_time",
            DueStatus::Done => "done",
        }
    }
}

/// The due status of a tube due at `due_ms` (if any) at `now_ms`.
pub fn status(due_ms: Option<i64>, done: bool, now_ms: i64, at_risk_before_ms: i64) -> DueStatus {
    match due_ms {
        _ if done => DueStatus::Done,
        None => DueStatus::NoDueTime,
        Some(due) if now_ms > due => DueStatus::PastDue,
        Some(due) if now_ms >= due.saturating_sub(at_risk_before_ms) => DueStatus::AtRisk,
        Some(_) => DueStatus::OnTime,
    }
}

/// Order for every list: past due (most overdue first), at risk (soonest due
/// first), then the rest by due time, tubes without a due time last.
pub fn sort_key(status: DueStatus, due_ms: Option<i64>) -> (DueStatus, i64) {
    (status, due_ms.unwrap_or(i64::MAX))
}

/// What the review knows about each tube: released (or rejected) or not, and the
/// candidates' times.
#[derive(Clone, Debug, Default)]
pub struct TubeReview {
    pub done: bool,
    pub awaiting: bool,
    pub first_staged_ms: Option<i64>,
    pub first_released_ms: Option<i64>,
    pub first_released_key: Option<String>,
    pub rerun: bool,
}

pub fn by_tube(all: &[Candidate]) -> HashMap<String, TubeReview> {
    let mut map: HashMap<String, TubeReview> = HashMap::new();
    for c in all {
        let t = map.entry(c.tube.clone()).or_default();
        t.done |= matches!(c.state, CandidateState::Released | CandidateState::Rejected);
        t.awaiting |= c.state == CandidateState::AwaitingReview;
        t.rerun |= c.state == CandidateState::RerunRequested;
        t.first_staged_ms = Some(
            t.first_staged_ms
                .map_or(c.staged_at_ms, |s| s.min(c.staged_at_ms)),
        );
        if let Some(v) = c.versions.first()
            && t.first_released_ms.is_none_or(|r| v.released_at_ms < r)
        {
            t.first_released_ms = Some(v.released_at_ms);
            t.first_released_key = Some(v.idempotency_key.clone());
        }
    }
    map
}

/// A tube against its due time.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct DueView {
    pub barcode: String,
    pub priority: String,
    pub pool_size: u8,
    pub due_at: Option<String>,
    /// past_due, at_risk, on_time, no_due_time, done.
    pub due_status: String,
    /// Minutes until due (negative when past due).
    pub minutes_left: Option<i64>,
    /// waiting (for a plate), on_plate, awaiting_review, rerun_requested, done.
    pub stage: String,
    pub received_at: String,
}

/// Every tube not done, past due and at risk first. Reads every tube: a request or a
/// watcher pass, not a hot path.
pub fn due_tubes(
    lab: &Lab,
    now_ms: i64,
    limit: usize,
) -> Result<(Vec<DueView>, Counts), StoreError> {
    let policy = lab.review().policy();
    let at_risk_ms = policy.at_risk_before.as_millis() as i64;
    let all = candidates(lab, None)?;
    let reviews = by_tube(&all);
    let mut counts = Counts {
        awaiting_review: all
            .iter()
            .filter(|c| c.state == CandidateState::AwaitingReview)
            .count() as u64,
        ..Counts::default()
    };
    let mut rows = Vec::new();
    for item in lab.store().trees().tubes.iter() {
        let (key, raw) = item?;
        let tube: TubeRecord = decode(&key, &raw)?;
        let review = reviews.get(tube.barcode.as_str());
        let done = review.is_some_and(|r| r.done);
        let due_ms = tube.due_at.map(|t| t.as_millis());
        let s = status(due_ms, done, now_ms, at_risk_ms);
        match s {
            DueStatus::PastDue => counts.past_due += 1,
            DueStatus::AtRisk => counts.at_risk += 1,
            _ => {}
        }
        if s == DueStatus::Done {
            continue;
        }
        let stage = match review {
            Some(r) if r.awaiting => "awaiting_review",
            _ if tube.placement.is_none() => "waiting",
            Some(r) if r.rerun => "rerun_requested",
            _ => "on_plate",
        };
        rows.push((sort_key(s, due_ms), tube, s, stage));
    }
    rows.sort_by_key(|a| a.0);
    counts.listed = rows.len() as u64;
    let views = rows
        .into_iter()
        .take(limit)
        .map(|(_, tube, s, stage)| DueView {
            barcode: tube.barcode.to_string(),
            priority: tube.priority.to_string(),
            pool_size: tube.pool_size.get(),
            due_at: tube.due_at.map(crate::lab::rfc3339),
            due_status: s.as_str().to_owned(),
            minutes_left: tube
                .due_at
                .map(|d| (d.as_millis() - now_ms).div_euclid(60_000)),
            stage: stage.to_owned(),
            received_at: crate::lab::rfc3339(tube.received_at),
        })
        .collect();
    Ok((views, counts))
}

/// Tubes per due status, from one pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub past_due: u64,
    pub at_risk: u64,
    pub awaiting_review: u64,
    /// Tubes not done.
    pub listed: u64,
}

/// The due status of one tube (for listing results).
pub fn tube_status(
    lab: &Lab,
    tube: &str,
    reviews: &HashMap<String, TubeReview>,
    now_ms: i64,
) -> (DueStatus, Option<i64>) {
    let policy = lab.review().policy();
    let due_ms = lab
        .tube(tube)
        .ok()
        .and_then(|t| t.due_at.map(|d| d.as_millis()));
    let done = reviews.get(tube).is_some_and(|r| r.done);
    (
        status(
            due_ms,
            done,
            now_ms,
            policy.at_risk_before.as_millis() as i64,
        ),
        due_ms,
    )
}

// ----- turnaround -----

/// One step of a tube's way, and how long it took from the previous step.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct StageTime {
    /// received, plated, sealed, result_staged, released, delivered.
    pub stage: String,
    /// RFC 3339; absent when the step has not happened (or its time is not kept).
    pub at: Option<String>,
    /// Seconds since the previous step that happened.
    pub seconds_since_previous: Option<f64>,
}

/// A tube's turnaround.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct TubeTat {
    pub barcode: String,
    pub due_at: Option<String>,
    pub due_status: String,
    pub stages: Vec<StageTime>,
    /// From receipt to the first release, or to now when not yet released.
    pub turnaround_seconds: f64,
    /// Whether every configured sink has acknowledged the first released version.
    pub delivered: Option<bool>,
}

fn stages(steps: &[(&str, Option<i64>)]) -> Vec<StageTime> {
    let mut previous: Option<i64> = None;
    steps
        .iter()
        .map(|(name, at)| {
            let since = match (previous, at) {
                (Some(p), Some(a)) => Some((a - p) as f64 / 1000.0),
                _ => None,
            };
            if at.is_some() {
                previous = *at;
            }
            StageTime {
                stage: (*name).to_owned(),
                at: at.map(crate::outbox::rfc3339_ms),
                seconds_since_previous: since,
            }
        })
        .collect()
}

/// When the tube was first put on a plate, and that plate's sealing time, from the
/// tube's audit history.
fn plated_and_sealed(lab: &Lab, tube: &TubeRecord) -> Result<(Option<i64>, Option<i64>), LabError> {
    let audit = &lab.store().trees().audit;
    for seq in &tube.history {
        let key = seq.to_be_bytes();
        let Some(raw) = audit.get(key).map_err(StoreError::from)? else {
            continue;
        };
        let entry: AuditEntry = decode(&key, &raw)?;
        if matches!(
            entry.action.as_str(),
            "plate.assigned" | "plate.filled" | "plate.mapped"
        ) {
            let sealed = entry
                .plate
                .as_ref()
                .and_then(|p| lab.plate(p.as_str()).ok())
                .and_then(|p| p.sealed_at.map(|t| t.as_millis()));
            return Ok((Some(entry.at.as_millis()), sealed));
        }
    }
    Ok((None, None))
}

pub fn tube_tat(lab: &Lab, barcode: &str, now_ms: i64) -> Result<TubeTat, LabError> {
    let tube = lab.tube(barcode)?;
    let (plated, sealed) = plated_and_sealed(lab, &tube)?;
    let mine = super::candidates_of_tube(lab, barcode)?;
    let review = by_tube(&mine).remove(barcode).unwrap_or_default();
    let delivered = match review
        .first_released_key
        .as_deref()
        .and_then(crate::outbox::split_key)
    {
        Some((id, version)) => {
            lab.outbox()
                .delivery_state(lab.store(), id, version)?
                .map(|states| {
                    !states.is_empty()
                        && states
                            .iter()
                            .all(|(_, s)| matches!(s, crate::outbox::DeliveryState::Delivered))
                })
        }
        None => None,
    };
    let received = tube.received_at.as_millis();
    let policy = lab.review().policy();
    let due_ms = tube.due_at.map(|d| d.as_millis());
    let s = status(
        due_ms,
        review.done,
        now_ms,
        policy.at_risk_before.as_millis() as i64,
    );
    Ok(TubeTat {
        barcode: barcode.to_owned(),
        due_at: tube.due_at.map(crate::lab::rfc3339),
        due_status: s.as_str().to_owned(),
        stages: stages(&[
            ("received", Some(received)),
            ("plated", plated),
            ("sealed", sealed),
            ("result_staged", review.first_staged_ms),
            ("released", review.first_released_ms),
        ]),
        turnaround_seconds: (review.first_released_ms.unwrap_or(now_ms) - received) as f64 / 1000.0,
        delivered,
    })
}

/// A plate's turnaround.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct PlateTat {
    pub plate: String,
    pub stages: Vec<StageTime>,
    pub tubes: usize,
    pub results_staged: usize,
    pub results_released: usize,
    /// Median from a tube's receipt to its release, over the plate's released tubes.
    pub median_received_to_released_seconds: Option<f64>,
}

pub fn plate_tat(lab: &Lab, id: &str) -> Result<PlateTat, LabError> {
    let plate = lab.plate(id)?;
    let mine: Vec<Candidate> = candidates(lab, None)?
        .into_iter()
        .filter(|c| c.plate == id)
        .collect();
    let first_staged = mine.iter().map(|c| c.staged_at_ms).min();
    let released: Vec<(String, i64)> = mine
        .iter()
        .filter_map(|c| {
            c.versions
                .first()
                .map(|v| (c.tube.clone(), v.released_at_ms))
        })
        .collect();
    let last_released = released.iter().map(|(_, at)| *at).max();
    let mut durations: Vec<f64> = released
        .iter()
        .filter_map(|(tube, at)| {
            Barcode::new(tube.clone())
                .ok()
                .and_then(|_| lab.tube(tube).ok())
                .map(|t| (at - t.received_at.as_millis()) as f64 / 1000.0)
        })
        .collect();
    durations.sort_by(f64::total_cmp);
    let median = (!durations.is_empty()).then(|| durations[durations.len() / 2]);
    Ok(PlateTat {
        plate: id.to_owned(),
        stages: stages(&[
            ("created", Some(plate.created_at.as_millis())),
            ("sealed", plate.sealed_at.map(|t| t.as_millis())),
            ("first_result_staged", first_staged),
            ("last_released", last_released),
        ]),
        tubes: plate.layout.sample_count(),
        results_staged: mine.len(),
        results_released: released.len(),
        median_received_to_released_seconds: median,
    })
}

// ----- watcher -----

/// One watcher pass: updates the gauges and warns once for each tube that became
/// at risk or past due since the last pass.
pub fn check(lab: &Lab, now_ms: i64) -> Result<Counts, StoreError> {
    let (views, counts) = due_tubes(lab, now_ms, usize::MAX)?;
    let review = lab.review();
    review
        .tubes_at_risk
        .store(counts.at_risk, Ordering::Relaxed);
    review
        .tubes_past_due
        .store(counts.past_due, Ordering::Relaxed);
    review
        .awaiting_review
        .store(counts.awaiting_review, Ordering::Relaxed);
    let mut alerted = review
        .alerted
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut now_alerting = HashMap::new();
    for v in views {
        let s = match v.due_status.as_str() {
            "past_due" => DueStatus::PastDue,
            "at_risk" => DueStatus::AtRisk,
            _ => continue,
        };
        if alerted.get(&v.barcode) != Some(&s) {
            match s {
                DueStatus::PastDue => tracing::warn!(
                    tube = %v.barcode,
                    due_at = v.due_at.as_deref().unwrap_or_default(),
                    stage = %v.stage,
                    "Tube is past its due time without a released result."
                ),
                _ => tracing::warn!(
                    tube = %v.barcode,
                    due_at = v.due_at.as_deref().unwrap_or_default(),
                    minutes_left = v.minutes_left.unwrap_or_default(),
                    stage = %v.stage,
                    "Tube is at risk of missing its due time."
                ),
            }
        }
        now_alerting.insert(v.barcode, s);
    }
    *alerted = now_alerting;
    Ok(counts)
}

/// Runs [`check`] every `review.check_every` until the process ends.
pub fn spawn_watcher(lab: Arc<Lab>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let pass = Arc::clone(&lab);
            let outcome =
                tokio::task::spawn_blocking(move || check(&pass, crate::outbox::now_ms())).await;
            match outcome {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "Due-time check failed."),
                Err(e) => tracing::error!(error = %e, "Due-time check stopped."),
            }
            tokio::time::sleep(lab.review().policy().check_every).await;
        }
    })
}
