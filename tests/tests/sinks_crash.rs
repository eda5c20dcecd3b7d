//! SIGKILL through the real daemon for the HTTP, PostgreSQL and HL7 sinks (issue 6,
//! "Reliability tests"): a store seeded with released results, `pcrd serve` with one
//! sink configured, killed with SIGKILL several times while batches are being
//! delivered, then restarted until the outbox is empty. The receiver must then hold
//! every idempotency key, none missing, nothing it was not sent, and a duplicate only
//! as an identical copy under the same key (for HL7: the same MSH-10 for the same key).
//! Each sink also drains a backlog built while its receiver was down, in release order.
//!
//! The receivers are real: an HTTP server (axum) and an MLLP server on pcrd's own HL7
//! codec in this process, each on 127.0.0.1 port 0, and a PostgreSQL server started by
//! the harness (tests/src/postgres.rs). The kills are driven by the receiver's progress
//! (the daemon is killed as soon as the receiver has taken a new batch), so they land
//! mid-delivery however fast or slow the machine is.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use pcrd_protocol::hl7::control_id;
use pcrd_protocol::hl7::mllp::{self, MllpDecoder, MllpEvent};
use pcrd_protocol::upstream::ResultRecord;
use pcrd_tests::postgres::PgServer;
use pcrd_tests::results::{TEST_LAB, records, seed_store};
use pcrd_tests::{ADMIN_TOKEN, Api, TEST_CONFIG, spawn_serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Rounds of start, wait for the receiver to take more, SIGKILL.
const KILL_ROUNDS: usize = 4;

/// What a receiver got, in arrival order: the idempotency key it read from the
/// payload and the payload of that one result (to compare duplicates).
type Arrivals = Arc<Mutex<Vec<(String, String)>>>;

fn snapshot(arrivals: &Arrivals) -> Vec<(String, String)> {
    arrivals.lock().expect("arrivals lock").clone()
}

fn config_with_sink(sink: &str) -> String {
    format!("{TEST_CONFIG}\n{sink}")
}

/// Waits until the outbox reports nothing pending or in flight for `sink`.
async fn wait_drained(api: &Api, sink: &str, timeout: Duration) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let status = api.get_ok("/api/v1/outbox").await;
        let entry = status["sinks"]
            .as_array()
            .expect("sinks")
            .iter()
            .find(|s| s["sink"] == sink)
            .cloned()
            .unwrap_or_else(|| panic!("sink {sink} not in {status}"));
        if entry["pending"] == 0 && entry["in_flight"] == 0 {
            assert_eq!(entry["dead"], 0, "nothing may be dead: {entry}");
            return entry;
        }
        assert!(
            started.elapsed() < timeout,
            "{sink} not drained in {timeout:?}: {entry}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the outbox reports a failed attempt for `sink` (its receiver is down).
async fn wait_failing(api: &Api, sink: &str) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let status = api.get_ok("/api/v1/outbox").await;
        let entry = status["sinks"]
            .as_array()
            .expect("sinks")
            .iter()
            .find(|s| s["sink"] == sink)
            .cloned()
            .unwrap_or_else(|| panic!("sink {sink} not in {status}"));
        if entry["last_error"].is_string() {
            return entry;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no failed attempt reported for {sink}: {entry}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Seeds `n` results, then runs [`KILL_ROUNDS`] rounds of: start `pcrd serve`, wait
/// until `progress` (what the receiver holds) grew by `step`, SIGKILL. Then a last
/// start that drains the outbox. Returns the expected keys in release order and how
/// many kills left the receiver part-way (neither empty nor complete).
async fn kill_and_drain<F, Fut>(
    dir: &Path,
    sink_toml: &str,
    sink: &str,
    n: usize,
    step: usize,
    progress: F,
) -> (Vec<String>, usize)
where
    F: Fn() -> Fut,
    Fut: Future<Output = usize>,
{
    let store = dir.join("store");
    let all = records(n);
    let expected: Vec<String> = all.iter().map(ResultRecord::idempotency_key).collect();
    seed_store(&store, TEST_LAB, all, 1000).expect("seed the store");
    let config = dir.join("pcrd.toml");
    std::fs::write(&config, config_with_sink(sink_toml)).expect("config");
    let log = dir.join("stderr.log");
    let mut partial_kills = 0;
    for round in 0..KILL_ROUNDS {
        let before = progress().await;
        let mut served =
            spawn_serve(&config, &store, &log, Duration::from_secs(60)).expect("serve");
        let started = Instant::now();
        let target = (before + step).min(n);
        while progress().await < target && started.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        served.child.kill().expect("SIGKILL");
        served.child.wait().expect("reap");
        let after = progress().await;
        eprintln!(
            "{sink} round {round}: killed after {} ms, the receiver holds {after} of {n} \
             (before this round: {before})",
            started.elapsed().as_millis()
        );
        assert!(
            after > before,
            "round {round}: nothing arrived in 60 s; stderr:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        if after < n {
            partial_kills += 1;
        }
    }
    let mut served = spawn_serve(&config, &store, &log, Duration::from_secs(60)).expect("serve");
    let api = Api::connect(&served.url, Some(ADMIN_TOKEN));
    let status = wait_drained(&api, sink, Duration::from_secs(120)).await;
    served.child.kill().expect("stop");
    served.child.wait().expect("reap");
    eprintln!("{sink}: drained after the kills: {status}");
    (expected, partial_kills)
}

/// Every expected key arrived, nothing else did, and each duplicate is an identical
/// copy of the first. Returns the number of duplicates.
fn assert_complete(sink: &str, expected: &[String], arrivals: &[(String, String)]) -> usize {
    let mut first: BTreeMap<&str, &str> = BTreeMap::new();
    for (key, payload) in arrivals {
        if let Some(before) = first.insert(key, payload) {
            assert_eq!(
                before, payload,
                "{sink}: a duplicate of {key} differs from its first copy"
            );
        }
    }
    let got: BTreeSet<&str> = first.keys().copied().collect();
    let wanted: BTreeSet<&str> = expected.iter().map(String::as_str).collect();
    let missing: Vec<&&str> = wanted.difference(&got).take(5).collect();
    assert!(
        missing.is_empty(),
        "{sink}: missing at the receiver: {missing:?}"
    );
    let extra: Vec<&&str> = got.difference(&wanted).take(5).collect();
    assert!(extra.is_empty(), "{sink}: never released: {extra:?}");
    arrivals.len() - expected.len()
}

/// The order in which keys first arrived is the release order.
fn assert_release_order(sink: &str, expected: &[String], arrivals: &[(String, String)]) {
    let mut seen = BTreeSet::new();
    let first_seen: Vec<&str> = arrivals
        .iter()
        .filter(|(key, _)| seen.insert(key.as_str()))
        .map(|(key, _)| key.as_str())
        .collect();
    let wanted: Vec<&str> = expected.iter().map(String::as_str).collect();
    assert!(first_seen == wanted, "{sink}: not in release order");
}

// ---------------------------------------------------------------------------------
// HTTP

/// An HTTP receiver on 127.0.0.1: parses each batch, records every result's key and
/// JSON, answers 200. `stop` closes its port (connection refused) until `start` again.
struct HttpReceiver {
    port: u16,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl HttpReceiver {
    async fn start_on(port: u16, arrivals: Arrivals) -> HttpReceiver {
        async fn receive(State(arrivals): State<Arrivals>, body: Bytes) -> StatusCode {
            #[derive(serde::Deserialize)]
            struct Batch {
                results: Vec<serde_json::Value>,
            }
            let Ok(batch) = serde_json::from_slice::<Batch>(&body) else {
                return StatusCode::BAD_REQUEST;
            };
            let mut parsed = Vec::with_capacity(batch.results.len());
            for value in batch.results {
                let Ok(record) = serde_json::from_value::<ResultRecord>(value.clone()) else {
                    return StatusCode::UNPROCESSABLE_ENTITY;
                };
                parsed.push((record.idempotency_key(), value.to_string()));
            }
            arrivals.lock().expect("arrivals lock").extend(parsed);
            StatusCode::OK
        }
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the HTTP receiver");
        let port = listener.local_addr().expect("address").port();
        let app = Router::new()
            .route("/results", post(receive))
            .with_state(arrivals.clone());
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        HttpReceiver {
            port,
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }

    async fn stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }

    fn sink_toml(&self, batch_size: usize) -> String {
        format!(
            "[[sinks]]\nname = \"central-http\"\nbatch_size = {batch_size}\n[sinks.http]\n\
             url = \"http://127.0.0.1:{}/results\"\ntimeout = \"5s\"\n",
            self.port
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_sigkill_mid_delivery_loses_nothing_and_duplicates_only_by_key() {
    const N: usize = 4000;
    let dir = tempfile::tempdir().expect("temp dir");
    let arrivals = Arrivals::default();
    let mut receiver = HttpReceiver::start_on(0, arrivals.clone()).await;
    let distinct = || {
        let arrivals = arrivals.clone();
        async move {
            let all = snapshot(&arrivals);
            all.iter().map(|(k, _)| k).collect::<BTreeSet<_>>().len()
        }
    };
    let (expected, partial) = kill_and_drain(
        dir.path(),
        &receiver.sink_toml(100),
        "central-http",
        N,
        N / 8,
        distinct,
    )
    .await;
    assert!(partial >= 2, "the kills must land mid-delivery ({partial})");
    let got = snapshot(&arrivals);
    let duplicates = assert_complete("http", &expected, &got);
    assert_release_order("http", &expected, &got);
    eprintln!(
        "http: {N} keys as {} results, {duplicates} duplicates",
        got.len()
    );
    receiver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_receiver_down_then_up_drains_the_backlog_in_order() {
    const N: usize = 1500;
    let dir = tempfile::tempdir().expect("temp dir");
    let arrivals = Arrivals::default();
    // Take a free port, then close it: the receiver is down when the daemon starts.
    let mut receiver = HttpReceiver::start_on(0, arrivals.clone()).await;
    let port = receiver.port;
    receiver.stop().await;
    let store = dir.path().join("store");
    let all = records(N);
    let expected: Vec<String> = all.iter().map(ResultRecord::idempotency_key).collect();
    seed_store(&store, TEST_LAB, all, 1000).expect("seed");
    let config = dir.path().join("pcrd.toml");
    std::fs::write(&config, config_with_sink(&receiver.sink_toml(100))).expect("config");
    let log = dir.path().join("stderr.log");
    let mut served = spawn_serve(&config, &store, &log, Duration::from_secs(60)).expect("serve");
    let api = Api::connect(&served.url, Some(ADMIN_TOKEN));
    let failing = wait_failing(&api, "central-http").await;
    assert_eq!(failing["delivered"], 0, "{failing}");
    assert!(snapshot(&arrivals).is_empty());

    let mut receiver = HttpReceiver::start_on(port, arrivals.clone()).await;
    wait_drained(&api, "central-http", Duration::from_secs(120)).await;
    served.child.kill().expect("stop");
    served.child.wait().expect("reap");
    let got = snapshot(&arrivals);
    assert_complete("http", &expected, &got);
    assert_release_order("http", &expected, &got);
    receiver.stop().await;
}

// ---------------------------------------------------------------------------------
// PostgreSQL

fn postgres_sink_toml(server: &PgServer, db: &str, batch_size: usize, sessions: usize) -> String {
    format!(
        "[[sinks]]\nname = \"central-pg\"\nbatch_size = {batch_size}\n[sinks.postgres]\n\
         host = \"{}\"\nport = {}\nuser = \"{}\"\ndbname = \"{db}\"\nconnect_timeout = \"2s\"\n\
         statement_timeout = \"10s\"\nconnections = {sessions}\n",
        server.host(),
        server.port(),
        server.user()
    )
}

/// The exchange table from `pcrd sink schema postgres`, plus the central system's own
/// arrival sequence (an extra column with a default, which pcrd leaves alone).
fn create_exchange_table(server: &PgServer, db: &str) {
    let table = pcrd::sinks::postgres::TableName::parse("pcrd_results").expect("name");
    server.psql(db, &pcrd::sinks::postgres::schema_sql(&table));
    server.psql(db, "ALTER TABLE pcrd_results ADD COLUMN arrival bigserial");
}

async fn pg_client(server: &PgServer, db: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&server.conninfo(db), tokio_postgres::NoTls)
        .await
        .expect("connect to the test PostgreSQL server");
    tokio::spawn(connection);
    client
}

/// The table's rows as arrivals (key, record), in the central system's arrival order.
async fn pg_arrivals(client: &tokio_postgres::Client) -> Vec<(String, String)> {
    client
        .query(
            "SELECT idempotency_key, result_id || ':' || version, record::text \
             FROM pcrd_results ORDER BY arrival",
            &[],
        )
        .await
        .expect("read the exchange table")
        .iter()
        .map(|row| {
            let key: String = row.get(0);
            let from_columns: String = row.get(1);
            assert_eq!(
                key, from_columns,
                "the key column agrees with the primary key"
            );
            (key, row.get::<_, String>(2))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sigkill_mid_delivery_loses_nothing_and_duplicates_nothing() {
    const N: usize = 6000;
    let server = PgServer::start();
    let db = server.create_database("exchange");
    create_exchange_table(&server, &db);
    let client = Arc::new(pg_client(&server, &db).await);
    let dir = tempfile::tempdir().expect("temp dir");
    let rows = || {
        let client = client.clone();
        async move {
            let row = client
                .query_one("SELECT count(*) FROM pcrd_results", &[])
                .await
                .expect("count");
            usize::try_from(row.get::<_, i64>(0)).expect("count fits")
        }
    };
    // Two sessions (the default): a batch is two transactions that a kill can split.
    let (expected, partial) = kill_and_drain(
        dir.path(),
        &postgres_sink_toml(&server, &db, 500, 2),
        "central-pg",
        N,
        N / 8,
        rows,
    )
    .await;
    assert!(partial >= 2, "the kills must land mid-delivery ({partial})");
    let got = pg_arrivals(&client).await;
    // The primary key makes a re-sent batch add nothing: exactly one row per key.
    assert_eq!(assert_complete("postgres", &expected, &got), 0);
    // Each row's record is the one released under its key.
    let released: BTreeMap<String, ResultRecord> = records(N)
        .into_iter()
        .map(|r| (r.idempotency_key(), r))
        .collect();
    for (key, record) in &got {
        let stored: ResultRecord = serde_json::from_str(record).expect("record JSON");
        assert_eq!(Some(&stored), released.get(key), "{key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_server_down_then_up_drains_the_backlog_in_order() {
    const N: usize = 1500;
    let server = PgServer::start();
    let db = server.create_database("exchange");
    create_exchange_table(&server, &db);
    server.stop();
    let dir = tempfile::tempdir().expect("temp dir");
    let store = dir.path().join("store");
    let all = records(N);
    let expected: Vec<String> = all.iter().map(ResultRecord::idempotency_key).collect();
    seed_store(&store, TEST_LAB, all, 1000).expect("seed");
    let config = dir.path().join("pcrd.toml");
    // One session, so the arrival sequence follows the commits in outbox order.
    std::fs::write(
        &config,
        config_with_sink(&postgres_sink_toml(&server, &db, 200, 1)),
    )
    .expect("config");
    let log = dir.path().join("stderr.log");
    let mut served = spawn_serve(&config, &store, &log, Duration::from_secs(60)).expect("serve");
    let api = Api::connect(&served.url, Some(ADMIN_TOKEN));
    let failing = wait_failing(&api, "central-pg").await;
    assert_eq!(failing["delivered"], 0, "{failing}");

    server.start_again();
    wait_drained(&api, "central-pg", Duration::from_secs(120)).await;
    served.child.kill().expect("stop");
    served.child.wait().expect("reap");
    let client = pg_client(&server, &db).await;
    let got = pg_arrivals(&client).await;
    assert_eq!(assert_complete("postgres", &expected, &got), 0);
    assert_release_order("postgres", &expected, &got);
}

// ---------------------------------------------------------------------------------
// HL7 / MLLP

/// One HL7 message as the receiver read it: MSH-10, and the key from its content.
#[derive(Clone, Debug)]
struct Hl7Arrival {
    key: String,
    control_id: String,
    message: String,
}

/// Field `index` of the first segment named `segment` (MSH counts its field
/// separator as MSH-1, so MSH-10 is split index 9).
fn field<'a>(message: &'a str, segment: &str, index: usize) -> Option<&'a str> {
    message
        .split('\r')
        .find(|s| s.starts_with(segment) && s.as_bytes().get(3) == Some(&b'|'))?
        .split('|')
        .nth(index)
}

/// Reads one ORU^R01 the way a LIS would: the result id from ORC-3 (filler order
/// number, `<result id>^<lab>`), the version from the result status: F or P is the
/// first version of these seeded results, C would be a correction.
fn hl7_arrival(message: &str) -> Result<Hl7Arrival, String> {
    let control_id = field(message, "MSH", 9).ok_or("no MSH-10")?.to_owned();
    let result_id = field(message, "ORC", 3)
        .and_then(|f| f.split('^').next())
        .ok_or("no ORC-3")?;
    let status = field(message, "OBR", 25).ok_or("no OBR-25")?;
    if status != "F" && status != "P" {
        return Err(format!(
            "OBR-25 {status:?}: only first versions were released"
        ));
    }
    Ok(Hl7Arrival {
        key: format!("{result_id}:1"),
        control_id,
        message: message.to_owned(),
    })
}

/// An MLLP receiver on pcrd's codec: records every message, answers AA with its
/// MSH-10 in MSA-2 (an AR for a message it cannot read). `stop` closes the port and
/// every connection.
struct Hl7Receiver {
    arrivals: Arc<Mutex<Vec<Hl7Arrival>>>,
    port: u16,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Hl7Receiver {
    async fn start_on(port: u16, arrivals: Arc<Mutex<Vec<Hl7Arrival>>>) -> Hl7Receiver {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the MLLP receiver");
        let port = listener.local_addr().expect("address").port();
        let shared = arrivals.clone();
        let task = tokio::spawn(async move {
            // Dropping the set (when this task is aborted) aborts every connection.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                connections.spawn(serve_mllp(stream, shared.clone()));
            }
        });
        Hl7Receiver {
            arrivals,
            port,
            task: Some(task),
        }
    }

    async fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    fn sink_toml(&self) -> String {
        format!(
            "[[sinks]]\nname = \"central-hl7\"\nbatch_size = 50\n[sinks.hl7]\n\
             address = \"127.0.0.1:{}\"\nack_timeout_ms = 5000\nconnect_timeout_ms = 1000\n",
            self.port
        )
    }

    fn snapshot(&self) -> Vec<Hl7Arrival> {
        self.arrivals.lock().expect("arrivals lock").clone()
    }
}

async fn serve_mllp(mut stream: tokio::net::TcpStream, arrivals: Arc<Mutex<Vec<Hl7Arrival>>>) {
    let _ = stream.set_nodelay(true);
    let mut decoder = MllpDecoder::default();
    let mut events = Vec::new();
    let mut buffer = vec![0; 64 * 1024];
    let mut out = Vec::new();
    loop {
        let n = match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        decoder.feed(&buffer[..n], &mut events);
        out.clear();
        for event in events.drain(..) {
            let MllpEvent::Frame(frame) = event else {
                continue;
            };
            let text = String::from_utf8_lossy(&frame).into_owned();
            let (code, control_id) = match hl7_arrival(&text) {
                Ok(arrival) => {
                    let id = arrival.control_id.clone();
                    arrivals.lock().expect("arrivals lock").push(arrival);
                    ("AA", id)
                }
                Err(_) => ("AR", field(&text, "MSH", 9).unwrap_or("").to_owned()),
            };
            let ack = format!(
                "MSH|^~\\&|LIS|CENTRAL|PCRD|{TEST_LAB}|20261127061001||ACK^R01^ACK|A{control_id}|P|2.5.1\r\
                 MSA|{code}|{control_id}\r"
            );
            mllp::frame_into(ack.as_bytes(), &mut out);
        }
        if !out.is_empty() && stream.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// Each key's copies carry one MSH-10, the one pcrd derives from that key, and are
/// the same bytes.
fn assert_hl7_ids(expected: &[String], got: &[Hl7Arrival]) -> Vec<(String, String)> {
    let ids: BTreeMap<String, String> = records(expected.len())
        .iter()
        .map(|r| (r.idempotency_key(), control_id(r)))
        .collect();
    for arrival in got {
        assert_eq!(
            ids.get(&arrival.key),
            Some(&arrival.control_id),
            "MSH-10 of {}",
            arrival.key
        );
    }
    got.iter()
        .map(|a| (a.key.clone(), a.message.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hl7_sigkill_mid_delivery_loses_nothing_and_resends_keep_their_control_id() {
    const N: usize = 2000;
    let dir = tempfile::tempdir().expect("temp dir");
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let mut receiver = Hl7Receiver::start_on(0, arrivals.clone()).await;
    let distinct = || {
        let arrivals = arrivals.clone();
        async move {
            let all = arrivals.lock().expect("arrivals lock");
            all.iter().map(|a| &a.key).collect::<BTreeSet<_>>().len()
        }
    };
    let (expected, partial) = kill_and_drain(
        dir.path(),
        &receiver.sink_toml(),
        "central-hl7",
        N,
        N / 8,
        distinct,
    )
    .await;
    assert!(partial >= 2, "the kills must land mid-delivery ({partial})");
    let got = receiver.snapshot();
    let pairs = assert_hl7_ids(&expected, &got);
    let duplicates = assert_complete("hl7", &expected, &pairs);
    assert_release_order("hl7", &expected, &pairs);
    eprintln!(
        "hl7: {N} keys as {} messages, {duplicates} resends",
        got.len()
    );
    receiver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hl7_receiver_down_then_up_drains_the_backlog_in_order() {
    const N: usize = 800;
    let dir = tempfile::tempdir().expect("temp dir");
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let mut receiver = Hl7Receiver::start_on(0, arrivals.clone()).await;
    let port = receiver.port;
    receiver.stop().await;
    let store = dir.path().join("store");
    let all = records(N);
    let expected: Vec<String> = all.iter().map(ResultRecord::idempotency_key).collect();
    seed_store(&store, TEST_LAB, all, 1000).expect("seed");
    let config = dir.path().join("pcrd.toml");
    std::fs::write(&config, config_with_sink(&receiver.sink_toml())).expect("config");
    let log = dir.path().join("stderr.log");
    let mut served = spawn_serve(&config, &store, &log, Duration::from_secs(60)).expect("serve");
    let api = Api::connect(&served.url, Some(ADMIN_TOKEN));
    let failing = wait_failing(&api, "central-hl7").await;
    assert_eq!(failing["delivered"], 0, "{failing}");

    let mut receiver = Hl7Receiver::start_on(port, arrivals.clone()).await;
    wait_drained(&api, "central-hl7", Duration::from_secs(120)).await;
    served.child.kill().expect("stop");
    served.child.wait().expect("reap");
    let got = receiver.snapshot();
    let pairs = assert_hl7_ids(&expected, &got);
    assert_complete("hl7", &expected, &pairs);
    assert_release_order("hl7", &expected, &pairs);
    receiver.stop().await;
}
