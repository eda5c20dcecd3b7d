//! The outbox end to end, against the real `pcrd` binary and the batch-file sink:
//! SIGKILL mid-delivery loses nothing; a 200,000-result backlog drains in order once
//! the export folder comes back, with memory flat and the other sink unaffected; the
//! operator surface (API, CLI, metrics).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pcrd_tests::results::{TEST_LAB, records, seed_store};
use pcrd_tests::{
    ADMIN_TOKEN, Api, REVIEWER_TOKEN, TECH_TOKEN, TEST_CONFIG, pcrd_bin, spawn_serve,
};
use sha2_free::sha256_hex;

/// SHA-256 without a new dependency of the test crate: `sha256sum`, an independent
/// implementation, checks the manifests pcrd wrote.
mod sha2_free {
    pub(crate) fn sha256_hex(path: &std::path::Path) -> String {
        let out = std::process::Command::new("sha256sum")
            .arg(path)
            .output()
            .expect("run sha256sum (coreutils)");
        assert!(out.status.success(), "sha256sum {}", path.display());
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    }
}

fn config_with_sinks(sinks: &[(&str, &Path, usize)]) -> String {
    let mut text = TEST_CONFIG.to_string();
    for (name, dir, batch) in sinks {
        text.push_str(&format!(
            "\n[[sinks]]\nname = \"{name}\"\nbatch_size = {batch}\n[sinks.files]\ndir = \"{}\"\nndjson = true\n",
            dir.display()
        ));
    }
    text
}

/// What a collector reads from an export folder: complete batches only (manifest
/// present, every data file's SHA-256 as listed), keys in file-name (release) order.
struct Export {
    /// Keys in order of the batches' names, duplicates included.
    keys: Vec<String>,
    batches: usize,
    /// CSV rows by (key, target), to check that duplicates are identical.
    rows: HashMap<(String, String), String>,
}

fn read_export(dir: &Path) -> Export {
    let mut manifests: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.expect("dir entry").path())
                .filter(|p| p.to_string_lossy().ends_with(".manifest.json"))
                .collect()
        })
        .unwrap_or_default();
    manifests.sort();
    let mut export = Export {
        keys: Vec::new(),
        batches: manifests.len(),
        rows: HashMap::new(),
    };
    for path in manifests {
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read manifest"))
                .expect("manifest JSON");
        let keys: Vec<String> = manifest["idempotency_keys"]
            .as_array()
            .expect("keys")
            .iter()
            .map(|k| k.as_str().expect("key").to_string())
            .collect();
        assert_eq!(
            manifest["count"].as_u64(),
            Some(keys.len() as u64),
            "{}",
            path.display()
        );
        let files = manifest["files"].as_array().expect("files");
        assert_eq!(files.len(), 2, "csv and ndjson");
        for file in files {
            let data = dir.join(file["name"].as_str().expect("name"));
            assert_eq!(
                Some(sha256_hex(&data).as_str()),
                file["sha256"].as_str(),
                "SHA-256 of {}",
                data.display()
            );
        }
        let csv_name = files[0]["name"].as_str().expect("csv name");
        let mut reader = csv::Reader::from_path(dir.join(csv_name)).expect("csv");
        let mut csv_keys = BTreeSet::new();
        for row in reader.records() {
            let row = row.expect("csv row");
            let key = row[0].to_string();
            let line = row.iter().collect::<Vec<_>>().join(",");
            if let Some(before) = export
                .rows
                .insert((key.clone(), row[18].to_string()), line.clone())
            {
                assert_eq!(
                    before, line,
                    "a duplicate differs from the first copy: {key}"
                );
            }
            csv_keys.insert(key);
        }
        let listed: BTreeSet<String> = keys.iter().cloned().collect();
        assert_eq!(csv_keys, listed, "CSV and manifest of {}", path.display());
        export.keys.extend(keys);
    }
    export
}

