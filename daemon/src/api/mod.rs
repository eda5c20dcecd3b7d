//! The HTTP API under /api/v1, with its OpenAPI document generated from the handlers.
//!
//! Every error is a JSON [`dto::ErrorBody`], including those axum produces itself
//! (malformed JSON, oversized bodies, unknown routes). Every 2xx to a change is sent
//! only after the store's durability barrier (see `Lab::change`).

pub mod dto;
/// Review and release (issue 7); the file lives with `crate::review`.
#[path = "../review/http.rs"]
pub mod review;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::config::{Role, User};
use crate::instruments::Instruments;
use crate::lab::{Actor, AuditQuery, Due, Lab, LabError, TubeIntake};
use dto::*;

/// Shared state of the API.
#[derive(Clone, Debug)]
pub struct AppState {
    pub lab: Arc<Lab>,
    pub instruments: Arc<Instruments>,
    pub folders: Arc<crate::folders::Folders>,
    pub analysers: Arc<crate::analysers::Analysers>,
    pub panel: Arc<crate::panel::Panel>,
    users: Arc<Vec<User>>,
    metrics: Arc<HttpMetrics>,
}

#[derive(Debug, Default)]
struct HttpMetrics {
    by_class: [AtomicU64; 6],
    /// From request to response, acknowledgement barrier included.
    duration: crate::metrics::Histogram,
}

/// An error as the API reports it.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    problems: Vec<String>,
    /// Set when the failure shows the store is damaged (see [`StoreDamage`]).
    damage: Option<String>,
}

/// Marks a response whose request ran into a damaged store. The `stop_on_damage`
/// middleware, which can reach the store, stops it from acknowledging anything more;
/// the daemon then shuts down with the store's exit code.
#[derive(Clone, Debug)]
struct StoreDamage(String);

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            problems: Vec::new(),
            damage: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                status: self.status.as_u16(),
                code: self.code.into(),
                message: self.message,
                problems: self.problems,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(why) = self.damage {
            response.extensions_mut().insert(StoreDamage(why));
        }
        response
    }
}

impl From<LabError> for ApiError {
    fn from(e: LabError) -> ApiError {
        match e {
            LabError::Invalid { message, problems } => ApiError {
                problems,
                ..ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message)
            },
            LabError::NotFound { message } => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
            }
            LabError::Conflict { message, problems } => ApiError {
                problems,
                ..ApiError::new(StatusCode::CONFLICT, "conflict", message)
            },
            LabError::Store(e) => {
                tracing::error!(error = %e, "Store failure; the request was not acknowledged.");
                ApiError {
                    damage: e.is_damage().then(|| e.to_string()),
                    ..ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "store_failure",
                        format!("the store failed and nothing was acknowledged: {e}"),
                    )
                }
            }
        }
    }
}

/// A request body that must be a JSON object of type `T`.
///
/// Stricter than `axum::Json`: serde would also read a struct from a JSON array
/// (`[null, null]`), which no client means; here that is a 422.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

/// Like [`JsonBody`], but an empty body means `T::default()`: for actions whose body
/// fields are all optional (seal, transfer).
#[derive(Debug)]
pub struct OptionalJson<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let (is_json, bytes) = read_body(req, state).await?;
        parse_object(is_json, &bytes).map(JsonBody)
    }
}

impl<S, T> FromRequest<S> for OptionalJson<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned + Default,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let (is_json, bytes) = read_body(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(T::default()));
        }
        parse_object(is_json, &bytes).map(OptionalJson)
    }
}

/// The body (within the configured limit) and whether it was declared as JSON.
async fn read_body<S: Send + Sync>(
    req: Request,
    state: &S,
) -> Result<(bool, axum::body::Bytes), ApiError> {
    let is_json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| {
            let mime = mime.trim();
            mime.eq_ignore_ascii_case("application/json")
                || (mime.starts_with("application/") && mime.ends_with("+json"))
        });
    let bytes = axum::body::Bytes::from_request(req, state)
        .await
        .map_err(|r| ApiError::new(r.status(), error_code(r.status()), r.body_text()))?;
    Ok((is_json, bytes))
}

fn parse_object<T: serde::de::DeserializeOwned>(
    is_json: bool,
    bytes: &[u8],
) -> Result<T, ApiError> {
    if !is_json {
        let status = StatusCode::UNSUPPORTED_MEDIA_TYPE;
        return Err(ApiError::new(
            status,
            error_code(status),
            "the body must be sent with Content-Type: application/json",
        ));
    }
    let invalid = |message: String| {
        let status = StatusCode::UNPROCESSABLE_ENTITY;
        ApiError::new(status, error_code(status), message)
    };
    // serde reads a struct from a JSON array too; the first byte tells them apart
    // without parsing the body twice.
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|b| *b != b'{')
        && serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
    {
        return Err(invalid("the body must be a JSON object".into()));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        if e.is_data() {
            invalid(format!("the body does not fit this request: {e}"))
        } else {
            let status = StatusCode::BAD_REQUEST;
            ApiError::new(
                status,
                "malformed_json",
                format!("the body is not valid JSON: {e}"),
            )
        }
    })
}

/// The authenticated caller, from `Authorization: Bearer <token>`.
#[derive(Clone, Debug)]
pub struct Caller {
    pub user: String,
    pub role: Role,
}

