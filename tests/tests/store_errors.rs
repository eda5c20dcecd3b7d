//! `pcrd serve` refusing to start: a locked, unwritable or corrupt store (exit code 3)
//! and a bad configuration (exit code 2), each with a message that names the problem
//! and never a panic.

use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pcrd_tests::{Api, Daemon, TECH_TOKEN, TEST_CONFIG, pcrd_bin};
use serde_json::json;

/// How a `pcrd serve` run ended.
#[derive(Debug)]
enum Outcome {
    /// It exited by itself.
    Exited { code: Option<i32>, stderr: String },
    /// It started serving at `url`; [`Outcome::stop`] stops it.
    Served {
        url: String,
        child: Child,
        stderr_path: PathBuf,
    },
}

impl Outcome {
    /// A daemon that started may still find damage with its background scrub and stop
    /// by itself: waits up to `timeout` for that.
    fn exited_within(self, timeout: Duration) -> Outcome {
        let Outcome::Served {
            url,
            mut child,
            stderr_path,
        } = self
        else {
            return self;
        };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().expect("wait") {
                return Outcome::Exited {
                    code: status.code(),
                    stderr: std::fs::read_to_string(&stderr_path).unwrap_or_default(),
                };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Outcome::Served {
            url,
            child,
            stderr_path,
        }
    }

    /// Stops a daemon that started, and returns the run's stderr.
    fn stop(self) -> String {
        match self {
            Outcome::Exited { stderr, .. } => stderr,
            Outcome::Served {
                mut child,
                stderr_path,
                ..
            } => {
                let _ = child.kill();
                let _ = child.wait();
                std::fs::read_to_string(stderr_path).unwrap_or_default()
            }
        }
    }
}

/// Runs `pcrd serve` with `config` and `data_dir` until it exits, or until it reports
/// that it is listening.
fn run_serve(config: &Path, data_dir: &Path, scratch: &Path) -> Outcome {
    let stderr_path = scratch.join(format!(
        "serve-stderr-{}.log",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let stderr_file = std::fs::File::create(&stderr_path).expect("stderr file");
    let mut child = Command::new(pcrd_bin())
        .arg("serve")
        .arg("--config")
        .arg(config)
        .arg("--data-dir")
        .arg(data_dir)
        .stdout(Stdio::piped())
        .stderr(stderr_file)
        .spawn()
        .expect("spawn pcrd serve");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return Outcome::Exited {
                code: status.code(),
                stderr: std::fs::read_to_string(&stderr_path).unwrap_or_default(),
            };
        }
        if let Ok(line) = rx.try_recv()
            && let Some(url) = line.strip_prefix("listening on ")
        {
            return Outcome::Served {
                url: url.to_string(),
                child,
                stderr_path,
            };
        }
        if Instant::now() > deadline {
            let stderr = Outcome::Served {
                url: String::new(),
                child,
                stderr_path,
            }
            .stop();
            panic!("pcrd serve neither exited nor served within 60 s; stderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Asserts that the run exited with `code`, without panicking, and returns its stderr.
#[track_caller]
fn expect_exit(outcome: Outcome, code: i32) -> String {
    match outcome {
        Outcome::Exited { code: got, stderr } => {
            assert_eq!(got, Some(code), "exit code; stderr:\n{stderr}");
            assert_no_panic(&stderr);
            stderr
        }
        served @ Outcome::Served { .. } => {
            let stderr = served.stop();
            panic!("pcrd serve started instead of exiting with {code}; stderr:\n{stderr}")
        }
    }
}

#[track_caller]
fn assert_no_panic(stderr: &str) {
    assert!(
        !stderr.contains("panicked at") && !stderr.contains("RUST_BACKTRACE"),
        "pcrd panicked:\n{stderr}"
    );
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("pcrd.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_in_use_by_another_daemon() {
    let daemon = Daemon::start();
    let api = daemon.client();
    let reply = api
        .post(
            "/api/v1/tubes",
            json!({ "tubes": [{ "barcode": "LOCK-0001" }] }),
        )
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let scratch = tempfile::tempdir().expect("temp dir");

    let stderr = expect_exit(
        run_serve(&daemon.config_path(), &daemon.store_path(), scratch.path()),
        3,
    );
    assert!(
        stderr.contains("in use by another process"),
        "stderr:\n{stderr}"
    );
    assert!(
        stderr.contains(&daemon.store_path().display().to_string()),
        "the message names the store; stderr:\n{stderr}"
    );

    // The first daemon is unharmed.
    let tube = api.get("/api/v1/tubes/LOCK-0001").await;
    assert_eq!(tube.status, 200, "{tube:?}");
    let more = api
        .post(
            "/api/v1/tubes",
            json!({ "tubes": [{ "barcode": "LOCK-0002" }] }),
        )
        .await;
    assert_eq!(more.status, 200, "{more:?}");
}

#[test]
fn a_store_path_that_cannot_be_created() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), TEST_CONFIG);
    // Tests may run as root, which ignores permissions: a path under a regular file
    // cannot be created by anyone.
    std::fs::write(dir.path().join("afile"), b"not a directory").expect("write file");
    let store = dir.path().join("afile").join("store");
    let stderr = expect_exit(run_serve(&config, &store, dir.path()), 3);
    assert!(
        stderr.contains(&store.display().to_string()),
        "the message names the path; stderr:\n{stderr}"
    );
    assert!(stderr.contains("store"), "stderr:\n{stderr}");
}

const BATCHES: usize = 10;
const TUBES_PER_BATCH: usize = 200;

/// Starts a daemon, receives tubes, stops it cleanly and returns it (stopped).
async fn stopped_daemon_with_tubes() -> Daemon {
    let mut daemon = Daemon::start();
    let api = daemon.client();
    for batch in 0..BATCHES {
        let tubes: Vec<_> = (0..TUBES_PER_BATCH)
            .map(|i| json!({ "barcode": format!("CORRUPT-{batch}-{i:04}"), "pool_size": 10 }))
            .collect();
        let reply = api.post("/api/v1/tubes", json!({ "tubes": tubes })).await;
        assert_eq!(reply.status, 200, "{reply:?}");
    }
    let status = daemon.terminate();
    assert!(status.success(), "pcrd exited with {status} on SIGTERM");
    daemon
}

fn overwrite(path: &Path, at: u64, bytes: &[u8]) {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for corrupting");
    file.seek(SeekFrom::Start(at)).expect("seek");
    file.write_all(bytes).expect("write garbage");
    file.sync_all().expect("sync");
}

fn garbage(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// pcrd must refuse to start on a damaged store (exit code 3, a message naming the
/// store, no panic) rather than start and fail requests later.
async fn assert_corrupt_store_refused(daemon: &Daemon) {
    let acknowledged = TUBES_PER_BATCH * BATCHES;
    let scratch = tempfile::tempdir().expect("temp dir");
    // Damage is found either at open (the log ends before the high-water mark) or by
    // the scrub that reads every page right after start; both end in exit code 3.
    let outcome = run_serve(&daemon.config_path(), &daemon.store_path(), scratch.path())
        .exited_within(Duration::from_secs(30));
    if let Outcome::Served { url, .. } = &outcome {
        // Show what serving on the damaged store looks like, then fail.
        let api = Api::connect(url, Some(TECH_TOKEN));
        let mut evidence = Vec::new();
        for path in [
            "/api/v1/tubes?limit=100000",
            "/api/v1/audit/verify",
            "/api/v1/plates",
        ] {
            let reply = api.get(path).await;
            let summary = match reply.status {
                200 if path.starts_with("/api/v1/tubes") => {
                    format!(
                        "total_waiting {}, listed {}",
                        reply.body["total_waiting"],
                        reply.body["tubes"].as_array().map_or(0, Vec::len)
                    )
                }
                200 => reply.body.to_string(),
                _ => reply.message(),
            };
            evidence.push(format!("GET {path} -> {} {summary}", reply.status));
        }
        let stderr = outcome.stop();
        assert_no_panic(&stderr);
        panic!(
            "pcrd started on a corrupt store instead of exiting with 3 \
             ({acknowledged} tubes were acknowledged before the damage):\n{}\nstderr:\n{stderr}",
            evidence.join("\n")
        );
    }
    let stderr = expect_exit(outcome, 3);
    let lower = stderr.to_lowercase();
    assert!(
        lower.contains("corrupt") || lower.contains("store"),
        "stderr:\n{stderr}"
    );
    assert!(
        stderr.contains(&daemon.store_path().display().to_string()),
        "the message names the store; stderr:\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_in_the_middle_of_the_log() {
    let daemon = stopped_daemon_with_tubes().await;
    let db = daemon.store_path().join("db");
    let len = std::fs::metadata(&db).expect("db file").len();
    assert!(len > 64 * 1024, "store log unexpectedly small: {len} bytes");
    overwrite(&db, len / 2, &garbage(16 * 1024));
    assert_corrupt_store_refused(&daemon).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_early_in_the_log() {
    // Damage in pages written long before the end of the log: sled opens such a store
    // without complaint and notices only when a damaged page is read.
    let daemon = stopped_daemon_with_tubes().await;
    let db = daemon.store_path().join("db");
    let len = std::fs::metadata(&db).expect("db file").len();
    overwrite(&db, len / 5, &garbage(4 * 1024));
    assert_corrupt_store_refused(&daemon).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_truncated_conf_file() {
    let daemon = stopped_daemon_with_tubes().await;
    let conf = daemon.store_path().join("conf");
    let len = std::fs::metadata(&conf).expect("conf file").len();
    assert!(len > 4, "conf is {len} bytes");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&conf)
        .and_then(|f| f.set_len(len / 2))
        .expect("truncate conf");
    assert_corrupt_store_refused(&daemon).await;
}

#[test]
fn a_bad_config_names_every_problem() {
    let dir = tempfile::tempdir().expect("temp dir");
    let text = TEST_CONFIG
        .replace("id = \"LAB-TEST\"", "id = \"LAB-TEST\"\ncolour = \"blue\"")
        .replace(
            "listen = \"127.0.0.1:0\"",
            "listen = \"localhost\"\nport = 8440",
        );
    assert_ne!(text, TEST_CONFIG);
    let config = write_config(dir.path(), &text);
    let store = dir.path().join("store");
    let stderr = expect_exit(run_serve(&config, &store, dir.path()), 2);
    for needle in ["lab.colour", "server.port", "server.listen", "localhost"] {
        assert!(
            stderr.contains(needle),
            "stderr should name {needle:?}:\n{stderr}"
        );
    }
    assert!(!store.exists(), "no store is created for an invalid config");

    // A config file that does not exist is a config error too.
    let missing = dir.path().join("missing.toml");
    let stderr = expect_exit(run_serve(&missing, &store, dir.path()), 2);
    assert!(stderr.contains("missing.toml"), "stderr:\n{stderr}");
}

/// Replaces tube CORRUPT-0-0100's record, through sled, with bytes pcrd cannot
/// decode, in a stopped daemon's store, and closes the store cleanly.
fn damage_one_record(daemon: &Daemon) {
    let store = pcrd::store::Store::open(&pcrd::store::StoreOptions {
        path: daemon.store_path(),
        cache_bytes: 4 * 1024 * 1024,
    })
    .expect("open the stopped daemon's store");
    store
        .trees()
        .tubes
        .insert("CORRUPT-0-0100", &[1u8, 0xff, 0xff, 0xff][..])
        .expect("damage one record");
    store.close().expect("close");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_that_meets_a_damaged_record_stops_the_daemon() {
    // After a clean stop the daemon does not scrub, so the damage is met by a request:
    // that request fails, and the daemon stops rather than go on serving a store it
    // cannot trust.
    let daemon = stopped_daemon_with_tubes().await;
    damage_one_record(&daemon);
    let scratch = tempfile::tempdir().expect("temp dir");
    let outcome = run_serve(&daemon.config_path(), &daemon.store_path(), scratch.path());
    let Outcome::Served { url, .. } = &outcome else {
        panic!("the damage should only be met by a request: {outcome:?}");
    };
    let api = Api::connect(url, Some(TECH_TOKEN));
    let healthy = api.get("/api/v1/tubes/CORRUPT-0-0099").await;
    assert_eq!(healthy.status, 200, "{healthy:?}");
    let reply = api.get("/api/v1/tubes/CORRUPT-0-0100").await;
    assert_eq!(reply.status, 503, "{reply:?}");
    assert!(reply.message().contains("corrupt record"), "{reply:?}");
    let stderr = expect_exit(outcome.exited_within(Duration::from_secs(30)), 3);
    assert!(stderr.contains("CORRUPT-0-0100"), "stderr:\n{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn store_check_finds_a_record_that_cannot_be_decoded() {
    // A record sled returns intact but pcrd cannot decode: sled opens the store and the
    // high-water mark matches, so only reading every record finds it.
    let daemon = stopped_daemon_with_tubes().await;
    let check = || {
        Command::new(pcrd_bin())
            .args(["store", "check", "--config"])
            .arg(daemon.config_path())
            .arg("--data-dir")
            .arg(daemon.store_path())
            .output()
            .expect("run pcrd store check")
    };
    let intact = check();
    let stdout = String::from_utf8_lossy(&intact.stdout);
    assert!(
        intact.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&intact.stderr)
    );
    assert!(
        stdout.contains(&format!("{} tubes", TUBES_PER_BATCH * BATCHES))
            && stdout.contains("intact"),
        "{stdout}"
    );
    damage_one_record(&daemon);
    let damaged = check();
    let stderr = String::from_utf8_lossy(&damaged.stderr);
    assert_eq!(damaged.status.code(), Some(3), "stderr:\n{stderr}");
    assert_no_panic(&stderr);
    assert!(
        stderr.contains("CORRUPT-0-0100") && stderr.contains("corrupt record"),
        "the message names the damaged record; stderr:\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_crash_the_daemon_checks_every_record_and_after_a_clean_stop_it_does_not() {
    let mut daemon = Daemon::start();
    let api = daemon.client();
    let tubes: Vec<_> = (0..50)
        .map(|i| json!({ "barcode": format!("CRASH-{i:04}") }))
        .collect();
    assert_eq!(
        api.post("/api/v1/tubes", json!({ "tubes": tubes }))
            .await
            .status,
        200
    );
    daemon.kill9();
    daemon.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !daemon.stderr().contains("Store check passed") {
        assert!(
            Instant::now() < deadline,
            "no store check after a crash:\n{}",
            daemon.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        daemon.stderr().contains("not closed cleanly"),
        "{}",
        daemon.stderr()
    );
    let status = daemon.terminate();
    assert!(status.success());
    let checks_so_far = daemon.stderr().matches("Store check passed").count();
    daemon.restart();
    let api = daemon.client();
    assert_eq!(api.get("/api/v1/tubes/CRASH-0049").await.status, 200);
    assert!(
        daemon.stderr().contains("closed cleanly; skipping"),
        "{}",
        daemon.stderr()
    );
    assert_eq!(
        daemon.stderr().matches("Store check passed").count(),
        checks_so_far
    );
}

#[test]
fn sigterm_right_after_start_stops_cleanly() {
    // The signal handlers are installed before the address is printed, so even a
    // SIGTERM sent the moment the daemon says it listens closes the store properly.
    for _ in 0..5 {
        let mut daemon = Daemon::start();
        let status = daemon.terminate();
        assert!(
            status.success(),
            "pcrd ended with {status} on an early SIGTERM"
        );
        daemon.restart();
        assert!(
            daemon.stderr().contains("closed cleanly; skipping"),
            "the store was not closed cleanly:\n{}",
            daemon.stderr()
        );
    }
}
