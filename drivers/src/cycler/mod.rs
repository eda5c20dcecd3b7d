//! Real-time PCR cyclers over TCP or a serial port, in a line dialect of
//! `pcrd_protocol::cycler` (pcrd's reference one, docs/cycler-protocol.md).
//!
//! One task owns the port ([`spawn_cycler`]). Everyone else holds a cloneable
//! [`CyclerHandle`] whose calls go to that task with a oneshot for the reply.
//! The task:
//!
//! - sends one command at a time under its [`Policy`](pcrd_protocol::cycler::Policy):
//!   queries are retried; start, abort, reset and the lid are sent once and,
//!   when the reply is lost, the state is read back with `STAT?` instead.
//!   After any lost reply, lines are read and late replies dropped for
//!   [`CyclerConfig::settle`] before the next command, so a late reply never
//!   answers the next command;
//! - checks every `!CYCLE` line with a [`RunTracker`] and hands each complete
//!   cycle to the caller's [`CycleSink`]; the tracker does not move past a
//!   cycle until the sink returned `Ok`, so the daemon's durability barrier
//!   sits there;
//! - on a gap (a line not received), a `!FINISHED` reporting more cycles than
//!   arrived, a sink failure, or after a reconnect, fetches the missing cycles
//!   with `DATA?` so that no cycle is lost;
//! - reports a bad line (bad bytes, malformed, unknown event, refused by the
//!   tracker) as [`EventKind::Rejected`] with the line kept, never panics;
//! - reconnects with backoff when the link drops, reporting
//!   [`EventKind::Offline`] (with whether a run was in progress: the run is
//!   then "instrument offline", not failed) and [`EventKind::Online`] with the
//!   status read back when it returns.
//!
//! What it does NOT do: store readings (the sink does), or decide what a
//! fault means for a run (the daemon does).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use pcrd_protocol::cycler::{
    Channel, Command, CycleData, CycleRange, CyclerError, DeviceError, Dialect, Event, FaultKind,
    Incoming, LidState, LineDecoder, LineError, Operation, Outcome, PlateMap, Response, RunState,
    RunTracker, Status, ThermalProtocol, TrackError, Tracked, parse_incoming,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_serial::SerialPortBuilderExt;
use tracing::{Instrument, debug, info, warn};

/// Where the cycler is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CyclerLink {
    /// Raw TCP, `host:port`.
    Tcp(String),
    /// RS-232, 8N1 (docs/cycler-protocol.md §1: 9600–115200 Bd).
    Serial {
        /// The port, e.g. `/dev/serial/by-id/...`.
        path: String,
        /// Baud rate.
        baud: u32,
    },
}

/// How to drive one cycler.
#[derive(Clone, Debug)]
pub struct CyclerConfig {
    /// The instrument's configured name (in events and logs).
    pub name: String,
    /// Where it is.
    pub link: CyclerLink,
    /// Its command set.
    pub dialect: Dialect,
    /// Caps every command's timeout (tests and simulators answer fast);
    /// `None` uses the policy's timeouts as documented.
    pub timeout_cap: Option<Duration>,
    /// After a lost reply, how long late lines are read and dropped before the
    /// next command, so a late reply never answers the next command.
    pub settle: Duration,
    /// First wait before reconnecting.
    pub backoff_min: Duration,
    /// Longest wait between reconnects.
    pub backoff_max: Duration,
}

impl CyclerConfig {
    /// A configuration with the reference dialect and default timers.
    pub fn new(name: impl Into<String>, link: CyclerLink) -> CyclerConfig {
        CyclerConfig {
            name: name.into(),
            link,
            dialect: Dialect::reference(),
            timeout_cap: None,
            settle: Duration::from_millis(500),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
        }
    }
}

/// The sink refused a cycle; the driver will fetch it again.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cycle sink failed: {0}")]
pub struct SinkError(pub String);

