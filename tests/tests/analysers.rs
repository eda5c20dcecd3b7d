#![allow(clippy::unwrap_used)]
//! Analysers reporting over ASTM into the real daemon (issue 8). The simulated
//! analyser (pcrd-drivers, feature "sim") runs in this test process and talks to
//! `pcrd serve` over real TCP on 127.0.0.1 and over a real pseudo-terminal pair;
//! everything is checked through the API and /metrics:
//!
//! - results land on their tubes with the analyser's Cts and the kit's calls;
//! - a message whose last frame the analyser saw acknowledged survives `kill -9`,
//!   and a store that cannot make it durable never acknowledges it;
//! - a missing EOT, a cut line or a broken hierarchy is quarantined with the bytes and makes no
//!   result; a bad checksum is NAKed, resent, and makes exactly one result;
//! - an unknown specimen id or test code is listed as unmatched, never dropped;
//! - host queries are answered with orders, worklists reach the analyser;
//! - an independent ASTM peer (labmcp-astm-lis) sends results that land on a tube.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pcrd_drivers::sim::analyser::{Analyser, AnalyserConfig, Fault, Scenario};
use pcrd_protocol::astm::record::Message;
use pcrd_tests::{Api, Daemon, TEST_CONFIG, metric_value, peers_dir};
use serde_json::{Value, json};

/// Upper bound for anything a test waits for; every wait polls against it.
const DEADLINE: Duration = Duration::from_secs(30);

fn profile_path() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../analysers/sim-an01.toml")
        .display()
        .to_string()
}

/// `[[analysers]]` over TCP on 127.0.0.1 port 0; a short receive timer so a missing
/// EOT is noticed within the test.
fn tcp_analyser(name: &str, accepts_orders: bool) -> String {
    format!(
        "[[analysers]]\nname = \"{name}\"\nprofile = {:?}\ntcp = {{ listen = \"127.0.0.1:0\", peers = [\"127.0.0.1\"] }}\naccepts_orders = {accepts_orders}\nreceive_timeout_ms = 1500\n",
        profile_path()
    )
}

async fn start_daemon(extra: String) -> Daemon {
    let config = format!("{TEST_CONFIG}\n{extra}");
    tokio::task::spawn_blocking(move || Daemon::start_with_config(&config))
        .await
        .unwrap()
}

async fn restart(daemon: Daemon) -> Daemon {
    tokio::task::spawn_blocking(move || {
        let mut daemon = daemon;
        daemon.restart();
        daemon
    })
    .await
    .unwrap()
}

async fn receive(api: &Api, barcodes: &[&str]) {
    let tubes: Vec<Value> = barcodes.iter().map(|b| json!({ "barcode": b })).collect();
    let reply = api.post("/api/v1/tubes", json!({ "tubes": tubes })).await;
    assert_eq!(reply.status, 200, "{reply:?}");
}

