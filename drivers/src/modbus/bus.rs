//! One task per Modbus link. It alone holds the tokio-modbus context, so it
//! alone can drop and rebuild it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pcrd_protocol::extractor::Table;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_modbus::client::{Client, Context, Reader, Writer};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{ExceptionCode, Slave};
use tokio_serial::SerialPortBuilderExt;
use tracing::{Instrument, debug, info, warn};

use super::{ModbusError, exception_meaning};

/// Serial settings, re-exported so configuration code needs no tokio-serial.
pub use tokio_serial::{Parity, StopBits};

/// How to reach the instrument(s).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkConfig {
    /// Modbus TCP (MBAP), one connection.
    Tcp { addr: SocketAddr },
    /// Modbus RTU on a serial port, one task for every unit id on the bus.
    Rtu(SerialConfig),
}

/// Serial line settings. Modbus RTU's default is 8E1 (Modbus over Serial
/// Line v1.02 §2.5.1); many devices run 8N1 or 8N2.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SerialConfig {
    pub path: String,
    pub baud: u32,
    pub parity: tokio_serial::Parity,
    pub stop_bits: tokio_serial::StopBits,
    /// Lock the port against other openers (TIOCEXCL). Tests on a
    /// pseudo-terminal whose other end keeps the slave open turn it off.
    pub exclusive: bool,
}

impl SerialConfig {
    pub fn new(path: impl Into<String>, baud: u32) -> Self {
        SerialConfig {
            path: path.into(),
            baud,
            parity: tokio_serial::Parity::Even,
            stop_bits: tokio_serial::StopBits::One,
            exclusive: true,
        }
    }
}

/// Timing of one link.
#[derive(Clone, Debug)]
pub struct BusConfig {
    /// For logs: the port or address as the operator knows it.
    pub name: String,
    pub link: LinkConfig,
    /// Per call. Device turnaround is typically 5–45 ms, plus ~20 ms through
    /// Ethernet–serial bridges (field-notes §4); 100 ms–1 s is usual
    /// (protocols.md §4, RTU timing).
    pub timeout: Duration,
    /// Wait after dropping a poisoned link before reopening it, so a late
    /// reply has arrived (and is discarded with the old socket, or flushed
    /// from the serial input buffer) before the next request goes out. Set it
    /// to the device's maximum response time.
    pub settle: Duration,
    /// Reconnect backoff: doubles from `backoff_min` up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl BusConfig {
    pub fn new(name: impl Into<String>, link: LinkConfig) -> Self {
        BusConfig {
            name: name.into(),
            link,
            timeout: Duration::from_millis(500),
            settle: Duration::from_millis(500),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// One Modbus request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Read {
        table: Table,
        address: u16,
        count: u16,
    },
    Write {
        address: u16,
        values: Vec<u16>,
    },
}

struct Request {
    unit: u8,
    op: Op,
    reply: oneshot::Sender<Result<Vec<u16>, ModbusError>>,
}

/// Cheap, cloneable access to a bus task. The task stops when the last
/// handle is dropped.
#[derive(Clone, Debug)]
pub struct BusHandle {
    tx: mpsc::Sender<Request>,
    name: Arc<str>,
    stats: Arc<BusStats>,
}

/// What a bus task has done since it started, for /metrics. Relaxed
/// counters: each is read on its own.
#[derive(Debug, Default)]
pub struct BusStats {
    /// Times the link was opened again after it had been open once (after a
    /// poisoned context, a lost socket or port).
    pub reconnects: AtomicU64,
    /// Times the context was dropped after a timeout, a transport error or a
    /// reply that did not match its request.
    pub link_drops: AtomicU64,
    /// Attempts to open the link that failed.
    pub connect_failures: AtomicU64,
}

impl BusHandle {
    /// The bus's name, for logs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Counters of the bus task.
    pub fn stats(&self) -> &BusStats {
        &self.stats
    }

