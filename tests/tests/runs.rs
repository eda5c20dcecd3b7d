#![allow(clippy::unwrap_used)]
//! Run orchestration end to end: the real daemon binary drives the simulated
//! cycler (over a real pseudo-terminal pair) and, when the run finishes,
//! analyses the stored cycles with the plate's kit. Checked through the API
//! and the `pcrd run` CLI:
//!
//! - the analysis of a finished run has the simulator's truth: positives with
//!   Cts near the true Ct, negatives undetermined, controls valid;
//! - a second start on a busy cycler is refused with 409;
//! - `pcrd run watch` follows a run to its end, shows progress, exits 0;
//! - an extraction run on the simulated Modbus extractor (real TCP on
//!   127.0.0.1) finishes and the plate is extracted; a device error fails it
//!   with the reason, and the plate runs again once the error is cleared.

use std::time::Duration;

use pcrd_drivers::sim::cycler::{
    CyclerSim, CyclerSimConfig, PlateScenario, REFERENCE_THRESHOLD, WellRole,
};
use pcrd_drivers::sim::extractor::{Fault, SimConfig, Simulator};
use pcrd_protocol::domain::PlateFormat;
use pcrd_protocol::extractor::{ExtractorCommand, Profile};
use pcrd_tests::{Api, Daemon, TECH_TOKEN, TEST_CONFIG, pcrd_bin};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(90);
const KIT: &str = "sarscov2-orf1ab-n-ic";
const CHANNELS: usize = 3;
/// The kit's 96-well layout: positive control H12, no-template control G12
/// (column-major indices 95 and 94).
const PC_INDEX: usize = 95;
const NTC_INDEX: usize = 94;

fn cycler_config(name: &str, path: &str) -> String {
    format!(
        "{TEST_CONFIG}\n[[cyclers]]\nname = \"{name}\"\nserial = {{ path = {path:?}, baud = 115200 }}\ntimeout_ms = 2000\nsettle_ms = 200\nreconnect_max_ms = 200\n"
    )
}

/// The simulator's standard plate with its controls moved to the wells the
/// kit's layout reserves for them, so the plate and the curves agree.
fn scenario() -> PlateScenario {
    let mut s = PlateScenario::standard(PlateFormat::Wells96, CHANNELS, 7);
    s.roles.swap(0, PC_INDEX);
    s.curves.swap(0, PC_INDEX);
    s.roles.swap(1, NTC_INDEX);
    s.curves.swap(1, NTC_INDEX);
    assert_eq!(s.roles[PC_INDEX], WellRole::PositiveControl);
    assert_eq!(s.roles[NTC_INDEX], WellRole::NoTemplateControl);
    s
}

