//! The daemon's instruments: one supervisor per configured extractor (and,
//! through [`crate::cyclers`], per cycler).
//!
//! `pcrd serve` starts the driver's bus tasks (one per TCP address or serial
//! port, shared by every unit id on it), one [`Monitor`] per extractor that
//! polls at the profile's interval, and one supervisor task per extractor
//! that turns the monitor's events into what the API and /metrics show:
//! online or offline (and why), the last status read, the run in progress
//! (protocol, plate barcode, step, progress, remaining time) and the last run
//! that ended, with how it ended. Everything here is in memory: a restart
//! learns the state again from the devices (a run in progress is picked up
//! where the device got to).
//!
//! Extraction runs started from the API (`POST /api/v1/runs` naming an
//! extractor) are stored as run records and followed from the supervisor's
//! state: see [`Instruments::start_extraction`] and docs/runs.md. Runs started
//! on the instrument's own panel are followed and shown, not stored.
//!
//! Logging (style.md §13): the driver logs the link (offline, online); the
//! supervisor logs what the lab must know, in a span carrying the
//! instrument's name: a run seen starting and completing (INFO), a stalled
//! run or an aborted one (WARN), a device error or a run that ended with
//! values that cannot be right (ERROR: an operator must act, the plate's
//! extraction is in doubt).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use pcrd_drivers::modbus::{
    BusHandle, EventKind, ExtractorEvent, ExtractorHandle, LinkConfig, Monitor, spawn_bus,
};
use pcrd_protocol::extractor::{Anomaly, DeviceError, ExtractorState, ExtractorStatus};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tracing::{Instrument as _, error, info, warn};

use crate::config::ExtractorConfig;
use crate::cyclers::{RunError, RunRecord, RunState, RunStore};
use crate::model::{PlateKind, PlateState};
use crate::store::StoreError;

/// Every configured instrument and the tasks that follow them. Dropping it
/// stops the polling.
#[derive(Debug, Default)]
pub struct Instruments {
    by_name: BTreeMap<String, Arc<Instrument>>,
    monitors: Vec<Monitor>,
    supervisors: Vec<JoinHandle<()>>,
    /// The real-time PCR cyclers (`[[cyclers]]`), with their runs.
    cyclers: Option<Arc<crate::cyclers::Cyclers>>,
    /// The run store and the lab, for extraction runs (set with the cyclers,
    /// which own the one run-id sequence).
    extraction: Option<(Arc<RunStore>, Arc<crate::lab::Lab>)>,
}

impl Drop for Instruments {
    fn drop(&mut self) {
        for task in &self.supervisors {
            task.abort();
        }
        self.monitors.clear();
    }
}

/// Whether polls get answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Connection {
    /// No poll has finished yet.
    Connecting,
    Online,
    Offline,
}

impl Connection {
    pub fn as_str(self) -> &'static str {
        match self {
            Connection::Connecting => "connecting",
            Connection::Online => "online",
            Connection::Offline => "offline",
        }
    }
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The device reported completion with nothing implausible.
    Completed,
    /// The device stopped on an error code.
    DeviceError,
    Aborted,
    /// The device said "completed", but the status held values that cannot be
    /// right: not taken as a completion.
    Unconfirmed,
    /// The device went back to idle or loaded without completing.
    Ended,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::DeviceError => "device_error",
            Outcome::Aborted => "aborted",
            Outcome::Unconfirmed => "unconfirmed",
            Outcome::Ended => "ended",
        }
    }
}

/// A run as the daemon followed it.
#[derive(Clone, Debug, PartialEq)]
pub struct Run {
    pub protocol: u32,
    pub plate_barcode: String,
    pub state: ExtractorState,
    pub step: u32,
    pub progress: f64,
    pub remaining_s: f64,
    /// When the daemon first saw it running (not the device's start time).
    pub seen_at: SystemTime,
    pub ended_at: Option<SystemTime>,
    pub outcome: Option<Outcome>,
    pub error: Option<DeviceError>,
    /// Progress stood still for longer than the stall limit.
    pub stalled: bool,
    pub anomalies: Vec<String>,
}

impl Run {
    fn from_status(status: &ExtractorStatus, now: SystemTime) -> Run {
        Run {
            protocol: status.protocol,
            plate_barcode: status.barcode.clone(),
            state: status.state,
            step: status.step,
            progress: status.progress,
            remaining_s: status.remaining_s,
            seen_at: now,
            ended_at: None,
            outcome: None,
            error: status.error.clone(),
            stalled: false,
            anomalies: status.anomalies.iter().map(describe).collect(),
        }
    }
}

/// What the supervisor knows about one instrument. Pure: events and times
/// in, no I/O, so it is tested without a device.
#[derive(Clone, Debug)]
pub struct Tracked {
    pub connection: Connection,
    /// Why it is offline.
    pub reason: Option<String>,
    /// When `connection` last changed.
    pub since: SystemTime,
    /// The run in progress.
    pub run: Option<Run>,
    /// The last run that ended.
    pub last_run: Option<Run>,
    pub runs_completed: u64,
}

impl Tracked {
    pub fn new(now: SystemTime) -> Tracked {
        Tracked {
            connection: Connection::Connecting,
            reason: None,
            since: now,
            run: None,
            last_run: None,
            runs_completed: 0,
        }
    }

