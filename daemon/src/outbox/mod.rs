//! The durable outbox: released results waiting for each configured sink.
//!
//! A release writes the result version to `results` and appends a pointer to it to
//! `outbox` in the same store transaction (see `Lab::release_results`). One task per
//! sink ([`worker`]) reads the outbox in release order from its own cursor, hands
//! batches to its sink, and records what became of each item; cursors, attempt counts
//! and dead letters of a sink are written in one atomic batch and made durable before
//! anything is cleaned up. Entries every configured sink has passed are removed
//! afterwards, idempotently; the results themselves stay.
//!
//! Key layouts (all integers big-endian, so sled's byte order is numeric order):
//!
//! - `results`: `result_id` `0x00` `version: u32` → [`StoredResult`] (the record's
//!   JSON and the outbox seq it was released as). A `result_id` never contains
//!   `0x00`, so one id's versions are one prefix, oldest first.
//! - `outbox`: `seq: u64` → [`OutboxEntry`] (which result version; when released;
//!   for a re-queued dead letter, the one sink it is for).
//! - `sink_state`:
//!   - `cursor` `0x00` sink → [`CursorState`]: every seq below `next_seq` is settled
//!     (delivered or dead) for that sink; plus the attempt count of the head item.
//!   - `dead` `0x00` sink `0x00` `seq: u64` → [`DeadLetter`].
//!   - `redo` `0x00` sink `0x00` results key → `seq: u64`: the seq a dead letter was
//!     re-queued as, so per-result delivery state follows it.
//! - `meta`: `outbox_next_seq` → `u64`: the next seq to hand out; kept in the release
//!   transaction so that a seq is never reused, even once the outbox is empty.

pub mod worker;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use pcrd_protocol::domain::Barcode;
use pcrd_protocol::upstream::{RESULT_SCHEMA_VERSION, ResultRecord, ResultStatus};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use crate::metrics::Histogram;
use crate::sinks::DeadReason;
use crate::store::{Store, StoreError, Versioned, decode};

/// `meta` key of the next outbox seq.
pub const META_OUTBOX_NEXT: &[u8] = b"outbox_next_seq";
/// Longest result id accepted: ids are `lab-run-well-tube`, far shorter; the bound
/// keeps keys small.
pub const MAX_RESULT_ID_LEN: usize = 128;
/// A record's JSON above this is refused at release: stored values stay far below
/// sled's blob threshold (64 KiB), dead letters carry a copy plus the detail.
pub const MAX_RECORD_JSON: usize = 32 * 1024;
/// Longest dead-letter detail kept (a receiver's response body can be large).
const MAX_DETAIL: usize = 4 * 1024;

/// A result version as stored in `results`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredResult {
    /// The outbox seq it was released as.
    pub seq: u64,
    /// When it was released (ms since the epoch, the daemon's clock).
    pub released_ms: i64,
    /// The [`ResultRecord`] as JSON: the record skips `correction_reason` when absent,
    /// which a non-self-describing format like postcard cannot read back.
    pub json: String,
}

impl Versioned for StoredResult {
    const TREE: &'static str = "results";
    const VERSION: u8 = 1;
}

impl StoredResult {
    pub fn record(&self, key: &[u8]) -> Result<ResultRecord, StoreError> {
        serde_json::from_str(&self.json).map_err(|e| StoreError::BadRecord {
            tree: "results",
            key: String::from_utf8_lossy(key).into_owned(),
            detail: e.to_string(),
        })
    }
}

/// One outbox entry: a pointer to a result version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub result_id: String,
    pub version: u32,
    pub released_ms: i64,
    /// Set for a dead letter re-queued for one sink; every other sink passes over it.
    pub only_sink: Option<String>,
}

impl Versioned for OutboxEntry {
    const TREE: &'static str = "outbox";
    const VERSION: u8 = 1;
}

/// A sink's durable position.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CursorState {
    /// Every seq below this is settled for the sink.
    pub next_seq: u64,
    /// Items delivered since the sink was first configured.
    pub delivered: u64,
    /// Items dead-lettered since the sink was first configured.
    pub dead: u64,
    /// Attempts so far at `attempt_seq` (the head item after a retry).
    pub attempt: u32,
    pub attempt_seq: u64,
    pub last_error: Option<String>,
    /// Not before this (ms since the epoch) after a retry.
    pub next_attempt_ms: Option<i64>,
}

