#![allow(clippy::unwrap_used)]
//! An extraction run that ends while the daemon is down (killed with -9 mid-run):
//! at the next start the daemon reads how it ended from the device and records
//! it, instead of showing the run as running forever (found by the demo's
//! twenty-kill reliability test, tests/tests/demo.rs).

use std::time::Duration;

use pcrd_drivers::sim::extractor::{Fault, SimConfig, Simulator};
use pcrd_protocol::extractor::Profile;
use pcrd_tests::{Api, Daemon, TEST_CONFIG};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(60);

fn sim(run_time: Duration) -> Simulator {
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

async fn sealed_extraction_plate(api: &Api, id: &str) {
    let tubes: Vec<Value> = (0..10)
        .map(|i| json!({ "barcode": format!("{id}-T{i:03}") }))
        .collect();
    assert_eq!(
        api.post("/api/v1/tubes", json!({ "tubes": tubes }))
            .await
            .status,
        200
    );
    let r = api
        .post(
            "/api/v1/plates",
            json!({ "kit": "sarscov2-orf1ab-n-ic", "id": id }),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    for step in ["fill", "seal"] {
        let r = api
            .post(&format!("/api/v1/plates/{id}/{step}"), json!({}))
            .await;
        assert_eq!(r.status, 200, "{step}: {r:?}");
    }
}

async fn start_daemon(addr: std::net::SocketAddr) -> Daemon {
    let profile = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../profiles/sim-extractor.toml")
        .display()
        .to_string();
    let config = format!(
        "{TEST_CONFIG}\n[[extractors]]\nname = \"ext-1\"\nprofile = {profile:?}\ntcp = \"{addr}\"\ntimeout_ms = 300\n"
    );
    tokio::task::spawn_blocking(move || Daemon::start_with_config(&config))
        .await
        .unwrap()
}

async fn run_then_kill(sim: &Simulator, plate: &str) -> (Daemon, u64) {
    let server = sim.serve_tcp().await.unwrap();
    let mut daemon = start_daemon(server.addr).await;
    let api = daemon.client();
    api.wait_for(
        "/api/v1/instruments/ext-1",
        "online and idle",
        DEADLINE,
        |v| v["online"] == true && v["state"] == "idle",
    )
    .await;
    sealed_extraction_plate(&api, plate).await;
    let r = api
        .post(
            "/api/v1/runs",
            json!({ "plate": plate, "instrument": "ext-1" }),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let id = r.body["id"].as_u64().unwrap();
    api.wait_for(&format!("/api/v1/runs/{id}"), "running", DEADLINE, |v| {
        v["state"] == "running"
    })
    .await;
    daemon.kill9();
    // The server must outlive this function: the daemon reconnects to it.
    std::mem::forget(server);
    (daemon, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_completes_while_the_daemon_is_down_is_finished_at_restart() {
    let sim = sim(Duration::from_millis(1500));
    let (mut daemon, id) = run_then_kill(&sim, "EXT-DOWN1").await;
    // The run completes on the instrument while no daemon watches.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let daemon = tokio::task::spawn_blocking(move || {
        daemon.restart();
        daemon
    })
    .await
    .unwrap();
    let api = daemon.client();
    let run = api
        .wait_for(&format!("/api/v1/runs/{id}"), "finished", DEADLINE, |v| {
            v["state"] != "running" && v["state"] != "starting"
        })
        .await;
    assert_eq!(run["state"], "finished", "{run:#}");
    assert_eq!(run["cycles_stored"], 100, "{run:#}");
    // The extractor is free for the next plate.
    api.wait_for("/api/v1/instruments/ext-1", "idle", DEADLINE, |v| {
        v["state"] == "idle"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_fails_while_the_daemon_is_down_is_failed_at_restart_with_the_code() {
    let sim = sim(Duration::from_millis(2000));
    sim.inject(
        1,
        Fault::ErrorAt {
            at_percent: 60.0,
            code: 102,
        },
    );
    let (mut daemon, id) = run_then_kill(&sim, "EXT-DOWN2").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let daemon = tokio::task::spawn_blocking(move || {
        daemon.restart();
        daemon
    })
    .await
    .unwrap();
    let api = daemon.client();
    let run = api
        .wait_for(&format!("/api/v1/runs/{id}"), "ended", DEADLINE, |v| {
            v["state"] != "running" && v["state"] != "starting"
        })
        .await;
    assert_eq!(run["state"], "failed", "{run:#}");
    assert!(run["reason"].as_str().unwrap().contains("102"), "{run:#}");
}
