//! The HTTP API end to end, against the real `pcrd` binary: the technician's day, plate
//! lineage, refused input (and proof that nothing was partially written), auth, the
//! OpenAPI document, health and metrics, and concurrent writers.

use std::collections::{BTreeMap, BTreeSet};

use pcrd_tests::{ADMIN_TOKEN, Api, Daemon, REVIEWER_TOKEN, Reply, metric_value};
use serde_json::{Value, json};

const KIT: &str = "sarscov2-orf1ab-n-ic";

// ----- helpers -----

/// Well name -> (row, column), both 0-based.
fn parse_well(name: &str) -> (u8, u8) {
    let row = name.as_bytes()[0] - b'A';
    let column: u8 = name[1..].parse().expect("well column");
    (row, column - 1)
}

fn well_name(row: u8, column: u8) -> String {
    format!("{}{}", char::from(b'A' + row), column + 1)
}

/// All wells of a plate with `rows` x `columns`, column-major (A1, B1, .., H1, A2, ..).
fn column_major(rows: u8, columns: u8) -> Vec<String> {
    (0..columns)
        .flat_map(|c| (0..rows).map(move |r| well_name(r, c)))
        .collect()
}

fn tube(barcode: &str) -> Value {
    json!({ "barcode": barcode })
}

async fn receive(api: &Api, tubes: Vec<Value>) -> Reply {
    api.post("/api/v1/tubes", json!({ "tubes": tubes })).await
}

async fn receive_ok(api: &Api, barcodes: &[String]) {
    let reply = receive(api, barcodes.iter().map(|b| tube(b)).collect()).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        reply.body["received"].as_array().map(Vec::len),
        Some(barcodes.len())
    );
}

async fn create_plate(api: &Api, id: &str) -> Value {
    let reply = api
        .post("/api/v1/plates", json!({ "kit": KIT, "id": id }))
        .await;
    assert_eq!(reply.status, 201, "{reply:?}");
    reply.body
}

/// Everything observable about the lab's state: the audit chain, the waiting list and
/// every plate in full. Equal snapshots before and after a refused request prove it wrote
/// nothing.
async fn snapshot(api: &Api) -> Value {
    let audit = api.get_ok("/api/v1/audit/verify").await;
    let waiting = api.get_ok("/api/v1/tubes?limit=100000").await;
    let list = api.get_ok("/api/v1/plates").await;
    let mut plates = Vec::new();
    for p in list.as_array().expect("plate list") {
        let id = p["id"].as_str().expect("plate id");
        plates.push(api.get_ok(&format!("/api/v1/plates/{id}")).await);
    }
    json!({ "audit": audit, "waiting": waiting, "plates": plates })
}

/// Asserts an error reply: status, JSON body with the same status and `code`, and a
/// message (with its problems) containing every needle.
#[track_caller]
fn assert_error(reply: &Reply, status: u16, code: &str, needles: &[&str]) {
    assert_eq!(reply.status, status, "{reply:?}");
    assert_eq!(
        reply.body["error"]["status"].as_u64(),
        Some(u64::from(status)),
        "error body must be JSON with error.status: {reply:?}"
    );
    assert_eq!(reply.body["error"]["code"], code, "{reply:?}");
    let message = reply.message();
    assert!(!message.is_empty(), "empty error message: {reply:?}");
    for needle in needles {
        assert!(
            message.contains(needle),
            "error message should mention {needle:?}: {message:?}"
        );
    }
}

/// The wells of a plate view: well name -> (kind, barcode or control).
fn wells(plate: &Value) -> BTreeMap<String, (String, String)> {
    plate["wells"]
        .as_array()
        .expect("wells")
        .iter()
        .map(|w| {
            let what = w["barcode"]
                .as_str()
                .or_else(|| w["control"].as_str())
                .unwrap_or_default()
                .to_string();
            (
                w["well"].as_str().expect("well").to_string(),
                (w["kind"].as_str().expect("kind").to_string(), what),
            )
        })
        .collect()
}

fn actions(entries: &Value) -> Vec<String> {
    entries
        .as_array()
        .expect("audit entries")
        .iter()
        .map(|e| e["action"].as_str().expect("action").to_string())
        .collect()
}

// ----- the technician's day -----

