//! Benchmarks of the outbox (issue 6), in process on the real store and the real
//! batch-file sink:
//!
//! - `outbox.release`: `Lab::release_results` in requests of 1,000 (results + outbox +
//!   audit in one transaction, then the barrier);
//! - `outbox.files_e2e`: from the first release to the last result durably delivered
//!   by a files sink (batch 500: CSV + NDJSON + manifest, each fsynced and renamed),
//!   the worker running while releases go on;
//! - `outbox.cursor`: the outbox's own cost per result (read batch, cursor commit,
//!   barrier, cleanup) with a receiver that accepts at once, batch 500;
//! - `outbox.naive_files`: the naive path beside it, the same sink with batch 1: one
//!   set of files, fsyncs and cursor commit per result.
//!
//! Run with `cargo bench -p pcrd-tests --bench outbox`. Knobs: `PCRD_BENCH_RUNS`
//! (default 5), `PCRD_BENCH_RESULTS` (results per run, default 20000),
//! `PCRD_BENCH_NAIVE` (results for the naive path, default 1000).
//! Without `--bench` (as `cargo test --all-targets` runs it) it only says it was
//! skipped.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use pcrd::kits::KitRegistry;
use pcrd::lab::{Actor, Lab};
use pcrd::outbox::worker::{self, Deliver};
use pcrd::sinks::files::FilesConfig;
use pcrd::sinks::{ItemOutcome, OutboxItem, SinkConfig, SinkKind};
use pcrd::store::{Store, StoreOptions};
use pcrd_protocol::upstream::ResultRecord;
use pcrd_tests::bench::{bench, median};
use pcrd_tests::results::{TEST_LAB, records};

const CACHE_BYTES: u64 = pcrd::config::DEFAULT_CACHE_MB * 1024 * 1024;

fn env_usize(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(v) => v.parse().with_context(|| name.to_string()),
        Err(_) => Ok(default),
    }
}

fn actor() -> Actor {
    Actor {
        user: "bench".into(),
        reason: None,
    }
}

fn open(dir: &std::path::Path) -> Result<Arc<Lab>> {
    let store = Store::open(&StoreOptions {
        path: dir.join("store"),
        cache_bytes: CACHE_BYTES,
    })?;
    let kits = KitRegistry::load(None).map_err(|p| anyhow::anyhow!("kits: {p:?}"))?;
    Ok(Lab::open(store, kits, TEST_LAB.into())?)
}

async fn release_all(lab: &Arc<Lab>, all: &[ResultRecord]) -> Result<()> {
    for chunk in all.chunks(1000) {
        lab.release_results(actor(), chunk.to_vec()).await?;
    }
    Ok(())
}

async fn wait_cursor(lab: &Arc<Lab>, name: &str, target: u64) -> Result<()> {
    let sink = lab.outbox().sink(name).context("sink registered")?;
    let started = Instant::now();
    while sink.durable_cursor.load(Ordering::Acquire) < target {
        ensure!(
            started.elapsed() < Duration::from_secs(900),
            "sink {name} stuck"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

/// Releases only; results/s.
async fn release_run(all: &[ResultRecord]) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let lab = open(dir.path())?;
    let started = Instant::now();
    release_all(&lab, all).await?;
    let rate = all.len() as f64 / started.elapsed().as_secs_f64();
    lab.store().close()?;
    Ok(rate)
}

/// Release with a files sink running at `batch`; results/s to the last durable cursor.
async fn files_run(all: &[ResultRecord], batch: usize) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let lab = open(dir.path())?;
    let config = SinkConfig {
        name: "files".into(),
        batch_size: batch,
        kind: SinkKind::Files(FilesConfig {
            dir: dir.path().join("export"),
            ndjson: true,
        }),
    };
    let handles = worker::start(&lab, &[config])
        .await
        .map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    release_all(&lab, all).await?;
    wait_cursor(&lab, "files", all.len() as u64 + 1).await?;
    let rate = all.len() as f64 / started.elapsed().as_secs_f64();
    for h in handles {
        h.abort();
    }
    let files = std::fs::read_dir(dir.path().join("export"))?.count();
    ensure!(files >= 3, "the sink wrote files");
    Ok(rate)
}

/// A receiver that takes everything at once: what remains is the outbox's own cost.
struct Accept;

impl Deliver for Accept {
    async fn deliver(&mut self, items: &[OutboxItem]) -> Vec<ItemOutcome> {
        vec![ItemOutcome::Delivered; items.len()]
    }
}

/// Seeds `all`, then drains them through the outbox alone; results/s of the drain.
async fn cursor_run(all: &[ResultRecord], batch: usize) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let lab = open(dir.path())?;
    release_all(&lab, all).await?;
    let runtime = worker::prepare(&lab, "accept", "bench", batch).await?;
    let started = Instant::now();
    let handle = tokio::spawn(worker::run(Arc::clone(&lab), runtime, Accept));
    wait_cursor(&lab, "accept", all.len() as u64 + 1).await?;
    let rate = all.len() as f64 / started.elapsed().as_secs_f64();
    handle.abort();
    Ok(rate)
}

fn main() -> Result<()> {
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "outbox: skipped: this is a benchmark, not a test; run `cargo bench -p pcrd-tests --bench outbox`"
        );
        return Ok(());
    }
    let runs = env_usize("PCRD_BENCH_RUNS", 5)?;
    let n = env_usize("PCRD_BENCH_RESULTS", 20_000)?;
    let naive_n = env_usize("PCRD_BENCH_NAIVE", 1_000)?;
    let all = records(n);
    let naive_records = records(naive_n);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut lines = Vec::new();
    let mut measure = |name: &str, f: &dyn Fn() -> Result<f64>| -> Result<f64> {
        let mut values = Vec::new();
        for _ in 0..runs {
            values.push(f()?);
        }
        let m = median(&values);
        let line = bench(name, m, "results/s", &values);
        println!("{line}");
        lines.push(line);
        Ok(m)
    };
    measure("outbox.release", &|| runtime.block_on(release_run(&all)))?;
    let e2e = measure("outbox.files_e2e", &|| {
        runtime.block_on(files_run(&all, 500))
    })?;
    measure("outbox.cursor", &|| runtime.block_on(cursor_run(&all, 500)))?;
    let naive = measure("outbox.naive_files", &|| {
        runtime.block_on(files_run(&naive_records, 1))
    })?;
    println!("\nsummary ({n} results per run, naive {naive_n}, {runs} runs each):");
    for line in &lines {
        println!("{line}");
    }
    println!("RATIO outbox.files_e2e/naive_files {:.1}x", e2e / naive);
    Ok(())
}
