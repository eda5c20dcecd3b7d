//! The durable side of the ASTM host: messages, quarantined bytes, unmatched items
//! and reported results in the store, each change one sled transaction followed by
//! the durability barrier.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pcrd_drivers::astm::{
    InboundMessage, MessageKey, MessageStore, QuarantineReason, Quarantined,
    StoreError as HostStoreError,
};
use pcrd_protocol::analysis::Ct;
use pcrd_protocol::astm::mapping::{CallSource, MappingProfile, SpecimenReading, Unmatched};
use pcrd_protocol::astm::record::{
    Delimiters, Field, HeaderSpec, Message, OrderSpec, Record, RecordType, TestId,
};
use pcrd_protocol::domain::{Priority, Timestamp};
use pcrd_protocol::interpret::Call;
use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::AnalyserMetrics;
use crate::lab::{Lab, LabError};
use crate::store::{Store, StoreError, Versioned, decode, encode};

/// Largest piece of a message's bytes kept under one key: sled writes values over
/// 64 KiB to blob files it never fsyncs, so everything stays below that.
pub const CHUNK_BYTES: usize = 60 * 1024;
/// Unmatched items keep at most this many record descriptions, each at most
/// `MAX_VALUE_CHARS` characters, so one item stays far below 64 KiB.
const MAX_VALUES: usize = 64;
const MAX_VALUE_CHARS: usize = 200;

// ----- key layout (tree `messages`; `reported` below) -----
//
// b'i'                                   -> next id (u64 BE), shared by m, q, u
// b'm' ++ id (u64 BE)                    -> MessageRecord
// b'm' ++ id ++ part (b'r' raw | b't' text | b'p' parsed records) ++ n (u32 BE)
//                                        -> chunk n of that part (<= 60 KiB)
// b's' ++ id                             -> empty: stored, not yet applied or withdrawn
// b'q' ++ id                             -> QuarantineRecord
// b'q' ++ id ++ b'r' ++ n (u32 BE)       -> chunk n of its raw bytes
// b'u' ++ id                             -> UnmatchedRecord
// b'c' ++ analyser name                  -> AnalyserCounts
//
// Tree `reported`: barcode ++ 0x00 ++ message id (u64 BE) ++ order index (u32 BE)
//                                        -> ReportedResult

const NEXT_ID: &[u8] = b"i";

fn id_key(prefix: u8, id: u64) -> Vec<u8> {
    let mut key = vec![prefix];
    key.extend_from_slice(&id.to_be_bytes());
    key
}

fn chunk_key(prefix: u8, id: u64, part: u8, n: u32) -> Vec<u8> {
    let mut key = id_key(prefix, id);
    key.push(part);
    key.extend_from_slice(&n.to_be_bytes());
    key
}

fn counts_key(analyser: &str) -> Vec<u8> {
    let mut key = vec![b'c'];
    key.extend_from_slice(analyser.as_bytes());
    key
}

/// Key of a result in the `reported` tree.
pub fn reported_key(barcode: &str, message: u64, order_index: u32) -> Vec<u8> {
    let mut key = reported_prefix(barcode);
    key.extend_from_slice(&message.to_be_bytes());
    key.extend_from_slice(&order_index.to_be_bytes());
    key
}

/// Prefix of every result of one tube in the `reported` tree.
pub fn reported_prefix(barcode: &str) -> Vec<u8> {
    let mut key = barcode.as_bytes().to_vec();
    key.push(0);
    key
}

fn now() -> Timestamp {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    Timestamp::from_millis(ms)
}

// ----- records -----

/// A message received from an analyser. Its raw bytes, text and parsed records are
/// kept in chunks beside it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MessageRecord {
    pub id: u64,
    pub instrument: String,
    /// Connection number (a TCP accept or a port open) within one daemon run.
    pub connection: u64,
    /// Message number on that connection.
    pub seq: u64,
    pub received_at: Timestamp,
    /// H.5, the sender's name.
    pub sender: String,
    pub raw_len: u64,
    pub text_len: u64,
    pub records_len: u64,
    pub record_count: u32,
    pub orders: u32,
    pub queries: u32,
    pub state: MessageState,
}

impl Versioned for MessageRecord {
    const TREE: &'static str = "messages";
    const VERSION: u8 = 1;
}

/// Where a stored message is in its life.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MessageState {
    /// Durable and acknowledged; waiting for the instrument's EOT (or a restart).
    Received,
    /// Turned into reported results and unmatched items.
    Applied {
        at: Timestamp,
        reported: u32,
        unmatched: u32,
    },
    /// Withdrawn: the transmission broke off after it was stored, so the instrument
    /// may not count it as sent. Kept, never turned into results.
    Withdrawn { at: Timestamp, reason: String },
}

impl MessageState {
    pub fn name(&self) -> &'static str {
        match self {
            MessageState::Received => "received",
            MessageState::Applied { .. } => "applied",
            MessageState::Withdrawn { .. } => "withdrawn",
        }
    }
}

/// One parsed record as stored (type letter; fields of repeats of components).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct StoredRecord {
    kind: char,
    fields: Vec<Vec<Vec<String>>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct StoredRecords(Vec<StoredRecord>);

