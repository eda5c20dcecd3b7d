//! The daemon's real-time PCR cyclers: one supervisor per `[[cyclers]]` entry,
//! the durable store of every cycle's readings, and the run records.
//!
//! The driver (`pcrd_drivers::cycler`) owns the port; this module owns state:
//!
//! - [`StoreSink`] is the driver's [`CycleSink`]: each complete cycle (every
//!   channel, every well of the plate) is written with the run record's new
//!   cycle count in one sled transaction, and `store_cycle` returns only after
//!   `store.durable()`. The driver does not move past a cycle until then, so a
//!   crash loses no cycle the driver counted as stored, and a cycle that
//!   arrives out of order is refused, which makes the driver fetch what is
//!   missing (`DATA?`) instead of leaving a gap.
//! - [`RunRecord`]s in the `runs` tree: starting, running, instrument offline,
//!   finished, failed or aborted (with the reason), cycles stored, timestamps.
//!   A run is "instrument offline" (not failed) while the link is down; it
//!   goes on when the link returns if the instrument kept running.
//! - On start, runs that were in progress are handed back to their driver
//!   with `resume_run` and the number of cycles the store holds, so only the
//!   missing cycles are fetched.
//!
//! Key layouts (big-endian, so sled's byte order is numeric order):
//!
//! - `runs`: run id (u64 BE) -> [`RunRecord`].
//! - `cycles`: run id (u64 BE) ++ `b'c'` ++ cycle (u32 BE) ++ channel index
//!   (u8, the run's channel order) -> [`ChannelReadings`] (one value per well,
//!   column-major). One value per channel keeps each value far below 64 KiB
//!   (1,536 wells x 8 bytes = 12 KiB; sled writes larger values to blob files
//!   it never fsyncs).
//! - `cycles`: run id (u64 BE) ++ `b'r'` ++ sequence (u32 BE) ->
//!   [`RejectedLine`]: a line refused during the run, kept for diagnosis.
//!
//! A finished run is analysed by `crate::runs` (Ct, calls, plate validity);
//! this module does not release results. Runs started on the instrument's own
//! panel are logged, not stored.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pcrd_drivers::cycler::{
    CommandOutcome, CycleSink, CyclerDriverError, CyclerEvent, CyclerHandle, CyclerLink, EventKind,
    SinkError, spawn_cycler,
};
use pcrd_protocol::cycler::{
    Channel, Command, CycleData, Dialect, Outcome, PlateMap, RunState as DeviceState, Status,
    ThermalProtocol,
};
use pcrd_protocol::domain::{PlateFormat, WellContent};
use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::ConflictableTransactionError;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tracing::{Instrument as _, error, info, warn};

use crate::config::CyclerConfig;
use crate::lab::Lab;
use crate::metrics::Histogram;
use crate::model::{PlateRecord, PlateState};
use crate::store::{Store, StoreError, Versioned, decode, encode};

/// sled writes values above this to blob files it never fsyncs (helpers' rule).
const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Rejected lines kept per cycler in memory (those outside a run).
const RECENT_REJECTED: usize = 32;
/// Per-cycle latencies kept for the benchmark and the API.
const RECENT_LATENCIES: usize = 4096;
/// The protocol a run gets when the request names none: a hot start and 45
/// cycles, reading every kit channel at the annealing step.
const DEFAULT_STAGES: &str = "1x95@120 45x95@3/60@30R";

/// A run's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    /// The record exists; plate map, protocol and start are being sent.
    Starting,
    Running,
    /// The link is down mid-run. Not a failure: the run goes on when the
    /// link returns if the instrument kept running.
    InstrumentOffline,
    Finished,
    /// Ended on a fault or a refused start; the reason says which.
    Failed,
    Aborted,
}

impl RunState {
    pub fn as_str(&self) -> &'static str {
        match self {
            RunState::Starting => "starting",
            RunState::Running => "running",
            RunState::InstrumentOffline => "instrument_offline",
            RunState::Finished => "finished",
            RunState::Failed => "failed",
            RunState::Aborted => "aborted",
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            RunState::Finished | RunState::Failed | RunState::Aborted
        )
    }

    pub const ALL: [RunState; 6] = [
        RunState::Starting,
        RunState::Running,
        RunState::InstrumentOffline,
        RunState::Finished,
        RunState::Failed,
        RunState::Aborted,
    ];
}

/// A PCR run on a cycler, as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: u64,
    pub plate: String,
    pub instrument: String,
    /// The protocol's name.
    pub protocol: String,
    /// The protocol in pcrd's notation (`NAME CHANNELS STAGES`, docs/cycler-protocol.md).
    pub protocol_text: String,
    pub format: PlateFormat,
    /// Channels in the protocol's order; a cycle's readings are stored in it.
    pub channels: Vec<String>,
    /// Data cycles the protocol reads.
    pub cycles_expected: u32,
    pub state: RunState,
    /// Why it failed, was aborted or is offline.
    pub reason: Option<String>,
    /// Cycles 1..=cycles_stored are durable, every channel of each.
    pub cycles_stored: u32,
    /// Lines refused during the run (kept in the `cycles` tree).
    pub lines_rejected: u32,
    /// Ranges fetched again with `DATA?` (first, last), newest last, at most 64.
    pub refetched: Vec<(u32, u32)>,
    pub started_by: String,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub ended_at: Option<i64>,
    pub updated_at: i64,
}

/// `protocol_text` of an extraction run (crate::runs): an extraction run is
/// stored as a [`RunRecord`] with no channels and progress in percent as its
/// "cycles", so both kinds share one id sequence and one `runs` tree.
pub const EXTRACTION_PROTOCOL: &str = "extraction protocol";

impl RunRecord {
    /// Whether this is an extraction run on an extractor (not a PCR run).
    pub fn is_extraction(&self) -> bool {
        self.protocol_text.starts_with(EXTRACTION_PROTOCOL)
    }
}

impl Versioned for RunRecord {
    const TREE: &'static str = "runs";
    const VERSION: u8 = 1;
}

/// One channel of one cycle: a reading per well, column-major.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChannelReadings {
    pub channel: String,
    pub values: Vec<f64>,
}

impl Versioned for ChannelReadings {
    const TREE: &'static str = "cycles";
    const VERSION: u8 = 1;
}

/// A line the driver refused, as received.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedLine {
    pub at: i64,
    pub line: String,
    pub reason: String,
    /// The last cycle stored when it arrived.
    pub after_cycle: u32,
}

impl Versioned for RejectedLine {
    const TREE: &'static str = "cycles";
    const VERSION: u8 = 1;
}

