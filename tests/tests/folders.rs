//! Watched export folders (issue 8) end to end: the real `pcrd serve` watching real
//! directories in its temporary directory. Files are dropped as instruments and copy
//! tools do (written, or written elsewhere and renamed in); what the daemon did is
//! read back through the API and from the folders' `done/` and `failed/`.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pcrd_protocol::analysis::model::CurveModel;
use pcrd_protocol::rdml::{self, PcrFormat};
use pcrd_tests::{Api, Daemon, TEST_CONFIG, plate_document};
use serde_json::{Value, json};

const KIT: &str = "sarscov2-orf1ab-n-ic";

/// The test daemon's config with a decapper folder and a cycler results folder,
/// polled every 50 ms, a file settled after 400 ms unchanged. `hold_ms` is the
/// decapper folder's pause between a durable import and the move (crash test).
fn config(hold_ms: u64) -> String {
    format!(
        r#"{TEST_CONFIG}
[[folders]]
name = "decapper"
path = "exports/decapper"
kind = "plate_map"
kit = "{KIT}"
poll_ms = 50
settle_ms = 400
hold_before_move_ms = {hold_ms}

[[folders]]
name = "qs5"
path = "exports/qs5"
kind = "results"
kit = "{KIT}"
poll_ms = 50
settle_ms = 400
"#
    )
}

struct Lab {
    daemon: Daemon,
    api: Api,
}

impl Lab {
    fn start() -> Lab {
        Lab::start_holding(0)
    }

    fn start_holding(hold_ms: u64) -> Lab {
        let daemon = Daemon::start_with_config(&config(hold_ms));
        let api = daemon.client();
        Lab { daemon, api }
    }

    fn folder(&self, name: &str) -> PathBuf {
        self.daemon
            .config_path()
            .parent()
            .unwrap()
            .join("exports")
            .join(name)
    }

    /// Writes a file under a temporary name and renames it in, as copy tools do.
    fn drop_file(&self, folder: &str, name: &str, bytes: &[u8]) -> PathBuf {
        let dir = self.folder(folder);
        std::fs::create_dir_all(&dir).unwrap();
        let tmp = dir.join(format!("{name}.part"));
        std::fs::write(&tmp, bytes).unwrap();
        let path = dir.join(name);
        std::fs::rename(&tmp, &path).unwrap();
        path
    }

    async fn receive(&self, barcodes: &[&str]) {
        let tubes: Vec<Value> = barcodes.iter().map(|b| json!({"barcode": b})).collect();
        let reply = self
            .api
            .post("/api/v1/tubes", json!({"tubes": tubes}))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }

    async fn imports(&self, folder: &str) -> Vec<Value> {
        self.api
            .get_ok(&format!("/api/v1/imports?folder={folder}"))
            .await
            .as_array()
            .unwrap()
            .clone()
    }
}