/// Where complete cycles go: the daemon implements this with its durable
/// store. The driver calls it once per complete cycle, in order, and does not
/// move past the cycle until it returned `Ok`; an `Err` makes the driver fetch
/// the cycle again with `DATA?`.
pub trait CycleSink: Send + Sync + 'static {
    /// Stores every channel of `cycle` (one [`CycleData`] per channel, in the
    /// order they arrived).
    fn store_cycle(
        &self,
        cycle: u32,
        readings: &[CycleData],
    ) -> impl Future<Output = Result<(), SinkError>> + Send;
}

/// Why a command failed. Layers as in style.md §7.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CyclerDriverError {
    /// No reply within the command's timeout (after its attempts).
    #[error("no reply within {} ms", .0.as_millis())]
    Timeout(Duration),
    /// The socket or port failed; the link is being rebuilt.
    #[error("link failed: {0}")]
    Transport(String),
    /// The instrument cannot be reached; commands fail at once until it is.
    #[error("instrument offline: {reason}")]
    Offline {
        /// The last connection error.
        reason: String,
    },
    /// The instrument refused the command (`ERR code,"text"`): data for the
    /// caller to decide on.
    #[error("instrument refused the command: {}", .0.encode())]
    Device(DeviceError),
    /// The reply did not fit the command.
    #[error(transparent)]
    Protocol(#[from] CyclerError),
    /// A state-changing command's reply was lost and the state read back does
    /// not show it took effect. It was not resent.
    #[error("{command:?} was not confirmed (state read back: {observed:?}); not resent")]
    NotConfirmed {
        /// The command.
        command: Operation,
        /// The state read back.
        observed: Status,
    },
    /// A state-changing command's reply was lost and the state could not be
    /// read back either: whether it took effect is unknown.
    #[error("{command:?}: outcome unknown ({cause})")]
    OutcomeUnknown {
        /// The command.
        command: Operation,
        /// Why the read-back failed.
        cause: String,
    },
    /// The driver task has stopped.
    #[error("the cycler task has stopped")]
    Closed,
}

impl CyclerDriverError {
    fn is_link_failure(&self) -> bool {
        matches!(self, CyclerDriverError::Transport(_))
    }
}

/// How a command ended.
#[derive(Clone, Debug, PartialEq)]
pub enum CommandOutcome {
    /// The instrument replied.
    Replied(Response),
    /// The reply was lost, but the state read back shows the command took
    /// effect. It was not resent.
    ConfirmedByReadBack(Status),
}

/// Something the daemon should know about a cycler.
#[derive(Clone, Debug, PartialEq)]
pub struct CyclerEvent {
    /// The instrument's configured name.
    pub instrument: Arc<str>,
    /// What happened.
    pub kind: EventKind,
}

/// What happened.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum EventKind {
    /// Connected. `status` is what `STAT?` read back; `resynchronised` when a
    /// run was in progress as the link went away: it goes on from there.
    Online {
        /// The status read on connecting (`None` if it could not be read).
        status: Option<Status>,
        /// A run was in progress when the link was lost.
        resynchronised: bool,
    },
    /// The link is down; the driver keeps reconnecting. With `run_in_progress`
    /// the run is "instrument offline", not failed.
    Offline {
        /// Why.
        reason: String,
        /// A run was in progress.
        run_in_progress: bool,
    },
    /// `!STARTED`.
    RunStarted {
        /// The protocol's name.
        protocol: String,
    },
    /// `!STAGE`.
    StageChanged {
        /// The stage (1-based).
        stage: u32,
    },
    /// Every channel of `cycle` was accepted by the tracker and stored by the
    /// sink.
    CycleStored {
        /// The cycle.
        cycle: u32,
    },
    /// Cycles fetched with `DATA?` (after a gap or a reconnect).
    Refetched {
        /// The range the instrument sent.
        range: CycleRange,
    },
    /// The run ended and every cycle it reports was stored.
    RunFinished {
        /// How.
        outcome: Outcome,
        /// Data cycles.
        cycles: u32,
    },
    /// `!FAULT`: the lid opened, the block overheated...
    Fault {
        /// Which.
        kind: FaultKind,
        /// The instrument's words.
        detail: String,
    },
    /// A line refused (bad bytes, malformed, unknown event, out of order,
    /// wrong well count): kept here for diagnosis.
    Rejected {
        /// The line (or its first bytes, lossily decoded).
        line: String,
        /// Why.
        reason: String,
    },
    /// The sink failed to store a cycle; it will be fetched again.
    SinkFailed {
        /// The cycle.
        cycle: u32,
        /// The sink's error.
        reason: String,
    },
}

