//! A simulated real-time PCR cycler speaking pcrd's reference dialect
//! (`pcrd-ref-1`, docs/cycler-protocol.md) over TCP on 127.0.0.1 or a
//! pseudo-terminal.
//!
//! It runs the loaded thermal protocol in accelerated time (one stage cycle
//! every [`CyclerSimConfig::cycle_time`]), and at every read step sends one
//! `!CYCLE` line per channel with a reading for every well, from a
//! [`PlateScenario`]: per well and channel a true Ct (or none), efficiency,
//! baseline level and drift, noise and plateau, through
//! [`CurveModel`]. It keeps every cycle for `DATA?`, and keeps running while
//! no one is connected, as an instrument does when its cable is pulled.
//!
//! Faults ([`CyclerFault`]): the lid opening or the block overheating
//! mid-run, garbage bytes on the line, a `!CYCLE` line not sent, a command
//! whose reply is lost, and a disconnect ([`CyclerSim::disconnect_for`]).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use pcrd_protocol::analysis::model::{CurveModel, NoiseRng};
use pcrd_protocol::cycler::{
    Command, CycleData, DeviceError, Dialect, Event, FaultKind, LidState, LineDecoder, Operation,
    Outcome, RunState, Status, ThermalProtocol, encode_error, encode_event, encode_reply,
};
use pcrd_protocol::domain::PlateFormat;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tracing::debug;

/// Fixed threshold (on the baseline-subtracted curve) at which a
/// [`WellCurve::ct`] is the curve's true Ct.
pub const REFERENCE_THRESHOLD: f64 = 100.0;

/// One well and channel of the scenario.
#[derive(Clone, Debug, PartialEq)]
pub struct WellCurve {
    /// True Ct at [`REFERENCE_THRESHOLD`]; `None` for a negative.
    pub ct: Option<f64>,
    /// Per-cycle efficiency (2.0 is perfect doubling).
    pub efficiency: f64,
    /// Background fluorescence.
    pub baseline: f64,
    /// Background change per cycle.
    pub drift: f64,
    /// Plateau height above the background.
    pub plateau: f64,
    /// Reading noise (standard deviation).
    pub noise_sd: f64,
    /// Noise seed.
    pub seed: u64,
}

impl WellCurve {
    /// The curve's readings for `cycles` data cycles.
    pub fn readings(&self, cycles: usize) -> Vec<f64> {
        let slope = 1.0 / self.efficiency.ln();
        let (amplitude, c_half) = match self.ct {
            // crossing_cycle(T) = c_half - slope * ln(A/T - 1) = ct.
            Some(ct) => (
                self.plateau,
                ct + slope * (self.plateau / REFERENCE_THRESHOLD - 1.0).ln(),
            ),
            None => (0.0, 0.0),
        };
        CurveModel {
            cycles,
            baseline: self.baseline,
            drift: self.drift,
            amplitude,
            c_half,
            slope,
            noise_sd: self.noise_sd,
            seed: self.seed,
            ceiling: Some(65_535.0),
            ..CurveModel::default()
        }
        .readings()
    }
}

/// What each well holds in the scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WellRole {
    /// A patient sample.
    Sample,
    /// Positive control: every target positive.
    PositiveControl,
    /// No-template control: every channel negative.
    NoTemplateControl,
}

/// Per well (column-major) and channel, what the simulated plate holds.
#[derive(Clone, Debug, PartialEq)]
pub struct PlateScenario {
    /// Role of each well, column-major.
    pub roles: Vec<WellRole>,
    /// `curves[well][channel]`, channels in the protocol's order.
    pub curves: Vec<Vec<WellCurve>>,
}

