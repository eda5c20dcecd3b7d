//! ASTM speed (issue 8, "Speed"): records parsed per second, beside the independent
//! peer labmcp-astm-lis 0.1.3 in the same run, and a whole results message through
//! pcrd's ASTM host over a pseudo-terminal and over TCP loopback, against the wire time
//! of the same bytes at 9600 and 115,200 Bd.
//!
//! The message: the simulated analyser's `Scenario` with 94 specimens, each P, O and
//! 4 R (the call, E, N2 and the internal control SPC), between H and L: 566 records.
//!
//! Figures:
//! - `astm.pcrd_parse_records_per_s`: `Message::parse` on the message text (records,
//!   delimiters, hierarchy), median of many runs;
//! - `astm.peer_parse_records_per_s`: labmcp-astm-lis's `driver.parse_message` on the
//!   same text (split on CR first, as its assembler hands it records), timed inside
//!   Python with `time.perf_counter`, so interpreter start-up is not counted. It also
//!   builds its result entries (sample id, test, value per R), which pcrd leaves to the
//!   views it offers; both are "text in, records out";
//! - `astm.pty_message_ms_<baud>`: the simulated analyser sending the message (ENQ to
//!   EOT, every frame ACKed by pcrd's host, the message stored in memory before the last
//!   ACK) through `spawn_serial_host` on a `SerialStream::pair()` pty configured at that
//!   rate. A pty does not pace bytes to the baud rate, so this is the overhead pcrd (and
//!   the simulator) add above the wire time, which is computed beside it from every byte
//!   exchanged (ENQ, frames, one ACK per frame and for ENQ, EOT) at 10 bits a character
//!   (8N1);
//! - `astm.tcp_message_ms`: the same over TCP 127.0.0.1 (`spawn_tcp_host`).
//!
//! Run with `cargo bench -p pcrd-tests --bench astm` (needs labmcp-astm-lis in
//! `.peers/astm`, which `scripts/test.sh` installs). Knob: `PCRD_BENCH_MESSAGES`
//! (messages per link figure, default 30). Prints `BENCH` and `GOAL` lines.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use pcrd_drivers::astm::{
    HostEvent, InboundMessage, MessageStore, Quarantined, SerialHostConfig, StoreError,
    TcpHostConfig, spawn_serial_host, spawn_tcp_host,
};
use pcrd_drivers::sim::analyser::{Analyser, AnalyserConfig, Scenario, Specimen, Target};
use pcrd_protocol::astm::frame;
use pcrd_protocol::astm::link::LinkConfig;
use pcrd_protocol::astm::record::Message;
use pcrd_tests::bench::{bench, goal, median};
use pcrd_tests::peers_dir;
use tokio::sync::mpsc;

const SPECIMENS: usize = 94;
/// H + 94 × (P, O, 4 R) + L.
const RECORDS: usize = 1 + SPECIMENS * 6 + 1;

/// labmcp-astm-lis's parser: argv = message file, runs; prints each run's time in ms.
const PY_PARSE: &str = r#"
import sys, time
from labmcp_astm_lis.driver import parse_message
text = open(sys.argv[1], "rb").read().decode("latin-1")
n = int(sys.argv[2])
def once():
    records = [r for r in text.split("\r") if r]
    return parse_message(records, message_id=1, received_at="2026-01-15T10:30:12Z",
                         source="bench", complete=True, redacted=False)
m = once()
assert len(m.records) == int(sys.argv[3]), len(m.records)
assert len(m.results) == 4 * 94 and not m.warnings, (len(m.results), m.warnings)
for _ in range(10):
    once()
times = []
for _ in range(n):
    t = time.perf_counter()
    once()
    times.append((time.perf_counter() - t) * 1e3)
print("TIMES", " ".join(str(t) for t in times))
"#;

/// Keeps the size of the last message; nothing else (the figure is the link's).
#[derive(Default)]
struct MemoryStore {
    stored: AtomicUsize,
    last_raw_len: AtomicUsize,
    last_records: AtomicUsize,
}

impl MessageStore for MemoryStore {
    async fn store(&self, message: &InboundMessage) -> Result<(), StoreError> {
        self.stored.fetch_add(1, Ordering::SeqCst);
        self.last_raw_len.store(message.raw.len(), Ordering::SeqCst);
        self.last_records
            .store(message.records.records.len(), Ordering::SeqCst);
        Ok(())
    }

