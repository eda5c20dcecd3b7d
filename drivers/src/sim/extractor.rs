//! A simulated extractor: a Modbus server laid out by a register-map profile.
//!
//! It runs a protocol's steps in accelerated time (a whole run takes
//! [`SimConfig::run_time`] of real time while reporting
//! [`SimConfig::nominal_seconds`] as its length), answers over Modbus TCP or
//! RTU (one server may host several unit ids, as an RS-485 bus does), and
//! injects the faults real instruments show: exception replies, no answer,
//! late answers, dropped connections, a device error mid-run and a progress
//! value that stops moving.
//!
//! Time is read when a request arrives (no background task), so the
//! simulator is idle between polls and deterministic for a given sequence of
//! request times.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use pcrd_protocol::extractor::{
    DeviceError, ExtractorCommand, ExtractorState, ExtractorStatus, Profile, Table,
};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_modbus::server::Service;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};
use tracing::{Instrument, debug};

/// How the simulated instrument behaves when nothing goes wrong.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Text in the identification registers.
    pub model: String,
    pub firmware: f64,
    /// Steps in every protocol.
    pub steps: u32,
    /// Real time a whole run takes (accelerated).
    pub run_time: Duration,
    /// Length of a run as the instrument reports it (remaining time), s.
    pub nominal_seconds: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            model: "PCRD-SIM-X96".into(),
            firmware: 1.23,
            steps: 6,
            run_time: Duration::from_secs(2),
            // A typical 96-well magnetic-bead extraction: ~30 minutes.
            nominal_seconds: 1800.0,
        }
    }
}

/// A fault to inject. Request-level faults apply to the next `count`
/// requests to that unit.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// Answer with this Modbus exception code.
    Exception { code: u8, count: u32 },
    /// Do not answer. With `apply_writes`, writes still take effect (the
    /// reply is what gets lost); without, the request is lost too.
    NoAnswer { count: u32, apply_writes: bool },
    /// Answer, but only after `delay`.
    Late { delay: Duration, count: u32 },
    /// The next write that reaches the command register gets no answer.
    /// With `apply`, the device still acts on it (the reply is lost); without,
    /// the write is lost on the way in.
    NoAnswerToCommand { apply: bool },
    /// The device fails with `code` when progress reaches `at_percent`.
    ErrorAt { at_percent: f64, code: u16 },
    /// Progress stops at `at_percent`; the state stays "running".
    StuckAt { at_percent: f64 },
    /// The progress register reads this raw value (e.g. 140 % ×10) from now
    /// on: a broken device the driver must flag.
    RawProgress { raw: u16 },
}

/// One simulated device.
#[derive(Debug)]
struct Device {
    profile: Arc<Profile>,
    config: SimConfig,
    state: ExtractorState,
    protocol: u16,
    barcode: String,
    error: Option<u32>,
    /// Run time accumulated while running.
    elapsed: Duration,
    last_tick: Option<Instant>,
    argument: u16,
    command_barcode: Vec<u16>,
    faults: Vec<Fault>,
    /// Every command the device acted on, in order.
    commands: Vec<ExtractorCommand>,
    /// Writes that reached the command register, acted on or not.
    command_writes: u32,
    requests: u64,
}

/// What the service does with one request.
struct Reply {
    result: Result<Option<Response>, ExceptionCode>,
    delay: Option<Duration>,
}

impl Device {
    fn new(profile: Arc<Profile>, config: SimConfig) -> Self {
        let registers = usize::from(profile.commands.barcode.registers);
        Device {
            profile,
            config,
            state: ExtractorState::Idle,
            protocol: 0,
            barcode: String::new(),
            error: None,
            elapsed: Duration::ZERO,
            last_tick: None,
            argument: 0,
            command_barcode: vec![0; registers],
            faults: Vec::new(),
            commands: Vec::new(),
            command_writes: 0,
            requests: 0,
        }
    }

    fn fraction(&self) -> f64 {
        let total = self.config.run_time.as_secs_f64();
        if total <= 0.0 {
            1.0
        } else {
            (self.elapsed.as_secs_f64() / total).min(1.0)
        }
    }