impl PlateScenario {
    /// A realistic plate: A1 positive control, B1 no-template control, the rest
    /// samples. The last channel is the internal control, positive (Ct 24–30)
    /// in every sample and the positive control; in the other channels about
    /// one sample in three is positive, with Cts spread over 15–38.
    pub fn standard(format: PlateFormat, channels: usize, seed: u64) -> PlateScenario {
        let mut rng = NoiseRng::new(seed);
        let wells = format.well_count();
        let mut roles = Vec::with_capacity(wells);
        let mut curves = Vec::with_capacity(wells);
        for well in 0..wells {
            let role = match well {
                0 => WellRole::PositiveControl,
                1 => WellRole::NoTemplateControl,
                _ => WellRole::Sample,
            };
            let sample_positive = well % 3 == 2;
            let mut row = Vec::with_capacity(channels);
            for channel in 0..channels {
                let internal = channel + 1 == channels;
                let ct = match role {
                    WellRole::NoTemplateControl => None,
                    WellRole::PositiveControl => Some(28.0),
                    WellRole::Sample if internal => Some(rng.range(24.0, 30.0)),
                    WellRole::Sample if sample_positive => Some(rng.range(15.0, 38.0)),
                    WellRole::Sample => None,
                };
                row.push(WellCurve {
                    ct,
                    efficiency: rng.range(1.85, 2.0),
                    baseline: rng.range(1_000.0, 3_000.0),
                    drift: rng.range(-2.0, 2.0),
                    plateau: rng.range(1_500.0, 4_000.0),
                    noise_sd: 3.0,
                    seed: rng.next_u64(),
                });
            }
            roles.push(role);
            curves.push(row);
        }
        PlateScenario { roles, curves }
    }
}

/// How the simulated cycler behaves.
#[derive(Clone, Debug)]
pub struct CyclerSimConfig {
    /// Real time of one cycle of any stage (accelerated).
    pub cycle_time: Duration,
    /// The `*IDN?` reply.
    pub identity: String,
    /// Scenario seed, used when no scenario is set.
    pub seed: u64,
}

impl Default for CyclerSimConfig {
    fn default() -> Self {
        CyclerSimConfig {
            cycle_time: Duration::from_millis(20),
            identity: "pcrd,SIM-96,SN0001,0.1.0".into(),
            seed: 1,
        }
    }
}

/// A fault to inject.
#[derive(Clone, Debug, PartialEq)]
pub enum CyclerFault {
    /// The lid opens when data cycle `at_cycle` would be read: `!FAULT LID_OPEN`,
    /// the run stops in state ERROR.
    LidOpensAt { at_cycle: u32 },
    /// The block overheats at data cycle `at_cycle`: `!FAULT BLOCK_OVERTEMP`, the
    /// run stops in state ERROR.
    OverTemperatureAt { at_cycle: u32 },
    /// These bytes are written before the lines of data cycle `at_cycle`.
    GarbageAt { at_cycle: u32, bytes: Vec<u8> },
    /// The `!CYCLE` line of data cycle `at_cycle` and channel index `channel`
    /// is not sent (it is kept for `DATA?`).
    SkipLine { at_cycle: u32, channel: usize },
    /// The next command of this kind is carried out but its reply is lost.
    NoReplyTo(Operation),
}

#[derive(Debug)]
struct Instrument {
    config: CyclerSimConfig,
    dialect: Dialect,
    scenario: Option<PlateScenario>,
    format: Option<PlateFormat>,
    protocol: Option<ThermalProtocol>,
    state: RunState,
    lid: LidState,
    stage: u32,
    stage_cycle: u32,
    /// Data cycles read so far; `history[c - 1][channel]` are the readings.
    history: Vec<Vec<Vec<f64>>>,
    /// `readings[channel][well]`, every data cycle of the run.
    readings: Vec<Vec<Vec<f64>>>,
    faults: Vec<CyclerFault>,
    errors: Vec<DeviceError>,
    out: Option<mpsc::UnboundedSender<Vec<u8>>>,
    commands: Vec<Command>,
}

impl Instrument {
    fn send(&self, bytes: Vec<u8>) {
        if let Some(out) = &self.out {
            let _ = out.send(bytes);
        }
    }

    fn event(&self, event: &Event) {
        if let Ok(line) = encode_event(event, &self.dialect) {
            self.send(line.to_wire());
        }
    }

    fn status(&self) -> Status {
        let block_c = match (&self.protocol, self.state) {
            (Some(p), RunState::Running) => p
                .stages
                .get(self.stage.saturating_sub(1) as usize)
                .and_then(|s| s.steps.last())
                .map_or(25.0, |s| s.temperature_c),
            _ => 25.0,
        };
        Status {
            state: self.state,
            stage: if self.state == RunState::Running {
                self.stage
            } else {
                0
            },
            cycle: self.history.len() as u32,
            lid: self.lid,
            block_c,
        }
    }

