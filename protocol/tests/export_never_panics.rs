//! The export parsers answer any bytes with a document or an error, never a panic;
//! whatever they accept keeps their promises (wells on the plate, no well or tube
//! twice, Ct values positive cycles); every error names a line the input has; and a generated plate map or results file,
//! rendered, reads back equal.

use std::collections::{BTreeMap, HashSet};

use pcrd_protocol::analysis::Ct;
use pcrd_protocol::domain::{Barcode, PlateFormat, Well};
use pcrd_protocol::export::plate_map::{PlateMap, read_plate_map, read_plate_maps};
use pcrd_protocol::export::results::{ResultRow, ResultsFile, read_results};
use pcrd_protocol::export::{ExportError, Sidecar, fingerprint};
use proptest::prelude::*;

const DECAPPER: &str = include_str!("../src/export/testdata/decapper_map.csv");
const QS_96: &str = include_str!("../src/export/testdata/quantstudio_96.csv");
const QS_384: &str = include_str!("../src/export/testdata/quantstudio_384.txt");

/// Bits of these formats worth inserting into a valid file.
const SNIPPETS: &[&str] = &[
    ",",
    ";",
    "\t",
    "\"",
    "\n",
    "\r\n",
    "\u{FEFF}",
    "[Results]",
    "[Other]",
    "* Block Type = 384",
    "* ",
    "=",
    "Undetermined",
    "NaN",
    "-1",
    "0",
    "1e400",
    "A13",
    "Q1",
    "P24",
    "385",
    "97",
    "EMPTY",
    "NOREAD",
    "é",
    "Well",
    "CT",
    "Cq",
    "Barcode",
];

/// Checks what a successful plate-map read promises.
fn check_maps(maps: &[PlateMap]) {
    let mut tubes = HashSet::new();
    let mut plates = HashSet::new();
    for map in maps {
        assert!(plates.insert(map.plate.clone()), "plate twice");
        assert!(!map.plate.is_empty());
        let mut wells = HashSet::new();
        for (well, tube) in &map.placements {
            assert!(
                map.format.contains(*well),
                "{well} off a {} plate",
                map.format
            );
            assert!(wells.insert(*well), "well twice");
            assert!(tubes.insert(tube.clone()), "tube twice");
        }
    }
}

/// Checks what a successful results read promises.
fn check_results(file: &ResultsFile) {
    let mut seen = HashSet::new();
    for row in &file.rows {
        assert!(file.format.contains(row.well));
        assert!(seen.insert((row.well, row.target.clone())), "result twice");
        assert!(!row.target.is_empty() && !row.reporter.is_empty());
        if let Ct::Determined(v) = row.ct {
            assert!(v.is_finite() && v > 0.0, "Ct {v}");
        }
        if let Some(t) = row.threshold {
            assert!(t.is_finite() && t >= 0.0);
        }
    }
}

/// An error's line exists in the input (a trailing line without a newline counts).
fn check_line(bytes: &[u8], error: &ExportError) {
    if let Some(line) = error.line() {
        let lines = bytes.iter().filter(|&&b| b == b'\n').count() as u64 + 1;
        assert!(
            (1..=lines).contains(&line),
            "line {line} of {lines}: {error}"
        );
    }
}

fn parse_all(bytes: &[u8]) {
    match read_plate_maps(bytes, None) {
        Ok(maps) => check_maps(&maps),
        Err(e) => check_line(bytes, &e),
    }
    for format in [PlateFormat::Wells96, PlateFormat::Wells384] {
        if let Ok(maps) = read_plate_maps(bytes, Some(format)) {
            check_maps(&maps);
            assert!(maps.iter().all(|m| m.format == format));
        }
    }
    if let Ok(map) = read_plate_map(bytes, None) {
        check_maps(std::slice::from_ref(&map));
    }
    match read_results(bytes) {
        Ok(file) => check_results(&file),
        Err(e) => {
            check_line(bytes, &e);
            // Every error can be written to a sidecar.
            let text = Sidecar::new("x.csv", "results", bytes, &e).to_string();
            assert!(text.contains(&fingerprint(bytes)));
        }
    }
}

/// A fixture with something done to it: a snippet inserted, cut short, or a byte
/// replaced.
fn mutant() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(vec![DECAPPER, QS_96, QS_384]),
        0..3u8,
        any::<prop::sample::Index>(),
        prop::sample::select(SNIPPETS),
        any::<u8>(),
    )
        .prop_map(|(base, how, at, snippet, byte)| {
            let mut bytes = base.as_bytes().to_vec();
            let at = at.index(bytes.len() + 1);
            match how {
                0 => {
                    bytes.splice(at..at, snippet.bytes());
                }
                1 => bytes.truncate(at),
                _ => {
                    if let Some(b) = bytes.get_mut(at) {
                        *b = byte;
                    }
                }
            }
            bytes
        })
}

fn format() -> impl Strategy<Value = PlateFormat> {
    prop_oneof![Just(PlateFormat::Wells96), Just(PlateFormat::Wells384)]
}