    /// Moves the run forward to `now`.
    fn advance(&mut self, now: Instant) {
        let last = self.last_tick.replace(now);
        if self.state != ExtractorState::Running {
            return;
        }
        let Some(last) = last else { return };
        self.elapsed += now.saturating_duration_since(last);
        for fault in &self.faults {
            match fault {
                Fault::StuckAt { at_percent } => {
                    let cap = self
                        .config
                        .run_time
                        .mul_f64((at_percent / 100.0).clamp(0.0, 1.0));
                    self.elapsed = self.elapsed.min(cap);
                }
                Fault::ErrorAt { at_percent, code } if self.fraction() * 100.0 >= *at_percent => {
                    self.state = ExtractorState::Error;
                    self.error = Some(u32::from(*code));
                }
                _ => {}
            }
        }
        if self.state == ExtractorState::Error {
            self.faults.retain(|f| !matches!(f, Fault::ErrorAt { .. }));
            return;
        }
        if self.fraction() >= 1.0 {
            self.state = ExtractorState::Completed;
        }
    }

    fn status(&self) -> ExtractorStatus {
        let fraction = self.fraction();
        let in_run = !matches!(self.state, ExtractorState::Idle | ExtractorState::Loaded);
        let steps = self.config.steps.max(1);
        let step = if in_run {
            ((fraction * f64::from(steps)).floor() as u32 + 1).min(steps)
        } else {
            0
        };
        ExtractorStatus {
            state: self.state,
            step,
            progress: if in_run { fraction * 100.0 } else { 0.0 },
            remaining_s: if in_run {
                self.config.nominal_seconds * (1.0 - fraction)
            } else {
                0.0
            },
            // Lysis at 56 °C with a degree per step, room temperature idle.
            temperature_c: if self.state.in_run() {
                55.0 + f64::from(step)
            } else {
                25.0
            },
            error: self.error.map(|code| DeviceError { code, reason: None }),
            protocol: u32::from(self.protocol),
            barcode: self.barcode.clone(),
            anomalies: Vec::new(),
        }
    }

    /// The register at a 0-based address, if the device maps it.
    fn register(&self, address: u16, table: Table) -> Option<u16> {
        let p = &self.profile;
        if table != p.table && table == Table::Input {
            return None;
        }
        let (start, count) = p.status_block();
        if (start..start.saturating_add(count)).contains(&address) {
            let mut block = p.encode_status(&self.status());
            for fault in &self.faults {
                if let Fault::RawProgress { raw } = fault {
                    let at = usize::from(p.status.progress.address - start);
                    if let Some(slot) = block.get_mut(at) {
                        *slot = *raw;
                    }
                }
            }
            return block.get(usize::from(address - start)).copied();
        }
        let (start, count) = p.identify_block();
        if (start..start.saturating_add(count)).contains(&address) {
            let block = p.encode_identity(&self.config.model, self.config.firmware);
            return block.get(usize::from(address - start)).copied();
        }
        let c = &p.commands;
        if address == c.register {
            return Some(0);
        }
        if address == c.argument {
            return Some(self.argument);
        }
        let b = &c.barcode;
        if (b.address..b.address.saturating_add(b.registers)).contains(&address) {
            return self
                .command_barcode
                .get(usize::from(address - b.address))
                .copied();
        }
        None
    }

    fn read(&self, table: Table, address: u16, count: u16) -> Result<Vec<u16>, ExceptionCode> {
        // Modbus Application Protocol §6.3: quantity 1–125, else exception 03.
        if !(1..=125).contains(&count) {
            return Err(ExceptionCode::IllegalDataValue);
        }
        (0..count)
            .map(|i| {
                address
                    .checked_add(i)
                    .and_then(|a| self.register(a, table))
                    .ok_or(ExceptionCode::IllegalDataAddress)
            })
            .collect()
    }

