//! The review API (issue 7): results awaiting a decision, the decisions, the rerun
//! list, due times and turnaround. Compiled as a child of `crate::api` (see its
//! `#[path]` line) so that it uses the API's caller, error and body types.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, ApiResult, AppState, Caller, JsonBody, OptionalJson, in_range};
use crate::config::Role;
use crate::lab::LabError;
use crate::review::due::{self, DueView, PlateTat, TubeTat};
use crate::review::{Candidate, CandidateState, Decision, RerunEntry};

/// Query of `GET /api/v1/results`.
#[derive(Debug, Deserialize, IntoParams)]
pub struct ResultsQuery {
    /// awaiting_review, released, rerun_requested, rejected or preliminary
    /// (called early, the run still going) (default: every state).
    pub state: Option<String>,
    /// At most this many (default 100).
    #[param(minimum = 1, maximum = 10000)]
    pub limit: Option<u32>,
}

/// Query of the due and rerun lists.
#[derive(Debug, Deserialize, IntoParams)]
pub struct LimitQuery {
    /// At most this many (default 100).
    #[param(minimum = 1, maximum = 10000)]
    pub limit: Option<u32>,
}

/// A result candidate with its tube's due status.
#[derive(Debug, Serialize, ToSchema)]
pub struct ResultView {
    #[serde(flatten)]
    pub candidate: Candidate,
    pub tested_at: String,
    pub staged_at: String,
    /// past_due, at_risk, on_time, no_due_time, done.
    pub due_status: String,
    pub due_at: Option<String>,
}

/// One result with its released versions and its tube's turnaround.
#[derive(Debug, Serialize, ToSchema)]
pub struct ResultDetail {
    #[serde(flatten)]
    pub result: ResultView,
    pub tat: TubeTat,
}

/// Body of release (optional).
#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    /// Noted in the audit trail.
    pub reason: Option<String>,
}

/// Body of rerun and reject.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DecisionRequest {
    /// Why (required).
    pub reason: String,
}

/// Body of correct.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CorrectionRequest {
    /// Why the released result is corrected (required; sent as correction_reason).
    pub reason: String,
    /// The corrected interpretation (positive, negative, inconclusive, invalid);
    /// unchanged when absent.
    pub interpretation: Option<String>,
}

/// An entry of the rerun list.
#[derive(Debug, Serialize, ToSchema)]
pub struct RerunView {
    #[serde(flatten)]
    pub entry: RerunEntry,
    pub requested_at: String,
    pub due_status: String,
    pub due_at: Option<String>,
}

fn view(
    lab: &crate::lab::Lab,
    c: Candidate,
    reviews: &std::collections::HashMap<String, due::TubeReview>,
    now: i64,
) -> ((due::DueStatus, i64), ResultView) {
    let (status, due_ms) = due::tube_status(lab, &c.tube, reviews, now);
    let key = due::sort_key(status, due_ms);
    (
        key,
        ResultView {
            tested_at: crate::outbox::rfc3339_ms(c.tested_at_ms),
            staged_at: crate::outbox::rfc3339_ms(c.staged_at_ms),
            due_status: status.as_str().to_owned(),
            due_at: due_ms.map(crate::outbox::rfc3339_ms),
            candidate: c,
        },
    )
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, LabError> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(ApiError::from)
}

/// Result candidates: tubes past their due time first, then those at risk, then by
/// due time; within that, oldest staged first.
#[utoipa::path(get, path = "/api/v1/results", tag = "results", params(ResultsQuery),
    responses((status = 200, body = Vec<ResultView>)))]
pub(super) async fn list_results(
    State(state): State<AppState>,
    _caller: Caller,
    Query(q): Query<ResultsQuery>,
) -> ApiResult<Json<Vec<ResultView>>> {
    let limit = in_range("limit", q.limit.map(u64::from), 1, 10_000)?.unwrap_or(100) as usize;
    let filter = match q.state.as_deref() {
        None => None,
        Some(text) => Some(CandidateState::parse(text).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                format!(
                    "state {text:?} is not one of awaiting_review, released, rerun_requested, rejected"
                ),
            )
        })?),
    };
    let lab = Arc::clone(&state.lab);
    blocking(move || {
        let (rows, reviews) = match filter {
            // One state: its candidates from the index, and the other candidates of
            // their tubes only (for each tube's due status).
            Some(wanted) => {
                let rows = crate::review::candidates(&lab, Some(wanted))?;
                let mut tubes: Vec<&str> = rows.iter().map(|c| c.tube.as_str()).collect();
                tubes.sort_unstable();
                tubes.dedup();
                let mut related = Vec::new();
                for tube in tubes {
                    related.extend(crate::review::candidates_of_tube(&lab, tube)?);
                }
                let reviews = due::by_tube(&related);
                (rows, reviews)
            }
            None => {
                let all = crate::review::candidates(&lab, None)?;
                let reviews = due::by_tube(&all);
                (all, reviews)
            }
        };
        let now = crate::outbox::now_ms();
        let mut rows: Vec<_> = rows
            .into_iter()
            .map(|c| {
                let staged = c.staged_at_ms;
                let (key, v) = view(&lab, c, &reviews, now);
                ((key, staged), v)
            })
            .collect();
        rows.sort_by_key(|a| a.0);
        Ok(Json(rows.into_iter().take(limit).map(|(_, v)| v).collect()))
    })
    .await
}

