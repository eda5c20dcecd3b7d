#![allow(clippy::unwrap_used)]
//! The gateway's panel through the real daemon: a simulated panel (`[panel] kind =
//! "sim"`, active-low lines) beside an extractor simulator on 127.0.0.1 over Modbus
//! TCP. The lamp is green at start; a run on the extractor turns it amber; the
//! extractor failing with a device error turns it red, blinking, with the buzzer on
//! and the fault named; a press through the API goes through the simulated pins (with
//! contact bounce) and the debouncer, acknowledges the fault, and a press on a green
//! lamp shows as a `start` action in the API and the log (refused there: no plate is
//! ready). With a simulated cycler over a pseudo-terminal: a short press starts the
//! one sealed PCR plate ready, the lamp turns amber, a long then a short press aborts
//! the run "from the panel", and with two plates ready a press is refused and says
//! so. Every wait polls the API against a deadline.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pcrd_drivers::sim::cycler::{CyclerSim, CyclerSimConfig};
use pcrd_drivers::sim::extractor::{Fault, SimConfig, Simulator};
use pcrd_protocol::extractor::{ExtractorCommand, Profile};
use pcrd_tests::{Api, Daemon, REVIEWER_TOKEN, TEST_CONFIG, metric_value};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(30);

fn profile_path() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../profiles/sim-extractor.toml")
        .display()
        .to_string()
}

async fn start_daemon(extra: String) -> Daemon {
    let config = format!("{TEST_CONFIG}\n{extra}");
    tokio::task::spawn_blocking(move || Daemon::start_with_config(&config))
        .await
        .unwrap()
}

/// Polls `GET /api/v1/panel` until `ok` holds, or fails with what was last seen.
async fn wait_for(api: &Api, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + DEADLINE;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        let reply = api.get("/api/v1/panel").await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        if ok(&reply.body) {
            return reply.body;
        }
        last = reply.body;
        // The pace of the polling, not a synchronisation: checked until the deadline.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("panel not {what} within {DEADLINE:?}; last seen:\n{last:#}");
}

