//! One extractor: a unit id on a bus, seen through its register-map profile.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pcrd_protocol::extractor::{
    Anomaly, DeviceError, ExtractorCommand, ExtractorState, ExtractorStatus, Identity, Profile,
    ResendPolicy,
};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, warn};

use super::{BusHandle, ModbusError};

/// Something the daemon should know about an extractor.
#[derive(Clone, Debug, PartialEq)]
pub struct ExtractorEvent {
    /// The instrument's configured name.
    pub instrument: Arc<str>,
    pub kind: EventKind,
}

/// What happened.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum EventKind {
    /// The first good status after start-up or after being offline. When a
    /// run was in progress before the link went away, `resynchronised` is
    /// true and `status` is where the device got to meanwhile: the run goes
    /// on from there instead of being failed.
    Online {
        status: Box<ExtractorStatus>,
        resynchronised: bool,
    },
    /// Polls fail; the driver keeps reconnecting with backoff.
    Offline { reason: String },
    StatusChanged {
        from: Option<ExtractorState>,
        to: ExtractorState,
    },
    /// Step, percent or remaining time moved during a run.
    Progress {
        step: u32,
        progress: f64,
        remaining_s: f64,
    },
    /// The run ended cleanly: state "completed", no error, no anomaly.
    Completed { barcode: String, protocol: u32 },
    /// The error register went non-zero.
    DeviceError(DeviceError),
    /// A run whose step and progress have not moved for `for_s` seconds
    /// (see [`DEFAULT_STALL_AFTER`]). Reported once per stall; the run is not
    /// failed, the operator decides.
    Stalled { progress: f64, for_s: f64 },
    /// Values that cannot be right (out of range, unknown state). A run that
    /// ends with anomalies is reported here and never as completed.
    Anomalies(Vec<Anomaly>),
}

/// How a command ended.
#[derive(Clone, Debug, PartialEq)]
pub enum CommandOutcome {
    /// The device acknowledged every write.
    Acknowledged,
    /// The reply was lost, but the state read back shows the command took
    /// effect.
    ConfirmedByReadBack(Box<ExtractorStatus>),
    /// The reply was lost and the state showed it had not taken effect; the
    /// command (safe to repeat) was sent once more and acknowledged.
    Resent,
}

/// A cloneable handle on one extractor. Calls go through the bus task.
#[derive(Clone, Debug)]
pub struct ExtractorHandle {
    name: Arc<str>,
    unit: u8,
    profile: Arc<Profile>,
    bus: BusHandle,
    events: broadcast::Sender<ExtractorEvent>,
    /// The last status the monitor read, for whoever shows it.
    latest: Arc<watch::Sender<Option<ExtractorStatus>>>,
    stats: Arc<PollStats>,
    stall_after: Duration,
}

/// What the monitor has done since it started, for /metrics.
#[derive(Debug, Default)]
pub struct PollStats {
    /// Status polls sent.
    pub polls: AtomicU64,
    /// Polls that failed (timeout, link down, exception, undecodable reply).
    pub errors: AtomicU64,
}

/// A running extractor whose step and progress have not moved for this long is
/// reported as stalled. Extraction steps (lysis, binding, washes, elution) take
/// minutes, and progress moves at least every few seconds on the devices we know;
/// two minutes without movement is a stuck PLC or a hung sensor, not a slow step.
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(120);

/// Bounded retries for exception 06 "server device busy" on reads
/// (protocols.md §4: retry with bounded backoff).
const BUSY_RETRIES: [Duration; 3] = [
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(200),
];

impl ExtractorHandle {
    /// An extractor at `unit` on `bus`. Nothing is sent until it is used.
    pub fn new(name: impl Into<Arc<str>>, unit: u8, profile: Arc<Profile>, bus: BusHandle) -> Self {
        // Enough for a slow subscriber to miss nothing over a few minutes of
        // 2 Hz polling.
        let (events, _) = broadcast::channel(1024);
        ExtractorHandle {
            name: name.into(),
            unit,
            profile,
            bus,
            events,
            latest: Arc::new(watch::Sender::new(None)),
            stats: Arc::default(),
            stall_after: DEFAULT_STALL_AFTER,
        }
    }

