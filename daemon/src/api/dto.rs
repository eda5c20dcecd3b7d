//! Request and response bodies of the HTTP API. Their schemas feed the OpenAPI
//! document, so the document is generated from the same types the handlers use.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::lab::rfc3339;
use pcrd_protocol::domain::{Lineage, WellContent};

use crate::model::{AuditEntry, PlateKind, PlateRecord, PlateState, TubeRecord};

/// The body of every error response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// The HTTP status, repeated for clients that only see the body.
    pub status: u16,
    /// A stable machine-readable code: `malformed_json` (400, a body that is not JSON),
    /// `malformed_request` (other 400s), `unauthorized` (401),
    /// `forbidden` (403), `not_found` (404), `method_not_allowed` (405), `conflict`
    /// (409), `payload_too_large` (413), `unsupported_media_type` (415), `invalid`
    /// (422), `store_failure` (503), `internal` (other 5xx).
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
    /// Each individual problem (one per bad tube, well...), when there are several.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

/// A tube's priority, as the API spells it (case does not matter on input).
#[derive(Debug, ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum PriorityName {
    Routine,
    Urgent,
}

/// One tube to receive.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TubeIn {
    /// 4..=32 letters, digits and '-'.
    #[schema(example = "SWAB-000123", pattern = "^[A-Za-z0-9-]{4,32}$")]
    pub barcode: String,
    /// Swabs pooled in the tube, 1..=20 (default 1).
    #[schema(minimum = 1, maximum = 20)]
    pub pool_size: Option<u32>,
    /// `routine` (default) or `urgent`.
    #[schema(value_type = Option<PriorityName>)]
    pub priority: Option<String>,
    /// When the result is due, as RFC 3339 (`2026-11-27T15:00:00Z`).
    pub due_at: Option<String>,
    /// When the result is due, as a duration from receipt (`4h`, `6h`, `90min`).
    pub due_in: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReceiveRequest {
    /// Up to 10,000 tubes; all are received or none.
    #[schema(min_items = 1, max_items = 10000)]
    pub tubes: Vec<TubeIn>,
    /// Why, for the audit trail.
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReceiveResponse {
    /// Barcodes recorded by this request.
    pub received: Vec<String>,
    /// Barcodes that were already recorded identically (a retry): unchanged.
    pub already_received: Vec<String>,
}

/// A tube as pcrd knows it: barcode, pool size, priority and due time; no personal data.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TubeView {
    pub barcode: String,
    pub pool_size: u8,
    pub priority: String,
    pub due_at: Option<String>,
    pub received_at: String,
    pub received_by: String,
    /// `waiting` (for a plate) or `plated`.
    pub state: String,
    pub plate: Option<String>,
    pub well: Option<String>,
}