/// Why a run could not be started, read or changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    #[error("{0}")]
    NotFound(String),
    /// The request is fine but the lab's or the instrument's state refuses it.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    /// The instrument refused or did not answer; the run's record says what
    /// became of it.
    #[error("{0}")]
    Instrument(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn cycle_key(run: u64, cycle: u32, channel: u8) -> [u8; 14] {
    let mut key = [0u8; 14];
    key[..8].copy_from_slice(&run.to_be_bytes());
    key[8] = b'c';
    key[9..13].copy_from_slice(&cycle.to_be_bytes());
    key[13] = channel;
    key
}

fn rejected_key(run: u64, seq: u32) -> [u8; 13] {
    let mut key = [0u8; 13];
    key[..8].copy_from_slice(&run.to_be_bytes());
    key[8] = b'r';
    key[9..13].copy_from_slice(&seq.to_be_bytes());
    key
}

fn sized(tree: &'static str, key: &[u8], value: Vec<u8>) -> Result<Vec<u8>, StoreError> {
    if value.len() >= MAX_VALUE_BYTES {
        return Err(StoreError::BadRecord {
            tree,
            key: key.escape_ascii().to_string(),
            detail: format!(
                "value of {} bytes is over the {MAX_VALUE_BYTES}-byte limit",
                value.len()
            ),
        });
    }
    Ok(value)
}

/// The `runs` and `cycles` trees.
#[derive(Debug)]
pub struct RunStore {
    store: Store,
    next_id: AtomicU64,
    pub metrics: CyclerMetrics,
    /// Run ids by plate and by instrument, built from the tree at open and kept
    /// as runs are created (neither changes afterwards), so a start's checks read
    /// a plate's or an instrument's few runs, not every run of the store's history.
    by_plate: Mutex<HashMap<String, Vec<u64>>>,
    by_instrument: Mutex<HashMap<String, Vec<u64>>>,
}

/// What /metrics shows of cyclers beside the per-instrument gauges.
#[derive(Debug, Default)]
pub struct CyclerMetrics {
    pub cycles_stored: AtomicU64,
    /// From the cycle's last line decoded (its last byte arrived) to durable.
    pub store_latency: Histogram,
    pub lines_rejected: AtomicU64,
    pub sink_failures: AtomicU64,
    recent: Mutex<VecDeque<Duration>>,
}

impl CyclerMetrics {
    /// The last per-cycle store latencies (newest last).
    pub fn recent_latencies(&self) -> Vec<Duration> {
        lock(&self.recent).iter().copied().collect()
    }

    fn observe(&self, latency: Duration) {
        self.store_latency.observe(latency);
        let mut recent = lock(&self.recent);
        if recent.len() == RECENT_LATENCIES {
            recent.pop_front();
        }
        recent.push_back(latency);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while these locks are held; a poisoned one is still usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl RunStore {
    pub fn open(store: Store) -> Result<RunStore, StoreError> {
        let last = match store.trees().runs.last()? {
            Some((key, _)) => key
                .as_ref()
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::BadRecord {
                    tree: "runs",
                    key: key.escape_ascii().to_string(),
                    detail: "key is not a run id".into(),
                })?,
            None => 0,
        };
        let out = RunStore {
            store,
            next_id: AtomicU64::new(last + 1),
            metrics: CyclerMetrics::default(),
            by_plate: Mutex::default(),
            by_instrument: Mutex::default(),
        };
        for run in out.all()? {
            out.index(&run);
        }
        Ok(out)
    }

    fn index(&self, run: &RunRecord) {
        lock(&self.by_plate)
            .entry(run.plate.clone())
            .or_default()
            .push(run.id);
        lock(&self.by_instrument)
            .entry(run.instrument.clone())
            .or_default()
            .push(run.id);
    }

    fn load(&self, ids: Vec<u64>) -> Result<Vec<RunRecord>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(run) = self.get(id)? {
                out.push(run);
            }
        }
        Ok(out)
    }

    /// Every run of a plate (extraction and PCR), oldest first.
    pub fn of_plate(&self, plate: &str) -> Result<Vec<RunRecord>, StoreError> {
        let ids = lock(&self.by_plate).get(plate).cloned().unwrap_or_default();
        self.load(ids)
    }

    /// Every run on an instrument, oldest first.
    pub fn on_instrument(&self, instrument: &str) -> Result<Vec<RunRecord>, StoreError> {
        let ids = lock(&self.by_instrument)
            .get(instrument)
            .cloned()
            .unwrap_or_default();
        self.load(ids)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn get(&self, id: u64) -> Result<Option<RunRecord>, StoreError> {
        let key = id.to_be_bytes();
        match self.store.trees().runs.get(key)? {
            Some(v) => Ok(Some(decode(&key, &v)?)),
            None => Ok(None),
        }
    }

    pub fn all(&self) -> Result<Vec<RunRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.store.trees().runs.iter() {
            let (k, v) = item?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    /// Writes a run record (one transaction) and waits until it is durable.
    pub async fn put(&self, run: &RunRecord) -> Result<(), StoreError> {
        self.commit(run)?;
        self.store.durable().await
    }

    /// Writes `run` without waiting for the durability barrier: for a caller
    /// that must not hold a lock across the disk wait and calls
    /// `store().durable()` itself before anything depends on the write.
    pub fn commit(&self, run: &RunRecord) -> Result<(), StoreError> {
        let key = run.id.to_be_bytes();
        let value = sized("runs", &key, encode(run))?;
        self.store.trees().runs.insert(key, value)?;
        Ok(())
    }

    /// A new run record in state `starting`, durable when this returns.
    #[allow(clippy::too_many_arguments)]
    pub async fn create(
        &self,
        plate: &str,
        instrument: &str,
        protocol: &ThermalProtocol,
        protocol_text: &str,
        format: PlateFormat,
        started_by: &str,
    ) -> Result<RunRecord, StoreError> {
        let at = now_ms();
        let run = RunRecord {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            plate: plate.to_owned(),
            instrument: instrument.to_owned(),
            protocol: protocol.name.clone(),
            protocol_text: protocol_text.to_owned(),
            format,
            channels: protocol
                .channels
                .iter()
                .map(|c| c.as_str().to_owned())
                .collect(),
            cycles_expected: protocol.data_cycles(),
            state: RunState::Starting,
            reason: None,
            cycles_stored: 0,
            lines_rejected: 0,
            refetched: Vec::new(),
            started_by: started_by.to_owned(),
            created_at: at,
            started_at: None,
            ended_at: None,
            updated_at: at,
        };
        // Indexed before it is written, so a concurrent start's check sees it as
        // soon as the record can be read (an id whose write failed is skipped).
        self.index(&run);
        self.put(&run).await?;
        Ok(run)
    }

    /// A new extraction run record in state `starting`, durable when this returns.
    pub async fn create_extraction(
        &self,
        plate: &str,
        instrument: &str,
        protocol: u16,
        format: PlateFormat,
        started_by: &str,
    ) -> Result<RunRecord, StoreError> {
        let at = now_ms();
        let run = RunRecord {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            plate: plate.to_owned(),
            instrument: instrument.to_owned(),
            protocol: protocol.to_string(),
            protocol_text: format!("{EXTRACTION_PROTOCOL} {protocol}"),
            format,
            channels: Vec::new(),
            cycles_expected: 100,
            state: RunState::Starting,
            reason: None,
            cycles_stored: 0,
            lines_rejected: 0,
            refetched: Vec::new(),
            started_by: started_by.to_owned(),
            created_at: at,
            started_at: None,
            ended_at: None,
            updated_at: at,
        };
        // Indexed before it is written, so a concurrent start's check sees it as
        // soon as the record can be read (an id whose write failed is skipped).
        self.index(&run);
        self.put(&run).await?;
        Ok(run)
    }

    /// Readings of `run`: `curves[channel][well]` is the curve over cycles
    /// 1..=cycles_stored. Errors name any cycle that is missing.
    pub fn curves(&self, run: &RunRecord) -> Result<Vec<Vec<Vec<f64>>>, StoreError> {
        let wells = run.format.well_count();
        let mut curves =
            vec![vec![Vec::with_capacity(run.cycles_stored as usize); wells]; run.channels.len()];
        let tree = &self.store.trees().cycles;
        for cycle in 1..=run.cycles_stored {
            for (ch, curve) in curves.iter_mut().enumerate() {
                let key = cycle_key(run.id, cycle, ch as u8);
                let raw = tree.get(key)?.ok_or_else(|| StoreError::BadRecord {
                    tree: "cycles",
                    key: format!("run {} cycle {cycle} channel {ch}", run.id),
                    detail: "missing although the run record counts it as stored".into(),
                })?;
                let readings: ChannelReadings = decode(&key, &raw)?;
                for (well, v) in readings.values.iter().enumerate().take(wells) {
                    curve[well].push(*v);
                }
            }
        }
        Ok(curves)
    }

    /// Lines refused during `run`, in arrival order.
    pub fn rejected(&self, run: u64) -> Result<Vec<RejectedLine>, StoreError> {
        let mut prefix = run.to_be_bytes().to_vec();
        prefix.push(b'r');
        let mut out = Vec::new();
        for item in self.store.trees().cycles.scan_prefix(prefix) {
            let (k, v) = item?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    /// Stores one complete cycle and the run's new count in one transaction.
    fn write_cycle(
        &self,
        run: &RunRecord,
        cycle: u32,
        readings: &[&CycleData],
    ) -> Result<(), StoreError> {
        let mut writes: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(readings.len());
        for (ch, data) in readings.iter().enumerate() {
            let key = cycle_key(run.id, cycle, ch as u8);
            let value = encode(&ChannelReadings {
                channel: data.channel.as_str().to_owned(),
                values: data.values.clone(),
            });
            writes.push((key.to_vec(), sized("cycles", &key, value)?));
        }
        let run_key = run.id.to_be_bytes();
        let run_value = sized("runs", &run_key, encode(run))?;
        let t = self.store.trees();
        (&t.runs, &t.cycles)
            .transaction(|(runs, cycles)| {
                for (k, v) in &writes {
                    cycles.insert(k.as_slice(), v.as_slice())?;
                }
                runs.insert(&run_key[..], run_value.as_slice())?;
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                sled::transaction::TransactionError::Storage(e) => StoreError::Sled(e),
                sled::transaction::TransactionError::Abort(()) => StoreError::BadRecord {
                    tree: "cycles",
                    key: format!("run {} cycle {cycle}", run.id),
                    detail: "transaction aborted".into(),
                },
            })
    }

    /// Keeps a refused line under the run, with the run's new count, in one
    /// transaction (not waited on: nothing is acknowledged for it).
    fn write_rejected(&self, run: &RunRecord, line: &RejectedLine) -> Result<(), StoreError> {
        let key = rejected_key(run.id, run.lines_rejected);
        let mut value = encode(line);
        if value.len() >= MAX_VALUE_BYTES {
            // The driver caps a line far below this; a cut line is still evidence.
            let mut cut = line.clone();
            cut.line.truncate(4096);
            value = encode(&cut);
        }
        let run_key = run.id.to_be_bytes();
        let run_value = sized("runs", &run_key, encode(run))?;
        let t = self.store.trees();
        (&t.runs, &t.cycles)
            .transaction(|(runs, cycles)| {
                cycles.insert(&key[..], value.as_slice())?;
                runs.insert(&run_key[..], run_value.as_slice())?;
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                sled::transaction::TransactionError::Storage(e) => StoreError::Sled(e),
                sled::transaction::TransactionError::Abort(()) => StoreError::BadRecord {
                    tree: "runs",
                    key: run.id.to_string(),
                    detail: "transaction aborted".into(),
                },
            })
    }
}

/// The run a cycler is carrying out, shared by its sink and its supervisor.
/// Every change to the record goes through this lock, so the sink's cycle
/// count and the supervisor's state changes never overwrite each other.
#[derive(Debug, Default)]
pub struct ActiveRun {
    run: Mutex<Option<RunRecord>>,
    /// A run started on the panel was already reported.
    unlinked_reported: AtomicBool,
}

impl ActiveRun {
    pub fn get(&self) -> Option<RunRecord> {
        lock(&self.run).clone()
    }

    pub fn set(&self, run: Option<RunRecord>) {
        *lock(&self.run) = run;
    }
}

/// The driver's [`CycleSink`]: a cycle is durable before `store_cycle` returns.
#[derive(Clone, Debug)]
pub struct StoreSink {
    runs: Arc<RunStore>,
    active: Arc<ActiveRun>,
    instrument: Arc<str>,
    /// Starts early-call evaluations after a cycle is durable
    /// (`crate::runs::early`); none in benches and unit tests.
    early: Option<Arc<crate::runs::early::EarlyCalls>>,
}

impl StoreSink {
    pub fn new(runs: Arc<RunStore>, active: Arc<ActiveRun>, instrument: &str) -> StoreSink {
        StoreSink {
            runs,
            active,
            instrument: instrument.into(),
            early: None,
        }
    }

    /// The same sink, evaluating early calls with `lab`'s review policy.
    pub fn with_early_calls(mut self, lab: Arc<Lab>) -> StoreSink {
        self.early = Some(Arc::new(crate::runs::early::EarlyCalls::new(lab)));
        self
    }

    async fn store(&self, cycle: u32, readings: &[CycleData]) -> Result<(), SinkError> {
        let arrived = Instant::now();
        let updated = {
            let mut guard = lock(&self.active.run);
            let Some(run) = guard.as_mut() else {
                if !self.active.unlinked_reported.swap(true, Ordering::Relaxed) {
                    warn!(
                        cycle,
                        "Cycle data for a run pcrd did not start (started on the instrument's panel?); not stored."
                    );
                }
                return Ok(());
            };
            let span = tracing::info_span!("cycle", run = run.id, plate = %run.plate, instrument = %self.instrument, cycle);
            let _enter = span.enter();
            let expected = run.cycles_stored + 1;
            if cycle < expected {
                // Fetched again after a reconnect: already durable.
                return Ok(());
            }
            if cycle > expected {
                warn!(
                    expected,
                    "Cycle out of order; refused so the driver fetches the missing ones."
                );
                return Err(SinkError(format!(
                    "cycle {cycle} arrived but cycle {expected} is the next to store"
                )));
            }
            let wells = run.format.well_count();
            let mut ordered = Vec::with_capacity(run.channels.len());
            for name in &run.channels {
                let mut matching = readings.iter().filter(|d| d.channel.as_str() == name);
                match (matching.next(), matching.next()) {
                    (Some(d), None) if d.values.len() == wells && d.cycle == cycle => {
                        ordered.push(d)
                    }
                    (Some(d), None) => {
                        return Err(SinkError(format!(
                            "cycle {cycle} channel {name}: {} readings for {wells} wells",
                            d.values.len()
                        )));
                    }
                    (None, _) => {
                        return Err(SinkError(format!("cycle {cycle}: channel {name} missing")));
                    }
                    (Some(_), Some(_)) => {
                        return Err(SinkError(format!("cycle {cycle}: channel {name} twice")));
                    }
                }
            }
            if readings.len() != run.channels.len() {
                return Err(SinkError(format!(
                    "cycle {cycle}: {} channels for the run's {}",
                    readings.len(),
                    run.channels.len()
                )));
            }
            let mut next = run.clone();
            next.cycles_stored = cycle;
            next.updated_at = now_ms();
            if matches!(next.state, RunState::Starting | RunState::InstrumentOffline) {
                // Data arriving means the link is up and the run is going.
                next.state = RunState::Running;
                next.reason = None;
                next.started_at.get_or_insert(next.updated_at);
            }
            self.runs
                .write_cycle(&next, cycle, &ordered)
                .map_err(|e| SinkError(e.to_string()))?;
            *run = next.clone();
            next
        };
        self.runs
            .store
            .durable()
            .await
            .map_err(|e| SinkError(e.to_string()))?;
        let latency = arrived.elapsed();
        self.runs.metrics.observe(latency);
        self.runs
            .metrics
            .cycles_stored
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(run = updated.id, plate = %updated.plate, cycle, latency_us = latency.as_micros() as u64, "Cycle stored.");
        if let Some(early) = &self.early {
            // After the cycle is durable, in its own task: never holds the driver.
            early.after_cycle(&self.runs, &updated);
        }
        Ok(())
    }
}

impl CycleSink for StoreSink {
    fn store_cycle(
        &self,
        cycle: u32,
        readings: &[CycleData],
    ) -> impl std::future::Future<Output = Result<(), SinkError>> + Send {
        let readings = readings.to_vec();
        let this = self.clone();
        async move {
            let result = this.store(cycle, &readings).await;
            if result.is_err() {
                this.runs
                    .metrics
                    .sink_failures
                    .fetch_add(1, Ordering::Relaxed);
            }
            result
        }
    }
}

/// Whether the cycler answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    Connecting,
    Online,
    Offline,
}

impl Link {
    pub fn as_str(self) -> &'static str {
        match self {
            Link::Connecting => "connecting",
            Link::Online => "online",
            Link::Offline => "offline",
        }
    }
}

/// What the supervisor knows of a cycler's link and device.
#[derive(Clone, Debug)]
pub struct LinkState {
    pub link: Link,
    pub reason: Option<String>,
    pub since: SystemTime,
    /// The last status the driver read.
    pub status: Option<Status>,
    /// Lines refused outside a run, newest last.
    pub rejected: VecDeque<(String, String)>,
    pub lines_rejected: u64,
    pub last_fault: Option<String>,
}

/// One configured cycler.
#[derive(Debug)]
pub struct Cycler {
    pub name: String,
    /// `tcp HOST:PORT` or `serial /dev/...`.
    pub link_name: String,
    pub dialect: String,
    handle: CyclerHandle,
    active: Arc<ActiveRun>,
    state: Mutex<LinkState>,
    /// The driver tracks the active run (it saw `!STARTED` or was told with
    /// `resume_run`); when not, the supervisor tells it.
    driver_knows_run: AtomicBool,
    /// Held while a run is being started or aborted: never two at once.
    command: tokio::sync::Mutex<()>,
    /// Set while an abort from the API is under way: the cycler's
    /// `!FINISHED ABORTED` may reach the supervisor before the command's reply,
    /// and the run's reason must still name who aborted it and why.
    abort_reason: Mutex<Option<String>>,
    runs: Arc<RunStore>,
    /// For the analysis at the end of a run (plate layout, kit).
    lab: Arc<Lab>,
}

/// Every configured cycler. Dropping it stops their supervisors.
#[derive(Debug)]
pub struct Cyclers {
    by_name: BTreeMap<String, Arc<Cycler>>,
    runs: Arc<RunStore>,
    lab: Arc<Lab>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Cyclers {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn link_name(link: &CyclerLink) -> String {
    match link {
        CyclerLink::Tcp(addr) => format!("tcp {addr}"),
        CyclerLink::Serial { path, baud } => format!("serial {path} {baud}"),
    }
}

impl Cyclers {
    /// Starts a driver and a supervisor per cycler, and resumes the runs that
    /// were in progress when the daemon stopped.
    pub async fn start(configs: &[CyclerConfig], lab: Arc<Lab>) -> Result<Cyclers, StoreError> {
        let runs = Arc::new(RunStore::open(lab.store().clone())?);
        let in_progress: Vec<RunRecord> = runs
            .all()?
            .into_iter()
            .filter(|r| !r.state.is_terminal() && !r.is_extraction())
            .collect();
        let lab_for_catch_up = Arc::clone(&lab);
        let runs_for_catch_up = Arc::clone(&runs);
        let mut out = Cyclers {
            by_name: BTreeMap::new(),
            runs: Arc::clone(&runs),
            lab,
            tasks: Vec::new(),
        };
        for config in configs {
            let mut driver =
                pcrd_drivers::cycler::CyclerConfig::new(&config.name, config.link.clone());
            driver.dialect = config.dialect.clone();
            driver.timeout_cap = config.timeout;
            driver.settle = config.settle;
            driver.backoff_max = config.reconnect_max;
            driver.backoff_min = driver.backoff_min.min(config.reconnect_max);
            let active = Arc::new(ActiveRun::default());
            // The newest unfinished run of this cycler is the one it carries out;
            // an older one can only be left from a bug or a crash during start.
            let mut mine: Vec<&RunRecord> = in_progress
                .iter()
                .filter(|r| r.instrument == config.name)
                .collect();
            mine.sort_by_key(|r| r.id);
            let resume = mine.pop().cloned();
            for stale in mine {
                let mut stale = stale.clone();
                stale.state = RunState::Failed;
                stale.reason = Some(format!(
                    "superseded by run {} on the same cycler",
                    resume.as_ref().map_or(0, |r| r.id)
                ));
                stale.ended_at = Some(now_ms());
                runs.put(&stale).await?;
            }
            active.set(resume.clone());
            let sink = StoreSink::new(Arc::clone(&runs), Arc::clone(&active), &config.name)
                .with_early_calls(Arc::clone(&out.lab));
            let (handle, events, task) = spawn_cycler(driver, sink);
            let cycler = Arc::new(Cycler {
                name: config.name.clone(),
                link_name: link_name(&config.link),
                dialect: config.dialect.name.clone(),
                handle,
                active,
                state: Mutex::new(LinkState {
                    link: Link::Connecting,
                    reason: None,
                    since: SystemTime::now(),
                    status: None,
                    rejected: VecDeque::new(),
                    lines_rejected: 0,
                    last_fault: None,
                }),
                driver_knows_run: AtomicBool::new(false),
                command: tokio::sync::Mutex::new(()),
                abort_reason: Mutex::new(None),
                runs: Arc::clone(&runs),
                lab: Arc::clone(&out.lab),
            });
            if let Some(run) = &resume {
                info!(instrument = %config.name, run = run.id, plate = %run.plate, cycles_stored = run.cycles_stored, "Resuming the run that was in progress; the cycles after those stored will be fetched.");
                cycler.resume_driver(run).await;
            }
            let span = tracing::info_span!("cycler", instrument = %config.name);
            out.tasks.push(task);
            out.tasks.push(tokio::spawn(
                supervise(Arc::clone(&cycler), events).instrument(span),
            ));
            info!(instrument = %config.name, link = %cycler.link_name, dialect = %cycler.dialect, "Following the cycler.");
            out.by_name.insert(config.name.clone(), cycler);
        }
        // Finished runs whose analysis a crash interrupted (crate::runs).
        out.tasks.push(tokio::spawn(async move {
            if let Err(e) = crate::runs::catch_up(lab_for_catch_up, runs_for_catch_up).await {
                error!(error = %e, "Finished runs could not be checked for a missing analysis.");
            }
        }));
        Ok(out)
    }

    pub fn all(&self) -> impl Iterator<Item = &Cycler> {
        self.by_name.values().map(AsRef::as_ref)
    }

    pub fn get(&self, name: &str) -> Option<&Cycler> {
        self.by_name.get(name).map(AsRef::as_ref)
    }

    pub fn runs(&self) -> &RunStore {
        &self.runs
    }

    /// The run store shared with extraction runs (one id sequence).
    pub fn run_store(&self) -> Arc<RunStore> {
        Arc::clone(&self.runs)
    }

    pub fn lab(&self) -> Arc<Lab> {
        Arc::clone(&self.lab)
    }

    /// Starts a run of `plate` on `instrument`. The record is durable (state
    /// `starting`) before anything is sent; `RUN:START` is sent once (the
    /// driver reads the state back when its reply is lost, never resends).
    pub async fn start_run(
        &self,
        plate_id: &str,
        instrument: &str,
        protocol: Option<&str>,
        user: &str,
    ) -> Result<RunRecord, RunError> {
        let cycler = self
            .by_name
            .get(instrument)
            .ok_or_else(|| RunError::NotFound(format!("no cycler {instrument:?} in the config")))?;
        let plate = self.lab.plate(plate_id).map_err(|e| match e {
            crate::lab::LabError::NotFound { message } => RunError::NotFound(message),
            crate::lab::LabError::Store(e) => RunError::Store(e),
            other => RunError::Invalid(other.to_string()),
        })?;
        if plate.state != PlateState::Sealed {
            return Err(RunError::Conflict(format!(
                "plate {plate_id} is not sealed: seal it before it goes on a cycler"
            )));
        }
        // A plate runs once to a finish; a failed or aborted run may be repeated.
        if let Some(run) = self.runs.of_plate(plate_id)?.into_iter().find(|r| {
            !r.is_extraction()
                && r.plate == plate_id
                && (r.state == RunState::Finished || !r.state.is_terminal())
        }) {
            return Err(RunError::Conflict(format!(
                "plate {plate_id} already has run {} ({})",
                run.id,
                run.state.as_str()
            )));
        }
        let (protocol, protocol_text) = self.protocol_for(&plate, protocol)?;
        let map = plate_map(&plate)?;
        let Ok(_guard) = cycler.command.try_lock() else {
            return Err(RunError::Conflict(format!(
                "a run is being started or aborted on {instrument}"
            )));
        };
        if let Some(run) = cycler.active.get() {
            return Err(RunError::Conflict(format!(
                "{instrument} is busy with run {} of plate {} ({})",
                run.id,
                run.plate,
                run.state.as_str()
            )));
        }
        let status = cycler
            .handle
            .status()
            .await
            .map_err(|e| RunError::Conflict(format!("{instrument} cannot be started: {e}")))?;
        if !matches!(
            status.state,
            DeviceState::Idle | DeviceState::Loaded | DeviceState::Completed | DeviceState::Aborted
        ) {
            return Err(RunError::Conflict(format!(
                "{instrument} is not idle: its state is {:?}",
                status.state
            )));
        }
        let run = self
            .runs
            .create(
                plate_id,
                instrument,
                &protocol,
                &protocol_text,
                plate.format,
                user,
            )
            .await?;
        cycler.active.set(Some(run.clone()));
        cycler
            .active
            .unlinked_reported
            .store(false, Ordering::Relaxed);
        cycler.driver_knows_run.store(false, Ordering::Relaxed);
        let span =
            tracing::info_span!("run", run = run.id, plate = %plate_id, instrument = %instrument);
        async {
            info!(protocol = %protocol.name, "Starting a PCR run.");
            if let Err(e) = cycler.handle.load_plate(map).await {
                return Err(cycler.fail(format!("loading the plate map failed: {e}")).await);
            }
            if let Err(e) = cycler.handle.load_protocol(protocol).await {
                return Err(cycler.fail(format!("loading the protocol failed: {e}")).await);
            }
            match cycler.handle.start().await {
                Ok(CommandOutcome::Replied(_)) | Ok(CommandOutcome::ConfirmedByReadBack(_)) => {
                    cycler.driver_knows_run.store(true, Ordering::Relaxed);
                    cycler.update(|r| {
                        if r.state == RunState::Starting {
                            r.state = RunState::Running;
                        }
                        r.started_at.get_or_insert(now_ms());
                    })
                    .await?;
                    Ok(cycler.active.get().unwrap_or(run.clone()))
                }
                Err(e @ (CyclerDriverError::Device(_) | CyclerDriverError::NotConfirmed { .. } | CyclerDriverError::Protocol(_))) => {
                    Err(cycler.fail(format!("the cycler did not start: {e}")).await)
                }
                Err(e) => {
                    // Whether the start took effect is unknown: the run waits for
                    // the link and the status read then decides; never resent.
                    warn!(error = %e, "Start sent, outcome unknown; waiting for the instrument.");
                    cycler
                        .update(|r| {
                            r.state = RunState::InstrumentOffline;
                            r.reason = Some(format!("start sent, outcome unknown until the instrument answers: {e}"));
                        })
                        .await?;
                    Err(RunError::Instrument(format!(
                        "run {} start sent but not confirmed ({e}); it shows instrument_offline until the cycler answers",
                        run.id
                    )))
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Aborts a run in progress: `RUN:ABORT` is sent once; a lost reply is
    /// settled by reading the state back.
    pub async fn abort_run(
        &self,
        id: u64,
        user: &str,
        reason: Option<&str>,
    ) -> Result<RunRecord, RunError> {
        let run = self
            .runs
            .get(id)?
            .ok_or_else(|| RunError::NotFound(format!("no run {id}")))?;
        if run.state.is_terminal() {
            return Err(RunError::Conflict(format!(
                "run {id} has already ended ({})",
                run.state.as_str()
            )));
        }
        let cycler = self.by_name.get(&run.instrument).ok_or_else(|| {
            RunError::Conflict(format!(
                "run {id} is on {}, which is no longer in the config",
                run.instrument
            ))
        })?;
        let Ok(_guard) = cycler.command.try_lock() else {
            return Err(RunError::Conflict(format!(
                "a run is being started or aborted on {}",
                run.instrument
            )));
        };
        let span =
            tracing::info_span!("run", run = id, plate = %run.plate, instrument = %run.instrument);
        async {
            let why = match reason {
                Some(r) if !r.trim().is_empty() => format!("aborted by {user}: {r}"),
                _ => format!("aborted by {user}"),
            };
            *lock(&cycler.abort_reason) = Some(why.clone());
            let result = match cycler.handle.abort().await {
                Ok(_) => {
                    warn!(reason = %why, "Run aborted.");
                    // A no-op when the supervisor already ended it on `!FINISHED`.
                    cycler
                        .end(RunState::Aborted, Some(why))
                        .await
                        .map_err(RunError::from)
                }
                Err(e) => Err(RunError::Instrument(format!(
                    "the cycler did not confirm the abort: {e}"
                ))),
            };
            // Cleared only now: the supervisor may still be handling `!FINISHED`.
            lock(&cycler.abort_reason).take();
            result?;
            Ok(self.runs.get(id)?.unwrap_or(run.clone()))
        }
        .instrument(span)
        .await
    }

    fn protocol_for(
        &self,
        plate: &PlateRecord,
        text: Option<&str>,
    ) -> Result<(ThermalProtocol, String), RunError> {
        let text = match text {
            Some(t) => t.trim().to_owned(),
            None => {
                let kit = self
                    .lab
                    .kits()
                    .find(&format!("{}@{}", plate.kit_id.as_str(), plate.kit_version))
                    .map_err(RunError::Invalid)?;
                let mut channels: Vec<&str> = Vec::new();
                for t in kit.targets() {
                    if !channels.contains(&t.channel.as_str()) {
                        channels.push(&t.channel);
                    }
                }
                format!("PCRD45 {} {DEFAULT_STAGES}", channels.join(","))
            }
        };
        let reference = Dialect::reference();
        let line = format!("{} {text}", reference.commands.load_protocol);
        match Command::parse(&line, &reference) {
            Ok(Command::LoadProtocol(p)) => Ok((p, text)),
            Ok(_) => Err(RunError::Invalid(format!(
                "protocol {text:?} is not a protocol"
            ))),
            Err(e) => Err(RunError::Invalid(format!(
                "protocol {text:?}: {e} (expected NAME CHANNELS STAGES, e.g. \"PCRD45 FAM,HEX 1x95@120 45x95@3/60@30R\")"
            ))),
        }
    }

    /// Appends the cycler metrics in the Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        let m = &self.runs.metrics;
        let _ = writeln!(
            out,
            "# HELP pcrd_cycles_stored_total Cycles (every channel and well) made durable since start.\n# TYPE pcrd_cycles_stored_total counter\npcrd_cycles_stored_total {}",
            m.cycles_stored.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP pcrd_cycler_lines_rejected_total Lines from cyclers refused (malformed, wrong well count, out of order).\n# TYPE pcrd_cycler_lines_rejected_total counter\npcrd_cycler_lines_rejected_total {}",
            m.lines_rejected.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP pcrd_cycle_sink_failures_total Cycles refused by the store (fetched again by the driver).\n# TYPE pcrd_cycle_sink_failures_total counter\npcrd_cycle_sink_failures_total {}",
            m.sink_failures.load(Ordering::Relaxed)
        );
        m.store_latency.render(
            out,
            "pcrd_cycle_store_duration_seconds",
            "From a cycle's last line decoded to its readings being durable.",
        );
        let mut by_state: BTreeMap<&str, u64> =
            RunState::ALL.iter().map(|s| (s.as_str(), 0)).collect();
        if let Ok(all) = self.runs.all() {
            for r in all {
                *by_state.entry(r.state.as_str()).or_default() += 1;
            }
        }
        let _ = writeln!(
            out,
            "# HELP pcrd_runs PCR runs in the store by state.\n# TYPE pcrd_runs gauge"
        );
        for (state, n) in by_state {
            let _ = writeln!(out, "pcrd_runs{{state=\"{state}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP pcrd_cycler_online 1 while the cycler's link is up, else 0.\n# TYPE pcrd_cycler_online gauge"
        );
        for c in self.all() {
            let _ = writeln!(
                out,
                "pcrd_cycler_online{{instrument=\"{}\"}} {}",
                crate::instruments::label(&c.name),
                u64::from(c.link_state().link == Link::Online)
            );
        }
    }
}

/// The plate map the cycler gets: every used well with its tube barcode or
/// control label.
fn plate_map(plate: &PlateRecord) -> Result<PlateMap, RunError> {
    let wells = plate
        .layout
        .iter()
        .map(|(well, content)| {
            let label = match content {
                WellContent::Sample { barcode } => barcode.as_str().to_owned(),
                WellContent::Control { control } => control.short_label().to_owned(),
            };
            (well, label)
        })
        .collect();
    let map = PlateMap {
        plate_id: plate.id.as_str().to_owned(),
        format: plate.format,
        wells,
    };
    map.validate().map_err(|e| {
        RunError::Invalid(format!(
            "plate {} cannot be sent to a cycler: {e}",
            plate.id
        ))
    })?;
    Ok(map)
}

impl Cycler {
    pub fn link_state(&self) -> LinkState {
        lock(&self.state).clone()
    }

    pub fn active_run(&self) -> Option<RunRecord> {
        self.active.get()
    }

    async fn resume_driver(&self, run: &RunRecord) {
        let channels: Result<Vec<Channel>, _> =
            run.channels.iter().map(|c| Channel::new(c)).collect();
        match channels {
            Ok(channels) => {
                if self
                    .handle
                    .resume_run(run.format.well_count(), channels, run.cycles_stored)
                    .await
                    .is_ok()
                {
                    self.driver_knows_run.store(true, Ordering::Relaxed);
                }
            }
            Err(e) => {
                error!(run = run.id, error = %e, "The run's channels cannot be read back; it cannot be resumed.")
            }
        }
    }

    /// Changes the active run's record (durable on return).
    async fn update(&self, change: impl FnOnce(&mut RunRecord)) -> Result<(), StoreError> {
        {
            let mut guard = lock(&self.active.run);
            let Some(run) = guard.as_mut() else {
                return Ok(());
            };
            let mut next = run.clone();
            change(&mut next);
            next.updated_at = now_ms();
            if next == *run {
                return Ok(());
            }
            let key = next.id.to_be_bytes();
            let value = sized("runs", &key, encode(&next))?;
            self.runs.store.trees().runs.insert(key, value)?;
            *run = next;
        }
        self.runs.store.durable().await
    }

    /// Ends the active run in `state` and lets the cycler take the next.
    async fn end(&self, state: RunState, reason: Option<String>) -> Result<(), StoreError> {
        let Some(id) = self.active.get().map(|r| r.id) else {
            return Ok(());
        };
        self.update(|r| {
            r.state = state;
            r.reason = reason;
            r.ended_at = Some(now_ms());
        })
        .await?;
        let mut guard = lock(&self.active.run);
        if guard.as_ref().is_some_and(|r| r.id == id) {
            *guard = None;
        }
        drop(guard);
        self.driver_knows_run.store(false, Ordering::Relaxed);
        Ok(())
    }

    /// Fails the active run with `reason` (for a start that did not take).
    async fn fail(&self, reason: String) -> RunError {
        error!(%reason, "The run failed to start.");
        if let Err(e) = self.end(RunState::Failed, Some(reason.clone())).await {
            return RunError::Store(e);
        }
        RunError::Instrument(reason)
    }

    async fn on_event(&self, kind: &EventKind) -> Result<(), StoreError> {
        match kind {
            EventKind::Online {
                status,
                resynchronised,
            } => {
                {
                    let mut s = lock(&self.state);
                    s.link = Link::Online;
                    s.reason = None;
                    s.since = SystemTime::now();
                    s.status = status.clone();
                }
                let Some(run) = self.active.get() else {
                    return Ok(());
                };
                let Some(status) = status else {
                    return Ok(());
                };
                info!(run = run.id, plate = %run.plate, resynchronised, device = ?status.state, cycle = status.cycle, "Cycler back online during a run.");
                match status.state {
                    DeviceState::Running | DeviceState::Completed | DeviceState::Aborted => {
                        if !self.driver_knows_run.load(Ordering::Relaxed) {
                            self.resume_driver(&run).await;
                        }
                        self.update(|r| {
                            if matches!(r.state, RunState::InstrumentOffline | RunState::Starting) {
                                r.state = RunState::Running;
                                r.reason = None;
                                r.started_at.get_or_insert(now_ms());
                            }
                        })
                        .await?;
                    }
                    DeviceState::Error => {
                        self.end(
                            RunState::Failed,
                            Some(format!(
                                "the cycler is in its error state (found on reconnecting at cycle {}); cycles 1..={} are kept",
                                status.cycle, run.cycles_stored
                            )),
                        )
                        .await?;
                    }
                    // A start never confirmed (its reply lost, or the daemon died
                    // while starting) and the cycler idle: it did not take. Not while
                    // the API is still starting it (the command lock is held then).
                    DeviceState::Idle | DeviceState::Loaded
                        if matches!(
                            run.state,
                            RunState::InstrumentOffline | RunState::Starting
                        ) && run.started_at.is_none()
                            && self.command.try_lock().is_ok() =>
                    {
                        self.end(
                            RunState::Failed,
                            Some("the start did not take effect: the cycler is idle".into()),
                        )
                        .await?;
                    }
                    _ => {}
                }
            }
            EventKind::Offline {
                reason,
                run_in_progress,
            } => {
                {
                    let mut s = lock(&self.state);
                    s.link = Link::Offline;
                    s.reason = Some(reason.clone());
                    s.since = SystemTime::now();
                }
                if let Some(run) = self.active.get() {
                    warn!(run = run.id, plate = %run.plate, %reason, run_in_progress, "Cycler offline during a run: the run is instrument_offline, not failed.");
                    self.update(|r| {
                        if matches!(r.state, RunState::Running | RunState::Starting) {
                            r.state = RunState::InstrumentOffline;
                            r.reason = Some(format!("link lost: {reason}"));
                        }
                    })
                    .await?;
                }
            }
            EventKind::RunStarted { protocol } => {
                if let Some(run) = self.active.get() {
                    self.driver_knows_run.store(true, Ordering::Relaxed);
                    info!(run = run.id, plate = %run.plate, %protocol, "PCR run started on the cycler.");
                    self.update(|r| {
                        if r.state == RunState::Starting {
                            r.state = RunState::Running;
                        }
                        r.started_at.get_or_insert(now_ms());
                    })
                    .await?;
                } else {
                    warn!(%protocol, "A run started on the cycler that pcrd did not start; its data is not stored.");
                }
            }
            EventKind::Refetched { range } if self.active.get().is_some() => {
                info!(
                    first = range.first,
                    last = range.last,
                    "Missing cycles fetched again."
                );
                self.update(|r| {
                    if r.refetched.len() == 64 {
                        r.refetched.remove(0);
                    }
                    r.refetched.push((range.first, range.last));
                })
                .await?;
            }
            EventKind::RunFinished { outcome, cycles } => {
                let Some(run) = self.active.get() else {
                    return Ok(());
                };
                match outcome {
                    Outcome::Completed if run.cycles_stored == *cycles => {
                        info!(run = run.id, plate = %run.plate, cycles, "PCR run finished; every cycle stored.");
                        self.end(RunState::Finished, None).await?;
                        // The end of a PCR run: analysis, judgement, hand-off (crate::runs).
                        if let Some(done) = self.runs.get(run.id)? {
                            tokio::spawn(crate::runs::finish(
                                Arc::clone(&self.lab),
                                Arc::clone(&self.runs),
                                done,
                            ));
                        }
                    }
                    Outcome::Completed => {
                        error!(run = run.id, plate = %run.plate, cycles, stored = run.cycles_stored, "The cycler finished but the store does not hold every cycle.");
                        self.end(
                            RunState::Failed,
                            Some(format!(
                                "the cycler reports {cycles} cycles but {} are stored",
                                run.cycles_stored
                            )),
                        )
                        .await?;
                    }
                    _ => {
                        warn!(run = run.id, plate = %run.plate, cycles, "PCR run aborted on the cycler.");
                        let why = lock(&self.abort_reason).clone().unwrap_or_else(|| {
                            format!("aborted on the cycler after cycle {cycles}")
                        });
                        self.end(RunState::Aborted, Some(why)).await?;
                    }
                }
            }
            EventKind::Fault { kind, detail } => {
                let what = format!("{kind:?}: {detail}");
                lock(&self.state).last_fault = Some(what.clone());
                if let Some(run) = self.active.get() {
                    error!(run = run.id, plate = %run.plate, fault = %what, "Cycler fault during a run; the run failed. An operator must check the plate.");
                    self.end(
                        RunState::Failed,
                        Some(format!(
                            "instrument fault {what}; cycles 1..={} are kept",
                            run.cycles_stored
                        )),
                    )
                    .await?;
                } else {
                    warn!(fault = %what, "Cycler fault.");
                }
            }
            EventKind::Rejected { line, reason } => {
                self.runs
                    .metrics
                    .lines_rejected
                    .fetch_add(1, Ordering::Relaxed);
                {
                    let mut s = lock(&self.state);
                    s.lines_rejected += 1;
                    if s.rejected.len() == RECENT_REJECTED {
                        s.rejected.pop_front();
                    }
                    s.rejected.push_back((line.clone(), reason.clone()));
                }
                let mut guard = lock(&self.active.run);
                if let Some(run) = guard.as_mut() {
                    let entry = RejectedLine {
                        at: now_ms(),
                        line: line.clone(),
                        reason: reason.clone(),
                        after_cycle: run.cycles_stored,
                    };
                    let mut next = run.clone();
                    next.lines_rejected += 1;
                    next.updated_at = entry.at;
                    self.runs.write_rejected(&next, &entry)?;
                    *run = next;
                }
            }
            EventKind::SinkFailed { cycle, reason } => {
                warn!(cycle, %reason, "A cycle was not stored; the driver fetches it again.");
            }
            _ => {}
        }
        Ok(())
    }
}

async fn supervise(cycler: Arc<Cycler>, mut events: broadcast::Receiver<CyclerEvent>) {
    loop {
        match events.recv().await {
            Ok(event) => {
                if let Err(e) = cycler.on_event(&event.kind).await {
                    error!(error = %e, "The cycler's run state could not be stored.");
                    if e.is_damage() || matches!(e, StoreError::Barrier(_)) {
                        cycler.runs.store.fail(e.to_string());
                    }
                }
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                warn!(
                    missed,
                    "Cycler events were missed; the run state follows the next ones (cycles are stored by the driver, not through events)."
                );
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn protocol(channels: &str, cycles: u32) -> ThermalProtocol {
        let reference = Dialect::reference();
        let line = format!("PROT:LOAD T {channels} 1x95@120 {cycles}x95@3/60@30R");
        match Command::parse(&line, &reference).unwrap() {
            Command::LoadProtocol(p) => p,
            other => panic!("{other:?}"),
        }
    }

    fn open(dir: &std::path::Path) -> Arc<RunStore> {
        let store = Store::open(&crate::store::StoreOptions {
            path: dir.join("store"),
            cache_bytes: 1024 * 1024,
        })
        .unwrap();
        Arc::new(RunStore::open(store).unwrap())
    }

    fn data(cycle: u32, channel: &str, wells: usize) -> CycleData {
        CycleData {
            cycle,
            channel: Channel::new(channel).unwrap(),
            values: (0..wells)
                .map(|w| f64::from(cycle) * 1000.0 + w as f64)
                .collect(),
        }
    }

    #[tokio::test]
    async fn cycles_are_stored_in_order_and_anything_else_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let runs = open(dir.path());
        let p = protocol("FAM,HEX", 40);
        let run = runs
            .create("PCR-1", "q1", &p, "T", PlateFormat::Wells96, "tina")
            .await
            .unwrap();
        let active = Arc::new(ActiveRun::default());
        active.set(Some(run.clone()));
        let sink = StoreSink::new(Arc::clone(&runs), Arc::clone(&active), "q1");
        let good = |c| vec![data(c, "HEX", 96), data(c, "FAM", 96)];

        // A gap: cycle 2 before cycle 1.
        let e = sink.store_cycle(2, &good(2)).await.unwrap_err();
        assert!(e.0.contains("cycle 1 is the next"), "{e}");
        sink.store_cycle(1, &good(1)).await.unwrap();
        // Fetched again after a reconnect: already stored, accepted, not counted twice.
        sink.store_cycle(1, &good(1)).await.unwrap();
        assert_eq!(active.get().unwrap().cycles_stored, 1);
        // Wrong well count, a missing channel, a channel twice.
        let e = sink
            .store_cycle(2, &[data(2, "FAM", 95), data(2, "HEX", 96)])
            .await
            .unwrap_err();
        assert!(e.0.contains("95 readings for 96 wells"), "{e}");
        let e = sink
            .store_cycle(2, &[data(2, "FAM", 96)])
            .await
            .unwrap_err();
        assert!(e.0.contains("channel HEX missing"), "{e}");
        let e = sink
            .store_cycle(2, &[data(2, "FAM", 96), data(2, "FAM", 96)])
            .await
            .unwrap_err();
        assert!(e.0.contains("twice"), "{e}");
        sink.store_cycle(2, &good(2)).await.unwrap();

        // The record in the store says what is stored, and the curves have it
        // in the protocol's channel order whatever the arrival order.
        let stored = runs.get(run.id).unwrap().unwrap();
        assert_eq!(stored.cycles_stored, 2);
        assert_eq!(stored.state, RunState::Running);
        let curves = runs.curves(&stored).unwrap();
        assert_eq!(curves.len(), 2);
        assert_eq!(curves[0][5], vec![1005.0, 2005.0]);
        assert_eq!(runs.metrics.cycles_stored.load(Ordering::Relaxed), 2);
        assert_eq!(runs.metrics.recent_latencies().len(), 2);

        // Run ids go on after a reopen.
        let next = runs
            .create("PCR-2", "q1", &p, "T", PlateFormat::Wells96, "tina")
            .await
            .unwrap();
        assert_eq!(next.id, run.id + 1);
        runs.store().close().unwrap();
        drop(sink);
        drop(runs);
        let runs = open(dir.path());
        let third = runs
            .create("PCR-3", "q1", &p, "T", PlateFormat::Wells96, "tina")
            .await
            .unwrap();
        assert_eq!(third.id, run.id + 2);
    }

    #[tokio::test]
    async fn rejected_lines_are_kept_under_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let runs = open(dir.path());
        let p = protocol("FAM", 40);
        let mut run = runs
            .create("PCR-1", "q1", &p, "T", PlateFormat::Wells96, "tina")
            .await
            .unwrap();
        for (i, line) in ["!PAUSED", "!CYCLE 2 FAM 3 1,x,2"].iter().enumerate() {
            run.lines_rejected += 1;
            let entry = RejectedLine {
                at: 0,
                line: (*line).to_owned(),
                reason: format!("reason {i}"),
                after_cycle: 0,
            };
            runs.write_rejected(&run, &entry).unwrap();
        }
        let kept = runs.rejected(run.id).unwrap();
        let lines: Vec<&str> = kept.iter().map(|r| r.line.as_str()).collect();
        assert_eq!(lines, ["!PAUSED", "!CYCLE 2 FAM 3 1,x,2"]);
        assert_eq!(runs.get(run.id).unwrap().unwrap().lines_rejected, 2);
    }

    #[test]
    fn the_largest_cycle_value_is_far_below_64_kib() {
        // 1,536 wells in one channel: the largest value written per key.
        let value = encode(&ChannelReadings {
            channel: "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345".into(),
            values: vec![f64::MAX; 1536],
        });
        assert!(value.len() < 16 * 1024, "{}", value.len());
        assert!(sized("cycles", b"k", vec![0; MAX_VALUE_BYTES]).is_err());
        assert!(sized("cycles", b"k", vec![0; MAX_VALUE_BYTES - 1]).is_ok());
    }
}