impl Versioned for CursorState {
    const TREE: &'static str = "sink_state";
    const VERSION: u8 = 1;
}

/// A result version a sink refused for good.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub sink: String,
    pub seq: u64,
    pub idempotency_key: String,
    pub reason: DeadReason,
    pub detail: String,
    pub at_ms: i64,
    /// A copy of the record as JSON, so the letter can be read without the results tree.
    pub record_json: String,
}

impl Versioned for DeadLetter {
    const TREE: &'static str = "sink_state";
    const VERSION: u8 = 1;
}

pub fn result_prefix(result_id: &str) -> Vec<u8> {
    let mut key = result_id.as_bytes().to_vec();
    key.push(0);
    key
}

pub fn result_key(result_id: &str, version: u32) -> Vec<u8> {
    let mut key = result_prefix(result_id);
    key.extend_from_slice(&version.to_be_bytes());
    key
}

pub fn outbox_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

pub fn cursor_key(sink: &str) -> Vec<u8> {
    let mut key = b"cursor\0".to_vec();
    key.extend_from_slice(sink.as_bytes());
    key
}

pub fn dead_prefix(sink: &str) -> Vec<u8> {
    let mut key = b"dead\0".to_vec();
    key.extend_from_slice(sink.as_bytes());
    key.push(0);
    key
}

pub fn dead_key(sink: &str, seq: u64) -> Vec<u8> {
    let mut key = dead_prefix(sink);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

pub fn redo_key(sink: &str, results_key: &[u8]) -> Vec<u8> {
    let mut key = b"redo\0".to_vec();
    key.extend_from_slice(sink.as_bytes());
    key.push(0);
    key.extend_from_slice(results_key);
    key
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub fn rfc3339_ms(ms: i64) -> String {
    humantime::format_rfc3339_millis(
        UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64),
    )
    .to_string()
}

pub(crate) fn truncate_detail(detail: &str) -> String {
    if detail.len() <= MAX_DETAIL {
        return detail.to_string();
    }
    let mut end = MAX_DETAIL;
    while !detail.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes in all)", &detail[..end], detail.len())
}

// ----- release -----

/// Writes planned by a release, for the lab to apply in its transaction.
#[derive(Debug, Default)]
pub struct ReleasePlan {
    /// `results` key → value.
    pub results: Vec<(Vec<u8>, Vec<u8>)>,
    /// `outbox` key → value.
    pub outbox: Vec<(Vec<u8>, Vec<u8>)>,
    /// The next seq after this release.
    pub next_seq: u64,
    /// One per record, in order: (idempotency key, seq, tube, audit line).
    pub released: Vec<Released>,
}

/// One released result version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Released {
    pub key: String,
    pub seq: u64,
    pub tube: Barcode,
    pub detail: String,
    pub corrected: bool,
}

/// Why a release was refused; nothing was written.
#[derive(Debug, PartialEq, Eq)]
pub enum ReleaseRefusal {
    /// The records themselves are wrong (schema version, missing reason, bad barcode).
    Invalid(Vec<String>),
    /// They contradict what was released before (a duplicate, a version gap).
    Conflict(Vec<String>),
}

