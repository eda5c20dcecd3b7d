//! The lab's state: tubes, plates and the audit trail, and every operation that
//! changes them.
//!
//! Writers are serialised by one mutex. Each operation validates against the current
//! state, builds its complete set of changes, and applies them in one sled transaction
//! together with its audit entries; only then does the caller wait on the store's
//! durability barrier, outside the mutex, so concurrent requests share one fsync.
//! An operation that fails validation writes nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pcrd_protocol::domain::{
    Barcode, Layout, LayoutError, Lineage, LineageError, PlateFormat, PoolSize, Priority,
    Timestamp, Well, combine_quadrants, plating_order, transfer_layout,
};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use crate::kits::KitRegistry;
use crate::model::{
    AuditEntry, Placement, PlateId, PlateKind, PlateRecord, PlateState, TubeRecord,
};
use crate::store::{Store, StoreError, Versioned, decode, encode};

/// Largest number of tubes in one receive request.
/// Larger batches are slower per tube in sled and cost memory in proportion
/// (BENCHMARKS.md §1); 10,000 is ten times what the import tool sends.
pub const MAX_BATCH: usize = 10_000;
/// Tubes listed per audit entry. A batch is split so that no stored value grows past
/// sled's blob threshold (~128 KiB): sled writes larger values to separate blob files
/// that it never fsyncs, which our barrier would not cover.
const AUDIT_TUBES_PER_ENTRY: usize = 1_000;
/// Upper bound for any value pcrd writes; see `AUDIT_TUBES_PER_ENTRY`.
const MAX_VALUE_BYTES: usize = 64 * 1024;

const META_AUDIT_HEAD: &[u8] = b"audit_head";
const META_PLATE_COUNTER: &[u8] = b"plate_counter";
/// Tubes stored and tubes waiting (u64 BE each), kept in step with the trees in the
/// same transactions, so gauges need no scan of a million keys.
const META_COUNTS: &[u8] = b"counts";

/// Why an operation was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LabError {
    /// The request is well-formed but its content is not acceptable (a bad barcode, a
    /// well outside the plate, an unknown kit). `problems` lists each one.
    #[error("{message}")]
    Invalid {
        message: String,
        problems: Vec<String>,
    },
    /// The plate or tube named in the request path does not exist.
    #[error("{message}")]
    NotFound { message: String },
    /// The request contradicts the current state (a tube already on another plate, a
    /// sealed plate, a control well, a barcode received with another pool size).
    #[error("{message}")]
    Conflict {
        message: String,
        problems: Vec<String>,
    },
    /// The store failed; nothing was acknowledged.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl LabError {
    fn invalid(message: impl Into<String>) -> LabError {
        LabError::Invalid {
            message: message.into(),
            problems: Vec::new(),
        }
    }
    fn invalid_all(message: impl Into<String>, problems: Vec<String>) -> LabError {
        LabError::Invalid {
            message: message.into(),
            problems,
        }
    }
    fn conflict(message: impl Into<String>) -> LabError {
        LabError::Conflict {
            message: message.into(),
            problems: Vec::new(),
        }
    }
    fn conflict_all(message: impl Into<String>, problems: Vec<String>) -> LabError {
        LabError::Conflict {
            message: message.into(),
            problems,
        }
    }
    fn not_found(message: impl Into<String>) -> LabError {
        LabError::NotFound {
            message: message.into(),
        }
    }
}

impl From<LayoutError> for LabError {
    fn from(e: LayoutError) -> LabError {
        match e {
            LayoutError::OutsideFormat { .. } | LayoutError::Empty { .. } => {
                LabError::invalid(e.to_string())
            }
            _ => LabError::conflict(e.to_string()),
        }
    }
}

impl From<LineageError> for LabError {
    fn from(e: LineageError) -> LabError {
        LabError::conflict(e.to_string())
    }
}

/// Who is acting, and why (both go into the audit trail).
#[derive(Clone, Debug)]
pub struct Actor {
    pub user: String,
    pub reason: Option<String>,
}

/// When a tube is due, as the client gave it.
#[derive(Clone, Debug)]
pub enum Due {
    /// An RFC 3339 time.
    At(String),
    /// A duration from receipt, such as "4h" or "90min".
    In(String),
}

/// The longest `due_in` accepted: a due time a month out is a typo.
const MAX_DUE_IN: Duration = Duration::from_secs(30 * 24 * 3600);

impl Due {
    /// The due time of a tube received at `received_at`, or why the text is not one.
    /// The CLI's import checks files with this too, so both refuse the same rows.
    pub fn resolve(&self, received_at: Timestamp) -> Result<Timestamp, String> {
        match self {
            Due::At(text) => humantime::parse_rfc3339_weak(text)
                .map(|t| {
                    let ms = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
                    Timestamp::from_millis(ms as i64)
                })
                .map_err(|e| format!("due time {text:?} is not an RFC 3339 time: {e}")),
            Due::In(text) => match humantime::parse_duration(text) {
                Ok(d) if d > Duration::ZERO && d <= MAX_DUE_IN => {
                    Ok(received_at.saturating_add_millis(d.as_millis() as i64))
                }
                Ok(_) => Err(format!("due in {text:?} must be between 1s and 30 days")),
                Err(e) => Err(format!("due in {text:?} is not a duration like 4h: {e}")),
            },
        }
    }
}

/// One tube to receive, as the client gave it; validated by [`Lab::receive_tubes`].
#[derive(Clone, Debug)]
pub struct TubeIntake {
    pub barcode: String,
    pub pool_size: Option<u32>,
    pub priority: Option<String>,
    pub due: Option<Due>,
}

/// What a receive did.
#[derive(Clone, Debug, Default)]
pub struct ReceiveOutcome {
    /// Newly recorded tubes.
    pub received: Vec<Barcode>,
    /// Tubes that were already recorded with the same pool size and priority: a retry.
    pub already_received: Vec<Barcode>,
}

/// Filters for the audit trail.
#[derive(Clone, Debug, Default)]
pub struct AuditQuery {
    pub plate: Option<String>,
    pub tube: Option<String>,
    /// Only entries before this sequence number (for paging back).
    pub before: Option<u64>,
    pub limit: usize,
}

/// What a scrub read.
#[derive(Clone, Debug, Default)]
pub struct ScrubReport {
    pub tubes: u64,
    pub plates: u64,
    pub audit_entries: u64,
}

/// Result of walking the audit chain.
#[derive(Clone, Debug)]
pub struct AuditVerification {
    pub entries: u64,
    /// The first entry whose hash does not match its content or predecessor.
    pub first_broken: Option<u64>,
}

#[derive(Debug)]
struct Writer {
    /// The next outbox seq (see `crate::outbox`).
    outbox_next: u64,
    next_seq: u64,
    head: [u8; 32],
    plate_counter: u64,
}

/// A planned audit entry; sequence and hashes are assigned at commit.
#[derive(Debug)]
struct AuditDraft {
    action: &'static str,
    plate: Option<PlateId>,
    tubes: Vec<Barcode>,
    detail: String,
}

#[derive(Clone, Copy, Debug)]
enum T {
    Tubes = 0,
    Waiting,
    Plates,
    Audit,
    AuditByPlate,
    Meta,
    Results,
    Outbox,
    SinkState,
    /// Watched-folder imports (`crate::folders`), staged with their candidates.
    Imports,
    /// Review candidates, the rerun list and turnaround stamps (`crate::review`).
    Review,
}

/// Sequence numbers of the audit entries one draft becomes (a draft listing many
/// tubes is split into entries of `AUDIT_TUBES_PER_ENTRY`).
#[derive(Clone, Copy, Debug)]
struct AuditSeqs {
    first: u64,
}

impl AuditSeqs {
    /// The entry that lists the draft's `index`-th tube.
    fn of_tube(self, index: usize) -> u64 {
        self.first + (index / AUDIT_TUBES_PER_ENTRY) as u64
    }
}

