//! Benchmarks of pcrd's foundation: the store behind its durability barrier, driven
//! through the real `pcrd serve` (release build), each figure beside a bare-sled peer
//! on the same disk.
//!
//! Run with `cargo bench -p pcrd-tests --bench foundation` (or `scripts/bench.sh`,
//! which also installs wrk). Sections can be picked by name:
//! `cargo bench -p pcrd-tests --bench foundation -- disk batch single footprint`.
//! Knobs (environment): `PCRD_BENCH_RUNS` (runs per figure, default 3),
//! `PCRD_BENCH_TUBES` (tubes per batch run, default 200000), `PCRD_BENCH_LOAD` (tubes
//! stored for the footprint section, default 1000000), `PCRD_BENCH_LOAD_BATCH` (tubes
//! per request while loading them, default 1000 like `pcrd tube import`),
//! `PCRD_BENCH_SECS` (seconds per wrk / single-record peer run, default 10).
//!
//! The footprint section stores the million tubes twice: all still waiting (two keys
//! per tube), and as a lab holds them (received in batches and put on sealed 96-well
//! plates as they come, `footprint.lab_*` figures); the memory goal is judged on the
//! latter (BENCHMARKS.md).
//!
//! Every figure is printed as one machine-readable line:
//! `BENCH <name> <value> <unit> runs=<each run>` (value = median of the runs), and again
//! in a summary at the end, followed by `GOAL <name> <value> <op> <target> met|MISSED`
//! for the issue's goals. Peers (bare sled, pcrd's `Lab` without HTTP) run in child
//! processes of this binary (`--peer ...`), so each starts with a fresh heap and its
//! memory can be measured. BENCHMARKS.md records the figures and the commands.
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) it only says it was
//! skipped: it is a benchmark, not a test.

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use pcrd::kits::KitRegistry;
use pcrd::lab::{Actor, Lab, TubeIntake};
use pcrd::model::{AuditEntry, TubeRecord};
use pcrd::store::{Store, StoreOptions, encode};
use pcrd_protocol::domain::{Barcode, PoolSize, Priority, Timestamp};
use pcrd_tests::bench::median;
use pcrd_tests::{Api, TECH_TOKEN, TEST_CONFIG, metric_value, pcrd_bin, send_signal};
use serde_json::json;
use sled::Transactional as _;

/// pcrd's default page cache (`store.cache_mb`, 4 MiB: TEST_CONFIG sets none, so the
/// benchmarked daemon runs with this default), used by the peers too.
const CACHE_BYTES: u64 = pcrd::config::DEFAULT_CACHE_MB * 1024 * 1024;
/// pcrd splits a batch's audit trail into entries of this many tubes.
const AUDIT_TUBES_PER_ENTRY: usize = 1_000;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--peer") {
        // A peer measured in a child process of its own (see `run_peer`).
        return peer_main(&args[i + 1..]);
    }
    if !args.iter().any(|a| a == "--bench") {
        println!(
            "foundation: skipped: this is a benchmark, not a test; run \
             `cargo bench -p pcrd-tests --bench foundation` or scripts/bench.sh"
        );
        return Ok(());
    }
    let picked: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with('-'))
        .map(String::as_str)
        .collect();
    const SECTIONS: [&str; 4] = ["disk", "batch", "single", "footprint"];
    if let Some(unknown) = picked.iter().find(|p| !SECTIONS.contains(p)) {
        bail!(
            "unknown section {unknown:?}; sections: {}",
            SECTIONS.join(" ")
        );
    }
    let want = |name: &str| picked.is_empty() || picked.contains(&name);
    let knobs = Knobs::from_env()?;
    let mut report = Report::default();
    let started = Instant::now();
    println!("# pcrd foundation benchmarks: {knobs:?}");
    println!("# pcrd binary: {}", pcrd_bin().display());
    println!("# scratch dir: {}", std::env::temp_dir().display());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    if want("disk") {
        disk(&mut report)?;
    }
    if want("batch") {
        batch(&rt, &knobs, &mut report)?;
    }
    if want("single") {
        single(&rt, &knobs, &mut report)?;
    }
    if want("footprint") {
        footprint(&rt, &knobs, &mut report)?;
    }
    println!();
    println!(
        "# summary (median of runs; {:.0} s in all)",
        started.elapsed().as_secs_f64()
    );
    for line in report.lines.iter().chain(&report.goals) {
        println!("{line}");
    }
    Ok(())
}

#[derive(Debug)]
struct Knobs {
    runs: usize,
    tubes: usize,
    load: usize,
    load_batch: usize,
    secs: u64,
}

impl Knobs {
    fn from_env() -> Result<Knobs> {
        fn var(name: &str, default: u64) -> Result<u64> {
            match std::env::var(name) {
                Ok(v) => v.parse().with_context(|| format!("{name}={v:?}")),
                Err(_) => Ok(default),
            }
        }
        Ok(Knobs {
            runs: var("PCRD_BENCH_RUNS", 3)?.max(1) as usize,
            tubes: var("PCRD_BENCH_TUBES", 200_000)? as usize,
            load: var("PCRD_BENCH_LOAD", 1_000_000)? as usize,
            // pcrd's CLI import sends 1,000 tubes per request by default.
            load_batch: var("PCRD_BENCH_LOAD_BATCH", 1_000)?.max(1) as usize,
            secs: var("PCRD_BENCH_SECS", 10)?.max(1),
        })
    }
}

/// The figures, printed as they come and again at the end.
#[derive(Debug, Default)]
struct Report {
    lines: Vec<String>,
    goals: Vec<String>,
}

impl Report {
    /// Records a figure measured several times; the value is the median.
    fn runs(&mut self, name: &str, unit: &str, runs: &[f64]) -> f64 {
        let value = median(runs);
        let each: Vec<String> = runs.iter().map(|r| fmt_num(*r)).collect();
        self.push(format!(
            "BENCH {name} {} {unit} runs={}",
            fmt_num(value),
            each.join(",")
        ));
        value
    }

    /// Records a figure measured once (or derived from others).
    fn one(&mut self, name: &str, unit: &str, value: f64) -> f64 {
        self.push(format!("BENCH {name} {} {unit}", fmt_num(value)));
        value
    }

    fn push(&mut self, line: String) {
        println!("{line}");
        self.lines.push(line);
    }

