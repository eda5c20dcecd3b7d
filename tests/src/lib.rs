//! Test support: start the real `pcrd` binary on a temporary store and talk to it.
//!
//! Every daemon listens on 127.0.0.1 port 0 and reports its address on stdout, so tests
//! run in parallel without fixed ports and without sleeping for start-up.

pub mod bench;
pub mod postgres;
pub mod results;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Tokens of the test configuration (see [`TEST_CONFIG`]).
pub const TECH_TOKEN: &str = "test-technician-token";
pub const REVIEWER_TOKEN: &str = "test-reviewer-token-";
pub const ADMIN_TOKEN: &str = "test-admin-token-0001";

/// The configuration every test daemon runs with; the store path is given on the
/// command line.
pub const TEST_CONFIG: &str = r#"
[lab]
id = "LAB-TEST"

[server]
listen = "127.0.0.1:0"
max_body_bytes = 1048576

[[users]]
name = "tina"
role = "technician"
token = "test-technician-token"

[[users]]
name = "rob"
role = "reviewer"
token = "test-reviewer-token-"

[[users]]
name = "ada"
role = "admin"
token = "test-admin-token-0001"
"#;

/// Where `scripts/test.sh` installs the independent peers the tests talk to
/// (`$PCRD_PEERS`, else `.peers/` in the workspace); Python peers are in `python/`.
pub fn peers_dir() -> PathBuf {
    std::env::var_os("PCRD_PEERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.peers"))
}

/// Path to the `pcrd` binary, built once per test process if cargo has not built it.
pub fn pcrd_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // target/<profile>/deps/<test binary> -> target/<profile>/pcrd
        let exe = std::env::current_exe().expect("test binary path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>/deps");
        let bin = profile_dir.join("pcrd");
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        // Always ask cargo: it is a no-op when the binary is current, and a stale binary
        // would test old code.
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "--quiet", "-p", "pcrd", "--bin", "pcrd"]);
        if release {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build for the pcrd binary");
        assert!(status.success(), "building the pcrd binary failed");
        assert!(bin.exists(), "pcrd binary not found at {}", bin.display());
        bin
    })
    .clone()
}

/// A `pcrd serve` that has announced its address.
#[derive(Debug)]
pub struct Served {
    pub child: Child,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// From spawning the process to its `listening on` line.
    pub startup: Duration,
}

/// Starts `pcrd serve` on `config` and `store`, listening on 127.0.0.1 port 0 with its
/// stderr appended to `stderr_log`, and waits up to `timeout` for the `listening on`
/// line. On failure the process is killed and the error carries its stderr.
pub fn spawn_serve(
    config: &Path,
    store: &Path,
    stderr_log: &Path,
    timeout: Duration,
) -> Result<Served, String> {
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(stderr_log)
        .map_err(|e| format!("stderr log {}: {e}", stderr_log.display()))?;
    let started = Instant::now();
    let mut child = Command::new(pcrd_bin())
        .arg("serve")
        .arg("--config")
        .arg(config)
        .arg("--data-dir")
        .arg(store)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .map_err(|e| format!("spawn pcrd serve: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send((line, Instant::now()));
        }
        // Keep draining so the daemon never blocks on a full pipe.
        for _ in lines {}
    });
    let Ok((line, at)) = rx.recv_timeout(timeout) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!(
            "pcrd serve did not report its address; stderr:\n{}",
            std::fs::read_to_string(stderr_log).unwrap_or_default()
        ));
    };
    let Some(url) = line.strip_prefix("listening on ") else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("unexpected first line from pcrd serve: {line:?}"));
    };
    Ok(Served {
        child,
        url: url.to_string(),
        startup: at - started,
    })
}

/// A running `pcrd serve` on its own temporary store.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    dir: tempfile::TempDir,
    stderr_log: PathBuf,
}

impl Daemon {
    /// Starts a daemon with [`TEST_CONFIG`] on a new store.
    pub fn start() -> Daemon {
        Daemon::start_with_config(TEST_CONFIG)
    }