/// Everything one operation will write.
#[derive(Debug, Default)]
struct Changes {
    writes: Vec<(T, Vec<u8>, Option<Vec<u8>>)>,
    audit: Vec<AuditDraft>,
    /// The sequence number the next audit entry will get.
    next_seq: u64,
    plate_counter: Option<u64>,
    /// Tubes this change adds to the `tubes` tree.
    tubes_added: u64,
    /// Net change to the `waiting` tree.
    waiting_delta: i64,
    /// The next outbox seq after this change, when it appends to the outbox.
    outbox_next: Option<u64>,
}

impl Changes {
    fn new(next_seq: u64) -> Changes {
        Changes {
            next_seq,
            ..Changes::default()
        }
    }
    fn put<V: Versioned>(&mut self, tree: T, key: impl Into<Vec<u8>>, value: &V) {
        self.writes.push((tree, key.into(), Some(encode(value))));
    }
    fn put_raw(&mut self, tree: T, key: impl Into<Vec<u8>>, value: Vec<u8>) {
        self.writes.push((tree, key.into(), Some(value)));
    }
    fn remove(&mut self, tree: T, key: impl Into<Vec<u8>>) {
        self.writes.push((tree, key.into(), None));
    }
    /// Plans an audit entry (several, for many tubes) and says which sequence numbers
    /// they will have, so that tube records can point at them in the same transaction.
    fn audit(
        &mut self,
        action: &'static str,
        plate: Option<&PlateId>,
        tubes: Vec<Barcode>,
        detail: String,
    ) -> AuditSeqs {
        let seqs = AuditSeqs {
            first: self.next_seq,
        };
        self.next_seq += tubes.len().div_ceil(AUDIT_TUBES_PER_ENTRY).max(1) as u64;
        self.audit.push(AuditDraft {
            action,
            plate: plate.cloned(),
            tubes,
            detail,
        });
        seqs
    }
    /// Queues a tube for plating.
    fn enqueue(&mut self, tube: &TubeRecord) {
        self.put_raw(T::Waiting, tube.waiting_key(), Vec::new());
        self.waiting_delta += 1;
    }
    /// Takes a tube out of the plating queue.
    fn dequeue(&mut self, tube: &TubeRecord) {
        self.remove(T::Waiting, tube.waiting_key());
        self.waiting_delta -= 1;
    }
    fn put_tube(&mut self, tube: &TubeRecord) {
        self.put(T::Tubes, tube.barcode.as_str().as_bytes(), tube);
    }
    fn put_plate(&mut self, plate: &PlateRecord) {
        self.put(T::Plates, plate.id.as_str().as_bytes(), plate);
    }
}

/// Counters of lab activity, for /metrics.
#[derive(Debug, Default)]
pub struct LabCounters {
    /// Tubes in the store (a gauge).
    pub tubes_stored: AtomicU64,
    /// Tubes waiting for a plate (a gauge).
    pub tubes_waiting: AtomicU64,
    pub tubes_received: AtomicU64,
    pub plates_created: AtomicU64,
    pub plates_sealed: AtomicU64,
}

/// The lab: store, kits and the operations over them.
#[derive(Debug)]
pub struct Lab {
    store: Store,
    kits: KitRegistry,
    lab_id: String,
    writer: Mutex<Writer>,
    counters: LabCounters,
    outbox: crate::outbox::Outbox,
    /// Review policy, due-time state and review metrics (`crate::review`).
    review: crate::review::ReviewRuntime,
}

fn now() -> Timestamp {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    Timestamp::from_millis(ms)
}

/// Refuses a store whose log came back shorter than the last run acknowledged: the
/// high-water mark names an audit entry that sled no longer has, or has differently.
fn check_mark(store: &Store, last_seq: u64, head: &[u8; 32]) -> Result<(), StoreError> {
    let Some((mark_seq, mark_hash)) = store.opened_mark().and_then(parse_head) else {
        return Ok(());
    };
    let corrupt = |detail: String| StoreError::Corrupt {
        path: store.path().to_path_buf(),
        detail,
    };
    if mark_seq > last_seq {
        return Err(corrupt(format!(
            "its log ends at audit entry {last_seq}, but entry {mark_seq} had been made durable: \
             acknowledged changes are missing"
        )));
    }
    let recorded = if mark_seq == last_seq {
        Some(*head)
    } else {
        let key = mark_seq.to_be_bytes();
        match store.trees().audit.get(key)? {
            Some(raw) => Some(decode::<AuditEntry>(&key, &raw)?.hash),
            None => None,
        }
    };
    if recorded != Some(mark_hash) {
        return Err(corrupt(format!(
            "audit entry {mark_seq} differs from the one made durable: the log was altered"
        )));
    }
    Ok(())
}

/// The writes a `crate::review` change may plan, inside [`Lab::review_change`].
#[derive(Debug)]
pub struct ReviewTx<'a> {
    lab: &'a Lab,
    writer: &'a Writer,
    changes: &'a mut Changes,
    /// When the change happens.
    pub at: Timestamp,
}

impl ReviewTx<'_> {
    pub fn lab(&self) -> &Lab {
        self.lab
    }
    pub fn put_review(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.changes.put_raw(T::Review, key, value);
    }
    pub fn remove_review(&mut self, key: Vec<u8>) {
        self.changes.remove(T::Review, key);
    }
    pub fn put_import(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.changes.put_raw(T::Imports, key, value);
    }
    pub fn audit(
        &mut self,
        action: &'static str,
        plate: Option<&PlateId>,
        tubes: Vec<Barcode>,
        detail: String,
    ) {
        self.changes.audit(action, plate, tubes, detail);
    }

    /// Plans the release of `records` (results + outbox entries + audit) in this
    /// change's transaction; [`Lab::release_results`] is this alone. Call once per change.
    pub fn release(
        &mut self,
        records: &[pcrd_protocol::upstream::ResultRecord],
    ) -> Result<Vec<crate::outbox::Released>, LabError> {
        let first = self.changes.outbox_next.unwrap_or(self.writer.outbox_next);
        let plan = crate::outbox::plan_release(
            &self.lab.store,
            &self.lab.lab_id,
            records,
            first,
            crate::outbox::now_ms(),
        )
        .map_err(|refusal| match refusal {
            crate::outbox::ReleaseRefusal::Invalid(problems) => LabError::invalid_all(
                format!(
                    "{} problem(s) in the release; nothing was released",
                    problems.len()
                ),
                problems,
            ),
            crate::outbox::ReleaseRefusal::Conflict(problems) => LabError::conflict_all(
                format!(
                    "{} result version(s) conflict with earlier releases; nothing was released",
                    problems.len()
                ),
                problems,
            ),
        })?;
        for (key, value) in plan.results {
            self.changes.put_raw(T::Results, key, value);
        }
        for (key, value) in plan.outbox {
            self.changes.put_raw(T::Outbox, key, value);
        }
        self.changes.outbox_next = Some(plan.next_seq);
        for r in &plan.released {
            let action = if r.corrected {
                "result.corrected"
            } else {
                "result.released"
            };
            self.changes
                .audit(action, None, vec![r.tube.clone()], r.detail.clone());
        }
        Ok(plan.released)
    }

    /// Puts a tube back into the plating queue for a rerun: off its plate (the plate
    /// keeps its layout; the audit trail and the review candidate keep where it was),
    /// promoted to urgent so plating takes it first, its history extended. A tube
    /// already waiting is left as it is (false).
    pub fn requeue_for_rerun(
        &mut self,
        barcode: &Barcode,
        plate: Option<&PlateId>,
        detail: String,
    ) -> Result<bool, LabError> {
        let Some(mut tube) = self.lab.load_tube(barcode)? else {
            return Err(LabError::not_found(format!(
                "tube {barcode} has not been received"
            )));
        };
        let Some(placement) = &tube.placement else {
            return Ok(false);
        };
        // A tube on a plate still open is taken off with `unassign`, which re-queues
        // it; doing it here too would queue it twice.
        if self
            .lab
            .load_plate(placement.plate.as_str())?
            .is_some_and(|p| p.state == PlateState::Open)
        {
            return Ok(false);
        }
        let seqs = self
            .changes
            .audit("tube.requeued", plate, vec![barcode.clone()], detail);
        tube.placement = None;
        tube.priority = Priority::Urgent;
        tube.history.push(seqs.of_tube(0));
        self.changes.enqueue(&tube);
        self.changes.put_tube(&tube);
        Ok(true)
    }
}

