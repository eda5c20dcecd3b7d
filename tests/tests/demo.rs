#![allow(clippy::unwrap_used)]
//! `pcrd demo` end to end, as the README runs it, and under fire:
//!
//! - one plate with no set-up: every tube gets one final result in the batch
//!   files, the calls agree with the scenario's truth, the positives carry Cts,
//!   the summary says where the files are;
//! - a multi-plate demo whose daemon is SIGKILLed twenty times at random moments
//!   (restarted each time by the demo, as a service manager would): every tube
//!   ends with exactly one final result version at the sink, no plate is left
//!   behind, no instrument received a start the daemon did not record as a run,
//!   and the store checks intact afterwards.
//!
//! The checks on the batch files are made here, from the files, independently of
//! the demo's own summary.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pcrd_tests::pcrd_bin;
use serde_json::Value;

/// Every result record in the batch files under `dir`, checking each batch holds
/// what its manifest lists.
fn delivered(dir: &Path) -> Vec<Value> {
    let batches = pcrd_tests::files_sink_batches(dir);
    assert!(!batches.is_empty(), "no batch in {}", dir.display());
    let mut out = Vec::new();
    for batch in batches {
        assert_eq!(
            batch.manifest["count"].as_u64(),
            Some(batch.records.len() as u64),
            "a batch does not hold what its manifest lists: {:#}",
            batch.manifest
        );
        out.extend(batch.records);
    }
    out
}

/// Checks the sink holds exactly one final version per tube of `tubes`, that a
/// re-delivered key always carries the same record, and returns the finals.
fn one_final_per_tube(records: &[Value], tubes: usize) -> HashMap<String, Value> {
    let mut by_key: HashMap<String, &Value> = HashMap::new();
    for r in records {
        let key = format!("{}:{}", r["result_id"].as_str().unwrap(), r["version"]);
        if let Some(previous) = by_key.insert(key.clone(), r) {
            assert_eq!(
                previous, r,
                "key {key} delivered twice with different content"
            );
        }
    }
    let mut finals: HashMap<String, HashSet<String>> = HashMap::new();
    let mut final_record = HashMap::new();
    for (key, r) in &by_key {
        if r["status"] == "final" {
            let tube = r["tube"].as_str().unwrap().to_string();
            finals.entry(tube.clone()).or_default().insert(key.clone());
            final_record.insert(tube, (*r).clone());
        }
    }
    let several: Vec<_> = finals.iter().filter(|(_, k)| k.len() > 1).collect();
    assert!(several.is_empty(), "tubes with several finals: {several:?}");
    assert_eq!(finals.len(), tubes, "tubes with a final result at the sink");
    final_record
}

fn demo(args: &[&str]) -> Command {
    let mut command = Command::new(pcrd_bin());
    command
        .arg("demo")
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

#[test]
fn the_demo_runs_a_plate_from_tubes_to_results_with_no_setup() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let output = demo(&["--out", out.to_str().unwrap()]).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    for needle in [
        "94 tubes",
        "controls valid",
        "positives (Ct per target)",
        "94 of 94 agree",
        "time per stage",
        "results/",
    ] {
        assert!(
            stdout.contains(needle),
            "{needle:?} missing from:\n{stdout}"
        );
    }
    let finals = one_final_per_tube(&delivered(&out.join("results")), 94);
    let positives: Vec<&Value> = finals
        .values()
        .filter(|r| r["interpretation"] == "positive")
        .collect();
    assert!(positives.len() >= 8, "{} positives", positives.len());
    // Every positive carries a Ct for each viral target, strong to weak.
    let mut cts: Vec<f64> = positives
        .iter()
        .map(|r| {
            let n = r["targets"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["name"] == "N")
                .unwrap();
            n["ct"].as_f64().unwrap()
        })
        .collect();
    cts.sort_by(f64::total_cmp);
    assert!(cts[0] < 20.0 && *cts.last().unwrap() > 32.0, "{cts:?}");
    // Pools of 5 and 10 reach the central system with their size.
    let pools: HashSet<u64> = finals
        .values()
        .map(|r| r["pool_size"].as_u64().unwrap())
        .collect();
    assert!(pools.contains(&5) && pools.contains(&10), "{pools:?}");
    let summary: Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["ok"], true, "{summary:#}");
    // The inconclusive tube was sent back by review and its rerun gave the final.
    assert_eq!(summary["reruns_requested"], 1, "{summary:#}");
    assert!(out.join("pcrd.log").exists());
}

#[test]
fn a_demo_with_its_daemon_killed_twenty_times_ends_with_one_final_per_tube() {
    const PLATES: usize = 10;
    const KILLS: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = dir.path().join("out");
    let mut child = demo(&[
        "--plates",
        &PLATES.to_string(),
        "--extractors",
        "2",
        "--cyclers",
        "2",
        "--speed",
        "1000",
        "--deadline",
        "10m",
        "--json",
        "--data-dir",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
    .spawn()
    .unwrap();
    let pid_file = data.join("pcrd-serve.pid");
    // A small deterministic generator: the kill moments differ, the test repeats.
    let mut seed: u64 = 0x5EED_0007;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut killed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while killed.len() < KILLS {
        assert!(
            Instant::now() < deadline,
            "only {} kills in time",
            killed.len()
        );
        if let Ok(Some(status)) = child.try_wait() {
            let output = child.wait_with_output().unwrap();
            panic!(
                "the demo ended ({status}) after only {} kills; make it longer\n{}\n{}",
                killed.len(),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        // Somewhere between start-up and a few hundred milliseconds into work.
        std::thread::sleep(Duration::from_millis(100 + next() % 900));
        let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
        else {
            continue;
        };
        if killed.last() == Some(&pid) {
            continue;
        }
        let status = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        if status.success() {
            killed.push(pid);
        }
    }
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let summary: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["ok"], true, "{summary:#}");
    assert!(
        summary["daemon_restarts"].as_u64().unwrap() >= KILLS as u64,
        "{summary:#}"
    );

    // At the sink: one final version per tube, every tube.
    let tubes = summary["tubes"].as_u64().unwrap() as usize;
    assert_eq!(tubes, PLATES * 94);
    one_final_per_tube(&delivered(&out.join("results")), tubes);

    // No plate left behind: every plate analysed, its controls valid.
    let plates = summary["plates"].as_array().unwrap();
    assert!(plates.len() >= PLATES, "{summary:#}");
    for p in plates {
        assert_eq!(p["valid"], true, "{p:#}");
    }
    // No instrument received a start the daemon did not record as a run.
    for i in summary["instruments"].as_array().unwrap() {
        assert!(i["starts"].as_u64() <= i["runs"].as_u64(), "{i:#}");
        assert!(i["runs"].as_u64().unwrap() > 0, "{i:#}");
    }

    // The store the daemon was killed on twenty times checks intact.
    let checked = Command::new(pcrd_bin())
        .args(["store", "check", "--config"])
        .arg(data.join("pcrd-demo.toml"))
        .output()
        .unwrap();
    assert!(
        checked.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
}