#[tokio::test(flavor = "multi_thread")]
async fn technician_story_from_tubes_to_pcr_plate() {
    let daemon = Daemon::start();
    let api = daemon.client();

    // 94 tubes: pools of 1, 5 and 10; every ninth urgent (due in 4h); every seventh
    // routine one due in 6h; the rest routine without a due time.
    let barcode = |i: usize| format!("SWAB-{i:04}");
    let mut urgent = BTreeSet::new();
    let mut routine_due = BTreeSet::new();
    let (mut routine_batch, mut urgent_batch) = (Vec::new(), Vec::new());
    for i in 0..94 {
        let pool = [1, 5, 10][i % 3];
        let mut t = json!({ "barcode": barcode(i), "pool_size": pool });
        if i % 9 == 4 {
            t["priority"] = json!("urgent");
            t["due_in"] = json!("4h");
            urgent.insert(barcode(i));
            urgent_batch.push(t);
            continue;
        }
        if i % 7 == 0 {
            t["due_in"] = json!("6h");
            routine_due.insert(barcode(i));
        }
        routine_batch.push(t);
    }
    assert_eq!(urgent.len(), 10);
    // The routine tubes arrive first; the urgent ones after them must still go first.
    let reply = api
        .post(
            "/api/v1/tubes",
            json!({ "tubes": routine_batch, "reason": "morning delivery" }),
        )
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body["received"].as_array().map(Vec::len), Some(84));
    assert_eq!(reply.body["already_received"], json!([]));
    let reply = api
        .post(
            "/api/v1/tubes",
            json!({ "tubes": urgent_batch, "reason": "urgent courier" }),
        )
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body["received"].as_array().map(Vec::len), Some(10));

    let t5 = api.get_ok("/api/v1/tubes/SWAB-0005").await;
    assert_eq!(t5["pool_size"], 10);
    assert_eq!(t5["priority"], "routine");
    assert_eq!(t5["state"], "waiting");
    assert_eq!(t5["received_by"], "tina");
    let t4 = api.get_ok("/api/v1/tubes/SWAB-0004").await;
    assert_eq!(t4["priority"], "urgent");
    assert_eq!(t4["pool_size"], 5);
    assert!(t4["due_at"].is_string(), "{t4}");

    let waiting = api.get_ok("/api/v1/tubes?limit=1000").await;
    assert_eq!(waiting["total_waiting"], 94);
    let first10: BTreeSet<String> = waiting["tubes"].as_array().expect("tubes")[..10]
        .iter()
        .map(|t| t["barcode"].as_str().expect("barcode").to_string())
        .collect();
    assert_eq!(
        first10, urgent,
        "the waiting list starts with the urgent tubes"
    );

    // The plate: 96 wells, H12 positive and G12 no-template control.
    let plate = create_plate(&api, "EXT-0001").await;
    assert_eq!(plate["format"], 96);
    assert_eq!(plate["kind"], "extraction");
    assert_eq!(plate["state"], "open");
    assert_eq!(plate["kit"], KIT);
    assert_eq!(plate["controls"], 2);
    assert_eq!(plate["free"], 94);
    let controls = wells(&plate);
    assert_eq!(
        controls.get("H12"),
        Some(&("control".into(), "positive_control".into()))
    );
    assert_eq!(
        controls.get("G12"),
        Some(&("control".into(), "no_template_control".into()))
    );

    // Fill: all 94 placed, in column-major order, urgent tubes first, then due ones.
    let filled = api.post("/api/v1/plates/EXT-0001/fill", json!({})).await;
    assert_eq!(filled.status, 200, "{filled:?}");
    let placed = filled.body["wells"].as_array().expect("wells");
    assert_eq!(placed.len(), 94, "all 94 tubes placed");
    let sample_wells: Vec<String> = column_major(8, 12)
        .into_iter()
        .filter(|w| w != "G12" && w != "H12")
        .collect();
    let placed_wells: Vec<String> = placed
        .iter()
        .map(|p| p["well"].as_str().expect("well").to_string())
        .collect();
    assert_eq!(placed_wells, sample_wells, "placed in column-major order");
    assert_eq!(&placed_wells[..10], &column_major(8, 12)[..10]);
    let placed_tubes: Vec<String> = placed
        .iter()
        .map(|p| p["barcode"].as_str().expect("barcode").to_string())
        .collect();
    let in_first = |n: usize, set: &BTreeSet<String>| {
        placed_tubes[..n]
            .iter()
            .filter(|b| set.contains(*b))
            .count()
    };
    assert_eq!(
        in_first(10, &urgent),
        10,
        "urgent tubes take A1..H1, A2, B2: {placed_tubes:?}"
    );
    assert_eq!(
        in_first(10 + routine_due.len(), &routine_due),
        routine_due.len(),
        "due tubes come before tubes without a due time: {placed_tubes:?}"
    );
    assert_eq!(
        placed_tubes.iter().collect::<BTreeSet<_>>().len(),
        94,
        "every tube placed once"
    );

    let plate = api.get_ok("/api/v1/plates/EXT-0001").await;
    assert_eq!(plate["samples"], 94);
    assert_eq!(plate["controls"], 2);
    assert_eq!(plate["free"], 0);
    let layout = wells(&plate);
    assert_eq!(layout["H12"], ("control".into(), "positive_control".into()));
    assert_eq!(
        layout["G12"],
        ("control".into(), "no_template_control".into())
    );
    for p in placed {
        let (well, bc) = (
            p["well"].as_str().expect("w"),
            p["barcode"].as_str().expect("b"),
        );
        assert_eq!(layout[well], ("sample".to_string(), bc.to_string()));
    }
    let first = placed_tubes[0].clone();
    let t = api.get_ok(&format!("/api/v1/tubes/{first}")).await;
    assert_eq!(t["state"], "plated");
    assert_eq!(t["plate"], "EXT-0001");
    assert_eq!(t["well"], "A1");
    assert_eq!(
        api.get_ok("/api/v1/tubes").await["total_waiting"],
        0,
        "nothing waits any more"
    );

    // Seal, then transfer 1:1 to a PCR plate.
    let sealed = api
        .post(
            "/api/v1/plates/EXT-0001/seal",
            json!({ "reason": "checked" }),
        )
        .await;
    assert_eq!(sealed.status, 200, "{sealed:?}");
    assert_eq!(sealed.body["state"], "sealed");
    assert_eq!(sealed.body["sealed_by"], "tina");
    let plate = api.get_ok("/api/v1/plates/EXT-0001").await;
    assert_eq!(plate["state"], "sealed");
    assert!(plate["sealed_at"].is_string());

    let pcr = api
        .post(
            "/api/v1/plates/EXT-0001/transfer",
            json!({ "id": "PCR-0001" }),
        )
        .await;
    assert_eq!(pcr.status, 201, "{pcr:?}");
    assert_eq!(pcr.body["id"], "PCR-0001");
    let pcr = api.get_ok("/api/v1/plates/PCR-0001").await;
    assert_eq!(pcr["kind"], "pcr");
    assert_eq!(pcr["format"], 96);
    assert_eq!(pcr["kit"], KIT);
    assert_eq!(
        pcr["lineage"],
        json!({ "kind": "transfer", "sources": ["EXT-0001"] })
    );
    assert_eq!(wells(&pcr), layout, "a 1:1 transfer keeps every well");
    let source = api.get_ok("/api/v1/plates/EXT-0001").await;
    assert_eq!(source["children"], json!(["PCR-0001"]));

    // The audit trail shows every step, by tina.
    let plate_audit = api.get_ok("/api/v1/audit?plate=EXT-0001").await;
    assert_eq!(
        actions(&plate_audit),
        [
            "plate.created",
            "plate.filled",
            "plate.sealed",
            "plate.transferred"
        ]
    );
    for e in plate_audit.as_array().expect("entries") {
        assert_eq!(e["user"], "tina", "{e}");
        assert_eq!(e["plate"], "EXT-0001", "{e}");
    }
    let sealed_entry = &plate_audit[2];
    assert_eq!(sealed_entry["reason"], "checked");
    assert!(
        plate_audit[3]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("PCR-0001")),
        "{plate_audit}"
    );
    let pcr_audit = api.get_ok("/api/v1/audit?plate=PCR-0001").await;
    assert_eq!(actions(&pcr_audit), ["plate.created"]);
    assert_eq!(pcr_audit[0]["user"], "tina");

    let tube_audit = api.get_ok(&format!("/api/v1/audit?tube={first}")).await;
    assert_eq!(actions(&tube_audit), ["tube.received", "plate.filled"]);
    for e in tube_audit.as_array().expect("entries") {
        assert_eq!(e["user"], "tina", "{e}");
        assert!(
            e["tubes"]
                .as_array()
                .is_some_and(|ts| ts.iter().any(|t| t == first.as_str())),
            "{e}"
        );
    }
    assert!(urgent.contains(&first), "{first} is urgent");
    assert_eq!(tube_audit[0]["reason"], "urgent courier");
    assert_eq!(tube_audit[1]["plate"], "EXT-0001");

    let verify = api.get_ok("/api/v1/audit/verify").await;
    assert_eq!(verify["intact"], true, "{verify}");
    assert_eq!(verify["first_broken"], Value::Null);
    // 2 receipts, created, filled, sealed, transferred + PCR plate created
    assert_eq!(verify["entries"], 7, "{verify}");
}

