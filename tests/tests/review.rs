//! Review and release (issue 7) end to end: the real `pcrd serve` with a watched
//! QuantStudio results folder and a batch-file sink. Results files are dropped into
//! the folder as a cycler's software leaves them; candidates, decisions, the rerun
//! list and due times are read back through the API, and what was released is read
//! from the sink's export folder as the central system would.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use pcrd_tests::{ADMIN_TOKEN, Api, Daemon, REVIEWER_TOKEN, TEST_CONFIG, metric_value, pcrd_bin};
use serde_json::{Value, json};

const KIT: &str = "sarscov2-orf1ab-n-ic";

fn config(auto_release: bool) -> String {
    format!(
        r#"{TEST_CONFIG}
[review]
auto_release_negatives = {auto_release}
at_risk_before = "1h"
check_every = "1s"

[[folders]]
name = "qs5"
path = "exports/qs5"
kind = "results"
kit = "{KIT}"
poll_ms = 50
settle_ms = 300

[[sinks]]
name = "central"
batch_size = 100
[sinks.files]
dir = "central-out"
ndjson = true
"#
    )
}

struct Lab {
    daemon: Daemon,
    tech: Api,
    reviewer: Api,
}

impl Lab {
    fn start(auto_release: bool) -> Lab {
        let daemon = Daemon::start_with_config(&config(auto_release));
        Lab::attach(daemon)
    }

    fn attach(daemon: Daemon) -> Lab {
        let tech = daemon.client();
        let reviewer = daemon.client_as(REVIEWER_TOKEN);
        Lab {
            daemon,
            tech,
            reviewer,
        }
    }

    fn restart_after_kill(mut self) -> Lab {
        self.daemon.kill9();
        self.daemon.restart();
        Lab::attach(self.daemon)
    }

    fn dir(&self) -> PathBuf {
        self.daemon.config_path().parent().unwrap().to_path_buf()
    }

    fn sink_dir(&self) -> PathBuf {
        self.dir().join("central-out")
    }