    fn cycle_line(&self, cycle: u32, channel: usize) -> Option<Vec<u8>> {
        let protocol = self.protocol.as_ref()?;
        let values = self.history.get(cycle as usize - 1)?.get(channel)?.clone();
        let event = Event::Cycle(CycleData {
            cycle,
            channel: protocol.channels.get(channel)?.clone(),
            values,
        });
        encode_event(&event, &self.dialect)
            .ok()
            .map(|l| l.to_wire())
    }

    fn take_fault(&mut self, pred: impl Fn(&CyclerFault) -> bool) -> Option<CyclerFault> {
        let index = self.faults.iter().position(pred)?;
        Some(self.faults.remove(index))
    }

    fn error(&mut self, code: i32, text: &str) -> Vec<u8> {
        let error = DeviceError {
            code,
            text: text.to_owned(),
        };
        let line = encode_error(&error, &self.dialect).map(|l| l.to_wire());
        self.errors.push(error);
        line.unwrap_or_default()
    }

    /// Carries out one command line and returns the reply (empty when lost).
    fn handle(&mut self, text: &str) -> Vec<u8> {
        let command = match Command::parse(text, &self.dialect) {
            Ok(c) => c,
            Err(e) => return self.error(-100, &format!("Command error: {e}")),
        };
        self.commands.push(command.clone());
        let op = command.operation();
        let ack = encode_reply("OK", &self.dialect)
            .map(|l| l.to_wire())
            .unwrap_or_default();
        let reply: Vec<u8> = match command {
            Command::Identify => encode_reply(&self.config.identity, &self.dialect)
                .map(|l| l.to_wire())
                .unwrap_or_default(),
            Command::Status => encode_reply(&self.status().encode(&self.dialect), &self.dialect)
                .map(|l| l.to_wire())
                .unwrap_or_default(),
            Command::OperationComplete => encode_reply("1", &self.dialect)
                .map(|l| l.to_wire())
                .unwrap_or_default(),
            Command::NextError => {
                let text = if self.errors.is_empty() {
                    "0,\"No error\"".to_owned()
                } else {
                    self.errors.remove(0).encode()
                };
                encode_reply(&text, &self.dialect)
                    .map(|l| l.to_wire())
                    .unwrap_or_default()
            }
            Command::ClearStatus => {
                self.errors.clear();
                ack.clone()
            }
            Command::Reset | Command::Abort => {
                if self.state == RunState::Running {
                    self.state = RunState::Aborted;
                    self.event(&Event::RunFinished {
                        outcome: Outcome::Aborted,
                        cycles: self.history.len() as u32,
                    });
                }
                if op == Operation::Reset {
                    self.state = RunState::Idle;
                    self.errors.clear();
                    self.format = None;
                    self.protocol = None;
                }
                ack.clone()
            }
            Command::LidOpen | Command::LidClose if self.state == RunState::Running => {
                self.error(-221, "Settings conflict; run in progress")
            }
            Command::LidOpen => {
                self.lid = LidState::Open;
                ack.clone()
            }
            Command::LidClose => {
                self.lid = LidState::Closed;
                ack.clone()
            }
            Command::LoadPlate(_) | Command::LoadProtocol(_) if self.state == RunState::Running => {
                self.error(-221, "Settings conflict; run in progress")
            }
            Command::LoadPlate(map) => {
                self.format = Some(map.format);
                self.loaded_if_ready();
                ack.clone()
            }
            Command::LoadProtocol(protocol) => {
                self.protocol = Some(protocol);
                self.loaded_if_ready();
                ack.clone()
            }
            Command::Start => self.start(),
            Command::FetchData(range) => {
                let last = range.last.min(self.history.len() as u32);
                let channels = self.protocol.as_ref().map_or(0, |p| p.channels.len());
                let mut sent = "0,0".to_owned();
                if range.first <= last {
                    for cycle in range.first..=last {
                        for channel in 0..channels {
                            if let Some(line) = self.cycle_line(cycle, channel) {
                                self.send(line);
                            }
                        }
                    }
                    sent = format!("{},{last}", range.first);
                }
                encode_reply(&sent, &self.dialect)
                    .map(|l| l.to_wire())
                    .unwrap_or_default()
            }
        };
        if self
            .take_fault(|f| *f == CyclerFault::NoReplyTo(op))
            .is_some()
        {
            debug!(?op, "Simulated cycler drops its reply.");
            return Vec::new();
        }
        reply
    }