// ----- lineage: four 96 into one 384 -----

#[tokio::test(flavor = "multi_thread")]
async fn four_sealed_plates_combine_into_a_384_by_quadrant() {
    let daemon = Daemon::start();
    let api = daemon.client();
    let barcodes: Vec<String> = (0..4 * 94).map(|i| format!("Q-{i:05}")).collect();
    receive_ok(&api, &barcodes).await;
    let ids = ["QP-1", "QP-2", "QP-3", "QP-4"];
    let mut sources = Vec::new();
    for id in ids {
        create_plate(&api, id).await;
        let filled = api
            .post(&format!("/api/v1/plates/{id}/fill"), json!({}))
            .await;
        assert_eq!(filled.status, 200, "{filled:?}");
        // Not all sealed yet: combining must refuse.
        if id == "QP-4" {
            let early = api
                .post("/api/v1/plates/combine", json!({ "sources": ids }))
                .await;
            assert_error(&early, 409, "conflict", &["QP-4", "sealed"]);
        }
        let sealed = api
            .post(&format!("/api/v1/plates/{id}/seal"), json!({}))
            .await;
        assert_eq!(sealed.status, 200, "{sealed:?}");
        sources.push(api.get_ok(&format!("/api/v1/plates/{id}")).await);
    }

    let three = api
        .post("/api/v1/plates/combine", json!({ "sources": &ids[..3] }))
        .await;
    assert_error(&three, 422, "invalid", &["4"]);

    let combined = api
        .post(
            "/api/v1/plates/combine",
            json!({ "sources": ids, "id": "PCR-384-1" }),
        )
        .await;
    assert_eq!(combined.status, 201, "{combined:?}");
    let pcr = api.get_ok("/api/v1/plates/PCR-384-1").await;
    assert_eq!(pcr["format"], 384);
    assert_eq!(pcr["kind"], "pcr");
    assert_eq!(pcr["state"], "sealed");
    assert_eq!(
        pcr["lineage"],
        json!({ "kind": "quadrants", "sources": ids })
    );
    assert_eq!(pcr["samples"], 4 * 94);
    assert_eq!(pcr["controls"], 8);
    let layout = wells(&pcr);

    // The four corners named in the issue.
    let a1 = |q: usize| wells(&sources[q])["A1"].1.clone();
    assert_eq!(layout["A1"].1, a1(0), "Q1 A1 -> A1");
    assert_eq!(layout["A2"].1, a1(1), "Q2 A1 -> A2");
    assert_eq!(layout["B1"].1, a1(2), "Q3 A1 -> B1");
    assert_eq!(layout["B2"].1, a1(3), "Q4 A1 -> B2");
    // And every well of every quadrant, controls included.
    let mut expected = BTreeMap::new();
    for (q, source) in sources.iter().enumerate() {
        for (well, content) in wells(source) {
            let (r, c) = parse_well(&well);
            let q = q as u8;
            expected.insert(well_name(2 * r + q / 2, 2 * c + q % 2), content);
        }
    }
    assert_eq!(layout, expected);

    for id in ids {
        let source = api.get_ok(&format!("/api/v1/plates/{id}")).await;
        assert_eq!(source["children"], json!(["PCR-384-1"]));
        let audit = api.get_ok(&format!("/api/v1/audit?plate={id}")).await;
        assert_eq!(
            actions(&audit).last().map(String::as_str),
            Some("plate.transferred")
        );
    }
    let audit = api.get_ok("/api/v1/audit?plate=PCR-384-1").await;
    assert_eq!(actions(&audit), ["plate.created"]);
    api.audit_intact().await;
}

// ----- refused input: each a 4xx with a JSON message, and nothing written -----