    /// Checks a figure against the issue's goal: `GOAL <name> <value> <op> <target> met|MISSED`.
    fn goal(&mut self, name: &str, value: f64, op: &str, target: f64) {
        let met = match op {
            ">=" => value >= target,
            _ => value <= target,
        };
        let line = format!(
            "GOAL {name} {} {op} {} {}",
            fmt_num(value),
            fmt_num(target),
            if met { "met" } else { "MISSED" }
        );
        println!("{line}");
        self.goals.push(line);
    }
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

// ----- data -----

fn barcode(prefix: &str, i: usize) -> String {
    format!("{prefix}{i:010}")
}

/// The value pcrd stores for a freshly received tube, exactly as pcrd encodes it.
/// `audit_seq` is the audit entry that records its receipt (the tube's history).
fn tube_record(code: &str, at: Timestamp, audit_seq: u64) -> Result<TubeRecord> {
    Ok(TubeRecord {
        barcode: Barcode::new(code)?,
        pool_size: PoolSize::new(5)?,
        priority: Priority::Routine,
        due_at: None,
        received_at: at,
        received_by: "tina".into(),
        placement: None,
        history: vec![audit_seq],
    })
}

fn now_ts() -> Timestamp {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    Timestamp::from_millis(ms)
}

/// The JSON body of one receive request.
fn batch_body(prefix: &str, first: usize, count: usize) -> Vec<u8> {
    let mut body = String::with_capacity(count * 48 + 16);
    body.push_str("{\"tubes\":[");
    for i in first..first + count {
        if i > first {
            body.push(',');
        }
        body.push_str("{\"barcode\":\"");
        body.push_str(&barcode(prefix, i));
        body.push_str("\",\"pool_size\":5}");
    }
    body.push_str("]}");
    body.into_bytes()
}

/// Bytes allocated on disk (like `du`) and apparent size of everything under `path`.
fn disk_usage(path: &Path) -> Result<(u64, u64)> {
    let mut allocated = 0;
    let mut apparent = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                allocated += meta.blocks() * 512;
                apparent += meta.len();
            }
        }
    }
    Ok((allocated, apparent))
}