    async fn quarantine(&self, item: &Quarantined) -> Result<(), StoreError> {
        Err(StoreError(format!(
            "unexpected quarantine: {}",
            item.reason
        )))
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        println!(
            "astm: skipped: this is a benchmark, not a test; run \
             `cargo bench -p pcrd-tests --bench astm`"
        );
        return Ok(());
    }
    let messages: usize = match std::env::var("PCRD_BENCH_MESSAGES") {
        Ok(v) => v.parse().context("PCRD_BENCH_MESSAGES")?,
        Err(_) => 30,
    };
    let peer = peers_dir().join("astm");
    ensure!(
        peer.join("labmcp_astm_lis/driver.py").exists(),
        "labmcp-astm-lis is not installed at {}: run scripts/test.sh",
        peer.display()
    );

    let scenario = scenario();
    let text = scenario.text();
    let parsed = Message::parse(&text)?;
    ensure!(
        parsed.records.len() == RECORDS,
        "{} records",
        parsed.records.len()
    );
    let frames = frame::split_message(&text, LinkConfig::instrument().text_per_frame, 1);
    let frame_bytes: usize = frames
        .iter()
        .map(|f| f.encode().map(|b| b.len()))
        .sum::<Result<usize, _>>()?;
    // ENQ, its ACK, the frames, one ACK each, EOT.
    let wire_chars = 1 + 1 + frame_bytes + frames.len() + 1;
    println!(
        "# message: {RECORDS} records, {} bytes of text, {} frames, {wire_chars} bytes on the line",
        text.len(),
        frames.len()
    );