type Reply = oneshot::Sender<Result<CommandOutcome, CyclerDriverError>>;

#[derive(Debug)]
enum Request {
    Command {
        command: Command,
        reply: Reply,
    },
    /// Carry on a run whose first cycles the caller already holds.
    Resume {
        wells: usize,
        channels: Vec<Channel>,
        stored: u32,
    },
}

/// A cloneable handle on one cycler's task.
#[derive(Clone, Debug)]
pub struct CyclerHandle {
    name: Arc<str>,
    requests: mpsc::Sender<Request>,
    events: broadcast::Sender<CyclerEvent>,
}

impl CyclerHandle {
    /// The instrument's configured name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Another receiver of the events (from now on).
    pub fn subscribe(&self) -> broadcast::Receiver<CyclerEvent> {
        self.events.subscribe()
    }

    /// Sends a command under its policy.
    pub async fn request(&self, command: Command) -> Result<CommandOutcome, CyclerDriverError> {
        let (reply, rx) = oneshot::channel();
        self.requests
            .send(Request::Command { command, reply })
            .await
            .map_err(|_| CyclerDriverError::Closed)?;
        rx.await.map_err(|_| CyclerDriverError::Closed)?
    }

    /// After a restart: carries on the run in progress, whose cycles
    /// `1..=stored` the caller already holds (in its store). The driver fetches
    /// the cycles after `stored` with `DATA?` and then follows the run as if it
    /// had never stopped.
    pub async fn resume_run(
        &self,
        wells: usize,
        channels: Vec<Channel>,
        stored: u32,
    ) -> Result<(), CyclerDriverError> {
        self.requests
            .send(Request::Resume {
                wells,
                channels,
                stored,
            })
            .await
            .map_err(|_| CyclerDriverError::Closed)
    }

    /// `*IDN?`.
    pub async fn identify(&self) -> Result<pcrd_protocol::cycler::Identity, CyclerDriverError> {
        match self.request(Command::Identify).await? {
            CommandOutcome::Replied(Response::Identity(i)) => Ok(i),
            other => Err(unexpected("identify", &other)),
        }
    }

    /// `STAT?`.
    pub async fn status(&self) -> Result<Status, CyclerDriverError> {
        match self.request(Command::Status).await? {
            CommandOutcome::Replied(Response::Status(s)) => Ok(s),
            other => Err(unexpected("status", &other)),
        }
    }

    /// Loads the plate map (the driver learns the plate's well count).
    pub async fn load_plate(&self, map: PlateMap) -> Result<CommandOutcome, CyclerDriverError> {
        self.request(Command::LoadPlate(map)).await
    }

    /// Loads the thermal protocol (the driver learns its channels).
    pub async fn load_protocol(
        &self,
        protocol: ThermalProtocol,
    ) -> Result<CommandOutcome, CyclerDriverError> {
        self.request(Command::LoadProtocol(protocol)).await
    }

    /// `RUN:START`, sent once; a lost reply is settled by reading `STAT?`.
    pub async fn start(&self) -> Result<CommandOutcome, CyclerDriverError> {
        self.request(Command::Start).await
    }

    /// `RUN:ABORT`, sent once; a lost reply is settled by reading `STAT?`.
    pub async fn abort(&self) -> Result<CommandOutcome, CyclerDriverError> {
        self.request(Command::Abort).await
    }

    /// `LID:OPEN`, sent once.
    pub async fn lid_open(&self) -> Result<CommandOutcome, CyclerDriverError> {
        self.request(Command::LidOpen).await
    }