impl Versioned for StoredRecords {
    const TREE: &'static str = "messages";
    const VERSION: u8 = 1;
}

/// Bytes kept for an operator, never results.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuarantineRecord {
    pub id: u64,
    pub instrument: String,
    pub connection: u64,
    /// The message's number on its connection, when the bytes are a whole message.
    pub seq: Option<u64>,
    /// The stored message withdrawn because of this, if any.
    pub withdrew: Option<u64>,
    /// `aborted`, `unconfirmed` or `records`.
    pub kind: String,
    pub reason: String,
    pub at: Timestamp,
    pub raw_len: u64,
}

impl Versioned for QuarantineRecord {
    const TREE: &'static str = "messages";
    const VERSION: u8 = 1;
}

/// Something in a message that did not become a reported result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnmatchedRecord {
    pub id: u64,
    pub message_id: u64,
    pub instrument: String,
    pub at: Timestamp,
    pub order_index: u32,
    pub specimen_id: String,
    pub test_code: String,
    pub analyte: String,
    /// `unknown_specimen`, `unknown_test`, `unmapped` or `uninterpretable`.
    pub kind: String,
    pub reason: String,
    pub values: Vec<String>,
}

impl Versioned for UnmatchedRecord {
    const TREE: &'static str = "messages";
    const VERSION: u8 = 1;
}

/// Per-analyser totals, kept in the same transactions as what they count.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AnalyserCounts {
    pub messages: u64,
    pub quarantined: u64,
    pub withdrawn: u64,
    pub reported: u64,
    pub unmatched: u64,
    pub last_message_at: Option<Timestamp>,
}

impl Versioned for AnalyserCounts {
    const TREE: &'static str = "messages";
    const VERSION: u8 = 1;
}

/// **A result an analyser reported for a tube**: what the review/release flow and
/// the outbox consume for analyser results (the analogue of a well's call on a
/// cycler plate). One per tube, analyser message and order; stored in the
/// `reported` tree under `barcode ++ 0x00 ++ message id ++ order index`, so a tube's
/// results list in arrival order. Never changed once written: a later message about
/// the same tube is another result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReportedResult {
    /// The tube (the specimen id the analyser sent, found received).
    pub barcode: String,
    /// Swabs in the tube (from the tube's record).
    pub pool_size: u8,
    /// Where it came from.
    pub source: ResultSource,
    /// The kit, `id@version`.
    pub kit: String,
    /// The call pcrd reports: the kit's interpretation of the Cts, or the analyser's
    /// call when the profile keeps it (`call_by`).
    #[schema(value_type = String, example = "detected")]
    pub call: Call,
    /// `kit` or `instrument`.
    pub call_by: String,
    /// The kit rule that decided (or "instrument call POS").
    pub reason: String,
    /// What the lab does next (the kit rule's action; empty for an instrument call).
    pub action: String,
    /// The analyser's own call as sent, and its meaning under the profile.
    pub instrument_call: Option<String>,
    #[schema(value_type = Option<String>)]
    pub instrument_call_meaning: Option<Call>,
    /// Per kit target.
    pub targets: Vec<ReportedTarget>,
}

impl Versioned for ReportedResult {
    const TREE: &'static str = "reported";
    const VERSION: u8 = 1;
}

/// Where a reported result came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ResultSource {
    /// The analyser's configured name.
    pub instrument: String,
    /// The stored message (see `GET /api/v1/analysers/messages/{id}`... the raw
    /// bytes are in the store under this id).
    pub message_id: u64,
    /// The order's index in the message.
    pub order_index: u32,
    /// The specimen id as sent (O.3).
    pub specimen_id: String,
    /// The analyser's test code.
    pub test_code: String,
    /// The mapping profile, `model@version`.
    pub profile: String,
    /// When the message was stored (RFC 3339 in the API; milliseconds here).
    #[schema(value_type = i64)]
    pub received_at: Timestamp,
}

/// One target of a reported result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReportedTarget {
    /// The kit's target name.
    pub target: String,
    /// The analyser's analyte code.
    pub analyte: String,
    /// The Ct; null when the target did not amplify (never a sentinel).
    pub ct: Option<f64>,
    /// The kit's reading of the Ct (`positive`, `negative`, `grey_zone`), when pcrd
    /// interpreted.
    pub state: Option<String>,
    /// The analyser's per-target call, when it sends one.
    pub instrument_call: Option<String>,
}

// ----- the store -----

/// A query answer (or any message) to send once the line is free.
#[derive(Debug)]
pub struct Outgoing {
    pub instrument: String,
    pub message: Message,
}

/// The daemon's [`MessageStore`] for one analyser.
pub struct DurableMessages {
    pub(super) name: String,
    pub(super) profile: Arc<MappingProfile>,
    pub(super) lab: Arc<Lab>,
    pub(super) metrics: Arc<AnalyserMetrics>,
    /// Stored this run and not yet confirmed or withdrawn: host key -> message id and
    /// records. Connection numbers restart with the daemon, so host keys are only
    /// meaningful within one run; the store's own ids are not.
    pending: Mutex<HashMap<MessageKey, (u64, Arc<Message>)>>,
    outgoing: mpsc::UnboundedSender<Outgoing>,
}

