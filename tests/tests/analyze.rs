//! `pcrd analyze` end to end: the real binary on real and synthetic RDML files, as a
//! lab would run it (no daemon). Checks the records, the kit's calls and plate
//! validity, the CSV form, and that bad input gets a message naming the problem and a
//! non-zero exit, never a made-up Ct.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use pcrd_protocol::analysis::model::CurveModel;
use pcrd_protocol::rdml::{self, Document, PcrFormat};
use pcrd_tests::{pcrd_bin, plate_document};
use serde_json::Value;

fn vermeulen(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data/vermeulen")
        .join(name);
    assert!(
        path.is_file(),
        "{} is missing: the shared data must sit beside the clone",
        path.display()
    );
    path
}

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

fn analyze(args: &[&str]) -> Output {
    let out = Command::new(pcrd_bin())
        .arg("analyze")
        .args(args)
        .output()
        .unwrap();
    Output {
        code: out.status.code().unwrap(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Channels of the sarscov2-orf1ab-n-ic kit, as an instrument exports them.
const KIT: &str = "sarscov2-orf1ab-n-ic";
const TARGETS: [(&str, &str); 3] = [("ORF1ab", "FAM"), ("N", "VIC"), ("IC", "CY5")];

/// A curve: positive at `ct` (about; the kit's cut-off is 40), or flat.
fn curve(ct: Option<f64>, seed: u64) -> Vec<f64> {
    CurveModel {
        cycles: 45,
        amplitude: if ct.is_some() { 2.0 } else { 0.0 },
        // The model's crossing of a low threshold is a few cycles before c_half.
        c_half: ct.map_or(30.0, |ct| ct + 4.0),
        noise_sd: 0.003,
        seed,
        ..CurveModel::default()
    }
    .readings()
}

/// A 96-well plate of the kit: every well filled, with per-well (ORF1ab, N, IC)
/// Cts from `well_cts`, RDML reactions numbered row by row.
fn kit_plate(well_cts: impl Fn(&str) -> [Option<f64>; 3]) -> Document {
    let format = PcrFormat {
        rows: 8,
        columns: 12,
        row_label: "ABC".to_owned(),
        column_label: "123".to_owned(),
    };
    let label = |id: u32| format.well_label(id).unwrap();
    plate_document(
        format.clone(),
        &TARGETS,
        |id| format!("S-{}", label(id)),
        |id, k| curve(well_cts(&label(id))[k], u64::from(id) * 10 + k as u64),
    )
}

/// The usual plate: PC H12 positive everywhere, NTC G12 flat, A1 positive, B1 one
/// target (retest), C1 negative with IC, D1 nothing (invalid); the rest negative.
fn usual(well: &str) -> [Option<f64>; 3] {
    match well {
        "H12" => [Some(28.0), Some(28.0), Some(27.0)],
        "G12" => [None, None, None],
        "A1" => [Some(22.0), Some(23.0), Some(27.0)],
        "B1" => [None, Some(33.0), Some(27.0)],
        "D1" => [None, None, None],
        _ => [None, None, Some(27.0)],
    }
}

fn write(dir: &Path, name: &str, doc: &Document) -> String {
    let path = dir.join(name);
    std::fs::write(&path, rdml::write(doc)).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn vermeulen_file_gives_one_record_per_reaction_with_the_documented_keys() {
    let file = vermeulen("data_vermeulen_std_150000_15.rdml");
    let out = analyze(&[file.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let records = lines(&out.stdout);
    assert_eq!(records.len(), 960);
    for key in [
        "well",
        "sample",
        "target",
        "dye",
        "ct",
        "method",
        "qc",
        "instrument_cq",
    ] {
        assert!(
            records.iter().all(|r| r.get(key).is_some()),
            "key {key} missing"
        );
    }
    // React 326 of run AHCY is N14, STD_150000 (rdmlpython agrees, rdml_interop.rs).
    let n14 = records
        .iter()
        .find(|r| r["run"] == "AHCY_20080229" && r["reaction"] == 326)
        .unwrap();
    assert_eq!(n14["well"], "N14");
    assert_eq!(n14["sample"], "STD_150000");
    assert_eq!(n14["dye"], "SYBR");
    assert_eq!(n14["method"], "threshold");
    assert!(n14["instrument_cq"].is_null(), "the file has no Cq");
    // LinRegPCR's published Cq of the three STD_150000 AHCY reactions are
    // 20.07-20.32; pcrd's Ct must be in that neighbourhood.
    let ct = n14["ct"].as_f64().unwrap();
    assert!((19.5..21.0).contains(&ct), "{ct}");
    // Every STD_150000 reaction amplified.
    assert!(
        records
            .iter()
            .filter(|r| r["sample"] == "STD_150000")
            .all(|r| r["ct"].is_f64())
    );
}

#[test]
fn csv_output_has_a_header_and_one_row_per_record() {
    let file = vermeulen("data_vermeulen_std_150000_150000.rdml");
    let out = analyze(&[file.to_str().unwrap(), "--format", "csv", "--method", "cp"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let mut reader = csv::Reader::from_reader(out.stdout.as_bytes());
    let header = reader.headers().unwrap().clone();
    assert_eq!(&header[3], "well");
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 192);
    let method = header.iter().position(|h| h == "method").unwrap();
    assert!(rows.iter().all(|r| &r[method] == "cp"));
}

#[test]
fn with_a_kit_every_well_gets_a_call_and_the_plate_its_validity() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "plate.rdml", &kit_plate(usual));
    let out = analyze(&[&file, "--kit", KIT]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let all = lines(&out.stdout);
    let of_kind =
        |kind: &str| -> Vec<&Value> { all.iter().filter(|l| l["kind"] == kind).collect() };
    assert_eq!(of_kind("reaction").len(), 96 * 3);
    let plate = of_kind("plate");
    assert_eq!(plate.len(), 1);
    assert_eq!(plate[0]["valid"], true, "{}", plate[0]);
    assert_eq!(plate[0]["kit"], format!("{KIT}@1.0"));

    let wells = of_kind("well");
    assert_eq!(wells.len(), 94, "96 wells minus the two controls");
    let call = |well: &str| {
        wells
            .iter()
            .find(|w| w["well"] == well)
            .unwrap_or_else(|| panic!("no call for {well}"))["call"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(call("A1"), "detected");
    assert_eq!(call("B1"), "retest");
    assert_eq!(call("C1"), "not_detected");
    assert_eq!(call("D1"), "invalid");
    // Every call names the kit version that decided it.
    assert!(wells.iter().all(|w| w["kit"]["version"] == "1.0"));
    // Reaction lines carry their well's call; the controls are marked.
    let reaction = |well: &str| {
        of_kind("reaction")
            .into_iter()
            .find(|r| r["well"] == well)
            .unwrap()
    };
    assert_eq!(reaction("A1")["call"], "detected");
    assert_eq!(reaction("H12")["call"], "control");
    assert_eq!(reaction("A1")["plate_valid"], true);
}

#[test]
fn a_contaminated_ntc_invalidates_every_call_on_the_plate_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let doc = kit_plate(|well| match well {
        "G12" => [None, Some(34.0), None],
        other => usual(other),
    });
    let file = write(dir.path(), "plate.rdml", &doc);
    let out = analyze(&[&file, "--kit", KIT]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("failed their run controls"),
        "{}",
        out.stderr
    );
    let all = lines(&out.stdout);
    let plate = all.iter().find(|l| l["kind"] == "plate").unwrap();
    assert_eq!(plate["valid"], false);
    let reason = plate["reason"].as_str().unwrap();
    assert!(reason.contains("G12") && reason.contains('N'), "{reason}");
    let wells: Vec<&Value> = all.iter().filter(|l| l["kind"] == "well").collect();
    assert_eq!(wells.len(), 94);
    assert!(wells.iter().all(|w| w["call"] == "invalid"), "{wells:?}");
}

#[test]
fn an_ic_blip_in_the_ntc_is_allowed_by_this_kit() {
    let dir = tempfile::tempdir().unwrap();
    let doc = kit_plate(|well| match well {
        "G12" => [None, None, Some(36.0)],
        other => usual(other),
    });
    let file = write(dir.path(), "plate.rdml", &doc);
    let out = analyze(&[&file, "--kit", KIT]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let plate = lines(&out.stdout)
        .into_iter()
        .find(|l| l["kind"] == "plate")
        .unwrap();
    assert_eq!(plate["valid"], true, "{plate}");
}

#[test]
fn a_kit_channel_the_run_lacks_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut doc = kit_plate(usual);
    // Drop the IC (CY5) from the file.
    doc.targets.retain(|t| t.id != "IC");
    doc.dyes.retain(|d| d.id != "CY5");
    for reaction in &mut doc.experiments[0].runs[0].reactions {
        reaction.data.retain(|d| d.target_id != "IC");
    }
    let file = write(dir.path(), "no-ic.rdml", &doc);
    let out = analyze(&[&file, "--kit", KIT]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("\"IC\"") && out.stderr.contains("CY5"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_curve_that_cannot_be_analysed_is_reported_not_given_a_ct() {
    let dir = tempfile::tempdir().unwrap();
    let mut doc = kit_plate(usual);
    // Well A1's N curve was cut short by an aborted export.
    let a1 = &mut doc.experiments[0].runs[0].reactions[0];
    a1.data[1].fluorescence.truncate(5);
    let file = write(dir.path(), "short.rdml", &doc);
    let out = analyze(&[&file, "--kit", KIT]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("reaction 1 (A1)") && out.stderr.contains("\"N\""),
        "{}",
        out.stderr
    );
    let all = lines(&out.stdout);
    let record = all
        .iter()
        .find(|l| l["kind"] == "reaction" && l["well"] == "A1" && l["target"] == "N")
        .unwrap();
    assert!(record["ct"].is_null());
    assert!(record["error"].as_str().unwrap().contains("cycles"));
    assert_eq!(record["call"], "not_judged");
    // The well gets no call, and the plate lists it.
    assert!(!all.iter().any(|l| l["kind"] == "well" && l["well"] == "A1"));
    let plate = all.iter().find(|l| l["kind"] == "plate").unwrap();
    assert_eq!(plate["not_judged"][0]["well"], "A1");
}

#[test]
fn bad_files_and_arguments_get_a_message_and_a_non_zero_exit() {
    let dir = tempfile::tempdir().unwrap();
    // Missing file.
    let out = analyze(&[dir.path().join("nope.rdml").to_str().unwrap()]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("cannot read"), "{}", out.stderr);
    // Truncated RDML.
    let bytes = std::fs::read(vermeulen("data_vermeulen_std_150000_150000.rdml")).unwrap();
    let cut = dir.path().join("cut.rdml");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out = analyze(&[cut.to_str().unwrap()]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("cut.rdml"), "{}", out.stderr);
    assert!(
        out.stdout.is_empty(),
        "nothing half-written: {}",
        out.stdout
    );
    // A reading that is not a number.
    let xml = "<rdml version=\"1.3\" xmlns=\"http://www.rdml.org\"><dye id=\"FAM\"/>\
        <sample id=\"s\"><type>unkn</type></sample><target id=\"N1\"><type>toi</type><dyeId id=\"FAM\"/></target>\
        <experiment id=\"e\"><run id=\"r\"><pcrFormat><rows>8</rows><columns>12</columns><rowLabel>ABC</rowLabel><columnLabel>123</columnLabel></pcrFormat>\
        <react id=\"15\"><sample id=\"s\"/><data><tar id=\"N1\"/><adp><cyc>1</cyc><fluor>NaN</fluor></adp></data></react></run></experiment></rdml>";
    let nan = dir.path().join("nan.xml");
    std::fs::write(&nan, xml).unwrap();
    let out = analyze(&[nan.to_str().unwrap()]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("reaction 15") && out.stderr.contains("N1"),
        "{}",
        out.stderr
    );
    // Unknown kit, bad threshold, unknown run.
    let file = vermeulen("data_vermeulen_std_150000_150000.rdml");
    let file = file.to_str().unwrap();
    let out = analyze(&[file, "--kit", "no-such-kit"]);
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("unknown kit"), "{}", out.stderr);
    let out = analyze(&[file, "--threshold", "N1"]);
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("TARGET=VALUE"), "{}", out.stderr);
    let out = analyze(&[file, "--run", "nope"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("AHCY_20080229"), "{}", out.stderr);
}
