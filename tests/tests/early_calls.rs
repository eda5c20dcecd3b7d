#![allow(clippy::unwrap_used)]
//! Early calls (issue 7; docs/runs.md, "Early call") end to end: the real
//! `pcrd serve` with `[review] early_calls = true`, the simulated cycler over
//! a real pseudo-terminal pair, and a batch-file sink read as the central
//! system would:
//!
//! - strong positives (both viral Cts at most 19 in the simulator's truth)
//!   are delivered to the sink as version 1, status preliminary, while the
//!   run is still cycling;
//! - the daemon is killed with SIGKILL mid-run after the first preliminary
//!   release and started again: the run resumes and no result ever gets a
//!   second preliminary version;
//! - no well the truth says is negative (or only weakly positive) is ever
//!   called early;
//! - at the end the finals are staged over the preliminaries, and a
//!   reviewer's release of one is version 2, status final, at the sink;
//! - /metrics counts the early calls.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use pcrd_drivers::sim::cycler::{CyclerSim, CyclerSimConfig, PlateScenario, WellRole};
use pcrd_protocol::domain::PlateFormat;
use pcrd_tests::{Daemon, REVIEWER_TOKEN, TEST_CONFIG, metric_value};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(120);
const KIT: &str = "sarscov2-orf1ab-n-ic";
const CHANNELS: usize = 3;
/// The kit's 96-well layout: positive control H12, no-template control G12.
const PC_INDEX: usize = 95;
const NTC_INDEX: usize = 94;
/// Both viral Cts at most this: must be called early (they cross by cycle
/// ~20 and level off well before the positive control, Ct 28, has crossed
/// plus the margin).
const STRONG_CT: f64 = 19.0;
/// Any viral Ct above this (or none): must never be called early (too late
/// to settle before cycle 45 minus the margin, or negative).
const WEAK_CT: f64 = 33.0;

fn config(path: &str) -> String {
    format!(
        r#"{TEST_CONFIG}
[review]
early_calls = true
early_call_every = 2

[[cyclers]]
name = "qpcr-1"
serial = {{ path = {path:?}, baud = 115200 }}
timeout_ms = 2000
settle_ms = 200
reconnect_max_ms = 200

[[sinks]]
name = "central"
batch_size = 100
[sinks.files]
dir = "central-out"
ndjson = true
"#
    )
}

/// The simulator's standard plate with its controls moved to the kit's wells.
fn scenario() -> PlateScenario {
    let mut s = PlateScenario::standard(PlateFormat::Wells96, CHANNELS, 11);
    s.roles.swap(0, PC_INDEX);
    s.curves.swap(0, PC_INDEX);
    s.roles.swap(1, NTC_INDEX);
    s.curves.swap(1, NTC_INDEX);
    assert_eq!(s.roles[PC_INDEX], WellRole::PositiveControl);
    assert_eq!(s.roles[NTC_INDEX], WellRole::NoTemplateControl);
    // Six strong positives (both viral targets at Ct 15.5-18) and two weak
    // ones (Ct 35-36) among the standard plate's mix.
    for (k, well) in [3usize, 10, 17, 30, 47, 60].into_iter().enumerate() {
        for channel in 0..2 {
            s.curves[well][channel].ct = Some(15.5 + 0.5 * k as f64);
        }
    }
    for well in [23usize, 71] {
        for channel in 0..2 {
            s.curves[well][channel].ct = Some(35.0 + channel as f64);
        }
    }
    s
}

