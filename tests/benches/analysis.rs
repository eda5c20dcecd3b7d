//! Speed of pcrd's Ct analysis on a full plate, beside rdmlpython's LinRegPCR on
//! the same file in the same run (BENCHMARKS.md, issue 3).
//!
//! The plate: 384 wells × 4 dyes (FAM ORF1ab, VIC N, ABY S, JUN MS2) × 45
//! cycles, from pcrd's seeded synthetic curve model (positives with Ct 15–38,
//! negatives, drift, noise), written as RDML 1.3 by pcrd. pcrd is timed on the
//! parsed run (`run_analysis::analyze_run`: four common thresholds and 1,536
//! curves; one thread) and, separately, on reading the file; rdmlpython is timed
//! inside Python (`time.perf_counter` around `Rdml(path)` and `run.linRegPCR()`),
//! so interpreter start-up is not counted against it.
//!
//! Run with `cargo bench -p pcrd-tests --bench analysis` (needs rdmlpython in
//! `.peers/python`, which `scripts/test.sh` installs). Knobs: `PCRD_BENCH_RUNS`
//! (rdmlpython runs, default 3; pcrd runs 200 times per figure).
//! Prints `BENCH <name> <value> <unit> runs=<each run>` lines and `GOAL` lines.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, Result, bail, ensure};
use pcrd_protocol::analysis::model::{CurveModel, NoiseRng};
use pcrd_protocol::rdml::{Document, PcrFormat};
use pcrd_protocol::run_analysis::{RunSettings, analyze_run};
use pcrd_tests::bench::{bench, goal, median};
use pcrd_tests::{peers_dir, plate_document};