    /// Applies one event from the monitor; `latest` is the last status the
    /// monitor read (for the fields an event does not carry).
    pub fn apply(&mut self, kind: &EventKind, latest: Option<&ExtractorStatus>, now: SystemTime) {
        match kind {
            EventKind::Offline { reason } => {
                self.connection = Connection::Offline;
                self.reason = Some(reason.clone());
                self.since = now;
                if self.run.is_some() {
                    warn!(%reason, "The instrument went offline during a run; it will be re-synchronised when it answers again.");
                }
            }
            EventKind::Online {
                status,
                resynchronised,
            } => {
                self.connection = Connection::Online;
                self.reason = None;
                self.since = now;
                if *resynchronised {
                    info!(
                        state = state_name(status.state),
                        progress = status.progress,
                        "Run re-synchronised from the device's state."
                    );
                }
                if status.state.in_run() {
                    self.follow(status, now);
                }
            }
            EventKind::StatusChanged { to, .. } => {
                if to.in_run() {
                    if let Some(status) = latest {
                        self.follow(status, now);
                    }
                    if let Some(run) = &mut self.run {
                        run.state = *to;
                    }
                } else if let Some(mut run) = self.run.take() {
                    run.state = *to;
                    run.ended_at = Some(now);
                    if let Some(status) = latest {
                        run.step = status.step;
                        run.progress = status.progress;
                        run.remaining_s = status.remaining_s;
                        run.error = status.error.clone().or(run.error);
                        run.anomalies = status.anomalies.iter().map(describe).collect();
                    }
                    run.outcome = Some(match to {
                        // Turned into `Completed` by the Completed event that
                        // follows when the snapshot was clean.
                        ExtractorState::Completed => Outcome::Unconfirmed,
                        ExtractorState::Error => Outcome::DeviceError,
                        ExtractorState::Aborted => Outcome::Aborted,
                        _ => Outcome::Ended,
                    });
                    self.report_end(&run);
                    self.last_run = Some(run);
                }
            }
            EventKind::Progress {
                step,
                progress,
                remaining_s,
            } => {
                if self.run.is_none()
                    && let Some(status) = latest
                {
                    self.follow(status, now);
                }
                if let Some(run) = &mut self.run {
                    run.step = *step;
                    run.progress = *progress;
                    run.remaining_s = *remaining_s;
                }
            }
            EventKind::Completed { barcode, protocol } => {
                if let Some(run) = &mut self.last_run
                    && run.outcome == Some(Outcome::Unconfirmed)
                {
                    run.outcome = Some(Outcome::Completed);
                    run.progress = 100.0;
                    run.remaining_s = 0.0;
                }
                self.runs_completed += 1;
                info!(plate = %barcode, protocol, "Extraction run completed.");
            }
            EventKind::DeviceError(e) => {
                let reason = e
                    .reason
                    .as_deref()
                    .unwrap_or("not in the profile's error table");
                if let Some(run) = &mut self.run {
                    run.error = Some(e.clone());
                    error!(code = e.code, %reason, plate = %run.plate_barcode, "The extractor reports an error during a run; an operator must check the plate.");
                } else if let Some(run) = self
                    .last_run
                    .as_mut()
                    .filter(|r| r.outcome == Some(Outcome::DeviceError))
                {
                    run.error = Some(e.clone());
                    error!(code = e.code, %reason, plate = %run.plate_barcode, "The extractor stopped a run on an error; an operator must check the plate.");
                } else {
                    warn!(code = e.code, %reason, "The extractor reports an error.");
                }
            }
            EventKind::Stalled { progress, for_s } => {
                if let Some(run) = &mut self.run {
                    run.stalled = true;
                }
                warn!(
                    progress,
                    stalled_s = *for_s as u64,
                    "Run progress has not moved; check the instrument."
                );
            }
            EventKind::Anomalies(anomalies) => {
                let described: Vec<String> = anomalies.iter().map(describe).collect();
                warn!(anomalies = ?described, "The instrument reports values that cannot be right.");
                if let Some(run) = &mut self.run {
                    run.anomalies = described;
                }
            }
            _ => {}
        }
    }

    /// Starts following the run `status` shows, unless it is the one already
    /// followed.
    fn follow(&mut self, status: &ExtractorStatus, now: SystemTime) {
        let same = self
            .run
            .as_ref()
            .is_some_and(|r| r.plate_barcode == status.barcode && r.protocol == status.protocol);
        if !same {
            info!(
                plate = %status.barcode,
                protocol = status.protocol,
                progress = status.progress,
                "Following an extraction run."
            );
            self.run = Some(Run::from_status(status, now));
        }
    }

    fn report_end(&self, run: &Run) {
        match run.outcome {
            Some(Outcome::Unconfirmed) if !run.anomalies.is_empty() => {
                error!(plate = %run.plate_barcode, anomalies = ?run.anomalies, "The extractor says the run completed, but its values cannot be right; not taken as complete. An operator must check the plate.");
            }
            Some(Outcome::Aborted) => {
                warn!(plate = %run.plate_barcode, progress = run.progress, "Extraction run aborted.");
            }
            Some(Outcome::Ended) => {
                warn!(plate = %run.plate_barcode, state = state_name(run.state), "Extraction run ended without completing.");
            }
            // Completed: logged on the Completed event; device errors: on the
            // DeviceError event.
            _ => {}
        }
    }
}