    // Figure 1: records parsed per second.
    let mut pcrd_ms = Vec::new();
    for _ in 0..50 {
        std::hint::black_box(Message::parse(&text)?);
    }
    for _ in 0..2000 {
        let started = Instant::now();
        let m = Message::parse(&text)?;
        pcrd_ms.push(started.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(m);
    }
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("message.txt");
    std::fs::write(&path, &text)?;
    let out = Command::new("python3")
        .env("PYTHONPATH", &peer)
        .args(["-c", PY_PARSE])
        .arg(&path)
        .args(["300", &RECORDS.to_string()])
        .output()
        .context("running python3")?;
    if !out.status.success() {
        bail!(
            "labmcp-astm-lis failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("TIMES "))
        .context("the peer printed no TIMES line")?;
    let peer_ms: Vec<f64> = line[6..]
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let rate = |ms: &f64| RECORDS as f64 / (ms / 1e3);
    let pcrd_rates: Vec<f64> = pcrd_ms.iter().map(rate).collect();
    let peer_rates: Vec<f64> = peer_ms.iter().map(rate).collect();
    let pcrd_rate = median(&pcrd_rates);
    let peer_rate = median(&peer_rates);

    // Figure 2: the whole message through the host.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut pty = Vec::new();
    for baud in [9600, 115_200] {
        let runs = runtime.block_on(pty_runs(baud, &text, messages))?;
        pty.push((baud, runs));
    }
    let tcp = runtime.block_on(tcp_runs(&text, messages))?;

    let mut lines = vec![
        bench(
            "astm.pcrd_parse_records_per_s",
            pcrd_rate,
            "records/s",
            &pcrd_rates,
        ),
        bench(
            "astm.peer_parse_records_per_s",
            peer_rate,
            "records/s",
            &peer_rates,
        ),
        format!(
            "BENCH astm.parse_us_per_message pcrd {:.1} us, labmcp-astm-lis {:.1} us",
            median(&pcrd_ms) * 1e3,
            median(&peer_ms) * 1e3
        ),
        format!("BENCH astm.parse_speedup {:.1} x", pcrd_rate / peer_rate),
    ];
    let mut goals = vec![goal("astm.parse_speedup", pcrd_rate / peer_rate, ">", 1.0)];
    for (baud, runs) in &pty {
        let wire_ms = wire_chars as f64 * 10.0 / f64::from(*baud) * 1e3;
        let ms = median(runs);
        lines.push(bench(
            &format!("astm.pty_message_ms_{baud}"),
            ms,
            "ms",
            runs,
        ));
        lines.push(format!(
            "BENCH astm.wire_time_ms_{baud} {wire_ms:.1} ms (computed)"
        ));
        lines.push(format!(
            "BENCH astm.pty_overhead_share_of_wire_time_{baud} {:.2} %",
            ms / wire_ms * 100.0
        ));
        goals.push(goal(
            &format!("astm.pty_overhead_share_of_wire_time_{baud}"),
            ms / wire_ms * 100.0,
            "<",
            10.0,
        ));
    }
    lines.push(bench("astm.tcp_message_ms", median(&tcp), "ms", &tcp));
    println!("\n# summary");
    for line in lines.iter().chain(&goals) {
        println!("{line}");
    }
    Ok(())
}

/// 94 specimens, alternately positive and negative, 4 R records each.
fn scenario() -> Scenario {
    let target = |name: &str, ct| Target {
        name: name.to_owned(),
        ct,
    };
    Scenario {
        sender: "SIM-AN01".into(),
        test: "SARS2".into(),
        timestamp: "20260115103012".into(),
        specimens: (0..SPECIMENS)
            .map(|i| {
                let positive = i % 2 == 0;
                let ct = |base: f64| positive.then_some(base + (i % 10) as f64 * 0.37);
                Specimen {
                    id: format!("SPC{:05}", 1000 + i),
                    call: if positive { "POS" } else { "NEG" }.into(),
                    targets: vec![target("E", ct(22.0)), target("N2", ct(23.5))],
                    internal_control: target("SPC", Some(27.0 + (i % 7) as f64 * 0.21)),
                }
            })
            .collect(),
    }
}

/// Sends the message `messages` times (after 3 warm-up sends) on `sim`; each run's ms.
async fn send_runs(
    sim: &Analyser,
    store: &MemoryStore,
    events: &mut mpsc::UnboundedReceiver<HostEvent>,
    text: &[u8],
    messages: usize,
) -> Result<Vec<f64>> {
    let mut runs = Vec::new();
    for i in 0..messages + 3 {
        let before = store.stored.load(Ordering::SeqCst);
        let started = Instant::now();
        let report = sim
            .send_text(text.to_vec(), Vec::new())
            .await
            .map_err(|e| anyhow::anyhow!("analyser: {e}"))?;
        let elapsed = started.elapsed().as_secs_f64() * 1e3;
        ensure!(report.naks == 0, "{} NAKs", report.naks);
        ensure!(
            store.stored.load(Ordering::SeqCst) == before + 1,
            "the message was not stored"
        );
        ensure!(store.last_records.load(Ordering::SeqCst) == RECORDS);
        while let Ok(event) = events.try_recv() {
            if let HostEvent::Quarantined { reason, .. } = event {
                bail!("quarantined: {reason}");
            }
        }
        if i >= 3 {
            runs.push(elapsed);
        }
    }
    Ok(runs)
}

async fn wait_link_up(events: &mut mpsc::UnboundedReceiver<HostEvent>) -> Result<()> {
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(event) = events.recv().await {
            if matches!(event, HostEvent::LinkUp { .. }) {
                return Ok(());
            }
        }
        bail!("host stopped")
    })
    .await
    .context("the line did not come up")?
}

async fn pty_runs(baud: u32, text: &[u8], messages: usize) -> Result<Vec<f64>> {
    use tokio_serial::SerialPort;
    let (master, slave) = tokio_serial::SerialStream::pair()?;
    let config = SerialHostConfig {
        instrument: "AN01".into(),
        path: slave.name().context("pty name")?,
        baud_rate: baud,
        link: LinkConfig::computer(),
        exclusive: false,
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
    };
    let store = Arc::new(MemoryStore::default());
    let (host, mut events) = spawn_serial_host(config, store.clone());
    let sim = Analyser::on_stream(master, AnalyserConfig::default());
    wait_link_up(&mut events).await?;
    let runs = send_runs(&sim, &store, &mut events, text, messages).await;
    println!(
        "# pty {baud} Bd: raw bytes the host kept per message: {}",
        store.last_raw_len.load(Ordering::SeqCst)
    );
    host.shutdown();
    drop(slave);
    runs
}

async fn tcp_runs(text: &[u8], messages: usize) -> Result<Vec<f64>> {
    let config = TcpHostConfig {
        listen: "127.0.0.1:0".parse()?,
        peers: vec![("AN01".into(), IpAddr::V4(Ipv4Addr::LOCALHOST))],
        link: LinkConfig::computer(),
    };
    let store = Arc::new(MemoryStore::default());
    let (host, mut events) = spawn_tcp_host(config, store.clone()).await?;
    let addr = host.local_addr().context("tcp host address")?;
    let sim = Analyser::connect_tcp(addr, AnalyserConfig::default()).await?;
    wait_link_up(&mut events).await?;
    let runs = send_runs(&sim, &store, &mut events, text, messages).await;
    host.shutdown();
    runs
}