    /// Drops a results file (renamed in, as copy tools do) and waits for the import.
    async fn import(&self, name: &str, csv: &str) {
        let dir = self.dir().join("exports/qs5");
        std::fs::create_dir_all(&dir).unwrap();
        let tmp = dir.join(format!("{name}.part"));
        std::fs::write(&tmp, csv).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
        let done = dir.join("done").join(name);
        let failed = dir.join("failed").join(format!("{name}.error.txt"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done.exists() {
            if failed.exists() {
                panic!(
                    "the import failed: {}",
                    std::fs::read_to_string(&failed).unwrap()
                );
            }
            assert!(Instant::now() < deadline, "{name} was not imported");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Receives tubes (barcode, pool size, due), puts them on a new plate and seals it.
    async fn plate(&self, id: &str, tubes: &[(&str, &str, u32, Value)]) {
        let intake: Vec<Value> = tubes
            .iter()
            .map(|(_, barcode, pool, due)| {
                let mut tube = json!({"barcode": barcode, "pool_size": pool});
                if let Value::Object(extra) = due {
                    tube.as_object_mut().unwrap().extend(extra.clone());
                }
                tube
            })
            .collect();
        let reply = self
            .tech
            .post("/api/v1/tubes", json!({"tubes": intake}))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let reply = self
            .tech
            .post("/api/v1/plates", json!({"kit": KIT, "id": id}))
            .await;
        assert_eq!(reply.status, 201, "{}", reply.body);
        let placements: Vec<Value> = tubes
            .iter()
            .map(|(well, barcode, _, _)| json!({"well": well, "barcode": barcode}))
            .collect();
        let reply = self
            .tech
            .post(
                &format!("/api/v1/plates/{id}/assign"),
                json!({"placements": placements}),
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        // Sealed, as before any run: its contents are fixed.
        let reply = self
            .tech
            .post(&format!("/api/v1/plates/{id}/seal"), json!({}))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }

    async fn results(&self, query: &str) -> Vec<Value> {
        self.tech
            .get_ok(&format!("/api/v1/results{query}"))
            .await
            .as_array()
            .unwrap()
            .clone()
    }

    async fn result_of(&self, tube: &str) -> Value {
        let all = self.results("?limit=1000").await;
        all.into_iter()
            .find(|r| r["tube"] == tube)
            .unwrap_or_else(|| panic!("no result for tube {tube}"))
    }

    async fn reruns(&self) -> Vec<Value> {
        self.tech
            .get_ok("/api/v1/reruns")
            .await
            .as_array()
            .unwrap()
            .clone()
    }

    async fn waiting(&self) -> Vec<String> {
        self.tech.get_ok("/api/v1/tubes?limit=1000").await["tubes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["barcode"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Waits until the sink's export folder holds every key in `keys`.
    async fn wait_delivered(&self, keys: &[String]) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let records = pcrd_tests::files_sink_records(&self.sink_dir());
            if keys.iter().all(|k| records.iter().any(|r| &key_of(r) == k)) {
                return records;
            }
            assert!(
                Instant::now() < deadline,
                "not delivered to the sink: {keys:?}; the sink has {:?}",
                records.iter().map(key_of).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn key_of(record: &Value) -> String {
    format!(
        "{}:{}",
        record["result_id"].as_str().unwrap(),
        record["version"]
    )
}

/// A QuantStudio results file for `plate`: one (well, tube, [ORF1ab, N, IC]) per
/// sample well, `None` = Undetermined, and the kit's controls (NTC G12, PC H12);
/// `pc_fails` leaves the positive control without amplification.
fn results_csv(plate: &str, samples: &[(&str, &str, [Option<f64>; 3])], pc_fails: bool) -> String {
    let mut text = format!(
        "* Block Type = 96-Well Block (0.2mL)\n* Chemistry = TAQMAN\n* Experiment Barcode = {plate}\n* Experiment Name = {plate} run 1\n* Instrument Type = QuantStudio 5 System\n* Passive Reference = ROX\n\n[Results]\nWell,Well Position,Omit,Sample Name,Target Name,Task,Reporter,Quencher,CT,Ct Mean,Automatic Ct Threshold,Ct Threshold,Baseline Start,Baseline End\n"
    );
    let pc = if pc_fails {
        [None, None, None]
    } else {
        [Some(28.0), Some(28.5), Some(27.0)]
    };
    let mut rows: Vec<(&str, &str, [Option<f64>; 3])> = samples.to_vec();
    rows.push(("G12", "NTC", [None, None, None]));
    rows.push(("H12", "PC", pc));
    for (well, sample, cts) in &rows {
        // QuantStudio numbers wells row by row: A1 = 1, A12 = 12, B1 = 13.
        let row = u32::from(well.as_bytes()[0] - b'A');
        let column: u32 = well[1..].parse().unwrap();
        let number = row * 12 + column;
        for ((target, reporter, quencher), ct) in [
            ("ORF1ab", "FAM", "NFQ-MGB"),
            ("N", "VIC", "NFQ-MGB"),
            ("IC", "CY5", "QSY"),
        ]
        .into_iter()
        .zip(cts)
        {
            let ct = ct.map_or("Undetermined".to_string(), |c| format!("{c}"));
            text.push_str(&format!(
                "{number},{well},false,{sample},{target},UNKNOWN,{reporter},{quencher},{ct},,FALSE,0.2,3,18\n"
            ));
        }
    }
    text
}

const POSITIVE: [Option<f64>; 3] = [Some(22.31), Some(23.05), Some(27.9)];
const NEGATIVE: [Option<f64>; 3] = [None, None, Some(26.8)];
const RETEST: [Option<f64>; 3] = [None, Some(33.41), Some(27.2)];

#[tokio::test]
async fn a_valid_plate_releases_negatives_by_policy_and_positives_after_review() {
    let lab = Lab::start(true);
    let none = Value::Null;
    lab.plate(
        "PCR-REV-01",
        &[
            ("A1", "REV-POS-1", 1, none.clone()),
            ("B1", "REV-NEG-1", 1, none.clone()),
            ("C1", "REV-NEG-2", 1, none.clone()),
            ("D1", "REV-RT-1", 1, none.clone()),
            ("E1", "REV-POOL-1", 5, none.clone()),
        ],
    )
    .await;
    let csv = results_csv(
        "PCR-REV-01",
        &[
            ("A1", "REV-POS-1", POSITIVE),
            ("B1", "REV-NEG-1", NEGATIVE),
            ("C1", "REV-NEG-2", NEGATIVE),
            ("D1", "REV-RT-1", RETEST),
            ("E1", "REV-POOL-1", POSITIVE),
        ],
        false,
    );
    lab.import("run-1.csv", &csv).await;

    // Negatives: released by policy in the import's transaction, then delivered.
    let released = lab.results("?state=released").await;
    let mut tubes: Vec<&str> = released
        .iter()
        .map(|r| r["tube"].as_str().unwrap())
        .collect();
    tubes.sort();
    assert_eq!(tubes, ["REV-NEG-1", "REV-NEG-2"], "{released:?}");
    let keys: Vec<String> = released
        .iter()
        .map(|r| format!("{}:1", r["result_id"].as_str().unwrap()))
        .collect();
    let records = lab.wait_delivered(&keys).await;
    for key in &keys {
        let record = records.iter().find(|r| &key_of(r) == key).unwrap();
        assert_eq!(record["status"], "final", "{record}");
        assert_eq!(record["released_by"], "auto", "{record}");
        assert_eq!(record["interpretation"], "negative", "{record}");
        assert_eq!(record["plate"], "PCR-REV-01");
        assert_eq!(record["lab_id"], "LAB-TEST");
        let ic = record["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == "IC")
            .unwrap();
        assert_eq!(ic["ct"], 26.8, "{record}");
    }

    // Positives wait for a reviewer; nothing of them is at the sink.
    let positive = lab.result_of("REV-POS-1").await;
    assert_eq!(positive["state"], "awaiting_review", "{positive}");
    assert_eq!(positive["interpretation"], "positive");
    assert_eq!(positive["plate_valid"], true);
    assert_eq!(positive["source"]["kind"], "file_import");
    let id = positive["result_id"].as_str().unwrap().to_owned();
    assert!(
        id.starts_with("LAB-TEST-import-") && id.ends_with("-A1-REV-POS-1"),
        "result id is lab-run-well-tube: {id}"
    );
    let orf = &positive["targets"][0];
    assert_eq!(orf["name"], "ORF1ab");
    assert_eq!(orf["dye"], "FAM");
    assert_eq!(orf["ct"], 22.31);
    assert_eq!(orf["call"], "detected");
    assert!(
        !pcrd_tests::files_sink_records(&lab.sink_dir())
            .iter()
            .any(|r| r["tube"] == "REV-POS-1"),
        "a positive reached the sink before review"
    );

    // A technician may not release (403), and nothing changes.
    let reply = lab
        .tech
        .post(&format!("/api/v1/results/{id}/release"), json!({}))
        .await;
    assert_eq!(reply.status, 403, "{}", reply.body);
    assert_eq!(reply.body["error"]["code"], "forbidden");
    assert_eq!(lab.result_of("REV-POS-1").await["state"], "awaiting_review");
    // Unknown result: 404 with a JSON body.
    let reply = lab
        .reviewer
        .post("/api/v1/results/NO-SUCH-RESULT/release", json!({}))
        .await;
    assert_eq!(reply.status, 404, "{}", reply.body);
    assert!(reply.message().contains("NO-SUCH-RESULT"));

    // The reviewer releases: a final version 1 reaches the sink.
    let reply = lab
        .reviewer
        .post(
            &format!("/api/v1/results/{id}/release"),
            json!({"reason": "curves checked"}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body["state"], "released");
    assert_eq!(reply.body["versions"][0]["released_by"], "rob");
    let records = lab.wait_delivered(&[format!("{id}:1")]).await;
    let v1 = records
        .iter()
        .find(|r| key_of(r) == format!("{id}:1"))
        .unwrap();
    assert_eq!(v1["status"], "final");
    assert_eq!(v1["released_by"], "rob");
    assert_eq!(v1["interpretation"], "positive");
    // Released once: a second release is a conflict.
    let reply = lab
        .reviewer
        .post(&format!("/api/v1/results/{id}/release"), json!({}))
        .await;
    assert_eq!(reply.status, 409, "{}", reply.body);

    // A correction needs a reason (422), then is version 2, corrected, at the sink.
    let reply = lab
        .reviewer
        .post(
            &format!("/api/v1/results/{id}/correct"),
            json!({"reason": "  "}),
        )
        .await;
    assert_eq!(reply.status, 422, "{}", reply.body);
    let reply = lab
        .tech
        .post(
            &format!("/api/v1/results/{id}/correct"),
            json!({"reason": "wrong tube"}),
        )
        .await;
    assert_eq!(reply.status, 403, "{}", reply.body);
    let reply = lab
        .reviewer
        .post(
            &format!("/api/v1/results/{id}/correct"),
            json!({"reason": "tube swapped at the decapper", "interpretation": "inconclusive"}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let records = lab.wait_delivered(&[format!("{id}:2")]).await;
    let v2 = records
        .iter()
        .find(|r| key_of(r) == format!("{id}:2"))
        .unwrap();
    assert_eq!(v2["status"], "corrected", "{v2}");
    assert_eq!(v2["correction_reason"], "tube swapped at the decapper");
    assert_eq!(v2["interpretation"], "inconclusive");
    assert_eq!(v2["released_by"], "rob");

    // The retest goes on the rerun list and back into the plating queue, urgent;
    // the positive pool gets a follow-up.
    let reruns = lab.reruns().await;
    let rt = reruns
        .iter()
        .find(|r| r["tube"] == "REV-RT-1")
        .unwrap_or_else(|| panic!("no rerun for REV-RT-1: {reruns:?}"));
    assert_eq!(rt["kind"], "rerun");
    assert_eq!(rt["requeued"], true);
    let pool = reruns
        .iter()
        .find(|r| r["tube"] == "REV-POOL-1")
        .unwrap_or_else(|| panic!("no follow-up for the pool: {reruns:?}"));
    assert_eq!(pool["kind"], "pool_follow_up");
    assert_eq!(pool["pool_size"], 5);
    assert_eq!(reruns.len(), 2, "{reruns:?}");
    assert_eq!(lab.waiting().await, ["REV-RT-1"]);
    let tube = lab.tech.get_ok("/api/v1/tubes/REV-RT-1").await;
    assert_eq!(tube["priority"], "urgent", "{tube}");
    assert_eq!(tube["state"], "waiting", "{tube}");
    // Its history keeps where it was.
    let audit = lab.tech.get_ok("/api/v1/audit?tube=REV-RT-1").await;
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .or(audit.as_array())
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(actions.contains(&"plate.assigned"), "{actions:?}");
    assert!(actions.contains(&"tube.requeued"), "{actions:?}");

    // The CLI lists the same.
    let out = std::process::Command::new(pcrd_bin())
        .args([
            "rerun",
            "list",
            "--api",
            &lab.daemon.url,
            "--token",
            ADMIN_TOKEN,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("pool_follow_up  REV-POOL-1  pool of 5"),
        "{text}"
    );
    let out = std::process::Command::new(pcrd_bin())
        .args([
            "result",
            "release",
            &id,
            "--api",
            &lab.daemon.url,
            "--token",
            "test-technician-token",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "a technician is refused: {out:?}"
    );

    // Turnaround: stages and a received-to-released histogram.
    let detail = lab.tech.get_ok(&format!("/api/v1/results/{id}")).await;
    let stages: Vec<&str> = detail["tat"]["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["at"].is_string())
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(
        stages,
        ["received", "plated", "sealed", "result_staged", "released"]
    );
    let metrics = lab.tech.get_text("/metrics").await.text;
    assert_eq!(
        metric_value(&metrics, "pcrd_tube_received_to_released_seconds_count"),
        Some(3.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, "pcrd_results_auto_released_total"),
        Some(2.0)
    );
    lab.tech.audit_intact().await;
}

#[tokio::test]
async fn an_invalid_plate_sends_every_tube_to_rerun_and_releases_nothing() {
    let lab = Lab::start(true);
    let none = Value::Null;
    lab.plate(
        "PCR-REV-BAD",
        &[
            ("A1", "BAD-POS-1", 1, none.clone()),
            ("B1", "BAD-NEG-1", 1, none.clone()),
            ("C1", "BAD-NEG-2", 10, none.clone()),
        ],
    )
    .await;
    let csv = results_csv(
        "PCR-REV-BAD",
        &[
            ("A1", "BAD-POS-1", POSITIVE),
            ("B1", "BAD-NEG-1", NEGATIVE),
            ("C1", "BAD-NEG-2", NEGATIVE),
        ],
        true,
    );
    lab.import("bad-run.csv", &csv).await;
    let results = lab.results("").await;
    assert_eq!(results.len(), 3, "{results:?}");
    for r in &results {
        assert_eq!(r["state"], "rerun_requested", "{r}");
        assert_eq!(r["plate_valid"], false, "{r}");
        assert!(r["versions"].as_array().unwrap().is_empty(), "{r}");
    }
    let outbox = lab.tech.get_ok("/api/v1/outbox").await;
    assert_eq!(outbox["next_seq"], 1, "nothing released: {outbox}");
    let mut reruns: Vec<String> = lab
        .reruns()
        .await
        .iter()
        .map(|r| {
            format!(
                "{} {}",
                r["kind"].as_str().unwrap(),
                r["tube"].as_str().unwrap()
            )
        })
        .collect();
    reruns.sort();
    assert_eq!(
        reruns,
        ["rerun BAD-NEG-1", "rerun BAD-NEG-2", "rerun BAD-POS-1"],
        "every tube, and no pool follow-up from an invalid plate"
    );
    let mut waiting = lab.waiting().await;
    waiting.sort();
    assert_eq!(waiting, ["BAD-NEG-1", "BAD-NEG-2", "BAD-POS-1"]);
    // Nothing of it can be released, by anyone.
    let id = results[0]["result_id"].as_str().unwrap();
    let reply = lab
        .daemon
        .client_as(ADMIN_TOKEN)
        .post(&format!("/api/v1/results/{id}/release"), json!({}))
        .await;
    assert_eq!(reply.status, 409, "{}", reply.body);
    assert!(pcrd_tests::files_sink_records(&lab.sink_dir()).is_empty());
    lab.tech.audit_intact().await;
}

#[tokio::test]
async fn tubes_past_due_and_at_risk_are_listed_first() {
    let lab = Lab::start(false);
    lab.plate(
        "PCR-REV-DUE",
        &[
            ("A1", "DUE-LATER", 1, json!({"due_in": "48h"})),
            ("B1", "DUE-NONE", 1, Value::Null),
            ("C1", "DUE-SOON", 1, json!({"due_in": "30min"})),
            (
                "D1",
                "DUE-PAST",
                1,
                json!({"due_at": "2020-01-01T00:00:00Z"}),
            ),
        ],
    )
    .await;
    let due = lab.tech.get_ok("/api/v1/tubes/due").await;
    let order: Vec<(&str, &str)> = due
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["barcode"].as_str().unwrap(),
                t["due_status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        order,
        [
            ("DUE-PAST", "past_due"),
            ("DUE-SOON", "at_risk"),
            ("DUE-LATER", "on_time"),
            ("DUE-NONE", "no_due_time")
        ]
    );
    // Results are listed in the same order: positives, all awaiting review.
    let csv = results_csv(
        "PCR-REV-DUE",
        &[
            ("A1", "DUE-LATER", POSITIVE),
            ("B1", "DUE-NONE", POSITIVE),
            ("C1", "DUE-SOON", NEGATIVE),
            ("D1", "DUE-PAST", POSITIVE),
        ],
        false,
    );
    lab.import("due.csv", &csv).await;
    let results = lab.results("?state=awaiting_review").await;
    let tubes: Vec<&str> = results
        .iter()
        .map(|r| r["tube"].as_str().unwrap())
        .collect();
    assert_eq!(tubes, ["DUE-PAST", "DUE-SOON", "DUE-LATER", "DUE-NONE"]);
    assert_eq!(
        results[2]["state"], "awaiting_review",
        "auto release is off"
    );

    // The watcher counts them for /metrics and warns once per tube.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = lab.tech.get_text("/metrics").await.text;
        if metric_value(&metrics, "pcrd_tubes_at_risk") == Some(1.0)
            && metric_value(&metrics, "pcrd_tubes_past_due") == Some(1.0)
        {
            break;
        }
        assert!(Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = lab.daemon.stderr();
    assert!(
        log.contains("Tube is at risk of missing its due time.") && log.contains("DUE-SOON"),
        "{log}"
    );
    assert_eq!(log.matches("Tube is past its due time").count(), 1, "{log}");

    // Released, the tube is no longer due.
    let soon = results[1]["result_id"].as_str().unwrap();
    let reply = lab
        .reviewer
        .post(&format!("/api/v1/results/{soon}/release"), json!({}))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let out = std::process::Command::new(pcrd_bin())
        .args([
            "tube",
            "due",
            "--api",
            &lab.daemon.url,
            "--token",
            ADMIN_TOKEN,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("PAST DUE DUE-PAST"), "{text}");
    assert!(lines[1].contains("DUE-LATER"), "{text}");
    assert!(lines[2].contains("DUE-NONE"), "{text}");
    // Bad input: a clear 422.
    let reply = lab.tech.get("/api/v1/results?state=pending").await;
    assert_eq!(reply.status, 422, "{}", reply.body);
}

/// A release is one transaction with the candidate's state: killed at any point,
/// the daemon comes back with the result either awaiting review and unreleased, or
/// released exactly once; never two versions 1, never a release without the state.
#[tokio::test]
async fn kill9_around_releases_never_releases_twice() {
    let mut lab = Lab::start(true);
    let tubes: Vec<(String, String)> = (0..12)
        .map(|i| {
            (
                format!("{}{}", ["A", "B", "C", "D"][i % 4], i / 4 + 1),
                format!("KILL-{i:03}"),
            )
        })
        .collect();
    let spec: Vec<(&str, &str, u32, Value)> = tubes
        .iter()
        .map(|(w, t)| (w.as_str(), t.as_str(), 1, Value::Null))
        .collect();
    lab.plate("PCR-REV-KILL", &spec).await;
    let samples: Vec<(&str, &str, [Option<f64>; 3])> = tubes
        .iter()
        .enumerate()
        .map(|(i, (w, t))| {
            (
                w.as_str(),
                t.as_str(),
                if i % 2 == 0 { POSITIVE } else { NEGATIVE },
            )
        })
        .collect();
    lab.import("kill.csv", &results_csv("PCR-REV-KILL", &samples, false))
        .await;
    // Killed right after the import (and its releases by policy) became durable.
    lab = lab.restart_after_kill();
    let positives: Vec<String> = lab
        .results("?state=awaiting_review")
        .await
        .iter()
        .map(|r| r["result_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(positives.len(), 6);
    for (round, id) in positives.iter().enumerate() {
        // Release and kill while the request may be in flight.
        let reviewer = lab.reviewer.clone();
        let path = format!("/api/v1/results/{id}/release");
        let request = tokio::spawn(async move { reviewer.try_post(&path, json!({})).await });
        tokio::time::sleep(Duration::from_millis((round as u64 * 7) % 20)).await;
        lab = lab.restart_after_kill();
        let _ = request.await;
        let detail = lab.tech.get_ok(&format!("/api/v1/results/{id}")).await;
        let stored = lab
            .tech
            .get(&format!("/api/v1/outbox/results/{id}:1"))
            .await;
        match detail["state"].as_str().unwrap() {
            "released" => assert_eq!(stored.status, 200, "released, so version 1 exists"),
            "awaiting_review" => {
                assert_eq!(stored.status, 404, "not released, so no version: {detail}");
                let reply = lab
                    .reviewer
                    .post(&format!("/api/v1/results/{id}/release"), json!({}))
                    .await;
                assert_eq!(reply.status, 200, "{}", reply.body);
            }
            other => panic!("unexpected state {other}"),
        }
        let again = lab
            .reviewer
            .post(&format!("/api/v1/results/{id}/release"), json!({}))
            .await;
        assert_eq!(again.status, 409, "{}", again.body);
        assert_eq!(
            lab.tech
                .get(&format!("/api/v1/outbox/results/{id}:2"))
                .await
                .status,
            404,
            "never a second version"
        );
    }
    // At the sink: every tube's version 1 (deliveries are at least once; the key is
    // the same for a repeat), and no other version.
    let all_keys: Vec<String> = lab
        .results("?limit=100")
        .await
        .iter()
        .map(|r| format!("{}:1", r["result_id"].as_str().unwrap()))
        .collect();
    assert_eq!(all_keys.len(), 12);
    let records = lab.wait_delivered(&all_keys).await;
    let mut versions: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in &records {
        versions
            .entry(r["result_id"].as_str().unwrap().to_owned())
            .or_default()
            .push(r["version"].as_u64().unwrap());
    }
    assert_eq!(versions.len(), 12);
    assert!(
        versions.values().all(|v| v.iter().all(|n| *n == 1)),
        "{versions:?}"
    );
    let outbox = lab.tech.get_ok("/api/v1/outbox").await;
    assert_eq!(outbox["next_seq"], 13, "twelve releases, no more: {outbox}");
    lab.tech.audit_intact().await;
}