/// Validates `records` against each other and the `results` tree and plans their
/// writes, seqs from `first_seq`. Call under the lab's writer lock.
pub fn plan_release(
    store: &Store,
    lab_id: &str,
    records: &[ResultRecord],
    first_seq: u64,
    released_ms: i64,
) -> Result<ReleasePlan, ReleaseRefusal> {
    let mut invalid = Vec::new();
    let mut conflict = Vec::new();
    let mut plan = ReleasePlan {
        next_seq: first_seq,
        ..ReleasePlan::default()
    };
    // Latest version per id within this request, so v1 and v2 may come together.
    let mut latest_here: std::collections::HashMap<&str, u32> = std::collections::HashMap::new();
    for (i, record) in records.iter().enumerate() {
        let at = format!("results[{i}] ({})", record.idempotency_key());
        let before = invalid.len() + conflict.len();
        if record.schema_version != RESULT_SCHEMA_VERSION {
            invalid.push(format!(
                "{at}: schema_version {} is not supported; this pcrd writes {RESULT_SCHEMA_VERSION}",
                record.schema_version
            ));
        }
        let id = record.result_id.as_str();
        if id.trim().is_empty() || id.len() > MAX_RESULT_ID_LEN || id.chars().any(char::is_control)
        {
            invalid.push(format!(
                "{at}: result_id must be 1..={MAX_RESULT_ID_LEN} bytes without control characters"
            ));
        }
        if record.version == 0 {
            invalid.push(format!("{at}: version starts at 1"));
        }
        if record.lab_id != lab_id {
            invalid.push(format!(
                "{at}: lab_id {:?} is not this lab ({lab_id:?})",
                record.lab_id
            ));
        }
        let reason = record
            .correction_reason
            .as_deref()
            .filter(|r| !r.trim().is_empty());
        match (record.status, reason) {
            (ResultStatus::Corrected, None) => {
                invalid.push(format!(
                    "{at}: a corrected result needs a correction_reason"
                ));
            }
            (ResultStatus::Corrected, Some(_)) if record.version < 2 => {
                invalid.push(format!(
                    "{at}: a correction replaces a previous version, so its version is at least 2"
                ));
            }
            (ResultStatus::Preliminary | ResultStatus::Final, Some(_)) => invalid.push(format!(
                "{at}: correction_reason is only for status corrected"
            )),
            (ResultStatus::Preliminary | ResultStatus::Final, None)
                if record.correction_reason.is_some() =>
            {
                invalid.push(format!("{at}: correction_reason is empty"));
            }
            _ => {}
        }
        let tube = Barcode::new(record.tube.clone());
        if let Err(e) = &tube {
            invalid.push(format!("{at}: tube: {e}"));
        }
        if record.pool_size == 0 {
            invalid.push(format!("{at}: pool_size must be at least 1"));
        }
        for field in [&record.tested_at, &record.released_at] {
            if humantime::parse_rfc3339_weak(field).is_err() {
                invalid.push(format!("{at}: {field:?} is not an RFC 3339 time"));
            }
        }
        for target in &record.targets {
            if target.ct.is_some_and(|ct| !ct.is_finite() || ct < 0.0) {
                invalid.push(format!(
                    "{at}: target {}: Ct must be a finite non-negative number or null",
                    target.name
                ));
            }
        }
        let json = match serde_json::to_string(record) {
            Ok(json) if json.len() <= MAX_RECORD_JSON => json,
            Ok(json) => {
                invalid.push(format!(
                    "{at}: the record is {} bytes as JSON; the limit is {MAX_RECORD_JSON}",
                    json.len()
                ));
                String::new()
            }
            Err(e) => {
                invalid.push(format!("{at}: cannot be written as JSON: {e}"));
                String::new()
            }
        };
        if invalid.len() + conflict.len() != before || record.version == 0 {
            continue;
        }
        let stored_latest = match latest_here.get(id) {
            Some(v) => Some(*v),
            None => match latest_version(store, id) {
                Ok(v) => v,
                Err(e) => {
                    invalid.push(format!("{at}: cannot read earlier versions: {e}"));
                    continue;
                }
            },
        };
        let expected = stored_latest.map_or(1, |v| v + 1);
        if record.version != expected {
            conflict.push(match stored_latest {
                Some(latest) if record.version <= latest => format!(
                    "{at}: result {id} version {} was already released (latest is {latest}); a change is a new version {expected}",
                    record.version
                ),
                Some(latest) => format!(
                    "{at}: result {id} is at version {latest}; the next release must be version {expected}"
                ),
                None => format!(
                    "{at}: result {id} has never been released; its first version must be 1"
                ),
            });
            continue;
        }
        latest_here.insert(id, record.version);
        let Ok(tube) = tube else { continue };
        let seq = plan.next_seq;
        plan.next_seq += 1;
        let key = result_key(id, record.version);
        plan.results.push((
            key,
            crate::store::encode(&StoredResult {
                seq,
                released_ms,
                json,
            }),
        ));
        plan.outbox.push((
            outbox_key(seq).to_vec(),
            crate::store::encode(&OutboxEntry {
                result_id: id.to_string(),
                version: record.version,
                released_ms,
                only_sink: None,
            }),
        ));
        let corrected = record.status == ResultStatus::Corrected;
        plan.released.push(Released {
            key: record.idempotency_key(),
            seq,
            tube,
            detail: format!(
                "released result {} ({}, {}) as outbox entry {seq}{}",
                record.idempotency_key(),
                record.status.as_str(),
                record.interpretation.as_str(),
                reason
                    .map(|r| format!("; correction: {r}"))
                    .unwrap_or_default()
            ),
            corrected,
        });
    }
    if !invalid.is_empty() {
        invalid.extend(conflict);
        return Err(ReleaseRefusal::Invalid(invalid));
    }
    if !conflict.is_empty() {
        return Err(ReleaseRefusal::Conflict(conflict));
    }
    Ok(plan)
}

