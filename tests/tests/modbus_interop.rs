#![allow(clippy::unwrap_used)]
//! pcrd's Modbus extractor driver and simulator against an independent Modbus
//! implementation: pymodbus 3.16.1 (PyPI), installed into `$PCRD_PEERS/python` by
//! `scripts/test.sh`. The tests fail, never skip, when it is missing.
//!
//! 1. A pymodbus server playing an extractor (hand-written below, with its own register
//!    constants, not pcrd's) is taken through a whole extraction by pcrd's driver using
//!    a 0-based profile written for it.
//! 2. A pymodbus client runs an extraction on pcrd's simulator over Modbus TCP, reading
//!    its registers as laid out in `profiles/sim-extractor.toml`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use pcrd_drivers::modbus::{
    BusConfig, CommandOutcome, EventKind, ExtractorHandle, LinkConfig, spawn_bus,
};
use pcrd_drivers::sim::extractor::{SimConfig, Simulator};
use pcrd_protocol::extractor::{ExtractorCommand, ExtractorState, Profile};
use pcrd_tests::peers_dir;

const PATIENCE: Duration = Duration::from_secs(30);

/// An extractor written with pymodbus's SimDevice: registers 0–59, status computed on
/// each access from the time since start (a run takes argv[1] seconds). Prints
/// `port N` once listening on 127.0.0.1 and `command C` for each command acted on.
const PY_SERVER: &str = r#"
import asyncio, sys, time
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import SimData, SimDevice, DataType
from pymodbus.constants import ExcCodes

RUN_S = float(sys.argv[1])
STATE, STEP, PROGRESS, REMAIN_HI, REMAIN_LO, TEMP, ERROR, PROTOCOL, BARCODE = 10, 11, 12, 13, 14, 15, 16, 17, 18
CMD, ARG, CMD_BARCODE = 40, 41, 42
IDLE, LOADED, RUNNING, PAUSED, COMPLETED, ERR, ABORTED = range(7)
dev = {"state": IDLE, "started": None}

def text(s, n):
    b = s.encode().ljust(2 * n, b"\0")
    return [b[i] << 8 | b[i + 1] for i in range(0, 2 * n, 2)]

async def action(fc, start, address, count, regs, values):
    r = lambda a: a - start
    if dev["state"] == RUNNING:
        frac = min(1.0, (time.monotonic() - dev["started"]) / RUN_S)
        regs[r(STEP)] = min(5, int(frac * 5) + 1)
        regs[r(PROGRESS)] = int(frac * 1000)
        rem = int(1800 * (1 - frac))
        regs[r(REMAIN_HI)], regs[r(REMAIN_LO)] = rem >> 16, rem & 0xFFFF
        regs[r(TEMP)] = 560 + regs[r(STEP)] * 10
        if frac >= 1.0:
            dev["state"] = COMPLETED
            regs[r(TEMP)] = 250
        regs[r(STATE)] = dev["state"]
    if values is not None and address <= CMD < address + count:
        code = values[CMD - address]
        if code == 1 and dev["state"] in (IDLE, LOADED, COMPLETED, ABORTED):
            dev["state"] = LOADED
            regs[r(PROTOCOL)] = regs[r(ARG)]
        elif code == 2 and dev["state"] in (LOADED, COMPLETED, ABORTED) and regs[r(PROTOCOL)]:
            dev["state"], dev["started"] = RUNNING, time.monotonic()
            regs[r(BARCODE):r(BARCODE) + 8] = regs[r(CMD_BARCODE):r(CMD_BARCODE) + 8]
            regs[r(PROGRESS)] = 0
        else:
            return ExcCodes.ILLEGAL_VALUE
        regs[r(STATE)] = dev["state"]
        print("command", code, flush=True)
    return None

async def main():
    regs = [0] * 60
    regs[0:8] = text("PY-EXTRACTOR", 8)
    regs[8] = 310
    regs[15] = 250
    device = SimDevice(id=1, simdata=[SimData(0, values=regs, datatype=DataType.REGISTERS)], action=action)
    server = ModbusTcpServer(device, address=("127.0.0.1", 0))
    await server.serve_forever(background=True)
    print("port", server.transport.sockets[0].getsockname()[1], flush=True)
    await server.serving

asyncio.run(main())
"#;

/// The pymodbus extractor's map as a pcrd profile: 0-based this time.
const PY_PROFILE: &str = r#"
name = "pymodbus-extractor"
version = "1"
address_base = 0
poll_interval_ms = 50
[identify]
model = { address = 0, registers = 8 }
firmware = { address = 8, type = "u16", scale = 0.01 }
[status]
state = { address = 10, type = "u16" }
step = { address = 11, type = "u16" }
progress = { address = 12, type = "u16", scale = 0.1 }
remaining = { address = 13, type = "u32" }
temperature = { address = 15, type = "i16", scale = 0.1 }
error_code = { address = 16, type = "u16" }
protocol = { address = 17, type = "u16" }
barcode = { address = 18, registers = 8 }
[states]
idle = 0
loaded = 1
running = 2
paused = 3
completed = 4
error = 5
aborted = 6
[commands]
register = 40
argument = 41
barcode = { address = 42, registers = 8 }
codes = { load = 1, start = 2, pause = 3, resume = 4, abort = 5, acknowledge = 6 }
"#;

/// Reads pcrd's simulator (argv[1] = port) with pymodbus's client: identity, an
/// unmapped address (must be exception 2), then load protocol 4, start plate
/// `PY-PLATE-7` and poll until completed. Prints one JSON line.
const PY_CLIENT: &str = r#"
import json, sys, time
from pymodbus.client import ModbusTcpClient
c = ModbusTcpClient("127.0.0.1", port=int(sys.argv[1]), timeout=2)
assert c.connect(), "connect"
def regs(a, n):
    r = c.read_holding_registers(a, count=n, device_id=1)
    assert not r.isError(), r
    return r.registers