/// Some wells of a `format` plate, each once, in any order.
fn wells(format: PlateFormat, max: usize) -> impl Strategy<Value = Vec<Well>> {
    let all: Vec<Well> = format.wells_column_major().collect();
    prop::sample::subsequence(all, 0..=max).prop_shuffle()
}

fn plate_maps() -> impl Strategy<Value = Vec<PlateMap>> {
    format().prop_flat_map(|format| {
        prop::collection::vec(
            (
                "[A-Z0-9][A-Za-z0-9,;. \"-]{0,8}",
                wells(format, 30),
                prop::collection::vec("[A-Za-z0-9-]{0,10}", 30),
            ),
            1..4,
        )
        .prop_map(move |plates| {
            plates
                .into_iter()
                .enumerate()
                .map(|(p, (name, wells, prefixes))| PlateMap {
                    // The index keeps names unique and ends them with a non-space.
                    plate: format!("{name}{p}"),
                    format,
                    placements: wells
                        .into_iter()
                        .zip(prefixes)
                        .enumerate()
                        .map(|(i, (well, prefix))| {
                            // The suffix keeps barcodes unique, at least 4
                            // characters, and never an empty or unread marker.
                            let tube = Barcode::new(format!("{prefix}-{p}-{i}"))
                                .expect("generated barcodes are valid");
                            (well, tube)
                        })
                        .collect(),
                })
                .collect()
        })
    })
}

fn result_row(well: Well, target: String) -> impl Strategy<Value = ResultRow> {
    (
        "([A-Za-z0-9_,\"-]{0,12})",
        "[A-Z][A-Z0-9]{1,5}",
        prop_oneof![Just(None), (1e-3f64..100.0).prop_map(Some)],
        prop::option::of(0.0f64..10.0),
        prop::option::of("[A-Z]{3,8}"),
        prop::option::of(any::<u32>()),
        prop::option::of(any::<u32>()),
        prop::option::of(any::<bool>()),
        prop::option::of(any::<bool>()),
    )
        .prop_map(
            move |(sample, reporter, ct, threshold, task, start, end, auto, omitted)| ResultRow {
                well,
                sample,
                target: target.clone(),
                reporter,
                ct: ct.map_or(Ct::Undetermined, Ct::Determined),
                threshold,
                task,
                baseline_start: start,
                baseline_end: end,
                automatic_threshold: auto,
                omitted,
            },
        )
}

fn results_file() -> impl Strategy<Value = ResultsFile> {
    format().prop_flat_map(|format| {
        let rows = wells(format, 12)
            .prop_flat_map(|wells| {
                wells
                    .into_iter()
                    .map(|well| {
                        prop::sample::subsequence(vec!["N1", "N2", "RP", "ORF1ab", "E gene"], 1..=3)
                            .prop_flat_map(move |targets| {
                                targets
                                    .into_iter()
                                    .map(|t| result_row(well, t.to_owned()))
                                    .collect::<Vec<_>>()
                            })
                    })
                    .collect::<Vec<_>>()
            })
            .prop_map(|rows| rows.into_iter().flatten().collect::<Vec<_>>());
        let metadata = prop::collection::btree_map(
            "[A-Z][a-z]{1,8}( [A-Z][a-z]{1,8})?",
            "([A-Za-z0-9.()/:=-]([A-Za-z0-9 .()/:=-]{0,10}[A-Za-z0-9.()/:=-])?)?",
            0..6,
        );
        (metadata, rows).prop_map(move |(mut metadata, rows): (BTreeMap<_, _>, _)| {
            metadata.insert("Block Type".to_owned(), format!("{format}-Well Block"));
            ResultsFile {
                metadata,
                format,
                rows,
            }
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2000)) {
        parse_all(&bytes);
    }

    #[test]
    fn csv_like_text_never_panics(text in "([A-Za-z0-9 ,;\t\"*=\\[\\]\r\n.-]|Well|CT|Undetermined){0,300}") {
        parse_all(text.as_bytes());
    }

    #[test]
    fn mutated_fixtures_never_panic(bytes in mutant()) {
        parse_all(&bytes);
    }

    #[test]
    fn plate_maps_read_back_equal(maps in plate_maps()) {
        let text = PlateMap::render(&maps);
        let format = maps[0].format;
        let back = read_plate_maps(text.as_bytes(), Some(format));
        // Plates whose wells are all empty are not in the file, so not read back.
        let expected: Vec<PlateMap> =
            maps.into_iter().filter(|m| !m.placements.is_empty()).collect();
        if expected.is_empty() {
            prop_assert!(back.is_err());
        } else {
            prop_assert_eq!(back.expect("rendered maps read back"), expected);
        }
    }

    #[test]
    fn results_files_read_back_equal(file in results_file()) {
        let text = file.render();
        let back = read_results(text.as_bytes());
        if file.rows.is_empty() {
            prop_assert!(back.is_err());
        } else {
            prop_assert_eq!(back.expect("rendered results read back"), file);
        }
    }
}
