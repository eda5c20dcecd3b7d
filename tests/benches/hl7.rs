//! HL7 ORU^R01 messages per second over MLLP, one ACK per message, one connection
//! (issue 6, "Speed": at least 5,000 messages/s; a Python MLLP pair manages about
//! 1,400/s). Measured side by side in one run:
//!
//! - `hl7.pcrd_sink_rust_server`: pcrd's HL7 sink (`Hl7Sink::deliver`, batches of 100
//!   items, encoding each record included) into a loopback ACK server written here on
//!   pcrd's MLLP codec, which answers AA echoing MSH-10 for each message;
//! - `hl7.pcrd_sink_python_server`: the same sink into the `hl7` 0.4.5 MLLP server
//!   (`hl7.mllp.start_hl7_server`, parse + `create_ack`);
//! - `hl7.python_pair`: the `hl7` package's MLLP client (`open_hl7_connection`,
//!   `writemessage`, `readmessage`) sending one of pcrd's messages to that same Python
//!   server, timed inside Python (`time.perf_counter`), so interpreter start-up is not
//!   counted.
//!
//! Run with `cargo bench -p pcrd-tests --bench hl7` (needs hl7 in `.peers/python`,
//! which `scripts/test.sh` installs). Knobs: `PCRD_BENCH_MESSAGES` (messages per run,
//! default 5000), `PCRD_BENCH_RUNS` (runs per figure, default 3). Prints `BENCH` and
//! `GOAL` lines.

use std::io::{BufRead, BufReader, Write as _};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use pcrd::sinks::hl7::{Hl7Config, Hl7Sink};
use pcrd::sinks::{ItemOutcome, OutboxItem};
use pcrd_protocol::hl7::mllp::{self, MllpDecoder, MllpEvent};
use pcrd_protocol::hl7::{MessageHeader, encode_oru_r01};
use pcrd_protocol::upstream::{
    Interpretation, KitRef, RESULT_SCHEMA_VERSION, ResultRecord, ResultStatus, TargetCall,
    TargetResult,
};
use pcrd_tests::bench::{bench, goal, median};
use pcrd_tests::peers_dir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Items per `deliver` call, as the outbox hands them over.
const BATCH: usize = 100;

/// The hl7 MLLP server: answers AA echoing MSH-10; prints `port N`.
const PY_SERVER: &str = r#"
import asyncio
from hl7.mllp import start_hl7_server
async def serve(reader, writer):
    try:
        while not writer.is_closing():
            msg = await reader.readmessage()
            writer.writemessage(msg.create_ack("AA"))
            await writer.drain()
    except asyncio.IncompleteReadError:
        pass
    finally:
        writer.close()