/// The newest released version of `result_id`, if any.
pub fn latest_version(store: &Store, result_id: &str) -> Result<Option<u32>, StoreError> {
    let prefix = result_prefix(result_id);
    match store.trees().results.scan_prefix(&prefix).next_back() {
        Some(entry) => {
            let (key, _) = entry?;
            let tail = &key[prefix.len()..];
            Ok(tail.try_into().ok().map(u32::from_be_bytes))
        }
        None => Ok(None),
    }
}

/// A stored result version.
pub fn load_result(
    store: &Store,
    result_id: &str,
    version: u32,
) -> Result<Option<(StoredResult, ResultRecord)>, StoreError> {
    let key = result_key(result_id, version);
    match store.trees().results.get(&key)? {
        Some(raw) => {
            let stored: StoredResult = decode(&key, &raw)?;
            let record = stored.record(&key)?;
            Ok(Some((stored, record)))
        }
        None => Ok(None),
    }
}

/// Reads the next seq to hand out (`meta`), or 1 for a store without releases.
pub fn stored_next_seq(store: &Store) -> Result<u64, StoreError> {
    match store.trees().meta.get(META_OUTBOX_NEXT)? {
        Some(raw) => raw
            .as_ref()
            .try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| StoreError::BadRecord {
                tree: "meta",
                key: "outbox_next_seq".into(),
                detail: "wrong length".into(),
            }),
        None => Ok(1),
    }
}

pub fn load_cursor(store: &Store, sink: &str) -> Result<Option<CursorState>, StoreError> {
    let key = cursor_key(sink);
    match store.trees().sink_state.get(&key)? {
        Some(raw) => Ok(Some(decode(&key, &raw)?)),
        None => Ok(None),
    }
}

/// Dead letters, oldest first, of one sink or all.
pub fn dead_letters(store: &Store, sink: Option<&str>) -> Result<Vec<DeadLetter>, StoreError> {
    let prefix = match sink {
        Some(sink) => dead_prefix(sink),
        None => b"dead\0".to_vec(),
    };
    let mut out = Vec::new();
    for entry in store.trees().sink_state.scan_prefix(&prefix) {
        let (key, raw) = entry?;
        out.push(decode::<DeadLetter>(&key, &raw)?);
    }
    Ok(out)
}

// ----- re-queueing dead letters -----

/// Which dead letters to re-queue.
#[derive(Clone, Debug)]
pub enum RetrySelection {
    All,
    /// Idempotency keys (`result_id:version`).
    Keys(Vec<String>),
}