/// Waits (polling, 50 ms) until `ok` holds for the sink's records.
async fn wait_for_sink(dir: &Path, what: &str, ok: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let until = Instant::now() + DEADLINE;
    loop {
        let records = pcrd_tests::files_sink_records(dir);
        if ok(&records) {
            return records;
        }
        assert!(
            Instant::now() < until,
            "sink: not {what} within {DEADLINE:?}; {} records:\n{records:#?}",
            records.len()
        );
        // The pace of the polling, not a synchronisation.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Column-major index of a well label ("B3") on a 96-well plate.
fn index_of(label: &str) -> usize {
    PlateFormat::Wells96
        .wells_column_major()
        .position(|w| w.to_string() == label)
        .unwrap()
}

/// The preliminary records at the sink, by result id; asserts that each
/// result has only version 1 as preliminary, the same record each time it
/// was delivered (at-least-once may deliver it again, never change it).
fn preliminaries(records: &[Value]) -> BTreeMap<String, Value> {
    let mut out: BTreeMap<String, Value> = BTreeMap::new();
    for r in records.iter().filter(|r| r["status"] == "preliminary") {
        assert_eq!(r["version"], 1, "a preliminary is always version 1: {r:#}");
        let id = r["result_id"].as_str().unwrap().to_owned();
        if let Some(before) = out.get(&id) {
            assert_eq!(
                before, r,
                "preliminary of {id} delivered twice with changes"
            );
        }
        out.insert(id, r.clone());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strong_positives_are_reported_early_once_and_the_final_follows_as_version_2() {
    let sim = CyclerSim::new(CyclerSimConfig {
        // 45 cycles in about 9 s: time for the preliminaries to reach the
        // sink, and for a kill and restart, before the run ends.
        cycle_time: Duration::from_millis(200),
        ..CyclerSimConfig::default()
    });
    let truth = scenario();
    sim.set_scenario(truth.clone());
    let (master, slave) = tokio_serial::SerialStream::pair().unwrap();
    let path = tokio_serial::SerialPort::name(&slave).unwrap();
    sim.serve(master);
    let cfg = config(&path);
    let mut daemon = tokio::task::spawn_blocking(move || Daemon::start_with_config(&cfg))
        .await
        .unwrap();
    let sink = daemon.config_path().parent().unwrap().join("central-out");
    let api = daemon.client();
    api.wait_for("/api/v1/instruments/qpcr-1", "online", DEADLINE, |v| {
        v["online"] == true
    })
    .await;
    let plate = api.sealed_pcr_plate(KIT, "E").await;
    let r = api
        .post(
            "/api/v1/runs",
            json!({ "plate": plate, "instrument": "qpcr-1" }),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let run = r.body["id"].as_u64().unwrap();
    let run_path = format!("/api/v1/runs/{run}");

    // The truth: which wells must be called early, which never.
    let viral = |index: usize| -> Vec<Option<f64>> {
        truth.curves[index][..2].iter().map(|c| c.ct).collect()
    };
    let samples = (0..96).filter(|i| truth.roles[*i] == WellRole::Sample);
    let strong: BTreeSet<usize> = samples
        .clone()
        .filter(|i| {
            viral(*i)
                .iter()
                .all(|ct| ct.is_some_and(|c| c <= STRONG_CT))
        })
        .collect();
    let never: BTreeSet<usize> = samples
        .filter(|i| viral(*i).iter().any(|ct| ct.is_none_or(|c| c > WEAK_CT)))
        .collect();
    assert!(
        strong.len() >= 6,
        "the scenario needs strong positives: {strong:?}"
    );

    // A first preliminary reaches the sink while the run is still cycling.
    wait_for_sink(&sink, "a preliminary result", |r| {
        r.iter().any(|r| r["status"] == "preliminary")
    })
    .await;
    let now = api.get_ok(&run_path).await;
    assert_eq!(now["state"], "running", "{now:#}");
    let at = now["cycles_stored"].as_u64().unwrap();
    assert!(at < 45, "{now:#}");

    // SIGKILL mid-run, then start again: the run resumes.
    daemon.kill9();
    let before_restart = pcrd_tests::files_sink_records(&sink);
    daemon.restart();
    let api = daemon.client();
    let reviewer = daemon.client_as(REVIEWER_TOKEN);
    let ended = api
        .wait_for(&run_path, "finished", DEADLINE, |v| {
            v["state"] == "finished"
        })
        .await;
    assert_eq!(ended["cycles_stored"], 45, "{ended:#}");

    // Every strong positive was released early, and before the run ended
    // (the run's end stages finals, never preliminaries; a final's
    // `tested_at_ms` is the run's end).
    let mut early: BTreeMap<String, Value> = BTreeMap::new();
    let results = api
        .wait_for(
            "/api/v1/results?limit=1000",
            "finals staged",
            DEADLINE,
            |v| {
                v.as_array().is_some_and(|all| {
                    all.iter()
                        .filter(|c| c["run"] == run.to_string().as_str())
                        .all(|c| c["state"] != "preliminary")
                        && all.len() == 94
                })
            },
        )
        .await;
    for c in results.as_array().unwrap() {
        let index = index_of(c["well"].as_str().unwrap());
        let prelim: Vec<&Value> = c["versions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["status"] == "preliminary")
            .collect();
        assert!(prelim.len() <= 1, "{c:#}");
        if let Some(v) = prelim.first() {
            assert_eq!(v["version"], 1, "{c:#}");
            assert!(
                v["released_at_ms"].as_i64().unwrap() < c["tested_at_ms"].as_i64().unwrap(),
                "released before the run ended: {c:#}"
            );
            assert!(
                !never.contains(&index),
                "well {} (truth {:?}) was called early: {c:#}",
                c["well"],
                viral(index)
            );
            early.insert(c["result_id"].as_str().unwrap().to_owned(), c.clone());
        } else {
            assert!(
                !strong.contains(&index),
                "strong positive {} (truth {:?}) was not called early: {c:#}",
                c["well"],
                viral(index)
            );
        }
        if c["call"] == "not_detected" {
            assert!(prelim.is_empty(), "a negative was called early: {c:#}");
        }
    }
    assert!(early.len() >= strong.len(), "{early:#?}");

    // The sink: each early call exactly one preliminary version (the same
    // record whenever delivered), for positives only, none added by the crash.
    let delivered = wait_for_sink(&sink, "every preliminary delivered", |r| {
        preliminaries(r).len() == early.len()
    })
    .await;
    let prelims = preliminaries(&delivered);
    assert_eq!(
        prelims.keys().collect::<Vec<_>>(),
        early.keys().collect::<Vec<_>>()
    );
    for (id, r) in &prelims {
        assert_eq!(r["interpretation"], "positive", "{r:#}");
        assert!(
            before_restart
                .iter()
                .chain(delivered.iter())
                .filter(|d| d["result_id"] == id.as_str() && d["status"] == "preliminary")
                .all(|d| d["version"] == 1),
            "{id}"
        );
    }

    // The final of an early-called result: staged over it, awaiting a
    // reviewer (positives always do), and released as version 2, final.
    let (id, candidate) = early.iter().next().unwrap();
    let fresh = api.get_ok(&format!("/api/v1/results/{id}")).await;
    assert_eq!(fresh["state"], "awaiting_review", "{fresh:#}");
    assert_eq!(candidate["call"], "detected");
    let r = reviewer
        .post(&format!("/api/v1/results/{id}/release"), json!({}))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let records = wait_for_sink(&sink, "version 2 of the early call", |r| {
        r.iter()
            .any(|r| r["result_id"] == id.as_str() && r["version"] == 2)
    })
    .await;
    let finals: Vec<&Value> = records
        .iter()
        .filter(|r| r["result_id"] == id.as_str() && r["version"] == 2)
        .collect();
    assert_eq!(finals[0]["status"], "final", "{:#}", finals[0]);
    assert_eq!(finals[0]["interpretation"], "positive");

    // /metrics counts the early calls made since this start (the restart
    // may have made none: they can all have come before the kill).
    let metrics = api.get_text("/metrics").await;
    assert!(
        metric_value(&metrics.text, "pcrd_early_calls_total").is_some(),
        "{}",
        metrics.text
    );
    assert_eq!(
        metric_value(&metrics.text, "pcrd_early_calls_disagreed_total"),
        Some(0.0)
    );
}