    /// Changes how long progress may stand still during a run before a
    /// [`EventKind::Stalled`] event.
    pub fn with_stall_after(mut self, stall_after: Duration) -> Self {
        self.stall_after = stall_after;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// The unit id on the bus.
    pub fn unit(&self) -> u8 {
        self.unit
    }

    /// The bus this extractor is reached through.
    pub fn bus(&self) -> &BusHandle {
        &self.bus
    }

    /// Poll counters of the monitor.
    pub fn poll_stats(&self) -> &PollStats {
        &self.stats
    }

    /// The last status the monitor read (`None` before the first good
    /// poll). It is kept when polls fail: whether the instrument is online
    /// comes from the events.
    pub fn watch_status(&self) -> watch::Receiver<Option<ExtractorStatus>> {
        self.latest.subscribe()
    }

    /// Events from the monitor ([`ExtractorHandle::monitor`]).
    pub fn subscribe(&self) -> broadcast::Receiver<ExtractorEvent> {
        self.events.subscribe()
    }

    /// Reads the identification registers.
    pub async fn identify(&self) -> Result<Identity, ModbusError> {
        let (address, count) = self.profile.identify_block();
        let block = self.read(address, count).await?;
        Ok(self.profile.decode_identity(&block)?)
    }

    /// Reads the whole status in one request.
    pub async fn status(&self) -> Result<ExtractorStatus, ModbusError> {
        let (address, count) = self.profile.status_block();
        let block = self.read(address, count).await?;
        Ok(self.profile.decode_status(&block)?)
    }

    /// A read, retried a bounded number of times while the device says it is
    /// busy (exception 06). Reads change nothing, so retrying is safe.
    async fn read(&self, address: u16, count: u16) -> Result<Vec<u16>, ModbusError> {
        let mut waits = BUSY_RETRIES.iter();
        loop {
            match self
                .bus
                .read(self.unit, self.profile.table, address, count)
                .await
            {
                Err(ModbusError::Exception { code: 0x06, .. }) if waits.len() > 0 => {
                    if let Some(wait) = waits.next() {
                        tokio::time::sleep(*wait).await;
                    }
                }
                other => return other,
            }
        }
    }

    pub async fn load_protocol(&self, number: u16) -> Result<CommandOutcome, ModbusError> {
        self.command(ExtractorCommand::LoadProtocol(number)).await
    }

    pub async fn start(&self, barcode: &str) -> Result<CommandOutcome, ModbusError> {
        self.command(ExtractorCommand::Start {
            barcode: barcode.to_owned(),
        })
        .await
    }

    pub async fn pause(&self) -> Result<CommandOutcome, ModbusError> {
        self.command(ExtractorCommand::Pause).await
    }

    pub async fn resume(&self) -> Result<CommandOutcome, ModbusError> {
        self.command(ExtractorCommand::Resume).await
    }

    pub async fn abort(&self) -> Result<CommandOutcome, ModbusError> {
        self.command(ExtractorCommand::Abort).await
    }

    pub async fn acknowledge_error(&self) -> Result<CommandOutcome, ModbusError> {
        self.command(ExtractorCommand::AcknowledgeError).await
    }

    /// Sends a command with its policy: when the reply to the command code
    /// is lost, the state is read back; a command that did not take effect
    /// is resent only if its policy allows (never start or abort).
    pub async fn command(&self, command: ExtractorCommand) -> Result<CommandOutcome, ModbusError> {
        let span =
            tracing::info_span!("command", instrument = %self.name, command = command.name());
        self.command_inner(command).instrument(span).await
    }

    async fn command_inner(
        &self,
        command: ExtractorCommand,
    ) -> Result<CommandOutcome, ModbusError> {
        let writes = self.profile.encode_command(&command)?;
        let Some((code, arguments)) = writes.split_last() else {
            return Ok(CommandOutcome::Acknowledged);
        };
        // Argument registers do nothing on their own (the device acts on the
        // code), so a failure here is reported as it is.
        for w in arguments {
            self.bus
                .write(self.unit, w.address, w.values.clone())
                .await?;
        }
        let cause = match self
            .bus
            .write(self.unit, code.address, code.values.clone())
            .await
        {
            Ok(()) => return Ok(CommandOutcome::Acknowledged),
            Err(e) if e.outcome_unknown() => e,
            Err(e) => return Err(e),
        };
        warn!(error = %cause, "Command reply lost; reading the state back.");
        let observed = match self.status().await {
            Ok(status) => status,
            Err(e) => {
                return Err(ModbusError::OutcomeUnknown {
                    command: command.name(),
                    cause: format!("{cause}; read-back: {e}"),
                });
            }
        };
        if command.took_effect(&observed) {
            info!("The state read back shows the command took effect.");
            return Ok(CommandOutcome::ConfirmedByReadBack(Box::new(observed)));
        }
        match command.policy() {
            ResendPolicy::Never => Err(ModbusError::NotConfirmed {
                command: command.name(),
                observed: Box::new(observed),
            }),
            ResendPolicy::AfterReadBack => {
                for w in &writes {
                    self.bus
                        .write(self.unit, w.address, w.values.clone())
                        .await?;
                }
                Ok(CommandOutcome::Resent)
            }
        }
    }

    /// Starts polling at the profile's interval and publishing events to
    /// [`ExtractorHandle::subscribe`]rs. The task stops when the returned
    /// [`Monitor`] is dropped.
    pub fn monitor(&self) -> Monitor {
        let span = tracing::info_span!("extractor", instrument = %self.name, unit = self.unit);
        let handle = self.clone();
        Monitor {
            task: tokio::spawn(handle.poll_loop().instrument(span)),
        }
    }

    fn emit(&self, kind: EventKind) {
        // No subscriber is not an error: events are also in the logs.
        let _ = self.events.send(ExtractorEvent {
            instrument: self.name.clone(),
            kind,
        });
    }

    async fn poll_loop(self) {
        let mut ticks = tokio::time::interval(self.profile.poll_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tracker = Tracker::new(self.stall_after);
        loop {
            ticks.tick().await;
            self.stats.polls.fetch_add(1, Ordering::Relaxed);
            let polled = self.status().await;
            match &polled {
                Ok(status) => {
                    self.latest.send_replace(Some(status.clone()));
                }
                Err(e) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    debug!(error = %e, "Status poll failed.");
                }
            }
            for kind in tracker.observe(polled, Instant::now()) {
                // The link is the driver's business and is logged here; what a
                // run's events mean for the lab (and at which level) is the
                // daemon's, which logs them in its instrument span.
                match &kind {
                    EventKind::Offline { reason } => warn!(%reason, "Extractor offline."),
                    EventKind::Online { resynchronised, .. } => {
                        info!(resynchronised, "Extractor online.");
                    }
                    EventKind::DeviceError(e) => {
                        debug!(code = e.code, reason = ?e.reason, "Extractor reports an error.");
                    }
                    EventKind::Anomalies(a) => {
                        debug!(anomalies = ?a, "Implausible register values.")
                    }
                    EventKind::Completed { barcode, .. } => {
                        debug!(%barcode, "Extraction completed.")
                    }
                    _ => {}
                }
                self.emit(kind);
            }
        }
    }
}

/// A running poller; dropping it stops the polling.
#[derive(Debug)]
pub struct Monitor {
    task: JoinHandle<()>,
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Turns successive polls into events. Pure: the poll results and their
/// times are its only input, so it is tested without a device or a clock.
#[derive(Debug)]
pub(crate) struct Tracker {
    last: Option<ExtractorStatus>,
    /// `None` before the first poll.
    online: Option<bool>,
    stall_after: Duration,
    /// When step or progress last moved during a run, and whether the
    /// current stall was reported.
    moved_at: Option<Instant>,
    stall_reported: bool,
}

impl Tracker {
    pub(crate) fn new(stall_after: Duration) -> Self {
        Tracker {
            last: None,
            online: None,
            stall_after,
            moved_at: None,
            stall_reported: false,
        }
    }