impl Caller {
    fn require(&self, allowed: &[Role], action: &str) -> Result<(), ApiError> {
        if self.role == Role::Admin || allowed.contains(&self.role) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "user {} has role {}; {action} needs {}",
                    self.user,
                    self.role,
                    allowed
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(" or ")
                ),
            ))
        }
    }

    fn lab_work(&self, action: &str) -> Result<(), ApiError> {
        self.require(&[Role::Technician], action)
    }

    fn actor(&self, reason: Option<String>) -> Actor {
        Actor {
            user: self.user.clone(),
            reason: reason.filter(|r| !r.trim().is_empty()),
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let unauthorized = |message: &str| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                message.to_string(),
            )
        };
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("missing Authorization: Bearer <token> header"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <token>`"))?;
        state
            .users
            .iter()
            .find(|u| constant_time_eq(u.token.as_bytes(), token.as_bytes()))
            .map(|u| Caller {
                user: u.name.clone(),
                role: u.role,
            })
            .ok_or_else(|| unauthorized("unknown token"))
    }
}

/// Compares tokens without an early exit, so response time does not reveal how much of
/// a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "pcrd API",
        description = "Tube and plate tracking for PCR testing labs. Authenticate with `Authorization: Bearer <token>`; every error is a JSON body with `error.code` and `error.message`."
    ),
    modifiers(&BearerAuth),
    components(schemas(ErrorBody)),
    security(("bearer" = [])),
    tags((name = "tubes"), (name = "plates"), (name = "audit"), (name = "kits"), (name = "instruments"), (name = "outbox"), (name = "folders"), (name = "analysers"), (name = "runs"), (name = "results"))
)]
struct ApiDoc;

#[derive(Debug)]
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Documents the errors every operation can answer, whatever its handler: a malformed
/// request, a missing token, a wrong role, an oversized or non-JSON body, a failed store.
#[derive(Debug)]
struct StandardErrors;

impl Modify for StandardErrors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let error = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        for item in openapi.paths.paths.values_mut() {
            let reads = item.get.iter_mut().map(|op| (op, false));
            let writes = item.post.iter_mut().map(|op| (op, true));
            for (operation, write) in reads.chain(writes) {
                let responses = &mut operation.responses.responses;
                let mut add = |code: &str, description: &str| {
                    responses
                        .entry(code.to_string())
                        .or_insert_with(|| error(description).into());
                };
                add(
                    "400",
                    "Malformed request (JSON syntax, query string or path)",
                );
                add("401", "Missing or unknown bearer token");
                add(
                    "422",
                    "The request's content is not acceptable; `problems` lists each issue",
                );
                if write {
                    add("403", "The token's role may not do this");
                    add("413", "Body larger than server.max_body_bytes");
                    add("415", "Body is not application/json");
                    add("503", "The store failed; nothing was acknowledged");
                }
            }
        }
    }
}

/// Builds the router and the OpenAPI document from the same handler list.
pub fn router(
    lab: Arc<Lab>,
    instruments: Arc<Instruments>,
    folders: Arc<crate::folders::Folders>,
    analysers: Arc<crate::analysers::Analysers>,
    panel: Arc<crate::panel::Panel>,
    users: Vec<User>,
    max_body_bytes: usize,
) -> Router {
    let state = AppState {
        lab,
        instruments,
        folders,
        analysers,
        panel,
        users: Arc::new(users),
        metrics: Arc::new(HttpMetrics::default()),
    };
    let (api, openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(receive_tubes, list_waiting))
        .routes(routes!(get_tube))
        .routes(routes!(create_plate, list_plates))
        .routes(routes!(get_plate))
        .routes(routes!(assign))
        .routes(routes!(fill))
        .routes(routes!(unassign))
        .routes(routes!(seal))
        .routes(routes!(transfer))
        .routes(routes!(start_run, list_runs))
        .routes(routes!(get_run))
        .routes(routes!(abort_run))
        .routes(routes!(run_analysis))
        .routes(routes!(combine))
        .routes(routes!(audit))
        .routes(routes!(audit_verify))
        .routes(routes!(kits))
        .routes(routes!(list_instruments))
        .routes(routes!(get_instrument))
        .routes(routes!(outbox_status))
        .routes(routes!(outbox_dead))
        .routes(routes!(outbox_retry))
        .routes(routes!(outbox_delivery))
        .routes(routes!(list_folders))
        .routes(routes!(list_imports))
        .routes(routes!(imported_results))
        .routes(routes!(review::list_results))
        .routes(routes!(review::get_result))
        .routes(routes!(review::release_result))
        .routes(routes!(review::rerun_result))
        .routes(routes!(review::reject_result))
        .routes(routes!(review::correct_result))
        .routes(routes!(review::list_reruns))
        .routes(routes!(review::tubes_due))
        .routes(routes!(review::tube_tat))
        .routes(routes!(review::plate_tat))
        .routes(routes!(list_analysers))
        .routes(routes!(analyser_quarantine))
        .routes(routes!(analyser_unmatched))
        .routes(routes!(analyser_worklist))
        .routes(routes!(tube_reported))
        .routes(routes!(get_panel))
        .routes(routes!(press_panel))
        .split_for_parts();
    // Modifiers in #[openapi] run before the routes add their paths, so this one runs
    // on the finished document.
    let mut openapi = openapi;
    StandardErrors.modify(&mut openapi);
    let openapi = Arc::new(openapi);
    let metrics = Arc::clone(&state.metrics);
    api.route(
        "/api/v1/openapi.json",
        axum::routing::get(move || {
            let doc = Arc::clone(&openapi);
            async move { Json((*doc).clone()) }
        }),
    )
    .route("/healthz", axum::routing::get(healthz))
    .route("/metrics", axum::routing::get(metrics_text))
    .layer(DefaultBodyLimit::max(max_body_bytes))
    .layer(axum::middleware::from_fn(json_errors))
    .layer(axum::middleware::from_fn_with_state(
        state.clone(),
        stop_on_damage,
    ))
    .layer(axum::middleware::from_fn(
        move |req: Request, next: Next| {
            let metrics = Arc::clone(&metrics);
            async move {
                let started = std::time::Instant::now();
                let response = next.run(req).await;
                let class = (response.status().as_u16() / 100).min(5) as usize;
                metrics.by_class[class].fetch_add(1, Ordering::Relaxed);
                metrics.duration.observe(started.elapsed());
                response
            }
        },
    ))
    .layer(tower_http::trace::TraceLayer::new_for_http())
    .with_state(state)
}

type ApiResult<T> = Result<T, ApiError>;

/// The largest integer a JSON client (JavaScript) reads exactly.
const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// Checks a numeric query parameter against the range the API documents.
fn in_range(name: &str, value: Option<u64>, min: u64, max: u64) -> ApiResult<Option<u64>> {
    match value {
        Some(v) if !(min..=max).contains(&v) => {
            let status = StatusCode::UNPROCESSABLE_ENTITY;
            Err(ApiError::new(
                status,
                error_code(status),
                format!("{name} {v} is outside {min}..={max}"),
            ))
        }
        other => Ok(other),
    }
}

/// The stable code for an error status.
fn error_code(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "malformed_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::CONFLICT => "conflict",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid",
        s if s.is_server_error() => "internal",
        _ => "error",
    }
}

/// Stops the store when a request found it damaged (see [`StoreDamage`]).
async fn stop_on_damage(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    if let Some(StoreDamage(why)) = response.extensions().get::<StoreDamage>() {
        state.lab.store().fail(why.clone());
    }
    response
}

/// Turns every error response that is not already JSON (axum's own rejections of a
/// malformed body, query or path, unknown routes, wrong methods) into an
/// [`ErrorBody`], so clients handle one error shape whatever failed.
async fn json_errors(req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    // Rejection texts are one line; the limit only guards against a surprise.
    let text = axum::body::to_bytes(response.into_body(), 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        match status {
            StatusCode::NOT_FOUND => "no such endpoint".to_string(),
            StatusCode::METHOD_NOT_ALLOWED => "method not allowed on this endpoint".to_string(),
            _ => status.canonical_reason().unwrap_or("error").to_string(),
        }
    } else {
        text
    };
    ApiError::new(status, error_code(status), message).into_response()
}

/// Receive tubes (one or a batch; all or nothing).
#[utoipa::path(post, path = "/api/v1/tubes", tag = "tubes", request_body = ReceiveRequest,
    responses(
        (status = 200, description = "Received (or already received identically)", body = ReceiveResponse),
        (status = 409, description = "A barcode was received before with another pool size or priority", body = ErrorBody),
        (status = 422, description = "Invalid tubes; nothing received", body = ErrorBody),
    ))]
#[tracing::instrument(name = "tubes", skip_all, fields(user = %caller.user, action = "receive"))]
async fn receive_tubes(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<ReceiveRequest>,
) -> ApiResult<Json<ReceiveResponse>> {
    caller.lab_work("receiving tubes")?;
    let mut due_problems = Vec::new();
    let intake = body
        .tubes
        .into_iter()
        .enumerate()
        .map(|(i, t)| TubeIntake {
            due: match (t.due_at, t.due_in) {
                (Some(at), None) => Some(Due::At(at)),
                (None, Some(d)) => Some(Due::In(d)),
                (None, None) => None,
                (Some(_), Some(_)) => {
                    due_problems.push(format!("tube {}: give due_at or due_in, not both", i + 1));
                    None
                }
            },
            barcode: t.barcode,
            pool_size: t.pool_size,
            priority: t.priority,
        })
        .collect();
    if !due_problems.is_empty() {
        return Err(LabError::Invalid {
            message: "nothing was received".into(),
            problems: due_problems,
        }
        .into());
    }
    let outcome = state
        .lab
        .receive_tubes(caller.actor(body.reason), intake)
        .await?;
    tracing::info!(
        received = outcome.received.len(),
        retried = outcome.already_received.len(),
        "Tubes received."
    );
    Ok(Json(ReceiveResponse {
        received: outcome.received.iter().map(ToString::to_string).collect(),
        already_received: outcome
            .already_received
            .iter()
            .map(ToString::to_string)
            .collect(),
    }))
}

/// Tubes waiting for a plate, in plating order.
#[utoipa::path(get, path = "/api/v1/tubes", tag = "tubes", params(WaitingQuery),
    responses((status = 200, body = WaitingList)))]
async fn list_waiting(
    State(state): State<AppState>,
    _caller: Caller,
    Query(q): Query<WaitingQuery>,
) -> ApiResult<Json<WaitingList>> {
    let limit = in_range("limit", q.limit.map(u64::from), 1, 100_000)?.unwrap_or(1000);
    let tubes = state.lab.waiting(limit as usize)?;
    Ok(Json(WaitingList {
        tubes: tubes.iter().map(TubeView::from).collect(),
        total_waiting: state.lab.waiting_count(),
    }))
}

/// Look a tube up by barcode.
#[utoipa::path(get, path = "/api/v1/tubes/{barcode}", tag = "tubes",
    params(("barcode" = String, Path, description = "Tube barcode")),
    responses((status = 200, body = TubeView), (status = 404, body = ErrorBody)))]
async fn get_tube(
    State(state): State<AppState>,
    _caller: Caller,
    Path(barcode): Path<String>,
) -> ApiResult<Json<TubeView>> {
    Ok(Json(TubeView::from(&state.lab.tube(&barcode)?)))
}

/// Create an extraction plate with the kit's controls.
#[utoipa::path(post, path = "/api/v1/plates", tag = "plates", request_body = CreatePlateRequest,
    responses((status = 201, body = PlateView), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
#[tracing::instrument(name = "plate", skip_all, fields(user = %caller.user, action = "create"))]
async fn create_plate(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<CreatePlateRequest>,
) -> ApiResult<(StatusCode, Json<PlateView>)> {
    caller.lab_work("creating plates")?;
    let plate = state
        .lab
        .create_plate(caller.actor(body.reason), body.kit, body.format, body.id)
        .await?;
    tracing::info!(plate = %plate.id, "Plate created.");
    Ok((StatusCode::CREATED, Json(PlateView::from(&plate))))
}

/// All plates, oldest first.
#[utoipa::path(get, path = "/api/v1/plates", tag = "plates", responses((status = 200, body = Vec<PlateSummary>)))]
async fn list_plates(
    State(state): State<AppState>,
    _caller: Caller,
) -> ApiResult<Json<Vec<PlateSummary>>> {
    let mut plates = state.lab.plates()?;
    plates.sort_by_key(|p| p.created_at);
    Ok(Json(
        plates
            .iter()
            .map(|p| {
                let view = PlateView::from(p);
                PlateSummary {
                    id: view.id,
                    kind: view.kind,
                    kit: format!("{}@{}", view.kit, view.kit_version),
                    format: view.format,
                    state: view.state,
                    samples: view.samples,
                    created_at: view.created_at,
                }
            })
            .collect(),
    ))
}

/// A plate with its wells.
#[utoipa::path(get, path = "/api/v1/plates/{id}", tag = "plates",
    params(("id" = String, Path, description = "Plate id")),
    responses((status = 200, body = PlateView), (status = 404, body = ErrorBody)))]
async fn get_plate(
    State(state): State<AppState>,
    _caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<PlateView>> {
    Ok(Json(PlateView::from(&state.lab.plate(&id)?)))
}

fn wells_changed(
    plate: String,
    wells: Vec<(pcrd_protocol::domain::Well, pcrd_protocol::domain::Barcode)>,
) -> WellsChanged {
    WellsChanged {
        plate,
        wells: wells
            .into_iter()
            .map(|(well, barcode)| PlacementIn {
                well: well.to_string(),
                barcode: barcode.to_string(),
            })
            .collect(),
    }
}

/// Put tubes on an open plate, automatically in fill order or in named wells.
#[utoipa::path(post, path = "/api/v1/plates/{id}/assign", tag = "plates", request_body = AssignRequest,
    params(("id" = String, Path, description = "Plate id")),
    responses((status = 200, body = WellsChanged), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
#[tracing::instrument(name = "plate", skip_all, fields(plate = %id, user = %caller.user, action = "assign"))]
async fn assign(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<AssignRequest>,
) -> ApiResult<Json<WellsChanged>> {
    caller.lab_work("assigning tubes")?;
    let placements = body
        .placements
        .into_iter()
        .map(|p| (p.well, p.barcode))
        .collect();
    let placed = state
        .lab
        .assign(
            caller.actor(body.reason),
            id.clone(),
            body.tubes,
            placements,
        )
        .await?;
    tracing::info!(placed = placed.len(), "Tubes assigned.");
    Ok(Json(wells_changed(id, placed)))
}

/// Fill an open plate's free wells from the tubes waiting (urgent and due-soonest first).
#[utoipa::path(post, path = "/api/v1/plates/{id}/fill", tag = "plates", request_body = FillRequest,
    params(("id" = String, Path, description = "Plate id")),
    responses((status = 200, body = WellsChanged), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
#[tracing::instrument(name = "plate", skip_all, fields(plate = %id, user = %caller.user, action = "fill"))]
async fn fill(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<FillRequest>,
) -> ApiResult<Json<WellsChanged>> {
    caller.lab_work("filling plates")?;
    let placed = state
        .lab
        .fill(caller.actor(body.reason), id.clone(), body.max)
        .await?;
    tracing::info!(placed = placed.len(), "Plate filled.");
    Ok(Json(wells_changed(id, placed)))
}

/// Take samples off an open plate; their tubes wait for a plate again.
#[utoipa::path(post, path = "/api/v1/plates/{id}/unassign", tag = "plates", request_body = UnassignRequest,
    params(("id" = String, Path, description = "Plate id")),
    responses((status = 200, body = WellsChanged), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
#[tracing::instrument(name = "plate", skip_all, fields(plate = %id, user = %caller.user, action = "unassign"))]
async fn unassign(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<UnassignRequest>,
) -> ApiResult<Json<WellsChanged>> {
    caller.lab_work("removing tubes from plates")?;
    let removed = state
        .lab
        .unassign(caller.actor(body.reason), id.clone(), body.wells)
        .await?;
    tracing::info!(removed = removed.len(), "Tubes removed from plate.");
    Ok(Json(wells_changed(id, removed)))
}

/// Seal an open plate: its contents are fixed.
#[utoipa::path(post, path = "/api/v1/plates/{id}/seal", tag = "plates", request_body = ReasonRequest,
    params(("id" = String, Path, description = "Plate id")),
    responses((status = 200, body = PlateView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
#[tracing::instrument(name = "plate", skip_all, fields(plate = %id, user = %caller.user, action = "seal"))]
async fn seal(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    OptionalJson(body): OptionalJson<ReasonRequest>,
) -> ApiResult<Json<PlateView>> {
    caller.lab_work("sealing plates")?;
    let reason = body.reason;
    let plate = state.lab.seal(caller.actor(reason), id).await?;
    tracing::info!("Plate sealed.");
    Ok(Json(PlateView::from(&plate)))
}

/// Transfer a sealed extraction plate 1:1 to a new PCR plate.
#[utoipa::path(post, path = "/api/v1/plates/{id}/transfer", tag = "plates", request_body = TransferRequest,
    params(("id" = String, Path, description = "Source extraction plate")),
    responses((status = 201, body = PlateView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
#[tracing::instrument(name = "plate", skip_all, fields(plate = %id, user = %caller.user, action = "transfer"))]
async fn transfer(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    OptionalJson(body): OptionalJson<TransferRequest>,
) -> ApiResult<(StatusCode, Json<PlateView>)> {
    caller.lab_work("transferring plates")?;
    let pcr = state
        .lab
        .transfer(caller.actor(body.reason), id.clone(), body.id)
        .await?;
    tracing::info!(pcr_plate = %pcr.id, "Plate transferred.");
    Ok((StatusCode::CREATED, Json(PlateView::from(&pcr))))
}

/// Combine four sealed 96-well extraction plates into one 384-well PCR plate by quadrant.
#[utoipa::path(post, path = "/api/v1/plates/combine", tag = "plates", request_body = CombineRequest,
    responses((status = 201, body = PlateView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
#[tracing::instrument(name = "plate", skip_all, fields(plates = ?body.sources, user = %caller.user, action = "combine"))]
async fn combine(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<CombineRequest>,
) -> ApiResult<(StatusCode, Json<PlateView>)> {
    caller.lab_work("combining plates")?;
    let pcr = state
        .lab
        .combine(caller.actor(body.reason), body.sources, body.id)
        .await?;
    tracing::info!(pcr_plate = %pcr.id, "Plates combined by quadrant.");
    Ok((StatusCode::CREATED, Json(PlateView::from(&pcr))))
}

/// The audit trail: who did what, when and why.
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit", params(AuditParams),
    responses((status = 200, body = Vec<AuditEntryView>), (status = 422, body = ErrorBody)))]
async fn audit(
    State(state): State<AppState>,
    _caller: Caller,
    Query(q): Query<AuditParams>,
) -> ApiResult<Json<Vec<AuditEntryView>>> {
    let entries = state.lab.audit(&AuditQuery {
        plate: q.plate,
        tube: q.tube,
        before: in_range("before", q.before, 1, MAX_SAFE_INTEGER)?,
        limit: in_range("limit", q.limit.map(u64::from), 1, 10_000)?.unwrap_or(1000) as usize,
    })?;
    Ok(Json(entries.iter().map(AuditEntryView::from).collect()))
}

/// Check the audit trail's hash chain end to end.
#[utoipa::path(get, path = "/api/v1/audit/verify", tag = "audit", responses((status = 200, body = AuditVerifyView)))]
async fn audit_verify(
    State(state): State<AppState>,
    _caller: Caller,
) -> ApiResult<Json<AuditVerifyView>> {
    let v = state.lab.verify_audit()?;
    Ok(Json(AuditVerifyView {
        entries: v.entries,
        intact: v.first_broken.is_none(),
        first_broken: v.first_broken,
    }))
}

/// The kits this daemon knows.
#[utoipa::path(get, path = "/api/v1/kits", tag = "kits", responses((status = 200, body = Vec<KitView>)))]
async fn kits(State(state): State<AppState>, _caller: Caller) -> Json<Vec<KitView>> {
    Json(
        state
            .lab
            .kits()
            .all()
            .map(|k| KitView {
                id: k.id.to_string(),
                version: k.version.clone(),
                name: k.name.clone(),
                formats: k.formats().map(u16::from).collect(),
                targets: k
                    .targets()
                    .iter()
                    .map(|t| KitTargetView {
                        name: t.name.clone(),
                        channel: t.channel.clone(),
                        kind: t.kind.to_string(),
                        cutoff: t.cutoff.to_string(),
                        loinc: t.loinc.clone(),
                    })
                    .collect(),
                result_loinc: k.result_loinc().to_owned(),
            })
            .collect(),
    )
}

/// The instruments the daemon follows (`[[extractors]]` in the config), with their
/// connection, last status and run. Runs are started on the instrument; starting
/// them from the API comes with plate linkage.
#[utoipa::path(get, path = "/api/v1/instruments", tag = "instruments",
    responses((status = 200, body = Vec<InstrumentView>)))]
async fn list_instruments(
    State(state): State<AppState>,
    _caller: Caller,
) -> Json<Vec<InstrumentView>> {
    let mut all: Vec<InstrumentView> = state.instruments.all().map(instrument_view).collect();
    if let Some(cyclers) = state.instruments.cyclers() {
        all.extend(cyclers.all().map(cycler_view));
    }
    Json(all)
}

/// One instrument by its configured name.
#[utoipa::path(get, path = "/api/v1/instruments/{name}", tag = "instruments",
    params(("name" = String, Path, description = "The instrument's name in the config")),
    responses(
        (status = 200, body = InstrumentView),
        (status = 404, description = "No instrument of that name", body = ErrorBody),
    ))]
async fn get_instrument(
    State(state): State<AppState>,
    _caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<InstrumentView>> {
    state
        .instruments
        .get(&name)
        .map(|i| Json(instrument_view(i)))
        .or_else(|| {
            let cyclers = state.instruments.cyclers()?;
            cyclers.get(&name).map(|c| Json(cycler_view(c)))
        })
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no instrument {name:?} in the config"),
            )
        })
}

fn instrument_view(instrument: &crate::instruments::Instrument) -> InstrumentView {
    use crate::instruments::{Connection, Run, state_name};
    let s = instrument.snapshot();
    let time = |t: std::time::SystemTime| humantime::format_rfc3339_millis(t).to_string();
    let error = |e: &pcrd_protocol::extractor::DeviceError| DeviceErrorView {
        code: e.code,
        reason: e.reason.clone(),
    };
    let run = |r: &Run| InstrumentRunView {
        protocol: r.protocol,
        plate_barcode: r.plate_barcode.clone(),
        state: state_name(r.state),
        step: r.step,
        progress: finite(r.progress),
        remaining_s: finite(r.remaining_s),
        seen_at: time(r.seen_at),
        ended_at: r.ended_at.map(time),
        outcome: r.outcome.map(|o| o.as_str().to_owned()),
        error: r.error.as_ref().map(error),
        stalled: r.stalled,
        anomalies: r.anomalies.clone(),
    };
    InstrumentView {
        name: s.name,
        kind: "extractor".into(),
        unit: s.unit,
        profile: s.profile,
        profile_version: s.profile_version,
        link: s.link,
        online: s.tracked.connection == Connection::Online,
        connection: s.tracked.connection.as_str().into(),
        offline_reason: s.tracked.reason.clone(),
        since: time(s.tracked.since),
        status: s.status.as_ref().map(|st| InstrumentStatusView {
            state: state_name(st.state),
            step: st.step,
            progress: finite(st.progress),
            remaining_s: finite(st.remaining_s),
            temperature_c: finite(st.temperature_c),
            protocol: st.protocol,
            plate_barcode: st.barcode.clone(),
            error: st.error.as_ref().map(error),
            anomalies: st
                .anomalies
                .iter()
                .map(crate::instruments::describe)
                .collect(),
        }),
        run: s.tracked.run.as_ref().map(run),
        last_run: s.tracked.last_run.as_ref().map(run),
        polls: s.polls,
        poll_errors: s.poll_errors,
        reconnects: s.reconnects,
        cycler: None,
        state: if s.tracked.connection != Connection::Online {
            "offline"
        } else if s.status.as_ref().is_some_and(|st| st.error.is_some()) {
            "error"
        } else if s.tracked.run.is_some() {
            "running"
        } else {
            "idle"
        }
        .to_owned(),
        state_reason: if s.tracked.connection != Connection::Online {
            s.tracked.reason.clone()
        } else {
            s.status.as_ref().and_then(|st| st.error.as_ref()).map(|e| {
                format!(
                    "device error {}: {}",
                    e.code,
                    e.reason.as_deref().unwrap_or("no reason given")
                )
            })
        },
    }
}

// ----- cyclers and PCR runs (issue 5; crate::cyclers) -----

fn cycler_view(cycler: &crate::cyclers::Cycler) -> InstrumentView {
    use crate::cyclers::Link;
    let s = cycler.link_state();
    let run = cycler.active_run();
    let time = |t: std::time::SystemTime| humantime::format_rfc3339_millis(t).to_string();
    let device = s.status.as_ref();
    InstrumentView {
        name: cycler.name.clone(),
        kind: "cycler".into(),
        unit: 0,
        profile: cycler.dialect.clone(),
        profile_version: String::new(),
        link: cycler.link_name.clone(),
        online: s.link == Link::Online,
        connection: s.link.as_str().into(),
        offline_reason: s.reason.clone(),
        since: time(s.since),
        status: None,
        run: None,
        last_run: None,
        polls: 0,
        poll_errors: 0,
        reconnects: 0,
        cycler: Some(CyclerView {
            state: run.as_ref().map_or("idle", |r| r.state.as_str()).to_owned(),
            run: run.as_ref().map(run_view),
            device_state: device.map(|d| format!("{:?}", d.state).to_lowercase()),
            device_cycle: device.map(|d| d.cycle),
            lid: device.map(|d| format!("{:?}", d.lid).to_lowercase()),
            block_c: device.map(|d| finite(d.block_c)),
            lines_rejected: s.lines_rejected,
            recent_rejected: s
                .rejected
                .iter()
                .map(|(line, reason)| RejectedLineView {
                    line: line.clone(),
                    reason: reason.clone(),
                    at: None,
                    after_cycle: None,
                })
                .collect(),
            last_fault: s.last_fault.clone(),
        }),
        state: if s.link != Link::Online {
            "offline"
        } else if device.is_some_and(|d| d.state == pcrd_protocol::cycler::RunState::Error) {
            "error"
        } else if run.is_some() {
            "running"
        } else {
            "idle"
        }
        .to_owned(),
        state_reason: if s.link != Link::Online {
            s.reason.clone()
        } else if device.is_some_and(|d| d.state == pcrd_protocol::cycler::RunState::Error) {
            Some(
                s.last_fault
                    .clone()
                    .unwrap_or_else(|| "the cycler is in its error state".into()),
            )
        } else {
            None
        },
    }
}

fn run_view(r: &crate::cyclers::RunRecord) -> RunView {
    let time = |ms: i64| crate::lab::rfc3339(pcrd_protocol::domain::Timestamp::from_millis(ms));
    RunView {
        id: r.id,
        plate: r.plate.clone(),
        instrument: r.instrument.clone(),
        protocol: r.protocol.clone(),
        protocol_text: r.protocol_text.clone(),
        format: r.format.well_count() as u32,
        channels: r.channels.clone(),
        state: r.state.as_str().to_owned(),
        reason: r.reason.clone(),
        cycles_stored: r.cycles_stored,
        cycles_expected: r.cycles_expected,
        lines_rejected: r.lines_rejected,
        refetched: r
            .refetched
            .iter()
            .map(|(first, last)| CycleRangeView {
                first: *first,
                last: *last,
            })
            .collect(),
        started_by: r.started_by.clone(),
        created_at: time(r.created_at),
        started_at: r.started_at.map(time),
        ended_at: r.ended_at.map(time),
        updated_at: time(r.updated_at),
        rejected: None,
        curves: None,
    }
}

impl From<crate::cyclers::RunError> for ApiError {
    fn from(e: crate::cyclers::RunError) -> ApiError {
        use crate::cyclers::RunError;
        match e {
            RunError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, "not_found", m),
            RunError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            RunError::Invalid(m) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", m),
            RunError::Instrument(m) => {
                ApiError::new(StatusCode::BAD_GATEWAY, "instrument_error", m)
            }
            RunError::Store(e) => LabError::Store(e).into(),
        }
    }
}

fn cyclers_of(state: &AppState) -> ApiResult<&crate::cyclers::Cyclers> {
    state.instruments.cyclers().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no [[cyclers]] in the config",
        )
    })
}

/// Start a run: an extraction run of a sealed extraction plate on an idle
/// extractor (`protocol` is then the extractor's protocol number, default 1),
/// or a PCR run of a sealed plate on an idle cycler. The run is stored
/// (state `starting`) before anything is sent; the start command is sent once
/// and, if its reply is lost, the cycler's state is read back instead of
/// sending it again.
#[utoipa::path(post, path = "/api/v1/runs", tag = "runs", request_body = StartRunRequest,
    responses(
        (status = 201, description = "Started", body = RunView),
        (status = 404, description = "No such plate or cycler", body = ErrorBody),
        (status = 409, description = "Plate not sealed or already run; cycler busy, offline or not idle", body = ErrorBody),
        (status = 422, description = "Bad protocol or plate map", body = ErrorBody),
        (status = 502, description = "The cycler refused or did not confirm; the run's record says what became of it", body = ErrorBody),
    ))]
#[tracing::instrument(name = "run", skip_all, fields(plate = %body.plate, instrument = %body.instrument, user = %caller.user, action = "start"))]
async fn start_run(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<StartRunRequest>,
) -> ApiResult<(StatusCode, Json<RunView>)> {
    caller.lab_work("starting runs")?;
    // An extractor's name: an extraction run (crate::instruments, docs/runs.md).
    if state.instruments.get(&body.instrument).is_some() {
        let run = state
            .instruments
            .start_extraction(
                &body.plate,
                &body.instrument,
                body.protocol.as_deref(),
                &caller.user,
            )
            .await?;
        tracing::info!(run = run.id, "Extraction run started.");
        return Ok((StatusCode::CREATED, Json(run_view(&run))));
    }
    let cyclers = cyclers_of(&state)?;
    let run = cyclers
        .start_run(
            &body.plate,
            &body.instrument,
            body.protocol.as_deref(),
            &caller.user,
        )
        .await?;
    tracing::info!(run = run.id, "Run started.");
    Ok((StatusCode::CREATED, Json(run_view(&run))))
}

/// Runs, oldest first (the newest `limit` that match): extraction and PCR runs,
/// filtered by plate, instrument and state. A client that lost the answer to a
/// start (a timeout, a restarted daemon) finds here whether the run was created.
#[utoipa::path(get, path = "/api/v1/runs", tag = "runs", params(RunListQuery),
    responses((status = 200, body = Vec<RunView>), (status = 422, body = ErrorBody)))]
async fn list_runs(
    State(state): State<AppState>,
    _caller: Caller,
    Query(q): Query<RunListQuery>,
) -> ApiResult<Json<Vec<RunView>>> {
    let limit = in_range("limit", q.limit.map(u64::from), 1, 100_000)?.unwrap_or(1000) as usize;
    let states: Vec<&str> = crate::cyclers::RunState::ALL
        .iter()
        .map(|s| s.as_str())
        .collect();
    if let Some(wanted) = &q.state
        && !states.contains(&wanted.as_str())
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            format!("state {wanted:?} is not one of {}", states.join(", ")),
        ));
    }
    let cyclers = cyclers_of(&state)?;
    let store = cyclers.runs();
    let found = match (&q.plate, &q.instrument) {
        (Some(plate), _) => store.of_plate(plate),
        (None, Some(instrument)) => store.on_instrument(instrument),
        (None, None) => store.all(),
    };
    let mut runs: Vec<RunView> = found
        .map_err(LabError::Store)?
        .iter()
        .filter(|r| q.plate.as_ref().is_none_or(|p| &r.plate == p))
        .filter(|r| q.instrument.as_ref().is_none_or(|i| &r.instrument == i))
        .filter(|r| q.state.as_ref().is_none_or(|s| r.state.as_str() == s))
        .map(run_view)
        .collect();
    runs.sort_by_key(|r| r.id);
    let skip = runs.len().saturating_sub(limit);
    Ok(Json(runs.split_off(skip)))
}

/// A PCR run: state, cycles stored and, on request, per-well curves and the
/// lines refused during the run.
#[utoipa::path(get, path = "/api/v1/runs/{id}", tag = "runs",
    params(("id" = u64, Path, description = "Run id"), RunQuery),
    responses((status = 200, body = RunView), (status = 404, body = ErrorBody)))]
async fn get_run(
    State(state): State<AppState>,
    _caller: Caller,
    Path(id): Path<u64>,
    Query(q): Query<RunQuery>,
) -> ApiResult<Json<RunView>> {
    let cyclers = cyclers_of(&state)?;
    let runs = cyclers.runs();
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no run {id}"));
    let record = runs
        .get(id)
        .map_err(LabError::Store)?
        .ok_or_else(not_found)?;
    let mut view = run_view(&record);
    if q.curves.unwrap_or(false) || q.well.is_some() {
        let only = match &q.well {
            Some(w) => Some(w.parse::<pcrd_protocol::domain::Well>().map_err(|e| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid",
                    format!("well {w:?}: {e}"),
                )
            })?),
            None => None,
        };
        if let Some(w) = only
            && !record.format.contains(w)
        {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                format!("well {w} is not on a {}-well plate", record.format),
            ));
        }
        let curves = runs.curves(&record).map_err(LabError::Store)?;
        let mut out = Vec::new();
        for (well_index, well) in record.format.wells_column_major().enumerate() {
            if only.is_some_and(|w| w != well) {
                continue;
            }
            for (ch, name) in record.channels.iter().enumerate() {
                out.push(CurveView {
                    well: well.to_string(),
                    channel: name.clone(),
                    values: curves[ch][well_index].clone(),
                });
            }
        }
        view.curves = Some(out);
        view.rejected = Some(
            runs.rejected(id)
                .map_err(LabError::Store)?
                .into_iter()
                .map(|r| RejectedLineView {
                    line: r.line,
                    reason: r.reason,
                    at: Some(crate::lab::rfc3339(
                        pcrd_protocol::domain::Timestamp::from_millis(r.at),
                    )),
                    after_cycle: Some(r.after_cycle),
                })
                .collect(),
        );
    }
    Ok(Json(view))
}

/// Abort a run in progress. The abort is sent once; a lost reply is settled
/// by reading the cycler's state back. Cycles stored so far are kept.
#[utoipa::path(post, path = "/api/v1/runs/{id}/abort", tag = "runs", request_body = ReasonRequest,
    params(("id" = u64, Path, description = "Run id")),
    responses(
        (status = 200, body = RunView),
        (status = 404, body = ErrorBody),
        (status = 409, description = "The run has ended, or a start or abort is under way", body = ErrorBody),
        (status = 502, description = "The cycler did not confirm the abort", body = ErrorBody),
    ))]
#[tracing::instrument(name = "run", skip_all, fields(run = id, user = %caller.user, action = "abort"))]
async fn abort_run(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<u64>,
    OptionalJson(body): OptionalJson<ReasonRequest>,
) -> ApiResult<Json<RunView>> {
    caller.lab_work("aborting runs")?;
    if state.instruments.is_extraction_run(id) {
        let run = state
            .instruments
            .abort_extraction(id, &caller.user, body.reason.as_deref())
            .await?;
        return Ok(Json(run_view(&run)));
    }
    let cyclers = cyclers_of(&state)?;
    let run = cyclers
        .abort_run(id, &caller.user, body.reason.as_deref())
        .await?;
    Ok(Json(run_view(&run)))
}

/// The analysis of a finished PCR run (crate::runs): Ct per well and target,
/// curve QC flags, the kit's call per specimen and the plate's validity.
#[utoipa::path(get, path = "/api/v1/runs/{id}/analysis", tag = "runs",
    params(("id" = u64, Path, description = "Run id")),
    responses(
        (status = 200, body = crate::runs::RunAnalysis),
        (status = 404, description = "No such run", body = ErrorBody),
        (status = 409, description = "The run has not finished, or its analysis is not stored yet", body = ErrorBody),
    ))]
async fn run_analysis(
    State(state): State<AppState>,
    _caller: Caller,
    Path(id): Path<u64>,
) -> ApiResult<Json<crate::runs::RunAnalysis>> {
    let cyclers = cyclers_of(&state)?;
    let record = cyclers
        .runs()
        .get(id)
        .map_err(LabError::Store)?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no run {id}")))?;
    match crate::runs::stored(cyclers.runs(), id).map_err(LabError::Store)? {
        Some(analysis) => Ok(Json(analysis)),
        None => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!(
                "run {id} has no analysis yet (state {}): a run is analysed once it has finished",
                record.state.as_str()
            ),
        )),
    }
}

/// JSON has no NaN or infinity; a device that reports one is flagged as an anomaly,
/// and the number shows as 0.
fn finite(value: f64) -> f64 {
    if value.is_finite() { value } else { 0.0 }
}

/// 200 while the daemon can acknowledge writes; 503 once the store has failed.
async fn healthz(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    let failure = state.lab.store().failure();
    let status = if failure.is_some() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let health = Health {
        status: failure.map_or_else(|| "ok".into(), |why| format!("store failed: {why}")),
        lab: state.lab.lab_id().to_string(),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    (status, Json(health))
}

/// Prometheus text exposition.
async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    use std::fmt::Write as _;
    let lab = &state.lab;
    let counters = lab.counters();
    let barrier = lab.store().barrier_stats();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    metric(
        "pcrd_tubes_stored",
        "gauge",
        "Tubes in the store.",
        lab.tube_count().to_string(),
    );
    metric(
        "pcrd_tubes_waiting",
        "gauge",
        "Tubes received and waiting for a plate.",
        lab.waiting_count().to_string(),
    );
    metric(
        "pcrd_tubes_received_total",
        "counter",
        "Tubes received since start.",
        counters.tubes_received.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "pcrd_plates_created_total",
        "counter",
        "Extraction plates created since start.",
        counters.plates_created.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "pcrd_plates_sealed_total",
        "counter",
        "Plates sealed since start.",
        counters.plates_sealed.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "pcrd_store_barriers_total",
        "counter",
        "Durability barriers (flush + fdatasync) completed.",
        barrier.barriers.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "pcrd_store_barrier_waiters_total",
        "counter",
        "Commits covered by those barriers (group commit shares one barrier).",
        barrier.tickets.load(Ordering::Relaxed).to_string(),
    );
    barrier.duration.render(
        &mut out,
        "pcrd_store_barrier_duration_seconds",
        "Duration of each durability barrier (sled flush + fdatasync).",
    );
    state.metrics.duration.render(
        &mut out,
        "pcrd_http_request_duration_seconds",
        "Time from request to response, durability barrier included.",
    );
    let _ = writeln!(
        out,
        "# HELP pcrd_http_responses_total HTTP responses by status class.\n# TYPE pcrd_http_responses_total counter"
    );
    for (class, count) in state.metrics.by_class.iter().enumerate().skip(1) {
        let _ = writeln!(
            out,
            "pcrd_http_responses_total{{class=\"{class}xx\"}} {}",
            count.load(Ordering::Relaxed)
        );
    }
    state.instruments.render_metrics(&mut out);
    state.folders.render_metrics(&mut out);
    state.analysers.render_metrics(&mut out);
    state.panel.render_metrics(&mut out);
    lab.outbox().render_metrics(lab.store(), &mut out);
    lab.review().render_metrics(&mut out);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        out,
    )
}

// ----- outbox (issue 6) -----

/// Delivery state per configured sink: pending, in flight, delivered, dead, lag, the
/// last error and when the next attempt is due.
#[utoipa::path(get, path = "/api/v1/outbox", tag = "outbox",
    responses((status = 200, body = OutboxStatusView)))]
async fn outbox_status(
    State(state): State<AppState>,
    _caller: Caller,
) -> ApiResult<Json<OutboxStatusView>> {
    let lab = Arc::clone(&state.lab);
    let sinks = tokio::task::spawn_blocking(move || lab.outbox().status(lab.store()))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(LabError::Store)?;
    Ok(Json(OutboxStatusView {
        next_seq: state.lab.outbox().next_seq(),
        sinks: sinks
            .into_iter()
            .map(|s| OutboxSinkView {
                sink: s.sink,
                kind: s.kind.to_string(),
                cursor: s.cursor,
                pending: s.pending,
                in_flight: s.in_flight,
                delivered: s.delivered,
                dead: s.dead,
                oldest_pending_age_seconds: s.oldest_pending_age_seconds,
                last_error: s.last_error,
                attempt: s.attempt,
                next_attempt: s.next_attempt,
            })
            .collect(),
    }))
}

/// Dead letters, oldest first per sink: what each sink refused for good and why.
#[utoipa::path(get, path = "/api/v1/outbox/dead", tag = "outbox", params(DeadParams),
    responses((status = 200, body = Vec<DeadLetterView>), (status = 404, body = ErrorBody, description = "The sink is not configured")))]
async fn outbox_dead(
    State(state): State<AppState>,
    _caller: Caller,
    Query(q): Query<DeadParams>,
) -> ApiResult<Json<Vec<DeadLetterView>>> {
    if let Some(sink) = q
        .sink
        .as_deref()
        .filter(|s| state.lab.outbox().sink(s).is_none())
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("sink {sink:?} is not configured"),
        ));
    }
    let letters = crate::outbox::dead_letters(state.lab.store(), q.sink.as_deref())
        .map_err(LabError::Store)?;
    Ok(Json(
        letters
            .into_iter()
            .map(|d| DeadLetterView {
                sink: d.sink,
                seq: d.seq,
                idempotency_key: d.idempotency_key,
                reason: match d.reason {
                    crate::sinks::DeadReason::Rejected => "rejected".into(),
                    crate::sinks::DeadReason::Unencodable => "unencodable".into(),
                },
                detail: d.detail,
                at: crate::outbox::rfc3339_ms(d.at_ms),
                record: serde_json::from_str(&d.record_json).unwrap_or(serde_json::Value::Null),
            })
            .collect(),
    ))
}

/// Re-queue dead letters (by idempotency key, or all) for the sink that refused them.
/// Reviewer or admin.
#[utoipa::path(post, path = "/api/v1/outbox/retry", tag = "outbox", request_body = OutboxRetryRequest,
    responses((status = 200, body = OutboxRetryResponse), (status = 404, body = ErrorBody, description = "A key matches no dead letter")))]
async fn outbox_retry(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<OutboxRetryRequest>,
) -> ApiResult<Json<OutboxRetryResponse>> {
    caller.require(&[Role::Reviewer], "re-queueing dead letters")?;
    let invalid = |message: &str| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            message.to_string(),
        )
    };
    let selection = match (body.ids, body.all) {
        (Some(ids), false) if !ids.is_empty() => {
            if let Some(bad) = ids.iter().find(|k| crate::outbox::split_key(k).is_none()) {
                return Err(invalid(&format!(
                    "{bad:?} is not an idempotency key like RESULT-ID:VERSION"
                )));
            }
            crate::outbox::RetrySelection::Keys(ids)
        }
        (None, true) => crate::outbox::RetrySelection::All,
        (Some(_), true) => return Err(invalid("give ids or all, not both")),
        _ => return Err(invalid("give ids (idempotency keys) or all: true")),
    };
    let requeued = state
        .lab
        .requeue_dead(caller.actor(body.reason), body.sink, selection)
        .await?;
    Ok(Json(OutboxRetryResponse {
        requeued: requeued
            .into_iter()
            .map(|r| RequeuedView {
                sink: r.sink,
                idempotency_key: r.idempotency_key,
                seq: r.seq,
            })
            .collect(),
    }))
}

/// Where one released result version (`RESULT-ID:VERSION`) stands for each configured
/// sink: pending, in flight, delivered or dead.
#[utoipa::path(get, path = "/api/v1/outbox/results/{key}", tag = "outbox",
    params(("key" = String, Path, description = "The idempotency key, RESULT-ID:VERSION")),
    responses((status = 200, body = DeliveryView), (status = 404, body = ErrorBody, description = "No such result version")))]
async fn outbox_delivery(
    State(state): State<AppState>,
    _caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<Json<DeliveryView>> {
    let Some((id, version)) = crate::outbox::split_key(&key) else {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            format!("{key:?} is not an idempotency key like RESULT-ID:VERSION"),
        ));
    };
    let states = state
        .lab
        .outbox()
        .delivery_state(state.lab.store(), id, version)
        .map_err(LabError::Store)?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("result {key} has not been released"),
            )
        })?;
    Ok(Json(DeliveryView {
        idempotency_key: key.clone(),
        sinks: states
            .into_iter()
            .map(|(sink, s)| SinkDeliveryView {
                sink,
                state: match s {
                    crate::outbox::DeliveryState::Pending => "pending",
                    crate::outbox::DeliveryState::InFlight => "in_flight",
                    crate::outbox::DeliveryState::Delivered => "delivered",
                    crate::outbox::DeliveryState::Dead => "dead",
                }
                .to_string(),
            })
            .collect(),
    }))
}

#[utoipa::path(get, path = "/api/v1/folders", tag = "folders",
    responses((status = 200, body = Vec<crate::folders::FolderView>)))]
async fn list_folders(
    State(state): State<AppState>,
    _caller: Caller,
) -> ApiResult<Json<Vec<crate::folders::FolderView>>> {
    Ok(Json(
        state
            .folders
            .status(&state.lab)
            .map_err(|e| ApiError::from(LabError::Store(e)))?,
    ))
}

#[utoipa::path(get, path = "/api/v1/imports", tag = "folders", params(ImportsQuery),
    responses((status = 200, body = Vec<crate::folders::ImportView>), (status = 404, body = ErrorBody)))]
async fn list_imports(
    State(state): State<AppState>,
    _caller: Caller,
    Query(q): Query<ImportsQuery>,
) -> ApiResult<Json<Vec<crate::folders::ImportView>>> {
    let limit = in_range("limit", q.limit.map(u64::from), 1, 10_000)?.unwrap_or(100);
    if let Some(name) = &q.folder
        && !state.folders.has(name)
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no watched folder named {name:?}"),
        ));
    }
    Ok(Json(
        state
            .folders
            .events(&state.lab, q.folder.as_deref(), limit as usize)
            .map_err(|e| ApiError::from(LabError::Store(e)))?,
    ))
}

#[utoipa::path(get, path = "/api/v1/tubes/{barcode}/imported-results", tag = "folders",
    params(("barcode" = String, Path, description = "Tube barcode")),
    responses((status = 200, body = Vec<crate::folders::ImportedResult>), (status = 404, body = ErrorBody)))]
async fn imported_results(
    State(state): State<AppState>,
    _caller: Caller,
    Path(barcode): Path<String>,
) -> ApiResult<Json<Vec<crate::folders::ImportedResult>>> {
    state.lab.tube(&barcode)?;
    Ok(Json(
        crate::folders::Folders::results_for_tube(&state.lab, &barcode)
            .map_err(|e| ApiError::from(LabError::Store(e)))?,
    ))
}

// ----- analysers (issue 8) -----

/// The analysers pcrd hosts over ASTM (`[[analysers]]` in the config): line state,
/// messages stored, quarantined and unmatched, last message time.
#[utoipa::path(get, path = "/api/v1/analysers", tag = "analysers",
    responses((status = 200, body = Vec<AnalyserView>)))]
async fn list_analysers(
    State(state): State<AppState>,
    _caller: Caller,
) -> ApiResult<Json<Vec<AnalyserView>>> {
    use crate::analysers::store::counts;
    let time = |t: std::time::SystemTime| humantime::format_rfc3339_millis(t).to_string();
    let mut out = Vec::new();
    for a in state.analysers.all() {
        let link = a.link();
        let c = counts(state.lab.store(), &a.config.name).map_err(LabError::Store)?;
        out.push(AnalyserView {
            name: a.config.name.clone(),
            transport: a.config.transport.describe(),
            listen: a.local_addr().map(|addr| addr.to_string()),
            profile: a.config.profile.key(),
            accepts_orders: a.config.accepts_orders,
            link_up: link.up,
            since: time(link.since),
            down_reason: link.reason,
            connections: link.connections,
            peers_refused: link.peers_refused,
            messages_stored: c.messages,
            quarantined: c.quarantined,
            withdrawn: c.withdrawn,
            reported: c.reported,
            unmatched: c.unmatched,
            last_message_at: c.last_message_at.map(crate::lab::rfc3339),
            worklists_sent: a.sent_orders(),
        });
    }
    Ok(Json(out))
}

/// Transmissions kept with their bytes and never turned into results (no EOT, a
/// cut line, broken records, a stored message withdrawn as unconfirmed), newest first.
#[utoipa::path(get, path = "/api/v1/analysers/quarantine", tag = "analysers",
    params(AnalyserListQuery),
    responses((status = 200, body = Vec<QuarantineView>), (status = 422, body = ErrorBody)))]
async fn analyser_quarantine(
    State(state): State<AppState>,
    _caller: Caller,
    Query(q): Query<AnalyserListQuery>,
) -> ApiResult<Json<Vec<QuarantineView>>> {
    use crate::analysers::store::{QuarantineRecord, list, read_chunks};
    let limit = in_range("limit", q.limit.map(u64::from), 1, 10_000)?.unwrap_or(100) as usize;
    let store = state.lab.store();
    let items: Vec<QuarantineRecord> = list(store, b'q', limit).map_err(LabError::Store)?;
    let mut out = Vec::new();
    for item in items {
        let raw = read_chunks(store, b'q', item.id, b'r').map_err(LabError::Store)?;
        let shown = &raw[..raw.len().min(4096)];
        out.push(QuarantineView {
            id: item.id,
            analyser: item.instrument,
            connection: item.connection,
            seq: item.seq,
            kind: item.kind,
            reason: item.reason,
            withdrew_message: item.withdrew,
            at: crate::lab::rfc3339(item.at),
            bytes: item.raw_len,
            raw: pcrd_protocol::astm::to_mnemonics(shown),
        });
    }
    Ok(Json(out))
}

/// Results the mapping could not put on a tube (unknown specimen id, unknown test
/// code or analyte, a value that is not a Ct), kept for the technician, newest first.
#[utoipa::path(get, path = "/api/v1/analysers/unmatched", tag = "analysers",
    params(AnalyserListQuery),
    responses((status = 200, body = Vec<UnmatchedView>), (status = 422, body = ErrorBody)))]
async fn analyser_unmatched(
    State(state): State<AppState>,
    _caller: Caller,
    Query(q): Query<AnalyserListQuery>,
) -> ApiResult<Json<Vec<UnmatchedView>>> {
    use crate::analysers::store::{UnmatchedRecord, list};
    let limit = in_range("limit", q.limit.map(u64::from), 1, 10_000)?.unwrap_or(100) as usize;
    let items: Vec<UnmatchedRecord> =
        list(state.lab.store(), b'u', limit).map_err(LabError::Store)?;
    Ok(Json(
        items
            .into_iter()
            .map(|u| UnmatchedView {
                id: u.id,
                analyser: u.instrument,
                message_id: u.message_id,
                at: crate::lab::rfc3339(u.at),
                order_index: u.order_index,
                specimen_id: u.specimen_id,
                test_code: u.test_code,
                analyte: u.analyte,
                kind: u.kind,
                reason: u.reason,
                values: u.values,
            })
            .collect(),
    ))
}

/// Sends a worklist (one O record per tube) to an analyser that accepts orders, and
/// answers once the analyser acknowledged it. Not resent on failure.
#[utoipa::path(post, path = "/api/v1/analysers/{name}/worklist", tag = "analysers",
    params(("name" = String, Path, description = "The analyser's name in the config")),
    request_body = WorklistRequest,
    responses(
        (status = 200, body = WorklistSent),
        (status = 404, description = "No analyser of that name", body = ErrorBody),
        (status = 409, description = "The analyser does not accept orders, or is not connected", body = ErrorBody),
        (status = 502, description = "The analyser did not acknowledge the worklist", body = ErrorBody),
    ))]
async fn analyser_worklist(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<WorklistRequest>,
) -> ApiResult<Json<WorklistSent>> {
    use crate::analysers::WorklistError as E;
    caller.lab_work("sending a worklist")?;
    match state.analysers.send_worklist(&name, &body.tubes).await {
        Ok(orders) => Ok(Json(WorklistSent {
            analyser: name,
            orders,
        })),
        Err(E::Tubes(e)) => Err(e.into()),
        Err(e) => {
            let status = match &e {
                E::UnknownAnalyser(_) => StatusCode::NOT_FOUND,
                E::Empty => StatusCode::UNPROCESSABLE_ENTITY,
                E::NoOrders(_) | E::NotConnected(_) => StatusCode::CONFLICT,
                _ => StatusCode::BAD_GATEWAY,
            };
            let code = if status == StatusCode::BAD_GATEWAY {
                "not_accepted"
            } else {
                error_code(status)
            };
            Err(ApiError::new(status, code, e.to_string()))
        }
    }
}

/// The results analysers reported for a tube, oldest first, with their source
/// (analyser, message). What review and release will act on.
#[utoipa::path(get, path = "/api/v1/tubes/{barcode}/reported", tag = "tubes",
    params(("barcode" = String, Path, description = "Tube barcode")),
    responses(
        (status = 200, body = Vec<crate::analysers::store::ReportedResult>),
        (status = 404, description = "The tube has not been received", body = ErrorBody),
    ))]
async fn tube_reported(
    State(state): State<AppState>,
    _caller: Caller,
    Path(barcode): Path<String>,
) -> ApiResult<Json<Vec<crate::analysers::store::ReportedResult>>> {
    let tube = state.lab.tube(&barcode)?;
    let results = crate::analysers::store::reported_for(state.lab.store(), tube.barcode.as_str())
        .map_err(LabError::Store)?;
    Ok(Json(results))
}

// ----- panel (issue 7) -----

/// The gateway's panel: lamp colour and mode, buzzer, what is faulted or active,
/// the last press and the actions the button asked for. Without `[panel]` in the
/// config: kind `none`, lamp `off`.
#[utoipa::path(get, path = "/api/v1/panel", tag = "panel",
    responses((status = 200, body = PanelStatusView)))]
async fn get_panel(State(state): State<AppState>, _caller: Caller) -> Json<PanelStatusView> {
    let panel = &state.panel;
    let Some(view) = panel.view() else {
        return Json(PanelStatusView {
            kind: "none".into(),
            lamp: "off".into(),
            lamp_mode: "steady".into(),
            lamp_lit: false,
            buzzer: false,
            fault_unacknowledged: false,
            abort_armed: false,
            faults: Vec::new(),
            active: Vec::new(),
            last_press: None,
            recent_actions: Vec::new(),
            pin_errors: 0,
            last_pin_error: None,
            sim_lines: None,
        });
    };
    let time = |t: std::time::SystemTime| humantime::format_rfc3339_millis(t).to_string();
    Json(PanelStatusView {
        kind: panel.kind().unwrap_or("none").to_string(),
        lamp: view.colour.as_str().to_string(),
        lamp_mode: view.mode.as_str().to_string(),
        lamp_lit: view.outputs.red || view.outputs.amber || view.outputs.green,
        buzzer: view.buzzing,
        fault_unacknowledged: view.unacknowledged,
        abort_armed: view.abort_armed,
        faults: view
            .lab
            .faults
            .iter()
            .map(|(source, reason)| PanelFaultView {
                source: source.clone(),
                reason: reason.clone(),
            })
            .collect(),
        active: view.lab.active.iter().cloned().collect(),
        last_press: view.last_press.map(|p| PanelPressView {
            long: p.press == pcrd_drivers::panel::logic::Press::Long,
            effect: p.effect.as_str().to_string(),
            at: time(p.at),
        }),
        recent_actions: panel
            .recent_actions()
            .into_iter()
            .map(|a| PanelActionView {
                action: a.action.as_str().to_string(),
                at: time(a.at),
            })
            .collect(),
        pin_errors: view.pin_errors,
        last_pin_error: view.last_pin_error,
        sim_lines: panel.sim().map(|board| {
            let l = board.levels();
            PanelLinesView {
                red: l.red,
                amber: l.amber,
                green: l.green,
                buzzer: l.buzzer,
                button: l.button,
                active_low: board.active_low(),
            }
        }),
    })
}

/// Presses the simulated panel's button (technician or admin): short, or held past
/// the long-press time. The press goes through the simulated pins, with contact
/// bounce, and the debouncer like a real one; the answer says what it did.
#[utoipa::path(post, path = "/api/v1/panel/press", tag = "panel",
    request_body = PanelPressRequest,
    responses(
        (status = 200, body = PanelPressView),
        (status = 409, description = "No [panel] in the configuration, or the panel is on real GPIO (press its button)", body = ErrorBody),
    ))]
async fn press_panel(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<PanelPressRequest>,
) -> ApiResult<Json<PanelPressView>> {
    caller.lab_work("pressing the panel's button")?;
    let panel = &state.panel;
    if !panel.configured() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            "no [panel] in the configuration: there is no button to press",
        ));
    }
    if panel.sim().is_none() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            "the panel is on GPIO; only a simulated panel can be pressed from the API",
        ));
    }
    let (long, effect) = panel.press_sim(body.long).await.ok_or_else(|| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the panel did not register the press",
        )
    })?;
    tracing::info!(user = %caller.user, long, effect = effect.as_str(), "Simulated panel button pressed through the API.");
    Ok(Json(PanelPressView {
        long,
        effect: effect.as_str().to_string(),
        at: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
    }))
}