async def main():
    server = await start_hl7_server(serve, "127.0.0.1", 0, encoding="utf-8")
    print("port", server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"#;

/// The hl7 MLLP client: argv = port, messages, file with one message; sends it that
/// many times, one at a time, waiting for each ACK; prints messages per second.
const PY_CLIENT: &str = r#"
import asyncio, sys, time
from hl7.mllp import open_hl7_connection
async def main():
    port, n = int(sys.argv[1]), int(sys.argv[2])
    text = open(sys.argv[3], encoding="utf-8").read()
    reader, writer = await open_hl7_connection("127.0.0.1", port, encoding="utf-8")
    async def one():
        writer.writemessage(text)
        await writer.drain()
        ack = await reader.readmessage()
        assert str(ack.segment("MSA")[1]) == "AA", str(ack)
    for _ in range(100):
        await one()
    t = time.perf_counter()
    for _ in range(n):
        await one()
    print(n / (time.perf_counter() - t), flush=True)
    writer.close()
asyncio.run(main())
"#;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        println!(
            "hl7: skipped: this is a benchmark, not a test; run \
             `cargo bench -p pcrd-tests --bench hl7`"
        );
        return Ok(());
    }
    let knob = |name: &str, default: usize| -> Result<usize> {
        match std::env::var(name) {
            Ok(v) => v.parse().with_context(|| name.to_owned()),
            Err(_) => Ok(default),
        }
    };
    let messages = knob("PCRD_BENCH_MESSAGES", 5000)?;
    let runs = knob("PCRD_BENCH_RUNS", 3)?;
    let python = peers_dir().join("python");
    ensure!(
        python.join("hl7/mllp/__init__.py").exists(),
        "hl7 is not installed at {}: run scripts/test.sh",
        python.display()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    let records: Vec<ResultRecord> = (0..messages).map(record).collect();
    let header = MessageHeader {
        receiving_application: "LIS".into(),
        receiving_facility: "CENTRAL".into(),
    };
    let sample = encode_oru_r01(&records[0], &header, &records[0].released_at)?;
    println!(
        "# {messages} messages per run, {runs} runs; one message: {} segments, {} bytes",
        sample.text.matches('\r').count(),
        sample.text.len()
    );

    let rust_port = runtime.block_on(start_ack_server())?;
    let py_server = PyServer::start(&python)?;
    let message_file = tempfile::NamedTempFile::new()?;
    message_file.as_file().write_all(sample.text.as_bytes())?;

    let mut pcrd_rust = Vec::new();
    let mut pcrd_python = Vec::new();
    let mut python_pair = Vec::new();
    for run in 0..runs {
        let rate = runtime.block_on(sink_rate(rust_port, &header, &records))?;
        println!("# run {run}: pcrd sink -> rust server {rate:.0} msg/s");
        pcrd_rust.push(rate);
        let rate = runtime.block_on(sink_rate(py_server.port, &header, &records))?;
        println!("# run {run}: pcrd sink -> python server {rate:.0} msg/s");
        pcrd_python.push(rate);
        let rate = python_client(&python, py_server.port, messages, message_file.path())?;
        println!("# run {run}: python client -> python server {rate:.0} msg/s");
        python_pair.push(rate);
    }
    let (a, b, c) = (
        median(&pcrd_rust),
        median(&pcrd_python),
        median(&python_pair),
    );
    println!(
        "{}",
        bench("hl7.pcrd_sink_rust_server", a, "msg/s", &pcrd_rust)
    );
    println!(
        "{}",
        bench("hl7.pcrd_sink_python_server", b, "msg/s", &pcrd_python)
    );
    println!("{}", bench("hl7.python_pair", c, "msg/s", &python_pair));
    let ratio =
        |x: &[f64], y: &[f64]| -> Vec<f64> { x.iter().zip(y).map(|(x, y)| x / y).collect() };
    let end_to_end = ratio(&pcrd_rust, &python_pair);
    let same_server = ratio(&pcrd_python, &python_pair);
    println!(
        "{}",
        bench(
            "hl7.speedup_end_to_end",
            median(&end_to_end),
            "x",
            &end_to_end
        )
    );
    println!(
        "{}",
        bench(
            "hl7.speedup_same_server",
            median(&same_server),
            "x",
            &same_server
        )
    );
    println!("{}", goal("hl7.pcrd_sink_rust_server", a, ">", 5000.0));
    Ok(())
}

/// Messages per second of the sink delivering every record to `port`.
async fn sink_rate(port: u16, header: &MessageHeader, records: &[ResultRecord]) -> Result<f64> {
    let mut sink = Hl7Sink::new(&Hl7Config {
        address: format!("127.0.0.1:{port}"),
        header: header.clone(),
        ack_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(5),
    })
    .map_err(anyhow::Error::msg)?;
    let items: Vec<OutboxItem> = records
        .iter()
        .enumerate()
        .map(|(i, record)| OutboxItem {
            seq: i as u64,
            record: record.clone(),
            attempt: 0,
        })
        .collect();
    // Warm up: connect, and 100 messages.
    check(&sink.deliver(&items[..BATCH.min(items.len())]).await)?;
    let started = Instant::now();
    for batch in items.chunks(BATCH) {
        check(&sink.deliver(batch).await)?;
    }
    Ok(items.len() as f64 / started.elapsed().as_secs_f64())
}