impl std::fmt::Debug for DurableMessages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableMessages")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn sled_error(e: TransactionError<()>) -> StoreError {
    match e {
        TransactionError::Storage(e) => StoreError::Sled(e),
        TransactionError::Abort(()) => StoreError::BadRecord {
            tree: "messages",
            key: String::new(),
            detail: "transaction aborted".into(),
        },
    }
}

type TxResult<T> = Result<T, ConflictableTransactionError<()>>;

fn next_id(m: &TransactionalTree) -> TxResult<u64> {
    let id = m
        .get(NEXT_ID)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map_or(1, u64::from_be_bytes);
    m.insert(NEXT_ID, &(id + 1).to_be_bytes())?;
    Ok(id)
}

fn update_counts(
    m: &TransactionalTree,
    analyser: &str,
    change: impl Fn(&mut AnalyserCounts),
) -> TxResult<()> {
    let key = counts_key(analyser);
    let mut counts = m
        .get(&key)?
        .and_then(|v| decode::<AnalyserCounts>(&key, &v).ok())
        .unwrap_or_default();
    change(&mut counts);
    m.insert(key, encode(&counts))?;
    Ok(())
}

fn put_chunks(m: &TransactionalTree, prefix: u8, id: u64, part: u8, bytes: &[u8]) -> TxResult<()> {
    for (n, chunk) in bytes.chunks(CHUNK_BYTES).enumerate() {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        m.insert(chunk_key(prefix, id, part, n), chunk)?;
    }
    Ok(())
}

/// Reads a chunked part back.
pub fn read_chunks(store: &Store, prefix: u8, id: u64, part: u8) -> Result<Vec<u8>, StoreError> {
    let mut start = id_key(prefix, id);
    start.push(part);
    let mut out = Vec::new();
    for item in store.trees().messages.scan_prefix(&start) {
        let (_, v) = item?;
        out.extend_from_slice(&v);
    }
    Ok(out)
}

fn to_stored(message: &Message) -> StoredRecords {
    StoredRecords(
        message
            .records
            .iter()
            .map(|r| StoredRecord {
                kind: r.kind.letter(),
                fields: r.fields.iter().map(|f| f.repeats.clone()).collect(),
            })
            .collect(),
    )
}

fn clip(mut s: String) -> String {
    if s.chars().count() > MAX_VALUE_CHARS {
        s = s.chars().take(MAX_VALUE_CHARS).collect();
        s.push('…');
    }
    s
}

