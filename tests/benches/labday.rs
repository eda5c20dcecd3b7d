//! A large lab's day (issue 7): 120,000 tubes on about 1,300 plates across several
//! simulated extractors and cyclers, in accelerated time, through the whole flow
//! (`pcrd demo`: receipt, plating, extraction over Modbus TCP, PCR over
//! pseudo-terminals with every cycle durable, analysis, review, release, the
//! batch-file sink), beside one plate of the README's demo in the same run.
//!
//! Figures:
//! - `labday.one_plate_s`: wall time of the first plate of `pcrd demo` (defaults:
//!   one extractor, one cycler, speed 1000), from its creation to its analysis.
//! - `labday.wall_s`: the day's wall time, from start-up to every tube having its
//!   final result in the batch files; `labday.results_per_s` over it. Run with the
//!   daemon's default review policy (no early calls), then again with early calls
//!   on (`labday_early_calls.*`), as the README's demo runs.
//! - `labday.daemon_peak_rss_mib`: the daemon's VmHWM at the end.
//! - `labday.lost` / `labday.duplicated`: tubes without a final result at the sink,
//!   and tubes with more than one (both must be 0).
//!
//! Run with `cargo bench -p pcrd-tests --bench labday`. Knobs: `PCRD_BENCH_TUBES`
//! (120000), `PCRD_BENCH_PLATES` (1300), `PCRD_BENCH_EXTRACTORS` (8),
//! `PCRD_BENCH_CYCLERS` (16), `PCRD_BENCH_SPEED` (20000). Prints `BENCH` and `GOAL`
//! lines.

use std::process::Command;

use anyhow::{Context as _, Result, bail};
use pcrd_tests::bench::{bench, goal};
use pcrd_tests::pcrd_bin;
use serde_json::Value;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn demo(args: &[String]) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("out");
    let output = Command::new(pcrd_bin())
        .arg("demo")
        .args(args)
        .args(["--json", "--out"])
        .arg(&out)
        .env("RUST_LOG", "warn")
        .output()
        .context("running pcrd demo")?;
    if !output.status.success() {
        bail!(
            "pcrd demo failed:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    serde_json::from_slice(&output.stdout).context("the demo's JSON summary")
}

fn main() -> Result<()> {
    let tubes = env_or("PCRD_BENCH_TUBES", 120_000);
    let plates = env_or("PCRD_BENCH_PLATES", 1_300);
    let extractors = env_or("PCRD_BENCH_EXTRACTORS", 8);
    let cyclers = env_or("PCRD_BENCH_CYCLERS", 16);
    let speed = env_or("PCRD_BENCH_SPEED", 20_000);

    let one = demo(&[])?;
    let first = &one["plates"][0];
    let one_plate = first["seconds"].as_f64().context("plate seconds")?;
    println!(
        "{}",
        bench("labday.one_plate_s", one_plate, "s", &[one_plate])
    );
    println!("{}", goal("labday.one_plate_s", one_plate, "<", 10.0));

    // The day with the daemon's default review policy (no early calls), then with
    // early calls on as the README's demo runs it.
    for (label, early) in [("labday", "off"), ("labday_early_calls", "on")] {
        let day = demo(&[
            "--tubes".into(),
            tubes.to_string(),
            "--plates".into(),
            plates.to_string(),
            "--extractors".into(),
            extractors.to_string(),
            "--cyclers".into(),
            cyclers.to_string(),
            "--speed".into(),
            speed.to_string(),
            "--early-calls".into(),
            early.into(),
            "--deadline".into(),
            "30m".into(),
        ])?;
        let wall = day["wall_seconds"].as_f64().context("wall")?;
        let rate = day["results_per_second"].as_f64().context("rate")?;
        let rss = day["daemon_peak_rss_mib"].as_f64().unwrap_or(f64::NAN);
        let lost = day["tubes_without_final"].as_u64().context("lost")? as f64;
        let duplicated = day["tubes_with_several_finals"]
            .as_array()
            .map_or(f64::NAN, |a| a.len() as f64);
        let plates_run = day["plates"].as_array().map_or(0, Vec::len);
        println!(
            "{label}: {} tubes on {plates_run} plates, {extractors} extractors, {cyclers} cyclers, speed {speed}, early calls {early} ({} preliminary); stages (median per plate, s): {}",
            day["tubes"], day["preliminary_results"], day["stage_medians"]
        );
        println!("{}", bench(&format!("{label}.wall_s"), wall, "s", &[wall]));
        println!(
            "{}",
            bench(
                &format!("{label}.results_per_s"),
                rate,
                "results/s",
                &[rate]
            )
        );
        println!(
            "{}",
            bench(&format!("{label}.daemon_peak_rss_mib"), rss, "MiB", &[rss])
        );
        println!(
            "{}",
            bench(&format!("{label}.lost"), lost, "tubes", &[lost])
        );
        println!(
            "{}",
            bench(
                &format!("{label}.duplicated"),
                duplicated,
                "tubes",
                &[duplicated]
            )
        );
        println!("{}", goal(&format!("{label}.wall_s"), wall, "<", 60.0));
        if lost != 0.0 || duplicated != 0.0 || day["ok"] != true {
            bail!("{label} lost or duplicated results: {:#}", day["problems"]);
        }
    }
    Ok(())
}
