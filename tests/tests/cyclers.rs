#![allow(clippy::unwrap_used)]
//! `pcrd serve` drives a real-time PCR cycler: the simulated cycler runs in this
//! test process, over a real pseudo-terminal pair or TCP on 127.0.0.1, and the
//! real daemon binary is configured to it with `[[cyclers]]`. Everything is
//! checked through the API and /metrics:
//!
//! - a whole run of a sealed PCR plate is stored with every cycle, and the
//!   curves the API gives back are the simulator's, bit for bit;
//! - kill -9 of the daemon mid-run, restart: no cycle that was durable is lost,
//!   the cycles the instrument read meanwhile are fetched, the curve has no gap;
//! - the cable pulled mid-run: the run shows `instrument_offline` (not failed),
//!   then resumes and finishes when the link is back;
//! - bad lines (noise, an unknown event, a non-numeric reading, a wrong well
//!   count, a cycle going backwards, a missed line): refused with the line kept
//!   under the run, the run completes and its curves are intact;
//! - bad requests: 4xx with a JSON body naming the problem.
//!
//! Every wait polls the API against a deadline; none is a synchronisation sleep.

use std::time::{Duration, Instant};

use pcrd_drivers::sim::cycler::{CyclerFault, CyclerSim, CyclerSimConfig};
use pcrd_protocol::domain::PlateFormat;
use pcrd_tests::{Api, Daemon, REVIEWER_TOKEN, TEST_CONFIG, metric_value};
use serde_json::{Value, json};

/// Generous for a loaded two-core machine.
const DEADLINE: Duration = Duration::from_secs(60);
const KIT: &str = "sarscov2-orf1ab-n-ic";
/// The kit's channels, in its target order: the default protocol reads them.
const CHANNELS: [&str; 3] = ["FAM", "VIC", "CY5"];
/// Data cycles of the default protocol.
const CYCLES: u32 = 45;

fn sim(cycle_ms: u64) -> CyclerSim {
    CyclerSim::new(CyclerSimConfig {
        cycle_time: Duration::from_millis(cycle_ms),
        ..CyclerSimConfig::default()
    })
}

fn cycler_config(name: &str, link: &str) -> String {
    format!(
        "{TEST_CONFIG}\n[[cyclers]]\nname = \"{name}\"\n{link}\ntimeout_ms = 2000\nsettle_ms = 200\nreconnect_max_ms = 200\n"
    )
}

async fn start_daemon(config: String) -> Daemon {
    tokio::task::spawn_blocking(move || Daemon::start_with_config(&config))
        .await
        .unwrap()
}

/// Polls `GET path` until `ok` holds (`Api::wait_for` with this file's deadline).
async fn wait_for(api: &Api, path: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    api.wait_for(path, what, DEADLINE, ok).await
}

/// Log text without its colour codes.
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

async fn metric(api: &Api, name: &str) -> Option<f64> {
    metric_value(&api.get_text("/metrics").await.text, name)
}

async fn start_run(api: &Api, plate: &str, instrument: &str) -> u64 {
    let r = api
        .post(
            "/api/v1/runs",
            json!({ "plate": plate, "instrument": instrument }),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.body["plate"], plate);
    assert_eq!(r.body["channels"], json!(CHANNELS));
    assert_eq!(r.body["cycles_expected"], CYCLES);
    r.body["id"].as_u64().unwrap()
}

