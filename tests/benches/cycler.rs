//! Cycler streaming (issue 5, "Tests and speed"): a 384-well, 4-channel, 45-cycle
//! run streamed by the simulated cycler over TCP 127.0.0.1 through pcrd's cycler
//! driver into the daemon's store (`pcrd::cyclers::StoreSink`, the sink `pcrd
//! serve` uses) in accelerated time.
//!
//! Figures:
//! - `cycler.cycle_to_durable_ms_p50` / `_p99`: per cycle, from the moment the
//!   driver hands the complete cycle to the sink (right after its last line was
//!   decoded, i.e. its last byte arrived) to `store_cycle` returning after the
//!   durability barrier: one sled transaction holding the 4 channels x 384 wells
//!   and the run record, then flush + fdatasync. Over every cycle of every run.
//! - `cycler.run_total_ms`: `RUN:START` to the driver's `RunFinished` (every
//!   cycle durable), beside `cycler.run_nominal_ms`, the simulator's own time
//!   for the run (46 cycles of `PCRD_BENCH_CYCLE_MS`, default 20 ms): what pcrd
//!   adds is the difference.
//! - `cycler.naive_cycle_ms`: the naive path measured in the same run, on the
//!   same cycles' readings and the same store: one transaction and one
//!   durability barrier per well reading (1,536 per cycle). Over the first
//!   `PCRD_BENCH_NAIVE_CYCLES` (default 3) cycles; `cycler.naive_ratio` is its
//!   median over pcrd's.
//! - `cycler.disk_floor_ms_p50` / `_p99`: 16 KiB appended to a plain file and
//!   fdatasync'ed, once per cycle measured, right after the runs: the disk's
//!   own latency at that moment, under whatever else the machine is doing.
//!
//! Run with `cargo bench -p pcrd-tests --bench cycler`. Knobs: `PCRD_BENCH_RUNS`
//! (default 3), `PCRD_BENCH_CYCLE_MS`, `PCRD_BENCH_NAIVE_CYCLES`. Stores go in
//! a temporary directory under `$TMPDIR`. Prints `BENCH` and `GOAL` lines.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use pcrd::cyclers::{ActiveRun, RunStore, StoreSink};
use pcrd::store::{Store, StoreOptions};
use pcrd_drivers::cycler::{CyclerConfig, CyclerLink, EventKind, spawn_cycler};
use pcrd_drivers::sim::cycler::{CyclerSim, CyclerSimConfig};
use pcrd_protocol::cycler::{Command, Dialect, PlateMap, ThermalProtocol};
use pcrd_protocol::domain::PlateFormat;
use pcrd_tests::bench::{bench, goal, median};

const CHANNELS: usize = 4;
const CYCLES: usize = 45;
const PROTOCOL: &str = "BENCH45 FAM,VIC,ROX,CY5 1x95@120 45x95@3/60@30R";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn protocol() -> Result<ThermalProtocol> {
    match Command::parse(&format!("PROT:LOAD {PROTOCOL}"), &Dialect::reference())? {
        Command::LoadProtocol(p) => Ok(p),
        other => bail!("not a protocol: {other:?}"),
    }
}

fn plate() -> PlateMap {
    PlateMap {
        plate_id: "PCR-BENCH".into(),
        format: PlateFormat::Wells384,
        wells: PlateFormat::Wells384
            .wells_column_major()
            .enumerate()
            .map(|(i, w)| (w, format!("S{i:04}")))
            .collect(),
    }
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

struct RunFigures {
    latencies_ms: Vec<f64>,
    total_ms: f64,
}

/// One whole run through the driver into `runs`.
async fn one_run(runs: &Arc<RunStore>, cycle_time: Duration) -> Result<RunFigures> {
    let sim = CyclerSim::new(CyclerSimConfig {
        cycle_time,
        ..CyclerSimConfig::default()
    });
    let addr = sim.serve_tcp().await?;
    let protocol = protocol()?;
    let record = runs
        .create(
            "PCR-BENCH",
            "bench-cycler",
            &protocol,
            PROTOCOL,
            PlateFormat::Wells384,
            "bench",
        )
        .await?;
    let active = Arc::new(ActiveRun::default());
    active.set(Some(record.clone()));
    let sink = StoreSink::new(Arc::clone(runs), Arc::clone(&active), "bench-cycler");
    let mut config = CyclerConfig::new("bench-cycler", CyclerLink::Tcp(addr.to_string()));
    config.timeout_cap = Some(Duration::from_secs(5));
    let (handle, mut events, task) = spawn_cycler(config, sink);
    handle.load_plate(plate()).await?;
    handle.load_protocol(protocol).await?;
    let before = runs.metrics.recent_latencies().len();
    let started = Instant::now();
    handle.start().await?;
    let finished = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            match events.recv().await {
                Ok(e) => match e.kind {
                    EventKind::RunFinished { cycles, .. } => return Ok(cycles),
                    EventKind::Rejected { line, reason } => {
                        bail!("line rejected: {reason}: {}", &line[..line.len().min(80)])
                    }
                    _ => {}
                },
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => bail!("events: {e}"),
            }
        }
    })
    .await
    .context("the run did not finish within 120 s")??;
    let total_ms = started.elapsed().as_secs_f64() * 1e3;
    task.abort();
    if finished as usize != CYCLES {
        bail!("run finished with {finished} cycles");
    }
    let stored = active.get().map_or(0, |r| r.cycles_stored);
    if stored as usize != CYCLES {
        bail!("{stored} cycles stored of {CYCLES}");
    }
    let latencies_ms: Vec<f64> = runs.metrics.recent_latencies()[before..]
        .iter()
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    if latencies_ms.len() != CYCLES {
        bail!("{} latencies for {CYCLES} cycles", latencies_ms.len());
    }
    // The curves read back are complete (no gap) before any figure is trusted.
    let curves = runs.curves(&active.get().unwrap_or(record))?;
    if curves.len() != CHANNELS || curves.iter().any(|c| c.iter().any(|w| w.len() != CYCLES)) {
        bail!("stored curves are incomplete");
    }
    Ok(RunFigures {
        latencies_ms,
        total_ms,
    })
}