/// Writes planned by a re-queue: new outbox entries for one sink each, the dead
/// letters removed, the redo pointers.
#[derive(Debug, Default)]
pub struct RequeuePlan {
    pub outbox: Vec<(Vec<u8>, Vec<u8>)>,
    pub sink_state: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    pub next_seq: u64,
    pub requeued: Vec<Requeued>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Requeued {
    pub sink: String,
    pub idempotency_key: String,
    pub seq: u64,
}

/// Plans re-queueing the selected dead letters of `sinks` (configured sinks only),
/// new seqs from `first_seq`. Keys that match no dead letter are refused by name.
pub fn plan_requeue(
    store: &Store,
    sinks: &[String],
    selection: &RetrySelection,
    first_seq: u64,
    now: i64,
) -> Result<RequeuePlan, Result<Vec<String>, StoreError>> {
    let mut plan = RequeuePlan {
        next_seq: first_seq,
        ..RequeuePlan::default()
    };
    let mut found = std::collections::HashSet::new();
    for sink in sinks {
        for letter in dead_letters(store, Some(sink)).map_err(Err)? {
            let wanted = match selection {
                RetrySelection::All => true,
                RetrySelection::Keys(keys) => keys.contains(&letter.idempotency_key),
            };
            if !wanted {
                continue;
            }
            found.insert(letter.idempotency_key.clone());
            let Some((id, version)) = split_key(&letter.idempotency_key) else {
                continue;
            };
            let seq = plan.next_seq;
            plan.next_seq += 1;
            plan.outbox.push((
                outbox_key(seq).to_vec(),
                crate::store::encode(&OutboxEntry {
                    result_id: id.to_string(),
                    version,
                    released_ms: now,
                    only_sink: Some(sink.clone()),
                }),
            ));
            plan.sink_state.push((dead_key(sink, letter.seq), None));
            plan.sink_state.push((
                redo_key(sink, &result_key(id, version)),
                Some(seq.to_be_bytes().to_vec()),
            ));
            plan.requeued.push(Requeued {
                sink: sink.clone(),
                idempotency_key: letter.idempotency_key,
                seq,
            });
        }
    }
    if let RetrySelection::Keys(keys) = selection {
        let missing: Vec<String> = keys
            .iter()
            .filter(|k| !found.contains(*k))
            .map(|k| format!("{k}: no dead letter with this key for the selected sink(s)"))
            .collect();
        if !missing.is_empty() {
            return Err(Ok(missing));
        }
    }
    Ok(plan)
}

/// `result_id:version` → its parts (the id may itself contain colons).
pub fn split_key(key: &str) -> Option<(&str, u32)> {
    let (id, version) = key.rsplit_once(':')?;
    Some((id, version.parse().ok()?))
}

// ----- live state shared by workers, the API and /metrics -----

/// What a sink is doing right now.
#[derive(Debug)]
pub struct SinkRuntime {
    pub name: String,
    pub kind: &'static str,
    pub batch_size: usize,
    /// The cursor as last made durable.
    pub durable_cursor: AtomicU64,
    /// Seqs handed to the sink and not yet settled (first, last).
    pub in_flight: Mutex<Option<(u64, u64)>>,
    /// Wakes the worker early (an operator's retry).
    pub wake: Notify,
    /// Since the daemon started.
    pub delivered: AtomicU64,
    pub retried: AtomicU64,
    pub dead: AtomicU64,
    /// How long each `deliver` call took.
    pub latency: Histogram,
    /// From release to the sink's acknowledgement, per item.
    pub turnaround: Histogram,
    /// Last error and next attempt, as last written.
    pub status: Mutex<(Option<String>, Option<i64>)>,
}

impl SinkRuntime {
    pub fn new(name: String, kind: &'static str, batch_size: usize, cursor: u64) -> SinkRuntime {
        SinkRuntime {
            name,
            kind,
            batch_size,
            durable_cursor: AtomicU64::new(cursor),
            in_flight: Mutex::new(None),
            wake: Notify::new(),
            delivered: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            dead: AtomicU64::new(0),
            latency: Histogram::default(),
            turnaround: Histogram::default(),
            status: Mutex::new((None, None)),
        }
    }