    /// Runs one request on the bus; the bus serialises them.
    pub async fn call(&self, unit: u8, op: Op) -> Result<Vec<u16>, ModbusError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request { unit, op, reply })
            .await
            .map_err(|_| ModbusError::Closed)?;
        rx.await.map_err(|_| ModbusError::Closed)?
    }

    pub async fn read(
        &self,
        unit: u8,
        table: Table,
        address: u16,
        count: u16,
    ) -> Result<Vec<u16>, ModbusError> {
        self.call(
            unit,
            Op::Read {
                table,
                address,
                count,
            },
        )
        .await
    }

    pub async fn write(&self, unit: u8, address: u16, values: Vec<u16>) -> Result<(), ModbusError> {
        self.call(unit, Op::Write { address, values })
            .await
            .map(drop)
    }
}

/// Starts the task that owns the link. It connects on the first request.
pub fn spawn_bus(config: BusConfig) -> BusHandle {
    // A short queue: callers wait their turn rather than pile up requests
    // for a line that carries ~20 per second at 9600 Bd.
    let (tx, rx) = mpsc::channel(32);
    let name: Arc<str> = config.name.clone().into();
    let stats = Arc::new(BusStats::default());
    let span = tracing::info_span!("modbus_bus", bus = %config.name);
    tokio::spawn(run(config, rx, Arc::clone(&stats)).instrument(span));
    BusHandle { tx, name, stats }
}

/// The link's state inside the task.
struct Link {
    config: BusConfig,
    context: Option<Context>,
    /// Set when the last context was dropped after a failure: the next
    /// connect waits `settle` first.
    poisoned: bool,
    /// While connecting is backing off: until when, and why.
    down: Option<(Instant, String)>,
    backoff: Duration,
    /// Whether the link has been open at least once (a later open is a
    /// reconnect).
    opened_before: bool,
    stats: Arc<BusStats>,
}

async fn run(config: BusConfig, mut rx: mpsc::Receiver<Request>, stats: Arc<BusStats>) {
    let backoff = config.backoff_min;
    let mut link = Link {
        config,
        context: None,
        poisoned: false,
        down: None,
        backoff,
        opened_before: false,
        stats,
    };
    while let Some(request) = rx.recv().await {
        if request.reply.is_closed() {
            continue;
        }
        let result = link.serve(request.unit, &request.op).await;
        let _ = request.reply.send(result);
    }
    if let Some(mut context) = link.context.take() {
        let _ = context.disconnect().await;
    }
    debug!("Bus handles dropped; link closed.");
}

impl Link {
    async fn serve(&mut self, unit: u8, op: &Op) -> Result<Vec<u16>, ModbusError> {
        let timeout = self.config.timeout;
        let context = self.connected().await?;
        context.set_slave(Slave(unit));
        let outcome = tokio::time::timeout(timeout, execute(context, op)).await;
        let result = match outcome {
            Err(_) => Err(ModbusError::Timeout(timeout)),
            Ok(Err(tokio_modbus::Error::Transport(e))) => {
                Err(ModbusError::Transport(e.to_string()))
            }
            Ok(Err(tokio_modbus::Error::Protocol(e))) => Err(ModbusError::Mismatch(e.to_string())),
            Ok(Ok(Err(code))) => {
                let code = exception_code(code);
                Err(ModbusError::Exception {
                    code,
                    meaning: exception_meaning(code),
                })
            }
            Ok(Ok(Ok(values))) => match op {
                // A reply with another register count belongs to another
                // request.
                Op::Read { count, .. } if values.len() != usize::from(*count) => {
                    Err(ModbusError::Mismatch(format!(
                        "asked for {count} registers, got {}",
                        values.len()
                    )))
                }
                _ => Ok(values),
            },
        };
        if let Err(e) = &result
            && e.outcome_unknown()
        {
            warn!(unit, error = %e, "Dropping the Modbus link; it will be rebuilt.");
            self.poison();
        }
        result
    }

    /// Drops the context: whatever the device still sends belongs to a
    /// request nobody waits for.
    fn poison(&mut self) {
        self.context = None;
        self.poisoned = true;
        self.stats.link_drops.fetch_add(1, Ordering::Relaxed);
    }

