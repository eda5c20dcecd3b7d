//! Modbus status polls per second on loopback (issue 4, "Speed"), with pymodbus measured
//! in the same run, and the per-request overhead over a pseudo-terminal.
//!
//! Figures (each a sequential loop of status reads: FC03, 16 registers at 10, the
//! simulator profile's status block):
//! - `modbus.pcrd_driver_pcrd_sim`: pcrd's driver (`ExtractorHandle::status`, decode
//!   included) against pcrd's simulator over TCP 127.0.0.1;
//! - `modbus.pcrd_driver_pymodbus_server`: the same driver against a pymodbus 3.16.1
//!   server (a plain `SimDevice` of 60 registers);
//! - `modbus.pymodbus_pair`: pymodbus's synchronous client against that same server,
//!   timed inside Python (`time.perf_counter`), so interpreter start-up is not counted;
//! - `modbus.pty_request_us`: mean time of one status read through the driver over RTU
//!   on a `SerialStream::pair()` pseudo-terminal. A pty does not pace bytes to the baud
//!   rate (field-notes §5), so this is pcrd's per-request overhead; the wire time the
//!   same request takes at 115,200 Bd is printed beside it (computed).
//!
//! Run with `cargo bench -p pcrd-tests --bench modbus` (needs pymodbus in
//! `.peers/python`, which `scripts/test.sh` installs). Knob: `PCRD_BENCH_REQUESTS`
//! (requests per figure, default 5000). Prints `BENCH` and `GOAL` lines.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use pcrd_drivers::modbus::{BusConfig, ExtractorHandle, LinkConfig, SerialConfig, spawn_bus};
use pcrd_drivers::sim::extractor::{SimConfig, Simulator};
use pcrd_protocol::extractor::Profile;
use pcrd_tests::peers_dir;

const PROFILE: &str = include_str!("../../profiles/sim-extractor.toml");

/// A pymodbus server with 60 holding registers at 0 on unit 1; prints `port N`.
const PY_SERVER: &str = r#"
import asyncio
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import SimData, SimDevice, DataType
async def main():
    device = SimDevice(id=1, simdata=[SimData(0, values=[0] * 60, datatype=DataType.REGISTERS)])
    server = ModbusTcpServer(device, address=("127.0.0.1", 0))
    await server.serve_forever(background=True)
    print("port", server.transport.sockets[0].getsockname()[1], flush=True)
    await server.serving
asyncio.run(main())
"#;

/// pymodbus client: argv = port, requests; prints requests per second.
const PY_CLIENT: &str = r#"
import sys, time
from pymodbus.client import ModbusTcpClient
c = ModbusTcpClient("127.0.0.1", port=int(sys.argv[1]), timeout=5)
assert c.connect()
n = int(sys.argv[2])
for _ in range(100):
    c.read_holding_registers(10, count=16, device_id=1)
t = time.perf_counter()
for _ in range(n):
    r = c.read_holding_registers(10, count=16, device_id=1)
    assert not r.isError()
