#![allow(clippy::unwrap_used)]
//! `pcrd serve` follows its configured extractors: the simulator runs in this test
//! process on 127.0.0.1, the real daemon is configured to it over Modbus TCP, and
//! everything is checked through the API and /metrics: the instrument comes online, a
//! run started on the instrument's panel shows progress and then completes, and when
//! the simulator goes away the instrument shows offline with the reason and comes back
//! online by itself. Every wait polls the API against a deadline.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pcrd_drivers::sim::extractor::{Fault, SimConfig, Simulator};
use pcrd_protocol::extractor::{ExtractorCommand, Profile};
use pcrd_tests::{Api, Daemon, TEST_CONFIG, metric_value};
use serde_json::Value;

/// Generous for a loaded CI machine; each wait normally ends within a few polls
/// (the simulator profile polls at 2 Hz).
const DEADLINE: Duration = Duration::from_secs(30);

fn profile_path() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../profiles/sim-extractor.toml")
        .display()
        .to_string()
}

fn simulator(run_time: Duration) -> Simulator {
    let profile =
        Profile::from_toml_str(include_str!("../../profiles/sim-extractor.toml")).unwrap();
    Simulator::new(
        Arc::new(profile),
        &[1],
        SimConfig {
            run_time,
            ..SimConfig::default()
        },
    )
}

async fn start_daemon(extra: String) -> Daemon {
    let config = format!("{TEST_CONFIG}\n{extra}");
    tokio::task::spawn_blocking(move || Daemon::start_with_config(&config))
        .await
        .unwrap()
}

/// Polls `GET /api/v1/instruments/{name}` until `ok` holds, or fails with what was
/// last seen.
async fn wait_for(api: &Api, name: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + DEADLINE;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        let reply = api.get(&format!("/api/v1/instruments/{name}")).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        if ok(&reply.body) {
            return reply.body;
        }
        last = reply.body;
        // The pace of the API polling, not a synchronisation: the condition is
        // checked again until the deadline.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{name}: not {what} within {DEADLINE:?}; last seen:\n{last:#}");
}

