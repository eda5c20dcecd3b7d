//! The HTTP sink against a real axum receiver on 127.0.0.1 that fails on cue (500,
//! a hang past the sink's timeout, 429 with Retry-After, 400 with a body, a wrong
//! token), accepts duplicates and deduplicates by each record's key, and checks the
//! bearer token and the batch's Idempotency-Key; then over TLS with a CA file.

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use pcrd::sinks::http::{HttpConfig, HttpSink, RawHttpConfig};
use pcrd::sinks::{DeadReason, ItemOutcome, OutboxItem};
use pcrd_protocol::upstream::{
    Interpretation, KitRef, RESULT_SCHEMA_VERSION, ResultRecord, ResultStatus, TargetCall,
    TargetResult,
};
use sha2::{Digest, Sha256};

const TOKEN: &str = "central-system-token-1";
/// The receiver refuses any batch holding this tube (400 with a body naming it).
const REFUSED_TUBE: &str = "T-UNKNOWN-KIT";

fn record(n: u32) -> ResultRecord {
    ResultRecord {
        schema_version: RESULT_SCHEMA_VERSION,
        result_id: format!("LAB1-R0001-{n:06}"),
        version: 1,
        tube: format!("T{n:07}"),
        pool_size: 1,
        plate: "P0001".into(),
        well: "B2".into(),
        run: "R0001".into(),
        instrument: "cycler-1".into(),
        kit: KitRef {
            id: "cdc-n1-n2-rp".into(),
            version: "1".into(),
        },
        targets: vec![TargetResult {
            name: "N1".into(),
            dye: "FAM".into(),
            loinc: Some("94759-8".into()),
            ct: None,
            call: TargetCall::NotDetected,
        }],
        interpretation: Interpretation::Negative,
        status: ResultStatus::Final,
        correction_reason: None,
        tested_at: "2026-11-27T06:00:00.000Z".into(),
        released_at: "2026-11-27T06:10:00.000Z".into(),
        released_by: "auto".into(),
        lab_id: "LAB1".into(),
    }
}

fn items(range: std::ops::Range<u32>) -> Vec<OutboxItem> {
    range
        .map(|n| OutboxItem {
            seq: u64::from(n),
            record: record(n),
            attempt: 0,
        })
        .collect()
}

/// What the receiver answers to the next request(s), before accepting.
#[derive(Clone, Debug)]
enum Cue {
    Status {
        status: u16,
        retry_after: Option<String>,
        body: &'static str,
    },
    /// Answer 200 only after this long (past the sink's timeout).
    Hang(Duration),
}

#[derive(Debug, Default)]
struct Seen {
    cues: VecDeque<Cue>,
    /// Every request that reached the handler: (Idempotency-Key, results in it).
    requests: Vec<(String, usize)>,
    /// Per-record keys (result_id:version) of accepted results, deduplicated.
    keys: BTreeSet<String>,
    /// Accepted results, duplicates included.
    accepted: usize,
}

type Shared = Arc<Mutex<Seen>>;