/// Waits until `path` exists (the daemon moved a file there).
async fn wait_for(path: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear within {timeout:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn map_csv(rows: &[(&str, &str, &str)]) -> String {
    let mut text = String::from("Plate Barcode;Position;Tube Barcode;Status\r\n");
    for (plate, well, tube) in rows {
        text.push_str(&format!("{plate};{well};{tube};OK\r\n"));
    }
    text
}

/// Tube per well of a plate as the API shows it.
async fn wells(api: &Api, plate: &str) -> Vec<(String, String)> {
    let view = api.get_ok(&format!("/api/v1/plates/{plate}")).await;
    view["wells"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["kind"] == "sample")
        .map(|w| {
            (
                w["well"].as_str().unwrap().to_owned(),
                w["barcode"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_decapper_map_creates_and_fills_its_plates() {
    let lab = Lab::start();
    lab.receive(&["MAP-0001", "MAP-0002", "MAP-0003", "MAP-0004"])
        .await;
    let map = map_csv(&[
        ("EXT-MAP-01", "A1", "MAP-0001"),
        ("EXT-MAP-01", "B1", "MAP-0002"),
        ("EXT-MAP-01", "C1", "NO TUBE"),
        ("EXT-MAP-02", "A1", "MAP-0003"),
        ("EXT-MAP-02", "D2", "MAP-0004"),
    ]);
    lab.drop_file("decapper", "rack-0815.csv", map.as_bytes());
    let done = lab.folder("decapper").join("done/rack-0815.csv");
    wait_for(&done, Duration::from_secs(20)).await;
    assert!(!lab.folder("decapper").join("rack-0815.csv").exists());

    let mut one = wells(&lab.api, "EXT-MAP-01").await;
    one.sort();
    assert_eq!(
        one,
        [
            ("A1".to_owned(), "MAP-0001".to_owned()),
            ("B1".to_owned(), "MAP-0002".to_owned())
        ]
    );
    let two = wells(&lab.api, "EXT-MAP-02").await;
    assert!(
        two.contains(&("D2".to_owned(), "MAP-0004".to_owned())),
        "{two:?}"
    );
    let plate = lab.api.get_ok("/api/v1/plates/EXT-MAP-01").await;
    assert_eq!(plate["kit"], KIT);
    assert_eq!(plate["state"], "open");
    assert_eq!(plate["controls"], 2, "the kit's controls are placed");
    let tube = lab.api.get_ok("/api/v1/tubes/MAP-0004").await;
    assert_eq!(tube["plate"], "EXT-MAP-02", "{tube}");

    let imports = lab.imports("decapper").await;
    assert_eq!(imports.len(), 1, "{imports:?}");
    assert_eq!(imports[0]["outcome"], "imported");
    assert_eq!(imports[0]["tubes"], 4);
    assert_eq!(imports[0]["plates"], json!(["EXT-MAP-01", "EXT-MAP-02"]));
    let folders = lab.api.get_ok("/api/v1/folders").await;
    let decapper = folders
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "decapper")
        .unwrap();
    assert_eq!(decapper["imported"], 1, "{decapper}");
    assert_eq!(decapper["failed"], 0);
    assert_eq!(decapper["last_import"]["file"], "rack-0815.csv");
    let metrics = lab.api.get_text("/metrics").await.text;
    assert!(
        metrics.contains("pcrd_folder_files_imported_total{folder=\"decapper\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pcrd_folder_import_seconds_count 1"),
        "{metrics}"
    );
    // The audit trail says who did it: the folder.
    let audit = lab.api.get_ok("/api/v1/audit?plate=EXT-MAP-01").await;
    let text = audit.to_string();
    assert!(text.contains("plate.mapped"), "{text}");
    assert!(text.contains("folder:decapper"), "{text}");
}

#[tokio::test]
async fn a_file_still_being_written_is_not_imported_until_it_stops_changing() {
    let lab = Lab::start();
    let tubes: Vec<String> = (1..=8).map(|i| format!("SLOW-{i:04}")).collect();
    let refs: Vec<&str> = tubes.iter().map(String::as_str).collect();
    lab.receive(&refs).await;
    let rows: Vec<(String, String)> = ["A1", "B1", "C1", "D1", "E1", "F1", "G1", "H1"]
        .iter()
        .zip(&tubes)
        .map(|(w, t)| ((*w).to_owned(), t.clone()))
        .collect();
    let text = map_csv(
        &rows
            .iter()
            .map(|(w, t)| ("EXT-SLOW", w.as_str(), t.as_str()))
            .collect::<Vec<_>>(),
    );
    // Written in place, a row every 150 ms (well under the 400 ms settle time): each
    // piece ends at a row boundary, so an early read would see a valid, shorter map.
    let dir = lab.folder("decapper");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("slow.csv");
    let mut file = std::fs::File::create(&path).unwrap();
    for line in text.split_inclusive('\n') {
        use std::io::Write as _;
        file.write_all(line.as_bytes()).unwrap();
        file.flush().unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        let reply = lab.api.get("/api/v1/plates/EXT-SLOW").await;
        assert_eq!(reply.status, 404, "imported while still being written");
        assert!(path.exists());
    }
    drop(file);
    wait_for(&dir.join("done/slow.csv"), Duration::from_secs(20)).await;
    assert_eq!(wells(&lab.api, "EXT-SLOW").await.len(), 8, "every row");
    assert_eq!(lab.imports("decapper").await.len(), 1);
}

#[tokio::test]
async fn the_same_file_again_is_not_imported_twice() {
    let lab = Lab::start();
    lab.receive(&["TWICE-0001", "TWICE-0002"]).await;
    let map = map_csv(&[
        ("EXT-TWICE", "A1", "TWICE-0001"),
        ("EXT-TWICE", "B1", "TWICE-0002"),
    ]);
    lab.drop_file("decapper", "first.csv", map.as_bytes());
    let done = lab.folder("decapper").join("done");
    wait_for(&done.join("first.csv"), Duration::from_secs(20)).await;
    let audit_before = lab.api.audit_intact().await;

    // The same bytes under another name, and again under the first name.
    lab.drop_file("decapper", "copy.csv", map.as_bytes());
    wait_for(&done.join("copy.csv"), Duration::from_secs(20)).await;
    lab.drop_file("decapper", "first.csv", map.as_bytes());
    wait_for(&done.join("first-2.csv"), Duration::from_secs(20)).await;

    let sidecar = std::fs::read_to_string(done.join("copy.csv.error.txt")).unwrap();
    assert!(sidecar.contains("already imported at"), "{sidecar}");
    assert!(sidecar.contains("\"first.csv\""), "{sidecar}");
    assert!(
        std::fs::read_to_string(done.join("first-2.csv.error.txt"))
            .unwrap()
            .contains("already imported at")
    );
    assert_eq!(
        lab.api.audit_intact().await,
        audit_before,
        "nothing changed in the lab"
    );
    let outcomes: Vec<Value> = lab
        .imports("decapper")
        .await
        .iter()
        .map(|e| e["outcome"].clone())
        .collect();
    assert_eq!(
        outcomes,
        [
            json!("already_imported"),
            json!("already_imported"),
            json!("imported")
        ]
    );
}

#[tokio::test]
async fn a_map_naming_a_tube_never_received_fails_whole() {
    let lab = Lab::start();
    lab.receive(&["KNOWN-0001"]).await;
    let map = map_csv(&[
        ("EXT-BAD", "A1", "KNOWN-0001"),
        ("EXT-BAD", "B1", "GHOST-0404"),
    ]);
    lab.drop_file("decapper", "bad.csv", map.as_bytes());
    let failed = lab.folder("decapper").join("failed");
    wait_for(&failed.join("bad.csv.error.txt"), Duration::from_secs(20)).await;
    assert!(failed.join("bad.csv").exists());
    let sidecar = std::fs::read_to_string(failed.join("bad.csv.error.txt")).unwrap();
    assert!(
        sidecar.contains("tube GHOST-0404 (plate EXT-BAD, well B1) has not been received"),
        "{sidecar}"
    );
    assert!(sidecar.contains("file: bad.csv"), "{sidecar}");
    // All or nothing: no plate, and the known tube still waits.
    assert_eq!(lab.api.get("/api/v1/plates/EXT-BAD").await.status, 404);
    let tube = lab.api.get_ok("/api/v1/tubes/KNOWN-0001").await;
    assert!(tube["plate"].is_null(), "{tube}");
    let imports = lab.imports("decapper").await;
    assert_eq!(imports[0]["outcome"], "failed");
    assert!(
        imports[0]["detail"]
            .as_str()
            .unwrap()
            .contains("GHOST-0404")
    );

    // A well clash (a control well of the kit's layout) refuses the map too, and a
    // half-written file (cut inside a row) is refused with its line.
    lab.drop_file(
        "decapper",
        "clash.csv",
        map_csv(&[("EXT-CLASH", "H12", "KNOWN-0001")]).as_bytes(),
    );
    wait_for(&failed.join("clash.csv.error.txt"), Duration::from_secs(20)).await;
    let sidecar = std::fs::read_to_string(failed.join("clash.csv.error.txt")).unwrap();
    assert!(sidecar.contains("H12 is reserved for the"), "{sidecar}");
    lab.drop_file(
        "decapper",
        "cut.csv",
        b"Plate Barcode;Position;Tube Barcode;Status\r\nEXT-CUT;A1",
    );
    wait_for(&failed.join("cut.csv.error.txt"), Duration::from_secs(20)).await;
    let sidecar = std::fs::read_to_string(failed.join("cut.csv.error.txt")).unwrap();
    assert!(sidecar.contains("line 2"), "{sidecar}");
    assert_eq!(lab.api.get("/api/v1/plates/EXT-CLASH").await.status, 404);
    assert_eq!(lab.api.get("/api/v1/plates/EXT-CUT").await.status, 404);

    // A well already holding another tube on an existing plate.
    lab.receive(&["KNOWN-0002", "KNOWN-0003"]).await;
    lab.drop_file(
        "decapper",
        "occupy.csv",
        map_csv(&[("EXT-OCC", "A1", "KNOWN-0002")]).as_bytes(),
    );
    wait_for(
        &lab.folder("decapper").join("done/occupy.csv"),
        Duration::from_secs(20),
    )
    .await;
    lab.drop_file(
        "decapper",
        "again.csv",
        map_csv(&[("EXT-OCC", "A1", "KNOWN-0003")]).as_bytes(),
    );
    wait_for(&failed.join("again.csv.error.txt"), Duration::from_secs(20)).await;
    let sidecar = std::fs::read_to_string(failed.join("again.csv.error.txt")).unwrap();
    assert!(
        sidecar.contains("well A1 already holds tube KNOWN-0002"),
        "{sidecar}"
    );
    assert_eq!(
        wells(&lab.api, "EXT-OCC").await,
        [("A1".to_owned(), "KNOWN-0002".to_owned())]
    );
}

/// Results of one tube as the API shows them.
async fn results_of(api: &Api, tube: &str) -> Vec<Value> {
    api.get_ok(&format!("/api/v1/tubes/{tube}/imported-results"))
        .await
        .as_array()
        .unwrap()
        .clone()
}

fn ct(result: &Value, target: &str) -> Option<f64> {
    result["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["target"] == target)
        .unwrap_or_else(|| panic!("no {target} in {result}"))["ct"]
        .as_f64()
}

/// A 96-well plate of the kit with tubes placed by the API.
async fn plate_with_tubes(lab: &Lab, id: &str, placements: &[(&str, &str)]) {
    let tubes: Vec<&str> = placements.iter().map(|(_, t)| *t).collect();
    lab.receive(&tubes).await;
    let reply = lab
        .api
        .post("/api/v1/plates", json!({"kit": KIT, "id": id}))
        .await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    let placements: Vec<Value> = placements
        .iter()
        .map(|(w, t)| json!({"well": w, "barcode": t}))
        .collect();
    let reply = lab
        .api
        .post(
            &format!("/api/v1/plates/{id}/assign"),
            json!({"placements": placements}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
}

#[tokio::test]
async fn a_quantstudio_results_file_puts_its_cts_and_calls_on_the_tubes() {
    let lab = Lab::start();
    plate_with_tubes(
        &lab,
        "PCR-FOLDER-01",
        &[
            ("A1", "FLD-0001"),
            ("B1", "FLD-0002"),
            ("C1", "FLD-0003"),
            ("D1", "FLD-0004"),
            ("F1", "FLD-0005"),
        ],
    )
    .await;
    let bytes = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/folders/qs5_results.csv"),
    )
    .unwrap();
    lab.drop_file("qs5", "run-2026-11-27.csv", &bytes);
    wait_for(
        &lab.folder("qs5").join("done/run-2026-11-27.csv"),
        Duration::from_secs(20),
    )
    .await;

    let a1 = results_of(&lab.api, "FLD-0001").await;
    assert_eq!(a1.len(), 1, "{a1:?}");
    let a1 = &a1[0];
    assert_eq!(a1["call"], "detected", "{a1}");
    assert_eq!(a1["plate"], "PCR-FOLDER-01");
    assert_eq!(a1["well"], "A1");
    assert_eq!(a1["plate_valid"], true);
    assert_eq!(a1["kit"], format!("{KIT}@1.0"));
    assert_eq!(ct(a1, "ORF1ab"), Some(22.314));
    assert_eq!(ct(a1, "N"), Some(23.05));
    assert_eq!(ct(a1, "IC"), Some(27.9));
    assert_eq!(a1["source"]["folder"], "qs5");
    assert_eq!(a1["source"]["file"], "run-2026-11-27.csv");
    assert_eq!(a1["source"]["format"], "quantstudio_csv");
    assert_eq!(a1["source"]["fingerprint"].as_str().unwrap().len(), 64);

    let b1 = &results_of(&lab.api, "FLD-0002").await[0];
    assert_eq!(b1["call"], "retest", "{b1}");
    assert_eq!(
        ct(b1, "ORF1ab"),
        None,
        "Undetermined is null, never a number"
    );
    assert_eq!(ct(b1, "N"), Some(33.41));
    assert_eq!(
        results_of(&lab.api, "FLD-0003").await[0]["call"],
        "not_detected"
    );
    assert_eq!(results_of(&lab.api, "FLD-0004").await[0]["call"], "invalid");
    assert!(results_of(&lab.api, "FLD-0005").await.is_empty());

    let import = &lab.imports("qs5").await[0];
    assert_eq!(import["outcome"], "imported", "{import}");
    assert_eq!(import["tubes"], 4);
    // E1 has a result but no tube: kept, not attached to anyone.
    let unmatched = import["unmatched"].as_array().unwrap();
    assert_eq!(unmatched.len(), 1, "{import}");
    assert_eq!(unmatched[0]["well"], "E1");
    assert_eq!(unmatched[0]["call"], "detected");
    assert_eq!(import["missing"], json!(["FLD-0005 (F1)"]));

    // A file for a plate pcrd does not know fails, naming what it tried.
    let unknown = String::from_utf8(bytes)
        .unwrap()
        .replace("PCR-FOLDER-01", "PCR-NOWHERE");
    lab.drop_file("qs5", "nowhere.csv", unknown.as_bytes());
    let sidecar = lab.folder("qs5").join("failed/nowhere.csv.error.txt");
    wait_for(&sidecar, Duration::from_secs(20)).await;
    let text = std::fs::read_to_string(sidecar).unwrap();
    assert!(text.contains("no plate in pcrd for this file"), "{text}");
    assert!(text.contains("\"PCR-NOWHERE\""), "{text}");

    // A target the kit does not have fails the whole file; nothing is stored.
    let foreign = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/folders/qs5_results.csv"),
    )
    .unwrap()
    .replace(",N,UNKNOWN,VIC", ",RdRp,UNKNOWN,TEXASRED");
    lab.drop_file("qs5", "foreign.csv", foreign.as_bytes());
    let sidecar = lab.folder("qs5").join("failed/foreign.csv.error.txt");
    wait_for(&sidecar, Duration::from_secs(20)).await;
    let text = std::fs::read_to_string(sidecar).unwrap();
    assert!(text.contains("\"RdRp\""), "{text}");
    assert_eq!(results_of(&lab.api, "FLD-0001").await.len(), 1);

    // Sample names swapped between A1 and B1 against the plate's layout: the plate
    // was loaded wrong or the file is another plate's; the whole file fails.
    let swapped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/folders/qs5_results.csv"),
    )
    .unwrap()
    .replace("A1,false,FLD-0001", "A1,false,SWAP")
    .replace("B1,false,FLD-0002", "B1,false,FLD-0001")
    .replace("A1,false,SWAP", "A1,false,FLD-0002");
    lab.drop_file("qs5", "swapped.csv", swapped.as_bytes());
    let sidecar = lab.folder("qs5").join("failed/swapped.csv.error.txt");
    wait_for(&sidecar, Duration::from_secs(20)).await;
    let text = std::fs::read_to_string(sidecar).unwrap();
    assert!(
        text.contains("well A1 of plate PCR-FOLDER-01 holds tube FLD-0001, but the file names tube FLD-0002 there"),
        "{text}"
    );
    assert_eq!(
        results_of(&lab.api, "FLD-0001").await.len(),
        1,
        "nothing stored"
    );
    assert_eq!(results_of(&lab.api, "FLD-0002").await.len(), 1);
}

/// A curve positive at about `ct`, or flat (as in tests/analyze.rs).
fn curve(ct: Option<f64>, seed: u64) -> Vec<f64> {
    CurveModel {
        cycles: 45,
        amplitude: if ct.is_some() { 2.0 } else { 0.0 },
        c_half: ct.map_or(30.0, |ct| ct + 4.0),
        noise_sd: 0.003,
        seed,
        ..CurveModel::default()
    }
    .readings()
}

#[tokio::test]
async fn an_rdml_file_is_analysed_and_judged_onto_the_tubes() {
    // The shared Vermeulen RDML files are SYBR gene-expression dilution series (64
    // genes, no diagnostic kit's targets or controls, samples named STD_15..): no kit
    // judges them, so the file here is generated like tests/analyze.rs's plates.
    let lab = Lab::start();
    plate_with_tubes(
        &lab,
        "PCR-FOLDER-02",
        &[
            ("A1", "RDML-0001"),
            ("B1", "RDML-0002"),
            ("C1", "RDML-0003"),
        ],
    )
    .await;
    let format = PcrFormat {
        rows: 8,
        columns: 12,
        row_label: "ABC".to_owned(),
        column_label: "123".to_owned(),
    };
    let label = |id: u32| format.well_label(id).unwrap();
    let cts = |well: &str| -> [Option<f64>; 3] {
        match well {
            "H12" => [Some(28.0), Some(28.0), Some(27.0)],
            "G12" => [None, None, None],
            "A1" => [Some(22.0), Some(23.0), Some(27.0)],
            "B1" => [None, Some(33.0), Some(27.0)],
            _ => [None, None, Some(27.0)],
        }
    };
    let sample = |id: u32| match label(id).as_str() {
        "A1" => "RDML-0001".to_owned(),
        "B1" => "RDML-0002".to_owned(),
        "C1" => "RDML-0003".to_owned(),
        other => format!("S-{other}"),
    };
    let mut doc = plate_document(
        format.clone(),
        &[("ORF1ab", "FAM"), ("N", "VIC"), ("IC", "CY5")],
        sample,
        |id, k| curve(cts(&label(id))[k], u64::from(id) * 10 + k as u64),
    );
    doc.experiments[0].runs[0].id = "PCR-FOLDER-02".to_owned();
    lab.drop_file("qs5", "cfx-run.rdml", &rdml::write(&doc));
    wait_for(
        &lab.folder("qs5").join("done/cfx-run.rdml"),
        Duration::from_secs(30),
    )
    .await;

    let a1 = &results_of(&lab.api, "RDML-0001").await[0];
    assert_eq!(a1["call"], "detected", "{a1}");
    assert_eq!(a1["source"]["format"], "rdml");
    assert_eq!(a1["plate_valid"], true, "{a1}");
    let orf = ct(a1, "ORF1ab").unwrap();
    assert!((19.0..24.0).contains(&orf), "{orf}");
    let b1 = &results_of(&lab.api, "RDML-0002").await[0];
    assert_eq!(b1["call"], "retest", "{b1}");
    assert_eq!(ct(b1, "ORF1ab"), None);
    assert_eq!(
        results_of(&lab.api, "RDML-0003").await[0]["call"],
        "not_detected"
    );
    let import = &lab.imports("qs5").await[0];
    assert_eq!(import["tubes"], 3, "{import}");
    // The other 91 specimen wells of the run have no tube: kept as unmatched.
    assert_eq!(import["unmatched"].as_array().unwrap().len(), 91);

    // A file cut short (a copy interrupted) is refused with the reason.
    let whole = rdml::write(&doc);
    lab.drop_file("qs5", "cut.rdml", &whole[..whole.len() / 2]);
    let sidecar = lab.folder("qs5").join("failed/cut.rdml.error.txt");
    wait_for(&sidecar, Duration::from_secs(30)).await;
    let text = std::fs::read_to_string(sidecar).unwrap();
    assert!(text.contains("not a readable RDML file"), "{text}");
    assert_eq!(results_of(&lab.api, "RDML-0001").await.len(), 1);
}

#[tokio::test]
async fn a_crash_between_import_and_move_does_not_import_twice() {
    // The decapper folder holds 4 s between the durable import and the move: the
    // daemon is killed in that window.
    let mut lab = Lab::start_holding(4000);
    lab.receive(&["CRASH-0001", "CRASH-0002"]).await;
    let map = map_csv(&[
        ("EXT-CRASH", "A1", "CRASH-0001"),
        ("EXT-CRASH", "B1", "CRASH-0002"),
    ]);
    let path = lab.drop_file("decapper", "crash.csv", map.as_bytes());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let imports = lab.imports("decapper").await;
        if imports.iter().any(|e| e["outcome"] == "imported") {
            break;
        }
        assert!(Instant::now() < deadline, "no import within 20 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        path.exists(),
        "the import is committed but the file not yet moved"
    );
    lab.daemon.kill9();
    assert!(path.exists(), "killed inside the window");

    lab.daemon.restart();
    lab.api = lab.daemon.client();
    let done = lab.folder("decapper").join("done/crash.csv");
    wait_for(&done, Duration::from_secs(20)).await;
    assert!(!path.exists());
    assert!(
        !lab.folder("decapper")
            .join("done/crash.csv.error.txt")
            .exists(),
        "the move was finished, not treated as a second copy"
    );
    let imports = lab.imports("decapper").await;
    assert_eq!(imports.len(), 1, "{imports:?}");
    assert_eq!(imports[0]["outcome"], "imported");
    assert_eq!(wells(&lab.api, "EXT-CRASH").await.len(), 2);
    let audit = lab.api.get_ok("/api/v1/audit?plate=EXT-CRASH").await;
    let mapped = audit
        .as_array()
        .or_else(|| audit["entries"].as_array())
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "plate.mapped")
        .count();
    assert_eq!(mapped, 1, "{audit}");
}

#[test]
fn a_folder_config_with_problems_stops_the_daemon_naming_each_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"{TEST_CONFIG}
[[folders]]
name = "decapper"
path = "in"
kind = "plate_map"
kit = "no-such-kit"

[[folders]]
name = "qs"
path = "in"
kind = "result"
"#
    );
    let path = dir.path().join("pcrd.toml");
    std::fs::write(&path, &config).unwrap();
    let err = pcrd_tests::spawn_serve(
        &path,
        &dir.path().join("store"),
        &dir.path().join("stderr.log"),
        Duration::from_secs(30),
    )
    .unwrap_err();
    assert!(err.contains("kind \"result\""), "{err}");
    assert!(err.contains("needs kit"), "{err}");
    assert!(err.contains("watched by another folder"), "{err}");

    // With the config fixed but the kit unknown, the kit is named.
    let config = config.replace(
        "path = \"in\"\nkind = \"result\"\n",
        "path = \"qs\"\nkind = \"results\"\nkit = \"sarscov2-orf1ab-n-ic\"\n",
    );
    std::fs::write(&path, &config).unwrap();
    let err = pcrd_tests::spawn_serve(
        &path,
        &dir.path().join("store"),
        &dir.path().join("stderr2.log"),
        Duration::from_secs(30),
    )
    .unwrap_err();
    assert!(err.contains("unknown kit \"no-such-kit\""), "{err}");
}