    fn loaded_if_ready(&mut self) {
        if self.format.is_some() && self.protocol.is_some() && self.state != RunState::Running {
            self.state = RunState::Loaded;
        }
    }

    fn start(&mut self) -> Vec<u8> {
        let (Some(format), Some(protocol)) = (self.format, self.protocol.clone()) else {
            return self.error(-221, "Settings conflict; no plate map or protocol");
        };
        if self.state == RunState::Running {
            return self.error(-221, "Settings conflict; run in progress");
        }
        if self.lid != LidState::Closed {
            return self.error(-221, "Settings conflict; lid open");
        }
        let channels = protocol.channels.len();
        let scenario = match &self.scenario {
            Some(s) if s.curves.len() == format.well_count() => s.clone(),
            _ => PlateScenario::standard(format, channels, self.config.seed),
        };
        let cycles = protocol.data_cycles() as usize;
        self.readings = (0..channels)
            .map(|ch| {
                scenario
                    .curves
                    .iter()
                    .map(|well| {
                        well.get(ch)
                            .map_or_else(|| vec![0.0; cycles], |c| c.readings(cycles))
                    })
                    .collect()
            })
            .collect();
        self.history.clear();
        self.state = RunState::Running;
        self.stage = 1;
        self.stage_cycle = 0;
        let reply = encode_reply("OK", &self.dialect)
            .map(|l| l.to_wire())
            .unwrap_or_default();
        // The reply goes first, then the events (a real instrument acknowledges
        // the command before it starts to move).
        if self
            .take_fault(|f| *f == CyclerFault::NoReplyTo(Operation::Start))
            .is_some()
        {
            debug!("Simulated cycler drops its reply to RUN:START.");
        } else {
            self.send(reply);
        }
        self.event(&Event::RunStarted {
            protocol: protocol.name.clone(),
        });
        self.event(&Event::StageChanged { stage: 1 });
        Vec::new()
    }

    /// One stage cycle of the run.
    fn tick(&mut self) {
        if self.state != RunState::Running {
            return;
        }
        let Some(protocol) = self.protocol.clone() else {
            return;
        };
        let Some(stage) = protocol.stages.get(self.stage as usize - 1) else {
            return;
        };
        self.stage_cycle += 1;
        if stage.steps.iter().any(|s| s.read) {
            let cycle = self.history.len() as u32 + 1;
            if let Some(CyclerFault::LidOpensAt { .. } | CyclerFault::OverTemperatureAt { .. }) =
                self.fault_at(cycle)
            {
                return;
            }
            if let Some(CyclerFault::GarbageAt { bytes, .. }) = self.take_fault(
                |f| matches!(f, CyclerFault::GarbageAt { at_cycle, .. } if *at_cycle == cycle),
            ) {
                self.send(bytes);
            }
            let index = cycle as usize - 1;
            let data: Vec<Vec<f64>> = self
                .readings
                .iter()
                .map(|wells| {
                    wells
                        .iter()
                        .map(|w| w.get(index).copied().unwrap_or(0.0))
                        .collect()
                })
                .collect();
            self.history.push(data);
            for channel in 0..protocol.channels.len() {
                let skip = self
                    .take_fault(|f| {
                        *f == CyclerFault::SkipLine {
                            at_cycle: cycle,
                            channel,
                        }
                    })
                    .is_some();
                if skip {
                    debug!(cycle, channel, "Simulated cycler skips a line.");
                } else if let Some(line) = self.cycle_line(cycle, channel) {
                    self.send(line);
                }
            }
        }
        if self.stage_cycle >= stage.cycles {
            self.stage_cycle = 0;
            self.stage += 1;
            if self.stage as usize > protocol.stages.len() {
                self.state = RunState::Completed;
                self.stage = 0;
                self.event(&Event::RunFinished {
                    outcome: Outcome::Completed,
                    cycles: self.history.len() as u32,
                });
            } else {
                self.event(&Event::StageChanged { stage: self.stage });
            }
        }
    }

