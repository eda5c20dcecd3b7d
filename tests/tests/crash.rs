//! Crash safety: `kill -9` the daemon between and during writes, restart it on the same
//! store, and check that every acknowledged write is there, that the lab's state is
//! consistent, and that the audit chain is intact.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pcrd_tests::{Api, Daemon, metric_value};
use serde_json::{Value, json};

/// A small deterministic PRNG (xorshift64), so every run kills at the same moments for
/// the same iteration.
#[derive(Debug)]
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number in `low..=high`.
    fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }
}

/// Barcodes on the waiting list.
async fn waiting(api: &Api) -> BTreeSet<String> {
    let list = api.get_ok("/api/v1/tubes?limit=100000").await;
    let tubes: BTreeSet<String> = list["tubes"]
        .as_array()
        .expect("tubes")
        .iter()
        .map(|t| t["barcode"].as_str().expect("barcode").to_string())
        .collect();
    assert_eq!(
        list["total_waiting"].as_u64(),
        Some(tubes.len() as u64),
        "total_waiting disagrees with the list"
    );
    tubes
}

/// Checks the gauges on /metrics (kept in the store next to the data) against the
/// counts of tubes actually stored and waiting.
async fn assert_gauges(api: &Api, stored: usize, waiting: usize) {
    let metrics = api.get_text("/metrics").await.text;
    assert_eq!(
        metric_value(&metrics, "pcrd_tubes_stored"),
        Some(stored as f64),
        "pcrd_tubes_stored after restart"
    );
    assert_eq!(
        metric_value(&metrics, "pcrd_tubes_waiting"),
        Some(waiting as f64),
        "pcrd_tubes_waiting after restart"
    );
}