/// One result candidate with its released versions and its tube's turnaround.
#[utoipa::path(get, path = "/api/v1/results/{result_id}", tag = "results",
    params(("result_id" = String, Path, description = "The result id (lab-run-well-tube)")),
    responses((status = 200, body = ResultDetail), (status = 404, body = crate::api::dto::ErrorBody)))]
pub(super) async fn get_result(
    State(state): State<AppState>,
    _caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<ResultDetail>> {
    check_id(&id)?;
    let lab = Arc::clone(&state.lab);
    blocking(move || detail(&lab, &id)).await.map(Json)
}

/// A result id is built from the lab id, run id, well and barcode: letters, digits,
/// '-', '_' and '.'. Anything else cannot name a result: 422 rather than 404.
fn check_id(id: &str) -> ApiResult<()> {
    let well_formed = !id.is_empty()
        && id.len() <= crate::outbox::MAX_RESULT_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if well_formed {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            format!(
                "{:?} is not a result id (lab-run-well-tube: letters, digits, '-', '_', '.')",
                id.chars().take(140).collect::<String>()
            ),
        ))
    }
}

fn detail(lab: &crate::lab::Lab, id: &str) -> Result<ResultDetail, LabError> {
    let c = crate::review::load_candidate(lab, id)?.ok_or_else(|| LabError::NotFound {
        message: format!("no result {id}"),
    })?;
    let now = crate::outbox::now_ms();
    let mine = crate::review::candidates_of_tube(lab, &c.tube)?;
    let reviews = due::by_tube(&mine);
    let tat = due::tube_tat(lab, &c.tube, now)?;
    let (_, result) = view(lab, c, &reviews, now);
    Ok(ResultDetail { result, tat })
}

async fn decided(
    state: &AppState,
    caller: &Caller,
    id: String,
    decision: Decision,
    reason: Option<String>,
) -> ApiResult<Json<ResultDetail>> {
    caller.require(&[Role::Reviewer], "deciding on results")?;
    check_id(&id)?;
    let name = match &decision {
        Decision::Release => "released",
        Decision::Rerun { .. } => "sent for a rerun",
        Decision::Reject { .. } => "rejected",
        Decision::Correct { .. } => "corrected",
    };
    let c = crate::review::decide(&state.lab, caller.actor(reason), id, decision).await?;
    tracing::info!(result = %c.result_id, tube = %c.tube, plate = %c.plate, run = %c.run, user = %caller.user, "Result {name}.");
    let lab = Arc::clone(&state.lab);
    blocking(move || detail(&lab, &c.result_id)).await.map(Json)
}

/// Release a result awaiting review as final (reviewer or admin). The result
/// version and its outbox entry are written with the decision, in one transaction.
#[utoipa::path(post, path = "/api/v1/results/{result_id}/release", tag = "results", request_body = ReleaseRequest,
    params(("result_id" = String, Path, description = "The result id")),
    responses((status = 200, body = ResultDetail), (status = 404, body = crate::api::dto::ErrorBody),
        (status = 409, body = crate::api::dto::ErrorBody, description = "Not awaiting review, or its plate is invalid")))]
pub(super) async fn release_result(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    OptionalJson(body): OptionalJson<ReleaseRequest>,
) -> ApiResult<Json<ResultDetail>> {
    decided(&state, &caller, id, Decision::Release, body.reason).await
}

/// Send a result awaiting review back for a rerun (reviewer or admin): the tube
/// goes back into the plating queue, first; nothing is released.
#[utoipa::path(post, path = "/api/v1/results/{result_id}/rerun", tag = "results", request_body = DecisionRequest,
    params(("result_id" = String, Path, description = "The result id")),
    responses((status = 200, body = ResultDetail), (status = 404, body = crate::api::dto::ErrorBody),
        (status = 409, body = crate::api::dto::ErrorBody, description = "Not awaiting review")))]
pub(super) async fn rerun_result(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<DecisionRequest>,
) -> ApiResult<Json<ResultDetail>> {
    let reason = body.reason.clone();
    decided(
        &state,
        &caller,
        id,
        Decision::Rerun {
            reason: body.reason,
        },
        Some(reason),
    )
    .await
}

/// Reject a result awaiting review with a reason (reviewer or admin): nothing is
/// released and the tube is not rerun.
#[utoipa::path(post, path = "/api/v1/results/{result_id}/reject", tag = "results", request_body = DecisionRequest,
    params(("result_id" = String, Path, description = "The result id")),
    responses((status = 200, body = ResultDetail), (status = 404, body = crate::api::dto::ErrorBody),
        (status = 409, body = crate::api::dto::ErrorBody, description = "Not awaiting review")))]