    /// `LID:CLOSE`, sent once.
    pub async fn lid_close(&self) -> Result<CommandOutcome, CyclerDriverError> {
        self.request(Command::LidClose).await
    }
}

fn unexpected(what: &str, outcome: &CommandOutcome) -> CyclerDriverError {
    CyclerDriverError::Protocol(CyclerError::Invalid {
        reason: format!("{what}: unexpected outcome {outcome:?}"),
    })
}

/// Starts the task that owns the cycler's port. Returns the handle, a
/// receiver that sees every event from the first, and the task.
pub fn spawn_cycler<S: CycleSink>(
    config: CyclerConfig,
    sink: S,
) -> (
    CyclerHandle,
    broadcast::Receiver<CyclerEvent>,
    JoinHandle<()>,
) {
    let name: Arc<str> = config.name.as_str().into();
    // A 45-cycle run of 4 channels is a few hundred events.
    let (events, first) = broadcast::channel(4096);
    let (requests, rx) = mpsc::channel(32);
    let span = tracing::info_span!("cycler", instrument = %name);
    let driver = Driver {
        name: Arc::clone(&name),
        config,
        sink,
        events: events.clone(),
        wells: None,
        channels: None,
        tracker: None,
        pending: Vec::new(),
        need_fetch: false,
        finish: None,
        running: false,
        online: None,
    };
    let task = tokio::spawn(driver.run(rx).instrument(span));
    (
        CyclerHandle {
            name,
            requests,
            events,
        },
        first,
        task,
    )
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A connected link: the stream and what has arrived of the next line.
struct Link {
    io: Box<dyn Io>,
    buf: Vec<u8>,
    decoder: LineDecoder,
}

enum Read {
    Line(String),
    Bad(LineError),
}

impl Link {
    /// The next line. Cancel-safe: bytes go into `buf` only once read.
    async fn read_line(&mut self) -> Result<Read, String> {
        let mut chunk = [0u8; 8192];
        loop {
            match self.decoder.decode(&mut self.buf) {
                Ok(Some(line)) => return Ok(Read::Line(line.as_str().to_owned())),
                Err(e) => return Ok(Read::Bad(e)),
                Ok(None) => {}
            }
            match self.io.read(&mut chunk).await {
                Ok(0) => return Err("connection closed by the instrument".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.io.write_all(bytes).await.map_err(|e| e.to_string())?;
        self.io.flush().await.map_err(|e| e.to_string())
    }
}

struct Driver<S> {
    name: Arc<str>,
    config: CyclerConfig,
    sink: S,
    events: broadcast::Sender<CyclerEvent>,
    wells: Option<usize>,
    channels: Option<Vec<Channel>>,
    tracker: Option<RunTracker>,
    /// Lines of the cycle being received, for the sink.
    pending: Vec<CycleData>,
    /// Cycles are missing: fetch them with `DATA?`.
    need_fetch: bool,
    /// A `!FINISHED` (outcome, cycles) waiting for its missing cycles.
    finish: Option<(Outcome, u32)>,
    /// A run is in progress, as far as the driver knows.
    running: bool,
    /// Last link state reported (`None`: none yet).
    online: Option<bool>,
}

enum Next {
    Request(Option<Request>),
    Line(Result<Read, String>),
}

impl<S: CycleSink> Driver<S> {
    fn emit(&self, kind: EventKind) {
        let _ = self.events.send(CyclerEvent {
            instrument: Arc::clone(&self.name),
            kind,
        });
    }

    fn timeout(&self, policy: Duration) -> Duration {
        self.config
            .timeout_cap
            .map_or(policy, |cap| policy.min(cap))
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut backoff = self.config.backoff_min;
        loop {
            let link = match self.connect().await {
                Ok(link) => link,
                Err(reason) => {
                    self.offline(&reason);
                    let sleep = tokio::time::sleep(backoff);
                    tokio::pin!(sleep);
                    loop {
                        tokio::select! {
                            () = &mut sleep => break,
                            request = rx.recv() => match request {
                                None => return,
                                Some(Request::Command { reply, .. }) => {
                                    let _ = reply.send(Err(CyclerDriverError::Offline {
                                        reason: reason.clone(),
                                    }));
                                }
                                Some(Request::Resume { wells, channels, stored }) => {
                                    self.resume(wells, channels, stored);
                                }
                            },
                        }
                    }
                    backoff = (backoff * 2).min(self.config.backoff_max);
                    continue;
                }
            };
            backoff = self.config.backoff_min;
            match self.session(link, &mut rx).await {
                None => return,
                Some(reason) => self.offline(&reason),
            }
        }
    }

    fn offline(&mut self, reason: &str) {
        if self.online != Some(false) {
            warn!(reason, run_in_progress = self.running, "Cycler offline.");
            self.online = Some(false);
            self.emit(EventKind::Offline {
                reason: reason.to_owned(),
                run_in_progress: self.running,
            });
        }
    }

    async fn connect(&self) -> Result<Link, String> {
        let limit = Duration::from_secs(5);
        let io: Box<dyn Io> = match &self.config.link {
            CyclerLink::Tcp(addr) => {
                let stream = tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr))
                    .await
                    .map_err(|_| "connect timed out".to_owned())?
                    .map_err(|e| e.to_string())?;
                let _ = stream.set_nodelay(true);
                Box::new(stream)
            }
            CyclerLink::Serial { path, baud } => {
                let port = tokio_serial::new(path, *baud)
                    .data_bits(tokio_serial::DataBits::Eight)
                    .parity(tokio_serial::Parity::None)
                    .stop_bits(tokio_serial::StopBits::One)
                    .open_native_async()
                    .map_err(|e| e.to_string())?;
                Box::new(port)
            }
        };
        Ok(Link {
            io,
            buf: Vec::new(),
            decoder: LineDecoder::default(),
        })
    }

    /// One connection, until it fails (`Some(reason)`) or every handle is
    /// gone (`None`).
    async fn session(
        &mut self,
        mut link: Link,
        rx: &mut mpsc::Receiver<Request>,
    ) -> Option<String> {
        let status = match self.execute(&mut link, Command::Status).await {
            Ok(CommandOutcome::Replied(Response::Status(s))) => Some(s),
            Err(e) if e.is_link_failure() => return Some(e.to_string()),
            _ => None,
        };
        let resynchronised = self.running;
        info!(?status, resynchronised, "Cycler online.");
        self.online = Some(true);
        self.emit(EventKind::Online {
            status: status.clone(),
            resynchronised,
        });
        if let (Some(status), Some(tracker)) = (&status, &self.tracker) {
            if status.cycle > tracker.last_complete_cycle() {
                self.need_fetch = true;
            }
            if self.running && self.finish.is_none() {
                match status.state {
                    RunState::Completed => self.finish = Some((Outcome::Completed, status.cycle)),
                    RunState::Aborted => self.finish = Some((Outcome::Aborted, status.cycle)),
                    _ => {}
                }
            }
        }
        loop {
            if self.need_fetch
                && let Err(e) = self.catch_up(&mut link).await
            {
                if e.is_link_failure() {
                    return Some(e.to_string());
                }
                warn!(error = %e, "Could not fetch missing cycles.");
            }
            self.check_finish();
            let next = tokio::select! {
                request = rx.recv() => Next::Request(request),
                line = link.read_line() => Next::Line(line),
            };
            match next {
                Next::Request(None) => return None,
                Next::Request(Some(Request::Resume {
                    wells,
                    channels,
                    stored,
                })) => self.resume(wells, channels, stored),
                Next::Request(Some(Request::Command { command, reply })) => {
                    let result = self.execute(&mut link, command).await;
                    let failed = match &result {
                        Err(e) if e.is_link_failure() => Some(e.to_string()),
                        _ => None,
                    };
                    let _ = reply.send(result);
                    if failed.is_some() {
                        return failed;
                    }
                }
                Next::Line(Err(reason)) => return Some(reason),
                Next::Line(Ok(read)) => {
                    if let Some(reply) = self.on_line(read).await {
                        debug!(reply, "Reply with no command in flight dropped.");
                    }
                }
            }
        }
    }

    fn resume(&mut self, wells: usize, channels: Vec<Channel>, stored: u32) {
        info!(wells, stored, "Resuming a run.");
        self.wells = Some(wells);
        self.tracker = Some(RunTracker::new(wells, channels.clone()).resume_after(stored));
        self.channels = Some(channels);
        self.pending.clear();
        self.finish = None;
        self.running = true;
        self.need_fetch = true;
    }

    /// Fetches the cycles after the last complete one, up to what the
    /// instrument has.
    async fn catch_up(&mut self, link: &mut Link) -> Result<(), CyclerDriverError> {
        self.need_fetch = false;
        let Some(from) = self.tracker.as_ref().map(|t| t.last_complete_cycle() + 1) else {
            return Ok(());
        };
        let status = match self.execute(link, Command::Status).await? {
            CommandOutcome::Replied(Response::Status(s)) => s,
            other => return Err(unexpected("status", &other)),
        };
        // A run that ended while we were away (or before a restart) has no
        // `!FINISHED` coming: take the end from the status.
        if self.running && self.finish.is_none() {
            match status.state {
                RunState::Completed => self.finish = Some((Outcome::Completed, status.cycle)),
                RunState::Aborted => self.finish = Some((Outcome::Aborted, status.cycle)),
                _ => {}
            }
        }
        let to = status.cycle.max(self.finish.map_or(0, |f| f.1));
        if to < from {
            return Ok(());
        }
        let range = CycleRange::new(from, to)?;
        info!(first = from, last = to, "Fetching missing cycles.");
        if let CommandOutcome::Replied(Response::Fetched(Some(range))) =
            self.execute(link, Command::FetchData(range)).await?
        {
            self.emit(EventKind::Refetched { range });
        }
        // Anything still missing is fetched next time round only if new lines
        // show a gap again: no busy loop on an instrument that lost data.
        if self
            .tracker
            .as_ref()
            .is_some_and(|t| t.last_complete_cycle() < from)
        {
            self.need_fetch = false;
        }
        Ok(())
    }

    fn check_finish(&mut self) {
        let Some((outcome, cycles)) = self.finish else {
            return;
        };
        let Some(tracker) = &mut self.tracker else {
            return;
        };
        if let Ok(Tracked::RunFinished { outcome }) =
            tracker.observe(&Event::RunFinished { outcome, cycles })
        {
            self.finish = None;
            self.running = false;
            self.emit(EventKind::RunFinished { outcome, cycles });
        }
    }

    /// Sends a command under its policy.
    async fn execute(
        &mut self,
        link: &mut Link,
        command: Command,
    ) -> Result<CommandOutcome, CyclerDriverError> {
        let policy = command.policy();
        let timeout = self.timeout(policy.timeout);
        let attempts = policy.attempts.max(1);
        for attempt in 1..=attempts {
            match self.exchange(link, &command, timeout).await {
                Ok(response) => {
                    self.learn(&command);
                    return Ok(CommandOutcome::Replied(response));
                }
                Err(CyclerDriverError::Timeout(t)) => {
                    warn!(
                        operation = ?command.operation(),
                        attempt,
                        timeout_ms = t.as_millis() as u64,
                        "Cycler did not answer."
                    );
                    self.settle(link).await?;
                    if !policy.resend_safe {
                        return self.read_back(link, &command).await;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(CyclerDriverError::Timeout(timeout))
    }

    /// Remembers what a command told about the run.
    fn learn(&mut self, command: &Command) {
        match command {
            Command::LoadPlate(map) => self.wells = Some(map.well_count()),
            Command::LoadProtocol(protocol) => self.channels = Some(protocol.channels.clone()),
            _ => {}
        }
    }

    /// After a state-changing command's reply was lost: read the state back.
    async fn read_back(
        &mut self,
        link: &mut Link,
        command: &Command,
    ) -> Result<CommandOutcome, CyclerDriverError> {
        let operation = command.operation();
        let status = match Box::pin(self.execute(link, Command::Status)).await {
            Ok(CommandOutcome::Replied(Response::Status(s))) => s,
            Ok(other) => return Err(unexpected("status", &other)),
            Err(e) => {
                return Err(CyclerDriverError::OutcomeUnknown {
                    command: operation,
                    cause: e.to_string(),
                });
            }
        };
        let confirmed = match operation {
            Operation::Start => matches!(
                status.state,
                RunState::Running | RunState::Completed | RunState::Error
            ),
            Operation::Abort => matches!(status.state, RunState::Aborted | RunState::Idle),
            Operation::Reset => matches!(status.state, RunState::Idle),
            Operation::LidOpen => status.lid == LidState::Open,
            Operation::LidClose => status.lid == LidState::Closed,
            _ => false,
        };
        if confirmed {
            info!(
                ?operation,
                ?status,
                "Command confirmed by reading the state back."
            );
            Ok(CommandOutcome::ConfirmedByReadBack(status))
        } else {
            Err(CyclerDriverError::NotConfirmed {
                command: operation,
                observed: status,
            })
        }
    }

    /// Reads lines for `settle`, handling events and dropping late replies.
    async fn settle(&mut self, link: &mut Link) -> Result<(), CyclerDriverError> {
        let deadline = Instant::now() + self.config.settle;
        loop {
            match tokio::time::timeout_at(deadline, link.read_line()).await {
                Err(_) => return Ok(()),
                Ok(Err(reason)) => return Err(CyclerDriverError::Transport(reason)),
                Ok(Ok(read)) => {
                    if let Some(reply) = self.on_line(read).await {
                        debug!(reply, "Late reply dropped.");
                    }
                }
            }
        }
    }

    /// One attempt: send the line, read until its reply.
    async fn exchange(
        &mut self,
        link: &mut Link,
        command: &Command,
        timeout: Duration,
    ) -> Result<Response, CyclerDriverError> {
        let dialect = &self.config.dialect;
        let line = command.encode(dialect)?;
        debug!(line = line.as_str(), "Sending.");
        link.send(&line.to_wire())
            .await
            .map_err(CyclerDriverError::Transport)?;
        let mut deadline = Instant::now() + timeout;
        loop {
            let read = match tokio::time::timeout_at(deadline, link.read_line()).await {
                Err(_) => return Err(CyclerDriverError::Timeout(timeout)),
                Ok(Err(reason)) => return Err(CyclerDriverError::Transport(reason)),
                Ok(Ok(read)) => read,
            };
            if matches!(command, Command::FetchData(_)) {
                // DATA?'s timeout runs between two lines.
                deadline = Instant::now() + timeout;
            }
            let Some(text) = self.on_line(read).await else {
                continue;
            };
            match parse_incoming(&text, &self.config.dialect) {
                Ok(Incoming::Reply(reply)) => {
                    return Ok(command.parse_reply(&reply, &self.config.dialect)?);
                }
                Ok(Incoming::Error(error)) => return Err(CyclerDriverError::Device(error)),
                // `on_line` only hands back replies and error replies.
                Ok(Incoming::Event(_)) => {}
                Err(rejected) => return Err(CyclerDriverError::Protocol(rejected.error)),
            }
        }
    }

    /// Handles one line: events are processed; a reply or error reply is
    /// handed back for the command in flight.
    async fn on_line(&mut self, read: Read) -> Option<String> {
        let text = match read {
            Read::Line(text) => text,
            Read::Bad(error) => {
                // The bytes as received, escaped so that a log or a screen shows them.
                let bytes: &[u8] = match &error {
                    LineError::BadByte { line, .. } => line,
                    LineError::TooLong { kept, .. } => kept,
                    _ => &[],
                };
                let line = bytes.escape_ascii().to_string();
                warn!(%error, line = %line, "Bad bytes from the cycler.");
                self.emit(EventKind::Rejected {
                    line,
                    reason: error.to_string(),
                });
                return None;
            }
        };
        match parse_incoming(&text, &self.config.dialect) {
            Ok(Incoming::Event(event)) => {
                self.on_event(event, &text).await;
                None
            }
            Ok(_) => Some(text),
            Err(rejected) if text.starts_with(&self.config.dialect.event_marker) => {
                warn!(line = %rejected.line, error = %rejected.error, "Line refused.");
                self.emit(EventKind::Rejected {
                    line: rejected.line,
                    reason: rejected.error.to_string(),
                });
                None
            }
            // A malformed error reply still ends the command in flight.
            Err(_) => Some(text),
        }
    }

    fn reject(&self, line: &str, reason: String) {
        warn!(line, reason, "Line refused.");
        self.emit(EventKind::Rejected {
            line: line.to_owned(),
            reason,
        });
    }

    async fn on_event(&mut self, event: Event, text: &str) {
        match &event {
            Event::RunStarted { protocol } => {
                self.tracker = match (self.wells, &self.channels) {
                    (Some(wells), Some(channels)) => Some(RunTracker::new(wells, channels.clone())),
                    _ => None,
                };
                if self.tracker.is_none() {
                    warn!("Run started without a plate map and protocol loaded here.");
                }
                self.pending.clear();
                self.finish = None;
                self.running = true;
                self.emit(EventKind::RunStarted {
                    protocol: protocol.clone(),
                });
            }
            Event::StageChanged { stage } => self.emit(EventKind::StageChanged { stage: *stage }),
            Event::Fault { kind, detail } => {
                warn!(?kind, detail, "Cycler fault.");
                self.emit(EventKind::Fault {
                    kind: kind.clone(),
                    detail: detail.clone(),
                });
            }
            Event::RunFinished { outcome, cycles } => {
                let Some(tracker) = &mut self.tracker else {
                    self.running = false;
                    self.emit(EventKind::RunFinished {
                        outcome: *outcome,
                        cycles: *cycles,
                    });
                    return;
                };
                match tracker.observe(&event) {
                    Ok(_) => {
                        self.running = false;
                        self.finish = None;
                        self.emit(EventKind::RunFinished {
                            outcome: *outcome,
                            cycles: *cycles,
                        });
                    }
                    Err(e) => {
                        info!(error = %e, "Run finished with cycles missing; fetching them.");
                        self.finish = Some((*outcome, *cycles));
                        self.need_fetch = true;
                    }
                }
            }
            Event::Cycle(data) => self.on_cycle(data, text).await,
        }
    }

    async fn on_cycle(&mut self, data: &CycleData, text: &str) {
        let Some(tracker) = &mut self.tracker else {
            self.reject(text, "cycle data with no run tracked".into());
            return;
        };
        match tracker.observe(&Event::Cycle(data.clone())) {
            Ok(Tracked::Accepted {
                cycle,
                cycle_complete,
            }) => {
                self.pending.push(data.clone());
                if !cycle_complete {
                    return;
                }
                let lines = std::mem::take(&mut self.pending);
                match self.sink.store_cycle(cycle, &lines).await {
                    Ok(()) => self.emit(EventKind::CycleStored { cycle }),
                    Err(e) => {
                        warn!(cycle, error = %e, "Cycle sink failed; the cycle will be fetched again.");
                        // Step the tracker back: the cycle is not ours until stored.
                        if let (Some(wells), Some(channels)) = (self.wells, &self.channels) {
                            self.tracker = Some(
                                RunTracker::new(wells, channels.clone())
                                    .resume_after(cycle.saturating_sub(1)),
                            );
                        }
                        self.need_fetch = true;
                        self.emit(EventKind::SinkFailed {
                            cycle,
                            reason: e.to_string(),
                        });
                    }
                }
            }
            Ok(_) => {}
            Err(error) => {
                if matches!(error, TrackError::Gap { .. }) {
                    self.need_fetch = true;
                }
                self.reject(text, error.to_string());
            }
        }
    }
}