/// Checks that `barcodes` are exactly the tubes known, each either waiting or on
/// exactly one plate (and never both), with tube records and plates agreeing.
async fn assert_consistent(api: &Api, barcodes: &BTreeSet<String>) {
    let waiting = waiting(api).await;
    let mut placed: BTreeMap<String, (String, String)> = BTreeMap::new();
    let plates = api.get_ok("/api/v1/plates").await;
    for summary in plates.as_array().expect("plates") {
        let id = summary["id"].as_str().expect("id");
        let plate = api.get_ok(&format!("/api/v1/plates/{id}")).await;
        if plate["kind"] != "extraction" {
            continue;
        }
        for well in plate["wells"].as_array().expect("wells") {
            if let Some(barcode) = well["barcode"].as_str() {
                let at = (
                    id.to_string(),
                    well["well"].as_str().expect("well").to_string(),
                );
                if let Some(other) = placed.insert(barcode.to_string(), at.clone()) {
                    panic!("tube {barcode} is on {other:?} and on {at:?}");
                }
            }
        }
    }
    for barcode in &waiting {
        assert!(
            !placed.contains_key(barcode),
            "tube {barcode} is both waiting and on {:?}",
            placed[barcode]
        );
    }
    let known: BTreeSet<String> = waiting.iter().chain(placed.keys()).cloned().collect();
    assert_eq!(&known, barcodes, "tubes waiting or placed");
    assert_gauges(api, barcodes.len(), waiting.len()).await;
    for barcode in barcodes {
        let tube = api.get_ok(&format!("/api/v1/tubes/{barcode}")).await;
        match placed.get(barcode) {
            Some((plate, well)) => {
                assert_eq!(tube["state"], "plated", "{tube}");
                assert_eq!(tube["plate"], plate.as_str(), "{tube}");
                assert_eq!(tube["well"], well.as_str(), "{tube}");
            }
            None => {
                assert_eq!(tube["state"], "waiting", "{tube}");
                assert_eq!(tube["plate"], Value::Null, "{tube}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_acknowledged_step_survives_kill9() {
    let mut daemon = Daemon::start();
    let api = daemon.client();

    // Receive 100 tubes in a few requests, some urgent.
    let barcodes: BTreeSet<String> = (0..100).map(|i| format!("K9-{i:04}")).collect();
    let list: Vec<&String> = barcodes.iter().collect();
    for (n, chunk) in list.chunks(25).enumerate() {
        let tubes: Vec<Value> = chunk
            .iter()
            .map(|b| {
                if n == 1 {
                    json!({ "barcode": b, "priority": "urgent", "due_in": "4h", "pool_size": 5 })
                } else {
                    json!({ "barcode": b, "pool_size": 10 })
                }
            })
            .collect();
        let reply = api.post("/api/v1/tubes", json!({ "tubes": tubes })).await;
        assert_eq!(reply.status, 200, "{reply:?}");
    }
    let entries = api.audit_intact().await;

    daemon.kill9();
    daemon.restart();
    let api = daemon.client();
    assert_eq!(
        waiting(&api).await,
        barcodes,
        "every received tube survived"
    );
    assert_eq!(
        api.get_ok("/api/v1/tubes/K9-0030").await["priority"],
        "urgent"
    );
    assert_eq!(api.get_ok("/api/v1/tubes/K9-0030").await["pool_size"], 5);
    assert_eq!(api.audit_intact().await, entries);
    assert_consistent(&api, &barcodes).await;

    // Create and fill a plate.
    let created = api
        .post(
            "/api/v1/plates",
            json!({ "kit": "sarscov2-orf1ab-n-ic", "id": "K9-PLATE" }),
        )
        .await;
    assert_eq!(created.status, 201, "{created:?}");
    let filled = api.post("/api/v1/plates/K9-PLATE/fill", json!({})).await;
    assert_eq!(filled.status, 200, "{filled:?}");
    let placed = filled.body["wells"].clone();
    assert_eq!(placed.as_array().map(Vec::len), Some(94));
    let entries = api.audit_intact().await;

    daemon.kill9();
    daemon.restart();
    let api = daemon.client();
    let plate = api.get_ok("/api/v1/plates/K9-PLATE").await;
    assert_eq!(plate["state"], "open");
    assert_eq!(plate["samples"], 94);
    for p in placed.as_array().expect("placed") {
        let barcode = p["barcode"].as_str().expect("b");
        let tube = api.get_ok(&format!("/api/v1/tubes/{barcode}")).await;
        assert_eq!(tube["plate"], "K9-PLATE");
        assert_eq!(tube["well"], p["well"]);
    }
    assert_eq!(waiting(&api).await.len(), 6);
    assert_eq!(api.audit_intact().await, entries);
    assert_consistent(&api, &barcodes).await;

    // Seal it.
    let sealed = api.post("/api/v1/plates/K9-PLATE/seal", json!({})).await;
    assert_eq!(sealed.status, 200, "{sealed:?}");
    let entries = api.audit_intact().await;

    daemon.kill9();
    daemon.restart();
    let api = daemon.client();
    let plate = api.get_ok("/api/v1/plates/K9-PLATE").await;
    assert_eq!(plate["state"], "sealed");
    assert_eq!(plate["sealed_by"], "tina");
    assert_eq!(plate["samples"], 94);
    assert_eq!(api.audit_intact().await, entries);
    assert_consistent(&api, &barcodes).await;
    let audit = api.get_ok("/api/v1/audit?plate=K9-PLATE").await;
    let actions: Vec<&str> = audit
        .as_array()
        .expect("audit")
        .iter()
        .map(|e| e["action"].as_str().expect("action"))
        .collect();
    assert_eq!(actions, ["plate.created", "plate.filled", "plate.sealed"]);

    // And the daemon keeps working on the recovered store.
    let more = api
        .post(
            "/api/v1/tubes",
            json!({ "tubes": [{ "barcode": "K9-AFTER" }] }),
        )
        .await;
    assert_eq!(more.status, 200, "{more:?}");
}

/// Every tube named in a `tube.received` entry of the whole audit trail, paging back.
async fn received_in_audit(api: &Api) -> BTreeSet<String> {
    let mut tubes = BTreeSet::new();
    let mut before: Option<u64> = None;
    loop {
        let path = match before {
            Some(seq) => format!("/api/v1/audit?limit=10000&before={seq}"),
            None => "/api/v1/audit?limit=10000".to_string(),
        };
        let page = api.get_ok(&path).await;
        let entries = page.as_array().expect("entries");
        let Some(first) = entries.first() else {
            break;
        };
        for e in entries {
            if e["action"] == "tube.received" {
                for t in e["tubes"].as_array().expect("tubes") {
                    tubes.insert(t.as_str().expect("barcode").to_string());
                }
            }
        }
        before = Some(first["seq"].as_u64().expect("seq"));
    }
    tubes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill9_at_random_moments_loses_no_acknowledged_write() {
    const ITERATIONS: u64 = 10;
    const WRITERS: u64 = 4;
    let mut daemon = Daemon::start();
    let mut acknowledged_so_far = BTreeSet::new();
    let mut stored_so_far: BTreeSet<String> = BTreeSet::new();
    for iteration in 0..ITERATIONS {
        let mut rng = XorShift::new(iteration + 1);
        let delay = rng.range(20, 300);
        let api = daemon.client();
        let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
        let refused = Arc::new(Mutex::new(Vec::<String>::new()));
        let mut writers = Vec::new();
        for writer in 0..WRITERS {
            let api = api.clone();
            let acknowledged = Arc::clone(&acknowledged);
            let refused = Arc::clone(&refused);
            let mut rng = XorShift::new(iteration * 100 + writer + 7);
            writers.push(tokio::spawn(async move {
                for n in 0.. {
                    // One to five tubes per request, all new.
                    let size = rng.range(1, 5);
                    let batch: Vec<String> = (0..size)
                        .map(|k| format!("R{iteration}-{writer}-{n}-{k}"))
                        .collect();
                    let tubes: Vec<Value> = batch.iter().map(|b| json!({ "barcode": b })).collect();
                    match api
                        .try_post("/api/v1/tubes", json!({ "tubes": tubes }))
                        .await
                    {
                        Ok(reply) if reply.status / 100 == 2 => {
                            acknowledged
                                .lock()
                                .expect("lock")
                                .extend(batch.iter().cloned());
                        }
                        Ok(reply) => refused
                            .lock()
                            .expect("lock")
                            .push(format!("{batch:?}: {reply:?}")),
                        // The daemon is gone.
                        Err(_) => break,
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(delay)).await;
        daemon.kill9();
        for w in writers {
            w.await.expect("writer task");
        }
        let refused = refused.lock().expect("lock").clone();
        assert!(
            refused.is_empty(),
            "iteration {iteration}: requests refused: {refused:?}"
        );
        let acknowledged: BTreeSet<String> =
            acknowledged.lock().expect("lock").iter().cloned().collect();
        acknowledged_so_far.extend(acknowledged.iter().cloned());

        // The store opens every time (restart panics otherwise).
        daemon.restart();
        let api = daemon.client();
        api.audit_intact().await;
        let stored = waiting(&api).await;
        let lost: Vec<&String> = acknowledged_so_far.difference(&stored).collect();
        assert!(
            lost.is_empty(),
            "iteration {iteration} (killed after {delay} ms): {} acknowledged tubes lost, e.g. {:?}",
            lost.len(),
            lost.iter().take(10).collect::<Vec<_>>()
        );
        assert!(
            stored_so_far.is_subset(&stored),
            "iteration {iteration}: tubes stored before an earlier restart disappeared"
        );
        // Every stored tube has its audit entry, in the chain and in the tube's index:
        // a tube and its audit entry are one transaction.
        assert_gauges(&api, stored.len(), stored.len()).await;
        let audited = received_in_audit(&api).await;
        assert_eq!(
            audited, stored,
            "iteration {iteration}: stored tubes and tube.received audit entries differ"
        );
        for barcode in stored.difference(&stored_so_far) {
            let entries = api.get_ok(&format!("/api/v1/audit?tube={barcode}")).await;
            assert_eq!(
                entries.as_array().map(Vec::len),
                Some(1),
                "audit of tube {barcode}: {entries}"
            );
            assert_eq!(entries[0]["action"], "tube.received");
            let tube = api.get_ok(&format!("/api/v1/tubes/{barcode}")).await;
            assert_eq!(tube["state"], "waiting");
        }
        println!(
            "iteration {iteration}: killed after {delay} ms, {} tubes acknowledged, {} stored in all",
            acknowledged.len(),
            stored.len()
        );
        stored_so_far = stored;
    }
    assert!(
        acknowledged_so_far.len() >= ITERATIONS as usize,
        "too few writes to prove anything: {}",
        acknowledged_so_far.len()
    );
}