/// CPU time (user + system) a process (`pid` or "self") has used, in seconds.
fn cpu_secs(pid: &str) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // After the command name (in parentheses) come field 3 (state) onwards; utime and
    // stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').context("/proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11).context("utime")?.parse::<f64>()?
        + fields.get(12).context("stime")?.parse::<f64>()?;
    Ok(ticks / clock_ticks_per_sec())
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`; 100 if that fails).
fn clock_ticks_per_sec() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

fn sled_config(path: &Path) -> sled::Config {
    // The same settings pcrd's store uses.
    sled::Config::new()
        .path(path)
        .cache_capacity(CACHE_BYTES)
        .mode(sled::Mode::LowSpace)
}

// ----- the daemon -----

/// A release `pcrd serve` on its own temporary store, started as the test harness
/// starts it, with its pid exposed for /proc.
#[derive(Debug)]
struct Daemon {
    child: Option<Child>,
    url: String,
    dir: tempfile::TempDir,
    /// Length of stderr.log when the current process was spawned.
    log_offset: usize,
    spawned_at: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Mem {
    rss_kb: u64,
    hwm_kb: u64,
}

impl Mem {
    /// VmRSS and VmHWM of a process (`pid`, or "self").
    fn of(pid: &str) -> Result<Mem> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> Result<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("{name} in /proc status"))
        };
        Ok(Mem {
            rss_kb: field("VmRSS:")?,
            hwm_kb: field("VmHWM:")?,
        })
    }
}

impl Daemon {
    fn start() -> Result<Daemon> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("pcrd.toml"), TEST_CONFIG)?;
        let mut daemon = Daemon {
            child: None,
            url: String::new(),
            dir,
            log_offset: 0,
            spawned_at: Instant::now(),
        };
        daemon.spawn()?;
        Ok(daemon)
    }

    fn store_path(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// Starts `pcrd serve`; returns the time from spawn to the `listening on` line.
    fn spawn(&mut self) -> Result<Duration> {
        ensure!(self.child.is_none(), "daemon already running");
        self.log_offset = self.log().len();
        self.spawned_at = Instant::now();
        let served = pcrd_tests::spawn_serve(
            &self.dir.path().join("pcrd.toml"),
            &self.store_path(),
            &self.dir.path().join("stderr.log"),
            Duration::from_secs(120),
        )
        .map_err(anyhow::Error::msg)?;
        self.url = served.url;
        self.child = Some(served.child);
        Ok(served.startup)
    }

    fn pid(&self) -> Result<u32> {
        Ok(self.child.as_ref().context("daemon not running")?.id())
    }

    fn mem(&self) -> Result<Mem> {
        Mem::of(&self.pid()?.to_string())
    }

    /// CPU time (user + system) the daemon has used so far, in seconds.
    fn cpu_secs(&self) -> Result<f64> {
        cpu_secs(&self.pid()?.to_string())
    }

    /// Waits until the daemon answers GET /healthz.
    async fn ready(&self) -> Result<()> {
        let r = self.api().get_text("/healthz").await;
        ensure!(r.status == 200, "GET /healthz: {}", r.status);
        Ok(())
    }

    /// SIGTERM and wait for a clean exit; returns how long the exit took.
    fn terminate(&mut self) -> Result<Duration> {
        let mut child = self.child.take().context("daemon not running")?;
        let pid = i32::try_from(child.id())?;
        let started = Instant::now();
        send_signal(pid, "TERM");
        let status = child.wait()?;
        ensure!(
            status.success(),
            "pcrd exited with {status} on SIGTERM; stderr ends:\n{}",
            self.stderr_tail()
        );
        Ok(started.elapsed())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// Waits (up to `timeout`) for a log line of the current process containing
    /// `needle`; returns the time from spawn until it was seen (polled every 10 ms).
    fn wait_for_log(&self, needle: &str, timeout: Duration) -> Option<Duration> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().get(self.log_offset..)?.contains(needle) {
                return Some(self.spawned_at.elapsed());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn stderr_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The harness's API client, with the technician's token.
    fn api(&self) -> Api {
        Api::connect(&self.url, Some(TECH_TOKEN))
    }

    async fn metrics(&self) -> Result<Metrics> {
        let r = self.api().get_text("/metrics").await;
        ensure!(r.status == 200, "GET /metrics: {}", r.status);
        Ok(Metrics(r.text))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// /metrics text.
#[derive(Debug)]
struct Metrics(String);

impl Metrics {
    /// A sample, by its name with labels as exposed (`name{label="value"}`).
    fn get(&self, name: &str) -> Result<f64> {
        metric_value(&self.0, name).with_context(|| format!("metric {name} missing"))
    }
}

/// Posts `tubes` tubes from `first` on in batches, spread round-robin over `clients`
/// concurrent connections, each sending its batches one after another. Fails on any
/// non-200. Returns the wall time from the first request to the last response.
async fn post_tubes(
    url: &str,
    prefix: &str,
    first: usize,
    tubes: usize,
    batch: usize,
    clients: usize,
) -> Result<Duration> {
    let mut per_client: Vec<Vec<Vec<u8>>> = vec![Vec::new(); clients];
    for (i, start) in (first..first + tubes).step_by(batch).enumerate() {
        let count = batch.min(first + tubes - start);
        per_client[i % clients].push(batch_body(prefix, start, count));
    }
    let endpoint = format!("{url}/api/v1/tubes");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for bodies in per_client {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(300))
            .build()?;
        let endpoint = endpoint.clone();
        tasks.push(tokio::spawn(async move {
            for body in bodies {
                let response = client
                    .post(&endpoint)
                    .bearer_auth(TECH_TOKEN)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body)
                    .send()
                    .await?;
                let status = response.status();
                let text = response.bytes().await?;
                if status != reqwest::StatusCode::OK {
                    bail!(
                        "POST /api/v1/tubes: {status}: {}",
                        String::from_utf8_lossy(&text[..text.len().min(500)])
                    );
                }
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(started.elapsed())
}

// ----- peers, each in a child process of its own -----

/// What a peer child reported: `PEER key=value ...`.
#[derive(Debug)]
struct Peer(std::collections::HashMap<String, f64>);

impl Peer {
    fn get(&self, key: &str) -> Result<f64> {
        self.0
            .get(key)
            .copied()
            .with_context(|| format!("peer reported no {key}"))
    }
}

/// Runs this benchmark binary again as `--peer <args>`: every peer starts with a fresh
/// heap, so runs do not disturb each other and the peer's own RSS is measurable.
fn run_peer(args: &[String]) -> Result<Peer> {
    let out = Command::new(std::env::current_exe()?)
        .arg("--peer")
        .args(args)
        .stderr(Stdio::inherit())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "peer {args:?} failed ({}): {stdout}",
        out.status
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("PEER "))
        .with_context(|| format!("peer {args:?} printed no PEER line: {stdout}"))?;
    let mut values = std::collections::HashMap::new();
    for kv in line.split_whitespace() {
        let (k, v) = kv.split_once('=').context("key=value")?;
        values.insert(k.to_string(), v.parse()?);
    }
    Ok(Peer(values))
}

fn peer_main(args: &[String]) -> Result<()> {
    let num = |i: usize| -> Result<usize> {
        args.get(i)
            .with_context(|| format!("peer argument {i} missing"))?
            .parse()
            .with_context(|| format!("peer argument {i}"))
    };
    let kind = args.first().context("peer kind")?.as_str();
    let mut out: Vec<(&str, f64)> = match kind {
        "apply_batch" => vec![("tubes_per_s", peer_apply_batch(num(1)?, num(2)?)?)],
        "write_set" => vec![("tubes_per_s", peer_write_set(num(1)?, num(2)?)?)],
        "lab" => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let rate = rt.block_on(lab_in_process(num(1)?, num(2)?, num(3)?))?;
            vec![("tubes_per_s", rate)]
        }
        "single" => {
            let cpu_before = cpu_secs("self")?;
            let duration = Duration::from_secs(num(2)? as u64);
            let (rate, p50, p99) = peer_single(num(1)?, duration)?;
            let cpu = cpu_secs("self")? - cpu_before;
            let cpu_us = cpu / (rate * duration.as_secs_f64()) * 1e6;
            vec![
                ("records_per_s", rate),
                ("p50_ms", p50),
                ("p99_ms", p99),
                ("cpu_us_per_record", cpu_us),
            ]
        }
        "load" => {
            let dir = Path::new(args.get(1).context("dir")?);
            let (secs, size) = peer_load(dir, num(2)?, num(3)?)?;
            vec![("secs", secs), ("size_on_disk", size as f64)]
        }
        "open" => {
            let dir = Path::new(args.get(1).context("dir")?);
            peer_open(dir, num(2)?, num(3)?)?
        }
        other => bail!("unknown peer {other:?}"),
    };
    let mem = Mem::of("self")?;
    out.push(("cpu_s", cpu_secs("self")?));
    out.push(("rss_kb", mem.rss_kb as f64));
    out.push(("hwm_kb", mem.hwm_kb as f64));
    let fields: Vec<String> = out.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("PEER {}", fields.join(" "));
    Ok(())
}

// ----- section 0: the disk -----

/// What one fdatasync costs on this disk: it bounds everything durable.
fn disk(report: &mut Report) -> Result<()> {
    println!("\n# disk: append 4 KiB + fdatasync, 3 s");
    let dir = tempfile::tempdir()?;
    let mut file = File::create(dir.path().join("f"))?;
    let block = vec![7u8; 4096];
    let mut lat = Vec::new();
    let cpu_before = cpu_secs("self")?;
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let t = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        lat.push(t.elapsed());
    }
    let cpu = cpu_secs("self")? - cpu_before;
    lat.sort();
    let secs = lat.iter().sum::<Duration>().as_secs_f64();
    report.one(
        "disk.fdatasync_4k.cpu_us_per_op",
        "us",
        cpu / lat.len() as f64 * 1e6,
    );
    report.one(
        "disk.fdatasync_4k.ops_per_s",
        "ops/s",
        lat.len() as f64 / secs,
    );
    report.one(
        "disk.fdatasync_4k.p50_ms",
        "ms",
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
    );
    report.one(
        "disk.fdatasync_4k.p99_ms",
        "ms",
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
    );
    Ok(())
}

// ----- section 1: batches -----

fn batch(rt: &tokio::runtime::Runtime, knobs: &Knobs, report: &mut Report) -> Result<()> {
    let tubes = knobs.tubes;
    for batch in [1_000usize, 5_000] {
        println!("\n# batch: {tubes} tubes in batches of {batch}");
        let (mut sled_runs, mut sled_hwm) = (Vec::new(), Vec::new());
        let (mut set_runs, mut set_hwm) = (Vec::new(), Vec::new());
        for _ in 0..knobs.runs {
            let p = run_peer(&["apply_batch".into(), tubes.to_string(), batch.to_string()])?;
            sled_runs.push(p.get("tubes_per_s")?);
            sled_hwm.push(p.get("hwm_kb")? / 1024.0);
            let p = run_peer(&["write_set".into(), tubes.to_string(), batch.to_string()])?;
            set_runs.push(p.get("tubes_per_s")?);
            set_hwm.push(p.get("hwm_kb")? / 1024.0);
        }
        let ceiling = report.runs(
            &format!("batch.b{batch}.peer_sled_apply_batch.tubes_per_s"),
            "tubes/s",
            &sled_runs,
        );
        report.runs(
            &format!("batch.b{batch}.peer_sled_apply_batch.hwm_mb"),
            "MB",
            &sled_hwm,
        );
        let write_set = report.runs(
            &format!("batch.b{batch}.peer_sled_pcrd_write_set.tubes_per_s"),
            "tubes/s",
            &set_runs,
        );
        report.runs(
            &format!("batch.b{batch}.peer_sled_pcrd_write_set.hwm_mb"),
            "MB",
            &set_hwm,
        );
        for clients in [1usize, 2] {
            let (mut api_runs, mut api_hwm, mut sharing) = (Vec::new(), Vec::new(), Vec::new());
            let (mut lab_runs, mut lab_hwm, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..knobs.runs {
                let p = run_peer(&[
                    "lab".into(),
                    tubes.to_string(),
                    batch.to_string(),
                    clients.to_string(),
                ])?;
                lab_runs.push(p.get("tubes_per_s")?);
                lab_hwm.push(p.get("hwm_kb")? / 1024.0);
                let run = rt.block_on(api_batch_run(tubes, batch, clients))?;
                api_runs.push(run.tubes_per_s);
                api_hwm.push(run.hwm_kb as f64 / 1024.0);
                sharing.push(run.commits_per_barrier);
                cpu.push(run.cpu_us);
            }
            let lab = report.runs(
                &format!("batch.b{batch}.c{clients}.lab_in_process.tubes_per_s"),
                "tubes/s",
                &lab_runs,
            );
            report.runs(
                &format!("batch.b{batch}.c{clients}.lab_in_process.hwm_mb"),
                "MB",
                &lab_hwm,
            );
            let name = format!("batch.b{batch}.c{clients}.api.tubes_per_s");
            let api = report.runs(&name, "tubes/s", &api_runs);
            report.goal(&name, api, ">=", 50_000.0);
            report.runs(
                &format!("batch.b{batch}.c{clients}.api.hwm_mb"),
                "MB",
                &api_hwm,
            );
            report.runs(
                &format!("batch.b{batch}.c{clients}.api.commits_per_barrier"),
                "commits/barrier",
                &sharing,
            );
            report.runs(
                &format!("batch.b{batch}.c{clients}.api.daemon_cpu_us_per_tube"),
                "us",
                &cpu,
            );
            report.one(
                &format!("batch.b{batch}.c{clients}.ratio_api_to_sled_apply_batch"),
                "ratio",
                api / ceiling,
            );
            report.one(
                &format!("batch.b{batch}.c{clients}.ratio_api_to_sled_write_set"),
                "ratio",
                api / write_set,
            );
            report.one(
                &format!("batch.b{batch}.c{clients}.ratio_api_to_lab_in_process"),
                "ratio",
                api / lab,
            );
        }
    }
    Ok(())
}

#[derive(Debug)]
struct ApiRun {
    tubes_per_s: f64,
    commits_per_barrier: f64,
    hwm_kb: u64,
    /// Daemon CPU time per tube, in microseconds.
    cpu_us: f64,
}

/// One API run on a fresh store.
async fn api_batch_run(tubes: usize, batch: usize, clients: usize) -> Result<ApiRun> {
    let daemon = Daemon::start()?;
    let cpu_before = daemon.cpu_secs()?;
    let elapsed = post_tubes(&daemon.url, "BT", 0, tubes, batch, clients).await?;
    let cpu = daemon.cpu_secs()? - cpu_before;
    let m = daemon.metrics().await?;
    let received = m.get("pcrd_tubes_received_total")?;
    ensure!(
        received as usize == tubes,
        "daemon received {received} tubes, expected {tubes}"
    );
    Ok(ApiRun {
        tubes_per_s: tubes as f64 / elapsed.as_secs_f64(),
        commits_per_barrier: m.get("pcrd_store_barrier_waiters_total")?
            / m.get("pcrd_store_barriers_total")?,
        hwm_kb: daemon.mem()?.hwm_kb,
        cpu_us: cpu / tubes as f64 * 1e6,
    })
}

/// The same batches through pcrd's `Lab::receive_tubes` in this process (validation,
/// audit trail, one transaction, durability barrier), without HTTP and JSON.
async fn lab_in_process(tubes: usize, batch: usize, clients: usize) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(&StoreOptions {
        path: dir.path().join("store"),
        cache_bytes: CACHE_BYTES,
    })?;
    let kits = KitRegistry::load(None).map_err(|p| anyhow!("kits: {}", p.join("; ")))?;
    let lab = Lab::open(store.clone(), kits, "LAB-BENCH".into())?;
    let mut per_client: Vec<Vec<Vec<TubeIntake>>> = vec![Vec::new(); clients];
    for (i, start) in (0..tubes).step_by(batch).enumerate() {
        let intake = (start..(start + batch).min(tubes))
            .map(|n| TubeIntake {
                barcode: barcode("BT", n),
                pool_size: Some(5),
                priority: None,
                due: None,
            })
            .collect();
        per_client[i % clients].push(intake);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for batches in per_client {
        let lab = Arc::clone(&lab);
        tasks.push(tokio::spawn(async move {
            for intake in batches {
                let actor = Actor {
                    user: "tina".into(),
                    reason: None,
                };
                lab.receive_tubes(actor, intake).await?;
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed();
    store.close()?;
    Ok(tubes as f64 / elapsed.as_secs_f64())
}

/// Opens a bare sled db with pcrd's settings and makes its creation durable.
fn peer_db(path: &Path) -> Result<(sled::Db, File)> {
    let db = sled_config(path).open()?;
    let db_file = File::open(path.join("db"))?;
    db.flush()?;
    db_file.sync_all()?;
    Ok((db, db_file))
}

/// Bare sled, the ceiling: one record per tube (barcode -> pcrd's encoded tube record),
/// one `apply_batch` per batch, then flush + fdatasync of `db`.
fn peer_apply_batch(tubes: usize, batch: usize) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let (db, db_file) = peer_db(dir.path())?;
    let tree = db.open_tree("tubes")?;
    let at = now_ts();
    let mut batches = Vec::new();
    for start in (0..tubes).step_by(batch) {
        let mut b = sled::Batch::default();
        for n in start..(start + batch).min(tubes) {
            let code = barcode("BT", n);
            let seq = (n / AUDIT_TUBES_PER_ENTRY) as u64 + 1;
            b.insert(code.as_bytes(), encode(&tube_record(&code, at, seq)?));
        }
        batches.push(b);
    }
    let started = Instant::now();
    for b in batches {
        tree.apply_batch(b)?;
        db.flush()?;
        db_file.sync_data()?;
    }
    Ok(tubes as f64 / started.elapsed().as_secs_f64())
}

/// Bare sled with pcrd's write set for received tubes: per tube its record (whose
/// history names its audit entry) and its plating-queue key; per 1,000 tubes an audit
/// entry and the audit head; per batch the stored/waiting counts. All in one
/// transaction per batch across the trees, then flush + fdatasync. The difference to
/// the API is validation, hashing, JSON and HTTP.
fn peer_write_set(tubes: usize, batch: usize) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let (db, db_file) = peer_db(dir.path())?;
    let names = ["tubes", "waiting", "audit", "meta"];
    let trees = names
        .iter()
        .map(|n| db.open_tree(n))
        .collect::<Result<Vec<_>, _>>()?;
    let at = now_ts();
    let mut seq = 1u64;
    type Writes = Vec<(usize, Vec<u8>, Vec<u8>)>;
    let mut batches: Vec<Writes> = Vec::new();
    for start in (0..tubes).step_by(batch) {
        let mut writes = Vec::new();
        let numbers: Vec<usize> = (start..(start + batch).min(tubes)).collect();
        for chunk in numbers.chunks(AUDIT_TUBES_PER_ENTRY) {
            let records = chunk
                .iter()
                .map(|n| tube_record(&barcode("BT", *n), at, seq))
                .collect::<Result<Vec<_>>>()?;
            for r in &records {
                writes.push((0, r.barcode.as_str().as_bytes().to_vec(), encode(r)));
                writes.push((1, r.waiting_key(), Vec::new()));
            }
            let entry = AuditEntry {
                seq,
                at,
                user: "tina".into(),
                action: "tube.received".into(),
                plate: None,
                tubes: records.iter().map(|r| r.barcode.clone()).collect(),
                detail: format!("received {} tubes", records.len()),
                reason: None,
                prev_hash: [1; 32],
                hash: [2; 32],
            };
            writes.push((2, seq.to_be_bytes().to_vec(), encode(&entry)));
            let mut head = seq.to_be_bytes().to_vec();
            head.extend_from_slice(&[2; 32]);
            writes.push((3, b"audit_head".to_vec(), head));
            seq += 1;
        }
        let stored = (start + numbers.len()) as u64;
        let mut counts = stored.to_be_bytes().to_vec();
        counts.extend_from_slice(&stored.to_be_bytes());
        writes.push((3, b"counts".to_vec(), counts));
        batches.push(writes);
    }
    let started = Instant::now();
    for writes in &batches {
        let result: Result<(), sled::transaction::TransactionError<()>> =
            trees[..].transaction(|tx| {
                for (tree, key, value) in writes {
                    tx[*tree].insert(key.as_slice(), value.as_slice())?;
                }
                Ok(())
            });
        result.map_err(|e| anyhow!("transaction: {e:?}"))?;
        db.flush()?;
        db_file.sync_data()?;
    }
    Ok(tubes as f64 / started.elapsed().as_secs_f64())
}

// ----- section 2: one tube per request under wrk -----

const WRK_SCRIPT: &str = r#"
-- One new tube per request: barcode W<tag>-<thread>-<counter> (unique per run).
local next_id = 0
function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
end
function init(args)
  tag = args[1]
  counter = 0
  headers = { ["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. args[2] }
end
function request()
  counter = counter + 1
  local body = '{"tubes":[{"barcode":"W' .. tag .. '-' .. tid .. '-' .. counter .. '","pool_size":5}]}'
  return wrk.format("POST", "/api/v1/tubes", headers, body)
end
function done(summary, latency, requests)
  io.write(string.format(
    "WRK requests=%d duration_us=%d status_errors=%d connect_errors=%d read_errors=%d write_errors=%d timeouts=%d p50_us=%.0f p99_us=%.0f max_us=%.0f\n",
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"#;

fn single(rt: &tokio::runtime::Runtime, knobs: &Knobs, report: &mut Report) -> Result<()> {
    println!("\n# single: one tube per request, wrk -d{}s", knobs.secs);
    let wrk_ok = Command::new("wrk")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !wrk_ok {
        println!("# SKIPPED: wrk is not installed (apt-get install -y wrk, or scripts/bench.sh)");
    } else {
        let scripts = tempfile::tempdir()?;
        let script = scripts.path().join("receive.lua");
        std::fs::write(&script, WRK_SCRIPT)?;
        for connections in [1usize, 8, 32] {
            let (mut rps, mut p50, mut p99, mut sharing, mut cpu) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for run in 0..knobs.runs {
                let r = rt.block_on(wrk_run(&script, connections, run, knobs.secs))?;
                rps.push(r.rps);
                p50.push(r.p50_ms);
                p99.push(r.p99_ms);
                sharing.push(r.commits_per_barrier);
                cpu.push(r.cpu_us);
            }
            report.runs(
                &format!("single.c{connections}.api.requests_per_s"),
                "req/s",
                &rps,
            );
            report.runs(&format!("single.c{connections}.api.p50_ms"), "ms", &p50);
            report.runs(&format!("single.c{connections}.api.p99_ms"), "ms", &p99);
            report.runs(
                &format!("single.c{connections}.api.commits_per_barrier"),
                "commits/barrier",
                &sharing,
            );
            report.runs(
                &format!("single.c{connections}.api.daemon_cpu_us_per_request"),
                "us",
                &cpu,
            );
        }
    }
    // pcrd's Lab in-process, one tube per receive_tubes call: the daemon without HTTP.
    let tubes = (knobs.secs as usize * 400).max(1_000);
    for clients in [1usize, 8] {
        let (mut rates, mut cpu) = (Vec::new(), Vec::new());
        for _ in 0..knobs.runs {
            let p = run_peer(&[
                "lab".into(),
                tubes.to_string(),
                "1".into(),
                clients.to_string(),
            ])?;
            rates.push(p.get("tubes_per_s")?);
            cpu.push(p.get("cpu_s")? / tubes as f64 * 1e6);
        }
        let name = format!("single.c{clients}.lab_in_process");
        report.runs(&format!("{name}.tubes_per_s"), "tubes/s", &rates);
        report.runs(&format!("{name}.cpu_us_per_tube"), "us", &cpu);
    }
    for threads in [1usize, 8] {
        let (mut rates, mut p50, mut p99, mut cpu) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..knobs.runs {
            let p = run_peer(&["single".into(), threads.to_string(), knobs.secs.to_string()])?;
            rates.push(p.get("records_per_s")?);
            p50.push(p.get("p50_ms")?);
            p99.push(p.get("p99_ms")?);
            cpu.push(p.get("cpu_us_per_record")?);
        }
        let name = format!("single.t{threads}.peer_sled_insert_flush_fdatasync");
        report.runs(&format!("{name}.records_per_s"), "records/s", &rates);
        report.runs(&format!("{name}.p50_ms"), "ms", &p50);
        report.runs(&format!("{name}.p99_ms"), "ms", &p99);
        report.runs(&format!("{name}.cpu_us_per_record"), "us", &cpu);
    }
    Ok(())
}

#[derive(Debug)]
struct WrkRun {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    commits_per_barrier: f64,
    /// Daemon CPU time per request, in microseconds.
    cpu_us: f64,
}

async fn wrk_run(script: &Path, connections: usize, run: usize, secs: u64) -> Result<WrkRun> {
    let daemon = Daemon::start()?;
    // wrk needs at least as many connections as threads.
    let threads = connections.min(2);
    let tag = format!("{connections}r{run}");
    let cpu_before = daemon.cpu_secs()?;
    let out = tokio::process::Command::new("wrk")
        .arg(format!("-t{threads}"))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{secs}s"))
        .arg("--timeout")
        .arg("10s")
        .arg("--latency")
        .arg("-s")
        .arg(script)
        .arg(format!("{}/api/v1/tubes", daemon.url))
        .arg("--")
        .arg(&tag)
        .arg(TECH_TOKEN)
        .output()
        .await
        .context("run wrk")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "wrk failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("WRK "))
        .with_context(|| format!("no summary from wrk:\n{stdout}"))?;
    let field = |name: &str| -> Result<f64> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{name} in {line}"))
    };
    let requests = field("requests")?;
    for errors in [
        "status_errors",
        "connect_errors",
        "read_errors",
        "write_errors",
        "timeouts",
    ] {
        ensure!(
            field(errors)? == 0.0,
            "wrk reported {errors}: {line}\n{stdout}"
        );
    }
    ensure!(
        !stdout.contains("Non-2xx"),
        "wrk saw non-2xx responses:\n{stdout}"
    );
    let cpu = daemon.cpu_secs()? - cpu_before;
    let m = daemon.metrics().await?;
    let ok = m.get("pcrd_http_responses_total{class=\"2xx\"}")?;
    let bad = m.get("pcrd_http_responses_total{class=\"4xx\"}")?
        + m.get("pcrd_http_responses_total{class=\"5xx\"}")?;
    ensure!(bad == 0.0, "daemon answered {bad} requests with 4xx/5xx");
    let received = m.get("pcrd_tubes_received_total")?;
    // Requests still in flight when wrk stops are answered but not counted by wrk.
    ensure!(
        received >= requests && ok >= requests,
        "wrk counted {requests} requests, the daemon received {received} tubes and sent {ok} 2xx"
    );
    let barriers = m.get("pcrd_store_barriers_total")?;
    let waiters = m.get("pcrd_store_barrier_waiters_total")?;
    println!(
        "# wrk -t{threads} -c{connections}: {line}; daemon: {received} tubes, {barriers} barriers, {waiters} commits"
    );
    Ok(WrkRun {
        rps: requests / (field("duration_us")? / 1e6),
        p50_ms: field("p50_us")? / 1e3,
        p99_ms: field("p99_us")? / 1e3,
        commits_per_barrier: waiters / barriers,
        cpu_us: cpu / received * 1e6,
    })
}

/// Bare sled: each of `threads` threads inserts one record, then flush + fdatasync,
/// for `duration`. Returns records/s and the p50 and p99 latency of one durable insert
/// in ms.
fn peer_single(threads: usize, duration: Duration) -> Result<(f64, f64, f64)> {
    let dir = tempfile::tempdir()?;
    let (db, db_file) = peer_db(dir.path())?;
    let tree = db.open_tree("tubes")?;
    let at = now_ts();
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let per_thread: Vec<Result<Vec<Duration>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (db, tree, db_file, stop) = (&db, &tree, &db_file, &stop);
                s.spawn(move || -> Result<Vec<Duration>> {
                    let mut lat = Vec::new();
                    let mut n = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        let code = barcode(&format!("S{t}-"), n);
                        let value = encode(&tube_record(&code, at, n as u64 + 1)?);
                        let t0 = Instant::now();
                        tree.insert(code.as_bytes(), value)?;
                        db.flush()?;
                        db_file.sync_data()?;
                        lat.push(t0.elapsed());
                        n += 1;
                    }
                    Ok(lat)
                })
            })
            .collect();
        std::thread::sleep(duration);
        stop.store(true, Ordering::Relaxed);
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("peer thread panicked")))
            })
            .collect()
    });
    let elapsed = started.elapsed();
    let mut all = Vec::new();
    for lat in per_thread {
        all.extend(lat?);
    }
    all.sort();
    Ok((
        all.len() as f64 / elapsed.as_secs_f64(),
        percentile(&all, 0.5).as_secs_f64() * 1e3,
        percentile(&all, 0.99).as_secs_f64() * 1e3,
    ))
}

// ----- section 3: a million tubes -----

/// Random tube reads after a restart, in the daemon and in the peer.
const READS: usize = 20_000;

fn footprint(rt: &tokio::runtime::Runtime, knobs: &Knobs, report: &mut Report) -> Result<()> {
    let load = knobs.load;
    let batch = knobs.load_batch;
    let reads = READS;

    // Scenario A: every tube received and still waiting (two keys per tube).
    let k = format!("{}k", load / 1000);
    println!(
        "\n# footprint: {load} tubes through the API, all waiting (batches of {batch}, 2 clients)"
    );
    let mut daemon = Daemon::start()?;
    report.one(
        "footprint.empty.rss_mb",
        "MB",
        daemon.mem()?.rss_kb as f64 / 1024.0,
    );
    report.one(&format!("footprint.{k}.load_batch"), "tubes", batch as f64);
    let elapsed = rt.block_on(post_tubes(&daemon.url, "BT", 0, load, batch, 2))?;
    report.one(
        &format!("footprint.{k}.load_api.tubes_per_s"),
        "tubes/s",
        load as f64 / elapsed.as_secs_f64(),
    );
    let waiting = stored_footprint(rt, &mut daemon, &k, load, load, report)?;
    drop(daemon);

    // Scenario B, as a lab holds them: received in batches and plated as they come,
    // all but the last partial plate's worth on sealed 96-well plates.
    let lab_k = format!("lab_{k}");
    println!(
        "\n# footprint: {load} tubes as a lab holds them: receive {batch}, then create + fill + seal plates of {SAMPLE_WELLS} while {SAMPLE_WELLS} wait"
    );
    let mut daemon = Daemon::start()?;
    let (elapsed, plates, left) = rt.block_on(load_like_a_lab(&daemon.api(), load, batch))?;
    report.one(
        &format!("footprint.{lab_k}.plates_sealed"),
        "plates",
        plates as f64,
    );
    report.one(
        &format!("footprint.{lab_k}.tubes_waiting"),
        "tubes",
        left as f64,
    );
    report.one(
        &format!("footprint.{lab_k}.load_api.tubes_per_s"),
        "tubes/s",
        load as f64 / elapsed.as_secs_f64(),
    );
    report.one(
        &format!("footprint.{lab_k}.load_api.plates_per_s"),
        "plates/s",
        plates as f64 / elapsed.as_secs_f64(),
    );
    let lab = stored_footprint(rt, &mut daemon, &lab_k, load, left, report)?;
    drop(daemon);

    println!("\n# footprint peer: bare sled, {load} records (barcode -> tube record)");
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("db");
    let arg = |s: &str| s.to_string();
    let path = store.display().to_string();
    let p = run_peer(&[
        arg("load"),
        path.clone(),
        load.to_string(),
        batch.to_string(),
    ])?;
    report.one(
        &format!("footprint.peer_sled.{k}.load.records_per_s"),
        "records/s",
        load as f64 / p.get("secs")?,
    );
    report.one(
        &format!("footprint.peer_sled.{k}.after_load.hwm_mb"),
        "MB",
        p.get("hwm_kb")? / 1024.0,
    );
    report.one(
        &format!("footprint.peer_sled.{k}.size_on_disk.bytes_per_record"),
        "bytes",
        p.get("size_on_disk")? / load as f64,
    );
    let (peer_allocated, _) = disk_usage(&store)?;
    let peer_per_tube = report.one(
        &format!("footprint.peer_sled.{k}.disk.bytes_per_record"),
        "bytes",
        peer_allocated as f64 / load as f64,
    );
    let (mut open, mut open_rss, mut read_rss, mut read_hwm, mut peer_reads) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut scan, mut scan_rss) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let p = run_peer(&[
            arg("open"),
            path.clone(),
            load.to_string(),
            reads.to_string(),
        ])?;
        open.push(p.get("open_ms")?);
        open_rss.push(p.get("open_rss_kb")? / 1024.0);
        read_rss.push(p.get("gets_rss_kb")? / 1024.0);
        read_hwm.push(p.get("gets_hwm_kb")? / 1024.0);
        peer_reads.push(p.get("reads_per_s")?);
        scan.push(p.get("scan_ms")?);
        scan_rss.push(p.get("rss_kb")? / 1024.0);
    }
    let peer_open = report.runs(&format!("footprint.peer_sled.{k}.open_ms"), "ms", &open);
    let peer_open_rss = report.runs(
        &format!("footprint.peer_sled.{k}.after_open.rss_mb"),
        "MB",
        &open_rss,
    );
    report.runs(
        &format!("footprint.peer_sled.{k}.get_per_s"),
        "gets/s",
        &peer_reads,
    );
    let peer_read_rss = report.runs(
        &format!("footprint.peer_sled.{k}.after_open_and_{reads}_gets.rss_mb"),
        "MB",
        &read_rss,
    );
    report.runs(
        &format!("footprint.peer_sled.{k}.after_open_and_{reads}_gets.hwm_mb"),
        "MB",
        &read_hwm,
    );
    report.runs(
        &format!("footprint.peer_sled.{k}.full_scan_ms"),
        "ms",
        &scan,
    );
    report.runs(
        &format!("footprint.peer_sled.{k}.after_full_scan.rss_mb"),
        "MB",
        &scan_rss,
    );
    for (k, s) in [(&k, &waiting), (&lab_k, &lab)] {
        report.one(
            &format!("footprint.{k}.ratio_disk_pcrd_to_peer"),
            "ratio",
            s.bytes_per_tube / peer_per_tube,
        );
        report.one(
            &format!("footprint.{k}.ratio_startup_pcrd_to_peer_open"),
            "ratio",
            s.startup_ms / peer_open,
        );
        report.one(
            &format!("footprint.{k}.ratio_rss_after_restart_to_peer_open"),
            "ratio",
            s.rss_restart_mb / peer_open_rss,
        );
        report.one(
            &format!("footprint.{k}.ratio_rss_after_reads_to_peer_gets"),
            "ratio",
            s.rss_reads_mb / peer_read_rss,
        );
    }
    Ok(())
}

/// Footprint figures of one stored scenario, for the ratios to the peer.
#[derive(Debug)]
struct Stored {
    bytes_per_tube: f64,
    startup_ms: f64,
    rss_restart_mb: f64,
    rss_reads_mb: f64,
}

/// Measures a daemon holding `load` tubes (`waiting` of them in the plating queue):
/// memory after loading, disk, clean restarts, random reads, restart after kill -9 and
/// its store check, SIGTERM during that check. Figures are named `footprint.<k>.*`.
fn stored_footprint(
    rt: &tokio::runtime::Runtime,
    daemon: &mut Daemon,
    k: &str,
    load: usize,
    waiting: usize,
    report: &mut Report,
) -> Result<Stored> {
    let reads = READS;
    let loaded = daemon.mem()?;
    let name = format!("footprint.{k}.after_load.rss_mb");
    let rss = report.one(&name, "MB", loaded.rss_kb as f64 / 1024.0);
    report.goal(&name, rss, "<=", 64.0);
    report.one(
        &format!("footprint.{k}.after_load.hwm_mb"),
        "MB",
        loaded.hwm_kb as f64 / 1024.0,
    );
    let mut scrape = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let m = rt.block_on(daemon.metrics())?;
        scrape.push(t.elapsed().as_secs_f64() * 1e3);
        ensure!(
            m.get("pcrd_tubes_stored")? as usize == load,
            "pcrd_tubes_stored is not {load}"
        );
        ensure!(
            m.get("pcrd_tubes_waiting")? as usize == waiting,
            "pcrd_tubes_waiting is not {waiting}"
        );
    }
    report.runs(&format!("footprint.{k}.metrics_scrape_ms"), "ms", &scrape);
    let stop = daemon.terminate()?;
    report.one(
        &format!("footprint.{k}.shutdown_ms"),
        "ms",
        stop.as_secs_f64() * 1e3,
    );
    let (allocated, apparent) = disk_usage(&daemon.store_path())?;
    let per_tube = report.one(
        &format!("footprint.{k}.disk.bytes_per_tube"),
        "bytes",
        allocated as f64 / load as f64,
    );
    report.one(
        &format!("footprint.{k}.disk.apparent_bytes_per_tube"),
        "bytes",
        apparent as f64 / load as f64,
    );
    report.one(
        &format!("footprint.{k}.disk.total_mb"),
        "MB",
        allocated as f64 / 1e6,
    );

    // Clean restarts: pcrd skips its full store check after a clean stop.
    let (mut starts, mut answers, mut rss_start) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..5 {
        let spawned = Instant::now();
        let took = daemon.spawn()?;
        rt.block_on(daemon.ready())?;
        starts.push(took.as_secs_f64() * 1e3);
        answers.push(spawned.elapsed().as_secs_f64() * 1e3);
        rss_start.push(daemon.mem()?.rss_kb as f64 / 1024.0);
        if i < 4 {
            // pcrd installs its signal handlers before it prints `listening on`.
            daemon.terminate()?;
        }
    }
    let name = format!("footprint.{k}.startup_ms");
    let startup = report.runs(&name, "ms", &starts);
    report.goal(&name, startup, "<=", 2_000.0);
    report.runs(
        &format!("footprint.{k}.startup_to_first_answer_ms"),
        "ms",
        &answers,
    );
    let name = format!("footprint.{k}.after_restart.rss_mb");
    let rss_restart = report.runs(&name, "MB", &rss_start);
    report.goal(&name, rss_restart, "<=", 64.0);
    let read_rate = rt.block_on(random_reads(&daemon.url, load, reads))?;
    report.one(
        &format!("footprint.{k}.after_restart.get_tube_per_s"),
        "req/s",
        read_rate,
    );
    let read = daemon.mem()?;
    let name = format!("footprint.{k}.after_restart_and_{reads}_reads.rss_mb");
    let rss_reads = report.one(&name, "MB", read.rss_kb as f64 / 1024.0);
    report.goal(&name, rss_reads, "<=", 64.0);
    report.one(
        &format!("footprint.{k}.after_restart_and_{reads}_reads.hwm_mb"),
        "MB",
        read.hwm_kb as f64 / 1024.0,
    );

    // After a crash pcrd reads every record in the background (its store check).
    const CHECKED: &str = "Store check passed";
    daemon.kill9();
    let crash_start = daemon.spawn()?;
    report.one(
        &format!("footprint.{k}.startup_after_kill9_ms"),
        "ms",
        crash_start.as_secs_f64() * 1e3,
    );
    match daemon.wait_for_log(CHECKED, Duration::from_secs(120)) {
        Some(t) => {
            report.one(
                &format!("footprint.{k}.after_kill9.startup_to_store_checked_ms"),
                "ms",
                t.as_secs_f64() * 1e3,
            );
            let mem = daemon.mem()?;
            report.one(
                &format!("footprint.{k}.after_kill9_and_store_check.rss_mb"),
                "MB",
                mem.rss_kb as f64 / 1024.0,
            );
        }
        None => println!("# no {CHECKED:?} log line within 120 s of a restart after kill -9"),
    }
    // A stop requested while that check still runs.
    daemon.kill9();
    daemon.spawn()?;
    rt.block_on(daemon.ready())?;
    let stop = daemon.terminate()?;
    report.one(
        &format!("footprint.{k}.shutdown_during_store_check_ms"),
        "ms",
        stop.as_secs_f64() * 1e3,
    );
    Ok(Stored {
        bytes_per_tube: per_tube,
        startup_ms: startup,
        rss_restart_mb: rss_restart,
        rss_reads_mb: rss_reads,
    })
}

/// Sample wells of a 96-well plate with kit "sarscov2-orf1ab-n-ic" (2 control wells).
const SAMPLE_WELLS: usize = 94;

/// Stores `load` tubes as a lab does, from one client: receive a batch, then create,
/// fill (from the waiting queue) and seal 96-well plates while a plate's worth of tubes
/// waits. Returns the wall time, the plates sealed and the tubes left waiting.
async fn load_like_a_lab(api: &Api, load: usize, batch: usize) -> Result<(Duration, usize, usize)> {
    let bodies: Vec<Vec<u8>> = (0..load)
        .step_by(batch)
        .map(|start| batch_body("BT", start, batch.min(load - start)))
        .collect();
    let started = Instant::now();
    let (mut waiting, mut plates) = (0usize, 0usize);
    for body in bodies {
        let r = api
            .post_raw("/api/v1/tubes", "application/json", body)
            .await;
        ensure!(
            r.status == 200,
            "POST /api/v1/tubes: {} {}",
            r.status,
            r.message()
        );
        waiting += r.body["received"].as_array().map_or(0, Vec::len);
        while waiting >= SAMPLE_WELLS {
            let r = api
                .post("/api/v1/plates", json!({ "kit": "sarscov2-orf1ab-n-ic" }))
                .await;
            ensure!(
                r.status == 201,
                "POST /api/v1/plates: {} {}",
                r.status,
                r.message()
            );
            let id = r.body["id"].as_str().context("plate id")?.to_string();
            let r = api
                .post(&format!("/api/v1/plates/{id}/fill"), json!({}))
                .await;
            ensure!(r.status == 200, "fill {id}: {} {}", r.status, r.message());
            let placed = r.body["wells"].as_array().map_or(0, Vec::len);
            ensure!(placed == SAMPLE_WELLS, "fill {id} placed {placed} tubes");
            let r = api
                .post(&format!("/api/v1/plates/{id}/seal"), json!({}))
                .await;
            ensure!(r.status == 200, "seal {id}: {} {}", r.status, r.message());
            waiting -= placed;
            plates += 1;
        }
    }
    Ok((started.elapsed(), plates, waiting))
}

/// The n-th of a fixed pseudo-random sequence of indexes below `stored`.
fn lcg_index(state: &mut u64, stored: usize) -> usize {
    *state = state
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    (*state >> 33) as usize % stored
}

/// GETs of random stored tubes from 2 connections: requests/s.
async fn random_reads(url: &str, stored: usize, count: usize) -> Result<f64> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..2u64 {
        let client = reqwest::Client::new();
        let url = url.to_string();
        tasks.push(tokio::spawn(async move {
            let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ c;
            for _ in 0..count / 2 {
                let n = lcg_index(&mut state, stored);
                let r = client
                    .get(format!("{url}/api/v1/tubes/{}", barcode("BT", n)))
                    .bearer_auth(TECH_TOKEN)
                    .send()
                    .await?;
                ensure!(
                    r.status() == reqwest::StatusCode::OK,
                    "GET tube: {}",
                    r.status()
                );
                r.bytes().await?;
            }
            Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// Writes `records` tube records into a bare sled db at `path` (apply_batch + flush +
/// fdatasync per batch) and closes it. Returns seconds taken and sled's size_on_disk.
fn peer_load(path: &Path, records: usize, batch: usize) -> Result<(f64, u64)> {
    let (db, db_file) = peer_db(path)?;
    let tree = db.open_tree("tubes")?;
    let at = now_ts();
    let started = Instant::now();
    for start in (0..records).step_by(batch) {
        let mut b = sled::Batch::default();
        for n in start..(start + batch).min(records) {
            let code = barcode("BT", n);
            let seq = (n / AUDIT_TUBES_PER_ENTRY) as u64 + 1;
            b.insert(code.as_bytes(), encode(&tube_record(&code, at, seq)?));
        }
        tree.apply_batch(b)?;
        db.flush()?;
        db_file.sync_data()?;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok((secs, db.size_on_disk()?))
}

/// Opens the bare sled db at `path` (timed), checks its size, then gets `reads` random
/// records.
fn peer_open(path: &Path, records: usize, reads: usize) -> Result<Vec<(&'static str, f64)>> {
    let started = Instant::now();
    let db = sled_config(path).open()?;
    let tree = db.open_tree("tubes")?;
    let open_ms = started.elapsed().as_secs_f64() * 1e3;
    let open_rss = Mem::of("self")?.rss_kb;
    let started = Instant::now();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..reads {
        let code = barcode("BT", lcg_index(&mut state, records));
        ensure!(tree.get(code.as_bytes())?.is_some(), "{code} missing");
    }
    let reads_per_s = reads as f64 / started.elapsed().as_secs_f64();
    let after_gets = Mem::of("self")?;
    // A full scan, like pcrd's start-up store check (of one tree instead of seven).
    let started = Instant::now();
    let mut n = 0;
    for item in tree.iter() {
        item?;
        n += 1;
    }
    ensure!(n == records, "peer has {n} records");
    let scan_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(vec![
        ("open_ms", open_ms),
        ("open_rss_kb", open_rss as f64),
        ("reads_per_s", reads_per_s),
        ("gets_rss_kb", after_gets.rss_kb as f64),
        ("gets_hwm_kb", after_gets.hwm_kb as f64),
        ("scan_ms", scan_ms),
    ])
}