    fn write(&mut self, address: u16, values: &[u16]) -> Result<(), ExceptionCode> {
        let c = self.profile.commands.clone();
        for (i, value) in values.iter().enumerate() {
            let a = address
                .checked_add(u16::try_from(i).map_err(|_| ExceptionCode::IllegalDataAddress)?)
                .ok_or(ExceptionCode::IllegalDataAddress)?;
            if a == c.argument {
                self.argument = *value;
            } else if (c.barcode.address..c.barcode.address + c.barcode.registers).contains(&a) {
                self.command_barcode[usize::from(a - c.barcode.address)] = *value;
            } else if a == c.register {
                self.execute(*value)?;
            } else {
                return Err(ExceptionCode::IllegalDataAddress);
            }
        }
        Ok(())
    }

    /// Acts on a command code; a command the state does not allow is
    /// refused with exception 03 (protocols.md §4: "rejected value").
    fn execute(&mut self, code: u16) -> Result<(), ExceptionCode> {
        use ExtractorState as S;
        let command = self
            .profile
            .decode_command(code, self.argument, &self.command_barcode)
            .ok_or(ExceptionCode::IllegalDataValue)?;
        let ok = match &command {
            ExtractorCommand::LoadProtocol(n) => {
                let ok = *n != 0
                    && matches!(self.state, S::Idle | S::Loaded | S::Completed | S::Aborted);
                if ok {
                    self.protocol = *n;
                    self.state = S::Loaded;
                    self.barcode.clear();
                    self.elapsed = Duration::ZERO;
                }
                ok
            }
            ExtractorCommand::Start { barcode } => {
                let ok = self.protocol != 0
                    && !barcode.is_empty()
                    && matches!(self.state, S::Loaded | S::Completed | S::Aborted);
                if ok {
                    self.barcode = barcode.clone();
                    self.state = S::Running;
                    self.elapsed = Duration::ZERO;
                    self.error = None;
                }
                ok
            }
            ExtractorCommand::Pause => {
                let ok = matches!(self.state, S::Running | S::Paused);
                if ok {
                    self.state = S::Paused;
                }
                ok
            }
            ExtractorCommand::Resume => {
                let ok = matches!(self.state, S::Running | S::Paused);
                if ok {
                    self.state = S::Running;
                }
                ok
            }
            ExtractorCommand::Abort => {
                let ok = matches!(self.state, S::Running | S::Paused | S::Error | S::Aborted);
                if ok {
                    self.state = S::Aborted;
                }
                ok
            }
            ExtractorCommand::AcknowledgeError => {
                if self.state == S::Error {
                    self.state = S::Aborted;
                }
                self.error = None;
                true
            }
        };
        if !ok {
            return Err(ExceptionCode::IllegalDataValue);
        }
        self.commands.push(command);
        Ok(())
    }

    /// One request, with the injected faults applied.
    fn handle(&mut self, request: &Request<'_>, now: Instant) -> Reply {
        self.requests += 1;
        self.advance(now);
        let mut delay = None;
        let mut answer = true;
        let mut apply = true;
        let mut exception = None;
        for fault in &mut self.faults {
            match fault {
                Fault::Exception { code, count } if *count > 0 => {
                    *count -= 1;
                    exception = Some(ExceptionCode::new(*code));
                }
                Fault::NoAnswer {
                    count,
                    apply_writes,
                } if *count > 0 => {
                    *count -= 1;
                    answer = false;
                    apply = *apply_writes;
                }
                Fault::Late { delay: d, count } if *count > 0 => {
                    *count -= 1;
                    delay = Some(*d);
                }
                _ => {}
            }
        }
        if touches_command_register(request, self.profile.commands.register) {
            self.command_writes += 1;
            let lost = self
                .faults
                .iter()
                .position(|f| matches!(f, Fault::NoAnswerToCommand { .. }));
            if let Some(i) = lost
                && let Fault::NoAnswerToCommand { apply: a } = self.faults.remove(i)
            {
                answer = false;
                apply = a;
            }
        }
        self.faults.retain(|f| match f {
            Fault::Exception { count, .. }
            | Fault::NoAnswer { count, .. }
            | Fault::Late { count, .. } => *count > 0,
            _ => true,
        });
        if let Some(code) = exception {
            return Reply {
                result: Err(code),
                delay,
            };
        }
        let result = if apply { self.apply(request) } else { Ok(None) };
        Reply {
            result: if answer { result } else { Ok(None) },
            delay,
        }
    }