    pub(crate) fn observe(
        &mut self,
        polled: Result<ExtractorStatus, ModbusError>,
        now: Instant,
    ) -> Vec<EventKind> {
        let mut events = Vec::new();
        let status = match polled {
            Ok(status) => status,
            Err(e) => {
                if self.online != Some(false) && e.is_link_failure() {
                    self.online = Some(false);
                    events.push(EventKind::Offline {
                        reason: e.to_string(),
                    });
                }
                return events;
            }
        };
        if self.online != Some(true) {
            let resynchronised =
                self.online == Some(false) && self.last.as_ref().is_some_and(|s| s.state.in_run());
            self.online = Some(true);
            events.push(EventKind::Online {
                status: Box::new(status.clone()),
                resynchronised,
            });
        }
        let previous = self.last.as_ref();
        let from = previous.map(|s| s.state);
        if from != Some(status.state) {
            events.push(EventKind::StatusChanged {
                from,
                to: status.state,
            });
            let was_running = from.is_some_and(ExtractorState::in_run);
            // Completed only when the snapshot is clean; otherwise the
            // anomaly or error events below say why it is not.
            if status.state == ExtractorState::Completed && was_running && status.completed() {
                events.push(EventKind::Completed {
                    barcode: status.barcode.clone(),
                    protocol: status.protocol,
                });
            }
        }
        if status.state.in_run() {
            let moved = previous.is_none_or(|p| {
                p.step != status.step
                    || p.progress != status.progress
                    || p.remaining_s != status.remaining_s
            });
            if moved {
                events.push(EventKind::Progress {
                    step: status.step,
                    progress: status.progress,
                    remaining_s: status.remaining_s,
                });
            }
        }
        // Stall clock: runs only while running (a pause is not a stall).
        let step_moved =
            previous.is_none_or(|p| p.step != status.step || p.progress != status.progress);
        if status.state != ExtractorState::Running || step_moved || from != Some(status.state) {
            self.moved_at = Some(now);
            self.stall_reported = false;
        } else if let Some(since) = self.moved_at
            && !self.stall_reported
            && now.saturating_duration_since(since) >= self.stall_after
        {
            self.stall_reported = true;
            events.push(EventKind::Stalled {
                progress: status.progress,
                for_s: now.saturating_duration_since(since).as_secs_f64(),
            });
        }
        if let Some(error) = &status.error
            && previous.and_then(|p| p.error.as_ref()) != Some(error)
        {
            events.push(EventKind::DeviceError(error.clone()));
        }
        if !status.anomalies.is_empty() && previous.is_none_or(|p| p.anomalies != status.anomalies)
        {
            events.push(EventKind::Anomalies(status.anomalies.clone()));
        }
        self.last = Some(status);
        events
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use pcrd_protocol::extractor::ExtractorState as S;

    use super::*;

    fn status(state: ExtractorState, progress: f64) -> ExtractorStatus {
        ExtractorStatus {
            state,
            step: 1,
            progress,
            remaining_s: 100.0 - progress,
            temperature_c: 56.0,
            error: None,
            protocol: 1,
            barcode: "P1".into(),
            anomalies: vec![],
        }
    }

    fn kinds(events: &[EventKind]) -> Vec<&'static str> {
        events
            .iter()
            .map(|e| match e {
                EventKind::Online { .. } => "online",
                EventKind::Offline { .. } => "offline",
                EventKind::StatusChanged { .. } => "changed",
                EventKind::Progress { .. } => "progress",
                EventKind::Completed { .. } => "completed",
                EventKind::DeviceError(_) => "error",
                EventKind::Stalled { .. } => "stalled",
                EventKind::Anomalies(_) => "anomalies",
            })
            .collect()
    }