/// Formats a timestamp as RFC 3339 UTC with milliseconds.
pub fn rfc3339(ts: Timestamp) -> String {
    let ms = ts.as_millis().max(0) as u64;
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

impl Lab {
    pub fn open(store: Store, kits: KitRegistry, lab_id: String) -> Result<Arc<Lab>, StoreError> {
        let trees = store.trees();
        let (last_seq, head) = match trees.meta.get(META_AUDIT_HEAD)? {
            Some(raw) => parse_head(&raw).ok_or_else(|| StoreError::BadRecord {
                tree: "meta",
                key: "audit_head".into(),
                detail: "wrong length".into(),
            })?,
            None => (0, [0u8; 32]),
        };
        check_mark(&store, last_seq, &head)?;
        let next_seq = last_seq + 1;
        let plate_counter = match trees.meta.get(META_PLATE_COUNTER)? {
            Some(raw) => raw
                .as_ref()
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::BadRecord {
                    tree: "meta",
                    key: "plate_counter".into(),
                    detail: "wrong length".into(),
                })?,
            None => 0,
        };
        let counters = LabCounters::default();
        let (tubes, waiting) = match trees.meta.get(META_COUNTS)? {
            Some(raw) if raw.len() == 16 => {
                let (t, w) = raw.split_at(8);
                let read = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap_or([0; 8]));
                (read(t), read(w))
            }
            // A store that has never had a tube: counting is free.
            _ => (trees.tubes.len() as u64, trees.waiting.len() as u64),
        };
        counters.tubes_stored.store(tubes, Ordering::Relaxed);
        counters.tubes_waiting.store(waiting, Ordering::Relaxed);
        let outbox_next = crate::outbox::stored_next_seq(&store)?;
        Ok(Arc::new(Lab {
            store,
            kits,
            lab_id,
            outbox: crate::outbox::Outbox::new(outbox_next),
            writer: Mutex::new(Writer {
                outbox_next,
                next_seq,
                head,
                plate_counter,
            }),
            counters,
            review: crate::review::ReviewRuntime::default(),
        }))
    }

    /// Review policy, due-time state and review metrics.
    pub fn review(&self) -> &crate::review::ReviewRuntime {
        &self.review
    }

    /// Runs a change planned by `crate::review` (staging candidates, releasing,
    /// re-queueing tubes): one transaction with its audit entries, then the barrier,
    /// then the outbox workers are told of any release.
    pub async fn review_change<R, F>(self: &Arc<Self>, actor: Actor, op: F) -> Result<R, LabError>
    where
        R: Send + 'static,
        F: FnOnce(&mut ReviewTx<'_>) -> Result<R, LabError> + Send + 'static,
    {
        let (result, next) = self
            .change(actor, move |lab, writer, changes, at| {
                let mut tx = ReviewTx {
                    lab,
                    writer,
                    changes,
                    at,
                };
                let result = op(&mut tx)?;
                Ok((result, changes.outbox_next))
            })
            .await?;
        if let Some(next) = next {
            self.outbox.released(next);
        }
        Ok(result)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }
    pub fn kits(&self) -> &KitRegistry {
        &self.kits
    }
    pub fn lab_id(&self) -> &str {
        &self.lab_id
    }
    pub fn counters(&self) -> &LabCounters {
        &self.counters
    }
    /// The outbox's live state (release signal, running sinks).
    pub fn outbox(&self) -> &crate::outbox::Outbox {
        &self.outbox
    }

    /// Runs one state change: `op` validates and plans under the writer lock, the plan is
    /// applied in one transaction, and the call returns once it is durable.
    async fn change<R, F>(self: &Arc<Self>, actor: Actor, op: F) -> Result<R, LabError>
    where
        R: Send + 'static,
        F: FnOnce(&Lab, &mut Writer, &mut Changes, Timestamp) -> Result<R, LabError>
            + Send
            + 'static,
    {
        let lab = Arc::clone(self);
        let outcome = tokio::task::spawn_blocking(move || {
            // A panic in an earlier operation cannot have left the writer state half
            // updated (it changes only after a commit), so a poisoned lock is safe to reuse.
            let mut writer = lab
                .writer
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut changes = Changes::new(writer.next_seq);
            let at = now();
            let result = op(&lab, &mut writer, &mut changes, at)?;
            lab.commit(&mut writer, changes, &actor, at)?;
            Ok::<R, LabError>(result)
        })
        .await
        .map_err(|e| LabError::invalid(format!("internal error: {e}")))??;
        self.store.durable().await?;
        Ok(outcome)
    }

    fn commit(
        &self,
        writer: &mut Writer,
        mut changes: Changes,
        actor: &Actor,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        let writer_seq_before = writer.next_seq;
        let mut seq = writer.next_seq;
        let mut head = writer.head;
        let drafts = std::mem::take(&mut changes.audit);
        for draft in drafts {
            let chunks: Vec<Vec<Barcode>> = if draft.tubes.is_empty() {
                vec![Vec::new()]
            } else {
                draft
                    .tubes
                    .chunks(AUDIT_TUBES_PER_ENTRY)
                    .map(<[Barcode]>::to_vec)
                    .collect()
            };
            for tubes in chunks {
                let mut entry = AuditEntry {
                    seq,
                    at,
                    user: actor.user.clone(),
                    action: draft.action.to_string(),
                    plate: draft.plate.clone(),
                    tubes,
                    detail: draft.detail.clone(),
                    reason: actor.reason.clone(),
                    prev_hash: head,
                    hash: [0; 32],
                };
                entry.hash = entry.compute_hash();
                head = entry.hash;
                let seq_key = seq.to_be_bytes();
                if let Some(plate) = &entry.plate {
                    changes.put_raw(T::AuditByPlate, index_key(plate.as_str(), seq), Vec::new());
                }
                changes.put(T::Audit, seq_key.to_vec(), &entry);
                changes.put_raw(T::Meta, META_AUDIT_HEAD, head_record(seq, &head));
                seq += 1;
            }
        }
        debug_assert_eq!(seq, changes.next_seq, "audit sequence numbers as planned");
        if let Some(counter) = changes.plate_counter {
            changes.put_raw(T::Meta, META_PLATE_COUNTER, counter.to_be_bytes().to_vec());
        }
        if let Some(next) = changes.outbox_next {
            changes.put_raw(
                T::Meta,
                crate::outbox::META_OUTBOX_NEXT,
                next.to_be_bytes().to_vec(),
            );
        }
        // Writers are serialised, so reading the gauges here cannot race another writer.
        let tubes = self.counters.tubes_stored.load(Ordering::Relaxed) + changes.tubes_added;
        let waiting = self
            .counters
            .tubes_waiting
            .load(Ordering::Relaxed)
            .saturating_add_signed(changes.waiting_delta);
        if changes.tubes_added != 0 || changes.waiting_delta != 0 {
            let mut counts = tubes.to_be_bytes().to_vec();
            counts.extend_from_slice(&waiting.to_be_bytes());
            changes.put_raw(T::Meta, META_COUNTS, counts);
        }
        if let Some((_, key, _)) = changes
            .writes
            .iter()
            .find(|(_, _, v)| v.as_ref().is_some_and(|v| v.len() > MAX_VALUE_BYTES))
        {
            return Err(StoreError::BadRecord {
                tree: "(write)",
                key: String::from_utf8_lossy(key).into_owned(),
                detail: format!("value larger than {MAX_VALUE_BYTES} bytes"),
            });
        }

        // A transaction costs per tree it spans, so it spans only the trees written.
        let t = self.store.trees();
        let all = [
            &t.tubes,
            &t.waiting,
            &t.plates,
            &t.audit,
            &t.audit_by_plate,
            &t.meta,
            &t.results,
            &t.outbox,
            &t.sink_state,
            &t.imports,
            &t.review,
        ];
        let mut slot = [usize::MAX; 11];
        let mut trees = Vec::new();
        for (tree, _, _) in &changes.writes {
            if slot[*tree as usize] == usize::MAX {
                slot[*tree as usize] = trees.len();
                trees.push(all[*tree as usize].clone());
            }
        }
        if trees.is_empty() {
            return Ok(());
        }
        let result: Result<(), TransactionError<()>> = trees[..].transaction(|tx| {
            for (tree, key, value) in &changes.writes {
                let tree = &tx[slot[*tree as usize]];
                match value {
                    Some(value) => {
                        tree.insert(key.as_slice(), value.as_slice())?;
                    }
                    None => {
                        tree.remove(key.as_slice())?;
                    }
                }
            }
            Ok::<(), ConflictableTransactionError<()>>(())
        });
        match result {
            Ok(()) => {}
            Err(TransactionError::Storage(e)) => return Err(StoreError::Sled(e)),
            Err(TransactionError::Abort(())) => {
                unreachable!("the transaction body never aborts")
            }
        }
        writer.next_seq = seq;
        writer.head = head;
        if let Some(counter) = changes.plate_counter {
            writer.plate_counter = counter;
        }
        if let Some(next) = changes.outbox_next {
            writer.outbox_next = next;
        }
        self.counters.tubes_stored.store(tubes, Ordering::Relaxed);
        self.counters
            .tubes_waiting
            .store(waiting, Ordering::Relaxed);
        if seq != writer_seq_before {
            self.store.set_mark(&head_record(seq - 1, &head));
        }
        Ok(())
    }

    // ----- results -----

    /// Releases result versions: each is written to `results` and appended to the
    /// outbox in the same transaction as its audit entry, and the call returns once
    /// that is durable. All or nothing: a record with a wrong schema version, a
    /// correction without reason or previous version, or a version that is not the
    /// previous one plus one (a duplicate included) refuses the whole request, naming
    /// each problem. Returns the idempotency keys with their outbox seqs.
    pub async fn release_results(
        self: &Arc<Self>,
        actor: Actor,
        records: Vec<pcrd_protocol::upstream::ResultRecord>,
    ) -> Result<Vec<(String, u64)>, LabError> {
        if records.is_empty() {
            return Err(LabError::invalid("no results given"));
        }
        if records.len() > MAX_BATCH {
            return Err(LabError::invalid(format!(
                "{} results in one release; the limit is {MAX_BATCH}",
                records.len()
            )));
        }
        let (released, next) = self
            .change(actor, move |lab, writer, changes, at| {
                let mut tx = ReviewTx {
                    lab,
                    writer,
                    changes,
                    at,
                };
                let released = tx
                    .release(&records)?
                    .into_iter()
                    .map(|r| (r.key, r.seq))
                    .collect();
                let next = changes.outbox_next.unwrap_or(writer.outbox_next);
                Ok((released, next))
            })
            .await?;
        self.outbox.released(next);
        Ok(released)
    }

    /// Re-queues dead letters of the configured sinks (`sink` narrows to one) for
    /// delivery to the sink that refused them, as new outbox entries for that sink only;
    /// the dead letters are removed in the same transaction.
    pub async fn requeue_dead(
        self: &Arc<Self>,
        actor: Actor,
        sink: Option<String>,
        selection: crate::outbox::RetrySelection,
    ) -> Result<Vec<crate::outbox::Requeued>, LabError> {
        let configured: Vec<String> = self.outbox.sinks().iter().map(|s| s.name.clone()).collect();
        let sinks = match sink {
            Some(name) if configured.contains(&name) => vec![name],
            Some(name) => {
                return Err(LabError::invalid(format!(
                    "sink {name:?} is not configured; configured: {}",
                    if configured.is_empty() {
                        "none".to_string()
                    } else {
                        configured.join(", ")
                    }
                )));
            }
            None => configured,
        };
        let (requeued, next) = self
            .change(actor, move |lab, writer, changes, _at| {
                let plan = crate::outbox::plan_requeue(
                    &lab.store,
                    &sinks,
                    &selection,
                    writer.outbox_next,
                    crate::outbox::now_ms(),
                )
                .map_err(|e| match e {
                    Ok(problems) => LabError::NotFound {
                        message: format!(
                            "{} key(s) match no dead letter; nothing was re-queued: {}",
                            problems.len(),
                            problems.join("; ")
                        ),
                    },
                    Err(store) => LabError::Store(store),
                })?;
                if plan.requeued.is_empty() {
                    return Ok((Vec::new(), writer.outbox_next));
                }
                for (key, value) in plan.outbox {
                    changes.put_raw(T::Outbox, key, value);
                }
                for (key, value) in plan.sink_state {
                    match value {
                        Some(value) => changes.put_raw(T::SinkState, key, value),
                        None => changes.remove(T::SinkState, key),
                    }
                }
                changes.outbox_next = Some(plan.next_seq);
                let detail = match plan.requeued.as_slice() {
                    [one] => format!(
                        "re-queued dead letter {} for sink {}",
                        one.idempotency_key, one.sink
                    ),
                    many => format!("re-queued {} dead letters", many.len()),
                };
                changes.audit("outbox.retried", None, Vec::new(), detail);
                Ok((plan.requeued, plan.next_seq))
            })
            .await?;
        self.outbox.released(next);
        for sink in self.outbox.sinks() {
            sink.wake.notify_one();
        }
        Ok(requeued)
    }

    // ----- reads -----

    pub fn tube(&self, barcode: &str) -> Result<TubeRecord, LabError> {
        let barcode = Barcode::new(barcode).map_err(|e| LabError::invalid(e.to_string()))?;
        self.load_tube(&barcode)?
            .ok_or_else(|| LabError::not_found(format!("tube {barcode} has not been received")))
    }

    fn load_tube(&self, barcode: &Barcode) -> Result<Option<TubeRecord>, StoreError> {
        let key = barcode.as_str().as_bytes();
        match self.store.trees().tubes.get(key)? {
            Some(raw) => Ok(Some(decode(key, &raw)?)),
            None => Ok(None),
        }
    }

    pub fn plate(&self, id: &str) -> Result<PlateRecord, LabError> {
        self.load_plate(id)?
            .ok_or_else(|| LabError::not_found(format!("plate {id} does not exist")))
    }

    fn load_plate(&self, id: &str) -> Result<Option<PlateRecord>, StoreError> {
        let key = id.as_bytes();
        match self.store.trees().plates.get(key)? {
            Some(raw) => Ok(Some(decode(key, &raw)?)),
            None => Ok(None),
        }
    }

    pub fn plates(&self) -> Result<Vec<PlateRecord>, LabError> {
        let mut plates = Vec::new();
        for item in self.store.trees().plates.iter() {
            let (key, raw) = item.map_err(StoreError::from)?;
            plates.push(decode(&key, &raw)?);
        }
        Ok(plates)
    }

    /// Tubes waiting for a plate, in plating order.
    pub fn waiting(&self, limit: usize) -> Result<Vec<TubeRecord>, LabError> {
        let trees = self.store.trees();
        let mut tubes = Vec::new();
        for item in trees.waiting.iter().take(limit) {
            let (key, _) = item.map_err(StoreError::from)?;
            let barcode = TubeRecord::barcode_of_waiting_key(&key);
            if let Some(raw) = trees.tubes.get(barcode).map_err(StoreError::from)? {
                tubes.push(decode(barcode, &raw)?);
            }
        }
        Ok(tubes)
    }

    pub fn waiting_count(&self) -> u64 {
        self.counters.tubes_waiting.load(Ordering::Relaxed)
    }

    pub fn tube_count(&self) -> u64 {
        self.counters.tubes_stored.load(Ordering::Relaxed)
    }

    /// Audit entries matching the query, oldest first: the last `limit` of them.
    pub fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>, LabError> {
        let trees = self.store.trees();
        let before = query.before.unwrap_or(u64::MAX);
        let limit = query.limit.max(1);
        let seqs: Vec<u64> = match (&query.plate, &query.tube) {
            (Some(_), Some(_)) => {
                return Err(LabError::invalid("filter by plate or by tube, not both"));
            }
            (Some(id), None) => index_seqs(&trees.audit_by_plate, id, before, limit)?,
            (None, Some(barcode)) => {
                // Like an unknown plate, an unknown tube simply has no entries.
                let tube = match Barcode::new(barcode.as_str()) {
                    Ok(barcode) => self.load_tube(&barcode)?,
                    Err(_) => None,
                };
                let history = tube.map(|t| t.history).unwrap_or_default();
                let older = history.iter().copied().filter(|seq| *seq < before);
                older.rev().take(limit).collect()
            }
            (None, None) => {
                let mut seqs = Vec::new();
                for item in trees.audit.range(..before.to_be_bytes()).rev().take(limit) {
                    let (key, _) = item.map_err(StoreError::from)?;
                    seqs.push(seq_of(&key));
                }
                seqs
            }
        };
        let mut entries = Vec::with_capacity(seqs.len());
        for seq in seqs.into_iter().rev() {
            let key = seq.to_be_bytes();
            if let Some(raw) = trees.audit.get(key).map_err(StoreError::from)? {
                entries.push(decode(&key, &raw)?);
            }
        }
        Ok(entries)
    }

    /// Reads every record of every tree, decodes it and checks the trees against each
    /// other: sled verifies a page's checksum only when the page is read, so damage in
    /// old parts of the log shows only here (or later, on some request).
    ///
    /// Holds the writer lock throughout: sled's iterators are not snapshots, and the
    /// cross-checks need trees that no one changes meanwhile. Writes wait (they do not
    /// fail) while a scrub runs.
    pub fn scrub(&self) -> Result<ScrubReport, StoreError> {
        let _writer = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let t = self.store.trees();
        let corrupt = |detail: String| StoreError::Corrupt {
            path: self.store.path().to_path_buf(),
            detail,
        };
        let mut report = ScrubReport::default();
        let mut placed = 0u64;
        for item in t.tubes.iter() {
            let (key, raw) = item?;
            let tube: TubeRecord = decode(&key, &raw)?;
            placed += u64::from(tube.placement.is_some());
            report.tubes += 1;
        }
        for item in t.plates.iter() {
            let (key, raw) = item?;
            decode::<PlateRecord>(&key, &raw)?;
            report.plates += 1;
        }
        let waiting = t
            .waiting
            .iter()
            .try_fold(0u64, |n, item| item.map(|_| n + 1))?;
        for tree in [&t.audit_by_plate, &t.meta] {
            for item in tree.iter() {
                item?;
            }
        }
        let verification = self
            .verify_audit()
            .map_err(|e| corrupt(format!("audit trail unreadable: {e}")))?;
        if let Some(seq) = verification.first_broken {
            return Err(corrupt(format!(
                "audit entry {seq} does not match its hash chain"
            )));
        }
        report.audit_entries = verification.entries;
        let consistent = waiting + placed == report.tubes
            && report.tubes == self.tube_count()
            && waiting == self.waiting_count();
        if !consistent {
            return Err(corrupt(format!(
                "{} tubes of which {placed} placed, but {waiting} in the plating queue; counters say {} and {}",
                report.tubes,
                self.tube_count(),
                self.waiting_count()
            )));
        }
        self.store.checked();
        Ok(report)
    }

    /// Walks the whole audit chain and checks every hash.
    pub fn verify_audit(&self) -> Result<AuditVerification, LabError> {
        let mut prev = [0u8; 32];
        let mut entries = 0;
        for item in self.store.trees().audit.iter() {
            let (key, raw) = item.map_err(StoreError::from)?;
            let entry: AuditEntry = decode(&key, &raw)?;
            entries += 1;
            if entry.prev_hash != prev || entry.compute_hash() != entry.hash {
                return Ok(AuditVerification {
                    entries,
                    first_broken: Some(entry.seq),
                });
            }
            prev = entry.hash;
        }
        Ok(AuditVerification {
            entries,
            first_broken: None,
        })
    }

    // ----- changes -----

    /// Records tubes as received. All or nothing: any invalid or conflicting tube
    /// refuses the whole batch, naming every problem. A tube received again with the same
    /// pool size and priority is a retry and changes nothing.
    pub async fn receive_tubes(
        self: &Arc<Self>,
        actor: Actor,
        intake: Vec<TubeIntake>,
    ) -> Result<ReceiveOutcome, LabError> {
        if intake.is_empty() {
            return Err(LabError::invalid("no tubes given"));
        }
        if intake.len() > MAX_BATCH {
            return Err(LabError::invalid(format!(
                "{} tubes in one request; the limit is {MAX_BATCH}",
                intake.len()
            )));
        }
        let user = actor.user.clone();
        let outcome = self
            .change(actor, move |lab, _, changes, at| {
                let mut problems = Vec::new();
                let mut fresh: BTreeMap<Barcode, TubeRecord> = BTreeMap::new();
                let mut outcome = ReceiveOutcome::default();
                for (i, item) in intake.into_iter().enumerate() {
                    let Some(tube) = parse_intake(i, item, at, &user, &mut problems) else {
                        continue;
                    };
                    if let Some(earlier) = fresh.get(&tube.barcode) {
                        if !same_tube(earlier, &tube) {
                            problems.push(format!(
                                "tube {}: listed twice with different pool size or priority",
                                tube.barcode
                            ));
                        }
                        continue;
                    }
                    match lab.load_tube(&tube.barcode)? {
                        Some(existing) if same_tube(&existing, &tube) => {
                            outcome.already_received.push(tube.barcode);
                        }
                        Some(existing) => problems.push(format!(
                            "tube {} was already received as pool of {} ({}); this request says pool of {} ({})",
                            tube.barcode,
                            existing.pool_size,
                            existing.priority,
                            tube.pool_size,
                            tube.priority
                        )),
                        None => {
                            fresh.insert(tube.barcode.clone(), tube);
                        }
                    }
                }
                if !problems.is_empty() {
                    let conflict = problems.iter().any(|p| p.contains("already received"));
                    let message = format!("{} problem(s) in the batch; nothing was received", problems.len());
                    return Err(if conflict {
                        LabError::conflict_all(message, problems)
                    } else {
                        LabError::invalid_all(message, problems)
                    });
                }
                outcome.received = fresh.keys().cloned().collect();
                if !outcome.received.is_empty() {
                    let detail = match outcome.received.as_slice() {
                        [one] => format!("received tube {one}"),
                        many => format!("received {} tubes", many.len()),
                    };
                    let seqs = changes.audit("tube.received", None, outcome.received.clone(), detail);
                    for (i, tube) in fresh.values_mut().enumerate() {
                        tube.history.push(seqs.of_tube(i));
                        changes.put_tube(tube);
                        changes.enqueue(tube);
                    }
                }
                changes.tubes_added = fresh.len() as u64;
                Ok(outcome)
            })
            .await?;
        self.counters
            .tubes_received
            .fetch_add(outcome.received.len() as u64, Ordering::Relaxed);
        Ok(outcome)
    }

    /// Creates an open extraction plate with the kit's controls placed.
    pub async fn create_plate(
        self: &Arc<Self>,
        actor: Actor,
        kit: String,
        format: Option<u16>,
        id: Option<String>,
    ) -> Result<PlateRecord, LabError> {
        let created_by = actor.user.clone();
        let plate = self
            .change(actor, move |lab, writer, changes, at| {
                let kit = lab.kits.find(&kit).map_err(LabError::invalid)?;
                let format = match format {
                    None => PlateFormat::Wells96,
                    Some(n) => {
                        PlateFormat::try_from(n).map_err(|e| LabError::invalid(e.to_string()))?
                    }
                };
                let template = kit.template(format).ok_or_else(|| {
                    LabError::invalid(format!(
                        "kit {} has no {format}-well layout; it supports: {}",
                        kit.key(),
                        kit.formats()
                            .map(|f| f.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?;
                let id = lab.new_plate_id(writer, changes, id)?;
                let plate = PlateRecord {
                    id,
                    kind: PlateKind::Extraction,
                    kit_id: kit.id.clone(),
                    kit_version: kit.version.clone(),
                    format,
                    state: PlateState::Open,
                    layout: Layout::from_template(template),
                    lineage: None,
                    children: Vec::new(),
                    created_at: at,
                    created_by,
                    sealed_at: None,
                    sealed_by: None,
                };
                changes.put_plate(&plate);
                changes.audit(
                    "plate.created",
                    Some(&plate.id),
                    Vec::new(),
                    format!(
                        "created {format}-well extraction plate {} with kit {}",
                        plate.id,
                        kit.key()
                    ),
                );
                Ok(plate)
            })
            .await?;
        self.counters.plates_created.fetch_add(1, Ordering::Relaxed);
        Ok(plate)
    }

    /// Puts tubes on an open plate: `tubes` go into the next free wells in plating order
    /// (urgent first, then due time), `placements` into the wells named.
    pub async fn assign(
        self: &Arc<Self>,
        actor: Actor,
        plate_id: String,
        tubes: Vec<String>,
        placements: Vec<(String, String)>,
    ) -> Result<Vec<(Well, Barcode)>, LabError> {
        if tubes.is_empty() && placements.is_empty() {
            return Err(LabError::invalid("no tubes given"));
        }
        self.change(actor, move |lab, _, changes, _| {
            let mut plate = lab.open_plate(&plate_id)?;
            let mut layout = plate.layout.clone();
            let mut problems = Vec::new();
            let mut records = HashMap::new();
            let mut check =
                |text: &str, problems: &mut Vec<String>| -> Result<Option<Barcode>, LabError> {
                    let barcode = match Barcode::new(text) {
                        Ok(b) => b,
                        Err(e) => {
                            problems.push(e.to_string());
                            return Ok(None);
                        }
                    };
                    match lab.load_tube(&barcode)? {
                        None => problems.push(format!("tube {barcode} has not been received")),
                        Some(tube) => {
                            if let Some(p) = &tube.placement {
                                problems.push(format!(
                                    "tube {barcode} is already on plate {} in well {}",
                                    p.plate, p.well
                                ));
                            }
                            records.insert(barcode.clone(), tube);
                        }
                    }
                    Ok(Some(barcode))
                };
            let mut auto = Vec::new();
            for text in &tubes {
                if let Some(b) = check(text, &mut problems)? {
                    auto.push(b);
                }
            }
            let mut explicit = Vec::new();
            for (well_text, barcode_text) in &placements {
                let well = Well::parse_in(well_text, layout.format());
                let barcode = check(barcode_text, &mut problems)?;
                match (well, barcode) {
                    (Ok(well), Some(barcode)) => explicit.push((well, barcode)),
                    (Err(e), _) => problems.push(e.to_string()),
                    _ => {}
                }
            }
            if !problems.is_empty() {
                let status_conflict = problems.iter().any(|p| p.contains("already on plate"));
                let message = format!("{} problem(s); nothing was assigned", problems.len());
                return Err(if status_conflict {
                    LabError::conflict_all(message, problems)
                } else {
                    LabError::invalid_all(message, problems)
                });
            }
            layout.place_all(&explicit)?;
            let mut queued: Vec<_> = auto.iter().map(|b| records[b].queued()).collect();
            plating_order(&mut queued);
            let ordered: Vec<Barcode> = queued.into_iter().map(|q| q.barcode).collect();
            let mut placed = explicit;
            placed.extend(layout.fill(&ordered)?);
            lab.record_placements(
                changes,
                &mut plate,
                &layout,
                &placed,
                &records,
                "plate.assigned",
            );
            Ok(placed)
        })
        .await
    }

    /// Fills an open plate's free wells from the tubes waiting, in plating order.
    pub async fn fill(
        self: &Arc<Self>,
        actor: Actor,
        plate_id: String,
        max: Option<usize>,
    ) -> Result<Vec<(Well, Barcode)>, LabError> {
        self.change(actor, move |lab, _, changes, _| {
            let mut plate = lab.open_plate(&plate_id)?;
            let mut layout = plate.layout.clone();
            let want = max.unwrap_or(usize::MAX).min(layout.free_count());
            let waiting = lab.waiting(want)?;
            if waiting.is_empty() {
                return Err(LabError::conflict("no tubes are waiting for a plate"));
            }
            let barcodes: Vec<Barcode> = waiting.iter().map(|t| t.barcode.clone()).collect();
            let records = waiting
                .into_iter()
                .map(|t| (t.barcode.clone(), t))
                .collect();
            let placed = layout.fill(&barcodes)?;
            lab.record_placements(
                changes,
                &mut plate,
                &layout,
                &placed,
                &records,
                "plate.filled",
            );
            Ok(placed)
        })
        .await
    }

    fn record_placements(
        &self,
        changes: &mut Changes,
        plate: &mut PlateRecord,
        layout: &Layout,
        placed: &[(Well, Barcode)],
        records: &HashMap<Barcode, TubeRecord>,
        action: &'static str,
    ) {
        plate.layout = layout.clone();
        changes.put_plate(plate);
        let detail = match placed {
            [(well, barcode)] => format!("put tube {barcode} in well {well} of plate {}", plate.id),
            _ => format!("put {} tubes on plate {}", placed.len(), plate.id),
        };
        let seqs = changes.audit(
            action,
            Some(&plate.id),
            placed.iter().map(|(_, b)| b.clone()).collect(),
            detail,
        );
        for (i, (well, barcode)) in placed.iter().enumerate() {
            if let Some(tube) = records.get(barcode) {
                let mut tube = tube.clone();
                changes.dequeue(&tube);
                tube.placement = Some(Placement {
                    plate: plate.id.clone(),
                    well: *well,
                });
                tube.history.push(seqs.of_tube(i));
                changes.put_tube(&tube);
            }
        }
    }

    /// Takes samples off an open plate; they wait for a plate again.
    pub async fn unassign(
        self: &Arc<Self>,
        actor: Actor,
        plate_id: String,
        wells: Vec<String>,
    ) -> Result<Vec<(Well, Barcode)>, LabError> {
        if wells.is_empty() {
            return Err(LabError::invalid("no wells given"));
        }
        self.change(actor, move |lab, _, changes, _| {
            let mut plate = lab.open_plate(&plate_id)?;
            let mut layout = plate.layout.clone();
            let mut problems = Vec::new();
            let mut parsed = BTreeSet::new();
            for text in &wells {
                match Well::parse_in(text, layout.format()) {
                    Ok(well) => {
                        parsed.insert(well);
                    }
                    Err(e) => problems.push(e.to_string()),
                }
            }
            if !problems.is_empty() {
                return Err(LabError::invalid_all(
                    format!("{} problem(s); nothing was removed", problems.len()),
                    problems,
                ));
            }
            let mut removed = Vec::new();
            for well in parsed {
                removed.push((well, layout.remove_sample(well)?));
            }
            plate.layout = layout;
            changes.put_plate(&plate);
            let seqs = changes.audit(
                "plate.unassigned",
                Some(&plate.id),
                removed.iter().map(|(_, b)| b.clone()).collect(),
                format!(
                    "removed {} from plate {}",
                    removed
                        .iter()
                        .map(|(w, b)| format!("{b} ({w})"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    plate.id
                ),
            );
            for (i, (_, barcode)) in removed.iter().enumerate() {
                if let Some(mut tube) = lab.load_tube(barcode)? {
                    tube.placement = None;
                    tube.history.push(seqs.of_tube(i));
                    changes.enqueue(&tube);
                    changes.put_tube(&tube);
                }
            }
            Ok(removed)
        })
        .await
    }

    /// Seals an open plate: its contents are fixed from now on.
    pub async fn seal(
        self: &Arc<Self>,
        actor: Actor,
        plate_id: String,
    ) -> Result<PlateRecord, LabError> {
        let user = actor.user.clone();
        let plate = self
            .change(actor, move |lab, _, changes, at| {
                let mut plate = lab.open_plate(&plate_id)?;
                let layout = &plate.layout;
                if layout.sample_count() == 0 {
                    return Err(LabError::conflict(format!(
                        "plate {} has no samples; assign tubes before sealing",
                        plate.id
                    )));
                }
                plate.state = PlateState::Sealed;
                plate.sealed_at = Some(at);
                plate.sealed_by = Some(user);
                changes.put_plate(&plate);
                changes.audit(
                    "plate.sealed",
                    Some(&plate.id),
                    Vec::new(),
                    format!(
                        "sealed plate {} with {} samples and {} controls",
                        plate.id,
                        layout.sample_count(),
                        layout.control_count()
                    ),
                );
                Ok(plate)
            })
            .await?;
        self.counters.plates_sealed.fetch_add(1, Ordering::Relaxed);
        Ok(plate)
    }

    /// Transfers a sealed extraction plate 1:1 to a new PCR plate.
    pub async fn transfer(
        self: &Arc<Self>,
        actor: Actor,
        source_id: String,
        new_id: Option<String>,
    ) -> Result<PlateRecord, LabError> {
        let user = actor.user.clone();
        self.change(actor, move |lab, writer, changes, at| {
            let mut source = lab.sealed_extraction_plate(&source_id)?;
            let id = lab.new_plate_id(writer, changes, new_id)?;
            let lineage = Lineage::Transfer {
                source: source.id.to_string(),
            };
            let layout = transfer_layout(&source.layout);
            let pcr = derived_plate(id, &source, layout, lineage, at, user);
            source.children.push(pcr.id.clone());
            changes.put_plate(&source);
            changes.put_plate(&pcr);
            let detail = format!(
                "transferred plate {} 1:1 to PCR plate {}",
                source.id, pcr.id
            );
            changes.audit(
                "plate.transferred",
                Some(&source.id),
                Vec::new(),
                detail.clone(),
            );
            changes.audit("plate.created", Some(&pcr.id), Vec::new(), detail);
            Ok(pcr)
        })
        .await
    }

    /// Combines four sealed 96-well extraction plates into one 384-well PCR plate by
    /// quadrant (the first plate is quadrant 1, starting at A1).
    pub async fn combine(
        self: &Arc<Self>,
        actor: Actor,
        source_ids: Vec<String>,
        new_id: Option<String>,
    ) -> Result<PlateRecord, LabError> {
        let user = actor.user.clone();
        self.change(actor, move |lab, writer, changes, at| {
            let ids: [String; 4] = source_ids.clone().try_into().map_err(|_| {
                LabError::invalid(format!(
                    "a 384-well plate takes exactly 4 source plates, not {}",
                    source_ids.len()
                ))
            })?;
            let unique: BTreeSet<_> = ids.iter().collect();
            if unique.len() != 4 {
                return Err(LabError::invalid("the same plate is listed twice"));
            }
            let mut sources = Vec::new();
            for id in &ids {
                sources.push(lab.sealed_extraction_plate(id)?);
            }
            let kits: BTreeSet<_> = sources
                .iter()
                .map(|p| (p.kit_id.clone(), p.kit_version.clone()))
                .collect();
            if kits.len() != 1 {
                return Err(LabError::conflict(
                    "the four plates use different kits; a PCR plate runs one kit",
                ));
            }
            let layout = combine_quadrants([
                &sources[0].layout,
                &sources[1].layout,
                &sources[2].layout,
                &sources[3].layout,
            ])?;
            let id = lab.new_plate_id(writer, changes, new_id)?;
            let lineage = Lineage::Quadrants {
                sources: ids.clone(),
            };
            let pcr = derived_plate(id, &sources[0], layout, lineage, at, user);
            let detail = format!(
                "combined plates {} into 384-well PCR plate {} by quadrant",
                ids.join(", "),
                pcr.id
            );
            for mut source in sources {
                source.children.push(pcr.id.clone());
                changes.put_plate(&source);
                changes.audit(
                    "plate.transferred",
                    Some(&source.id),
                    Vec::new(),
                    detail.clone(),
                );
            }
            changes.put_plate(&pcr);
            changes.audit("plate.created", Some(&pcr.id), Vec::new(), detail);
            Ok(pcr)
        })
        .await
    }

    fn open_plate(&self, id: &str) -> Result<PlateRecord, LabError> {
        let plate = self.plate(id)?;
        if plate.state != PlateState::Open {
            return Err(LabError::conflict(format!(
                "plate {id} is sealed; its contents can no longer change"
            )));
        }
        Ok(plate)
    }

    fn sealed_extraction_plate(&self, id: &str) -> Result<PlateRecord, LabError> {
        let plate = self.plate(id)?;
        if plate.kind != PlateKind::Extraction {
            return Err(LabError::conflict(format!(
                "plate {id} is a PCR plate; transfer from its extraction plate"
            )));
        }
        if plate.state != PlateState::Sealed {
            return Err(LabError::conflict(format!(
                "plate {id} is not sealed; seal it before transferring"
            )));
        }
        Ok(plate)
    }

    fn new_plate_id(
        &self,
        writer: &Writer,
        changes: &mut Changes,
        requested: Option<String>,
    ) -> Result<PlateId, LabError> {
        match requested {
            Some(text) => {
                let id = PlateId::new(text).map_err(LabError::invalid)?;
                if self.load_plate(id.as_str())?.is_some() {
                    return Err(LabError::conflict(format!("plate {id} already exists")));
                }
                Ok(id)
            }
            None => {
                let mut counter = changes.plate_counter.unwrap_or(writer.plate_counter);
                loop {
                    counter += 1;
                    let id = PlateId::new(format!("PL-{counter:06}")).map_err(LabError::invalid)?;
                    if self.load_plate(id.as_str())?.is_none() {
                        changes.plate_counter = Some(counter);
                        return Ok(id);
                    }
                }
            }
        }
    }
}

fn derived_plate(
    id: PlateId,
    source: &PlateRecord,
    layout: Layout,
    lineage: Lineage,
    at: Timestamp,
    user: String,
) -> PlateRecord {
    PlateRecord {
        id,
        kind: PlateKind::Pcr,
        kit_id: source.kit_id.clone(),
        kit_version: source.kit_version.clone(),
        format: layout.format(),
        // A PCR plate's contents come from its sources and cannot change.
        state: PlateState::Sealed,
        layout,
        lineage: Some(lineage),
        children: Vec::new(),
        created_at: at,
        created_by: user.clone(),
        sealed_at: Some(at),
        sealed_by: Some(user),
    }
}

fn same_tube(a: &TubeRecord, b: &TubeRecord) -> bool {
    a.pool_size == b.pool_size && a.priority == b.priority
}

fn parse_intake(
    index: usize,
    item: TubeIntake,
    at: Timestamp,
    user: &str,
    problems: &mut Vec<String>,
) -> Option<TubeRecord> {
    let before = problems.len();
    let label = format!("tube {} ({:?})", index + 1, truncate(&item.barcode));
    let barcode = Barcode::new(item.barcode.clone())
        .map_err(|e| problems.push(format!("{label}: {e}")))
        .ok();
    let pool_size = match item.pool_size {
        None => Some(PoolSize::default()),
        Some(n) => u8::try_from(n)
            .ok()
            .and_then(|n| PoolSize::new(n).ok())
            .or_else(|| {
                problems.push(format!(
                    "{label}: pool size {n} is outside 1..={}",
                    PoolSize::MAX
                ));
                None
            }),
    };
    let priority = match item.priority.as_deref() {
        None => Some(Priority::default()),
        Some(text) => text
            .parse::<Priority>()
            .map_err(|e| problems.push(format!("{label}: {e}")))
            .ok(),
    };
    let due_at = match item.due {
        None => None,
        Some(due) => match due.resolve(at) {
            Ok(at) => Some(at),
            Err(e) => {
                problems.push(format!("{label}: {e}"));
                None
            }
        },
    };
    if problems.len() > before {
        return None;
    }
    Some(TubeRecord {
        barcode: barcode?,
        pool_size: pool_size?,
        priority: priority?,
        due_at,
        received_at: at,
        received_by: user.to_string(),
        placement: None,
        history: Vec::new(),
    })
}

/// The audit chain's head as stored in `meta` and in the store's high-water mark:
/// sequence (u64 BE) and hash.
fn head_record(seq: u64, hash: &[u8; 32]) -> Vec<u8> {
    let mut record = seq.to_be_bytes().to_vec();
    record.extend_from_slice(hash);
    record
}

fn parse_head(raw: &[u8]) -> Option<(u64, [u8; 32])> {
    if raw.len() != 40 {
        return None;
    }
    let seq = u64::from_be_bytes(raw[..8].try_into().ok()?);
    let hash = raw[8..].try_into().ok()?;
    Some((seq, hash))
}

fn truncate(text: &str) -> String {
    text.chars().take(40).collect()
}

fn index_key(name: &str, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(name.len() + 9);
    key.extend_from_slice(name.as_bytes());
    key.push(0);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn seq_of(key: &[u8]) -> u64 {
    let mut raw = [0u8; 8];
    if key.len() >= 8 {
        raw.copy_from_slice(&key[key.len() - 8..]);
    }
    u64::from_be_bytes(raw)
}

fn index_seqs(
    tree: &sled::Tree,
    name: &str,
    before: u64,
    limit: usize,
) -> Result<Vec<u64>, LabError> {
    let start = index_key(name, 0);
    let end = index_key(name, before);
    let mut seqs = Vec::new();
    for item in tree.range(start..end).rev().take(limit) {
        let (key, _) = item.map_err(StoreError::from)?;
        seqs.push(seq_of(&key));
    }
    Ok(seqs)
}

// ----- plate maps from a watched export folder (issue 8; see `crate::folders`) -----

/// One plate of an instrument's plate map: its barcode, format and tube per well.
#[derive(Clone, Debug)]
pub struct MappedPlate {
    pub id: String,
    pub format: PlateFormat,
    pub placements: Vec<(Well, Barcode)>,
}

/// What applying one [`MappedPlate`] did.
#[derive(Clone, Debug)]
pub struct MappedOutcome {
    pub plate: PlateId,
    /// The plate did not exist and was created (open, with the kit's controls).
    pub created: bool,
    /// Tubes put in their wells now.
    pub placed: Vec<(Well, Barcode)>,
    /// Tubes that were already in exactly the well the map names: a map applied
    /// again (after a crash before its import was recorded) changes nothing.
    pub already_placed: usize,
}

impl Lab {
    /// Applies a whole plate-map file in one transaction: every plate is created (if
    /// new) with `kit`'s layout and gets its tubes in the wells named. All or nothing:
    /// a tube never received or on another plate or well, a well holding another tube
    /// or reserved for a control, a plate of another kit or sealed refuses the whole
    /// file, naming every problem. A tube already in the very well named is not a
    /// problem, so applying the same map twice is harmless.
    pub async fn apply_plate_maps(
        self: &Arc<Self>,
        actor: Actor,
        kit: String,
        maps: Vec<MappedPlate>,
    ) -> Result<Vec<MappedOutcome>, LabError> {
        if maps.is_empty() {
            return Err(LabError::invalid("the plate map names no plate"));
        }
        let created_by = actor.user.clone();
        let outcomes = self
            .change(actor, move |lab, writer, changes, at| {
                let kit = lab.kits.find(&kit).map_err(LabError::invalid)?;
                let mut problems = Vec::new();
                let mut planned = Vec::new();
                for map in maps {
                    let existing = lab.load_plate(&map.id)?;
                    let created = existing.is_none();
                    let mut plate = match existing {
                        Some(plate) => {
                            if plate.state != PlateState::Open {
                                problems.push(format!(
                                    "plate {} is sealed; its contents can no longer change",
                                    plate.id
                                ));
                                continue;
                            }
                            if plate.kit_id != kit.id {
                                problems.push(format!(
                                    "plate {} was created for kit {}, but this folder's kit is {}",
                                    plate.id,
                                    plate.kit_id,
                                    kit.key()
                                ));
                                continue;
                            }
                            plate
                        }
                        None => {
                            let Some(template) = kit.template(map.format) else {
                                problems.push(format!(
                                    "plate {}: kit {} has no {}-well layout",
                                    map.id,
                                    kit.key(),
                                    map.format
                                ));
                                continue;
                            };
                            let id = match lab.new_plate_id(writer, changes, Some(map.id.clone()))
                            {
                                Ok(id) => id,
                                Err(e) => {
                                    problems.push(e.to_string());
                                    continue;
                                }
                            };
                            PlateRecord {
                                id,
                                kind: PlateKind::Extraction,
                                kit_id: kit.id.clone(),
                                kit_version: kit.version.clone(),
                                format: map.format,
                                state: PlateState::Open,
                                layout: Layout::from_template(template),
                                lineage: None,
                                children: Vec::new(),
                                created_at: at,
                                created_by: created_by.clone(),
                                sealed_at: None,
                                sealed_by: None,
                            }
                        }
                    };
                    let mut layout = plate.layout.clone();
                    let mut records = HashMap::new();
                    let mut placed = Vec::new();
                    let mut already_placed = 0;
                    for (well, barcode) in map.placements {
                        let Some(tube) = lab.load_tube(&barcode)? else {
                            problems.push(format!(
                                "tube {barcode} (plate {}, well {well}) has not been received",
                                plate.id
                            ));
                            continue;
                        };
                        match &tube.placement {
                            Some(p) if p.plate == plate.id && p.well == well => {
                                already_placed += 1;
                                continue;
                            }
                            Some(p) => {
                                problems.push(format!(
                                    "tube {barcode} is already on plate {} in well {}; the map puts it in well {well} of plate {}",
                                    p.plate, p.well, plate.id
                                ));
                                continue;
                            }
                            None => {}
                        }
                        match layout.place(well, barcode.clone()) {
                            Ok(()) => {
                                records.insert(barcode.clone(), tube);
                                placed.push((well, barcode));
                            }
                            Err(e) => problems.push(format!("plate {}: {e}", plate.id)),
                        }
                    }
                    if created {
                        plate.layout = layout.clone();
                        changes.put_plate(&plate);
                        changes.audit(
                            "plate.created",
                            Some(&plate.id),
                            Vec::new(),
                            format!(
                                "created {}-well extraction plate {} with kit {} from an instrument's plate map",
                                plate.format,
                                plate.id,
                                kit.key()
                            ),
                        );
                    }
                    planned.push((plate, layout, placed, records, created, already_placed));
                }
                if !problems.is_empty() {
                    return Err(LabError::conflict_all(
                        format!(
                            "{} problem(s) in the plate map; nothing was applied",
                            problems.len()
                        ),
                        problems,
                    ));
                }
                let mut outcomes = Vec::new();
                for (mut plate, layout, placed, records, created, already_placed) in planned {
                    if !placed.is_empty() {
                        lab.record_placements(
                            changes,
                            &mut plate,
                            &layout,
                            &placed,
                            &records,
                            "plate.mapped",
                        );
                    }
                    outcomes.push(MappedOutcome {
                        plate: plate.id,
                        created,
                        placed,
                        already_placed,
                    });
                }
                Ok(outcomes)
            })
            .await?;
        let created = outcomes.iter().filter(|o| o.created).count() as u64;
        self.counters
            .plates_created
            .fetch_add(created, Ordering::Relaxed);
        Ok(outcomes)
    }
}