/// One configured instrument, its driver handle and what its supervisor
/// tracked.
#[derive(Debug)]
pub struct Instrument {
    pub name: String,
    pub unit: u8,
    pub profile: String,
    pub profile_version: String,
    /// `tcp 192.168.1.50:502` or `serial /dev/ttyUSB0`.
    pub link: String,
    handle: ExtractorHandle,
    tracked: Mutex<Tracked>,
    /// Held while an extraction run is started or aborted: never two at once.
    command: tokio::sync::Mutex<()>,
    /// Who aborted the run from the API, and why (for the run's reason).
    abort_reason: Mutex<Option<String>>,
    /// The id of the extraction run pcrd started on it and that has not
    /// ended, so following it reads one record, not the whole `runs` tree.
    active_run: Mutex<Option<u64>>,
    /// Told by the supervisor whenever an event changed what it tracks, so the
    /// run's record follows the device within a poll, not a follow period.
    changed: tokio::sync::Notify,
    /// When this daemon began supervising it: a run created before was adopted
    /// from the store at start-up and may have ended while no daemon watched.
    supervised_since_ms: i64,
}

/// A copy of an instrument's state for the API.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub name: String,
    pub unit: u8,
    pub profile: String,
    pub profile_version: String,
    pub link: String,
    pub tracked: Tracked,
    pub status: Option<ExtractorStatus>,
    pub polls: u64,
    pub poll_errors: u64,
    pub reconnects: u64,
}

impl Instrument {
    /// The lock held while a run is started or aborted on this instrument.
    /// Waits for it: the run follower holds it for a moment on every check,
    /// and another start or abort holds it for its device commands. Only a
    /// wait past [`COMMAND_WAIT`] (an instrument command stuck far longer
    /// than its own timeouts) is answered as a conflict; a caller that got
    /// the lock re-checks the run and device state, so it gets the answer
    /// that says what is actually in the way.
    async fn command_lock(&self) -> Result<tokio::sync::MutexGuard<'_, ()>, RunError> {
        tokio::time::timeout(COMMAND_WAIT, self.command.lock())
            .await
            .map_err(|_| {
                RunError::Conflict(format!(
                    "a run is being started or aborted on {} (still under way after {} s)",
                    self.name,
                    COMMAND_WAIT.as_secs()
                ))
            })
    }

    fn tracked(&self) -> MutexGuard<'_, Tracked> {
        // Only this module writes it, without panicking paths inside the lock;
        // a poisoned lock still holds a usable state.
        self.tracked.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn snapshot(&self) -> Snapshot {
        let stats = self.handle.poll_stats();
        Snapshot {
            name: self.name.clone(),
            unit: self.unit,
            profile: self.profile.clone(),
            profile_version: self.profile_version.clone(),
            link: self.link.clone(),
            tracked: self.tracked().clone(),
            status: self.handle.watch_status().borrow().clone(),
            polls: stats.polls.load(Ordering::Relaxed),
            poll_errors: stats.errors.load(Ordering::Relaxed),
            reconnects: self.handle.bus().stats().reconnects.load(Ordering::Relaxed),
        }
    }
}

impl Instruments {
    /// Starts a bus task per link, a monitor and a supervisor per extractor.
    /// Must run inside the tokio runtime. With no extractors configured it
    /// starts nothing.
    pub fn start(configs: &[ExtractorConfig]) -> Instruments {
        let mut buses: BTreeMap<String, BusHandle> = BTreeMap::new();
        let mut out = Instruments::default();
        for config in configs {
            let key = link_name(&config.bus.link);
            let bus = buses
                .entry(key.clone())
                .or_insert_with(|| {
                    // Every unit on a serial line (or behind one gateway
                    // address) shares the task that owns the port; the first
                    // extractor's timing is the line's.
                    let mut bus = config.bus.clone();
                    bus.name = key.clone();
                    spawn_bus(bus)
                })
                .clone();
            let handle = ExtractorHandle::new(
                config.name.clone(),
                config.unit,
                Arc::clone(&config.profile),
                bus,
            );
            let instrument = Arc::new(Instrument {
                name: config.name.clone(),
                unit: config.unit,
                profile: config.profile.name.clone(),
                profile_version: config.profile.version.clone(),
                link: key,
                handle: handle.clone(),
                tracked: Mutex::new(Tracked::new(SystemTime::now())),
                command: tokio::sync::Mutex::new(()),
                abort_reason: Mutex::new(None),
                active_run: Mutex::new(None),
                changed: tokio::sync::Notify::new(),
                supervised_since_ms: now_ms(),
            });
            // Subscribe before the monitor starts so no event is missed.
            let events = handle.subscribe();
            let span = tracing::info_span!("instrument", instrument = %config.name);
            out.supervisors.push(tokio::spawn(
                supervise(Arc::clone(&instrument), events).instrument(span),
            ));
            out.monitors.push(handle.monitor());
            info!(
                instrument = %config.name,
                unit = config.unit,
                link = %instrument.link,
                profile = %instrument.profile,
                "Following the extractor."
            );
            out.by_name.insert(config.name.clone(), instrument);
        }
        out
    }

    /// Adds the cyclers (started by `Cyclers::start`, which needs the store).
    pub fn with_cyclers(mut self, cyclers: crate::cyclers::Cyclers) -> Instruments {
        let runs = cyclers.run_store();
        self.extraction = Some((Arc::clone(&runs), cyclers.lab()));
        for instrument in self.by_name.values() {
            // The run left unfinished when the daemon stopped is followed on.
            match Self::active_extraction(&runs, &instrument.name) {
                Ok(active) => set_active(instrument, active.map(|r| r.id)),
                Err(e) => {
                    error!(instrument = %instrument.name, error = %e, "Unfinished extraction runs cannot be read.")
                }
            }
            let span = tracing::info_span!("extraction", instrument = %instrument.name);
            self.supervisors.push(tokio::spawn(
                follow_extraction_runs(Arc::clone(instrument), Arc::clone(&runs)).instrument(span),
            ));
        }
        self.cyclers = Some(Arc::new(cyclers));
        self
    }