    #[test]
    fn a_run_is_followed_to_completion() {
        let t0 = Instant::now();
        let mut t = Tracker::new(Duration::from_secs(60));
        assert_eq!(
            kinds(&t.observe(Ok(status(S::Loaded, 0.0)), t0)),
            ["online", "changed"]
        );
        assert_eq!(
            kinds(&t.observe(Ok(status(S::Running, 10.0)), t0)),
            ["changed", "progress"]
        );
        assert_eq!(
            kinds(&t.observe(Ok(status(S::Running, 10.0)), t0)),
            Vec::<&str>::new()
        );
        assert_eq!(
            kinds(&t.observe(Ok(status(S::Completed, 100.0)), t0)),
            ["changed", "completed"]
        );
    }

    #[test]
    fn a_completion_seen_at_start_up_is_not_a_new_completion() {
        let mut t = Tracker::new(Duration::from_secs(60));
        let events = t.observe(Ok(status(S::Completed, 100.0)), Instant::now());
        assert_eq!(kinds(&events), ["online", "changed"]);
    }

    #[test]
    fn offline_then_back_in_the_middle_of_a_run_is_a_resynchronisation() {
        let t0 = Instant::now();
        let mut t = Tracker::new(Duration::from_secs(60));
        t.observe(Ok(status(S::Running, 10.0)), t0);
        let e = t.observe(Err(ModbusError::Timeout(Duration::from_millis(5))), t0);
        assert_eq!(kinds(&e), ["offline"]);
        // Reported once, however long it lasts.
        let e = t.observe(Err(ModbusError::Offline { reason: "x".into() }), t0);
        assert!(e.is_empty());
        let e = t.observe(Ok(status(S::Completed, 100.0)), t0);
        assert!(matches!(
            e[0],
            EventKind::Online {
                resynchronised: true,
                ..
            }
        ));
        assert_eq!(kinds(&e), ["online", "changed", "completed"]);
    }