/// Polls `GET path` until `ok` holds (`Api::wait_for` with this file's deadline).
async fn wait_for(api: &Api, path: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    api.wait_for(path, what, DEADLINE, ok).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_pcr_run_is_analysed_with_the_kit_and_watched_from_the_cli() {
    let sim = CyclerSim::new(CyclerSimConfig {
        cycle_time: Duration::from_millis(40),
        ..CyclerSimConfig::default()
    });
    let truth = scenario();
    sim.set_scenario(truth.clone());
    let (master, slave) = tokio_serial::SerialStream::pair().unwrap();
    let path = tokio_serial::SerialPort::name(&slave).unwrap();
    sim.serve(master);
    let config = cycler_config("qpcr-1", &path);
    let daemon = tokio::task::spawn_blocking(move || Daemon::start_with_config(&config))
        .await
        .unwrap();
    let api = daemon.client();
    wait_for(&api, "/api/v1/instruments/qpcr-1", "online", |v| {
        v["online"] == true
    })
    .await;
    let plate = api.sealed_pcr_plate(KIT, "A").await;
    let other = api.sealed_pcr_plate(KIT, "B").await;

    // `pcrd run start` starts it and prints the run id.
    let url = daemon.url.clone();
    let cli = move |args: &[&str]| {
        std::process::Command::new(pcrd_bin())
            .args(args)
            .env("PCRD_API", &url)
            .env("PCRD_TOKEN", TECH_TOKEN)
            .output()
            .unwrap()
    };
    let started = cli(&[
        "run",
        "start",
        "--plate",
        &plate,
        "--instrument",
        "qpcr-1",
        "--json",
    ]);
    assert!(
        started.status.success(),
        "{}",
        String::from_utf8_lossy(&started.stderr)
    );
    let run: Value = serde_json::from_slice(&started.stdout).unwrap();
    let id = run["id"].as_u64().unwrap();

    // No second run on a busy cycler.
    let r = api
        .post(
            "/api/v1/runs",
            json!({ "plate": other, "instrument": "qpcr-1" }),
        )
        .await;
    assert_eq!(r.status, 409, "{r:?}");
    assert!(r.message().contains("busy"), "{r:?}");
    // No analysis before the end.
    let r = api.get(&format!("/api/v1/runs/{id}/analysis")).await;
    assert_eq!(r.status, 409, "{r:?}");

    // `pcrd run watch` follows it to the end and exits 0.
    let id_text = id.to_string();
    let watch = cli.clone();
    let watched = tokio::task::spawn_blocking(move || watch(&["run", "watch", &id_text]))
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&watched.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&watched.stderr).into_owned();
    assert_eq!(watched.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("finished"), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("cycle") || stdout.contains("cycle"),
        "no progress shown:\n{stdout}\n{stderr}"
    );

    let analysis = wait_for(
        &api,
        &format!("/api/v1/runs/{id}/analysis"),
        "analysed",
        |v| v["plate"]["run"] == id,
    )
    .await;
    assert_eq!(analysis["plate"]["valid"], true, "{:#}", analysis["plate"]);
    assert!(
        analysis["plate"]["error"].is_null(),
        "{:#}",
        analysis["plate"]
    );
    let wells = analysis["wells"].as_array().unwrap();
    assert_eq!(wells.len(), 96);
    let names: Vec<String> = PlateFormat::Wells96
        .wells_column_major()
        .map(|w| w.to_string())
        .collect();
    let (mut positives, mut negatives) = (0, 0);
    for (index, role) in truth.roles.iter().enumerate() {
        let well = wells
            .iter()
            .find(|w| w["well"] == names[index])
            .unwrap_or_else(|| panic!("well {} missing", names[index]));
        for (ch, target) in well["targets"].as_array().unwrap().iter().enumerate() {
            let curve = &truth.curves[index][ch];
            match curve.ct {
                Some(t_ref) => {
                    let ct = target["ct"].as_f64().unwrap_or_else(|| {
                        panic!("{}: {target} has no Ct, true Ct {t_ref}", names[index])
                    });
                    // The simulator's Ct is the crossing of its reference
                    // threshold; the true crossing of the threshold pcrd chose
                    // follows from the same logistic model.
                    let threshold = target["threshold"].as_f64().unwrap();
                    let slope = 1.0 / curve.efficiency.ln();
                    let a = curve.plateau;
                    let t = t_ref
                        + slope
                            * ((a / REFERENCE_THRESHOLD - 1.0).ln() - (a / threshold - 1.0).ln());
                    assert!(
                        (ct - t).abs() < 0.5,
                        "{} {}: Ct {ct}, true {t} at threshold {threshold} (reference Ct {t_ref})",
                        names[index],
                        target["target"]
                    );
                }
                None => assert!(
                    target["ct"].is_null(),
                    "{} {}: a negative got Ct {}",
                    names[index],
                    target["target"],
                    target["ct"]
                ),
            }
        }
        match role {
            WellRole::Sample => {
                let viral_positive = truth.curves[index][..2].iter().all(|c| c.ct.is_some());
                let expected = if viral_positive {
                    positives += 1;
                    "detected"
                } else {
                    negatives += 1;
                    "not_detected"
                };
                assert_eq!(well["call"], expected, "{well:#}");
                assert_eq!(well["kind"], "sample");
            }
            _ => {
                assert_eq!(well["kind"], "control", "{well:#}");
                assert!(well["call"].is_null(), "{well:#}");
            }
        }
    }
    assert!(positives > 10 && negatives > 10, "{positives} {negatives}");
    assert_eq!(analysis["plate"]["calls"]["detected"], positives);
    assert_eq!(analysis["plate"]["calls"]["not_detected"], negatives);

    // The judged run is staged for review: one candidate per specimen well, from
    // this run, with the same calls (none released: auto-release is off by default).
    let id_text = id.to_string();
    let staged = wait_for(
        &api,
        "/api/v1/results?limit=1000",
        "candidates staged",
        |v| {
            v.as_array().is_some_and(|all| {
                all.iter()
                    .filter(|c| c["source"]["kind"] == "pcr_run" && c["run"] == id_text.as_str())
                    .count()
                    == positives + negatives
            })
        },
    )
    .await;
    let from_run: Vec<&Value> = staged
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["run"] == id_text.as_str())
        .collect();
    let detected = from_run.iter().filter(|c| c["call"] == "detected").count();
    assert_eq!(detected, positives, "{from_run:#?}");
    assert!(
        from_run
            .iter()
            .all(|c| c["state"] == "awaiting_review" && c["plate"] == plate.as_str()),
        "{from_run:#?}"
    );

    // `pcrd run analysis` shows the same in words.
    let shown = cli(&["run", "analysis", &id.to_string()]);
    let text = String::from_utf8_lossy(&shown.stdout).into_owned();
    assert!(shown.status.success(), "{text}");
    assert!(text.contains("plate valid"), "{text}");
    assert!(text.contains(&format!("detected {positives}")), "{text}");

    // The other plate starts now; `pcrd run abort` stops it with the reason,
    // and `pcrd run watch` of an aborted run exits 1.
    let r = api
        .post(
            "/api/v1/runs",
            json!({ "plate": other, "instrument": "qpcr-1" }),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let second = r.body["id"].as_u64().unwrap().to_string();
    let aborted = cli(&["run", "abort", &second, "--reason", "lid check"]);
    let text = String::from_utf8_lossy(&aborted.stdout).into_owned();
    assert!(
        aborted.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&aborted.stderr)
    );
    assert!(
        text.contains("aborted") && text.contains("lid check"),
        "{text}"
    );
    let watched = cli(&["run", "watch", &second]);
    assert_eq!(watched.status.code(), Some(1), "{watched:?}");
    assert!(
        String::from_utf8_lossy(&watched.stderr).contains("lid check"),
        "{watched:?}"
    );
    wait_for(&api, "/api/v1/instruments/qpcr-1", "idle", |v| {
        v["state"] == "idle"
    })
    .await;

    // The instrument list shows the cycler idle again.
    let listed = cli(&["instrument", "list", "--json"]);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    let q = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "qpcr-1")
        .unwrap();
    assert_eq!(q["state"], "idle", "{q:#}");
}