    /// The cyclers, if any are configured.
    pub fn cyclers(&self) -> Option<&crate::cyclers::Cyclers> {
        self.cyclers.as_deref()
    }

    /// Every instrument, by name.
    pub fn all(&self) -> impl Iterator<Item = &Instrument> {
        self.by_name.values().map(AsRef::as_ref)
    }

    pub fn get(&self, name: &str) -> Option<&Instrument> {
        self.by_name.get(name).map(AsRef::as_ref)
    }

    /// Appends the instrument metrics in the Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        if let Some(cyclers) = &self.cyclers {
            cyclers.render_metrics(out);
        }
        let snapshots: Vec<Snapshot> = self.all().map(Instrument::snapshot).collect();
        let mut family = |name: &str, kind: &str, help: &str, value: &dyn Fn(&Snapshot) -> u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for s in &snapshots {
                let _ = writeln!(
                    out,
                    "{name}{{instrument=\"{}\"}} {}",
                    label(&s.name),
                    value(s)
                );
            }
        };
        family(
            "pcrd_instrument_online",
            "gauge",
            "1 while the instrument answers its status polls, else 0.",
            &|s| u64::from(s.tracked.connection == Connection::Online),
        );
        family(
            "pcrd_instrument_running",
            "gauge",
            "1 while a run is in progress on the instrument, else 0.",
            &|s| u64::from(s.tracked.run.is_some()),
        );
        family(
            "pcrd_instrument_polls_total",
            "counter",
            "Status polls sent to the instrument.",
            &|s| s.polls,
        );
        family(
            "pcrd_instrument_poll_errors_total",
            "counter",
            "Status polls that failed (timeout, link down, exception, bad reply).",
            &|s| s.poll_errors,
        );
        family(
            "pcrd_instrument_reconnects_total",
            "counter",
            "Times the link the instrument is on was opened again after being lost or dropped.",
            &|s| s.reconnects,
        );
        family(
            "pcrd_instrument_runs_completed_total",
            "counter",
            "Runs seen completing cleanly on the instrument.",
            &|s| s.tracked.runs_completed,
        );
    }
}