    /// A lid or temperature fault due at `cycle`: stops the run.
    fn fault_at(&mut self, cycle: u32) -> Option<CyclerFault> {
        let fault = self.take_fault(|f| match f {
            CyclerFault::LidOpensAt { at_cycle } | CyclerFault::OverTemperatureAt { at_cycle } => {
                *at_cycle == cycle
            }
            _ => false,
        })?;
        let (kind, detail) = match fault {
            CyclerFault::LidOpensAt { .. } => {
                self.lid = LidState::Open;
                (
                    FaultKind::LidOpened,
                    format!("Lid opened during cycle {cycle}"),
                )
            }
            _ => (FaultKind::BlockOverTemperature, "104.2 C".to_owned()),
        };
        self.state = RunState::Error;
        self.event(&Event::Fault { kind, detail });
        Some(fault)
    }
}

#[derive(Debug)]
struct Shared {
    instrument: Mutex<Instrument>,
    /// Wakes the connected session so it hangs up.
    kick: Notify,
    tcp: Mutex<Option<(SocketAddr, JoinHandle<()>)>>,
}

/// A simulated cycler. Cheap to clone; every clone is the same instrument.
#[derive(Clone, Debug)]
pub struct CyclerSim {
    shared: Arc<Shared>,
    ticker: Arc<JoinHandle<()>>,
}

impl CyclerSim {
    /// A cycler, idle, lid closed, running its clock.
    pub fn new(config: CyclerSimConfig) -> CyclerSim {
        let cycle_time = config.cycle_time.max(Duration::from_millis(1));
        let shared = Arc::new(Shared {
            instrument: Mutex::new(Instrument {
                config,
                dialect: Dialect::reference(),
                scenario: None,
                format: None,
                protocol: None,
                state: RunState::Idle,
                lid: LidState::Closed,
                stage: 0,
                stage_cycle: 0,
                history: Vec::new(),
                readings: Vec::new(),
                faults: Vec::new(),
                errors: Vec::new(),
                out: None,
                commands: Vec::new(),
            }),
            kick: Notify::new(),
            tcp: Mutex::new(None),
        });
        let weak = Arc::downgrade(&shared);
        let ticker = tokio::spawn(async move {
            let mut interval = tokio::time::interval(cycle_time);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let Some(shared) = weak.upgrade() else { return };
                lock(&shared.instrument).tick();
            }
        });
        CyclerSim {
            shared,
            ticker: Arc::new(ticker),
        }
    }

    fn instrument(&self) -> MutexGuard<'_, Instrument> {
        lock(&self.shared.instrument)
    }

    /// Uses this plate scenario for the next run (it must have a curve for
    /// every well of the plate map loaded, else a standard one is made).
    pub fn set_scenario(&self, scenario: PlateScenario) {
        self.instrument().scenario = Some(scenario);
    }

    /// The scenario of the next or current run, as [`PlateScenario::standard`]
    /// makes it when none was set.
    pub fn scenario(&self, format: PlateFormat, channels: usize) -> PlateScenario {
        let i = self.instrument();
        i.scenario
            .clone()
            .unwrap_or_else(|| PlateScenario::standard(format, channels, i.config.seed))
    }

    /// Injects a fault.
    pub fn inject(&self, fault: CyclerFault) {
        self.instrument().faults.push(fault);
    }

    /// Writes these bytes on the line now.
    pub fn send_garbage(&self, bytes: &[u8]) {
        self.instrument().send(bytes.to_vec());
    }

    /// Every command received and understood, in order.
    pub fn commands(&self) -> Vec<Command> {
        self.instrument().commands.clone()
    }

    /// The instrument's status now.
    pub fn status(&self) -> Status {
        self.instrument().status()
    }

    /// Data cycles read so far in this run.
    pub fn cycles_read(&self) -> u32 {
        self.instrument().history.len() as u32
    }

    /// Serves on a pseudo-terminal end (or any byte stream), until it ends or
    /// [`CyclerSim::disconnect_for`] hangs up.
    pub fn serve<S>(&self, stream: S) -> JoinHandle<()>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let shared = Arc::clone(&self.shared);
        tokio::spawn(session(shared, stream))
    }

    /// Listens on 127.0.0.1 (a free port), one connection at a time.
    pub async fn serve_tcp(&self) -> std::io::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(accept_loop(Arc::clone(&self.shared), listener));
        *lock(&self.shared.tcp) = Some((addr, task));
        Ok(addr)
    }

    /// Pulls the cable: the connection is closed and (over TCP) no connection is
    /// accepted for `down`; the instrument keeps running and what it sends
    /// meanwhile is lost. A pseudo-terminal session served with
    /// [`CyclerSim::serve`] ends for good (serve a new pair to plug back in).
    pub fn disconnect_for(&self, down: Duration) {
        let listening = lock(&self.shared.tcp).take();
        if let Some((_, task)) = &listening {
            task.abort();
        }
        self.instrument().out = None;
        self.shared.kick.notify_waiters();
        let Some((addr, _)) = listening else { return };
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move {
            tokio::time::sleep(down).await;
            if let Ok(listener) = tokio::net::TcpListener::bind(addr).await {
                let task = tokio::spawn(accept_loop(Arc::clone(&shared), listener));
                *lock(&shared.tcp) = Some((addr, task));
            }
        });
    }
}