const ROWS: u32 = 16;
const COLUMNS: u32 = 24;
const CYCLES: usize = 45;
const CHANNELS: [(&str, &str); 4] = [
    ("FAM", "ORF1ab"),
    ("VIC", "N"),
    ("ABY", "S"),
    ("JUN", "MS2"),
];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        println!(
            "analysis: skipped: this is a benchmark, not a test; run \
             `cargo bench -p pcrd-tests --bench analysis`"
        );
        return Ok(());
    }
    let python_runs: usize = match std::env::var("PCRD_BENCH_RUNS") {
        Ok(v) => v.parse().context("PCRD_BENCH_RUNS")?,
        Err(_) => 3,
    };
    let doc = plate();
    let bytes = pcrd_protocol::rdml::write(&doc);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("plate.rdml");
    std::fs::write(&path, &bytes)?;
    println!(
        "# plate: {ROWS}x{COLUMNS} wells x {} dyes x {CYCLES} cycles, RDML 1.3 zip of {} bytes",
        CHANNELS.len(),
        bytes.len()
    );

    let run = &doc.experiments[0].runs[0];
    let settings = RunSettings::default();
    let records = analyze_run(&doc, run, &settings);
    ensure!(records.len() == (ROWS * COLUMNS) as usize * CHANNELS.len());
    let determined = records.iter().filter(|r| r.ct.is_some()).count();
    println!("# pcrd: {} records, {determined} with a Ct", records.len());

    // pcrd: 200 analyses of the parsed run, one thread.
    let mut analyse_ms = Vec::new();
    for _ in 0..200 {
        let started = Instant::now();
        let records = analyze_run(&doc, run, &settings);
        analyse_ms.push(started.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(records);
    }
    // The same plate as a diagnostic kit runs it: every target's threshold fixed by
    // the kit (protocols.md §6: validated per instrument and kit). Here the kit's
    // values are the ones the common thresholds above chose, so the curves and the
    // work per curve are the same; only choosing the thresholds is skipped.
    let mut kit_settings = RunSettings::default();
    for record in &records {
        kit_settings
            .targets
            .entry(record.target.clone())
            .or_default()
            .threshold = record.threshold;
    }
    ensure!(
        analyze_run(&doc, run, &kit_settings) == records,
        "fixed thresholds gave other results"
    );
    let mut kit_ms = Vec::new();
    for _ in 0..200 {
        let started = Instant::now();
        let records = analyze_run(&doc, run, &kit_settings);
        kit_ms.push(started.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(records);
    }
    let mut read_ms = Vec::new();
    for _ in 0..50 {
        let started = Instant::now();
        let parsed = pcrd_protocol::rdml::read(&bytes)?;
        read_ms.push(started.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(parsed);
    }

    // Where pcrd's time goes: the curves alone, each analysed once at the
    // threshold analyze_run chose for its target.
    let chosen: Vec<(Vec<f64>, pcrd_protocol::analysis::AnalysisSettings)> = run
        .reactions
        .iter()
        .flat_map(|r| r.data.iter())
        .zip(&records)
        .map(|(data, record)| {
            let settings = pcrd_protocol::analysis::AnalysisSettings {
                fixed_threshold: record.threshold,
                ..Default::default()
            };
            (data.fluorescence.clone(), settings)
        })
        .collect();
    let mut curves_ms = Vec::new();
    for _ in 0..200 {
        let started = Instant::now();
        for (curve, settings) in &chosen {
            std::hint::black_box(pcrd_protocol::analysis::analyze_curve(curve, settings).ok());
        }
        curves_ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    // The curves of each target (channel), as analyze_run groups them.
    let by_target: Vec<Vec<&[f64]>> = (0..CHANNELS.len())
        .map(|channel| {
            chosen
                .iter()
                .skip(channel)
                .step_by(CHANNELS.len())
                .map(|(c, _)| c.as_slice())
                .collect()
        })
        .collect();
    let mut thresholds_ms = Vec::new();
    for _ in 0..200 {
        let started = Instant::now();
        for target in &by_target {
            std::hint::black_box(
                pcrd_protocol::analysis::common_threshold(target, &Default::default()).ok(),
            );
        }
        thresholds_ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "# pcrd: whole run {:.3} ms = 1,536 curves at their thresholds {:.3} ms + choosing the 4 common thresholds {:.3} ms + grouping and records",
        median(&analyse_ms),
        median(&curves_ms),
        median(&thresholds_ms)
    );
    if python_runs == 0 {
        println!(
            "BENCH analysis.pcrd_plate_ms {:.3} ms; with the kit's fixed thresholds {:.3} ms \
             (PCRD_BENCH_RUNS=0: rdmlpython not run)",
            median(&analyse_ms),
            median(&kit_ms)
        );
        return Ok(());
    }

    // rdmlpython: load and LinRegPCR on the same file, timed inside Python.
    let python = peers_dir().join("python");
    ensure!(
        python.join("rdmlpython").is_dir(),
        "rdmlpython is not installed at {}: run scripts/test.sh (it installs the test peers)",
        python.display()
    );
    let script = r#"
import sys, time
import rdmlpython.rdml as rdml
t0 = time.perf_counter()
doc = rdml.Rdml(sys.argv[1])
t1 = time.perf_counter()
run = doc.get_experiment(byid="exp").get_run(byid="plate-1")
res = run.linRegPCR(updateRDML=True, saveResultsList=True)
t2 = time.perf_counter()
print("TIMES", (t1 - t0) * 1e3, (t2 - t1) * 1e3)
"#;
    let mut load_ms = Vec::new();
    let mut linreg_ms = Vec::new();
    for i in 0..python_runs {
        let out = Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(&path)
            .env("PYTHONPATH", &python)
            .output()
            .context("running python3")?;
        if !out.status.success() {
            bail!(
                "rdmlpython failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .find(|l| l.starts_with("TIMES "))
            .context("rdmlpython printed no TIMES line")?;
        let times: Vec<f64> = line[6..]
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        println!(
            "# rdmlpython run {}: load {:.0} ms, LinRegPCR {:.0} ms",
            i + 1,
            times[0],
            times[1]
        );
        load_ms.push(times[0]);
        linreg_ms.push(times[1]);
    }

    let pcrd = median(&analyse_ms);
    let peer = median(&linreg_ms);
    let lines = [
        bench("analysis.pcrd_plate_ms", pcrd, "ms", &analyse_ms),
        bench(
            "analysis.pcrd_plate_kit_thresholds_ms",
            median(&kit_ms),
            "ms",
            &kit_ms,
        ),
        bench(
            "analysis.pcrd_read_rdml_ms",
            median(&read_ms),
            "ms",
            &read_ms,
        ),
        bench("analysis.rdmlpython_linregpcr_ms", peer, "ms", &linreg_ms),
        bench(
            "analysis.rdmlpython_load_ms",
            median(&load_ms),
            "ms",
            &load_ms,
        ),
        format!("BENCH analysis.speedup {:.0} x", peer / pcrd),
    ];
    let goals = [
        goal("analysis.pcrd_plate_ms", pcrd, "<", 2.0),
        goal(
            "analysis.pcrd_plate_kit_thresholds_ms",
            median(&kit_ms),
            "<",
            2.0,
        ),
        goal("analysis.speedup", peer / pcrd, ">", 1000.0),
    ];
    println!("\n# summary");
    for line in lines.iter().chain(&goals) {
        println!("{line}");
    }
    Ok(())
}

/// The synthetic plate as an RDML document: well k (row by row) of dye d gets
/// its own seeded curve. About two thirds of the virus wells are positive,
/// MS2 (the internal control) is positive everywhere.
fn plate() -> Document {
    let mut rng = NoiseRng::new(2026);
    let format = PcrFormat {
        rows: ROWS,
        columns: COLUMNS,
        row_label: "ABC".to_owned(),
        column_label: "123".to_owned(),
    };
    plate_document(
        format,
        &CHANNELS.map(|(dye, target)| (target, dye)),
        |_| "S".to_owned(),
        |_, channel| {
            let positive = channel == 3 || rng.uniform() < 0.67;
            CurveModel {
                cycles: CYCLES,
                baseline: rng.range(0.5, 2.0),
                drift: rng.range(-0.002, 0.004),
                amplitude: if positive { rng.range(1.0, 3.0) } else { 0.0 },
                c_half: rng.range(18.0, 41.0),
                slope: rng.range(1.3, 1.8),
                noise_sd: rng.range(0.002, 0.01),
                seed: rng.next_u64(),
                ..CurveModel::default()
            }
            .readings()
        },
    )
}