async fn supervise(instrument: Arc<Instrument>, mut events: broadcast::Receiver<ExtractorEvent>) {
    loop {
        match events.recv().await {
            Ok(event) => {
                let latest = instrument.handle.watch_status().borrow().clone();
                instrument
                    .tracked()
                    .apply(&event.kind, latest.as_ref(), SystemTime::now());
                // Progress is carried over at the follow period; anything else (a
                // run starting or ending, an error, the link) at once.
                if !matches!(event.kind, EventKind::Progress { .. }) {
                    instrument.changed.notify_one();
                }
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                warn!(
                    missed,
                    "Instrument events were missed; the state shown catches up with the next ones."
                );
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// The link as the operator knows it, which is also the key buses are
/// shared by.
fn link_name(link: &LinkConfig) -> String {
    match link {
        LinkConfig::Tcp { addr } => format!("tcp {addr}"),
        LinkConfig::Rtu(serial) => format!("serial {}", serial.path),
    }
}

/// A state as the API spells it.
pub fn state_name(state: ExtractorState) -> String {
    match state {
        ExtractorState::Idle => "idle".into(),
        ExtractorState::Loaded => "loaded".into(),
        ExtractorState::Running => "running".into(),
        ExtractorState::Paused => "paused".into(),
        ExtractorState::Completed => "completed".into(),
        ExtractorState::Error => "error".into(),
        ExtractorState::Aborted => "aborted".into(),
        ExtractorState::Unknown(code) => format!("unknown({code})"),
    }
}

/// An anomaly in words.
pub fn describe(anomaly: &Anomaly) -> String {
    match anomaly {
        Anomaly::UnknownState { code } => format!("state code {code} is not in the profile"),
        Anomaly::OutOfRange {
            field,
            value,
            min,
            max,
        } => format!(
            "{field} {value} is outside {}..{}",
            min.map(|m| m.to_string()).unwrap_or_default(),
            max.map(|m| m.to_string()).unwrap_or_default()
        ),
        Anomaly::BadInteger { field, raw } => format!("{field} holds {raw}, not a count"),
        Anomaly::BadText { field } => format!("{field} is not printable ASCII"),
        other => format!("{other:?}"),
    }
}

/// Escapes a Prometheus label value (exposition format: backslash, quote,
/// newline).
pub fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

// ----- extraction runs (issue 7; docs/runs.md) -----

/// Pace of the comparison between a stored extraction run and what the
/// supervisor follows (the monitor polls at the profile's interval; this only
/// carries its view into the store).
const FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_millis(200);
/// How long a start or an abort waits for another one on the same instrument
/// (or for the follower's check) before answering 409: longer than the
/// driver's load + start + read-back with their timeouts.
const COMMAND_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// A start that never showed on the instrument within this is taken as not
/// having taken effect.
const START_GRACE_MS: i64 = 15_000;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn ms(t: SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Instruments {
    fn extraction(&self) -> Result<&(Arc<RunStore>, Arc<crate::lab::Lab>), RunError> {
        self.extraction.as_ref().ok_or_else(|| {
            RunError::Conflict("extraction runs need the run store, which is not open".into())
        })
    }

    /// The unfinished extraction run of `instrument`, if any (the newest).
    fn active_extraction(runs: &RunStore, instrument: &str) -> Result<Option<RunRecord>, RunError> {
        Ok(runs
            .on_instrument(instrument)?
            .into_iter()
            .filter(|r| r.is_extraction() && !r.state.is_terminal())
            .max_by_key(|r| r.id))
    }

    /// Starts an extraction run of a sealed extraction plate on an idle
    /// extractor. The record is durable (state `starting`) before anything is
    /// written to the device; the start command is never resent (the driver
    /// reads the state back when its reply is lost). The run then follows the
    /// supervisor's polls: running with progress, then finished (the plate
    /// is extracted), failed with the device's reason, or aborted.
    pub async fn start_extraction(
        &self,
        plate_id: &str,
        instrument_name: &str,
        protocol: Option<&str>,
        user: &str,
    ) -> Result<RunRecord, RunError> {
        let (runs, lab) = self.extraction()?;
        let instrument = self.by_name.get(instrument_name).ok_or_else(|| {
            RunError::NotFound(format!("no instrument {instrument_name:?} in the config"))
        })?;
        let protocol: u16 = match protocol {
            None => 1,
            Some(text) => text.trim().parse().map_err(|_| {
                RunError::Invalid(format!(
                    "protocol {text:?}: an extractor's protocol is its number (1..=65535)"
                ))
            })?,
        };
        if protocol == 0 {
            return Err(RunError::Invalid(
                "protocol 0: extractor protocols count from 1".into(),
            ));
        }
        let plate = lab.plate(plate_id).map_err(|e| match e {
            crate::lab::LabError::NotFound { message } => RunError::NotFound(message),
            crate::lab::LabError::Store(e) => RunError::Store(e),
            other => RunError::Invalid(other.to_string()),
        })?;
        if plate.kind != PlateKind::Extraction {
            return Err(RunError::Conflict(format!(
                "plate {plate_id} is a PCR plate: it goes on a cycler, not an extractor"
            )));
        }
        if plate.state != PlateState::Sealed {
            return Err(RunError::Conflict(format!(
                "plate {plate_id} is not sealed: seal it before it goes on an extractor"
            )));
        }
        let _guard = instrument.command_lock().await?;
        // A plate is extracted once; a failed or aborted extraction may be repeated.
        if let Some(run) = runs.of_plate(plate_id)?.into_iter().find(|r| {
            r.is_extraction() && (r.state == RunState::Finished || !r.state.is_terminal())
        }) {
            return Err(RunError::Conflict(format!(
                "plate {plate_id} already has extraction run {} ({})",
                run.id,
                run.state.as_str()
            )));
        }
        let active = *instrument
            .active_run
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(run) = active
            .map(|id| runs.get(id))
            .transpose()?
            .flatten()
            .filter(|r| !r.state.is_terminal())
        {
            return Err(RunError::Conflict(format!(
                "{instrument_name} is busy with run {} of plate {} ({})",
                run.id,
                run.plate,
                run.state.as_str()
            )));
        }
        let status =
            instrument.handle.status().await.map_err(|e| {
                RunError::Conflict(format!("{instrument_name} cannot be started: {e}"))
            })?;
        match status.state {
            ExtractorState::Idle
            | ExtractorState::Loaded
            | ExtractorState::Completed
            | ExtractorState::Aborted => {}
            ExtractorState::Error => {
                return Err(RunError::Conflict(format!(
                    "{instrument_name} is in its error state ({}): clear the error on the instrument, then start again",
                    status
                        .error
                        .as_ref()
                        .map(|e| format!(
                            "code {}: {}",
                            e.code,
                            e.reason.as_deref().unwrap_or("no reason given")
                        ))
                        .unwrap_or_else(|| "no code".into())
                )));
            }
            other => {
                return Err(RunError::Conflict(format!(
                    "{instrument_name} is not idle: its state is {}",
                    state_name(other)
                )));
            }
        }
        let run = runs
            .create_extraction(plate_id, instrument_name, protocol, plate.format, user)
            .await?;
        set_active(instrument, Some(run.id));
        let span = tracing::info_span!("run", run = run.id, plate = %plate_id, instrument = %instrument_name);
        async {
            info!(protocol, "Starting an extraction run.");
            if let Err(e) = instrument.handle.load_protocol(protocol).await {
                return Err(end_run(runs, run.id, RunState::Failed, Some(format!("loading protocol {protocol} failed: {e}"))).await);
            }
            match instrument.handle.start(plate_id).await {
                Ok(_) => {
                    let mut started = run.clone();
                    started.state = RunState::Running;
                    started.started_at = Some(now_ms());
                    started.updated_at = now_ms();
                    runs.put(&started).await?;
                    Ok(started)
                }
                Err(pcrd_drivers::modbus::ModbusError::OutcomeUnknown { cause, .. }) => {
                    // Whether it started is unknown: the follower decides from
                    // the next status it reads; never resent.
                    warn!(%cause, "Start sent, outcome unknown; the next status read decides.");
                    let mut unknown = run.clone();
                    unknown.reason = Some(format!("start sent, outcome unknown until the extractor answers: {cause}"));
                    unknown.updated_at = now_ms();
                    runs.put(&unknown).await?;
                    Err(RunError::Instrument(format!(
                        "run {} start sent but not confirmed ({cause}); it shows what the extractor reports once it answers",
                        run.id
                    )))
                }
                Err(e) => Err(end_run(runs, run.id, RunState::Failed, Some(format!("the extractor did not start: {e}"))).await),
            }
        }
        .instrument(span)
        .await
    }

    /// Whether `id` is an extraction run (for the API to route an abort).
    pub fn is_extraction_run(&self, id: u64) -> bool {
        self.extraction
            .as_ref()
            .and_then(|(runs, _)| runs.get(id).ok().flatten())
            .is_some_and(|r| r.is_extraction())
    }

    /// Aborts an extraction run: the abort is written once (a lost reply is
    /// settled by reading the state back); the run ends as aborted when the
    /// instrument shows it.
    pub async fn abort_extraction(
        &self,
        id: u64,
        user: &str,
        reason: Option<&str>,
    ) -> Result<RunRecord, RunError> {
        let (runs, _) = self.extraction()?;
        let run = runs
            .get(id)?
            .ok_or_else(|| RunError::NotFound(format!("no run {id}")))?;
        if run.state.is_terminal() {
            return Err(RunError::Conflict(format!(
                "run {id} has already ended ({})",
                run.state.as_str()
            )));
        }
        let instrument = self.by_name.get(&run.instrument).ok_or_else(|| {
            RunError::Conflict(format!(
                "run {id} is on {}, which is no longer in the config",
                run.instrument
            ))
        })?;
        let _guard = instrument.command_lock().await?;
        // The run may have ended while this waited for the lock.
        if let Some(ended) = runs.get(id)?.filter(|r| r.state.is_terminal()) {
            return Err(RunError::Conflict(format!(
                "run {id} has already ended ({})",
                ended.state.as_str()
            )));
        }
        let why = match reason {
            Some(r) if !r.trim().is_empty() => format!("aborted by {user}: {r}"),
            _ => format!("aborted by {user}"),
        };
        *instrument
            .abort_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(why.clone());
        match instrument.handle.abort().await {
            Ok(_) => {
                warn!(run = id, plate = %run.plate, reason = %why, "Extraction run aborted.");
                end_run(runs, id, RunState::Aborted, Some(why)).await;
                Ok(runs.get(id)?.unwrap_or(run))
            }
            Err(e) => Err(RunError::Instrument(format!(
                "the extractor did not confirm the abort: {e}"
            ))),
        }
    }
}

/// Ends run `id` in `state` unless it has ended already; returns the error
/// the caller reports.
async fn end_run(runs: &RunStore, id: u64, state: RunState, reason: Option<String>) -> RunError {
    let message = reason.clone().unwrap_or_else(|| state.as_str().to_owned());
    match runs.get(id) {
        Ok(Some(mut run)) if !run.state.is_terminal() => {
            if state == RunState::Failed {
                error!(run = id, plate = %run.plate, reason = %message, "The extraction run failed; the plate can be run again.");
            }
            run.state = state;
            run.reason = reason;
            run.ended_at = Some(now_ms());
            run.updated_at = now_ms();
            if let Err(e) = runs.put(&run).await {
                return RunError::Store(e);
            }
        }
        Ok(_) => {}
        Err(e) => return RunError::Store(e),
    }
    RunError::Instrument(message)
}

fn set_active(instrument: &Instrument, id: Option<u64>) {
    *instrument
        .active_run
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = id;
}

/// Carries what the supervisor follows into the extractor's stored run.
async fn follow_extraction_runs(instrument: Arc<Instrument>, runs: Arc<RunStore>) {
    loop {
        // At the next event (a notification is kept if none is waiting), or after
        // FOLLOW_EVERY at the latest: start grace and offline checks need no event.
        let _ = tokio::time::timeout(FOLLOW_EVERY, instrument.changed.notified()).await;
        // Not while the API is starting or aborting: it writes the record then.
        let Ok(guard) = instrument.command.try_lock() else {
            continue;
        };
        let Some(id) = *instrument
            .active_run
            .lock()
            .unwrap_or_else(|p| p.into_inner())
        else {
            continue;
        };
        let active = match runs.get(id) {
            Ok(Some(run)) if !run.state.is_terminal() => run,
            Ok(_) => {
                set_active(&instrument, None);
                continue;
            }
            Err(e) => {
                error!(run = id, error = %e, "The extraction run cannot be read.");
                continue;
            }
        };
        // The change is committed under the lock (so it cannot interleave
        // with a start's or an abort's write) but made durable after it is
        // released: a start asked for right after a run failed must not be
        // refused as "being started or aborted" because this task was waiting
        // for the disk (the 409 it gets is the one that tells the operator what
        // to do, such as "clear the error on the instrument").
        let committed = follow_once(&instrument, &runs, active);
        drop(guard);
        match committed {
            Ok(true) => {
                if let Err(e) = runs.store().durable().await {
                    error!(error = %e, "The extraction run's state could not be made durable.");
                }
            }
            Ok(false) => {}
            Err(e) => error!(error = %e, "The extraction run's state could not be stored."),
        }
    }
}

/// Compares the stored run with what the supervisor follows and commits the
/// change, if any, without waiting for the durability barrier (the caller
/// does, after releasing the instrument's command lock). Returns whether it
/// wrote.
fn follow_once(
    instrument: &Instrument,
    runs: &RunStore,
    run: RunRecord,
) -> Result<bool, StoreError> {
    let snapshot = instrument.snapshot();
    let tracked = &snapshot.tracked;
    let mut next = run.clone();
    let mine = |r: &Run| r.plate_barcode == run.plate;
    if tracked.connection != Connection::Online {
        if matches!(run.state, RunState::Running | RunState::Starting)
            && tracked.connection == Connection::Offline
        {
            next.state = RunState::InstrumentOffline;
            next.reason = Some(format!(
                "link lost: {}",
                tracked.reason.as_deref().unwrap_or("no answer")
            ));
        }
    } else if let Some(r) = tracked.run.as_ref().filter(|r| mine(r)) {
        next.state = RunState::Running;
        next.reason = None;
        next.started_at.get_or_insert(ms(r.seen_at));
        next.cycles_stored = r.progress.clamp(0.0, 100.0).floor() as u32;
    } else if let Some(r) = tracked
        .last_run
        .as_ref()
        .filter(|r| mine(r) && r.ended_at.is_some_and(|t| ms(t) >= run.created_at))
    {
        let end = |next: &mut RunRecord, state: RunState, reason: Option<String>| {
            next.state = state;
            next.reason = reason;
            next.ended_at = Some(r.ended_at.map_or_else(now_ms, ms));
        };
        match r.outcome {
            Some(Outcome::Completed) => {
                next.cycles_stored = 100;
                end(&mut next, RunState::Finished, None);
                info!(run = run.id, plate = %run.plate, "Extraction run finished: the plate is extracted.");
            }
            Some(Outcome::Unconfirmed) if r.anomalies.is_empty() => {
                // The Completed event that confirms it follows.
            }
            Some(Outcome::Unconfirmed) => end(
                &mut next,
                RunState::Failed,
                Some(format!(
                    "the extractor says the run completed but its values cannot be right: {}",
                    r.anomalies.join("; ")
                )),
            ),
            Some(Outcome::DeviceError) => {
                let what = r.error.as_ref().map_or_else(
                    || "device error (no code read)".to_owned(),
                    |e| {
                        format!(
                            "device error {}: {}",
                            e.code,
                            e.reason
                                .as_deref()
                                .unwrap_or("not in the profile's error table")
                        )
                    },
                );
                end(
                    &mut next,
                    RunState::Failed,
                    Some(format!("{what} at {:.0} %, step {}", r.progress, r.step)),
                );
            }
            Some(Outcome::Aborted) => {
                let why = instrument
                    .abort_reason
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                    .unwrap_or_else(|| format!("aborted on the instrument at {:.0} %", r.progress));
                end(&mut next, RunState::Aborted, Some(why));
            }
            _ => end(
                &mut next,
                RunState::Failed,
                Some(format!(
                    "the run ended without completing (state {})",
                    state_name(r.state)
                )),
            ),
        }
    } else if let Some(status) = snapshot
        .status
        .as_ref()
        .filter(|_| run.created_at < instrument.supervised_since_ms)
        .filter(|s| s.barcode == run.plate && !s.state.in_run())
        .filter(|s| s.state == ExtractorState::Completed || run.started_at.is_some())
    {
        // A run adopted at start-up that ended while the daemon was down: the
        // supervisor never saw it end, but the device still shows how it ended,
        // for this plate (every status read here was polled after the start-up,
        // so after the run began). A completed state for the plate can only be
        // this run's (a plate that completed once is not run again); an error or
        // an abort only counts once this run was started, so that the state left
        // by an earlier failed run of the plate does not end a new one. Runs this
        // daemon started are ended by the events it sees.
        next.ended_at = Some(now_ms());
        match status.state {
            ExtractorState::Completed => {
                next.state = RunState::Finished;
                next.cycles_stored = 100;
                next.reason = None;
                info!(run = run.id, plate = %run.plate, "Extraction run finished while pcrd was not watching: the plate is extracted.");
            }
            ExtractorState::Aborted => {
                next.state = RunState::Aborted;
                next.reason = Some("aborted on the instrument while pcrd was not watching".into());
            }
            ExtractorState::Error => {
                next.state = RunState::Failed;
                next.reason = Some(match &status.error {
                    Some(e) => format!(
                        "device error {}: {} (while pcrd was not watching)",
                        e.code,
                        e.reason
                            .as_deref()
                            .unwrap_or("not in the profile's error table")
                    ),
                    None => "device error while pcrd was not watching (no code read)".into(),
                });
            }
            other => {
                next.state = RunState::Failed;
                next.reason = Some(format!(
                    "the extractor shows {} and no longer this run: it ended while pcrd was not watching",
                    state_name(other)
                ));
            }
        }
    } else if run.started_at.is_none()
        && now_ms() - run.created_at > START_GRACE_MS
        && snapshot.status.as_ref().is_some_and(|s| !s.state.in_run())
    {
        next.state = RunState::Failed;
        next.reason =
            Some("the start did not take effect: the extractor never showed the run".into());
        next.ended_at = Some(now_ms());
    }
    if next != run {
        if next.state == RunState::Failed {
            error!(run = run.id, plate = %run.plate, reason = ?next.reason, "The extraction run failed; an operator must check the plate, which can be run again.");
        }
        next.updated_at = now_ms();
        runs.commit(&next)?;
        return Ok(true);
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn status(state: ExtractorState, progress: f64) -> ExtractorStatus {
        ExtractorStatus {
            state,
            step: 2,
            progress,
            remaining_s: 100.0 - progress,
            temperature_c: 56.0,
            error: None,
            protocol: 3,
            barcode: "EXT-0001".into(),
            anomalies: vec![],
        }
    }

    #[test]
    fn a_run_is_followed_from_start_to_completion() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let mut t = Tracked::new(t0);
        let loaded = status(ExtractorState::Loaded, 0.0);
        t.apply(
            &EventKind::Online {
                status: Box::new(loaded.clone()),
                resynchronised: false,
            },
            Some(&loaded),
            t0,
        );
        assert_eq!(t.connection, Connection::Online);
        assert!(t.run.is_none());
        let running = status(ExtractorState::Running, 10.0);
        t.apply(
            &EventKind::StatusChanged {
                from: Some(ExtractorState::Loaded),
                to: ExtractorState::Running,
            },
            Some(&running),
            t0,
        );
        t.apply(
            &EventKind::Progress {
                step: 3,
                progress: 40.0,
                remaining_s: 60.0,
            },
            Some(&running),
            t0,
        );
        let run = t.run.as_ref().expect("a run");
        assert_eq!(
            (run.plate_barcode.as_str(), run.protocol, run.progress),
            ("EXT-0001", 3, 40.0)
        );
        let done = status(ExtractorState::Completed, 100.0);
        t.apply(
            &EventKind::StatusChanged {
                from: Some(ExtractorState::Running),
                to: ExtractorState::Completed,
            },
            Some(&done),
            t0,
        );
        assert_eq!(
            t.last_run.as_ref().and_then(|r| r.outcome),
            Some(Outcome::Unconfirmed)
        );
        t.apply(
            &EventKind::Completed {
                barcode: "EXT-0001".into(),
                protocol: 3,
            },
            Some(&done),
            t0,
        );
        assert!(t.run.is_none());
        assert_eq!(
            t.last_run.as_ref().and_then(|r| r.outcome),
            Some(Outcome::Completed)
        );
        assert_eq!(t.runs_completed, 1);
    }

    #[test]
    fn offline_keeps_the_run_and_a_device_error_ends_it() {
        let t0 = SystemTime::UNIX_EPOCH;
        let mut t = Tracked::new(t0);
        let running = status(ExtractorState::Running, 20.0);
        t.apply(
            &EventKind::Online {
                status: Box::new(running.clone()),
                resynchronised: false,
            },
            Some(&running),
            t0,
        );
        assert!(t.run.is_some(), "a run seen at start-up is followed");
        t.apply(
            &EventKind::Offline {
                reason: "connect refused".into(),
            },
            Some(&running),
            t0,
        );
        assert_eq!(t.connection, Connection::Offline);
        assert_eq!(t.reason.as_deref(), Some("connect refused"));
        assert!(t.run.is_some(), "offline does not fail the run");
        let mut failed = status(ExtractorState::Error, 50.0);
        failed.error = Some(DeviceError {
            code: 102,
            reason: Some("Magnetic rod head blocked".into()),
        });
        t.apply(
            &EventKind::Online {
                status: Box::new(failed.clone()),
                resynchronised: true,
            },
            Some(&failed),
            t0,
        );
        t.apply(
            &EventKind::StatusChanged {
                from: Some(ExtractorState::Running),
                to: ExtractorState::Error,
            },
            Some(&failed),
            t0,
        );
        t.apply(
            &EventKind::DeviceError(failed.error.clone().expect("error")),
            Some(&failed),
            t0,
        );
        let last = t.last_run.as_ref().expect("ended run");
        assert_eq!(last.outcome, Some(Outcome::DeviceError));
        assert_eq!(last.error.as_ref().map(|e| e.code), Some(102));
        assert_eq!(t.runs_completed, 0);
    }

    /// The 409 "a run is being started or aborted" was answered whenever the
    /// lock was merely held for a moment (the follower holds it on each check,
    /// and held it across the disk wait when it recorded a failed run): a
    /// start now waits for it and then gets the answer that says what is in
    /// the way.
    #[tokio::test]
    async fn a_start_waits_for_a_command_lock_held_for_a_moment() {
        let profile = Arc::new(
            pcrd_protocol::extractor::Profile::from_toml_str(include_str!(
                "../../profiles/sim-extractor.toml"
            ))
            .unwrap(),
        );
        let addr = "127.0.0.1:9".parse().unwrap();
        let config = ExtractorConfig {
            name: "ext-1".into(),
            unit: 1,
            profile_path: std::path::PathBuf::new(),
            profile,
            bus: pcrd_drivers::modbus::BusConfig::new("t", LinkConfig::Tcp { addr }),
        };
        let instruments = Instruments::start(&[config]);
        let instrument = instruments.get("ext-1").unwrap();
        let held = Duration::from_millis(200);
        let holder = async {
            let guard = instrument.command.lock().await;
            tokio::time::sleep(held).await;
            drop(guard);
        };
        let waiter = async {
            // Asks while the lock is held.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let asked = std::time::Instant::now();
            let got = instrument.command_lock().await.map(|_| ());
            (got, asked.elapsed())
        };
        let ((), (got, waited)) = tokio::join!(holder, waiter);
        assert!(got.is_ok(), "{got:?}");
        assert!(waited >= Duration::from_millis(100), "{waited:?}");
        assert!(COMMAND_WAIT > Duration::from_secs(5));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