impl DurableMessages {
    /// The store for analyser `name`; query answers go to `outgoing`.
    pub fn new(
        name: String,
        profile: Arc<MappingProfile>,
        lab: Arc<Lab>,
        metrics: Arc<AnalyserMetrics>,
        outgoing: mpsc::UnboundedSender<Outgoing>,
    ) -> DurableMessages {
        DurableMessages {
            name,
            profile,
            lab,
            metrics,
            pending: Mutex::new(HashMap::new()),
            outgoing,
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<MessageKey, (u64, Arc<Message>)>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes the message, its chunks, the pending marker and the counts in one
    /// transaction; returns its id. Not yet durable.
    fn write_message(&self, message: &InboundMessage) -> Result<u64, StoreError> {
        let records = encode(&to_stored(&message.records));
        let sender = message
            .records
            .header()
            .map(|h| h.sender().value().to_owned())
            .unwrap_or_default();
        let at = now();
        let t = self.lab.store().trees();
        let id = t
            .messages
            .transaction(|m| {
                let id = next_id(m)?;
                let record = MessageRecord {
                    id,
                    instrument: self.name.clone(),
                    connection: message.key.connection,
                    seq: message.key.seq,
                    received_at: at,
                    sender: sender.clone(),
                    raw_len: message.raw.len() as u64,
                    text_len: message.text.len() as u64,
                    records_len: records.len() as u64,
                    record_count: u32::try_from(message.records.records.len()).unwrap_or(u32::MAX),
                    orders: u32::try_from(message.records.orders().len()).unwrap_or(u32::MAX),
                    queries: u32::try_from(message.records.queries().len()).unwrap_or(u32::MAX),
                    state: MessageState::Received,
                };
                m.insert(id_key(b'm', id), encode(&record))?;
                put_chunks(m, b'm', id, b'r', &message.raw)?;
                put_chunks(m, b'm', id, b't', &message.text)?;
                put_chunks(m, b'm', id, b'p', &records)?;
                m.insert(id_key(b's', id), &[][..])?;
                update_counts(m, &self.name, |c| {
                    c.messages += 1;
                    c.last_message_at = Some(at);
                })?;
                Ok(id)
            })
            .map_err(sled_error)?;
        Ok(id)
    }

    fn write_quarantine(
        &self,
        item: &Quarantined,
        withdraw: Option<u64>,
    ) -> Result<(), StoreError> {
        let (kind, reason) = match &item.reason {
            QuarantineReason::Aborted(r) => ("aborted", r.to_string()),
            QuarantineReason::Unconfirmed(r) => ("unconfirmed", r.to_string()),
            QuarantineReason::Records(r) => ("records", r.to_string()),
            other => ("other", other.to_string()),
        };
        let at = now();
        let t = self.lab.store().trees();
        t.messages
            .transaction(|m| {
                let id = next_id(m)?;
                let mut withdrew = None;
                if let Some(message_id) = withdraw {
                    let key = id_key(b'm', message_id);
                    if let Some(raw) = m.get(&key)?
                        && let Ok(mut record) = decode::<MessageRecord>(&key, &raw)
                        && record.state == MessageState::Received
                    {
                        record.state = MessageState::Withdrawn {
                            at,
                            reason: item.reason.to_string(),
                        };
                        m.insert(key, encode(&record))?;
                        m.remove(id_key(b's', message_id))?;
                        withdrew = Some(message_id);
                    }
                }
                let record = QuarantineRecord {
                    id,
                    instrument: self.name.clone(),
                    connection: item.connection,
                    seq: item.key.as_ref().map(|k| k.seq),
                    withdrew,
                    kind: kind.to_owned(),
                    reason: reason.clone(),
                    at,
                    raw_len: item.raw.len() as u64,
                };
                m.insert(id_key(b'q', id), encode(&record))?;
                put_chunks(m, b'q', id, b'r', &item.raw)?;
                update_counts(m, &self.name, |c| {
                    c.quarantined += 1;
                    if withdrew.is_some() {
                        c.withdrawn += 1;
                    }
                })?;
                Ok(())
            })
            .map_err(sled_error)
    }

    /// Applies confirmed message `id` (blocking: store reads and one transaction).
    fn apply_blocking(&self, id: u64, message: &Message) -> Result<Applied, StoreError> {
        let applied = apply_message(&self.lab, &self.name, &self.profile, id, message)?;
        if let Some((reported, unmatched)) = applied.counts {
            info!(analyser = %self.name, message = id, reported, unmatched, "Analyser message applied.");
        }
        Ok(applied)
    }
}

/// What applying a message did.
pub(super) struct Applied {
    /// Reported results and unmatched items written; `None` when the message was no
    /// longer waiting (withdrawn or applied before).
    pub counts: Option<(u32, u32)>,
    /// The answer to its queries, if it had any.
    pub answer: Option<Message>,
    /// The reported results written (to be staged for review, `super::stage`).
    pub results: Vec<ReportedResult>,
}

/// Turns stored message `id` into reported results and unmatched items, in one
/// transaction across `messages` and `reported`; builds the answer to its queries.
pub(super) fn apply_message(
    lab: &Lab,
    analyser: &str,
    profile: &MappingProfile,
    id: u64,
    message: &Message,
) -> Result<Applied, StoreError> {
    let at = now();
    let mapped = profile.apply(message);
    let mut results: Vec<(Vec<u8>, ReportedResult)> = Vec::new();
    let mut unmatched: Vec<UnmatchedRecord> = Vec::new();
    let item = |u: &Unmatched, kind: &str| UnmatchedRecord {
        id: 0,
        message_id: id,
        instrument: analyser.to_owned(),
        at,
        order_index: u32::try_from(u.order_index).unwrap_or(u32::MAX),
        specimen_id: clip(u.specimen_id.clone()),
        test_code: clip(u.test_code.clone()),
        analyte: clip(u.analyte.clone()),
        kind: kind.to_owned(),
        reason: clip(u.reason.clone()),
        values: u
            .values
            .iter()
            .take(MAX_VALUES)
            .cloned()
            .map(clip)
            .collect(),
    };
    for u in &mapped.unmatched {
        let kind = if u.reason.starts_with("unknown test code") {
            "unknown_test"
        } else {
            "unmapped"
        };
        unmatched.push(item(u, kind));
    }
    let received_at = read_message(lab.store(), id)?.map_or(at, |r| r.received_at);
    for reading in &mapped.readings {
        let as_unmatched = |kind: &str, reason: String| {
            Unmatched {
                order_index: reading.order_index,
                specimen_id: reading.specimen_id.clone(),
                test_code: reading.test_code.clone(),
                analyte: String::new(),
                reason,
                values: reading
                    .targets
                    .iter()
                    .map(|(t, r)| {
                        format!(
                            "{t} ({}) Ct {}",
                            r.analyte,
                            r.ct.map_or("-".into(), |c| c.to_string())
                        )
                    })
                    .chain(
                        reading
                            .instrument_call
                            .iter()
                            .map(|c| format!("call {:?}", c.value)),
                    )
                    .collect(),
            }
            .pipe(|u| item(&u, kind))
        };
        let tube = match lab.tube(&reading.specimen_id) {
            Ok(tube) => tube,
            Err(LabError::Store(e)) => return Err(e),
            Err(e) => {
                unmatched.push(as_unmatched(
                    "unknown_specimen",
                    format!("unknown specimen id {:?}: {e}", reading.specimen_id),
                ));
                continue;
            }
        };
        match reported_result(lab, profile, reading, id, received_at, analyser) {
            Ok(mut result) => {
                result.barcode = tube.barcode.as_str().to_owned();
                result.pool_size = tube.pool_size.get();
                let order = u32::try_from(reading.order_index).unwrap_or(u32::MAX);
                results.push((reported_key(&result.barcode, id, order), result));
            }
            Err(reason) => unmatched.push(as_unmatched("uninterpretable", reason)),
        }
    }
    let answer = query_answer(lab, profile, message);
    let t = lab.store().trees();
    let trees = [t.messages.clone(), t.reported.clone()];
    let counts = trees[..]
        .transaction(|tx| {
            let (m, r) = (&tx[0], &tx[1]);
            let key = id_key(b'm', id);
            let Some(raw) = m.get(&key)? else {
                return Ok(None);
            };
            let Ok(mut record) = decode::<MessageRecord>(&key, &raw) else {
                return Ok(None);
            };
            if record.state != MessageState::Received {
                return Ok(None);
            }
            for u in &unmatched {
                let uid = next_id(m)?;
                let mut u = u.clone();
                u.id = uid;
                m.insert(id_key(b'u', uid), encode(&u))?;
            }
            for (key, result) in &results {
                r.insert(key.as_slice(), encode(result))?;
            }
            let counts = (
                u32::try_from(results.len()).unwrap_or(u32::MAX),
                u32::try_from(unmatched.len()).unwrap_or(u32::MAX),
            );
            record.state = MessageState::Applied {
                at,
                reported: counts.0,
                unmatched: counts.1,
            };
            m.insert(key, encode(&record))?;
            m.remove(id_key(b's', id))?;
            if !results.is_empty() {
                // Removed once the results are staged for review (`super::stage`).
                m.insert(super::stage::to_stage_key(id), &[][..])?;
            }
            update_counts(m, analyser, |c| {
                c.reported += results.len() as u64;
                c.unmatched += unmatched.len() as u64;
            })?;
            Ok(Some(counts))
        })
        .map_err(sled_error)?;
    let results = if counts.is_some() {
        results.into_iter().map(|(_, r)| r).collect()
    } else {
        Vec::new()
    };
    Ok(Applied {
        counts,
        answer,
        results,
    })
}

trait Pipe: Sized {
    fn pipe<R>(self, f: impl FnOnce(Self) -> R) -> R {
        f(self)
    }
}
impl<T> Pipe for T {}

/// The reported result for one mapped specimen (barcode and pool size filled in by
/// the caller), or why it cannot be one.
fn reported_result(
    lab: &Lab,
    profile: &MappingProfile,
    reading: &SpecimenReading,
    message_id: u64,
    received_at: Timestamp,
    analyser: &str,
) -> Result<ReportedResult, String> {
    let kit = lab.kits().find(&reading.kit)?;
    let mut targets: Vec<ReportedTarget> = reading
        .targets
        .iter()
        .map(|(name, r)| ReportedTarget {
            target: name.clone(),
            analyte: r.analyte.clone(),
            ct: r.ct.and_then(Ct::value),
            state: None,
            instrument_call: r.call.clone(),
        })
        .collect();
    let (call, call_by, reason, action) = match reading.call_source {
        CallSource::Kit => {
            let cts: BTreeMap<String, Ct> = reading
                .targets
                .iter()
                .map(|(name, r)| (name.clone(), r.ct.unwrap_or(Ct::Undetermined)))
                .collect();
            let call = kit.interpret_sample(&cts).map_err(|e| e.to_string())?;
            for t in &mut targets {
                if let Some(c) = call.targets.iter().find(|c| c.target == t.target) {
                    t.state = Some(c.state.to_string());
                }
            }
            (call.call, "kit", call.reason, call.action)
        }
        CallSource::Instrument => {
            let ic = reading
                .instrument_call
                .as_ref()
                .ok_or("no instrument call in the message")?;
            let meaning = ic
                .meaning
                .ok_or_else(|| format!("instrument call {:?} is not in the profile", ic.value))?;
            (
                meaning,
                "instrument",
                format!("instrument call {}", ic.value),
                String::new(),
            )
        }
    };
    Ok(ReportedResult {
        barcode: String::new(),
        pool_size: 1,
        source: ResultSource {
            instrument: analyser.to_owned(),
            message_id,
            order_index: u32::try_from(reading.order_index).unwrap_or(u32::MAX),
            specimen_id: reading.specimen_id.clone(),
            test_code: reading.test_code.clone(),
            profile: profile.key(),
            received_at,
        },
        kit: kit.key(),
        call,
        call_by: call_by.to_owned(),
        reason,
        action,
        instrument_call: reading.instrument_call.as_ref().map(|c| c.value.clone()),
        instrument_call_meaning: reading.instrument_call.as_ref().and_then(|c| c.meaning),
        targets,
    })
}

/// The answer to a message's host queries: one order per queried specimen id that is
/// a received tube (its tests: those asked for that the profile knows, else all the
/// profile's); none → a message ending "I" (no information). `None` without queries.
fn query_answer(lab: &Lab, profile: &MappingProfile, message: &Message) -> Option<Message> {
    let queries = message.queries();
    if queries.is_empty() {
        return None;
    }
    let mut orders = Vec::new();
    for q in &queries {
        let asked: Vec<TestId> = q
            .tests()
            .into_iter()
            .filter(|t| profile.test(&t.code).is_some())
            .map(|t| TestId::new(t.code, &[]))
            .collect();
        let tests = if asked.is_empty() {
            profile
                .tests
                .iter()
                .map(|t| TestId::new(t.code.clone(), &[]))
                .collect()
        } else {
            asked
        };
        for id in q.specimen_ids() {
            if let Ok(tube) = lab.tube(id) {
                orders.push(OrderSpec {
                    specimen_id: tube.barcode.as_str().to_owned(),
                    tests: tests.clone(),
                    priority: match tube.priority {
                        Priority::Urgent => "S".into(),
                        Priority::Routine => "R".into(),
                    },
                    action_code: "N".into(),
                    report_type: "O".into(),
                });
            }
        }
    }
    let header = HeaderSpec {
        sender: format!("pcrd^{}", lab.lab_id()),
        receiver: message
            .header()
            .map(|h| h.sender().value().to_owned())
            .unwrap_or_default(),
        processing_id: "P".into(),
        timestamp: astm_timestamp(SystemTime::now()),
    };
    let mut answer = Message::orders_message(&header, &orders);
    // H.5 "pcrd^LAB" must be components, not a value with an escaped '^'.
    if let Some(h) = answer.records.first_mut() {
        h.set(5, Field::components(["pcrd", lab.lab_id()]));
    }
    Some(answer)
}

/// `YYYYMMDDHHMMSS` in UTC, as LIS2-A2 dates are written.
pub fn astm_timestamp(at: SystemTime) -> String {
    let text = humantime::format_rfc3339_seconds(at).to_string();
    text.chars().filter(char::is_ascii_digit).take(14).collect()
}

/// Reads a message record.
pub fn read_message(store: &Store, id: u64) -> Result<Option<MessageRecord>, StoreError> {
    let key = id_key(b'm', id);
    match store.trees().messages.get(&key)? {
        Some(raw) => Ok(Some(decode(&key, &raw)?)),
        None => Ok(None),
    }
}

/// A stored message's parsed records, rebuilt from their chunks.
pub fn read_records(store: &Store, id: u64) -> Result<Message, StoreError> {
    let bytes = read_chunks(store, b'm', id, b'p')?;
    let stored: StoredRecords = decode(&id_key(b'm', id), &bytes)?;
    let records = stored
        .0
        .into_iter()
        .filter_map(|r| {
            let kind = RecordType::from_byte(u8::try_from(r.kind).ok()?)?;
            Some(Record {
                kind,
                fields: r
                    .fields
                    .into_iter()
                    .map(|repeats| Field { repeats })
                    .collect(),
            })
        })
        .collect();
    // The delimiters only matter for encoding; the text chunks keep the originals.
    let text = read_chunks(store, b'm', id, b't')?;
    let delimiters = text
        .split(|b| *b == pcrd_protocol::astm::CR)
        .next()
        .and_then(|h| Delimiters::from_header(h).ok())
        .unwrap_or_default();
    Ok(Message {
        delimiters,
        records,
    })
}

/// Ids of messages stored and neither applied nor withdrawn.
pub fn pending_ids(store: &Store) -> Result<Vec<u64>, StoreError> {
    let mut out = Vec::new();
    for item in store.trees().messages.scan_prefix([b's']) {
        let (k, _) = item?;
        if let Some(id) = k.get(1..9).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
            out.push(u64::from_be_bytes(id));
        }
    }
    Ok(out)
}

/// Every record under one prefix letter (`q`, `u`), newest first, at most `limit`.
pub fn list<T: Versioned>(store: &Store, prefix: u8, limit: usize) -> Result<Vec<T>, StoreError> {
    let mut out = Vec::new();
    for item in store.trees().messages.scan_prefix([prefix]).rev() {
        let (k, v) = item?;
        if k.len() != 9 {
            continue; // a chunk
        }
        out.push(decode(&k, &v)?);
        if out.len() >= limit {
            break;
        }
    }
    Ok(out)
}

/// A tube's reported results, oldest first.
pub fn reported_for(store: &Store, barcode: &str) -> Result<Vec<ReportedResult>, StoreError> {
    let mut out = Vec::new();
    for item in store.trees().reported.scan_prefix(reported_prefix(barcode)) {
        let (k, v) = item?;
        out.push(decode(&k, &v)?);
    }
    Ok(out)
}

/// One analyser's persisted totals.
pub fn counts(store: &Store, analyser: &str) -> Result<AnalyserCounts, StoreError> {
    let key = counts_key(analyser);
    match store.trees().messages.get(&key)? {
        Some(v) => decode(&key, &v),
        None => Ok(AnalyserCounts::default()),
    }
}

fn host_error(e: &StoreError) -> HostStoreError {
    HostStoreError(e.to_string())
}

impl MessageStore for DurableMessages {
    async fn store(&self, message: &InboundMessage) -> Result<(), HostStoreError> {
        let started = Instant::now();
        let store = self.lab.store().clone();
        // sled calls block; the line's task must not stall the runtime's workers.
        let id = tokio::task::block_in_place(|| self.write_message(message)).map_err(|e| {
            error!(analyser = %self.name, error = %e, "Storing an analyser message failed.");
            host_error(&e)
        })?;
        store.durable().await.map_err(|e| {
            error!(analyser = %self.name, error = %e, "The store could not make an analyser message durable.");
            host_error(&e)
        })?;
        self.metrics.observe_store(&self.name, started.elapsed());
        self.pending()
            .insert(message.key.clone(), (id, Arc::new(message.records.clone())));
        info!(analyser = %self.name, message = id, connection = message.key.connection,
            seq = message.key.seq, bytes = message.raw.len(), "Analyser message stored.");
        Ok(())
    }