    fn in_flight(&self) -> Option<(u64, u64)> {
        *self
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The outbox's shared state: the release signal and the running sinks.
#[derive(Debug)]
pub struct Outbox {
    /// The next seq after the newest release; workers wait on changes.
    released: watch::Sender<u64>,
    sinks: RwLock<Vec<Arc<SinkRuntime>>>,
    /// Outbox entries below this have been removed.
    cleaned_below: AtomicU64,
}

impl Outbox {
    pub fn new(next_seq: u64) -> Outbox {
        Outbox {
            released: watch::channel(next_seq).0,
            sinks: RwLock::new(Vec::new()),
            cleaned_below: AtomicU64::new(0),
        }
    }

    /// Called after a release (or re-queue) committed: wakes every worker.
    pub fn released(&self, next_seq: u64) {
        self.released.send_replace(next_seq);
    }

    pub fn next_seq(&self) -> u64 {
        *self.released.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.released.subscribe()
    }

    pub fn register(&self, sink: Arc<SinkRuntime>) {
        self.sinks
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(sink);
    }

    pub fn sinks(&self) -> Vec<Arc<SinkRuntime>> {
        self.sinks
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn sink(&self, name: &str) -> Option<Arc<SinkRuntime>> {
        self.sinks().into_iter().find(|s| s.name == name)
    }

    /// Removes outbox entries every configured sink has durably passed. Idempotent:
    /// two workers may do it at once, and a crash halfway leaves entries that the next
    /// run removes. Returns how many were removed.
    pub fn clean_up(&self, store: &Store) -> Result<u64, StoreError> {
        let sinks = self.sinks();
        let Some(below) = sinks
            .iter()
            .map(|s| s.durable_cursor.load(Ordering::Acquire))
            .min()
        else {
            return Ok(0);
        };
        let from = self.cleaned_below.load(Ordering::Acquire);
        if below <= from {
            return Ok(0);
        }
        let tree = &store.trees().outbox;
        let mut removed = 0;
        loop {
            let mut batch = sled::Batch::default();
            let mut n = 0;
            for entry in tree.range(..outbox_key(below)).keys().take(10_000) {
                batch.remove(entry?);
                n += 1;
            }
            if n == 0 {
                break;
            }
            tree.apply_batch(batch)?;
            removed += n;
        }
        self.cleaned_below.fetch_max(below, Ordering::AcqRel);
        Ok(removed)
    }

    /// Per-sink status, read from the store and the workers.
    pub fn status(&self, store: &Store) -> Result<Vec<SinkStatus>, StoreError> {
        let next = self.next_seq();
        let now = now_ms();
        let mut out = Vec::new();
        for sink in self.sinks() {
            let cursor = load_cursor(store, &sink.name)?.unwrap_or_default();
            let in_flight = sink.in_flight();
            let in_flight_count = in_flight
                .filter(|(first, _)| *first >= cursor.next_seq)
                .map_or(0, |(first, last)| last + 1 - first);
            // The first entry at or after the cursor: a sink added back after a
            // cleanup has a cursor below the oldest entry left.
            let first = match store
                .trees()
                .outbox
                .range(outbox_key(cursor.next_seq)..)
                .next()
            {
                Some(entry) => {
                    let (key, raw) = entry?;
                    let seq = key
                        .as_ref()
                        .try_into()
                        .map(u64::from_be_bytes)
                        .unwrap_or(next);
                    Some((seq, decode::<OutboxEntry>(&key, &raw)?.released_ms))
                }
                None => None,
            };
            let waiting = first.map_or(0, |(seq, _)| next.saturating_sub(seq));
            let oldest_ms = first.map(|(_, ms)| ms);
            let dead = store
                .trees()
                .sink_state
                .scan_prefix(dead_prefix(&sink.name))
                .count() as u64;
            out.push(SinkStatus {
                sink: sink.name.clone(),
                kind: sink.kind,
                cursor: cursor.next_seq,
                pending: waiting.saturating_sub(in_flight_count),
                in_flight: in_flight_count,
                delivered: cursor.delivered,
                dead,
                oldest_pending_age_seconds: oldest_ms.map(|ms| (now - ms).max(0) as f64 / 1000.0),
                last_error: cursor.last_error.clone(),
                attempt: cursor.attempt,
                next_attempt: cursor.next_attempt_ms.filter(|t| *t > now).map(rfc3339_ms),
            });
        }
        Ok(out)
    }

    /// Where one result version stands for each configured sink.
    pub fn delivery_state(
        &self,
        store: &Store,
        result_id: &str,
        version: u32,
    ) -> Result<Option<Vec<(String, DeliveryState)>>, StoreError> {
        let Some((stored, _)) = load_result(store, result_id, version)? else {
            return Ok(None);
        };
        let rkey = result_key(result_id, version);
        let mut out = Vec::new();
        for sink in self.sinks() {
            let seq = match store.trees().sink_state.get(redo_key(&sink.name, &rkey))? {
                Some(raw) => raw
                    .as_ref()
                    .try_into()
                    .map(u64::from_be_bytes)
                    .unwrap_or(stored.seq),
                None => stored.seq,
            };
            let state = if store
                .trees()
                .sink_state
                .contains_key(dead_key(&sink.name, seq))?
            {
                DeliveryState::Dead
            } else if seq < sink.durable_cursor.load(Ordering::Acquire) {
                DeliveryState::Delivered
            } else if sink
                .in_flight()
                .is_some_and(|(first, last)| (first..=last).contains(&seq))
            {
                DeliveryState::InFlight
            } else {
                DeliveryState::Pending
            };
            out.push((sink.name.clone(), state));
        }
        Ok(Some(out))
    }

    /// Appends the outbox's metrics in the Prometheus text format.
    pub fn render_metrics(&self, store: &Store, out: &mut String) {
        use std::fmt::Write as _;
        let status = self.status(store).unwrap_or_default();
        let sinks = self.sinks();
        let mut gauge = |name: &str,
                         help: &str,
                         kind: &str,
                         value: &dyn Fn(&SinkStatus, &SinkRuntime) -> f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (s, rt) in status.iter().zip(&sinks) {
                let _ = writeln!(out, "{name}{{sink=\"{}\"}} {}", s.sink, value(s, rt));
            }
        };
        gauge(
            "pcrd_outbox_depth",
            "Result versions not yet settled for the sink.",
            "gauge",
            &|s, _| (s.pending + s.in_flight) as f64,
        );
        gauge(
            "pcrd_outbox_lag_seconds",
            "Age of the oldest result version the sink has not settled (0 when none).",
            "gauge",
            &|s, _| s.oldest_pending_age_seconds.unwrap_or(0.0),
        );
        gauge(
            "pcrd_outbox_dead_letters",
            "Dead letters waiting for an operator.",
            "gauge",
            &|s, _| s.dead as f64,
        );
        gauge(
            "pcrd_outbox_delivered_total",
            "Items delivered since start.",
            "counter",
            &|_, rt| rt.delivered.load(Ordering::Relaxed) as f64,
        );
        gauge(
            "pcrd_outbox_retried_total",
            "Items retried since start.",
            "counter",
            &|_, rt| rt.retried.load(Ordering::Relaxed) as f64,
        );
        gauge(
            "pcrd_outbox_dead_total",
            "Items dead-lettered since start.",
            "counter",
            &|_, rt| rt.dead.load(Ordering::Relaxed) as f64,
        );
        for (i, rt) in sinks.iter().enumerate() {
            render_labelled(
                &rt.latency,
                out,
                "pcrd_outbox_delivery_seconds",
                "Duration of one batch delivery call.",
                &rt.name,
                i == 0,
            );
        }
        for (i, rt) in sinks.iter().enumerate() {
            render_labelled(
                &rt.turnaround,
                out,
                "pcrd_outbox_turnaround_seconds",
                "From release to the sink's acknowledgement, per result.",
                &rt.name,
                i == 0,
            );
        }
    }
}

/// Renders a histogram with a `sink` label (the shared renderer has none): its
/// HELP/TYPE lines once per family, the label on every sample.
fn render_labelled(
    histogram: &Histogram,
    out: &mut String,
    name: &str,
    help: &str,
    sink: &str,
    first: bool,
) {
    let mut plain = String::new();
    histogram.render(&mut plain, name, help);
    for line in plain.lines() {
        if line.starts_with('#') {
            if first {
                out.push_str(line);
                out.push('\n');
            }
            continue;
        }
        let labelled = if let Some(rest) = line.strip_prefix(&format!("{name}_bucket{{")) {
            format!("{name}_bucket{{sink=\"{sink}\",{rest}")
        } else if let Some((metric, value)) = line.split_once(' ') {
            format!("{metric}{{sink=\"{sink}\"}} {value}")
        } else {
            continue;
        };
        out.push_str(&labelled);
        out.push('\n');
    }
}

/// Where a result version stands for one sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    Pending,
    InFlight,
    Delivered,
    Dead,
}

/// One sink's status, as `GET /api/v1/outbox` reports it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SinkStatus {
    pub sink: String,
    pub kind: &'static str,
    pub cursor: u64,
    pub pending: u64,
    pub in_flight: u64,
    pub delivered: u64,
    pub dead: u64,
    pub oldest_pending_age_seconds: Option<f64>,
    pub last_error: Option<String>,
    pub attempt: u32,
    pub next_attempt: Option<String>,
}

#[cfg(test)]
mod tests;