impl Drop for CyclerSim {
    fn drop(&mut self) {
        if Arc::strong_count(&self.ticker) == 1 {
            self.ticker.abort();
            if let Some((_, task)) = lock(&self.shared.tcp).take() {
                task.abort();
            }
            self.shared.kick.notify_waiters();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn accept_loop(shared: Arc<Shared>, listener: tokio::net::TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        session(Arc::clone(&shared), stream).await;
    }
}

/// One connection: commands in, replies and events out.
async fn session<S>(shared: Arc<Shared>, stream: S)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    lock(&shared.instrument).out = Some(tx.clone());
    let write = async {
        while let Some(bytes) = rx.recv().await {
            if writer.write_all(&bytes).await.is_err() {
                break;
            }
        }
    };
    let read = async {
        let mut decoder = LineDecoder::default();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            loop {
                match decoder.decode(&mut buf) {
                    Ok(None) => break,
                    Ok(Some(line)) => {
                        let mut i = lock(&shared.instrument);
                        let reply = i.handle(line.as_str());
                        if !reply.is_empty() {
                            i.send(reply);
                        }
                    }
                    Err(e) => {
                        let mut i = lock(&shared.instrument);
                        let reply = i.error(-100, &format!("Command error: {e}"));
                        i.send(reply);
                    }
                }
            }
        }
    };
    tokio::select! {
        () = write => {}
        () = read => {}
        () = shared.kick.notified() => {}
    }
    let mut i = lock(&shared.instrument);
    if i.out.as_ref().is_some_and(|o| o.same_channel(&tx)) {
        i.out = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_standard_plate_has_controls_behaving_as_controls() {
        let plate = PlateScenario::standard(PlateFormat::Wells96, 3, 7);
        assert_eq!(plate.curves.len(), 96);
        assert_eq!(plate.roles[0], WellRole::PositiveControl);
        assert!(plate.curves[0].iter().all(|c| c.ct.is_some()));
        assert_eq!(plate.roles[1], WellRole::NoTemplateControl);
        assert!(plate.curves[1].iter().all(|c| c.ct.is_none()));
        // The internal control (last channel) in every sample.
        for (role, curves) in plate.roles.iter().zip(&plate.curves) {
            if *role == WellRole::Sample {
                assert!(curves[2].ct.is_some_and(|ct| (24.0..30.0).contains(&ct)));
            }
        }
        let positives: Vec<f64> = plate.curves[2..].iter().filter_map(|c| c[0].ct).collect();
        assert!(positives.len() > 20);
        assert!(positives.iter().any(|ct| *ct < 20.0) && positives.iter().any(|ct| *ct > 33.0));
    }

    #[test]
    fn a_positive_crosses_the_reference_threshold_at_its_ct() {
        let curve = WellCurve {
            ct: Some(22.0),
            efficiency: 1.9,
            baseline: 1_500.0,
            drift: 0.0,
            plateau: 3_000.0,
            noise_sd: 0.0,
            seed: 1,
        };
        let readings = curve.readings(45);
        // Between cycles 22 and 23 the amplification passes the threshold.
        assert!(readings[21] - 1_500.0 >= REFERENCE_THRESHOLD - 1e-6);
        assert!(readings[20] - 1_500.0 < REFERENCE_THRESHOLD);
    }
}