    async fn quarantine(&self, item: &Quarantined) -> Result<(), HostStoreError> {
        let withdraw = match (&item.reason, &item.key) {
            (QuarantineReason::Unconfirmed(_), Some(key)) => {
                self.pending().remove(key).map(|(id, _)| id)
            }
            _ => None,
        };
        let store = self.lab.store().clone();
        tokio::task::block_in_place(|| self.write_quarantine(item, withdraw))
            .map_err(|e| host_error(&e))?;
        store.durable().await.map_err(|e| host_error(&e))?;
        self.metrics.quarantined(&self.name);
        if let Some(id) = withdraw {
            warn!(analyser = %self.name, message = id, reason = %item.reason,
                "Stored analyser message withdrawn: the instrument never confirmed it.");
        }
        Ok(())
    }

    async fn confirmed(&self, keys: &[MessageKey]) {
        for key in keys {
            let Some((id, message)) = self.pending().remove(key) else {
                continue;
            };
            let applied = tokio::task::block_in_place(|| self.apply_blocking(id, &message));
            match applied {
                Ok(Applied {
                    answer, results, ..
                }) => {
                    if let Err(e) = self.lab.store().durable().await {
                        error!(analyser = %self.name, message = id, error = %e,
                            "Applied analyser message not durable; it is applied again after a restart.");
                        continue;
                    }
                    if !results.is_empty()
                        && let Err(e) =
                            super::stage::stage_message(&self.lab, &self.name, id, &results).await
                    {
                        error!(analyser = %self.name, message = id, error = %e,
                            "Reported results not staged for review; they are staged at the next start.");
                    }
                    if let Some(message) = answer {
                        let _ = self.outgoing.send(Outgoing {
                            instrument: self.name.clone(),
                            message,
                        });
                    }
                }
                // Still marked pending in the store: applied at the next start.
                Err(e) => error!(analyser = %self.name, message = id, error = %e,
                    "Applying an analyser message failed; it stays pending."),
            }
        }
    }
}

/// The reported results of message `id`, in order (a scan of `reported`: used only
/// to stage results a crash left unstaged).
pub(super) fn reported_for_message(
    store: &Store,
    id: u64,
) -> Result<Vec<ReportedResult>, StoreError> {
    let mut out = Vec::new();
    for item in store.trees().reported.iter() {
        let (key, value) = item?;
        // barcode ++ 0x00 ++ message id (8) ++ order index (4)
        let n = key.len();
        if n >= 12 && key[n - 12..n - 4] == id.to_be_bytes() {
            out.push(decode::<ReportedResult>(&key, &value)?);
        }
    }
    Ok(out)
}

/// Applies every message left pending by an earlier run (stored and acknowledged,
/// then the daemon stopped before the instrument's EOT): the instrument holds an ACK
/// for every frame and will not send it again, so the message counts as sent.
pub(super) fn apply_pending(
    lab: &Lab,
    profiles: &HashMap<String, Arc<MappingProfile>>,
) -> Result<usize, StoreError> {
    let mut applied = 0;
    for id in pending_ids(lab.store())? {
        let Some(record) = read_message(lab.store(), id)? else {
            continue;
        };
        let Some(profile) = profiles.get(&record.instrument) else {
            warn!(analyser = %record.instrument, message = id,
                "A pending message's analyser is no longer configured; left pending.");
            continue;
        };
        let message = read_records(lab.store(), id)?;
        apply_message(lab, &record.instrument, profile, id, &message)?;
        applied += 1;
    }
    Ok(applied)
}

/// How long to wait between attempts to send a query answer when the line is busy.
pub(super) const ANSWER_RETRY: Duration = Duration::from_millis(500);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use pcrd_drivers::astm::MessageKey;