impl From<&TubeRecord> for TubeView {
    fn from(t: &TubeRecord) -> TubeView {
        TubeView {
            barcode: t.barcode.to_string(),
            pool_size: t.pool_size.get(),
            priority: t.priority.to_string(),
            due_at: t.due_at.map(rfc3339),
            received_at: rfc3339(t.received_at),
            received_by: t.received_by.clone(),
            state: if t.placement.is_some() {
                "plated"
            } else {
                "waiting"
            }
            .into(),
            plate: t.placement.as_ref().map(|p| p.plate.to_string()),
            well: t.placement.as_ref().map(|p| p.well.to_string()),
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct WaitingQuery {
    /// At most this many tubes (default 1000).
    #[param(minimum = 1, maximum = 100000)]
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WaitingList {
    /// Tubes waiting for a plate, in plating order (urgent first, then due time).
    pub tubes: Vec<TubeView>,
    /// All tubes waiting, beyond `limit` too.
    pub total_waiting: u64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePlateRequest {
    /// Kit id (newest version) or `id@version`.
    #[schema(example = "sarscov2-orf1ab-n-ic")]
    pub kit: String,
    /// 96 (default) or 384.
    #[schema(minimum = 96, maximum = 384, example = 96)]
    pub format: Option<u16>,
    /// The plate's barcode; pcrd generates `PL-000001`-style ids when absent.
    pub id: Option<String>,
    pub reason: Option<String>,
}

/// An explicit placement: this tube in this well.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlacementIn {
    /// A1..H12 on a 96-well plate, A1..P24 on a 384-well plate.
    #[schema(example = "C5", pattern = "^[A-Pa-p]0?[1-9][0-9]?$")]
    pub well: String,
    #[schema(pattern = "^[A-Za-z0-9-]{4,32}$")]
    pub barcode: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AssignRequest {
    /// Tubes for the next free wells in column-major order, urgent and due-soonest first.
    #[serde(default)]
    pub tubes: Vec<String>,
    /// Tubes for named wells.
    #[serde(default)]
    pub placements: Vec<PlacementIn>,
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FillRequest {
    /// Place at most this many waiting tubes (default: as many as fit).
    pub max: Option<usize>,
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UnassignRequest {
    pub wells: Vec<String>,
    pub reason: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReasonRequest {
    pub reason: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferRequest {
    /// The new PCR plate's barcode; generated when absent.
    pub id: Option<String>,
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CombineRequest {
    /// Four sealed 96-well extraction plates: quadrants 1 (A1), 2 (A2), 3 (B1), 4 (B2).
    #[schema(min_items = 4, max_items = 4)]
    pub sources: Vec<String>,
    /// The new 384-well PCR plate's barcode; generated when absent.
    pub id: Option<String>,
    pub reason: Option<String>,
}

/// Wells placed or removed by a request.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WellsChanged {
    pub plate: String,
    pub wells: Vec<PlacementIn>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WellView {
    pub well: String,
    /// `sample` or `control`.
    pub kind: String,
    pub barcode: Option<String>,
    /// `positive_control`, `no_template_control` or `extraction_negative_control`.
    pub control: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LineageView {
    /// `transfer` (1:1) or `quadrants` (four 96 -> one 384).
    pub kind: String,
    /// Source plates; for quadrants in order Q1..Q4.
    pub sources: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PlateView {
    pub id: String,
    /// `extraction` or `pcr`.
    pub kind: String,
    pub kit: String,
    pub kit_version: String,
    pub format: u16,
    /// `open` or `sealed`.
    pub state: String,
    pub samples: usize,
    pub controls: usize,
    pub free: usize,
    /// Occupied wells in column-major order.
    pub wells: Vec<WellView>,
    pub lineage: Option<LineageView>,
    pub children: Vec<String>,
    pub created_at: String,
    pub created_by: String,
    pub sealed_at: Option<String>,
    pub sealed_by: Option<String>,
}

impl From<&PlateRecord> for PlateView {
    fn from(p: &PlateRecord) -> PlateView {
        let wells: Vec<WellView> = p
            .layout
            .iter()
            .map(|(well, content)| match content {
                WellContent::Sample { barcode } => WellView {
                    well: well.to_string(),
                    kind: "sample".into(),
                    barcode: Some(barcode.to_string()),
                    control: None,
                },
                WellContent::Control { control } => WellView {
                    well: well.to_string(),
                    kind: "control".into(),
                    barcode: None,
                    control: Some(control.to_string()),
                },
            })
            .collect();
        PlateView {
            id: p.id.to_string(),
            kind: match p.kind {
                PlateKind::Extraction => "extraction",
                PlateKind::Pcr => "pcr",
            }
            .into(),
            kit: p.kit_id.to_string(),
            kit_version: p.kit_version.clone(),
            format: p.format.into(),
            state: match p.state {
                PlateState::Open => "open",
                PlateState::Sealed => "sealed",
            }
            .into(),
            samples: p.layout.sample_count(),
            controls: p.layout.control_count(),
            free: p.layout.free_count(),
            wells,
            lineage: p.lineage.as_ref().map(|l| match l {
                Lineage::Transfer { source } => LineageView {
                    kind: "transfer".into(),
                    sources: vec![source.clone()],
                },
                Lineage::Quadrants { sources } => LineageView {
                    kind: "quadrants".into(),
                    sources: sources.to_vec(),
                },
            }),
            children: p.children.iter().map(ToString::to_string).collect(),
            created_at: rfc3339(p.created_at),
            created_by: p.created_by.clone(),
            sealed_at: p.sealed_at.map(rfc3339),
            sealed_by: p.sealed_by.clone(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PlateSummary {
    pub id: String,
    pub kind: String,
    pub kit: String,
    pub format: u16,
    pub state: String,
    pub samples: usize,
    pub created_at: String,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct AuditParams {
    /// Only entries about this plate.
    pub plate: Option<String>,
    /// Only entries about this tube.
    pub tube: Option<String>,
    /// Only entries with a sequence number below this (page back through history).
    #[param(minimum = 1, maximum = 9007199254740991_i64)]
    pub before: Option<u64>,
    /// The newest `limit` matching entries (default 1000), oldest first.
    #[param(minimum = 1, maximum = 10000)]
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditEntryView {
    pub seq: u64,
    pub at: String,
    pub user: String,
    pub action: String,
    pub plate: Option<String>,
    pub tubes: Vec<String>,
    pub detail: String,
    pub reason: Option<String>,
    /// SHA-256 over this entry and the previous entry's hash (hex).
    pub hash: String,
}

impl From<&AuditEntry> for AuditEntryView {
    fn from(e: &AuditEntry) -> AuditEntryView {
        AuditEntryView {
            seq: e.seq,
            at: rfc3339(e.at),
            user: e.user.clone(),
            action: e.action.clone(),
            plate: e.plate.as_ref().map(ToString::to_string),
            tubes: e.tubes.iter().map(ToString::to_string).collect(),
            detail: e.detail.clone(),
            reason: e.reason.clone(),
            hash: hex::encode(e.hash),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditVerifyView {
    pub entries: u64,
    /// True when every entry's hash matches its content and its predecessor.
    pub intact: bool,
    pub first_broken: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KitView {
    pub id: String,
    pub version: String,
    pub name: String,
    pub formats: Vec<u16>,
    /// The kit's targets in channel order.
    pub targets: Vec<KitTargetView>,
    /// LOINC code of the overall result.
    pub result_loinc: String,
}

/// One target of a kit, as a technician checks it against the IFU.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KitTargetView {
    pub name: String,
    pub channel: String,
    /// viral, internal_control or human_control.
    pub kind: String,
    /// Positive when the reported Ct passes this, e.g. "<= 40.00".
    pub cutoff: String,
    /// LOINC code of the target's Ct observation, if any.
    pub loinc: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok`, or why the store stopped acknowledging writes.
    pub status: String,
    pub lab: String,
    pub version: String,
}

/// An instrument the daemon follows, as the last polls showed it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct InstrumentView {
    /// The name in the config (`[[extractors]] name`).
    pub name: String,
    /// `extractor`.
    pub kind: String,
    /// Modbus unit id.
    pub unit: u8,
    /// The register-map profile's name and version.
    pub profile: String,
    pub profile_version: String,
    /// `tcp HOST:PORT` or `serial /dev/...`.
    pub link: String,
    /// Whether the last status poll was answered.
    pub online: bool,
    /// `connecting` (no poll finished yet), `online` or `offline`.
    pub connection: String,
    /// Why it is offline; absent when online.
    pub offline_reason: Option<String>,
    /// When `connection` last changed (RFC 3339).
    pub since: String,
    /// The last status read; absent before the first answered poll. Kept while
    /// offline (it is then the last known one).
    pub status: Option<InstrumentStatusView>,
    /// The run in progress, if any.
    pub run: Option<InstrumentRunView>,
    /// The last run that ended, if one was seen.
    pub last_run: Option<InstrumentRunView>,
    /// Status polls sent since the daemon started.
    pub polls: u64,
    /// Polls that failed.
    pub poll_errors: u64,
    /// Times the link was opened again after being lost.
    pub reconnects: u64,
    /// For a cycler (`kind` = `cycler`): its run and device state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cycler: Option<CyclerView>,
    /// One state for every kind of instrument: `idle`, `running`, `offline`
    /// or `error` (crate::runs::instrument_state).
    #[serde(default)]
    pub state: String,
    /// Why it is offline or in error.
    #[serde(default)]
    pub state_reason: Option<String>,
}

/// A cycler's state as its supervisor holds it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CyclerView {
    /// `idle` (no pcrd run), or the active run's state: `starting`, `running`,
    /// `instrument_offline`.
    pub state: String,
    /// The active run, if any.
    pub run: Option<RunView>,
    /// The device's own state from its last status (`idle`, `loaded`, `running`,
    /// `completed`, `aborted`, `error`); absent before the first status read.
    pub device_state: Option<String>,
    /// The device's current data cycle from its last status.
    pub device_cycle: Option<u32>,
    pub lid: Option<String>,
    pub block_c: Option<f64>,
    /// Lines refused since the daemon started.
    pub lines_rejected: u64,
    /// The last lines refused (newest last), with why.
    pub recent_rejected: Vec<RejectedLineView>,
    pub last_fault: Option<String>,
}

/// Start a PCR run of a sealed plate on a cycler.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRunRequest {
    /// A sealed plate.
    pub plate: String,
    /// A cycler's name in the config.
    pub instrument: String,
    /// The thermal protocol in pcrd's notation, `NAME CHANNELS STAGES`
    /// (docs/cycler-protocol.md), e.g. `PCRD45 FAM,HEX 1x95@120 45x95@3/60@30R`.
    /// Default: 45 cycles reading every channel of the plate's kit.
    pub protocol: Option<String>,
}

/// `GET /api/v1/runs` filters.
#[derive(Debug, Deserialize, IntoParams)]
pub struct RunListQuery {
    /// Only runs of this plate.
    pub plate: Option<String>,
    /// Only runs on this instrument.
    pub instrument: Option<String>,
    /// Only runs in this state (`starting`, `running`, `instrument_offline`,
    /// `finished`, `failed`, `aborted`).
    pub state: Option<String>,
    /// At most this many, the newest (default 1000).
    #[param(minimum = 1, maximum = 100000)]
    pub limit: Option<u32>,
}

/// `GET /api/v1/runs/{id}` options.
#[derive(Debug, Deserialize, IntoParams)]
pub struct RunQuery {
    /// Include the per-well curves (every channel; one well with `well`).
    pub curves: Option<bool>,
    /// Only this well's curves (e.g. `A1`).
    pub well: Option<String>,
}

/// A PCR run.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RunView {
    pub id: u64,
    pub plate: String,
    pub instrument: String,
    pub protocol: String,
    /// The protocol in pcrd's notation.
    pub protocol_text: String,
    /// Wells on the plate (96 or 384).
    pub format: u32,
    pub channels: Vec<String>,
    /// `starting`, `running`, `instrument_offline` (the link is down; not a
    /// failure), `finished`, `failed` or `aborted`.
    pub state: String,
    /// Why it failed, was aborted or is offline.
    pub reason: Option<String>,
    /// Cycles 1..=cycles_stored are durable, every channel and well.
    pub cycles_stored: u32,
    pub cycles_expected: u32,
    /// Lines refused during the run (kept, see `rejected`).
    pub lines_rejected: u32,
    /// Cycle ranges fetched again after a gap or a reconnect.
    pub refetched: Vec<CycleRangeView>,
    pub started_by: String,
    pub created_at: String,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    pub updated_at: String,
    /// The lines refused during the run (with `curves=true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<Vec<RejectedLineView>>,
    /// Per well and channel, the readings of cycles 1..=cycles_stored (with `curves=true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub curves: Option<Vec<CurveView>>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CycleRangeView {
    pub first: u32,
    pub last: u32,
}

/// A line from a cycler that was refused, as received.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RejectedLineView {
    pub line: String,
    pub reason: String,
    /// When (RFC 3339); absent for lines only held in memory.
    pub at: Option<String>,
    /// The last cycle stored when it arrived.
    pub after_cycle: Option<u32>,
}

/// One well's curve in one channel.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CurveView {
    pub well: String,
    pub channel: String,
    /// Raw fluorescence, cycle 1 first.
    pub values: Vec<f64>,
}

/// An extractor's status registers, decoded by its profile.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct InstrumentStatusView {
    /// idle, loaded, running, paused, completed, error, aborted, or
    /// `unknown(CODE)` for a code the profile does not list.
    pub state: String,
    pub step: u32,
    /// Percent, 0–100.
    pub progress: f64,
    /// Seconds left, as the device estimates.
    pub remaining_s: f64,
    pub temperature_c: f64,
    /// Loaded protocol number (0: none).
    pub protocol: u32,
    /// Plate barcode of the current or last run; empty when none.
    pub plate_barcode: String,
    pub error: Option<DeviceErrorView>,
    /// Values that cannot be right, in words.
    pub anomalies: Vec<String>,
}

/// A device error code and its reason from the profile's error table.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeviceErrorView {
    pub code: u32,
    pub reason: Option<String>,
}

/// A run on an instrument as the daemon followed it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct InstrumentRunView {
    pub protocol: u32,
    pub plate_barcode: String,
    /// The device's state for this run (see [`InstrumentStatusView::state`]).
    pub state: String,
    pub step: u32,
    /// Percent, 0–100.
    pub progress: f64,
    pub remaining_s: f64,
    /// When the daemon first saw it running (RFC 3339).
    pub seen_at: String,
    /// When it ended (RFC 3339); absent while in progress.
    pub ended_at: Option<String>,
    /// How it ended: `completed`, `device_error`, `aborted`, `unconfirmed` (the
    /// device said completed but its values cannot be right) or `ended`; absent
    /// while in progress.
    pub outcome: Option<String>,
    pub error: Option<DeviceErrorView>,
    /// Progress stood still longer than the stall limit.
    pub stalled: bool,
    pub anomalies: Vec<String>,
}

// ----- outbox (issue 6) -----

/// One sink's delivery state.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OutboxSinkView {
    pub sink: String,
    /// http, postgres, files or hl7.
    pub kind: String,
    /// Every outbox entry below this seq is settled (delivered or dead) for the sink.
    pub cursor: u64,
    /// Result versions waiting (not yet handed to the sink).
    pub pending: u64,
    /// Handed to the sink, not yet acknowledged.
    pub in_flight: u64,
    /// Delivered since the sink was first configured.
    pub delivered: u64,
    /// Dead letters waiting for an operator.
    pub dead: u64,
    /// Age of the oldest unsettled entry (the sink's lag); null when none.
    pub oldest_pending_age_seconds: Option<f64>,
    pub last_error: Option<String>,
    /// Attempts at the head item so far.
    pub attempt: u32,
    /// When the next attempt is due (RFC 3339), after a failure.
    pub next_attempt: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OutboxStatusView {
    /// The next outbox seq to be handed out.
    pub next_seq: u64,
    pub sinks: Vec<OutboxSinkView>,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct DeadParams {
    /// Only this sink's dead letters.
    pub sink: Option<String>,
}

/// A result version a sink refused for good.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterView {
    pub sink: String,
    pub seq: u64,
    /// `result_id:version`; pass it to `POST /api/v1/outbox/retry`.
    pub idempotency_key: String,
    /// rejected (the receiver refused it) or unencodable (the sink's format cannot carry it).
    pub reason: String,
    /// What the receiver said (response body, HL7 error), truncated to 4 KiB.
    pub detail: String,
    pub at: String,
    /// The record as it was offered.
    pub record: serde_json::Value,
}

/// Which dead letters to re-queue: `ids` (idempotency keys) or `all: true`.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OutboxRetryRequest {
    /// Only this sink's dead letters.
    pub sink: Option<String>,
    /// Idempotency keys (`result_id:version`) of dead letters.
    pub ids: Option<Vec<String>>,
    /// Every dead letter (of `sink`, or of every sink).
    #[serde(default)]
    pub all: bool,
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RequeuedView {
    pub sink: String,
    pub idempotency_key: String,
    /// The new outbox entry (for that sink only).
    pub seq: u64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OutboxRetryResponse {
    pub requeued: Vec<RequeuedView>,
}

/// Where one result version stands for each configured sink.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeliveryView {
    pub idempotency_key: String,
    pub sinks: Vec<SinkDeliveryView>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SinkDeliveryView {
    pub sink: String,
    /// pending, in_flight, delivered or dead.
    pub state: String,
}

/// Query of `GET /api/v1/imports`.
#[derive(Debug, Deserialize, IntoParams)]
pub struct ImportsQuery {
    /// Only this watched folder (its configured name).
    pub folder: Option<String>,
    /// Newest first, at most this many (default 100).
    #[param(minimum = 1, maximum = 10000)]
    pub limit: Option<u32>,
}
// ----- analysers (issue 8) -----

/// An analyser reporting over ASTM, with its line and what it has sent.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AnalyserView {
    pub name: String,
    /// `tcp LISTEN` or `serial PATH @ BAUD`.
    pub transport: String,
    /// The address the host listens on (port resolved), for TCP.
    pub listen: Option<String>,
    /// The mapping profile, `model@version`.
    pub profile: String,
    pub accepts_orders: bool,
    /// Whether a line to the analyser is up.
    pub link_up: bool,
    /// Since when the line is in that state (RFC 3339).
    pub since: String,
    /// Why the line is down.
    pub down_reason: Option<String>,
    /// Connections (TCP accepts, port opens) since start.
    pub connections: u64,
    /// Connections from addresses not on the peer list, refused since start.
    pub peers_refused: u64,
    /// Messages stored (all time).
    pub messages_stored: u64,
    /// Transmissions quarantined (all time).
    pub quarantined: u64,
    /// Stored messages withdrawn as unconfirmed (all time).
    pub withdrawn: u64,
    /// Results reported on tubes (all time).
    pub reported: u64,
    /// Unmatched items (all time).
    pub unmatched: u64,
    /// When the last message was stored (RFC 3339).
    pub last_message_at: Option<String>,
    /// Worklists acknowledged by the analyser since start.
    pub worklists_sent: u64,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct AnalyserListQuery {
    /// At most this many items, newest first (default 100).
    #[param(minimum = 1, maximum = 10000)]
    pub limit: Option<u32>,
}

/// Bytes from an analyser kept for an operator, never turned into results.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct QuarantineView {
    pub id: u64,
    pub analyser: String,
    pub connection: u64,
    /// The message's number on its connection, when the bytes are a whole message.
    pub seq: Option<u64>,
    /// `aborted` (no EOT, cut line, timeout), `unconfirmed` (stored, then the
    /// transmission broke off: the message was withdrawn), `records` (broken
    /// hierarchy or delimiters).
    pub kind: String,
    pub reason: String,
    /// The stored message this withdrew, if any.
    pub withdrew_message: Option<u64>,
    pub at: String,
    pub bytes: u64,
    /// The bytes with control characters as `<STX>`, `<CR>`… (the first 4 KiB).
    pub raw: String,
}

/// A result or order the mapping could not put on a tube, kept for the technician.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UnmatchedView {
    pub id: u64,
    pub analyser: String,
    pub message_id: u64,
    pub at: String,
    pub order_index: u32,
    pub specimen_id: String,
    pub test_code: String,
    pub analyte: String,
    /// `unknown_specimen`, `unknown_test`, `unmapped` or `uninterpretable`.
    pub kind: String,
    pub reason: String,
    /// The records concerned, `test id = value`.
    pub values: Vec<String>,
}

/// Tubes to order on an analyser.
#[derive(Debug, Deserialize, ToSchema)]
pub struct WorklistRequest {
    /// Barcodes of received tubes.
    pub tubes: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WorklistSent {
    pub analyser: String,
    /// Orders (O records) the analyser acknowledged.
    pub orders: usize,
}
// ----- panel (issue 7) -----

/// The gateway's panel: what the lamp and the buzzer show, why, and the last press.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PanelStatusView {
    /// `sim` (simulated pins), `gpio`, or `none` (no `[panel]` in the config).
    pub kind: String,
    /// `green` (idle), `amber` (a run active), `red` (a fault); `off` without a panel.
    pub lamp: String,
    /// `steady`, `blinking` (red: a fault nobody acknowledged) or `fast_blinking`
    /// (amber: an abort waiting for its confirming press).
    pub lamp_mode: String,
    /// Whether the lamp is lit at this instant (a blinking lamp alternates).
    pub lamp_lit: bool,
    /// Whether the buzzer's beep pattern runs (until a press or `buzz_for_s`).
    pub buzzer: bool,
    /// A fault waits for someone to press the button.
    pub fault_unacknowledged: bool,
    /// A long press armed an abort; a short press confirms it.
    pub abort_armed: bool,
    /// What is faulted: `instrument:NAME`, `store`, or a source reported by a run.
    pub faults: Vec<PanelFaultView>,
    /// Sources with a run in progress.
    pub active: Vec<String>,
    /// The last debounced press, if any.
    pub last_press: Option<PanelPressView>,
    /// The last actions the button asked for (oldest first, at most 20).
    pub recent_actions: Vec<PanelActionView>,
    /// Pin reads and writes that failed since start, and the last failure.
    pub pin_errors: u64,
    pub last_pin_error: Option<String>,
    /// For a simulated panel, the lines' physical levels (with `active_low`, low
    /// is on).
    pub sim_lines: Option<PanelLinesView>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PanelFaultView {
    pub source: String,
    pub reason: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PanelPressView {
    /// Held past the long-press time.
    pub long: bool,
    /// What it did: `start`, `abort`, `acknowledged`, `abort_armed`,
    /// `abort_disarmed` or `nothing`.
    pub effect: String,
    /// RFC 3339.
    pub at: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PanelActionView {
    /// `start` or `abort`.
    pub action: String,
    /// RFC 3339.
    pub at: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PanelLinesView {
    pub red: bool,
    pub amber: bool,
    pub green: bool,
    pub buzzer: bool,
    pub button: bool,
    pub active_low: bool,
}

/// A press of the simulated panel's button.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PanelPressRequest {
    /// Hold it past the long-press time (default: a short press).
    #[serde(default)]
    pub long: bool,
}