async fn press(api: &Api, long: bool) -> Value {
    let reply = api
        .post("/api/v1/panel/press", json!({ "long": long }))
        .await;
    assert_eq!(reply.status, 200, "press (long: {long}): {}", reply.body);
    reply.body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lamp_follows_an_extractor_from_green_to_amber_to_red_and_the_button_acts() {
    let profile =
        Profile::from_toml_str(include_str!("../../profiles/sim-extractor.toml")).unwrap();
    let sim = Simulator::new(
        Arc::new(profile),
        &[1],
        SimConfig {
            run_time: Duration::from_secs(20),
            ..SimConfig::default()
        },
    );
    let server = sim.serve_tcp().await.unwrap();
    let daemon = start_daemon(format!(
        "[panel]\nkind = \"sim\"\nactive_low = true\n\n\
         [[extractors]]\nname = \"ext-1\"\nprofile = {:?}\ntcp = \"{}\"\ntimeout_ms = 300\n",
        profile_path(),
        server.addr
    ))
    .await;
    let api = daemon.client();

    // Green at start, steady, silent; the green line is driven low (active low).
    let seen = wait_for(&api, "green with the green line on", |v| {
        v["sim_lines"]["green"] == false
    })
    .await;
    assert_eq!(seen["kind"], "sim");
    assert_eq!(seen["lamp"], "green", "{seen:#}");
    assert_eq!(seen["lamp_mode"], "steady");
    assert_eq!(seen["buzzer"], false);
    assert_eq!(seen["sim_lines"]["red"], true, "{seen:#}");
    assert_eq!(seen["sim_lines"]["buzzer"], true, "{seen:#}");
    assert_eq!(seen["faults"], json!([]));
    assert!(seen["last_press"].is_null());
    let metrics = api.get_text("/metrics").await.text;
    assert_eq!(
        metric_value(&metrics, "pcrd_panel_lamp{colour=\"green\"}"),
        Some(1.0),
        "{metrics}"
    );

    // A short press on green asks to start: through the pins and the debouncer, once.
    let pressed = press(&api, false).await;
    assert_eq!(pressed["long"], false);
    assert_eq!(pressed["effect"], "start");
    let seen = api.get_ok("/api/v1/panel").await;
    assert_eq!(seen["last_press"]["effect"], "start", "{seen:#}");
    let actions = seen["recent_actions"].as_array().unwrap();
    assert_eq!(actions.len(), 1, "{seen:#}");
    assert_eq!(actions[0]["action"], "start");

    // No sealed extraction plate is ready on ext-1 (the only instrument): the
    // start is refused, shown for a moment as a fault with the buzzer, and why.
    let seen = wait_for(&api, "the refusal shown", |v| {
        v["faults"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f["source"] == "panel:button"))
    })
    .await;
    let reason = seen["faults"][0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("start") && reason.contains("no sealed plate is ready for ext-1"),
        "{seen:#}"
    );
    wait_for(&api, "green after the refusal", |v| v["lamp"] == "green").await;

    // Only lab roles press the button.
    let reviewer = daemon.client_as(REVIEWER_TOKEN);
    let refused = reviewer
        .post("/api/v1/panel/press", json!({ "long": false }))
        .await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    let bad = api
        .post("/api/v1/panel/press", json!({ "long": "yes" }))
        .await;
    assert_eq!(bad.status, 422, "{}", bad.body);

    // A run on the extractor: amber.
    sim.operate(1, ExtractorCommand::LoadProtocol(3)).unwrap();
    sim.operate(
        1,
        ExtractorCommand::Start {
            barcode: "EXT-PLATE-0009".into(),
        },
    )
    .unwrap();
    let seen = wait_for(&api, "amber", |v| v["lamp"] == "amber").await;
    assert_eq!(seen["active"], json!(["instrument:ext-1"]), "{seen:#}");
    assert_eq!(seen["buzzer"], false);
    // A short press during a run does nothing (a bump never aborts).
    let pressed = press(&api, false).await;
    assert_eq!(pressed["effect"], "nothing");

    // The extractor fails: red, blinking, buzzer on, the fault named.
    sim.inject(
        1,
        Fault::ErrorAt {
            at_percent: 0.0,
            code: 102,
        },
    );
    let seen = wait_for(&api, "red", |v| v["lamp"] == "red").await;
    assert_eq!(seen["lamp_mode"], "blinking", "{seen:#}");
    assert_eq!(seen["buzzer"], true, "{seen:#}");
    assert_eq!(seen["fault_unacknowledged"], true);
    let faults = seen["faults"].as_array().unwrap();
    assert_eq!(faults.len(), 1, "{seen:#}");
    assert_eq!(faults[0]["source"], "instrument:ext-1");
    let reason = faults[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("device error 102") && reason.contains("Magnetic rod head blocked"),
        "{reason}"
    );
    // The buzzer line is driven while the pattern runs (200 ms in each second).
    wait_for(&api, "beeping on the buzzer line", |v| {
        v["sim_lines"]["buzzer"] == false
    })
    .await;
    let metrics = api.get_text("/metrics").await.text;
    assert_eq!(
        metric_value(&metrics, "pcrd_panel_lamp{colour=\"red\"}"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, "pcrd_panel_buzzer_sounding"),
        Some(1.0)
    );

    // A press acknowledges: buzzer off, red steady, nothing started or aborted.
    let pressed = press(&api, false).await;
    assert_eq!(pressed["effect"], "acknowledged");
    let seen = wait_for(&api, "acknowledged", |v| v["buzzer"] == false).await;
    assert_eq!(seen["lamp"], "red");
    assert_eq!(seen["lamp_mode"], "steady");
    assert_eq!(seen["fault_unacknowledged"], false);
    assert_eq!(
        seen["recent_actions"].as_array().unwrap().len(),
        1,
        "{seen:#}"
    );

    // The operator clears the device: green again, and the start press is logged.
    sim.clear_faults(1);
    sim.operate(1, ExtractorCommand::AcknowledgeError).unwrap();
    wait_for(&api, "green again", |v| v["lamp"] == "green").await;
    let log = daemon.stderr();
    assert!(
        log.lines()
            .any(|l| l.contains("Panel action requested.") && l.contains("\"start\"")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_button_starts_the_ready_plate_on_the_cycler_and_aborts_it() {
    let sim = CyclerSim::new(CyclerSimConfig {
        // 45 cycles take over 9 s: time to press twice to abort.
        cycle_time: Duration::from_millis(200),
        ..CyclerSimConfig::default()
    });
    let (master, slave) = tokio_serial::SerialStream::pair().unwrap();
    let path = tokio_serial::SerialPort::name(&slave).unwrap();
    sim.serve(master);
    let daemon = start_daemon(format!(
        "[panel]\nkind = \"sim\"\ninstrument = \"qpcr-1\"\n\n\
         [[cyclers]]\nname = \"qpcr-1\"\nserial = {{ path = {path:?}, baud = 115200 }}\n\
         timeout_ms = 2000\nsettle_ms = 200\nreconnect_max_ms = 200\n"
    ))
    .await;
    let api = daemon.client();
    api.wait_for("/api/v1/instruments/qpcr-1", "online", DEADLINE, |v| {
        v["online"] == true
    })
    .await;
    wait_for(&api, "green", |v| v["lamp"] == "green").await;
    let plate = api.sealed_pcr_plate("sarscov2-orf1ab-n-ic", "PB").await;

    // A short press on green starts the one sealed plate ready on qpcr-1.
    let pressed = press(&api, false).await;
    assert_eq!(pressed["effect"], "start");
    let running = api
        .wait_for(
            "/api/v1/instruments/qpcr-1",
            "running the plate",
            DEADLINE,
            |v| v["state"] == "running" && v["cycler"]["run"]["plate"] == plate.as_str(),
        )
        .await;
    let run = running["cycler"]["run"]["id"].as_u64().unwrap();
    let detail = api.get_ok(&format!("/api/v1/runs/{run}")).await;
    assert_eq!(detail["started_by"], "panel", "{detail:#}");
    let seen = wait_for(&api, "amber", |v| v["lamp"] == "amber").await;
    assert_eq!(seen["active"], json!(["cycler:qpcr-1"]), "{seen:#}");

    // A long press arms the abort; a short one within the window confirms it.
    let pressed = press(&api, true).await;
    assert_eq!(pressed["effect"], "abort_armed", "{pressed:#}");
    let pressed = press(&api, false).await;
    assert_eq!(pressed["effect"], "abort", "{pressed:#}");
    let aborted = api
        .wait_for(&format!("/api/v1/runs/{run}"), "aborted", DEADLINE, |v| {
            v["state"] == "aborted"
        })
        .await;
    assert!(
        aborted["reason"]
            .as_str()
            .unwrap()
            .contains("aborted from the panel"),
        "{aborted:#}"
    );
    wait_for(&api, "green after the abort", |v| v["lamp"] == "green").await;

    // Two plates ready (the aborted one may run again, and a new one): the
    // button cannot choose; refused, shown, and nothing started.
    let second = api.sealed_pcr_plate("sarscov2-orf1ab-n-ic", "PC").await;
    let pressed = press(&api, false).await;
    assert_eq!(pressed["effect"], "start");
    let seen = wait_for(&api, "the refusal shown", |v| {
        v["faults"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f["source"] == "panel:button"))
    })
    .await;
    let reason = seen["faults"][0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("2 sealed plates are ready")
            && reason.contains(&plate)
            && reason.contains(&second),
        "{seen:#}"
    );
    assert_eq!(seen["buzzer"], true, "{seen:#}");
    wait_for(&api, "green after the refusal", |v| v["lamp"] == "green").await;
    let idle = api.get_ok("/api/v1/instruments/qpcr-1").await;
    assert_eq!(idle["state"], "idle", "{idle:#}");
    let log = daemon.stderr();
    assert!(
        log.contains("Run started from the panel's button."),
        "{log}"
    );
    assert!(
        log.contains("Run aborted from the panel's button."),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_panel_the_panel_routes_say_so() {
    let daemon = start_daemon(String::new()).await;
    let api = daemon.client();
    let seen = api.get_ok("/api/v1/panel").await;
    assert_eq!(seen["kind"], "none", "{seen:#}");
    assert_eq!(seen["lamp"], "off", "{seen:#}");
    let reply = api.post("/api/v1/panel/press", json!({})).await;
    assert_eq!(reply.status, 409, "{}", reply.body);
    assert!(reply.message().contains("[panel]"), "{reply:?}");
    let metrics = api.get_text("/metrics").await.text;
    assert!(!metrics.contains("pcrd_panel_lamp"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_panel_section_stops_the_daemon_with_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pcrd.toml");
    std::fs::write(
        &config,
        format!("{TEST_CONFIG}\n[panel]\nkind = \"gpio\"\nlamp = \"disco\"\nred = 3\n"),
    )
    .unwrap();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(pcrd_tests::pcrd_bin())
            .args(["serve", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    for expect in ["panel.lamp \"disco\"", "panel.chip", "panel.button"] {
        assert!(err.contains(expect), "{expect:?} missing:\n{err}");
    }
}