    fn lab(dir: &std::path::Path) -> Arc<Lab> {
        let store = Store::open(&crate::store::StoreOptions {
            path: dir.join("store"),
            cache_bytes: 8 << 20,
        })
        .unwrap();
        let kits = crate::kits::KitRegistry::load(None).unwrap();
        Lab::open(store, kits, "LAB-TEST".into()).unwrap()
    }

    fn messages(lab: &Arc<Lab>) -> DurableMessages {
        let profile =
            MappingProfile::from_toml_str(include_str!("../../../analysers/sim-an01.toml"))
                .unwrap();
        let (outgoing, _) = mpsc::unbounded_channel();
        DurableMessages::new(
            "an-1".into(),
            Arc::new(profile),
            Arc::clone(lab),
            Arc::new(AnalyserMetrics::default()),
            outgoing,
        )
    }

    /// A results message of `specimens` specimens (6 records each).
    fn big_text(specimens: usize) -> Vec<u8> {
        let mut text = String::from("H|\\^&|||SIM-AN01\r");
        for i in 0..specimens {
            text.push_str(&format!(
                "P|{n}\rO|1|T-{i:06}||^^^SARS2|R\rR|1|^^^SARS2|NEG\rR|2|^^^SARS2^ORF1ab^Ct|\rR|3|^^^SARS2^N^Ct|\rR|4|^^^SARS2^IC^Ct|28.{d}\r",
                n = i + 1,
                d = i % 10
            ));
        }
        text.push_str("L|1|N\r");
        text.into_bytes()
    }