    fn apply(&mut self, request: &Request<'_>) -> Result<Option<Response>, ExceptionCode> {
        Ok(Some(match request {
            Request::ReadHoldingRegisters(a, n) => {
                Response::ReadHoldingRegisters(self.read(Table::Holding, *a, *n)?)
            }
            Request::ReadInputRegisters(a, n) => {
                Response::ReadInputRegisters(self.read(Table::Input, *a, *n)?)
            }
            Request::WriteSingleRegister(a, v) => {
                self.write(*a, &[*v])?;
                Response::WriteSingleRegister(*a, *v)
            }
            Request::WriteMultipleRegisters(a, values) => {
                self.write(*a, values)?;
                let n = u16::try_from(values.len()).map_err(|_| ExceptionCode::IllegalDataValue)?;
                Response::WriteMultipleRegisters(*a, n)
            }
            _ => return Err(ExceptionCode::IllegalFunction),
        }))
    }
}

fn touches_command_register(request: &Request<'_>, register: u16) -> bool {
    match request {
        Request::WriteSingleRegister(a, _) => *a == register,
        Request::WriteMultipleRegisters(a, values) => {
            (u32::from(*a)..u32::from(*a) + values.len() as u32).contains(&u32::from(register))
        }
        _ => false,
    }
}

/// A set of simulated extractors (unit ids), shareable between servers and
/// the test that steers them.
#[derive(Clone, Debug)]
pub struct Simulator {
    devices: Arc<BTreeMap<u8, Mutex<Device>>>,
}

impl Simulator {
    /// Extractors at `units`, all laid out by `profile`.
    pub fn new(profile: Arc<Profile>, units: &[u8], config: SimConfig) -> Self {
        let devices = units
            .iter()
            .map(|u| (*u, Mutex::new(Device::new(profile.clone(), config.clone()))))
            .collect();
        Simulator {
            devices: Arc::new(devices),
        }
    }

    /// # Panics
    /// If the simulator has no such unit: a mistake in the test using it.
    fn device(&self, unit: u8) -> MutexGuard<'_, Device> {
        let device = self
            .devices
            .get(&unit)
            .unwrap_or_else(|| panic!("the simulator has no unit {unit}"));
        // A panic while holding the lock can only come from a bug in this
        // file; the state is still usable for the test that reports it.
        device.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a fault to `unit`.
    pub fn inject(&self, unit: u8, fault: Fault) {
        self.device(unit).faults.push(fault);
    }

    /// Removes every fault from `unit`.
    pub fn clear_faults(&self, unit: u8) {
        self.device(unit).faults.clear();
    }

    /// Commands `unit` acted on, in order.
    pub fn commands(&self, unit: u8) -> Vec<ExtractorCommand> {
        self.device(unit).commands.clone()
    }

    /// Writes to `unit`'s command register, acted on or not: how a test
    /// sees that a command was not resent.
    pub fn command_writes(&self, unit: u8) -> u32 {
        self.device(unit).command_writes
    }

    /// Requests `unit` received (answered or not).
    pub fn requests(&self, unit: u8) -> u64 {
        self.device(unit).requests
    }

    /// Acts on `command` as if an operator pressed it on `unit`'s front
    /// panel (no Modbus involved): how a test starts a run the daemon did not
    /// start. Refused (exception 03's meaning) when the state does not allow
    /// it.
    pub fn operate(&self, unit: u8, command: ExtractorCommand) -> Result<(), ExceptionCode> {
        let mut device = self.device(unit);
        device.advance(Instant::now());
        let p = device.profile.clone();
        let writes = p
            .encode_command(&command)
            .map_err(|_| ExceptionCode::IllegalDataValue)?;
        for w in writes {
            device.write(w.address, &w.values)?;
        }
        Ok(())
    }

    /// The device's own view of its state, now.
    pub fn status(&self, unit: u8) -> ExtractorStatus {
        let mut device = self.device(unit);
        device.advance(Instant::now());
        device.status()
    }

    fn service(&self) -> SimService {
        SimService { sim: self.clone() }
    }