def text(ws):
    return b"".join(w.to_bytes(2, "big") for w in ws).rstrip(b"\0").decode()
out = {}
ident = regs(0, 9)
out["model"], out["firmware"] = text(ident[:8]), ident[8] / 100
bad = c.read_holding_registers(60000, count=2, device_id=1)
out["unmapped_exception"] = bad.exception_code if bad.isError() else None
assert not c.write_register(41, 4, device_id=1).isError()
assert not c.write_register(40, 1, device_id=1).isError()
bc = b"PY-PLATE-7".ljust(16, b"\0")
assert not c.write_registers(42, [bc[i] << 8 | bc[i + 1] for i in range(0, 16, 2)], device_id=1).isError()
assert not c.write_register(40, 2, device_id=1).isError()
states, progress = [], []
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    s = regs(10, 16)
    if not states or states[-1] != s[0]:
        states.append(s[0])
    progress.append(s[2] / 10)
    if s[0] == 4:
        break
    time.sleep(0.05)
out.update(states=states, progress=progress, protocol=s[7], barcode=text(s[8:16]),
           remaining=(s[3] << 16) | s[4])
print(json.dumps(out))
"#;

fn python_path() -> PathBuf {
    let python = peers_dir().join("python");
    assert!(
        python.join("pymodbus/__init__.py").exists(),
        "pymodbus is not installed at {}: run scripts/test.sh (it installs the test peers)",
        python.display()
    );
    python
}

/// The pymodbus server, killed (by its PID) when dropped.
struct PyServer {
    child: Child,
    port: u16,
}

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_py_server(run_seconds: f64) -> PyServer {
    let mut child = Command::new("python3")
        .env("PYTHONPATH", python_path())
        .args(["-c", PY_SERVER, &run_seconds.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run python3");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = rx
        .recv_timeout(PATIENCE)
        .expect("the pymodbus server did not report its port");
    let port = line
        .strip_prefix("port ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line from the pymodbus server: {line:?}"));
    PyServer { child, port }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pcrd_driver_takes_a_pymodbus_extractor_through_a_whole_extraction() {
    let server = start_py_server(1.0);
    let profile = Arc::new(Profile::from_toml_str(PY_PROFILE).unwrap());
    let mut config = BusConfig::new(
        "pymodbus",
        LinkConfig::Tcp {
            addr: ([127, 0, 0, 1], server.port).into(),
        },
    );
    // Python answers in a few ms; leave room for a loaded CI machine.
    config.timeout = Duration::from_secs(2);
    let bus = spawn_bus(config);
    let extractor = ExtractorHandle::new("py-extractor", 1, profile, bus);
    let identity = extractor.identify().await.unwrap();
    assert_eq!(identity.model, "PY-EXTRACTOR");
    assert!((identity.firmware - 3.1).abs() < 1e-9);
    let mut rx = extractor.subscribe();
    let _monitor = extractor.monitor();
    assert_eq!(
        extractor.load_protocol(9).await.unwrap(),
        CommandOutcome::Acknowledged
    );
    assert_eq!(
        extractor.start("PY-PLATE-42").await.unwrap(),
        CommandOutcome::Acknowledged
    );
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let completed = loop {
        let event = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no completion; events: {seen:#?}"))
            .unwrap();
        if let EventKind::Completed { barcode, protocol } = &event.kind {
            break (barcode.clone(), *protocol);
        }
        seen.push(event.kind);
    };
    assert_eq!(completed, ("PY-PLATE-42".to_string(), 9));
    assert!(
        seen.iter()
            .filter(|k| matches!(k, EventKind::Progress { .. }))
            .count()
            >= 3,
        "{seen:#?}"
    );
    assert!(
        seen.iter().all(|k| !matches!(k, EventKind::Anomalies(_))),
        "{seen:#?}"
    );
    let status = extractor.status().await.unwrap();
    assert!(status.completed(), "{status:?}");
    assert_eq!(status.temperature_c, 25.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pymodbus_client_runs_an_extraction_on_pcrds_simulator() {
    let python = python_path();
    let profile =
        Profile::from_toml_str(include_str!("../../profiles/sim-extractor.toml")).unwrap();
    let sim = Simulator::new(
        Arc::new(profile),
        &[1],
        SimConfig {
            run_time: Duration::from_millis(800),
            ..SimConfig::default()
        },
    );
    let server = sim.serve_tcp().await.unwrap();
    let output = tokio::time::timeout(
        PATIENCE,
        tokio::process::Command::new("python3")
            .env("PYTHONPATH", python)
            .args(["-c", PY_CLIENT, &server.addr.port().to_string()])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the pymodbus client did not finish")
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "pymodbus client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let out: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(out["model"], "PCRD-SIM-X96");
    assert_eq!(out["firmware"], 1.23);
    assert_eq!(out["unmapped_exception"], 2, "{out}");
    // Polled from the start on: running (2), then completed (4).
    assert_eq!(out["states"], serde_json::json!([2, 4]), "{out}");
    assert_eq!(out["barcode"], "PY-PLATE-7");
    assert_eq!(out["protocol"], 4);
    assert_eq!(out["remaining"], 0);
    let progress: Vec<f64> = out["progress"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
    assert_eq!(progress.last(), Some(&100.0));
    assert_eq!(sim.status(1).state, ExtractorState::Completed);
    assert_eq!(
        sim.commands(1),
        vec![
            ExtractorCommand::LoadProtocol(4),
            ExtractorCommand::Start {
                barcode: "PY-PLATE-7".into()
            }
        ]
    );
}