#[tokio::test(flavor = "multi_thread")]
async fn a_barcode_received_twice() {
    let daemon = Daemon::start();
    let api = daemon.client();
    let first = receive(
        &api,
        vec![json!({ "barcode": "TWICE-001", "pool_size": 5 })],
    )
    .await;
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.body["received"], json!(["TWICE-001"]));
    let before = snapshot(&api).await;

    // Identical: a retry, acknowledged, nothing written.
    let again = receive(
        &api,
        vec![json!({ "barcode": "TWICE-001", "pool_size": 5 })],
    )
    .await;
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.body["received"], json!([]));
    assert_eq!(again.body["already_received"], json!(["TWICE-001"]));
    assert_eq!(
        snapshot(&api).await,
        before,
        "an identical retry writes nothing"
    );

    // Another pool size: a conflict, the original kept.
    let other = receive(
        &api,
        vec![
            json!({ "barcode": "TWICE-002" }),
            json!({ "barcode": "TWICE-001", "pool_size": 10 }),
        ],
    )
    .await;
    assert_error(&other, 409, "conflict", &["TWICE-001", "5", "10"]);
    assert_eq!(api.get_ok("/api/v1/tubes/TWICE-001").await["pool_size"], 5);
    assert_eq!(api.get("/api/v1/tubes/TWICE-002").await.status, 404);
    assert_eq!(snapshot(&api).await, before);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_bad_barcode_refuses_the_whole_batch() {
    let daemon = Daemon::start();
    let api = daemon.client();
    receive_ok(&api, &["EARLIER-1".into()]).await;
    let before = snapshot(&api).await;
    let mut batch: Vec<Value> = (0..20).map(|i| tube(&format!("GOOD-{i:03}"))).collect();
    batch.insert(11, tube("BAD CODE"));
    let reply = receive(&api, batch).await;
    assert_error(
        &reply,
        422,
        "invalid",
        &["BAD CODE", "nothing was received"],
    );
    for i in 0..20 {
        let t = api.get(&format!("/api/v1/tubes/GOOD-{i:03}")).await;
        assert_error(&t, 404, "not_found", &[&format!("GOOD-{i:03}")]);
    }
    assert_eq!(snapshot(&api).await, before);

    // Other invalid content in a batch: pool size, priority, due time.
    for bad in [
        json!({ "barcode": "GOOD-100", "pool_size": 21 }),
        json!({ "barcode": "GOOD-100", "priority": "asap" }),
        json!({ "barcode": "GOOD-100", "due_in": "soon" }),
        json!({ "barcode": "GOOD-100", "due_in": "4h", "due_at": "2030-01-01T00:00:00Z" }),
    ] {
        let reply = receive(&api, vec![tube("GOOD-101"), bad.clone()]).await;
        assert_eq!(reply.status, 422, "{bad}: {reply:?}");
        assert_eq!(reply.body["error"]["code"], "invalid");
        assert!(!reply.message().is_empty());
    }
    assert_eq!(api.get("/api/v1/tubes/GOOD-101").await.status, 404);
    assert_eq!(snapshot(&api).await, before);

    // A batch over the limit is refused whole, naming the limit.
    let too_many: Vec<Value> = (0..10_001).map(|i| tube(&format!("MANY-{i:05}"))).collect();
    let reply = receive(&api, too_many).await;
    assert_error(
        &reply,
        422,
        "invalid",
        &["10001 tubes", "the limit is 10000"],
    );
    assert_eq!(api.get("/api/v1/tubes/MANY-00000").await.status, 404);
    assert_eq!(snapshot(&api).await, before);
}

#[tokio::test(flavor = "multi_thread")]
async fn placement_conflicts_are_refused_whole() {
    let daemon = Daemon::start();
    let api = daemon.client();
    receive_ok(
        &api,
        &["PT-0001".into(), "PT-0002".into(), "PT-0003".into()],
    )
    .await;
    create_plate(&api, "PLATE-A").await;
    create_plate(&api, "PLATE-B").await;
    let first = api
        .post(
            "/api/v1/plates/PLATE-A/assign",
            json!({ "tubes": ["PT-0001"] }),
        )
        .await;
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(
        first.body["wells"],
        json!([{ "well": "A1", "barcode": "PT-0001" }])
    );
    let before = snapshot(&api).await;

    // One tube on two plates, with a good tube in the same request.
    let twice = api
        .post(
            "/api/v1/plates/PLATE-B/assign",
            json!({ "tubes": ["PT-0002", "PT-0001"] }),
        )
        .await;
    assert_error(&twice, 409, "conflict", &["PT-0001", "PLATE-A"]);
    let twice = api
        .post(
            "/api/v1/plates/PLATE-B/assign",
            json!({ "placements": [{ "well": "C3", "barcode": "PT-0001" }] }),
        )
        .await;
    assert_error(&twice, 409, "conflict", &["PT-0001", "PLATE-A"]);
    let t1 = api.get_ok("/api/v1/tubes/PT-0001").await;
    assert_eq!(
        (t1["plate"].clone(), t1["well"].clone()),
        (json!("PLATE-A"), json!("A1"))
    );
    assert_eq!(
        api.get_ok("/api/v1/tubes/PT-0002").await["state"],
        "waiting"
    );
    assert_eq!(snapshot(&api).await, before);

    // A well outside the format.
    for well in ["H13", "Q1", "A0", "12"] {
        let reply = api
            .post(
                "/api/v1/plates/PLATE-B/assign",
                json!({ "placements": [
                    { "well": "A5", "barcode": "PT-0003" },
                    { "well": well, "barcode": "PT-0002" },
                ] }),
            )
            .await;
        assert_error(&reply, 422, "invalid", &[well]);
    }
    assert_eq!(snapshot(&api).await, before);

    // A control well.
    let control = api
        .post(
            "/api/v1/plates/PLATE-B/assign",
            json!({ "placements": [
                { "well": "A5", "barcode": "PT-0003" },
                { "well": "H12", "barcode": "PT-0002" },
            ] }),
        )
        .await;
    assert_error(&control, 409, "conflict", &["H12", "control"]);
    let plate = api.get_ok("/api/v1/plates/PLATE-B").await;
    assert_eq!(
        wells(&plate)["H12"],
        ("control".into(), "positive_control".into())
    );
    assert_eq!(plate["samples"], 0);
    assert_eq!(snapshot(&api).await, before);

    // An occupied well.
    let occupied = api
        .post(
            "/api/v1/plates/PLATE-A/assign",
            json!({ "placements": [{ "well": "A1", "barcode": "PT-0002" }] }),
        )
        .await;
    assert_error(&occupied, 409, "conflict", &["A1", "PT-0001"]);
    // A tube never received.
    let unknown = api
        .post(
            "/api/v1/plates/PLATE-B/assign",
            json!({ "tubes": ["PT-0002", "NEVER-SEEN"] }),
        )
        .await;
    assert_error(&unknown, 422, "invalid", &["NEVER-SEEN"]);
    assert_eq!(snapshot(&api).await, before);

    // A sealed plate.
    let sealed = api.post("/api/v1/plates/PLATE-A/seal", json!({})).await;
    assert_eq!(sealed.status, 200, "{sealed:?}");
    let before = snapshot(&api).await;
    let late = api
        .post(
            "/api/v1/plates/PLATE-A/assign",
            json!({ "tubes": ["PT-0002"] }),
        )
        .await;
    assert_error(&late, 409, "conflict", &["PLATE-A", "sealed"]);
    let late = api
        .post(
            "/api/v1/plates/PLATE-A/unassign",
            json!({ "wells": ["A1"] }),
        )
        .await;
    assert_error(&late, 409, "conflict", &["PLATE-A", "sealed"]);
    let late = api.post("/api/v1/plates/PLATE-A/fill", json!({})).await;
    assert_error(&late, 409, "conflict", &["PLATE-A", "sealed"]);
    let resealed = api.post("/api/v1/plates/PLATE-A/seal", json!({})).await;
    assert_error(&resealed, 409, "conflict", &["PLATE-A"]);
    assert_eq!(
        api.get_ok("/api/v1/tubes/PT-0002").await["state"],
        "waiting"
    );
    assert_eq!(snapshot(&api).await, before);
}

