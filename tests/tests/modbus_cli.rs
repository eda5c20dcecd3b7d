#![allow(clippy::unwrap_used)]
//! `pcrd instrument check NAME --config FILE` against the simulated extractor on
//! 127.0.0.1: it identifies the instrument and prints its status as JSON without a
//! daemon, and fails with distinct exit codes for an unknown name and an unreachable
//! instrument.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pcrd_drivers::sim::extractor::{SimConfig, Simulator};
use pcrd_protocol::extractor::Profile;
use pcrd_tests::{TEST_CONFIG, pcrd_bin};

fn profile_path() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../profiles/sim-extractor.toml")
        .display()
        .to_string()
}

fn config_with(dir: &Path, tcp: &str) -> std::path::PathBuf {
    let text = format!(
        "{TEST_CONFIG}\n[[extractors]]\nname = \"ext-1\"\nprofile = {:?}\ntcp = {tcp:?}\ntimeout_ms = 300\n",
        profile_path()
    );
    let path = dir.join("pcrd.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn check(config: &Path, name: &str) -> std::process::Output {
    let bin = pcrd_bin();
    tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(bin)
            .args(["instrument", "check", name, "--config"])
            .arg(config)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("pcrd instrument check did not finish")
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instrument_check_identifies_and_prints_status_as_json() {
    let profile =
        Profile::from_toml_str(include_str!("../../profiles/sim-extractor.toml")).unwrap();
    let sim = Simulator::new(Arc::new(profile), &[1], SimConfig::default());
    let server = sim.serve_tcp().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(dir.path(), &server.addr.to_string());

    let out = check(&config, "ext-1").await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(json["instrument"], "ext-1");
    assert_eq!(json["profile"]["name"], "pcrd-sim-extractor");
    assert_eq!(json["identity"]["model"], "PCRD-SIM-X96");
    assert_eq!(json["status"]["state"], "idle");
    assert_eq!(json["status"]["anomalies"], serde_json::json!([]));
    assert!(sim.requests(1) >= 2);

    let out = check(&config, "nope").await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ext-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instrument_check_reports_an_unreachable_instrument_with_exit_4() {
    // A port nobody listens on: bound, then closed.
    let addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(dir.path(), &addr.to_string());
    let out = check(&config, "ext-1").await;
    assert_eq!(out.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ext-1") && stderr.contains("offline"),
        "{stderr}"
    );
}