async fn analyser_view(api: &Api, name: &str) -> Value {
    let list = api.get_ok("/api/v1/analysers").await;
    list.as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no analyser {name} in {list:#}"))
}

async fn analyser_addr(api: &Api, name: &str) -> SocketAddr {
    analyser_view(api, name).await["listen"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Polls `GET path` until `ok` holds (`Api::wait_for` with this file's deadline).
async fn wait_for(api: &Api, path: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    api.wait_for(path, what, DEADLINE, ok).await
}

async fn reported(api: &Api, barcode: &str, count: usize) -> Vec<Value> {
    let body = wait_for(
        api,
        &format!("/api/v1/tubes/{barcode}/reported"),
        &format!("{count} reported results"),
        |v| v.as_array().is_some_and(|a| a.len() >= count),
    )
    .await;
    body.as_array().unwrap().clone()
}

fn target<'a>(result: &'a Value, name: &str) -> &'a Value {
    result["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["target"] == name)
        .unwrap_or_else(|| panic!("no target {name} in {result:#}"))
}

/// The example scenario's two specimens on their tubes: SPC0042 positive on both
/// viral targets (kit: detected), SPC0043 negative with its internal control
/// (kit: not detected); Cts as the analyser sent them, undetermined as null.
async fn assert_example_results(api: &Api, instrument: &str) {
    let positive = reported(api, "SPC0042", 1).await;
    let negative = reported(api, "SPC0043", 1).await;
    assert_eq!(positive.len(), 1, "{positive:#?}");
    assert_eq!(negative.len(), 1, "{negative:#?}");
    let p = &positive[0];
    assert_eq!(p["call"], "detected", "{p:#}");
    assert_eq!(p["call_by"], "kit");
    assert_eq!(p["kit"], "sarscov2-orf1ab-n-ic@1.0");
    assert_eq!(p["instrument_call"], "POS");
    assert_eq!(p["source"]["instrument"], instrument);
    assert_eq!(p["source"]["specimen_id"], "SPC0042");
    assert_eq!(p["source"]["profile"], "SIM-AN01@1");
    assert_eq!(target(p, "ORF1ab")["ct"], 24.61);
    assert_eq!(target(p, "ORF1ab")["state"], "positive");
    assert_eq!(target(p, "N")["ct"], 26.02);
    assert_eq!(target(p, "IC")["ct"], 28.4);
    let n = &negative[0];
    assert_eq!(n["call"], "not_detected", "{n:#}");
    assert_eq!(n["instrument_call"], "NEG");
    assert_eq!(target(n, "ORF1ab")["ct"], Value::Null);
    assert_eq!(target(n, "N")["ct"], Value::Null);
    assert_eq!(target(n, "IC")["ct"], 27.9);
    assert_eq!(
        p["source"]["message_id"], n["source"]["message_id"],
        "one message"
    );
}

async fn metric(api: &Api, name: &str) -> Option<f64> {
    metric_value(&api.get_text("/metrics").await.text, name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_over_tcp_land_on_their_tubes() {
    let daemon = start_daemon(tcp_analyser("an-1", false)).await;
    let api = daemon.client();
    receive(&api, &["SPC0042", "SPC0043"]).await;
    let view = analyser_view(&api, "an-1").await;
    assert_eq!(view["link_up"], false, "{view:#}");
    assert_eq!(view["profile"], "SIM-AN01@1");
    let sim = Analyser::connect_tcp(analyser_addr(&api, "an-1").await, AnalyserConfig::default())
        .await
        .unwrap();
    sim.send_results(&Scenario::example(), Vec::new())
        .await
        .unwrap();
    assert_example_results(&api, "an-1").await;
    // Each tube's result is staged for review like a plate's: plate = the analyser,
    // run = analyser + message, with the reported call and Cts.
    let staged = wait_for(&api, "/api/v1/results", "two candidates", |v| {
        v.as_array().is_some_and(|all| {
            all.iter()
                .filter(|c| c["source"]["kind"] == "analyser")
                .count()
                == 2
        })
    })
    .await;
    for tube in ["SPC0042", "SPC0043"] {
        let reported = api.get_ok(&format!("/api/v1/tubes/{tube}/reported")).await;
        let reported = &reported[0];
        let candidate = staged
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["tube"] == tube)
            .unwrap_or_else(|| panic!("no candidate for {tube}: {staged:#}"));
        assert_eq!(candidate["plate"], "an-1", "{candidate:#}");
        assert_eq!(
            candidate["call"], reported["call"],
            "{candidate:#} {reported:#}"
        );
        assert_eq!(candidate["state"], "awaiting_review", "{candidate:#}");
        let cts = |v: &serde_json::Value, field: &str| -> Vec<serde_json::Value> {
            v["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t[field].clone())
                .collect()
        };
        assert_eq!(cts(candidate, "ct"), cts(reported, "ct"), "{candidate:#}");
        assert!(
            candidate["targets"]
                .as_array()
                .unwrap()
                .iter()
                .all(|t| t["dye"] != ""),
            "{candidate:#}"
        );
    }
    let view = wait_for(&api, "/api/v1/analysers", "one message", |v| {
        v[0]["messages_stored"] == 1 && v[0]["reported"] == 2
    })
    .await;
    let view = &view[0];
    assert_eq!(view["link_up"], true, "{view:#}");
    assert_eq!(view["quarantined"], 0);
    assert_eq!(view["unmatched"], 0);
    assert!(view["last_message_at"].is_string(), "{view:#}");
    assert_eq!(
        metric(
            &api,
            "pcrd_analyser_messages_stored_total{analyser=\"an-1\"}"
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        metric(&api, "pcrd_analyser_store_duration_seconds_count").await,
        Some(1.0)
    );
    assert_eq!(
        metric(&api, "pcrd_analyser_unmatched{analyser=\"an-1\"}").await,
        Some(0.0)
    );
    // A tube never received has no results to list.
    let missing = api.get("/api/v1/tubes/NEVER-SEEN/reported").await;
    assert_eq!(missing.status, 404, "{missing:?}");
    assert!(missing.message().contains("has not been received"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_over_a_pty_land_on_their_tubes() {
    use tokio_serial::SerialPort;
    let (master, slave) = tokio_serial::SerialStream::pair().unwrap();
    let path = slave.name().unwrap();
    // The test keeps the slave end open too (as the pair needs), so no TIOCEXCL.
    let daemon = start_daemon(format!(
        "[[analysers]]\nname = \"an-pty\"\nprofile = {:?}\nserial = {{ path = {path:?}, baud = 9600, exclusive = false }}\n",
        profile_path()
    ))
    .await;
    let api = daemon.client();
    receive(&api, &["SPC0042", "SPC0043"]).await;
    wait_for(&api, "/api/v1/analysers", "link up", |v| {
        v[0]["link_up"] == true
    })
    .await;
    let sim = Analyser::on_stream(master, AnalyserConfig::default());
    sim.send_results(&Scenario::example(), Vec::new())
        .await
        .unwrap();
    assert_example_results(&api, "an-pty").await;
    let view = analyser_view(&api, "an-pty").await;
    assert!(
        view["transport"].as_str().unwrap().starts_with("serial "),
        "{view:#}"
    );
    drop(slave);
}

/// The analyser has the ACK of its last frame; the daemon is killed at once. After
/// the restart the message is in the store and its results are on the tubes, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_acknowledged_survives_kill_9() {
    let mut daemon = start_daemon(tcp_analyser("an-1", false)).await;
    let api = daemon.client();
    receive(&api, &["SPC0042", "SPC0043"]).await;
    let sim = Arc::new(
        Analyser::connect_tcp(analyser_addr(&api, "an-1").await, AnalyserConfig::default())
            .await
            .unwrap(),
    );
    let sending = {
        let sim = Arc::clone(&sim);
        tokio::spawn(async move { sim.send_results(&Scenario::example(), Vec::new()).await })
    };
    let deadline = Instant::now() + DEADLINE;
    loop {
        let p = sim.progress();
        if p.frames > 0 && p.acked == p.frames {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "last frame never acknowledged: {p:?}"
        );
        tokio::task::yield_now().await;
    }
    daemon.kill9();
    let _ = sending.await;
    let daemon = restart(daemon).await;
    let api = daemon.client();
    let view = analyser_view(&api, "an-1").await;
    assert_eq!(view["messages_stored"], 1, "{view:#}");
    assert_example_results(&api, "an-1").await;
}

/// The daemon dies after the last ACK and before any EOT (the analyser sends none):
/// the message was never confirmed, and the restarted daemon applies it (the
/// analyser holds an ACK for every frame and will not send it again), once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_pending_at_kill_9_is_applied_at_the_restart() {
    let mut daemon = start_daemon(tcp_analyser("an-1", false)).await;
    let api = daemon.client();
    receive(&api, &["SPC0042", "SPC0043"]).await;
    let sim = Arc::new(
        Analyser::connect_tcp(analyser_addr(&api, "an-1").await, AnalyserConfig::default())
            .await
            .unwrap(),
    );
    sim.send_results(&Scenario::example(), vec![Fault::MissingEot])
        .await
        .unwrap();
    let p = sim.progress();
    assert_eq!(p.acked, p.frames, "{p:?}");
    // Well within the 1.5 s receive timer: the daemon has not withdrawn it.
    daemon.kill9();
    let daemon = restart(daemon).await;
    let api = daemon.client();
    let view = analyser_view(&api, "an-1").await;
    assert_eq!(view["messages_stored"], 1, "{view:#}");
    assert_eq!(view["withdrawn"], 0, "{view:#}");
    assert_eq!(view["reported"], 2, "applied at start-up: {view:#}");
    assert_example_results(&api, "an-1").await;
    // Applied at start-up, and staged for review before the API answered.
    let staged = api.get_ok("/api/v1/results").await;
    let from_analyser = staged
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["source"]["kind"] == "analyser" && c["plate"] == "an-1")
        .count();
    assert_eq!(from_analyser, 2, "{staged:#}");
    assert!(
        daemon
            .stderr()
            .contains("Applied analyser messages stored before the last stop"),
        "{}",
        daemon.stderr()
    );
}

/// The driver-level barrier with the daemon's real store: when the store cannot make
/// the message durable, the analyser never gets the last frame's ACK (it keeps the
/// message); the same store working acknowledges every frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_acknowledged_before_it_is_durable() {
    use pcrd::analysers::AnalyserMetrics;
    use pcrd::analysers::store::DurableMessages;
    use pcrd_drivers::astm::{HostEvent, TcpHostConfig, spawn_tcp_host};
    use pcrd_protocol::astm::link::LinkConfig;

    let dir = tempfile::tempdir().unwrap();
    let store = pcrd::store::Store::open(&pcrd::store::StoreOptions {
        path: dir.path().join("store"),
        cache_bytes: 8 << 20,
    })
    .unwrap();
    let kits = pcrd::kits::KitRegistry::load(None).unwrap();
    let lab = pcrd::lab::Lab::open(store, kits, "LAB-TEST".into()).unwrap();
    let profile = Arc::new(
        pcrd_protocol::astm::mapping::MappingProfile::from_toml_str(include_str!(
            "../../analysers/sim-an01.toml"
        ))
        .unwrap(),
    );
    let (outgoing, _answers) = tokio::sync::mpsc::unbounded_channel();
    let messages = Arc::new(DurableMessages::new(
        "an-1".into(),
        profile,
        Arc::clone(&lab),
        Arc::new(AnalyserMetrics::default()),
        outgoing,
    ));
    let config = TcpHostConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        peers: vec![("an-1".into(), IpAddr::V4(Ipv4Addr::LOCALHOST))],
        link: LinkConfig::computer(),
    };
    let (host, mut events) = spawn_tcp_host(config, messages).await.unwrap();
    let sim = Arc::new(
        Analyser::connect_tcp(host.local_addr().unwrap(), AnalyserConfig::default())
            .await
            .unwrap(),
    );
    lab.store().fail("test: the disk is gone".into());
    let sending = {
        let sim = Arc::clone(&sim);
        tokio::spawn(async move { sim.send_results(&Scenario::example(), Vec::new()).await })
    };
    let failed = tokio::time::timeout(DEADLINE, async {
        loop {
            match events.recv().await.unwrap() {
                HostEvent::StoreFailed { error, .. } => return error,
                HostEvent::MessageStored { .. } => panic!("stored although the barrier failed"),
                _ => {}
            }
        }
    })
    .await
    .unwrap();
    assert!(failed.0.contains("the disk is gone"), "{failed}");
    let p = sim.progress();
    assert_eq!(
        p.acked,
        p.frames - 1,
        "every frame but the last acknowledged: {p:?}"
    );
    // The analyser gives up on the last frame (no reply within 15 s) and keeps the
    // message: the test does not wait for that.
    sending.abort();
    host.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_are_quarantined_with_their_bytes_and_make_no_result() {
    let daemon = start_daemon(tcp_analyser("an-1", false)).await;
    let api = daemon.client();
    receive(&api, &["SPC0042", "SPC0043"]).await;
    let addr = analyser_addr(&api, "an-1").await;

    // Broken hierarchy: an R record before any O.
    let sim = Analyser::connect_tcp(addr, AnalyserConfig::default())
        .await
        .unwrap();
    sim.send_text(
        b"H|\\^&|||SIM-AN01\rP|1\rR|1|^^^SARS2^ORF1ab^Ct|24.61\rO|1|SPC0042||^^^SARS2\rL|1|N\r"
            .to_vec(),
        Vec::new(),
    )
    .await
    .unwrap();
    let q = wait_for(&api, "/api/v1/analysers/quarantine", "one item", |v| {
        v.as_array().is_some_and(|a| a.len() == 1)
    })
    .await;
    assert_eq!(q[0]["kind"], "records", "{q:#}");
    assert!(
        q[0]["reason"].as_str().unwrap().contains("record 3 (R)"),
        "{q:#}"
    );
    assert!(q[0]["raw"].as_str().unwrap().contains("<ENQ>"), "{q:#}");
    assert!(q[0]["raw"].as_str().unwrap().contains("SPC0042"), "{q:#}");

    // Missing EOT: the message was stored and acknowledged, but never confirmed: it
    // is withdrawn when the receive timer runs out, and quarantined with its bytes.
    sim.send_results(&Scenario::example(), vec![Fault::MissingEot])
        .await
        .unwrap();
    let q = wait_for(&api, "/api/v1/analysers/quarantine", "two items", |v| {
        v.as_array().is_some_and(|a| a.len() == 2)
    })
    .await;
    assert_eq!(q[0]["kind"], "unconfirmed", "{q:#}");
    assert!(q[0]["withdrew_message"].is_u64(), "{q:#}");
    assert!(q[0]["bytes"].as_u64().unwrap() > 100, "{q:#}");
    let view = analyser_view(&api, "an-1").await;
    assert_eq!(view["messages_stored"], 1, "{view:#}");
    assert_eq!(view["withdrawn"], 1, "{view:#}");
    assert_eq!(view["reported"], 0, "{view:#}");
    for tube in ["SPC0042", "SPC0043"] {
        let r = api.get_ok(&format!("/api/v1/tubes/{tube}/reported")).await;
        assert_eq!(r, json!([]), "{tube}: a withdrawn message made a result");
    }

    // A bad checksum is NAKed and the frame resent: one message, one result each.
    let report = sim
        .send_results(&Scenario::example(), vec![Fault::BadChecksum { frame: 3 }])
        .await
        .unwrap();
    assert_eq!(report.naks, 1);
    assert_example_results(&api, "an-1").await;
    let view = analyser_view(&api, "an-1").await;
    assert_eq!(view["messages_stored"], 2, "{view:#}");
    assert_eq!(view["quarantined"], 2, "{view:#}");
    assert_eq!(
        metric(&api, "pcrd_analyser_quarantined_total{analyser=\"an-1\"}").await,
        Some(2.0)
    );

    // The line is cut mid-message: the part received is quarantined as aborted, with
    // its bytes; nothing is stored and no result is added.
    drop(sim);
    let cut = Analyser::connect_tcp(addr, AnalyserConfig::default())
        .await
        .unwrap();
    let outcome = cut
        .send_results(&Scenario::example(), vec![Fault::Disconnect { frame: 3 }])
        .await;
    assert!(outcome.is_err(), "{outcome:?}");
    let q = wait_for(&api, "/api/v1/analysers/quarantine", "three items", |v| {
        v.as_array().is_some_and(|a| a.len() == 3)
    })
    .await;
    assert_eq!(q[0]["kind"], "aborted", "{q:#}");
    assert!(q[0]["raw"].as_str().unwrap().contains("<STX>"), "{q:#}");
    let view = analyser_view(&api, "an-1").await;
    assert_eq!(view["messages_stored"], 2, "{view:#}");
    assert_eq!(view["reported"], 2, "{view:#}");
    assert_eq!(reported(&api, "SPC0042", 1).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_specimens_and_test_codes_are_listed_for_the_technician() {
    let daemon = start_daemon(tcp_analyser("an-1", false)).await;
    let api = daemon.client();
    receive(&api, &["SPC0042"]).await;
    let sim = Analyser::connect_tcp(analyser_addr(&api, "an-1").await, AnalyserConfig::default())
        .await
        .unwrap();
    // SPC0043 was never received.
    sim.send_results(&Scenario::example(), Vec::new())
        .await
        .unwrap();
    // Another assay the profile does not know.
    let mut flu = Scenario::example();
    flu.test = "FLUAB".into();
    flu.specimens.truncate(1);
    sim.send_results(&flu, Vec::new()).await.unwrap();
    let unmatched = wait_for(&api, "/api/v1/analysers/unmatched", "two items", |v| {
        v.as_array().is_some_and(|a| a.len() == 2)
    })
    .await;
    let unmatched = unmatched.as_array().unwrap();
    let unknown_test = &unmatched[0];
    assert_eq!(unknown_test["kind"], "unknown_test", "{unknown_test:#}");
    assert_eq!(unknown_test["test_code"], "FLUAB");
    assert_eq!(unknown_test["specimen_id"], "SPC0042");
    assert!(
        unknown_test["values"][0]
            .as_str()
            .unwrap()
            .contains("FLUAB"),
        "{unknown_test:#}"
    );
    let unknown_specimen = &unmatched[1];
    assert_eq!(
        unknown_specimen["kind"], "unknown_specimen",
        "{unknown_specimen:#}"
    );
    assert_eq!(unknown_specimen["specimen_id"], "SPC0043");
    assert!(
        unknown_specimen["values"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v.as_str().unwrap().contains("IC (IC) Ct 27.90")),
        "the values are kept: {unknown_specimen:#}"
    );
    // The known tube got its result from the first message only.
    let results = reported(&api, "SPC0042", 1).await;
    assert_eq!(results.len(), 1, "{results:#?}");
    assert_eq!(
        metric(&api, "pcrd_analyser_unmatched{analyser=\"an-1\"}").await,
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_queries_are_answered_and_worklists_are_sent() {
    let daemon = start_daemon(format!(
        "{}{}",
        tcp_analyser("an-1", true),
        tcp_analyser("an-2", false).replace("127.0.0.1\"]", "127.0.0.2\"]")
    ))
    .await;
    let api = daemon.client();
    receive(&api, &["SPC0042", "SPC0050"]).await;
    let sim = Analyser::connect_tcp(analyser_addr(&api, "an-1").await, AnalyserConfig::default())
        .await
        .unwrap();
    // A query for a received tube and one never received.
    sim.send_text(
        b"H|\\^&|||SIM-AN01\rQ|1|^SPC0042\\^SPC0999||^^^ALL||||||||O\rL|1|N\r".to_vec(),
        Vec::new(),
    )
    .await
    .unwrap();
    let answer = wait_message(&sim, 1).await;
    let orders = answer.orders();
    assert_eq!(orders.len(), 1, "{answer:?}");
    assert_eq!(orders[0].0.specimen_id(), "SPC0042");
    assert_eq!(orders[0].0.tests()[0].code, "SARS2");
    // Nothing known: "no information".
    sim.send_text(
        b"H|\\^&|||SIM-AN01\rQ|1|^SPC0999||^^^ALL||||||||O\rL|1|N\r".to_vec(),
        Vec::new(),
    )
    .await
    .unwrap();
    let answer = wait_message(&sim, 2).await;
    assert!(answer.orders().is_empty());
    assert_eq!(answer.termination_code(), "I");

    // A worklist: acknowledged by the analyser, and it holds the orders.
    let reply = api
        .post(
            "/api/v1/analysers/an-1/worklist",
            json!({ "tubes": ["SPC0042", "SPC0050"] }),
        )
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body["orders"], 2);
    let worklist = wait_message(&sim, 3).await;
    let ids: Vec<&str> = worklist
        .orders()
        .iter()
        .map(|(o, _)| o.specimen_id())
        .collect();
    assert_eq!(ids, ["SPC0042", "SPC0050"]);
    // Refused, naming why, and nothing sent.
    let cases = [
        (
            "an-1",
            json!({ "tubes": ["SPC0042", "NOPE-1"] }),
            422,
            "NOPE-1",
        ),
        ("an-1", json!({ "tubes": [] }), 422, "empty"),
        (
            "an-2",
            json!({ "tubes": ["SPC0042"] }),
            409,
            "does not accept orders",
        ),
        ("an-9", json!({ "tubes": ["SPC0042"] }), 404, "no analyser"),
    ];
    for (name, body, status, needle) in cases {
        let reply = api
            .post(&format!("/api/v1/analysers/{name}/worklist"), body)
            .await;
        assert_eq!(reply.status, status, "{reply:?}");
        let text = format!("{} {:?}", reply.message(), reply.body["error"]["problems"]);
        assert!(text.contains(needle), "{text}");
    }
    let reviewer = daemon.client_as(pcrd_tests::REVIEWER_TOKEN);
    let reply = reviewer
        .post(
            "/api/v1/analysers/an-1/worklist",
            json!({ "tubes": ["SPC0042"] }),
        )
        .await;
    assert_eq!(reply.status, 403, "{reply:?}");
    assert_eq!(sim.orders().len(), 3, "nothing more reached the analyser");
}

/// The `n`-th message the analyser received.
async fn wait_message(sim: &Analyser, n: usize) -> Message {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let orders = sim.orders();
        if orders.len() >= n {
            return orders[n - 1].clone();
        }
        assert!(
            Instant::now() < deadline,
            "the analyser received {} messages, not {n}",
            orders.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The independent peer's analyser simulator frames our records itself (and corrupts
/// frame 6 once: NAKed, resent); the result lands on its tube.
const PEER_SCRIPT: &str = r#"
import socket, sys, time
from labmcp_astm_lis.simulator import ASTMAnalyzerSimulator
records = [
    "H|\\^&|||SIM-AN01|||||||P|LIS2-A2|20260115103012",
    "P|1",
    "O|1|PEER-0001||^^^SARS2|R||||||||||||||||||||F",
    "R|1|^^^SARS2|POS|||A||F",
    "R|2|^^^SARS2^ORF1ab^Ct|31.20|||||F",
    "R|3|^^^SARS2^N^Ct|33.05|||||F",
    "R|4|^^^SARS2^IC^Ct|29.10|||||F",
    "L|1|N",
]
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
sim = ASTMAnalyzerSimulator([records], gap_s=0.2)
sim.attach(lambda b: s.sendall(b))
s.settimeout(0.2)
deadline = time.time() + 25
while time.time() < deadline and not (sim.done and sim.messages_sent == 1):
    try:
        data = s.recv(4096)
    except socket.timeout:
        continue
    if not data:
        break
    out = sim.handle_bytes(data)
    if out:
        s.sendall(out)
print(f"sent={sim.messages_sent} naks={sim.naks_received}")
sim.stop()
s.close()
sys.exit(0 if sim.messages_sent == 1 else 1)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_independent_peer_reports_a_result_onto_its_tube() {
    let pythonpath = peers_dir().join("astm");
    assert!(
        pythonpath.join("labmcp_astm_lis").is_dir(),
        "labmcp-astm-lis is not installed at {}: run scripts/test.sh (it installs the test peers)",
        pythonpath.display()
    );
    let daemon = start_daemon(tcp_analyser("an-1", false)).await;
    let api = daemon.client();
    receive(&api, &["PEER-0001"]).await;
    let port = analyser_addr(&api, "an-1").await.port().to_string();
    let child = tokio::process::Command::new("python3")
        .args(["-c", PEER_SCRIPT, &port])
        .env("PYTHONPATH", pythonpath)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(DEADLINE, child)
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("sent=1 naks=1"), "{stdout}");
    let results = reported(&api, "PEER-0001", 1).await;
    assert_eq!(results.len(), 1, "{results:#?}");
    let r = &results[0];
    assert_eq!(r["call"], "detected", "{r:#}");
    assert_eq!(target(r, "ORF1ab")["ct"], 31.2);
    assert_eq!(target(r, "N")["ct"], 33.05);
    assert_eq!(target(r, "IC")["ct"], 29.1);
    let view = analyser_view(&api, "an-1").await;
    assert_eq!(view["messages_stored"], 1, "{view:#}");
    assert_eq!(view["quarantined"], 0, "{view:#}");
}

/// A profile naming a kit target that does not exist stops the daemon at start with
/// the reason (checked against the kit registry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_that_does_not_fit_its_kit_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(profile_path())
        .unwrap()
        .replace("target = \"N\"", "target = \"N9\"");
    std::fs::write(&bad, text).unwrap();
    let config = format!(
        "{TEST_CONFIG}\n[[analysers]]\nname = \"an-1\"\nprofile = {:?}\ntcp = {{ listen = \"127.0.0.1:0\", peers = [\"127.0.0.1\"] }}\n",
        bad.display().to_string()
    );
    let config_path = dir.path().join("pcrd.toml");
    std::fs::write(&config_path, config).unwrap();
    let output = std::process::Command::new(pcrd_tests::pcrd_bin())
        .args(["serve", "--config"])
        .arg(&config_path)
        .arg("--data-dir")
        .arg(dir.path().join("store"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("has no target \"N9\""), "{stderr}");
    assert!(
        stderr.contains("target \"N\" has no analyte mapped"),
        "{stderr}"
    );
}