    /// Serves Modbus TCP on 127.0.0.1 with an OS-chosen port.
    pub async fn serve_tcp(&self) -> std::io::Result<TcpSim> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = Arc::new(Mutex::new(Some(self.spawn_tcp(listener))));
        Ok(TcpSim {
            sim: self.clone(),
            addr,
            task,
        })
    }

    fn spawn_tcp(&self, listener: tokio::net::TcpListener) -> JoinHandle<()> {
        let sim = self.clone();
        let span = tracing::info_span!("sim_extractor", transport = "tcp");
        tokio::spawn(
            async move {
                let server = tokio_modbus::server::tcp::Server::new(listener);
                let on_connected = |stream, _addr| {
                    let service = sim.service();
                    async move { Ok(Some((service, stream))) }
                };
                let on_error = |e| debug!(error = %e, "Simulator connection ended.");
                if let Err(e) = server.serve(&on_connected, on_error).await {
                    debug!(error = %e, "Simulator TCP server stopped.");
                }
            }
            .instrument(span),
        )
    }

    /// Serves Modbus RTU on `port` (one end of `SerialStream::pair()`, or a
    /// real port), for every unit of this simulator. Runs until the task is
    /// aborted or the port fails.
    pub fn serve_rtu(&self, port: tokio_serial::SerialStream) -> JoinHandle<std::io::Result<()>> {
        let server = tokio_modbus::server::rtu::Server::new(port);
        let service = self.service();
        let span = tracing::info_span!("sim_extractor", transport = "rtu");
        tokio::spawn(server.serve_forever(service).instrument(span))
    }
}

/// A running TCP simulator.
#[derive(Debug)]
pub struct TcpSim {
    sim: Simulator,
    /// Where it listens (127.0.0.1, OS-chosen port).
    pub addr: SocketAddr,
    task: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl TcpSim {
    /// Closes every connection and the listener, so connects are refused,
    /// then listens again on the same address after `down`. Returns when the
    /// connections are closed.
    pub async fn disconnect_for(&self, down: Duration) {
        self.go_down().await;
        let sim = self.sim.clone();
        let addr = self.addr;
        let slot = self.task.clone();
        tokio::spawn(async move {
            tokio::time::sleep(down).await;
            if let Err(e) = listen_again(&sim, addr, &slot).await {
                debug!(error = %e, "Simulator could not listen again.");
            }
        });
    }

    /// Closes every connection and the listener, so connects are refused,
    /// until [`TcpSim::come_back`]. Returns when the connections are closed.
    pub async fn go_down(&self) {
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            task.abort();
            // The server's connection tasks are cancelled when it is dropped.
            let _ = task.await;
        }
    }

    /// Listens again on the same address after [`TcpSim::go_down`]; the
    /// device's state (a run in progress) went on meanwhile.
    pub async fn come_back(&self) -> std::io::Result<()> {
        listen_again(&self.sim, self.addr, &self.task).await
    }
}

async fn listen_again(
    sim: &Simulator,
    addr: SocketAddr,
    slot: &Mutex<Option<JoinHandle<()>>>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let task = sim.spawn_tcp(listener);
    if let Some(old) = slot.lock().unwrap_or_else(|p| p.into_inner()).replace(task) {
        old.abort();
    }
    Ok(())
}

impl Drop for TcpSim {
    fn drop(&mut self) {
        if let Some(task) = self.task.lock().unwrap_or_else(|p| p.into_inner()).take() {
            task.abort();
        }
    }
}

/// The tokio-modbus service: routes by unit id; a unit the bus does not
/// have stays silent, as on a real RS-485 line.
#[derive(Debug)]
struct SimService {
    sim: Simulator,
}

type ReplyFuture = Pin<Box<dyn Future<Output = Result<Option<Response>, ExceptionCode>> + Send>>;

impl Service for SimService {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = ReplyFuture;

    fn call(&self, request: Self::Request) -> Self::Future {
        let Some(device) = self.sim.devices.get(&request.slave) else {
            return Box::pin(std::future::ready(Ok(None)));
        };
        let reply = device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .handle(&request.request, Instant::now());
        Box::pin(async move {
            if let Some(delay) = reply.delay {
                tokio::time::sleep(delay).await;
            }
            reply.result
        })
    }
}