async fn receive(State(seen): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    if headers.get("authorization")
        != Some(&HeaderValue::from_static("Bearer central-system-token-1"))
    {
        return (StatusCode::UNAUTHORIZED, "bad token").into_response();
    }
    let Ok(batch) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "not JSON").into_response();
    };
    let Some(results) = batch["results"].as_array() else {
        return (StatusCode::BAD_REQUEST, "no results array").into_response();
    };
    let mut records = Vec::new();
    for value in results {
        match serde_json::from_value::<ResultRecord>(value.clone()) {
            Ok(r) => records.push(r),
            Err(e) => return (StatusCode::BAD_REQUEST, format!("bad record: {e}")).into_response(),
        }
    }
    // The batch key, computed here independently: SHA-256 of the records' keys.
    let mut hasher = Sha256::new();
    for r in &records {
        hasher.update(format!("{}:{}\n", r.result_id, r.version).as_bytes());
    }
    let expected = format!("pcrd-batch-{}", hex::encode(hasher.finalize()));
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if key != expected
        || batch["schema_version"] != 1
        || batch["count"] != records.len()
        || batch["batch_key"] != expected["pcrd-batch-".len()..]
    {
        return (StatusCode::BAD_REQUEST, format!("bad batch key {key:?}")).into_response();
    }
    let cue = {
        let mut seen = seen.lock().expect("lock");
        seen.requests.push((key, records.len()));
        seen.cues.pop_front()
    };
    match cue {
        Some(Cue::Status {
            status,
            retry_after,
            body,
        }) => {
            let mut response =
                (StatusCode::from_u16(status).expect("status"), body).into_response();
            if let Some(value) = retry_after {
                response.headers_mut().insert(
                    "retry-after",
                    HeaderValue::from_str(&value).expect("header"),
                );
            }
            return response;
        }
        Some(Cue::Hang(wait)) => tokio::time::sleep(wait).await,
        None => {}
    }
    if let Some(bad) = records.iter().find(|r| r.tube == REFUSED_TUBE) {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("tube {}: kit not registered here", bad.tube),
        )
            .into_response();
    }
    let mut seen = seen.lock().expect("lock");
    seen.accepted += records.len();
    for r in records {
        seen.keys.insert(format!("{}:{}", r.result_id, r.version));
    }
    StatusCode::NO_CONTENT.into_response()
}