fn extractor_sim(run_time: Duration) -> Simulator {
    let profile =
        Profile::from_toml_str(include_str!("../../profiles/sim-extractor.toml")).unwrap();
    Simulator::new(
        std::sync::Arc::new(profile),
        &[1],
        SimConfig {
            run_time,
            ..SimConfig::default()
        },
    )
}

/// Polls `GET path` every 20 ms (faster than `Api::wait_for`) until `ok`
/// holds, to catch what the daemon shows in the moment a state changes.
async fn poll_fast(api: &Api, path: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let until = std::time::Instant::now() + DEADLINE;
    let mut last = Value::Null;
    while std::time::Instant::now() < until {
        let reply = api.get(path).await;
        if reply.status == 200 && ok(&reply.body) {
            return reply.body;
        }
        last = reply.body;
        // The pace of the polling, not a synchronisation.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("GET {path}: not as expected within {DEADLINE:?}; last seen:\n{last:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extraction_run_fails_on_a_device_error_and_the_plate_runs_again() {
    let sim = extractor_sim(Duration::from_secs(3));
    sim.inject(
        1,
        Fault::ErrorAt {
            at_percent: 40.0,
            code: 102,
        },
    );
    let server = sim.serve_tcp().await.unwrap();
    let profile = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../profiles/sim-extractor.toml")
        .display()
        .to_string();
    let config = format!(
        "{TEST_CONFIG}\n[[extractors]]\nname = \"ext-1\"\nprofile = {profile:?}\ntcp = \"{}\"\ntimeout_ms = 300\n",
        server.addr
    );
    let daemon = tokio::task::spawn_blocking(move || Daemon::start_with_config(&config))
        .await
        .unwrap();
    let api = daemon.client();
    wait_for(&api, "/api/v1/instruments/ext-1", "online and idle", |v| {
        v["online"] == true && v["state"] == "idle"
    })
    .await;

    let tubes: Vec<Value> = (0..94)
        .map(|i| json!({ "barcode": format!("TX{i:04}") }))
        .collect();
    assert_eq!(
        api.post("/api/v1/tubes", json!({ "tubes": tubes }))
            .await
            .status,
        200
    );
    let r = api
        .post("/api/v1/plates", json!({ "kit": KIT, "id": "EXT-X" }))
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    // Not sealed yet: refused.
    let start = json!({ "plate": "EXT-X", "instrument": "ext-1", "protocol": "3" });
    let r = api.post("/api/v1/runs", start.clone()).await;
    assert_eq!(r.status, 409, "{r:?}");
    assert!(r.message().contains("not sealed"), "{r:?}");
    assert_eq!(
        api.post("/api/v1/plates/EXT-X/fill", json!({}))
            .await
            .status,
        200
    );
    assert_eq!(
        api.post("/api/v1/plates/EXT-X/seal", json!({}))
            .await
            .status,
        200
    );
    let r = api
        .post(
            "/api/v1/runs",
            json!({ "plate": "EXT-X", "instrument": "ext-1", "protocol": "x" }),
        )
        .await;
    assert_eq!(r.status, 422, "{r:?}");

    // First run: the device fails at 40 %.
    let r = api.post("/api/v1/runs", start.clone()).await;
    assert_eq!(r.status, 201, "{r:?}");
    let first = r.body["id"].as_u64().unwrap();
    assert_eq!(
        sim.commands(1),
        vec![
            ExtractorCommand::LoadProtocol(3),
            ExtractorCommand::Start {
                barcode: "EXT-X".into()
            }
        ]
    );
    // The plate is on the extractor: neither it nor another goes on it now.
    let r = api.post("/api/v1/runs", start.clone()).await;
    assert_eq!(r.status, 409, "{r:?}");
    // Polled fast (20 ms) and the re-run asked for the moment the failure
    // shows: the daemon may still be recording it, and that must not surface
    // as a misleading "a run is being started or aborted" conflict.
    let failed = poll_fast(&api, &format!("/api/v1/runs/{first}"), |v| {
        v["state"] == "failed"
    })
    .await;
    // While the device is in error, a re-run is refused with what to do.
    let r = api.post("/api/v1/runs", start.clone()).await;
    assert_eq!(r.status, 409, "{r:?}");
    assert!(
        r.message().contains("clear the error on the instrument"),
        "{r:?}"
    );
    assert!(r.message().contains("102"), "{r:?}");
    let reason = failed["reason"].as_str().unwrap();
    assert!(reason.contains("102"), "{failed:#}");
    let seen = api.get_ok("/api/v1/instruments/ext-1").await;
    assert_eq!(seen["state"], "error", "{seen:#}");
    assert!(
        seen["state_reason"].as_str().unwrap().contains("102"),
        "{seen:#}"
    );
    // And again, several times in a row, while the follower keeps checking.
    for _ in 0..10 {
        let r = api.post("/api/v1/runs", start.clone()).await;
        assert_eq!(r.status, 409, "{r:?}");
        assert!(
            r.message().contains("clear the error on the instrument"),
            "{r:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The operator clears the error on the panel; the same plate runs again.
    sim.clear_faults(1);
    sim.operate(1, ExtractorCommand::AcknowledgeError).unwrap();
    wait_for(&api, "/api/v1/instruments/ext-1", "idle", |v| {
        v["state"] == "idle"
    })
    .await;
    let r = api.post("/api/v1/runs", start.clone()).await;
    assert_eq!(r.status, 201, "{r:?}");
    let second = r.body["id"].as_u64().unwrap();
    assert_ne!(second, first);
    // Progress is followed from the polls.
    wait_for(
        &api,
        &format!("/api/v1/runs/{second}"),
        "running with progress",
        |v| {
            v["state"] == "running"
                && v["cycles_stored"]
                    .as_u64()
                    .is_some_and(|p| p > 0 && p < 100)
        },
    )
    .await;
    let done = wait_for(&api, &format!("/api/v1/runs/{second}"), "finished", |v| {
        v["state"] == "finished"
    })
    .await;
    assert_eq!(done["cycles_stored"], 100, "{done:#}");
    assert!(done["reason"].is_null(), "{done:#}");
    // Extracted once: not again.
    let r = api.post("/api/v1/runs", start).await;
    assert_eq!(r.status, 409, "{r:?}");
    assert!(r.message().contains("already has extraction run"), "{r:?}");
    // The failed run keeps its reason.
    let kept = api.get_ok(&format!("/api/v1/runs/{first}")).await;
    assert_eq!(kept["state"], "failed");
}