    /// A message far over 64 KiB is kept whole, raw bytes, text and records, in
    /// values that all stay under 64 KiB.
    #[test]
    fn large_messages_are_split_into_values_under_64_kib() {
        let dir = tempfile::tempdir().unwrap();
        let lab = lab(dir.path());
        let store = messages(&lab);
        let text = big_text(3000);
        assert!(text.len() > 4 * 64 * 1024, "{} bytes", text.len());
        let mut raw = vec![pcrd_protocol::astm::ENQ];
        raw.extend_from_slice(&text);
        let records = Message::parse(&text).unwrap();
        let message = InboundMessage {
            key: MessageKey {
                instrument: "an-1".into(),
                connection: 0,
                seq: 0,
            },
            text: text.clone(),
            raw: raw.clone(),
            records: records.clone(),
        };
        let id = store.write_message(&message).unwrap();
        let s = lab.store();
        assert_eq!(read_chunks(s, b'm', id, b'r').unwrap(), raw);
        assert_eq!(read_chunks(s, b'm', id, b't').unwrap(), text);
        assert_eq!(read_records(s, id).unwrap(), records);
        let record = read_message(s, id).unwrap().unwrap();
        assert_eq!(record.state, MessageState::Received);
        assert_eq!(record.orders, 3000);
        assert_eq!(pending_ids(s).unwrap(), [id]);
        for item in s.trees().messages.iter() {
            let (k, v) = item.unwrap();
            assert!(v.len() < 64 * 1024, "key {k:?}: {} bytes", v.len());
        }
        // Applied once: every specimen is unknown here (no tube received), so each
        // is an unmatched item; nothing is pending any more, and a second apply
        // does nothing.
        let applied = apply_message(&lab, "an-1", &store.profile, id, &records).unwrap();
        assert_eq!(applied.counts, Some((0, 3000)));
        assert!(pending_ids(s).unwrap().is_empty());
        let again = apply_message(&lab, "an-1", &store.profile, id, &records).unwrap();
        assert_eq!(again.counts, None);
        let totals = counts(s, "an-1").unwrap();
        assert_eq!((totals.messages, totals.unmatched), (1, 3000));
    }

