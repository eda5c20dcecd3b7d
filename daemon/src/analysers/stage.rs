//! From reported results to review: each tube's result from an applied analyser
//! message becomes a review candidate (`crate::review`), so analyser results are
//! released and delivered like a plate's.
//!
//! Applying a message (`store::apply_message`) and staging its candidates are two
//! transactions (the lab's review transaction spans the lab's trees, not the
//! analyser's). The apply transaction therefore leaves a "to stage" mark
//! (`v` ++ message id in `messages`) that is removed only after the candidates are
//! durable; a crash in between stages them again at the next start, which changes
//! nothing for candidates already staged (staging is keyed by result id).
//!
//! A sample-to-answer analyser has no plate: the candidate's plate is the analyser,
//! its run the analyser and message id (`AN-1:M42`), its well the order's position
//! in the message (`O1`, `O2`, ...). The result id is built from those, so it is
//! stable for the same message.

use std::sync::Arc;

use pcrd_protocol::interpret::Call;
use pcrd_protocol::upstream::TargetCall;
use tracing::{info, warn};

use super::store::ReportedResult;
use crate::lab::{Actor, Lab, LabError};
use crate::review::{
    Candidate, CandidateSource, CandidateState, CandidateTarget, interpretation_of, result_id,
    target_call_name,
};
use crate::store::StoreError;

/// The key of the "to stage" mark of message `id` in the `messages` tree.
pub(super) fn to_stage_key(id: u64) -> Vec<u8> {
    let mut key = vec![b'v'];
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// The review candidate for one reported result.
fn candidate(lab: &Lab, r: &ReportedResult) -> Result<Candidate, LabError> {
    let kit = lab.kits().find(&r.kit).map_err(|e| LabError::Invalid {
        message: format!("reported result for {}: {e}", r.barcode),
        problems: Vec::new(),
    })?;
    let run = format!("{}:M{}", r.source.instrument, r.source.message_id);
    let well = format!("O{}", u64::from(r.source.order_index) + 1);
    let targets = r
        .targets
        .iter()
        .map(|t| {
            let definition = kit.targets().iter().find(|d| d.name == t.target);
            // The kit's reading of the Ct when pcrd interpreted; with the analyser's
            // call kept, a Ct means the target amplified.
            let call = if r.call == Call::Invalid {
                TargetCall::Invalid
            } else {
                match t.state.as_deref() {
                    Some("positive") => TargetCall::Detected,
                    Some("grey_zone") => TargetCall::Inconclusive,
                    Some(_) => TargetCall::NotDetected,
                    None if t.ct.is_some() => TargetCall::Detected,
                    None => TargetCall::NotDetected,
                }
            };
            CandidateTarget {
                name: t.target.clone(),
                dye: definition.map(|d| d.channel.clone()).unwrap_or_default(),
                loinc: definition.and_then(|d| d.loinc.clone()),
                ct: t.ct,
                call: target_call_name(call).to_owned(),
            }
        })
        .collect();
    Ok(Candidate {
        result_id: result_id(lab.lab_id(), &run, &well, &r.barcode),
        tube: r.barcode.clone(),
        pool_size: r.pool_size,
        plate: r.source.instrument.clone(),
        well,
        run,
        instrument: r.source.instrument.clone(),
        kit_id: kit.id.to_string(),
        kit_version: kit.version.clone(),
        source: CandidateSource {
            kind: "analyser".into(),
            id: r.source.message_id.to_string(),
            detail: format!(
                "{} order {} specimen {} test {}",
                r.source.profile,
                r.source.order_index + 1,
                r.source.specimen_id,
                r.source.test_code
            ),
        },
        targets,
        call: r.call.to_string(),
        interpretation: interpretation_of(r.call).as_str().to_owned(),
        action: r.action.clone(),
        reason: r.reason.clone(),
        // The analyser judges its own run controls; a failed run reaches pcrd as
        // invalid results, not as a plate.
        plate_valid: true,
        plate_invalid_reason: None,
        qc_holds: Vec::new(),
        tested_at_ms: r.source.received_at.as_millis(),
        staged_at_ms: 0,
        state: CandidateState::AwaitingReview,
        decided_by: None,
        decided_at_ms: None,
        decision_reason: None,
        versions: Vec::new(),
    })
}

/// Stages the candidates of message `id` (its reported results), then removes the
/// message's "to stage" mark once they are durable.
pub(super) async fn stage_message(
    lab: &Arc<Lab>,
    analyser: &str,
    id: u64,
    results: &[ReportedResult],
) -> Result<(), LabError> {
    let mut candidates = Vec::with_capacity(results.len());
    for r in results {
        match candidate(lab, r) {
            Ok(c) => candidates.push(c),
            // The tube and kit were checked when the message was applied; a kit
            // removed from the config since is the one way here.
            Err(e) => warn!(analyser, message = id, tube = %r.barcode, error = %e,
                "A reported result cannot be staged for review; it stays on its tube."),
        }
    }
    let outcome = crate::review::stage(
        lab,
        Actor {
            user: format!("analyser:{analyser}"),
            reason: Some(format!("results of analyser message {id}")),
        },
        candidates,
        Vec::new(),
        None,
    )
    .await?;
    lab.store()
        .trees()
        .messages
        .remove(to_stage_key(id))
        .map_err(StoreError::from)?;
    lab.store().durable().await?;
    info!(analyser, message = id, outcome = ?outcome, "Analyser results staged for review.");
    Ok(())
}

/// Stages every message applied but not yet staged (a crash in between).
pub(super) async fn stage_pending(lab: &Arc<Lab>) -> Result<usize, LabError> {
    let trees = lab.store().trees();
    let mut ids = Vec::new();
    for item in trees.messages.scan_prefix([b'v']) {
        let (key, _) = item.map_err(StoreError::from)?;
        if let Some(id) = key.get(1..9).and_then(|b| b.try_into().ok()) {
            ids.push(u64::from_be_bytes(id));
        }
    }
    for &id in &ids {
        let results = super::store::reported_for_message(lab.store(), id)?;
        let analyser = results
            .first()
            .map(|r| r.source.instrument.clone())
            .unwrap_or_default();
        stage_message(lab, &analyser, id, &results).await?;
    }
    Ok(ids.len())
}