fn check(outcomes: &[ItemOutcome]) -> Result<()> {
    match outcomes.iter().find(|o| **o != ItemOutcome::Delivered) {
        Some(other) => bail!("not delivered: {other:?}"),
        None => Ok(()),
    }
}

/// A loopback ACK server on pcrd's MLLP codec: AA echoing MSH-10, for each message.
async fn start_ack_server() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let mut decoder = MllpDecoder::default();
                let mut events = Vec::new();
                let mut buffer = vec![0; 64 * 1024];
                let mut out = Vec::new();
                loop {
                    let n = match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    decoder.feed(&buffer[..n], &mut events);
                    out.clear();
                    for event in events.drain(..) {
                        if let MllpEvent::Frame(message) = event {
                            let control_id = message
                                .split(|&b| b == b'\r')
                                .next()
                                .and_then(|msh| msh.split(|&b| b == b'|').nth(9))
                                .unwrap_or(b"");
                            let mut ack = b"MSH|^~\\&|LIS|CENTRAL|PCRD|LAB1|20261127061001||ACK^R01^ACK|1|P|2.5.1\rMSA|AA|".to_vec();
                            ack.extend_from_slice(control_id);
                            ack.push(b'\r');
                            mllp::frame_into(&ack, &mut out);
                        }
                    }
                    if stream.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(port)
}

/// The Python server, killed (by its PID) when dropped.
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

impl PyServer {
    fn start(python: &std::path::Path) -> Result<PyServer> {
        let mut child = Command::new("python3")
            .env("PYTHONPATH", python)
            .args(["-c", PY_SERVER])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("run python3")?;
        let stdout = child.stdout.take().context("python stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let port = line
            .strip_prefix("port ")
            .and_then(|p| p.trim().parse().ok())
            .with_context(|| format!("unexpected first line from the hl7 server: {line:?}"))?;
        Ok(PyServer { child, port })
    }
}

fn python_client(
    python: &std::path::Path,
    port: u16,
    messages: usize,
    file: &std::path::Path,
) -> Result<f64> {
    let output = Command::new("python3")
        .env("PYTHONPATH", python)
        .args(["-c", PY_CLIENT, &port.to_string(), &messages.to_string()])
        .arg(file)
        .stderr(Stdio::inherit())
        .output()
        .context("run python3")?;
    ensure!(
        output.status.success(),
        "the hl7 client failed: {:?}",
        output.status
    );
    let text = String::from_utf8(output.stdout)?;
    text.trim()
        .parse()
        .with_context(|| format!("unexpected output of the hl7 client: {text:?}"))
}

/// A positive final result with three targets, distinct per `i` (so each message has
/// its own control id).
fn record(i: usize) -> ResultRecord {
    let tube = format!("T{i:07}");
    ResultRecord {
        schema_version: RESULT_SCHEMA_VERSION,
        result_id: format!("LAB1-R0001-{tube}"),
        version: 1,
        tube,
        pool_size: 5,
        plate: "P0001".into(),
        well: "A1".into(),
        run: "R0001".into(),
        instrument: "cycler-1".into(),
        kit: KitRef {
            id: "cdc-n1-n2-rp".into(),
            version: "1".into(),
        },
        targets: [
            ("N1", "94311-8", 24.31),
            ("N2", "94312-6", 25.02),
            ("RP", "", 27.5),
        ]
        .into_iter()
        .map(|(name, loinc, ct)| TargetResult {
            name: name.into(),
            dye: "FAM".into(),
            loinc: (!loinc.is_empty()).then(|| loinc.into()),
            ct: Some(ct),
            call: TargetCall::Detected,
        })
        .collect(),
        interpretation: Interpretation::Positive,
        status: ResultStatus::Final,
        correction_reason: None,
        tested_at: "2026-11-27T06:00:00.000Z".into(),
        released_at: "2026-11-27T06:10:00.000Z".into(),
        released_by: "auto".into(),
        lab_id: "LAB1".into(),
    }
}