async fn wait_drained(api: &Api, sinks: &[&str], timeout: Duration) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let status = api.get_ok("/api/v1/outbox").await;
        let done = sinks.iter().all(|name| {
            status["sinks"]
                .as_array()
                .expect("sinks")
                .iter()
                .any(|s| s["sink"] == *name && s["pending"] == 0 && s["in_flight"] == 0)
        });
        if done {
            return status;
        }
        assert!(
            started.elapsed() < timeout,
            "not drained in {timeout:?}: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_delivery_loses_nothing_and_duplicates_only_by_key() {
    const N: usize = 20_000;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = dir.path().join("store");
    let export = dir.path().join("export");
    let all = records(N);
    let expected: Vec<String> = all.iter().map(|r| r.idempotency_key()).collect();
    seed_store(&store, TEST_LAB, all, 1000).expect("seed the store");
    let config = dir.path().join("pcrd.toml");
    std::fs::write(&config, config_with_sinks(&[("export", &export, 100)])).expect("config");
    let log = dir.path().join("stderr.log");

    let mut partial_kills = 0;
    for (round, delay_ms) in [250u64, 400, 150, 600, 300].into_iter().enumerate() {
        let mut served =
            spawn_serve(&config, &store, &log, Duration::from_secs(60)).expect("serve");
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        served.child.kill().expect("SIGKILL");
        served.child.wait().expect("reap");
        let batches = read_export(&export).batches;
        eprintln!("round {round}: killed after {delay_ms} ms with {batches} complete batches");
        if batches > 0 && batches < N / 100 {
            partial_kills += 1;
        }
    }
    assert!(
        partial_kills >= 2,
        "the kills must land mid-delivery (complete batches between 0 and {})",
        N / 100
    );
    let mut served = spawn_serve(&config, &store, &log, Duration::from_secs(60)).expect("serve");
    let api = Api::connect(&served.url, Some(ADMIN_TOKEN));
    let status = wait_drained(&api, &["export"], Duration::from_secs(300)).await;
    served.child.kill().expect("stop");
    served.child.wait().expect("reap");

    let seen = read_export(&export);
    let distinct: BTreeSet<&String> = seen.keys.iter().collect();
    let wanted: BTreeSet<&String> = expected.iter().collect();
    let missing: Vec<&&String> = wanted.difference(&distinct).take(5).collect();
    assert!(missing.is_empty(), "missing at the receiver: {missing:?}");
    assert_eq!(distinct, wanted, "nothing but released keys");
    eprintln!(
        "{} keys delivered as {} rows of {} batches ({} duplicates, each with the same key and content); status {status}",
        wanted.len(),
        seen.keys.len(),
        seen.batches,
        seen.keys.len() - wanted.len()
    );
    // First delivery order is release order: the first occurrence of each key.
    let mut first_seen = Vec::new();
    let mut met = BTreeSet::new();
    for key in &seen.keys {
        if met.insert(key) {
            first_seen.push(key.clone());
        }
    }
    assert_eq!(first_seen, expected, "release order");
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200000_backlog_drains_in_order_when_the_folder_returns_with_memory_flat() {
    let n: usize = std::env::var("PCRD_OUTBOX_BACKLOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let store = dir.path().join("store");
    let all = records(n);
    let expected: Vec<String> = all.iter().map(|r| r.idempotency_key()).collect();
    let seeding = Instant::now();
    seed_store(&store, TEST_LAB, all, 5000).expect("seed the store");
    eprintln!(
        "seeded {n} results in {:.1} s",
        seeding.elapsed().as_secs_f64()
    );
    // The "down" folder cannot exist while a plain file stands where its parent
    // should be (root ignores permission bits, so chmod would prove nothing).
    let blocker = dir.path().join("mount");
    std::fs::write(&blocker, b"not a directory").expect("blocker");
    let down = blocker.join("export");
    let up = dir.path().join("up");
    let config = dir.path().join("pcrd.toml");
    std::fs::write(
        &config,
        config_with_sinks(&[("central", &down, 1000), ("archive", &up, 1000)]),
    )
    .expect("config");
    let log = dir.path().join("stderr.log");
    let mut served = spawn_serve(&config, &store, &log, Duration::from_secs(60)).expect("serve");
    let pid = served.child.id();
    let api = Api::connect(&served.url, Some(ADMIN_TOKEN));

    // The healthy sink drains the whole backlog while the other is down.
    let mut peak = 0;
    let started = Instant::now();
    let status = loop {
        peak = peak.max(rss_kib(pid));
        let status = api.get_ok("/api/v1/outbox").await;
        let sinks = status["sinks"].as_array().expect("sinks").clone();
        let archive = sinks
            .iter()
            .find(|s| s["sink"] == "archive")
            .expect("archive");
        if archive["pending"] == 0 && archive["in_flight"] == 0 {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "archive stuck: {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let central = status["sinks"]
        .as_array()
        .expect("sinks")
        .iter()
        .find(|s| s["sink"] == "central")
        .expect("central")
        .clone();
    assert_eq!(central["delivered"], 0, "{central}");
    assert_eq!(
        central["pending"].as_u64().unwrap_or(0) + central["in_flight"].as_u64().unwrap_or(0),
        n as u64
    );
    assert!(
        central["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("export folder")),
        "{central}"
    );
    let metrics = api.get_text("/metrics").await.text;
    assert!(
        metrics.contains(&format!("pcrd_outbox_depth{{sink=\"central\"}} {n}")),
        "{metrics}"
    );
    assert!(
        metrics.contains("pcrd_outbox_depth{sink=\"archive\"} 0"),
        "{metrics}"
    );
    let archive_seconds = started.elapsed().as_secs_f64();
    let rss_with_backlog = rss_kib(pid);

    // The folder returns; the backlog drains on its own, in order.
    std::fs::remove_file(&blocker).expect("remove blocker");
    std::fs::create_dir_all(&down).expect("create export folder");
    let returned = Instant::now();
    loop {
        peak = peak.max(rss_kib(pid));
        let status = api.get_ok("/api/v1/outbox").await;
        let central = status["sinks"]
            .as_array()
            .expect("sinks")
            .iter()
            .find(|s| s["sink"] == "central")
            .expect("central")
            .clone();
        if central["pending"] == 0 && central["in_flight"] == 0 {
            break;
        }
        assert!(
            returned.elapsed() < Duration::from_secs(1200),
            "central stuck: {central}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drain_seconds = returned.elapsed().as_secs_f64();
    served.child.kill().expect("stop");
    served.child.wait().expect("reap");
    eprintln!(
        "RSS: {} MiB with {n} waiting for one sink; peak {} MiB; archive drained in {archive_seconds:.1} s, central in {drain_seconds:.1} s after its folder returned",
        rss_with_backlog / 1024,
        peak / 1024
    );
    for folder in [&down, &up] {
        let seen = read_export(folder);
        assert_eq!(
            seen.keys,
            expected,
            "every key once, in release order: {}",
            folder.display()
        );
    }
    // Bounded: the backlog is read from disk a batch at a time, never held whole. What
    // grows is sled's page cache over the pages read (sled 0.34 does not hold to its
    // 4 MiB `cache_capacity`, BENCHMARKS.md §1): measured (debug build) 91 MiB peak
    // for 20,000 and 182 MiB for 200,000, about 0.5 KB per result read, against
    // ~1.5 KB per result for the records themselves held in memory.
    assert!(peak < 256 * 1024, "peak RSS {} MiB", peak / 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_see_status_dead_letters_and_retry_over_api_cli_and_metrics() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = dir.path().join("store");
    let export = dir.path().join("export");
    seed_store(&store, TEST_LAB, records(30), 30).expect("seed");
    let config = dir.path().join("pcrd.toml");
    std::fs::write(&config, config_with_sinks(&[("export", &export, 7)])).expect("config");
    let log = dir.path().join("stderr.log");
    let mut served = spawn_serve(&config, &store, &log, Duration::from_secs(60)).expect("serve");
    let api = Api::connect(&served.url, Some(TECH_TOKEN));
    let status = wait_drained(&api, &["export"], Duration::from_secs(60)).await;
    let sink = &status["sinks"][0];
    assert_eq!(sink["kind"], "files");
    assert_eq!(sink["delivered"], 30);
    assert_eq!(sink["dead"], 0);
    assert_eq!(sink["cursor"], 31);
    assert_eq!(read_export(&export).keys.len(), 30);
    // 30 items in batches of 7: 5 batches, named by their seq ranges.
    assert_eq!(read_export(&export).batches, 5);
    assert!(
        export
            .join("pcrd-00000000000000000001-00000000000000000007.csv")
            .exists()
    );

    // Per-result delivery state.
    let first = &records(1)[0];
    let state = api
        .get_ok(&format!(
            "/api/v1/outbox/results/{}",
            first.idempotency_key()
        ))
        .await;
    assert_eq!(
        state["sinks"],
        serde_json::json!([{"sink": "export", "state": "delivered"}])
    );
    let unknown_result = api.get("/api/v1/outbox/results/LAB-TEST-NOPE:1").await;
    assert_eq!(unknown_result.status, 404, "{:?}", unknown_result.body);
    let not_a_key = api.get("/api/v1/outbox/results/nokey").await;
    assert_eq!(not_a_key.status, 422, "{:?}", not_a_key.body);

    let dead = api.get_ok("/api/v1/outbox/dead").await;
    assert_eq!(dead, serde_json::json!([]));
    let unknown = api.get("/api/v1/outbox/dead?sink=nope").await;
    assert_eq!(unknown.status, 404, "{:?}", unknown.body);

    // Retry: technicians may not; bad bodies are 422 with a JSON error; an unknown key
    // is named.
    let forbidden = api
        .post("/api/v1/outbox/retry", serde_json::json!({"all": true}))
        .await;
    assert_eq!(forbidden.status, 403, "{:?}", forbidden.body);
    let reviewer = Api::connect(&served.url, Some(REVIEWER_TOKEN));
    for body in [
        serde_json::json!({}),
        serde_json::json!({"all": true, "ids": ["A:1"]}),
        serde_json::json!({"ids": ["no-version"]}),
        serde_json::json!({"all": true, "colour": 1}),
        serde_json::json!({"all": true, "sink": "ghost"}),
    ] {
        let reply = reviewer.post("/api/v1/outbox/retry", body.clone()).await;
        assert_eq!(reply.status, 422, "{body}: {:?}", reply.body);
        assert!(!reply.message().is_empty(), "{body}");
    }
    let missing = reviewer
        .post(
            "/api/v1/outbox/retry",
            serde_json::json!({"ids": ["LAB-TEST-X:1"]}),
        )
        .await;
    assert_eq!(missing.status, 404, "{:?}", missing.body);
    assert!(
        missing.message().contains("LAB-TEST-X:1"),
        "{}",
        missing.message()
    );
    let none = reviewer
        .post("/api/v1/outbox/retry", serde_json::json!({"all": true}))
        .await;
    assert_eq!(none.status, 200, "{:?}", none.body);
    assert_eq!(none.body["requeued"], serde_json::json!([]));

    // The CLI says the same.
    let cli = |args: &[&str], token: &str| {
        Command::new(pcrd_bin())
            .args(args)
            .args(["--api", &served.url, "--token", token])
            .output()
            .expect("run pcrd")
    };
    let out = cli(&["outbox", "status"], TECH_TOKEN);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("export (files): 0 pending, 0 in flight, 30 delivered, 0 dead"),
        "{text}"
    );
    let out = cli(&["outbox", "status", "--json"], TECH_TOKEN);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json is JSON");
    assert_eq!(json["sinks"][0]["delivered"], 30);
    let out = cli(&["outbox", "dead"], TECH_TOKEN);
    assert!(String::from_utf8_lossy(&out.stdout).contains("no dead letters"));
    let out = cli(&["outbox", "retry", "LAB-TEST-X:1"], REVIEWER_TOKEN);
    assert_eq!(out.status.code(), Some(1), "a refused request exits 1");
    assert!(String::from_utf8_lossy(&out.stderr).contains("LAB-TEST-X:1"));
    let out = cli(&["outbox", "retry", "--all"], TECH_TOKEN);
    assert_eq!(out.status.code(), Some(2), "forbidden");
    let out = cli(&["outbox", "retry"], REVIEWER_TOKEN);
    assert_eq!(
        out.status.code(),
        Some(2),
        "neither ids nor --all is a usage error"
    );
    let out = cli(
        &["outbox", "retry", "--all", "--sink", "export"],
        REVIEWER_TOKEN,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 dead letter(s) re-queued"));

    let metrics = api.get_text("/metrics").await.text;
    for needle in [
        "pcrd_outbox_depth{sink=\"export\"} 0",
        "pcrd_outbox_lag_seconds{sink=\"export\"} 0",
        "pcrd_outbox_delivered_total{sink=\"export\"} 30",
        "pcrd_outbox_retried_total{sink=\"export\"} 0",
        "pcrd_outbox_dead_total{sink=\"export\"} 0",
        "pcrd_outbox_delivery_seconds_count{sink=\"export\"} 5",
        "pcrd_outbox_turnaround_seconds_count{sink=\"export\"} 30",
    ] {
        assert!(metrics.contains(needle), "{needle}\n{metrics}");
    }
    // The routes are in the OpenAPI document.
    let doc = api.get_ok("/api/v1/openapi.json").await;
    for path in [
        "/api/v1/outbox",
        "/api/v1/outbox/dead",
        "/api/v1/outbox/retry",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from OpenAPI"
        );
    }
    served.child.kill().expect("stop");
    served.child.wait().expect("reap");
}