print(n / (time.perf_counter() - t))
"#;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        println!(
            "modbus: skipped: this is a benchmark, not a test; run \
             `cargo bench -p pcrd-tests --bench modbus`"
        );
        return Ok(());
    }
    let requests: usize = match std::env::var("PCRD_BENCH_REQUESTS") {
        Ok(v) => v.parse().context("PCRD_BENCH_REQUESTS")?,
        Err(_) => 5000,
    };
    let python = peers_dir().join("python");
    ensure!(
        python.join("pymodbus/__init__.py").exists(),
        "pymodbus is not installed at {}: run scripts/test.sh",
        python.display()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let profile = Arc::new(Profile::from_toml_str(PROFILE)?);
    println!("# {requests} sequential status reads per figure (FC03, 16 registers)");

    let pcrd_pair = runtime.block_on(async {
        let sim = Simulator::new(profile.clone(), &[1], SimConfig::default());
        let server = sim.serve_tcp().await?;
        let extractor = tcp_extractor(&profile, server.addr);
        polls_per_second(&extractor, requests).await
    })?;
    bench("modbus.pcrd_driver_pcrd_sim", pcrd_pair, "req/s");

    let mut server = PyServer::start(&python)?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], server.port));
    let pcrd_py = runtime.block_on(async {
        let extractor = tcp_extractor(&profile, addr);
        polls_per_second(&extractor, requests).await
    })?;
    bench("modbus.pcrd_driver_pymodbus_server", pcrd_py, "req/s");

    let out = Command::new("python3")
        .env("PYTHONPATH", &python)
        .args([
            "-c",
            PY_CLIENT,
            &server.port.to_string(),
            &requests.to_string(),
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "pymodbus client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let py_pair: f64 = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    server.stop();
    bench("modbus.pymodbus_pair", py_pair, "req/s");
    bench("modbus.speedup_end_to_end", pcrd_pair / py_pair, "x");
    bench("modbus.speedup_same_server", pcrd_py / py_pair, "x");
    println!(
        "GOAL modbus.speedup_end_to_end {:.1} >= 3 {}",
        pcrd_pair / py_pair,
        if pcrd_pair / py_pair >= 3.0 {
            "met"
        } else {
            "NOT MET"
        }
    );

    let per_request = runtime.block_on(async {
        let (master, slave) = tokio_serial::SerialStream::pair()?;
        let path = tokio_serial::SerialPort::name(&slave).context("pty name")?;
        let sim = Simulator::new(profile.clone(), &[1], SimConfig::default());
        let _server = sim.serve_rtu(master);
        let mut serial = SerialConfig::new(path, 115_200);
        serial.exclusive = false;
        let bus = spawn_bus(config(LinkConfig::Rtu(serial)));
        let extractor = ExtractorHandle::new("bench-rtu", 1, profile.clone(), bus);
        let rate = polls_per_second(&extractor, requests).await?;
        drop(slave);
        Ok::<_, anyhow::Error>(1.0 / rate)
    })?;
    // Request: unit, function, address (2), quantity (2), CRC (2) = 8 bytes. Reply:
    // unit, function, byte count, 32 data bytes, CRC (2) = 37 bytes. 11 bits per
    // character on the line (start, 8 data, parity, stop: Modbus over Serial Line §2.5.1).
    let wire = (8.0 + 37.0) * 11.0 / 115_200.0;
    bench("modbus.pty_request_us", per_request * 1e6, "us");
    bench("modbus.wire_time_115200_us", wire * 1e6, "us (computed)");
    bench(
        "modbus.pty_overhead_share_of_wire_time",
        per_request / wire * 100.0,
        "%",
    );
    Ok(())
}

fn config(link: LinkConfig) -> BusConfig {
    let mut c = BusConfig::new("bench", link);
    c.timeout = Duration::from_secs(2);
    c
}

fn tcp_extractor(profile: &Arc<Profile>, addr: std::net::SocketAddr) -> ExtractorHandle {
    let bus = spawn_bus(config(LinkConfig::Tcp { addr }));
    ExtractorHandle::new("bench", 1, profile.clone(), bus)
}

async fn polls_per_second(extractor: &ExtractorHandle, requests: usize) -> Result<f64> {
    for _ in 0..100 {
        extractor.status().await?;
    }
    let started = Instant::now();
    for _ in 0..requests {
        let status = extractor.status().await?;
        if !status.anomalies.is_empty() {
            bail!("unexpected anomalies: {:?}", status.anomalies);
        }
    }
    Ok(requests as f64 / started.elapsed().as_secs_f64())
}

fn bench(name: &str, value: f64, unit: &str) {
    println!("BENCH {name} {value:.1} {unit}");
}

/// The pymodbus server process, stopped by its PID.
struct PyServer {
    child: Child,
    port: u16,
}

impl PyServer {
    fn start(python: &std::path::Path) -> Result<PyServer> {
        let mut child = Command::new("python3")
            .env("PYTHONPATH", python)
            .args(["-c", PY_SERVER])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .context("pymodbus server did not report its port")?;
        let port = line
            .strip_prefix("port ")
            .and_then(|p| p.trim().parse().ok())
            .with_context(|| format!("unexpected line {line:?}"))?;
        Ok(PyServer { child, port })
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        self.stop();
    }
}