/// `curves[channel][well]` from the API's run view (wells column-major).
fn curves_of(run: &Value) -> Vec<Vec<Vec<f64>>> {
    let mut out = vec![vec![Vec::new(); 96]; CHANNELS.len()];
    let wells: Vec<String> = PlateFormat::Wells96
        .wells_column_major()
        .map(|w| w.to_string())
        .collect();
    for c in run["curves"].as_array().unwrap() {
        let ch = CHANNELS.iter().position(|n| c["channel"] == *n).unwrap();
        let well = wells.iter().position(|w| c["well"] == *w).unwrap();
        out[ch][well] = c["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
    }
    out
}

/// Every curve of the run holds every cycle and equals the simulator's readings.
fn assert_curves_are_the_simulators(run: &Value, sim: &CyclerSim) {
    let scenario = sim.scenario(PlateFormat::Wells96, CHANNELS.len());
    let curves = curves_of(run);
    for (ch, wells) in curves.iter().enumerate() {
        for (well, curve) in wells.iter().enumerate() {
            let truth = scenario.curves[well][ch].readings(CYCLES as usize);
            assert_eq!(
                curve, &truth,
                "well {well} channel {}: stored curve differs from the simulator's",
                CHANNELS[ch]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_run_over_a_pty_is_stored_with_every_cycle() {
    let sim = sim(15);
    let (master, slave) = tokio_serial::SerialStream::pair().unwrap();
    let path = tokio_serial::SerialPort::name(&slave).unwrap();
    sim.serve(master);
    let daemon = start_daemon(cycler_config(
        "qpcr-1",
        &format!("serial = {{ path = {path:?}, baud = 115200 }}"),
    ))
    .await;
    let api = daemon.client();
    let view = wait_for(&api, "/api/v1/instruments/qpcr-1", "online", |v| {
        v["online"] == true
    })
    .await;
    assert_eq!(view["kind"], "cycler");
    assert_eq!(view["cycler"]["state"], "idle");
    assert_eq!(view["profile"], "pcrd-ref-1");
    let listed = api.get_ok("/api/v1/instruments").await;
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == "qpcr-1"),
        "{listed:#}"
    );

    // Bad requests, before anything runs.
    let plate = api.sealed_pcr_plate(KIT, "A").await;
    let bad = |body: Value| {
        let api = &api;
        async move { api.post("/api/v1/runs", body).await }
    };
    let r = bad(json!({ "plate": "NOPE-1", "instrument": "qpcr-1" })).await;
    assert_eq!(r.status, 404, "{r:?}");
    assert!(r.message().contains("NOPE-1"), "{r:?}");
    let r = bad(json!({ "plate": plate, "instrument": "qpcr-9" })).await;
    assert_eq!(r.status, 404, "{r:?}");
    assert!(r.message().contains("qpcr-9"), "{r:?}");
    let r =
        bad(json!({ "plate": plate, "instrument": "qpcr-1", "protocol": "X FAM 0x95@1" })).await;
    assert_eq!(r.status, 422, "{r:?}");
    assert!(r.message().contains("protocol"), "{r:?}");
    let r = bad(json!({ "plate": plate })).await;
    assert_eq!(r.status, 422, "{r:?}");
    let r = daemon
        .client_as(REVIEWER_TOKEN)
        .post(
            "/api/v1/runs",
            json!({ "plate": plate, "instrument": "qpcr-1" }),
        )
        .await;
    assert_eq!(r.status, 403, "{r:?}");
    // An open plate does not go on a cycler.
    let r = api
        .post("/api/v1/plates", json!({ "kit": KIT, "id": "EXT-OPEN" }))
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let r = bad(json!({ "plate": "EXT-OPEN", "instrument": "qpcr-1" })).await;
    assert_eq!(r.status, 409, "{r:?}");
    assert!(r.message().contains("not sealed"), "{r:?}");
    let r = api.get("/api/v1/runs/999").await;
    assert_eq!(r.status, 404, "{r:?}");

    let id = start_run(&api, &plate, "qpcr-1").await;
    // The cycler is busy now.
    let other = api.sealed_pcr_plate(KIT, "B").await;
    let r = bad(json!({ "plate": other, "instrument": "qpcr-1" })).await;
    assert_eq!(r.status, 409, "{r:?}");

    let run = wait_for(
        &api,
        &format!("/api/v1/runs/{id}?curves=true"),
        "finished",
        |v| v["state"] == "finished",
    )
    .await;
    assert_eq!(run["cycles_stored"], CYCLES);
    assert!(run["reason"].is_null(), "{run:#}");
    assert!(run["ended_at"].is_string(), "{run:#}");
    assert_eq!(run["curves"].as_array().unwrap().len(), 96 * CHANNELS.len());
    assert_curves_are_the_simulators(&run, &sim);
    // One well only.
    let one = api.get_ok(&format!("/api/v1/runs/{id}?well=B1")).await;
    assert_eq!(one["curves"].as_array().unwrap().len(), CHANNELS.len());
    let r = api.get(&format!("/api/v1/runs/{id}?well=Q99")).await;
    assert_eq!(r.status, 422, "{r:?}");

    // A finished plate is not run again; the cycler is free for the next.
    let r = bad(json!({ "plate": plate, "instrument": "qpcr-1" })).await;
    assert_eq!(r.status, 409, "{r:?}");
    let view = api.get_ok("/api/v1/instruments/qpcr-1").await;
    assert_eq!(view["cycler"]["state"], "idle", "{view:#}");
    let r = api
        .post(&format!("/api/v1/runs/{id}/abort"), json!({}))
        .await;
    assert_eq!(r.status, 409, "{r:?}");

    assert_eq!(
        metric(&api, "pcrd_cycles_stored_total").await,
        Some(f64::from(CYCLES))
    );
    assert_eq!(
        metric(&api, "pcrd_runs{state=\"finished\"}").await,
        Some(1.0)
    );
    assert_eq!(
        metric(&api, "pcrd_cycler_online{instrument=\"qpcr-1\"}").await,
        Some(1.0)
    );
    assert_eq!(
        metric(&api, "pcrd_cycle_store_duration_seconds_count").await,
        Some(f64::from(CYCLES))
    );
    let logs = plain(&daemon.stderr());
    assert!(logs.contains("PCR run finished"), "{logs}");
    // The run's log lines carry its run, plate and instrument.
    assert!(
        logs.lines().any(|l| l.contains("PCR run started")
            && l.contains(&format!("run={id}"))
            && l.contains(&format!("plate={plate}"))
            && l.contains("instrument=qpcr-1")),
        "{logs}"
    );
    drop(slave);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_run_loses_no_stored_cycle_and_fetches_the_missed_ones() {
    // 45 cycles of 60 ms: the daemon is killed a third of the way in.
    let sim = sim(60);
    let addr = sim.serve_tcp().await.unwrap();
    let mut daemon = start_daemon(cycler_config("qpcr-2", &format!("tcp = \"{addr}\""))).await;
    let api = daemon.client();
    wait_for(&api, "/api/v1/instruments/qpcr-2", "online", |v| {
        v["online"] == true
    })
    .await;
    let plate = api.sealed_pcr_plate(KIT, "K").await;
    let id = start_run(&api, &plate, "qpcr-2").await;
    let path = format!("/api/v1/runs/{id}");
    wait_for(&api, &path, "at cycle 10", |v| {
        v["cycles_stored"].as_u64() >= Some(10)
    })
    .await;
    // Cycles counted here were durable (the counter moves after the barrier).
    let deadline = Instant::now() + DEADLINE;
    let durable = loop {
        let n = metric(&api, "pcrd_cycles_stored_total").await.unwrap() as u64;
        if n >= 10 {
            break n;
        }
        assert!(Instant::now() < deadline, "cycle 10 never became durable");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let before = api.get_ok(&format!("{path}?curves=true")).await;
    daemon.kill9();
    let killed_at = sim.cycles_read();
    // The instrument runs on while the daemon is down.
    let deadline = Instant::now() + DEADLINE;
    while sim.cycles_read() < killed_at + 5 {
        assert!(Instant::now() < deadline, "the simulator stopped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let daemon = tokio::task::spawn_blocking(move || {
        daemon.restart();
        daemon
    })
    .await
    .unwrap();
    let api = daemon.client();
    let after = api.get_ok(&path).await;
    assert!(
        after["cycles_stored"].as_u64().unwrap() >= durable,
        "a durable cycle was lost: {durable} durable before the kill, {after:#}"
    );
    assert_ne!(after["state"], "failed", "{after:#}");
    let run = wait_for(&api, &format!("{path}?curves=true"), "finished", |v| {
        v["state"] == "finished"
    })
    .await;
    assert_eq!(run["cycles_stored"], CYCLES);
    assert_curves_are_the_simulators(&run, &sim);
    // What was stored before the kill is what the curves start with.
    let early = curves_of(&before);
    let full = curves_of(&run);
    for (ch, wells) in early.iter().enumerate() {
        for (well, curve) in wells.iter().enumerate() {
            assert_eq!(curve[..], full[ch][well][..curve.len()]);
        }
    }
    // The missed cycles were fetched with DATA?, from just after the stored ones.
    let refetched = run["refetched"].as_array().unwrap();
    assert!(
        refetched
            .iter()
            .any(|r| r["first"].as_u64().unwrap() <= killed_at as u64 + 1),
        "{run:#}"
    );
    let logs = daemon.stderr();
    assert!(logs.contains("Resuming the run"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pulled_cable_shows_instrument_offline_then_the_run_resumes_and_finishes() {
    let sim = sim(40);
    let addr = sim.serve_tcp().await.unwrap();
    let daemon = start_daemon(cycler_config("qpcr-3", &format!("tcp = \"{addr}\""))).await;
    let api = daemon.client();
    wait_for(&api, "/api/v1/instruments/qpcr-3", "online", |v| {
        v["online"] == true
    })
    .await;
    let plate = api.sealed_pcr_plate(KIT, "C").await;
    let id = start_run(&api, &plate, "qpcr-3").await;
    let path = format!("/api/v1/runs/{id}");
    wait_for(&api, &path, "at cycle 8", |v| {
        v["cycles_stored"].as_u64() >= Some(8)
    })
    .await;
    sim.disconnect_for(Duration::from_millis(700));
    let offline = wait_for(&api, &path, "instrument offline", |v| {
        v["state"] == "instrument_offline"
    })
    .await;
    assert!(
        offline["reason"].as_str().unwrap().contains("link lost"),
        "{offline:#}"
    );
    let view = api.get_ok("/api/v1/instruments/qpcr-3").await;
    assert_eq!(view["cycler"]["state"], "instrument_offline", "{view:#}");
    assert_eq!(
        metric(&api, "pcrd_runs{state=\"instrument_offline\"}").await,
        Some(1.0)
    );
    let run = wait_for(&api, &format!("{path}?curves=true"), "finished", |v| {
        v["state"] == "finished"
    })
    .await;
    assert_eq!(run["cycles_stored"], CYCLES);
    assert!(!run["refetched"].as_array().unwrap().is_empty(), "{run:#}");
    assert_curves_are_the_simulators(&run, &sim);
    assert_eq!(metric(&api, "pcrd_runs{state=\"failed\"}").await, Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_lines_are_rejected_with_the_line_kept_and_the_run_is_not_corrupted() {
    let sim = sim(15);
    // Line noise, an unknown event, a non-numeric reading, a wrong well count,
    // a cycle going backwards, then a line the instrument never sends.
    let backwards = format!("!CYCLE 1 FAM 96 {}", vec!["1000"; 96].join(","));
    let mut bytes = b"\x00\xff\x13noise\r\n!PAUSED\r\n!CYCLE 2 FAM 3 1,x,2\r\n".to_vec();
    bytes.extend_from_slice(b"!CYCLE 3 FAM 3 1,2,3\r\n");
    bytes.extend_from_slice(backwards.as_bytes());
    bytes.extend_from_slice(b"\r\n");
    sim.inject(CyclerFault::GarbageAt { at_cycle: 3, bytes });
    sim.inject(CyclerFault::SkipLine {
        at_cycle: 7,
        channel: 1,
    });
    let (master, slave) = tokio_serial::SerialStream::pair().unwrap();
    let path = tokio_serial::SerialPort::name(&slave).unwrap();
    sim.serve(master);
    let daemon = start_daemon(cycler_config(
        "qpcr-4",
        &format!("serial = {{ path = {path:?}, baud = 9600 }}"),
    ))
    .await;
    let api = daemon.client();
    wait_for(&api, "/api/v1/instruments/qpcr-4", "online", |v| {
        v["online"] == true
    })
    .await;
    let plate = api.sealed_pcr_plate(KIT, "G").await;
    let id = start_run(&api, &plate, "qpcr-4").await;
    let run = wait_for(
        &api,
        &format!("/api/v1/runs/{id}?curves=true"),
        "finished",
        |v| v["state"] == "finished",
    )
    .await;
    assert_eq!(run["cycles_stored"], CYCLES);
    assert_curves_are_the_simulators(&run, &sim);
    let rejected: Vec<&str> = run["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["line"].as_str().unwrap())
        .collect();
    for expected in [
        "!PAUSED",
        "!CYCLE 2 FAM 3 1,x,2",
        "!CYCLE 3 FAM 3 1,2,3",
        backwards.as_str(),
    ] {
        assert!(
            rejected.contains(&expected),
            "{expected:?} not kept: {rejected:#?}"
        );
    }
    assert!(
        rejected.iter().any(|l| l.contains("noise")),
        "{rejected:#?}"
    );
    assert!(
        run["rejected"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| !r["reason"].as_str().unwrap().is_empty()),
        "{run:#}"
    );
    assert_eq!(
        run["lines_rejected"].as_u64().unwrap() as usize,
        rejected.len()
    );
    // The missed line of cycle 7 was fetched, not skipped.
    assert!(
        run["refetched"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["first"] == 7),
        "{run:#}"
    );
    assert!(metric(&api, "pcrd_cycler_lines_rejected_total").await >= Some(5.0));
    drop(slave);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_fails_the_run_and_an_abort_is_confirmed() {
    // The lid opens when cycle 6 would be read: the run fails with the reason,
    // cycles 1..=5 are kept, and the cycler (in its error state) takes no new run.
    let lid_sim = sim(20);
    lid_sim.inject(CyclerFault::LidOpensAt { at_cycle: 6 });
    let addr = lid_sim.serve_tcp().await.unwrap();
    let daemon = start_daemon(cycler_config("qpcr-5", &format!("tcp = \"{addr}\""))).await;
    let api = daemon.client();
    wait_for(&api, "/api/v1/instruments/qpcr-5", "online", |v| {
        v["online"] == true
    })
    .await;
    let plate = api.sealed_pcr_plate(KIT, "F").await;
    let id = start_run(&api, &plate, "qpcr-5").await;
    let failed = wait_for(&api, &format!("/api/v1/runs/{id}"), "failed", |v| {
        v["state"] == "failed"
    })
    .await;
    let reason = failed["reason"].as_str().unwrap();
    assert!(reason.contains("LidOpened"), "{failed:#}");
    assert_eq!(failed["cycles_stored"], 5, "{failed:#}");
    let view = api.get_ok("/api/v1/instruments/qpcr-5").await;
    assert_eq!(view["cycler"]["state"], "idle", "{view:#}");
    assert!(view["cycler"]["last_fault"].is_string(), "{view:#}");
    let other = api.sealed_pcr_plate(KIT, "H").await;
    let r = api
        .post(
            "/api/v1/runs",
            json!({ "plate": other, "instrument": "qpcr-5" }),
        )
        .await;
    assert_eq!(r.status, 409, "{r:?}");
    assert!(r.message().contains("not idle"), "{r:?}");

    // A second daemon with a second cycler: a run aborted through the API.
    let sim2 = sim(40);
    let addr2 = sim2.serve_tcp().await.unwrap();
    drop(daemon);
    let config = format!(
        "{}\n[[cyclers]]\nname = \"qpcr-6\"\ntcp = \"{addr2}\"\ntimeout_ms = 2000\nsettle_ms = 200\nreconnect_max_ms = 200\n",
        cycler_config("qpcr-5", &format!("tcp = \"{addr}\""))
    );
    let daemon = start_daemon(config).await;
    let api = daemon.client();
    wait_for(&api, "/api/v1/instruments/qpcr-6", "online", |v| {
        v["online"] == true
    })
    .await;
    let plate = api.sealed_pcr_plate(KIT, "P").await;
    let id = start_run(&api, &plate, "qpcr-6").await;
    wait_for(&api, &format!("/api/v1/runs/{id}"), "at cycle 3", |v| {
        v["cycles_stored"].as_u64() >= Some(3)
    })
    .await;
    let r = daemon
        .client_as(REVIEWER_TOKEN)
        .post(&format!("/api/v1/runs/{id}/abort"), json!({}))
        .await;
    assert_eq!(r.status, 403, "{r:?}");
    let r = api
        .post(
            &format!("/api/v1/runs/{id}/abort"),
            json!({ "reason": "wrong plate loaded" }),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["state"], "aborted");
    assert!(
        r.body["reason"]
            .as_str()
            .unwrap()
            .contains("aborted by tina: wrong plate loaded"),
        "{r:?}"
    );
    assert_eq!(
        sim2.status().state,
        pcrd_protocol::cycler::RunState::Aborted
    );
    let view = api.get_ok("/api/v1/instruments/qpcr-6").await;
    assert_eq!(view["cycler"]["state"], "idle", "{view:#}");
    let r = api
        .post(&format!("/api/v1/runs/{id}/abort"), json!({}))
        .await;
    assert_eq!(r.status, 409, "{r:?}");
}