async fn metric(api: &Api, name: &str) -> Option<f64> {
    let text = api.get_text("/metrics").await;
    metric_value(&text.text, name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_follows_an_extractor_through_a_run_and_a_lost_link() {
    // A 4 s run polled at 2 Hz: several readings strictly between 0 and 100 %.
    let sim = simulator(Duration::from_secs(4));
    let server = sim.serve_tcp().await.unwrap();
    let daemon = start_daemon(format!(
        "[[extractors]]\nname = \"ext-1\"\nprofile = {:?}\ntcp = \"{}\"\ntimeout_ms = 300\n",
        profile_path(),
        server.addr
    ))
    .await;
    let api = daemon.client();

    let list = api.get_ok("/api/v1/instruments").await;
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list:#}");
    assert_eq!(list[0]["name"], "ext-1");
    assert_eq!(list[0]["link"], format!("tcp {}", server.addr));
    assert_eq!(list[0]["profile"], "pcrd-sim-extractor");

    let seen = wait_for(&api, "ext-1", "online and idle", |v| {
        v["online"] == true && v["status"]["state"] == "idle"
    })
    .await;
    assert_eq!(seen["connection"], "online");
    assert!(seen["offline_reason"].is_null(), "{seen:#}");
    assert!(seen["run"].is_null(), "{seen:#}");

    // The operator loads protocol 3 and starts plate EXT-PLATE-0001 on the panel.
    sim.operate(1, ExtractorCommand::LoadProtocol(3)).unwrap();
    sim.operate(
        1,
        ExtractorCommand::Start {
            barcode: "EXT-PLATE-0001".into(),
        },
    )
    .unwrap();
    let running = wait_for(&api, "ext-1", "running with progress", |v| {
        let p = v["run"]["progress"].as_f64().unwrap_or(0.0);
        p > 0.0 && p < 100.0
    })
    .await;
    let run = &running["run"];
    assert_eq!(run["plate_barcode"], "EXT-PLATE-0001");
    assert_eq!(run["protocol"], 3);
    assert_eq!(run["state"], "running");
    assert!(run["remaining_s"].as_f64().unwrap() > 0.0, "{run:#}");
    assert!(run["outcome"].is_null(), "{run:#}");
    assert_eq!(
        metric(&api, "pcrd_instrument_running{instrument=\"ext-1\"}").await,
        Some(1.0)
    );

    let done = wait_for(&api, "ext-1", "done with the run", |v| {
        v["run"].is_null() && v["last_run"]["outcome"] == "completed"
    })
    .await;
    let last = &done["last_run"];
    assert_eq!(last["plate_barcode"], "EXT-PLATE-0001");
    assert_eq!(last["state"], "completed");
    assert_eq!(last["progress"], 100.0);
    assert!(last["ended_at"].is_string(), "{last:#}");
    assert_eq!(done["status"]["state"], "completed");
    assert_eq!(
        metric(
            &api,
            "pcrd_instrument_runs_completed_total{instrument=\"ext-1\"}"
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        metric(&api, "pcrd_instrument_online{instrument=\"ext-1\"}").await,
        Some(1.0)
    );
    assert!(metric(&api, "pcrd_instrument_polls_total{instrument=\"ext-1\"}").await > Some(0.0));

    // The instrument goes away: connections closed, connects refused.
    server.go_down().await;
    let offline = wait_for(&api, "ext-1", "offline", |v| v["online"] == false).await;
    assert_eq!(offline["connection"], "offline");
    let reason = offline["offline_reason"].as_str().unwrap_or_default();
    assert!(!reason.is_empty(), "{offline:#}");
    // The last known status stays visible.
    assert_eq!(offline["status"]["state"], "completed");
    assert_eq!(
        metric(&api, "pcrd_instrument_online{instrument=\"ext-1\"}").await,
        Some(0.0)
    );
    assert!(
        metric(
            &api,
            "pcrd_instrument_poll_errors_total{instrument=\"ext-1\"}"
        )
        .await
            > Some(0.0)
    );

    // It comes back: the daemon reconnects by itself.
    server.come_back().await.unwrap();
    let back = wait_for(&api, "ext-1", "online again", |v| v["online"] == true).await;
    assert!(back["offline_reason"].is_null(), "{back:#}");
    assert!(back["reconnects"].as_u64().unwrap() >= 1, "{back:#}");
    assert!(
        metric(
            &api,
            "pcrd_instrument_reconnects_total{instrument=\"ext-1\"}"
        )
        .await
            >= Some(1.0)
    );

    let logs = daemon.stderr();
    assert!(logs.contains("Extraction run completed."), "{logs}");
    assert!(logs.contains("ext-1"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_in_progress_survives_a_lost_link() {
    let sim = simulator(Duration::from_secs(6));
    let server = sim.serve_tcp().await.unwrap();
    let daemon = start_daemon(format!(
        "[[extractors]]\nname = \"ext-2\"\nprofile = {:?}\ntcp = \"{}\"\ntimeout_ms = 300\n",
        profile_path(),
        server.addr
    ))
    .await;
    let api = daemon.client();
    wait_for(&api, "ext-2", "online", |v| v["online"] == true).await;
    sim.operate(1, ExtractorCommand::LoadProtocol(1)).unwrap();
    sim.operate(
        1,
        ExtractorCommand::Start {
            barcode: "EXT-PLATE-0002".into(),
        },
    )
    .unwrap();
    wait_for(&api, "ext-2", "running", |v| {
        v["run"]["plate_barcode"] == "EXT-PLATE-0002"
    })
    .await;

    server.go_down().await;
    let offline = wait_for(&api, "ext-2", "offline", |v| v["online"] == false).await;
    // Offline does not fail the run: it is still followed.
    assert_eq!(
        offline["run"]["plate_barcode"], "EXT-PLATE-0002",
        "{offline:#}"
    );
    assert!(offline["run"]["outcome"].is_null(), "{offline:#}");

    server.come_back().await.unwrap();
    // The device went on meanwhile; the daemon picks the run up from its state and
    // sees it complete.
    let done = wait_for(&api, "ext-2", "done with the run", |v| {
        v["last_run"]["outcome"] == "completed"
    })
    .await;
    assert_eq!(done["last_run"]["plate_barcode"], "EXT-PLATE-0002");
    assert!(done["run"].is_null(), "{done:#}");
    let logs = daemon.stderr();
    assert!(logs.contains("Run re-synchronised"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_error_mid_run_ends_the_run_with_the_reason_and_is_logged_as_an_error() {
    let sim = simulator(Duration::from_secs(4));
    sim.inject(
        1,
        Fault::ErrorAt {
            at_percent: 40.0,
            code: 102,
        },
    );
    let server = sim.serve_tcp().await.unwrap();
    let daemon = start_daemon(format!(
        "[[extractors]]\nname = \"ext-3\"\nprofile = {:?}\ntcp = \"{}\"\ntimeout_ms = 300\n",
        profile_path(),
        server.addr
    ))
    .await;
    let api = daemon.client();
    wait_for(&api, "ext-3", "online", |v| v["online"] == true).await;
    sim.operate(1, ExtractorCommand::LoadProtocol(2)).unwrap();
    sim.operate(
        1,
        ExtractorCommand::Start {
            barcode: "EXT-PLATE-0003".into(),
        },
    )
    .unwrap();
    let failed = wait_for(&api, "ext-3", "stopped on the error", |v| {
        v["last_run"]["outcome"] == "device_error"
    })
    .await;
    let last = &failed["last_run"];
    assert_eq!(last["plate_barcode"], "EXT-PLATE-0003");
    assert_eq!(last["error"]["code"], 102);
    assert_eq!(last["error"]["reason"], "Magnetic rod head blocked");
    assert!(failed["run"].is_null(), "{failed:#}");
    assert_eq!(failed["status"]["state"], "error");
    // Never counted as a completion.
    assert_eq!(
        metric(
            &api,
            "pcrd_instrument_runs_completed_total{instrument=\"ext-3\"}"
        )
        .await,
        Some(0.0)
    );
    let deadline = Instant::now() + DEADLINE;
    while !daemon.stderr().contains("an operator must check the plate") {
        assert!(Instant::now() < deadline, "{}", daemon.stderr());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logs = daemon.stderr();
    let line = logs
        .lines()
        .find(|l| l.contains("an operator must check the plate"))
        .unwrap();
    assert!(line.contains("ERROR") && line.contains("ext-3"), "{line}");
}

/// Two extractors (units 1 and 2) on one RS-485 line, here a pseudo-terminal: the
/// daemon serves both through one task that owns the port. The daemon opens ports
/// exclusively (TIOCEXCL), so a second open of the same port would be refused and one
/// of the two would stay offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_units_on_one_serial_line_share_the_port() {
    use tokio_serial::SerialPort;
    let profile =
        Profile::from_toml_str(include_str!("../../profiles/sim-extractor.toml")).unwrap();
    let sim = Simulator::new(
        Arc::new(profile),
        &[1, 2],
        SimConfig {
            run_time: Duration::from_secs(3),
            ..SimConfig::default()
        },
    );
    let (master, slave) = tokio_serial::SerialStream::pair().unwrap();
    let path = slave.name().unwrap();
    let _server = sim.serve_rtu(master);
    let mut extra = String::new();
    for (name, unit) in [("ext-a", 1), ("ext-b", 2)] {
        extra.push_str(&format!(
            "[[extractors]]\nname = \"{name}\"\nprofile = {:?}\nunit = {unit}\nserial = {{ path = {path:?}, baud = 115200 }}\n\n",
            profile_path()
        ));
    }
    let daemon = start_daemon(extra).await;
    let api = daemon.client();
    for name in ["ext-a", "ext-b"] {
        let seen = wait_for(&api, name, "online", |v| v["online"] == true).await;
        assert_eq!(seen["link"], format!("serial {path}"));
    }
    sim.operate(2, ExtractorCommand::LoadProtocol(4)).unwrap();
    sim.operate(
        2,
        ExtractorCommand::Start {
            barcode: "EXT-PLATE-B".into(),
        },
    )
    .unwrap();
    let done = wait_for(&api, "ext-b", "done with the run", |v| {
        v["last_run"]["outcome"] == "completed"
    })
    .await;
    assert_eq!(done["last_run"]["plate_barcode"], "EXT-PLATE-B");
    let a = api.get_ok("/api/v1/instruments/ext-a").await;
    assert!(a["online"] == true && a["last_run"].is_null(), "{a:#}");
    assert_eq!(a["status"]["state"], "idle");
    drop(slave);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_starts_without_instruments_and_with_an_unreachable_one() {
    let daemon = start_daemon(String::new()).await;
    let api = daemon.client();
    assert_eq!(
        api.get_ok("/api/v1/instruments").await,
        serde_json::json!([])
    );
    let reply = api.get("/api/v1/instruments/nope").await;
    assert_eq!(reply.status, 404, "{}", reply.body);
    assert_eq!(reply.body["error"]["code"], "not_found");

    // Nothing listens on this port (bound, then closed).
    let addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let daemon = start_daemon(format!(
        "[[extractors]]\nname = \"ext-gone\"\nprofile = {:?}\ntcp = \"{addr}\"\ntimeout_ms = 200\n",
        profile_path()
    ))
    .await;
    let api = daemon.client();
    let seen = wait_for(&api, "ext-gone", "offline", |v| {
        v["connection"] == "offline"
    })
    .await;
    let reason = seen["offline_reason"].as_str().unwrap_or_default();
    assert!(reason.contains(&addr.to_string()), "{seen:#}");
    // The rest of the daemon works meanwhile.
    assert_eq!(api.get("/healthz").await.status, 200);
}