struct Receiver {
    seen: Shared,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start() -> Receiver {
        let seen = Shared::default();
        let app = Router::new()
            .route("/results", post(receive))
            .with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("serve");
        });
        Receiver { seen, addr, task }
    }

    fn url(&self) -> String {
        format!("http://{}/results", self.addr)
    }

    fn cue(&self, cue: Cue) {
        self.seen.lock().expect("lock").cues.push_back(cue);
    }

    fn unique_keys(&self) -> usize {
        self.seen.lock().expect("lock").keys.len()
    }

    fn requests(&self) -> Vec<(String, usize)> {
        self.seen.lock().expect("lock").requests.clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn sink_to(url: &str, token: Option<&str>, batch_size: usize, timeout: &str) -> HttpSink {
    sink_with(
        RawHttpConfig {
            url: Some(url.to_owned()),
            token_env: Some("CENTRAL_TOKEN".into()),
            timeout: Some(timeout.into()),
            batch_size: Some(batch_size),
            ca_file: None,
        },
        token,
    )
}

fn sink_with(raw: RawHttpConfig, token: Option<&str>) -> HttpSink {
    let token = token.map(str::to_owned);
    let config = HttpConfig::from_raw(raw, Path::new("/"), &move |var| {
        assert_eq!(var, "CENTRAL_TOKEN");
        token.clone()
    })
    .expect("valid config");
    HttpSink::new(&config).expect("sink")
}

fn all_delivered(outcomes: &[ItemOutcome], n: usize) {
    assert_eq!(outcomes.len(), n);
    assert!(
        outcomes.iter().all(|o| *o == ItemOutcome::Delivered),
        "{outcomes:?}"
    );
}

fn all_retry(outcomes: &[ItemOutcome], n: usize) -> (String, Option<Duration>) {
    assert_eq!(outcomes.len(), n);
    let mut first = None;
    for outcome in outcomes {
        match outcome {
            ItemOutcome::Retry { reason, after } => {
                first.get_or_insert((reason.clone(), *after));
            }
            other => panic!("expected a retry, got {other:?}"),
        }
    }
    first.expect("at least one item")
}

#[tokio::test]
async fn batches_arrive_with_the_token_and_a_stable_key_and_duplicates_are_harmless() {
    let receiver = Receiver::start().await;
    let mut sink = sink_to(&receiver.url(), Some(TOKEN), 100, "5s");
    all_delivered(&sink.deliver(&items(0..250)).await, 250);
    let requests = receiver.requests();
    assert_eq!(
        requests.iter().map(|r| r.1).collect::<Vec<_>>(),
        vec![100, 100, 50],
        "batch_size cuts the outbox batch into requests"
    );
    assert_eq!(receiver.unique_keys(), 250);

    // The cursor did not move (a crash): the same batch again, by a new sink.
    let mut restarted = sink_to(&receiver.url(), Some(TOKEN), 100, "5s");
    all_delivered(&restarted.deliver(&items(0..250)).await, 250);
    let again = receiver.requests();
    assert_eq!(again.len(), 6);
    assert_eq!(
        again[..3],
        again[3..],
        "the same items give the same Idempotency-Key"
    );
    assert_eq!(receiver.unique_keys(), 250);
    assert_eq!(receiver.seen.lock().expect("lock").accepted, 500);
}

#[tokio::test]
async fn a_500_and_a_hang_are_retried_and_the_next_attempt_delivers() {
    let receiver = Receiver::start().await;
    let mut sink = sink_to(&receiver.url(), Some(TOKEN), 10, "300ms");
    receiver.cue(Cue::Status {
        status: 500,
        retry_after: None,
        body: "database busy",
    });
    let (reason, after) = all_retry(&sink.deliver(&items(0..25)).await, 25);
    assert!(
        reason.contains("500") && reason.contains("database busy"),
        "{reason}"
    );
    assert_eq!(after, None);
    assert_eq!(
        receiver.requests().len(),
        1,
        "after a retry the rest is not sent"
    );

    receiver.cue(Cue::Hang(Duration::from_secs(3)));
    let (reason, _) = all_retry(&sink.deliver(&items(0..25)).await, 25);
    assert!(reason.contains("timed out"), "{reason}");

    all_delivered(&sink.deliver(&items(0..25)).await, 25);
    assert_eq!(receiver.unique_keys(), 25);
}

#[tokio::test]
async fn a_429_or_503_with_retry_after_passes_the_wait_on() {
    let receiver = Receiver::start().await;
    let mut sink = sink_to(&receiver.url(), Some(TOKEN), 10, "5s");
    receiver.cue(Cue::Status {
        status: 429,
        retry_after: Some("7".into()),
        body: "slow down",
    });
    let (reason, after) = all_retry(&sink.deliver(&items(0..5)).await, 5);
    assert!(reason.contains("429"), "{reason}");
    assert_eq!(after, Some(Duration::from_secs(7)));

    let at = std::time::SystemTime::now() + Duration::from_secs(120);
    receiver.cue(Cue::Status {
        status: 503,
        retry_after: Some(httpdate::fmt_http_date(at)),
        body: "maintenance",
    });
    let (_, after) = all_retry(&sink.deliver(&items(0..5)).await, 5);
    let after = after.expect("Retry-After as a date");
    assert!(
        after > Duration::from_secs(110) && after <= Duration::from_secs(120),
        "{after:?}"
    );

    receiver.cue(Cue::Status {
        status: 408,
        retry_after: None,
        body: "",
    });
    all_retry(&sink.deliver(&items(0..5)).await, 5);
    all_delivered(&sink.deliver(&items(0..5)).await, 5);
}

#[tokio::test]
async fn a_refused_record_is_dead_lettered_alone_with_the_response_body() {
    let receiver = Receiver::start().await;
    let mut sink = sink_to(&receiver.url(), Some(TOKEN), 100, "5s");
    let mut batch = items(0..9);
    batch[5].record.tube = REFUSED_TUBE.into();
    let outcomes = sink.deliver(&batch).await;
    assert_eq!(outcomes.len(), 9);
    for (i, outcome) in outcomes.iter().enumerate() {
        if i == 5 {
            match outcome {
                ItemOutcome::Dead {
                    reason: DeadReason::Rejected,
                    detail,
                } => assert!(
                    detail.contains("422") && detail.contains("kit not registered here"),
                    "{detail}"
                ),
                other => panic!("{other:?}"),
            }
        } else {
            assert_eq!(*outcome, ItemOutcome::Delivered, "item {i}");
        }
    }
    assert_eq!(receiver.unique_keys(), 8);

    // A 400 for a single item: dead at once, the body as the detail.
    receiver.cue(Cue::Status {
        status: 400,
        retry_after: None,
        body: "well Z99 does not exist",
    });
    match &sink.deliver(&items(20..21)).await[0] {
        ItemOutcome::Dead { detail, .. } => assert!(detail.contains("Z99"), "{detail}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_wrong_token_or_a_receiver_that_is_down_is_a_retry_not_a_dead_letter() {
    let receiver = Receiver::start().await;
    let mut wrong = sink_to(&receiver.url(), Some("expired-token"), 100, "5s");
    let (reason, _) = all_retry(&wrong.deliver(&items(0..3)).await, 3);
    assert!(reason.contains("401"), "{reason}");
    assert_eq!(receiver.unique_keys(), 0);

    let url = receiver.url();
    drop(receiver);
    // Give the aborted server a moment to close its listener.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut sink = sink_to(&url, Some(TOKEN), 100, "2s");
    let (reason, _) = all_retry(&sink.deliver(&items(0..3)).await, 3);
    assert!(reason.contains("cannot connect"), "{reason}");
}

// ----- TLS -----

mod tls {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    use tokio_rustls::TlsAcceptor;
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

    /// A TLS listener for axum::serve: the handshake happens in accept; a failed
    /// handshake (the client refused our certificate) is skipped.
    struct TlsListener {
        tcp: tokio::net::TcpListener,
        acceptor: TlsAcceptor,
    }

    impl axum::serve::Listener for TlsListener {
        type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
        type Addr = SocketAddr;

        async fn accept(&mut self) -> (Self::Io, Self::Addr) {
            loop {
                let Ok((stream, addr)) = self.tcp.accept().await else {
                    continue;
                };
                if let Ok(tls) = self.acceptor.accept(stream).await {
                    return (tls, addr);
                }
            }
        }

        fn local_addr(&self) -> std::io::Result<Self::Addr> {
            self.tcp.local_addr()
        }
    }

    /// A CA and a server certificate for 127.0.0.1 signed by it: (CA PEM, server config).
    fn certificates() -> (String, rustls::ServerConfig) {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "pcrd test central CA");
        let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
        let server_key = KeyPair::generate().expect("server key");
        let mut server_params =
            CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("server params");
        server_params
            .distinguished_name
            .push(DnType::CommonName, "central receiver");
        let server = server_params
            .signed_by(&server_key, &ca, &ca_key)
            .expect("server certificate");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(server.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
        )
        .expect("server TLS config");
        (ca.pem(), config)
    }

    #[tokio::test]
    async fn over_tls_the_ca_file_makes_the_receiver_trusted() {
        let (ca_pem, server_config) = certificates();
        let seen = Shared::default();
        let app = Router::new()
            .route("/results", post(receive))
            .with_state(seen.clone());
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = tcp.local_addr().expect("addr");
        let listener = TlsListener {
            tcp,
            acceptor: TlsAcceptor::from(Arc::new(server_config)),
        };
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("serve");
        });
        let url = format!("https://{addr}/results");

        // Without the CA file the receiver's certificate is not trusted: retried.
        let mut untrusting = sink_to(&url, Some(TOKEN), 100, "5s");
        let (reason, _) = all_retry(&untrusting.deliver(&items(0..4)).await, 4);
        assert!(reason.to_lowercase().contains("certificate"), "{reason}");

        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("central-ca.pem"), &ca_pem).expect("write CA");
        let raw = RawHttpConfig {
            url: Some(url.clone()),
            token_env: Some("CENTRAL_TOKEN".into()),
            // Relative to the config's directory.
            ca_file: Some("central-ca.pem".into()),
            timeout: Some("5s".into()),
            batch_size: None,
        };
        let config = HttpConfig::from_raw(raw, dir.path(), &|_| Some(TOKEN.to_owned()))
            .expect("valid config");
        let mut trusting = HttpSink::new(&config).expect("sink");
        all_delivered(&trusting.deliver(&items(0..4)).await, 4);
        assert_eq!(seen.lock().expect("lock").keys.len(), 4);

        // A CA file that is not PEM is a config error, not a runtime surprise.
        std::fs::write(dir.path().join("junk.pem"), "not a certificate").expect("write");
        let problems = HttpConfig::from_raw(
            RawHttpConfig {
                url: Some(url),
                ca_file: Some("junk.pem".into()),
                ..Default::default()
            },
            dir.path(),
            &|_| None,
        )
        .expect_err("junk CA file");
        assert!(problems[0].contains("junk.pem"), "{problems:?}");
        server.abort();
    }
}