    /// A stored message reported unconfirmed is withdrawn (kept, marked) and never
    /// applied afterwards.
    #[test]
    fn a_withdrawn_message_never_becomes_results() {
        let dir = tempfile::tempdir().unwrap();
        let lab = lab(dir.path());
        let store = messages(&lab);
        let text = big_text(2);
        let key = MessageKey {
            instrument: "an-1".into(),
            connection: 3,
            seq: 1,
        };
        let records = Message::parse(&text).unwrap();
        let id = store
            .write_message(&InboundMessage {
                key: key.clone(),
                text: text.clone(),
                raw: text.clone(),
                records: records.clone(),
            })
            .unwrap();
        let item = Quarantined {
            instrument: "an-1".into(),
            connection: 3,
            key: Some(key),
            reason: QuarantineReason::Unconfirmed(pcrd_protocol::astm::link::AbortReason::Timeout),
            raw: text.clone(),
        };
        store.write_quarantine(&item, Some(id)).unwrap();
        let record = read_message(lab.store(), id).unwrap().unwrap();
        assert!(
            matches!(record.state, MessageState::Withdrawn { .. }),
            "{record:?}"
        );
        assert!(pending_ids(lab.store()).unwrap().is_empty());
        let applied = apply_message(&lab, "an-1", &store.profile, id, &records).unwrap();
        assert_eq!(applied.counts, None, "a withdrawn message was applied");
        let quarantined: Vec<QuarantineRecord> = list(lab.store(), b'q', 10).unwrap();
        assert_eq!(quarantined.len(), 1);
        assert_eq!(quarantined[0].withdrew, Some(id));
        assert_eq!(quarantined[0].kind, "unconfirmed");
        assert_eq!(
            read_chunks(lab.store(), b'q', quarantined[0].id, b'r').unwrap(),
            text
        );
        let totals = counts(lab.store(), "an-1").unwrap();
        assert_eq!(
            (totals.messages, totals.quarantined, totals.withdrawn),
            (1, 1, 1)
        );
    }
}