    async fn connected(&mut self) -> Result<&mut Context, ModbusError> {
        if self.context.is_none() {
            if let Some((until, reason)) = &self.down
                && Instant::now() < *until
            {
                return Err(ModbusError::Offline {
                    reason: reason.clone(),
                });
            }
            if self.poisoned {
                tokio::time::sleep(self.config.settle).await;
                self.poisoned = false;
            }
            match tokio::time::timeout(
                self.config.timeout.max(Duration::from_secs(1)),
                open(self.config.link.clone()),
            )
            .await
            .unwrap_or_else(|_| Err("connect timed out".to_owned()))
            {
                Ok(context) => {
                    if self.down.take().is_some() {
                        info!("Modbus link open again.");
                    }
                    if self.opened_before {
                        self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    self.opened_before = true;
                    self.backoff = self.config.backoff_min;
                    self.context = Some(context);
                }
                Err(reason) => {
                    self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                    let wait = self.backoff;
                    self.backoff = (self.backoff * 2).min(self.config.backoff_max);
                    // The first failure is news; the retries that follow are
                    // not (the instrument already shows offline with the reason).
                    if self.down.is_none() {
                        warn!(retry_ms = wait.as_millis() as u64, %reason, "Cannot open the Modbus link.");
                    } else {
                        debug!(retry_ms = wait.as_millis() as u64, %reason, "Cannot open the Modbus link yet.");
                    }
                    self.down = Some((Instant::now() + wait, reason.clone()));
                    return Err(ModbusError::Offline { reason });
                }
            }
        }
        self.context.as_mut().ok_or(ModbusError::Closed)
    }
}

/// Opens the link. A free function over a copy of the settings: the future
/// must not borrow the link, whose context is not `Sync`.
async fn open(link: LinkConfig) -> Result<Context, String> {
    match &link {
        LinkConfig::Tcp { addr } => {
            let stream = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect to {addr}: {e}"))?;
            // Requests are a few bytes each; do not let Nagle hold them.
            let _ = stream.set_nodelay(true);
            Ok(tokio_modbus::client::tcp::attach(stream))
        }
        LinkConfig::Rtu(serial) => {
            use tokio_serial::SerialPort;
            let mut port = tokio_serial::new(&serial.path, serial.baud)
                .parity(serial.parity)
                .stop_bits(serial.stop_bits)
                .data_bits(tokio_serial::DataBits::Eight)
                .open_native_async()
                .map_err(|e| format!("open {}: {e}", serial.path))?;
            if !serial.exclusive {
                port.set_exclusive(false)
                    .map_err(|e| format!("{}: {e}", serial.path))?;
            }
            // Bytes that arrived since the last context was dropped are
            // late replies: discard them before the first request.
            port.clear(tokio_serial::ClearBuffer::Input)
                .map_err(|e| format!("{}: {e}", serial.path))?;
            Ok(tokio_modbus::client::rtu::attach(port))
        }
    }
}

async fn execute(context: &mut Context, op: &Op) -> tokio_modbus::Result<Vec<u16>> {
    match op {
        Op::Read {
            table: Table::Holding,
            address,
            count,
        } => context.read_holding_registers(*address, *count).await,
        Op::Read {
            table: Table::Input,
            address,
            count,
        } => context.read_input_registers(*address, *count).await,
        Op::Write { address, values } if values.len() == 1 => context
            .write_single_register(*address, values[0])
            .await
            .map(|r| r.map(|()| Vec::new())),
        Op::Write { address, values } => context
            .write_multiple_registers(*address, values)
            .await
            .map(|r| r.map(|()| Vec::new())),
    }
}

fn exception_code(code: ExceptionCode) -> u8 {
    match code {
        ExceptionCode::IllegalFunction => 0x01,
        ExceptionCode::IllegalDataAddress => 0x02,
        ExceptionCode::IllegalDataValue => 0x03,
        ExceptionCode::ServerDeviceFailure => 0x04,
        ExceptionCode::Acknowledge => 0x05,
        ExceptionCode::ServerDeviceBusy => 0x06,
        ExceptionCode::MemoryParityError => 0x08,
        ExceptionCode::GatewayPathUnavailable => 0x0A,
        ExceptionCode::GatewayTargetDevice => 0x0B,
        ExceptionCode::Custom(c) => c,
    }
}