#[tokio::test(flavor = "multi_thread")]
async fn unassign_puts_tubes_back_and_an_empty_plate_cannot_be_sealed() {
    let daemon = Daemon::start();
    let api = daemon.client();
    receive_ok(&api, &["UN-0001".into(), "UN-0002".into()]).await;
    create_plate(&api, "PLATE-U").await;

    let before = snapshot(&api).await;
    let empty = api.post("/api/v1/plates/PLATE-U/seal", json!({})).await;
    assert_error(&empty, 409, "conflict", &["PLATE-U", "no samples"]);
    assert_eq!(api.get_ok("/api/v1/plates/PLATE-U").await["state"], "open");
    assert_eq!(snapshot(&api).await, before);

    let assigned = api
        .post(
            "/api/v1/plates/PLATE-U/assign",
            json!({ "tubes": ["UN-0001", "UN-0002"] }),
        )
        .await;
    assert_eq!(assigned.status, 200, "{assigned:?}");
    assert_eq!(api.get_ok("/api/v1/tubes").await["total_waiting"], 0);

    let removed = api
        .post(
            "/api/v1/plates/PLATE-U/unassign",
            json!({ "wells": ["A1"], "reason": "tube cracked" }),
        )
        .await;
    assert_eq!(removed.status, 200, "{removed:?}");
    assert_eq!(removed.body["wells"].as_array().map(Vec::len), Some(1));
    let back = removed.body["wells"][0]["barcode"]
        .as_str()
        .expect("barcode")
        .to_string();
    let t = api.get_ok(&format!("/api/v1/tubes/{back}")).await;
    assert_eq!(t["state"], "waiting");
    assert_eq!(t["plate"], Value::Null);
    let waiting = api.get_ok("/api/v1/tubes").await;
    assert_eq!(waiting["total_waiting"], 1);
    assert_eq!(waiting["tubes"][0]["barcode"], back.as_str());
    let plate = api.get_ok("/api/v1/plates/PLATE-U").await;
    assert_eq!(plate["samples"], 1);
    assert!(!wells(&plate).contains_key("A1"));
    let audit = api.get_ok(&format!("/api/v1/audit?tube={back}")).await;
    assert_eq!(
        actions(&audit),
        ["tube.received", "plate.assigned", "plate.unassigned"]
    );
    assert_eq!(audit[2]["reason"], "tube cracked");

    // An empty well, and a control well, cannot be unassigned.
    let before = snapshot(&api).await;
    let reply = api
        .post(
            "/api/v1/plates/PLATE-U/unassign",
            json!({ "wells": ["B1", "A1"] }),
        )
        .await;
    assert_eq!(reply.status / 100, 4, "{reply:?}");
    assert!(reply.message().contains("A1"), "{reply:?}");
    let reply = api
        .post(
            "/api/v1/plates/PLATE-U/unassign",
            json!({ "wells": ["H12"] }),
        )
        .await;
    assert_error(&reply, 409, "conflict", &["H12"]);
    assert_eq!(snapshot(&api).await, before);

    // The tube can go back on a plate, and the plate can be sealed.
    let again = api
        .post("/api/v1/plates/PLATE-U/assign", json!({ "tubes": [back] }))
        .await;
    assert_eq!(again.status, 200, "{again:?}");
    let sealed = api.post("/api/v1/plates/PLATE-U/seal", json!({})).await;
    assert_eq!(sealed.status, 200, "{sealed:?}");
    assert_eq!(sealed.body["samples"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_requests_get_json_errors_and_change_nothing() {
    let daemon = Daemon::start();
    let api = daemon.client();
    receive_ok(&api, &["MF-0001".into()]).await;
    create_plate(&api, "PLATE-M").await;
    let before = snapshot(&api).await;

    let reply = api
        .post_raw(
            "/api/v1/tubes",
            "application/json",
            br#"{"tubes": [{"barcode": "MF-0002"}"#.to_vec(),
        )
        .await;
    assert_error(&reply, 400, "malformed_json", &[]);

    let reply = api
        .post_raw(
            "/api/v1/plates/PLATE-M/seal",
            "application/json",
            b"{reason".to_vec(),
        )
        .await;
    assert_error(&reply, 400, "malformed_json", &[]);

    // Over server.max_body_bytes (1 MiB in the test config).
    let big = json!({
        "tubes": [{ "barcode": "MF-0003" }],
        "reason": "x".repeat(1_100_000),
    });
    let reply = api
        .post_raw(
            "/api/v1/tubes",
            "application/json",
            serde_json::to_vec(&big).expect("json"),
        )
        .await;
    assert_error(&reply, 413, "payload_too_large", &[]);

    let reply = api
        .post_raw(
            "/api/v1/tubes",
            "text/plain",
            br#"{"tubes": [{"barcode": "MF-0004"}]}"#.to_vec(),
        )
        .await;
    assert_error(&reply, 415, "unsupported_media_type", &[]);

    let reply = api
        .post(
            "/api/v1/tubes",
            json!({ "tubes": [{ "barcode": "MF-0005", "colour": "red" }] }),
        )
        .await;
    assert_error(&reply, 422, "invalid", &["colour"]);
    let reply = api
        .post(
            "/api/v1/plates",
            json!({ "kit": KIT, "id": "PLATE-N", "wells": 96 }),
        )
        .await;
    assert_error(&reply, 422, "invalid", &["wells"]);

    let reply = api
        .post("/api/v1/plates", json!({ "kit": "no-such-kit" }))
        .await;
    assert_error(
        &reply,
        422,
        "invalid",
        &["no-such-kit", KIT, "cdc-n1-n2-rp"],
    );
    let reply = api
        .post("/api/v1/plates", json!({ "kit": KIT, "format": 48 }))
        .await;
    assert_error(&reply, 422, "invalid", &["48"]);

    let reply = api.get("/api/v1/plates/NO-SUCH-PLATE").await;
    assert_error(&reply, 404, "not_found", &["NO-SUCH-PLATE"]);
    let reply = api
        .post("/api/v1/plates/NO-SUCH-PLATE/fill", json!({}))
        .await;
    assert_error(&reply, 404, "not_found", &["NO-SUCH-PLATE"]);
    let reply = api.get("/api/v1/tubes/NO-SUCH-TUBE").await;
    assert_error(&reply, 404, "not_found", &["NO-SUCH-TUBE"]);

    let reply = api.get("/api/v1/no/such/route").await;
    assert_error(&reply, 404, "not_found", &[]);
    let reply = api.post("/api/v1/nothing", json!({})).await;
    assert_error(&reply, 404, "not_found", &[]);

    for barcode in ["MF-0002", "MF-0003", "MF-0004", "MF-0005"] {
        assert_eq!(
            api.get(&format!("/api/v1/tubes/{barcode}")).await.status,
            404,
            "{barcode} must not have been received"
        );
    }
    assert_eq!(snapshot(&api).await, before);
}

#[tokio::test(flavor = "multi_thread")]
async fn more_refusals_write_nothing() {
    let daemon = Daemon::start();
    let api = daemon.client();
    let barcodes: Vec<String> = (0..6).map(|i| format!("EDGE-{i:03}")).collect();
    receive_ok(&api, &barcodes).await;
    create_plate(&api, "EDGE-OPEN").await;
    create_plate(&api, "EDGE-SEALED").await;
    let assigned = api
        .post(
            "/api/v1/plates/EDGE-SEALED/assign",
            json!({ "tubes": ["EDGE-005"] }),
        )
        .await;
    assert_eq!(assigned.status, 200, "{assigned:?}");
    let sealed = api.post("/api/v1/plates/EDGE-SEALED/seal", json!({})).await;
    assert_eq!(sealed.status, 200, "{sealed:?}");
    let pcr = api
        .post(
            "/api/v1/plates/EDGE-SEALED/transfer",
            json!({ "id": "EDGE-PCR" }),
        )
        .await;
    assert_eq!(pcr.status, 201, "{pcr:?}");
    let before = snapshot(&api).await;
    let metrics_before = api.get_text("/metrics").await.text;

    // The same barcode twice in one batch with different pool sizes.
    let reply = receive(
        &api,
        vec![
            json!({ "barcode": "EDGE-100", "pool_size": 1 }),
            json!({ "barcode": "EDGE-100", "pool_size": 5 }),
        ],
    )
    .await;
    assert_error(&reply, 422, "invalid", &["EDGE-100"]);
    // An empty batch.
    let reply = receive(&api, vec![]).await;
    assert_error(&reply, 422, "invalid", &[]);
    // One tube twice in one assignment, or both automatically and by well.
    let reply = api
        .post(
            "/api/v1/plates/EDGE-OPEN/assign",
            json!({ "tubes": ["EDGE-000", "EDGE-001", "EDGE-000"] }),
        )
        .await;
    assert_error(&reply, 409, "conflict", &["EDGE-000"]);
    let reply = api
        .post(
            "/api/v1/plates/EDGE-OPEN/assign",
            json!({
                "tubes": ["EDGE-001"],
                "placements": [{ "well": "C4", "barcode": "EDGE-001" }],
            }),
        )
        .await;
    assert_error(&reply, 409, "conflict", &["EDGE-001"]);
    // One well twice.
    let reply = api
        .post(
            "/api/v1/plates/EDGE-OPEN/assign",
            json!({ "placements": [
                { "well": "C4", "barcode": "EDGE-001" },
                { "well": "C4", "barcode": "EDGE-002" },
            ] }),
        )
        .await;
    assert_error(&reply, 409, "conflict", &["C4"]);
    // Transfers: from an open plate, from a PCR plate, to an existing id.
    let reply = api
        .post("/api/v1/plates/EDGE-OPEN/transfer", json!({}))
        .await;
    assert_error(&reply, 409, "conflict", &["EDGE-OPEN", "sealed"]);
    let reply = api
        .post("/api/v1/plates/EDGE-PCR/transfer", json!({}))
        .await;
    assert_error(&reply, 409, "conflict", &["EDGE-PCR"]);
    let reply = api
        .post(
            "/api/v1/plates/EDGE-SEALED/transfer",
            json!({ "id": "EDGE-OPEN" }),
        )
        .await;
    assert_error(&reply, 409, "conflict", &["EDGE-OPEN", "exists"]);
    // A plate id that exists, or is not a valid id.
    let reply = api
        .post("/api/v1/plates", json!({ "kit": KIT, "id": "EDGE-OPEN" }))
        .await;
    assert_error(&reply, 409, "conflict", &["EDGE-OPEN"]);
    let reply = api
        .post("/api/v1/plates", json!({ "kit": KIT, "id": "no spaces" }))
        .await;
    assert_error(&reply, 422, "invalid", &["no spaces"]);
    // A PCR plate is not for building.
    let reply = api
        .post(
            "/api/v1/plates/EDGE-PCR/assign",
            json!({ "tubes": ["EDGE-001"] }),
        )
        .await;
    assert_eq!(reply.status, 409, "{reply:?}");
    // Combining: the same plate twice, an open plate.
    let reply = api
        .post(
            "/api/v1/plates/combine",
            json!({ "sources": ["EDGE-SEALED", "EDGE-SEALED", "EDGE-SEALED", "EDGE-SEALED"] }),
        )
        .await;
    assert_error(&reply, 422, "invalid", &["twice"]);
    let reply = api
        .post(
            "/api/v1/plates/combine",
            json!({ "sources": ["EDGE-SEALED", "EDGE-OPEN", "NOPE-0001", "NOPE-0002"] }),
        )
        .await;
    assert_eq!(reply.status / 100, 4, "{reply:?}");
    // The audit trail: plate and tube filters together.
    let reply = api.get("/api/v1/audit?plate=EDGE-OPEN&tube=EDGE-000").await;
    assert_error(&reply, 422, "invalid", &[]);

    assert_eq!(snapshot(&api).await, before);
    let metrics_after = api.get_text("/metrics").await.text;
    for name in ["pcrd_tubes_stored", "pcrd_tubes_waiting"] {
        assert_eq!(
            metric_value(&metrics_after, name),
            metric_value(&metrics_before, name),
            "{name}"
        );
    }

    // Paging: the waiting list's limit, and the audit trail's `before`.
    let two = api.get_ok("/api/v1/tubes?limit=2").await;
    assert_eq!(two["tubes"].as_array().map(Vec::len), Some(2));
    assert_eq!(two["total_waiting"], 5);
    let all = api.get_ok("/api/v1/audit").await;
    let seqs: Vec<u64> = all
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "oldest first: {seqs:?}"
    );
    let last = *seqs.last().expect("entries");
    let page = api
        .get_ok(&format!("/api/v1/audit?before={last}&limit=2"))
        .await;
    let page: Vec<u64> = page
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(page, [last - 2, last - 1]);
}

// ----- auth -----

#[tokio::test(flavor = "multi_thread")]
async fn tokens_and_roles() {
    let daemon = Daemon::start();
    let tina = daemon.client();
    let anonymous = tina.without_token();
    let stranger = daemon.client_as("not-a-token-of-this-daemon");
    let rob = daemon.client_as(REVIEWER_TOKEN);
    let ada = daemon.client_as(ADMIN_TOKEN);
    receive_ok(&tina, &["AUTH-001".into()]).await;
    let before = snapshot(&tina).await;

    let reply = anonymous.get("/api/v1/plates").await;
    assert_error(&reply, 401, "unauthorized", &["Authorization"]);
    let reply = anonymous
        .post("/api/v1/tubes", json!({ "tubes": [tube("AUTH-002")] }))
        .await;
    assert_error(&reply, 401, "unauthorized", &[]);
    // Authentication comes before looking at the body.
    let reply = anonymous
        .post_raw("/api/v1/tubes", "application/json", b"{nonsense".to_vec())
        .await;
    assert_error(&reply, 401, "unauthorized", &[]);
    let reply = stranger.get("/api/v1/tubes").await;
    assert_error(&reply, 401, "unauthorized", &[]);
    let reply = stranger
        .post("/api/v1/tubes", json!({ "tubes": [tube("AUTH-002")] }))
        .await;
    assert_error(&reply, 401, "unauthorized", &[]);

    let reply = rob
        .post("/api/v1/tubes", json!({ "tubes": [tube("AUTH-002")] }))
        .await;
    assert_error(&reply, 403, "forbidden", &["reviewer", "rob"]);
    let reply = rob.post("/api/v1/plates", json!({ "kit": KIT })).await;
    assert_error(&reply, 403, "forbidden", &["reviewer"]);
    assert_eq!(snapshot(&tina).await, before);

    // The reviewer reads.
    assert_eq!(rob.get("/api/v1/plates").await.status, 200);
    assert_eq!(rob.get("/api/v1/tubes/AUTH-001").await.status, 200);
    assert_eq!(rob.get("/api/v1/audit").await.status, 200);
    assert_eq!(rob.get("/api/v1/kits").await.status, 200);

    // The admin does lab work.
    receive_ok(&ada, &["AUTH-003".into()]).await;
    let plate = ada
        .post("/api/v1/plates", json!({ "kit": KIT, "id": "ADA-PLATE" }))
        .await;
    assert_eq!(plate.status, 201, "{plate:?}");
    assert_eq!(plate.body["created_by"], "ada");
    let filled = ada.post("/api/v1/plates/ADA-PLATE/fill", json!({})).await;
    assert_eq!(filled.status, 200, "{filled:?}");
    let sealed = ada.post("/api/v1/plates/ADA-PLATE/seal", json!({})).await;
    assert_eq!(sealed.status, 200, "{sealed:?}");
    let audit = ada.get_ok("/api/v1/audit?tube=AUTH-003").await;
    assert_eq!(audit[0]["user"], "ada");
    let t = tina.get_ok("/api/v1/tubes/AUTH-003").await;
    assert_eq!(t["received_by"], "ada");
}

// ----- the OpenAPI document, health, metrics -----

#[tokio::test(flavor = "multi_thread")]
async fn openapi_lists_every_route_and_each_answers() {
    let daemon = Daemon::start();
    let api = daemon.client();
    receive_ok(&api, &["OA-0001".into(), "OA-0002".into()]).await;
    create_plate(&api, "OA-PLATE").await;

    let doc = api.without_token().get("/api/v1/openapi.json").await;
    assert_eq!(doc.status, 200, "{doc:?}");
    let doc = doc.body;
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "not OpenAPI 3.x: {}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().expect("paths");
    let expected: &[(&str, &[&str])] = &[
        ("/api/v1/tubes", &["get", "post"]),
        ("/api/v1/tubes/{barcode}", &["get"]),
        ("/api/v1/plates", &["get", "post"]),
        ("/api/v1/plates/{id}", &["get"]),
        ("/api/v1/plates/{id}/assign", &["post"]),
        ("/api/v1/plates/{id}/fill", &["post"]),
        ("/api/v1/plates/{id}/unassign", &["post"]),
        ("/api/v1/plates/{id}/seal", &["post"]),
        ("/api/v1/plates/{id}/transfer", &["post"]),
        ("/api/v1/plates/combine", &["post"]),
        ("/api/v1/audit", &["get"]),
        ("/api/v1/audit/verify", &["get"]),
        ("/api/v1/kits", &["get"]),
        ("/api/v1/instruments", &["get"]),
        ("/api/v1/instruments/{name}", &["get"]),
    ];
    for (path, methods) in expected {
        let item = paths
            .get(*path)
            .unwrap_or_else(|| panic!("{path} missing from the OpenAPI document"));
        for method in *methods {
            assert!(
                item.get(*method).is_some(),
                "{method} {path} not documented"
            );
        }
    }
    assert!(
        doc["components"]["securitySchemes"]["bearer"].is_object(),
        "bearer auth documented"
    );

    // Every documented operation is served.
    let mut called = 0;
    for (path, item) in paths {
        if path == "/api/v1/instruments/{name}" {
            // Instruments are named in the config and the test daemon has none, so
            // the documented 404 is the answer; its body shows the route was served.
            let reply = api.get("/api/v1/instruments/none").await;
            assert_eq!(reply.status, 404, "{reply:?}");
            assert!(reply.message().contains("no instrument"), "{reply:?}");
            called += 1;
            continue;
        }
        let concrete = path
            .replace("{barcode}", "OA-0001")
            .replace("{id}", "OA-PLATE");
        for (method, _) in item.as_object().expect("path item") {
            let reply = match method.as_str() {
                "get" => api.get(&concrete).await,
                "post" => api.post(&concrete, json!({})).await,
                other => panic!("unexpected method {other} for {path}"),
            };
            assert_ne!(reply.status, 404, "{method} {concrete}: {reply:?}");
            assert_ne!(reply.status, 405, "{method} {concrete}: {reply:?}");
            called += 1;
        }
    }
    assert!(called >= 15, "only {called} operations documented");
}

#[tokio::test(flavor = "multi_thread")]
async fn health_and_metrics() {
    let daemon = Daemon::start();
    let api = daemon.client();
    let health = api.without_token().get("/healthz").await;
    assert_eq!(health.status, 200, "{health:?}");
    assert_eq!(health.body["status"], "ok");
    assert_eq!(health.body["lab"], "LAB-TEST");

    let barcodes: Vec<String> = (0..5).map(|i| format!("MET-{i:03}")).collect();
    receive_ok(&api, &barcodes).await;
    create_plate(&api, "MET-PLATE").await;
    let assigned = api
        .post(
            "/api/v1/plates/MET-PLATE/assign",
            json!({ "tubes": ["MET-001", "MET-003"] }),
        )
        .await;
    assert_eq!(assigned.status, 200, "{assigned:?}");

    let metrics = api.without_token().get_text("/metrics").await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.content_type.starts_with("text/plain"),
        "{}",
        metrics.content_type
    );
    let value = |name| {
        metric_value(&metrics.text, name)
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{}", metrics.text))
    };
    assert_eq!(value("pcrd_tubes_waiting"), 3.0);
    assert_eq!(value("pcrd_tubes_stored"), 5.0);
    assert_eq!(value("pcrd_tubes_received_total"), 5.0);
    assert_eq!(value("pcrd_plates_created_total"), 1.0);
    assert!(value("pcrd_store_barriers_total") >= 1.0);
    // Every barrier and every request lands in its latency histogram.
    assert_eq!(
        value("pcrd_store_barrier_duration_seconds_count"),
        value("pcrd_store_barriers_total")
    );
    assert_eq!(
        value("pcrd_store_barrier_duration_seconds_bucket{le=\"+Inf\"}"),
        value("pcrd_store_barriers_total")
    );
    assert!(value("pcrd_http_request_duration_seconds_count") >= 3.0);
}

// ----- concurrency -----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_all_land() {
    const TASKS: usize = 8;
    const PER_TASK: usize = 200;
    let daemon = Daemon::start();
    let api = daemon.client();
    let mut handles = Vec::new();
    for task in 0..TASKS {
        let api = api.clone();
        handles.push(tokio::spawn(async move {
            for i in 0..PER_TASK {
                let barcode = format!("CC-{task}-{i:04}");
                let reply = receive(&api, vec![tube(&barcode)]).await;
                assert_eq!(reply.status, 200, "{barcode}: {reply:?}");
                assert_eq!(reply.body["received"], json!([barcode]));
            }
        }));
    }
    for handle in handles {
        handle.await.expect("writer task");
    }
    let waiting = api.get_ok("/api/v1/tubes?limit=100000").await;
    assert_eq!(waiting["total_waiting"], TASKS * PER_TASK);
    let stored: BTreeSet<String> = waiting["tubes"]
        .as_array()
        .expect("tubes")
        .iter()
        .map(|t| t["barcode"].as_str().expect("barcode").to_string())
        .collect();
    for task in 0..TASKS {
        for i in 0..PER_TASK {
            assert!(stored.contains(&format!("CC-{task}-{i:04}")));
        }
    }
    assert_eq!(api.audit_intact().await, (TASKS * PER_TASK) as u64);

    let metrics = api.get_text("/metrics").await.text;
    let barriers = metric_value(&metrics, "pcrd_store_barriers_total").expect("barriers");
    let waiters = metric_value(&metrics, "pcrd_store_barrier_waiters_total").expect("waiters");
    assert!(barriers >= 1.0, "{metrics}");
    assert!(waiters >= (TASKS * PER_TASK) as f64, "{metrics}");
    assert_eq!(
        metric_value(&metrics, "pcrd_tubes_stored"),
        Some((TASKS * PER_TASK) as f64)
    );
}