pub(super) async fn reject_result(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<DecisionRequest>,
) -> ApiResult<Json<ResultDetail>> {
    let reason = body.reason.clone();
    decided(
        &state,
        &caller,
        id,
        Decision::Reject {
            reason: body.reason,
        },
        Some(reason),
    )
    .await
}

/// Correct a released result (reviewer or admin): a new version with status
/// corrected and the reason, never an overwrite.
#[utoipa::path(post, path = "/api/v1/results/{result_id}/correct", tag = "results", request_body = CorrectionRequest,
    params(("result_id" = String, Path, description = "The result id")),
    responses((status = 200, body = ResultDetail), (status = 404, body = crate::api::dto::ErrorBody),
        (status = 409, body = crate::api::dto::ErrorBody, description = "Not released")))]
pub(super) async fn correct_result(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<CorrectionRequest>,
) -> ApiResult<Json<ResultDetail>> {
    let reason = body.reason.clone();
    decided(
        &state,
        &caller,
        id,
        Decision::Correct {
            reason: body.reason,
            interpretation: body.interpretation,
        },
        Some(reason),
    )
    .await
}

/// The rerun list: tubes to test again (inconclusive, retest, invalid, a failed
/// plate, a reviewer's request) and positive pools whose members are to be tested.
/// Past due and at risk first.
#[utoipa::path(get, path = "/api/v1/reruns", tag = "results", params(LimitQuery),
    responses((status = 200, body = Vec<RerunView>)))]
pub(super) async fn list_reruns(
    State(state): State<AppState>,
    _caller: Caller,
    Query(q): Query<LimitQuery>,
) -> ApiResult<Json<Vec<RerunView>>> {
    let limit = in_range("limit", q.limit.map(u64::from), 1, 10_000)?.unwrap_or(100) as usize;
    let lab = Arc::clone(&state.lab);
    blocking(move || {
        let all = crate::review::candidates(&lab, None)?;
        let reviews = due::by_tube(&all);
        let now = crate::outbox::now_ms();
        let mut rows: Vec<_> = crate::review::reruns(&lab)?
            .into_iter()
            .map(|entry| {
                let (status, due_ms) = due::tube_status(&lab, &entry.tube, &reviews, now);
                (
                    (due::sort_key(status, due_ms), entry.requested_at_ms),
                    RerunView {
                        requested_at: crate::outbox::rfc3339_ms(entry.requested_at_ms),
                        due_status: status.as_str().to_owned(),
                        due_at: due_ms.map(crate::outbox::rfc3339_ms),
                        entry,
                    },
                )
            })
            .collect();
        rows.sort_by_key(|a| a.0);
        Ok(Json(rows.into_iter().take(limit).map(|(_, v)| v).collect()))
    })
    .await
}

/// Tubes without a released result, past due first, then at risk, then by due time.
#[utoipa::path(get, path = "/api/v1/tubes/due", tag = "results", params(LimitQuery),
    responses((status = 200, body = Vec<DueView>)))]
pub(super) async fn tubes_due(
    State(state): State<AppState>,
    _caller: Caller,
    Query(q): Query<LimitQuery>,
) -> ApiResult<Json<Vec<DueView>>> {
    let limit = in_range("limit", q.limit.map(u64::from), 1, 10_000)?.unwrap_or(100) as usize;
    let lab = Arc::clone(&state.lab);
    blocking(move || {
        Ok(Json(
            due::due_tubes(&lab, crate::outbox::now_ms(), limit)?.0,
        ))
    })
    .await
}

/// A tube's turnaround: the time of every step and how long each took.
#[utoipa::path(get, path = "/api/v1/tubes/{barcode}/tat", tag = "results",
    params(("barcode" = String, Path, description = "Tube barcode")),
    responses((status = 200, body = TubeTat), (status = 404, body = crate::api::dto::ErrorBody)))]
pub(super) async fn tube_tat(
    State(state): State<AppState>,
    _caller: Caller,
    Path(barcode): Path<String>,
) -> ApiResult<Json<TubeTat>> {
    let lab = Arc::clone(&state.lab);
    blocking(move || due::tube_tat(&lab, &barcode, crate::outbox::now_ms()))
        .await
        .map(Json)
}

/// A plate's turnaround: created, sealed, first result staged, last released, and
/// the median receipt-to-release time of its tubes.
#[utoipa::path(get, path = "/api/v1/plates/{id}/tat", tag = "results",
    params(("id" = String, Path, description = "Plate id")),
    responses((status = 200, body = PlateTat), (status = 404, body = crate::api::dto::ErrorBody)))]
pub(super) async fn plate_tat(
    State(state): State<AppState>,
    _caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<PlateTat>> {
    let lab = Arc::clone(&state.lab);
    blocking(move || due::plate_tat(&lab, &id)).await.map(Json)
}
