//! What the daemon's folder watcher does with these parsers, without the folder:
//! read a file's bytes, fingerprint them, parse, and on failure write a sidecar that
//! tells the operator the file, its fingerprint and the line at fault.

use pcrd_protocol::analysis::Ct;
use pcrd_protocol::domain::{PlateFormat, Well};
use pcrd_protocol::export::plate_map::read_plate_map;
use pcrd_protocol::export::results::read_results;
use pcrd_protocol::export::{ExportError, Sidecar, fingerprint};

const DECAPPER: &[u8] = include_bytes!("../src/export/testdata/decapper_map.csv");
const QS_96: &[u8] = include_bytes!("../src/export/testdata/quantstudio_96.csv");
const QS_384: &[u8] = include_bytes!("../src/export/testdata/quantstudio_384.txt");

fn well(s: &str) -> Well {
    s.parse().expect("a well")
}

#[test]
fn fixtures_read_into_typed_documents() {
    let map = read_plate_map(DECAPPER, Some(PlateFormat::Wells96)).expect("decapper map");
    assert_eq!(map.placements.len(), 10);

    let qs96 = read_results(QS_96).expect("96-well results");
    assert_eq!(qs96.format, PlateFormat::Wells96);
    // The NTC in G1: all three targets undetermined.
    let ntc: Vec<_> = qs96.rows.iter().filter(|r| r.well == well("G1")).collect();
    assert_eq!(ntc.len(), 3);
    assert!(ntc.iter().all(|r| r.ct == Ct::Undetermined));
    assert!(ntc.iter().all(|r| r.task.as_deref() == Some("NTC")));

    let qs384 = read_results(QS_384).expect("384-well results");
    assert_eq!(qs384.format, PlateFormat::Wells384);
    assert_eq!(
        qs384.metadata.get("Instrument Type").map(String::as_str),
        Some("QuantStudio™ 7 Flex System")
    );
    let p23: Vec<_> = qs384
        .rows
        .iter()
        .filter(|r| r.well == well("P23"))
        .collect();
    assert_eq!(p23[0].target, "ORF1ab");
    assert_eq!(p23[0].ct, Ct::Determined(26.772));
}

#[test]
fn the_same_bytes_have_the_same_fingerprint_and_an_edit_changes_it() {
    // A copy, as when the same export is dropped in the folder twice.
    let copy = QS_96.to_vec();
    assert_eq!(fingerprint(QS_96), fingerprint(&copy));
    assert_eq!(fingerprint(QS_96).len(), 64);
    let mut edited = QS_96.to_vec();
    edited.push(b'\n');
    assert_ne!(fingerprint(QS_96), fingerprint(&edited));
}

#[test]
fn a_half_written_file_is_refused_with_a_sidecar_naming_the_line() {
    // The instrument was still writing: the file stops in the middle of a row,
    // right after a Ct that would be valid on its own.
    let text = std::str::from_utf8(QS_96).expect("UTF-8");
    let cut = text.find("33.871").expect("the C1 N1 Ct") + 2;
    let bytes = &QS_96[..cut];
    let err = read_results(bytes).expect_err("a cut file");
    assert_eq!(
        err,
        ExportError::ShortRow {
            line: 26,
            found: 9,
            expected: 24
        }
    );
    let sidecar = Sidecar::new("PCR-20261127-03.csv", "results", bytes, &err).to_string();
    assert!(sidecar.contains("file: PCR-20261127-03.csv\n"), "{sidecar}");
    assert!(
        sidecar.contains(&format!("sha256: {}\n", fingerprint(bytes))),
        "{sidecar}"
    );
    assert!(
        sidecar
            .contains("reason: line 26: 9 fields where the header has 24; the row is cut short\n"),
        "{sidecar}"
    );
}

#[test]
fn a_sentinel_ct_is_refused_not_read_as_a_cycle() {
    // A spreadsheet turned "Undetermined" into NaN: refused with its place, never read
    // as a cycle or as undetermined.
    let text = std::str::from_utf8(QS_96).expect("UTF-8");
    let first = text.find("Undetermined").expect("an undetermined Ct");
    let edited = format!(
        "{}NaN{}",
        &text[..first],
        &text[first + "Undetermined".len()..]
    );
    let err = read_results(edited.as_bytes()).expect_err("NaN");
    assert_eq!(
        err.to_string(),
        "line 23, column \"CT\": \"NaN\" is not a Ct; expected a positive cycle number or \"Undetermined\""
    );
}