    #[test]
    fn completed_with_an_anomaly_is_not_a_completion() {
        let t0 = Instant::now();
        let mut t = Tracker::new(Duration::from_secs(60));
        t.observe(Ok(status(S::Running, 10.0)), t0);
        let mut done = status(S::Completed, 140.0);
        done.anomalies.push(Anomaly::OutOfRange {
            field: "progress",
            value: 140.0,
            min: Some(0.0),
            max: Some(100.0),
        });
        assert_eq!(kinds(&t.observe(Ok(done), t0)), ["changed", "anomalies"]);
    }

    #[test]
    fn progress_that_stands_still_is_reported_once_as_stalled() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut t = Tracker::new(s(60));
        t.observe(Ok(status(S::Running, 30.0)), t0);
        assert!(
            t.observe(Ok(status(S::Running, 30.0)), t0 + s(59))
                .is_empty()
        );
        let e = t.observe(Ok(status(S::Running, 30.0)), t0 + s(61));
        assert!(
            matches!(e[..], [EventKind::Stalled { progress, for_s }] if progress == 30.0 && for_s >= 60.0)
        );
        assert!(
            t.observe(Ok(status(S::Running, 30.0)), t0 + s(200))
                .is_empty()
        );
        // It moves again: the clock restarts.
        t.observe(Ok(status(S::Running, 31.0)), t0 + s(201));
        assert!(
            t.observe(Ok(status(S::Running, 31.0)), t0 + s(250))
                .is_empty()
        );
        // A pause is not a stall.
        t.observe(Ok(status(S::Paused, 31.0)), t0 + s(251));
        assert_eq!(
            kinds(&t.observe(Ok(status(S::Paused, 31.0)), t0 + s(900))),
            Vec::<&str>::new()
        );
    }
}