    pub fn start_with_config(config: &str) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("pcrd.toml"), config).expect("write config");
        let mut daemon = Daemon {
            child: None,
            url: String::new(),
            stderr_log: dir.path().join("stderr.log"),
            dir,
        };
        daemon.spawn();
        daemon
    }

    /// The store directory.
    pub fn store_path(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("pcrd.toml")
    }

    /// What the daemon wrote to stderr so far (its logs).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    fn spawn(&mut self) {
        let served = spawn_serve(
            &self.config_path(),
            &self.store_path(),
            &self.stderr_log,
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        self.url = served.url;
        self.child = Some(served.child);
    }

    /// Kills the daemon with SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL pcrd");
            child.wait().expect("reap pcrd");
        }
    }

    /// Stops it with SIGTERM and waits for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("daemon is running");
        let pid = i32::try_from(child.id()).expect("pid fits");
        send_signal(pid, "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "pcrd did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the daemon again on the same store (after [`Daemon::kill9`]).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the daemon first");
        self.spawn();
    }

    /// An HTTP client with the technician's token.
    pub fn client(&self) -> Api {
        self.client_as(TECH_TOKEN)
    }

    pub fn client_as(&self, token: &str) -> Api {
        Api {
            base: self.url.clone(),
            token: Some(token.to_string()),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("HTTP client"),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Sends a signal with the `kill` command, keeping the workspace free of unsafe code.
pub fn send_signal(pid: i32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// A thin async client for the daemon's API that returns status and JSON body.
#[derive(Debug, Clone)]
pub struct Api {
    pub base: String,
    pub token: Option<String>,
    http: reqwest::Client,
}

/// A response: status code and body parsed as JSON (`Value::Null` when not JSON).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: serde_json::Value,
}

impl Reply {
    /// The `error.message` of an error body, or "" when absent.
    pub fn message(&self) -> String {
        let e = &self.body["error"];
        let mut text = e["message"].as_str().unwrap_or_default().to_string();
        if let Some(problems) = e["problems"].as_array() {
            for p in problems {
                text.push_str(" | ");
                text.push_str(p.as_str().unwrap_or_default());
            }
        }
        text
    }
}

impl Api {
    /// A client for a daemon this harness did not start (e.g. one run by a test with
    /// `pcrd_bin()` directly), at `base` (`http://127.0.0.1:PORT`).
    pub fn connect(base: &str, token: Option<&str>) -> Api {
        Api {
            base: base.trim_end_matches('/').to_string(),
            token: token.map(str::to_string),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("HTTP client"),
        }
    }

    pub fn without_token(&self) -> Api {
        Api {
            token: None,
            ..self.clone()
        }
    }

    /// GET that must answer 200; returns the body.
    pub async fn get_ok(&self, path: &str) -> serde_json::Value {
        let reply = self.get(path).await;
        assert_eq!(reply.status, 200, "GET {path}: {reply:?}");
        reply.body
    }

    /// Checks the audit trail's hash chain and returns its length.
    pub async fn audit_intact(&self) -> u64 {
        let v = self.get_ok("/api/v1/audit/verify").await;
        assert_eq!(v["intact"], true, "audit chain broken: {v}");
        v["entries"].as_u64().expect("entries")
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> Reply {
        self.send(self.http.post(format!("{}{path}", self.base)).json(&body))
            .await
    }

    /// POST with a raw body and content type, for malformed-input tests.
    pub async fn post_raw(&self, path: &str, content_type: &str, body: Vec<u8>) -> Reply {
        self.send(
            self.http
                .post(format!("{}{path}", self.base))
                .header("content-type", content_type)
                .body(body),
        )
        .await
    }

    async fn send(&self, mut request: reqwest::RequestBuilder) -> Reply {
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("HTTP request to pcrd");
        let status = response.status().as_u16();
        let bytes = response.bytes().await.expect("response body");
        let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Reply { status, body }
    }
}

impl Api {
    /// Polls `GET path` until it answers 200 with a body for which `ok` holds, and
    /// returns that body; fails after `deadline` with what was last seen.
    pub async fn wait_for(
        &self,
        path: &str,
        what: &str,
        deadline: Duration,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let until = Instant::now() + deadline;
        let mut last = serde_json::Value::Null;
        while Instant::now() < until {
            let reply = self.get(path).await;
            if reply.status == 200 && ok(&reply.body) {
                return reply.body;
            }
            last = reply.body;
            // The pace of the polling, not a synchronisation.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("GET {path}: not {what} within {deadline:?}; last seen:\n{last:#}");
    }

    /// Receives 94 tubes `T{tag}0000..`, builds and seals the extraction plate
    /// `EXT-{tag}` of `kit`, and transfers it to the PCR plate `PCR-{tag}`, which it
    /// returns (sealed, ready for a run).
    pub async fn sealed_pcr_plate(&self, kit: &str, tag: &str) -> String {
        use serde_json::json;
        let tubes: Vec<serde_json::Value> = (0..94)
            .map(|i| json!({ "barcode": format!("T{tag}{i:04}") }))
            .collect();
        let r = self.post("/api/v1/tubes", json!({ "tubes": tubes })).await;
        assert_eq!(r.status, 200, "{r:?}");
        let ext = format!("EXT-{tag}");
        let r = self
            .post("/api/v1/plates", json!({ "kit": kit, "id": ext }))
            .await;
        assert_eq!(r.status, 201, "{r:?}");
        for step in ["fill", "seal"] {
            let r = self
                .post(&format!("/api/v1/plates/{ext}/{step}"), json!({}))
                .await;
            assert_eq!(r.status, 200, "{step}: {r:?}");
        }
        let pcr = format!("PCR-{tag}");
        let r = self
            .post(
                &format!("/api/v1/plates/{ext}/transfer"),
                json!({ "id": pcr }),
            )
            .await;
        assert_eq!(r.status, 201, "{r:?}");
        pcr
    }
}

/// A response read as text (for `/metrics`, which is not JSON).
#[derive(Debug)]
pub struct TextReply {
    pub status: u16,
    pub content_type: String,
    pub text: String,
}

impl Api {
    /// GET returning the body as text.
    pub async fn get_text(&self, path: &str) -> TextReply {
        let mut request = self.http.get(format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("HTTP request to pcrd");
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let text = response.text().await.expect("response body");
        TextReply {
            status,
            content_type,
            text,
        }
    }

    /// POST that returns transport errors instead of panicking, for requests that may
    /// race a killed daemon.
    pub async fn try_post(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> Result<Reply, reqwest::Error> {
        let mut request = self.http.post(format!("{}{path}", self.base)).json(&body);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await?;
        let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Ok(Reply { status, body })
    }
}

/// The value of an unlabelled sample `name` in Prometheus text exposition.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (metric, value) = line.split_once(' ')?;
            (metric == name).then(|| value.trim().parse().ok())?
        })
}

/// A one-run RDML document of a whole plate for tests and benchmarks: `targets` as
/// (target id, dye id) pairs, every well of `format` filled (reactions numbered row
/// by row), reaction `id`'s sample called `sample(id)` (type unkn) and its curve for
/// target `k` given by `curve(id, k)`. Experiment "exp", run "plate-1".
pub fn plate_document(
    format: pcrd_protocol::rdml::PcrFormat,
    targets: &[(&str, &str)],
    sample: impl Fn(u32) -> String,
    mut curve: impl FnMut(u32, usize) -> Vec<f64>,
) -> pcrd_protocol::rdml::Document {
    use pcrd_protocol::rdml::{
        Document, Dye, Experiment, Reaction, ReactionData, Run, Sample, Target,
    };
    let wells = format.rows * format.columns;
    let reactions = (1..=wells)
        .map(|id| Reaction {
            id,
            sample_id: sample(id),
            data: targets
                .iter()
                .enumerate()
                .map(|(k, (target, _))| ReactionData {
                    target_id: (*target).to_owned(),
                    cq: None,
                    excluded: None,
                    threshold: None,
                    background: None,
                    background_slope: None,
                    fluorescence: curve(id, k),
                })
                .collect(),
        })
        .collect();
    let mut samples: Vec<Sample> = (1..=wells)
        .map(|id| Sample {
            id: sample(id),
            kind: "unkn".to_owned(),
            quantity: None,
        })
        .collect();
    samples.sort_by(|a, b| a.id.cmp(&b.id));
    samples.dedup_by(|a, b| a.id == b.id);
    Document {
        version: "1.3".to_owned(),
        dyes: targets
            .iter()
            .map(|(_, dye)| Dye {
                id: (*dye).to_owned(),
            })
            .collect(),
        samples,
        targets: targets
            .iter()
            .map(|(target, dye)| Target {
                id: (*target).to_owned(),
                dye_id: (*dye).to_owned(),
                kind: "toi".to_owned(),
            })
            .collect(),
        experiments: vec![Experiment {
            id: "exp".to_owned(),
            runs: vec![Run {
                id: "plate-1".to_owned(),
                instrument: None,
                cq_detection_method: None,
                format,
                reactions,
            }],
        }],
    }
}

/// One complete batch in a files sink's folder (its manifest is written last): the
/// manifest and the records of the batch's NDJSON file, in order.
#[derive(Debug)]
pub struct SinkBatch {
    pub manifest: serde_json::Value,
    pub records: Vec<serde_json::Value>,
}

/// The complete batches in a files sink's folder, oldest first (none when the
/// folder does not exist yet).
pub fn files_sink_batches(dir: &Path) -> Vec<SinkBatch> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut manifests: Vec<PathBuf> = entries
        .map(|e| e.expect("read the sink folder").path())
        .filter(|p| p.to_string_lossy().ends_with(".manifest.json"))
        .collect();
    manifests.sort();
    let mut out = Vec::new();
    for path in manifests {
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read a manifest"))
                .expect("a manifest is JSON");
        let mut records = Vec::new();
        for file in manifest["files"].as_array().expect("manifest files") {
            let name = file["name"].as_str().expect("file name");
            if name.ends_with(".ndjson") {
                let text = std::fs::read_to_string(dir.join(name)).expect("read the NDJSON file");
                records.extend(
                    text.lines()
                        .filter(|l| !l.trim().is_empty())
                        .map(|l| serde_json::from_str(l).expect("a record is JSON")),
                );
            }
        }
        out.push(SinkBatch { manifest, records });
    }
    out
}

/// Every record in a files sink's complete batches, in delivery order.
pub fn files_sink_records(dir: &Path) -> Vec<serde_json::Value> {
    files_sink_batches(dir)
        .into_iter()
        .flat_map(|b| b.records)
        .collect()
}