/// The naive path: one transaction + barrier per well reading.
async fn naive_cycle(store: &Store, run: u64, cycle: u32, readings: &[Vec<f64>]) -> Result<f64> {
    let started = Instant::now();
    let tree = &store.trees().cycles;
    for (ch, wells) in readings.iter().enumerate() {
        for (well, v) in wells.iter().enumerate() {
            let mut key = Vec::with_capacity(16);
            key.extend_from_slice(&(run | 1 << 63).to_be_bytes());
            key.extend_from_slice(&cycle.to_be_bytes());
            key.push(ch as u8);
            key.extend_from_slice(&(well as u16).to_be_bytes());
            tree.transaction(|tx| {
                tx.insert(key.as_slice(), &v.to_be_bytes()[..])?;
                Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            store.durable().await?;
        }
    }
    Ok(started.elapsed().as_secs_f64() * 1e3)
}

/// 16 KiB (a 384 x 4 cycle and its run record) appended and fdatasync'ed, `n` times.
fn disk_floor(dir: &std::path::Path, n: usize) -> Result<Vec<f64>> {
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("floor"))?;
    let block = vec![0x5au8; 16 * 1024];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        out.push(started.elapsed().as_secs_f64() * 1e3);
    }
    Ok(out)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let runs_wanted = env_or("PCRD_BENCH_RUNS", 3) as usize;
    let cycle_ms = env_or("PCRD_BENCH_CYCLE_MS", 20);
    let naive_cycles = env_or("PCRD_BENCH_NAIVE_CYCLES", 3) as u32;
    let dir = tempfile::tempdir()?;
    let store = Store::open(&StoreOptions {
        path: dir.path().join("store"),
        cache_bytes: 4 * 1024 * 1024,
    })?;
    let runs = Arc::new(RunStore::open(store.clone())?);
    let mut latencies = Vec::new();
    let mut totals = Vec::new();
    for _ in 0..runs_wanted {
        let figures = one_run(&runs, Duration::from_millis(cycle_ms)).await?;
        latencies.extend(figures.latencies_ms);
        totals.push(figures.total_ms);
    }
    let p50 = percentile(&latencies, 50.0);
    let p99 = percentile(&latencies, 99.0);
    println!(
        "{}",
        bench("cycler.cycle_to_durable_ms_p50", p50, "ms", &latencies)
    );
    println!(
        "{}",
        bench("cycler.cycle_to_durable_ms_p99", p99, "ms", &latencies)
    );
    println!(
        "{}",
        bench(
            "cycler.cycle_to_durable_ms_max",
            percentile(&latencies, 100.0),
            "ms",
            &[]
        )
    );
    println!(
        "{}",
        bench("cycler.run_total_ms", median(&totals), "ms", &totals)
    );
    let nominal = (CYCLES as u64 + 1) * cycle_ms;
    println!(
        "{}",
        bench("cycler.run_nominal_ms", nominal as f64, "ms", &[])
    );

    // The naive path on the first cycles of the last run's readings.
    let last = runs
        .all()?
        .into_iter()
        .max_by_key(|r| r.id)
        .context("no run stored")?;
    let curves = runs.curves(&last)?;
    let mut naive = Vec::new();
    for cycle in 1..=naive_cycles {
        let readings: Vec<Vec<f64>> = curves
            .iter()
            .map(|wells| wells.iter().map(|c| c[cycle as usize - 1]).collect())
            .collect();
        naive.push(naive_cycle(&store, last.id, cycle, &readings).await?);
    }
    let naive_median = median(&naive);
    println!(
        "{}",
        bench("cycler.naive_cycle_ms", naive_median, "ms", &naive)
    );
    println!(
        "{}",
        bench(
            "cycler.naive_ratio",
            naive_median / median(&latencies),
            "x",
            &[]
        )
    );
    // The floor under every figure, measured in the same run on the same disk:
    // a cycle's worth of bytes appended to a plain file, then fdatasync, as
    // many times as there were cycles. The 2 cores and the disk are shared, so
    // a slow pcrd p99 with a slow floor p99 is the machine, not the store.
    let floor = disk_floor(dir.path(), latencies.len())?;
    println!(
        "{}",
        bench(
            "cycler.disk_floor_ms_p50",
            percentile(&floor, 50.0),
            "ms",
            &floor
        )
    );
    println!(
        "{}",
        bench(
            "cycler.disk_floor_ms_p99",
            percentile(&floor, 99.0),
            "ms",
            &floor
        )
    );
    // Where slow cycles spent their time: the barrier (flush + fdatasync, on its
    // own thread) or elsewhere (commit, scheduling of the waiting task).
    let mut text = String::new();
    store
        .barrier_stats()
        .duration
        .render(&mut text, "b", "barriers");
    let bucket = |le: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(&format!("b_bucket{{le=\"{le}\"}}")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let barriers = bucket("+Inf");
    println!(
        "INFO cycler.barriers_over_5ms {} of {barriers} (all barriers of the run, naive path included); cycles over 5 ms: {} of {}",
        barriers - bucket("0.005"),
        latencies.iter().filter(|l| **l > 5.0).count(),
        latencies.len()
    );
    println!("{}", goal("cycler.cycle_to_durable_ms_p99", p99, "<", 5.0));
    store.close()?;
    Ok(())
}
