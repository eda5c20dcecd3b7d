//! The RDML reader and writer against real data (the Vermeulen dilution series, RDML
//! 1.4, in `shared/data/vermeulen/`), small hand-written fixtures, and files broken on
//! purpose by editing their XML text.
//!
//! The expected numbers were found outside pcrd: element counts with `grep -o` on the
//! unzipped XML (47,925 `<adp>`, 960 `<react>`, 64 `<run>`), and reaction 326 = N14
//! from rdmlpython.

use std::io::{Cursor, Write};
use std::path::PathBuf;

use pcrd_protocol::rdml::{
    self, Document, Dye, Experiment, PcrFormat, Quantity, RdmlError, Reaction, ReactionData, Run,
    Sample, Target,
};
use proptest::prelude::*;

const SMALL_1_3: &str = include_str!("../src/rdml/testdata/small_1_3.xml");
const SMALL_1_0: &str = include_str!("../src/rdml/testdata/small_1_0.xml");

fn vermeulen_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/vermeulen")
}

fn vermeulen(name: &str) -> Vec<u8> {
    let path = vermeulen_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "the Vermeulen RDML data is missing: cannot read {} ({e}); it lives in \
             shared/data/vermeulen/ beside the repository",
            path.display()
        )
    })
}

fn vermeulen_15() -> Document {
    rdml::read(&vermeulen("data_vermeulen_std_150000_15.rdml")).expect("read the Vermeulen file")
}

/// `xml` with the first `from` replaced by `to`; fails if `from` is not there, so an
/// edit that no longer applies cannot make a test pass for the wrong reason.
fn edit(xml: &str, from: &str, to: &str) -> String {
    assert!(
        xml.contains(from),
        "the fixture no longer contains {from:?}"
    );
    xml.replacen(from, to, 1)
}

fn read_str(xml: &str) -> Result<Document, RdmlError> {
    rdml::read(xml.as_bytes())
}

fn zip_with(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    for (name, content) in entries {
        zip.start_file(*name, zip::write::SimpleFileOptions::default())
            .expect("zip into memory");
        zip.write_all(content).expect("zip into memory");
    }
    zip.finish().expect("zip into memory").into_inner()
}

#[test]
fn every_vermeulen_file_reads() {
    let mut names: Vec<String> = std::fs::read_dir(vermeulen_dir())
        .unwrap_or_else(|e| {
            panic!(
                "the Vermeulen RDML data is missing: {} ({e})",
                vermeulen_dir().display()
            )
        })
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".rdml"))
        .collect();
    names.sort();
    assert_eq!(names.len(), 5, "{names:?}");
    let mut reactions = Vec::new();
    for name in &names {
        let doc = rdml::read(&vermeulen(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(doc.version, "1.4", "{name}");
        assert_eq!(doc.experiments.len(), 1, "{name}");
        let mut count = 0;
        for (_, run, reaction) in doc.reactions() {
            assert_eq!(reaction.data.len(), 1, "{name} {}", run.id);
            assert!(!reaction.data[0].fluorescence.is_empty(), "{name}");
            assert!(run.format.well_label(reaction.id).is_some(), "{name}");
            count += 1;
        }
        reactions.push(count);
    }
    // The ..._15 file has all five dilutions, each other file one dilution fewer.
    assert_eq!(reactions, vec![960, 768, 576, 384, 192], "{names:?}");
}

#[test]
fn vermeulen_15_has_the_structure_of_the_dilution_series() {
    let doc = vermeulen_15();
    assert_eq!(doc.version, "1.4");
    assert_eq!(doc.dyes, vec![Dye { id: "SYBR".into() }]);
    assert_eq!(doc.targets.len(), 66);
    assert!(
        doc.targets
            .iter()
            .all(|t| t.dye_id == "SYBR" && t.kind == "toi")
    );
    assert_eq!(doc.experiments.len(), 1);
    let experiment = &doc.experiments[0];
    assert_eq!(experiment.id, "biomarker_set");
    assert_eq!(experiment.runs.len(), 64);
    assert_eq!(doc.reactions().count(), 960);

    let mut points = 0;
    for run in &experiment.runs {
        assert_eq!(run.format, PcrFormat::plate_384(), "run {}", run.id);
        assert_eq!(
            run.cq_detection_method.as_deref(),
            Some("automated threshold and baseline settings")
        );
        assert_eq!(run.reactions.len(), 15, "run {}: 5 dilutions x 3", run.id);
        let lengths: Vec<usize> = run
            .reactions
            .iter()
            .map(|r| {
                assert_eq!(r.data.len(), 1, "run {} reaction {}", run.id, r.id);
                assert_eq!(r.data[0].target_id, run.id, "each run measures its gene");
                assert!(r.data[0].cq.is_none(), "the file carries no Cq");
                r.data[0].fluorescence.len()
            })
            .collect();
        // One run was cycled 45 times, the other 63 50 times.
        let expected = if run.id == "ALUsq(Eurogentec)_20080228" {
            45
        } else {
            50
        };
        assert!(
            lengths.iter().all(|&n| n == expected),
            "run {}: {lengths:?}",
            run.id
        );
        points += lengths.iter().sum::<usize>();
    }
    assert_eq!(points, 47_925, "every <adp> in the file");

    let run = experiment.run("AHCY_20080229").expect("run AHCY");
    let reaction = run.reaction(326).expect("reaction 326");
    assert_eq!(run.format.well_label(326).as_deref(), Some("N14"));
    assert_eq!(reaction.sample_id, "STD_150000");
    let curve = &reaction.data[0].fluorescence;
    assert_eq!((curve[0], curve[1], curve[49]), (0.4853, 0.5788, 22.1594));

    let std15 = doc.sample("STD_15").expect("sample STD_15");
    assert_eq!(std15.kind, "std");
    assert_eq!(
        std15.quantity,
        Some(Quantity {
            value: 1.875,
            unit: "cop".into()
        })
    );
    // Declared as <rdml:sample> with <rdml:type>: the prefixed spelling reads the same.
    let prefixed = doc.sample("STDA1500").expect("sample STDA1500");
    assert_eq!(prefixed.kind, "std");
    assert_eq!(prefixed.quantity.as_ref().map(|q| q.value), Some(187.5));
    assert_eq!(doc.samples.len(), 9);
}

#[test]
fn vermeulen_15_survives_a_round_trip_through_the_1_3_writer() {
    let doc = vermeulen_15();
    let bytes = rdml::write(&doc);
    assert_eq!(bytes, rdml::write(&doc), "the writer is deterministic");
    let xml = rdml::write_xml(&doc);
    assert!(xml.contains("<rdml version=\"1.3\""), "{}", &xml[..200]);
    let back = rdml::read(&bytes).expect("read what we wrote");
    assert_eq!(back.version, "1.3");
    assert_eq!(
        back,
        Document {
            version: "1.3".into(),
            ..doc.clone()
        }
    );
    // Plain XML reads the same as the zip.
    assert_eq!(rdml::read(xml.as_bytes()).unwrap(), back);
}

#[test]
fn small_fixture_reads_into_the_expected_document() {
    let doc = read_str(SMALL_1_3).unwrap();
    let n1 = |cq, excluded: Option<&str>, fluorescence: Vec<f64>| ReactionData {
        target_id: "N1".into(),
        cq,
        excluded: excluded.map(str::to_owned),
        threshold: None,
        background: None,
        background_slope: None,
        fluorescence,
    };
    let expected = Document {
        version: "1.3".into(),
        dyes: vec![Dye { id: "FAM".into() }, Dye { id: "HEX".into() }],
        samples: vec![
            Sample {
                id: "S1".into(),
                kind: "unkn".into(),
                quantity: None,
            },
            Sample {
                id: "STD&1".into(),
                kind: "std".into(),
                quantity: Some(Quantity {
                    value: 1.875,
                    unit: "cop".into(),
                }),
            },
            Sample {
                id: "NTC".into(),
                kind: "ntc".into(),
                quantity: None,
            },
        ],
        targets: vec![
            Target {
                id: "N1".into(),
                dye_id: "FAM".into(),
                kind: "toi".into(),
            },
            Target {
                id: "IC".into(),
                dye_id: "HEX".into(),
                kind: "ref".into(),
            },
        ],
        experiments: vec![Experiment {
            id: "E".into(),
            runs: vec![
                Run {
                    id: "R".into(),
                    instrument: Some("CFX96 <lab 2>".into()),
                    cq_detection_method: Some("automated threshold and baseline settings".into()),
                    format: PcrFormat::plate_96(),
                    reactions: vec![
                        Reaction {
                            id: 15,
                            sample_id: "S1".into(),
                            data: vec![
                                ReactionData {
                                    threshold: Some(0.5),
                                    background: Some(0.1),
                                    background_slope: Some(-0.001),
                                    ..n1(
                                        Some(3.25),
                                        Some("late; noisy"),
                                        vec![0.1, 0.2, 0.8, 3.2, 6.4],
                                    )
                                },
                                ReactionData {
                                    target_id: "IC".into(),
                                    ..n1(None, None, vec![1.25, 1.5, 1.75])
                                },
                            ],
                        },
                        Reaction {
                            id: 1,
                            sample_id: "STD&1".into(),
                            data: vec![n1(Some(2.5), None, vec![0.1, 0.4])],
                        },
                        Reaction {
                            id: 96,
                            sample_id: "NTC".into(),
                            data: vec![n1(None, None, vec![])],
                        },
                    ],
                },
                Run {
                    id: "free".into(),
                    instrument: None,
                    cq_detection_method: None,
                    format: PcrFormat {
                        rows: 0,
                        columns: 1,
                        row_label: "123".into(),
                        column_label: "123".into(),
                    },
                    reactions: vec![Reaction {
                        id: 1000,
                        sample_id: "S1".into(),
                        data: vec![],
                    }],
                },
            ],
        }],
    };
    assert_eq!(doc, expected);
    assert_eq!(
        doc.experiments[0].runs[0].format.well_label(15).as_deref(),
        Some("B3")
    );
    assert_eq!(
        doc.experiments[0].runs[1]
            .format
            .well_label(1000)
            .as_deref(),
        Some("1000")
    );

    // Round trip, and the zip and plain forms agree.
    let back = rdml::read(&rdml::write(&doc)).unwrap();
    assert_eq!(back, doc);
    // A UTF-8 byte order mark is allowed.
    let with_bom = [b"\xEF\xBB\xBF".as_slice(), SMALL_1_3.as_bytes()].concat();
    assert_eq!(rdml::read(&with_bom).unwrap(), doc);
    // Without any namespace (a writer that left xmlns out) it reads the same.
    let bare = SMALL_1_3
        .replace(
            " xmlns:rdml=\"http://www.rdml.org\" xmlns=\"http://www.rdml.org\"",
            "",
        )
        .replace("rdml:", "");
    assert_eq!(read_str(&bare).unwrap(), doc);
}

#[test]
fn rdml_1_0_labels_and_dyes_are_converted() {
    let doc = read_str(SMALL_1_0).unwrap();
    assert_eq!(doc.version, "1.0");
    assert_eq!(
        doc.dyes,
        vec![
            Dye { id: "SYBR".into() },
            Dye {
                id: "conversion_dye_missing".into()
            }
        ]
    );
    assert_eq!(doc.targets[1].dye_id, "conversion_dye_missing");
    let run = &doc.experiments[0].runs[0];
    assert_eq!(run.format, PcrFormat::plate_96());
    let ids: Vec<u32> = run.reactions.iter().map(|r| r.id).collect();
    assert_eq!(ids, vec![15, 96], "B3 and H12");
    assert_eq!(run.reactions[0].data[0].cq, Some(20.5));
    assert_eq!(run.reactions[0].data[0].fluorescence, vec![1.0, 2.0]);
    let rotor = &doc.experiments[0].runs[1];
    assert_eq!((rotor.format.rows, rotor.format.columns), (72, 1));
    assert_eq!(rotor.format.well_label(72).as_deref(), Some("72"));
    // Written as 1.3, it reads back the same.
    let back = rdml::read(&rdml::write(&doc)).unwrap();
    assert_eq!(
        back,
        Document {
            version: "1.3".into(),
            ..doc
        }
    );
    // A well beyond the plate is refused.
    let err = read_str(&edit(SMALL_1_0, "id=\"H12\"", "id=\"I1\"")).unwrap_err();
    assert!(matches!(err, RdmlError::BadReactionId { .. }), "{err}");
}

const PLACE_N1: &str = r#"experiment "E" run "R" reaction 15 target "N1""#;

#[test]
fn a_repeated_cycle_is_refused_with_its_place() {
    let xml = edit(SMALL_1_3, "<cyc>3.0</cyc>", "<cyc>2</cyc>");
    let err = read_str(&xml).unwrap_err();
    assert!(
        matches!(&err, RdmlError::DuplicateCycle { cycle: 2, place, .. } if place == PLACE_N1),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains(r#"experiment "E" run "R" reaction 15 target "N1": cycle 2 appears twice"#),
        "{err}"
    );
}

#[test]
fn a_gap_in_the_cycles_is_refused() {
    let xml = edit(SMALL_1_3, "<adp><cyc>3.0</cyc><fluor>0.8</fluor></adp>", "");
    let err = read_str(&xml).unwrap_err();
    assert!(
        matches!(&err, RdmlError::MissingCycle { cycle: 3, points: 4, last: 5, place, .. } if place == PLACE_N1),
        "{err:?}"
    );
    // Not starting at 1 is a gap too.
    let xml = edit(SMALL_1_3, "<adp><cyc>1</cyc><fluor>0.1</fluor></adp>", "");
    let err = read_str(&xml).unwrap_err();
    assert!(
        matches!(&err, RdmlError::MissingCycle { cycle: 1, .. }),
        "{err:?}"
    );
}

#[test]
fn fractional_or_non_positive_cycles_are_refused() {
    for cycle in ["2.5", "0", "-1", "two", ""] {
        let xml = edit(
            SMALL_1_3,
            "<cyc>2</cyc><tmp>",
            &format!("<cyc>{cycle}</cyc><tmp>"),
        );
        let err = read_str(&xml).unwrap_err();
        assert!(
            matches!(&err, RdmlError::BadCycle { text, .. } if text == cycle),
            "{cycle}: {err:?}"
        );
    }
}

#[test]
fn non_finite_or_non_numeric_values_are_refused() {
    for (from, to, element) in [
        ("<fluor>0.8</fluor>", "<fluor>NaN</fluor>", "fluor"),
        ("<fluor>0.8</fluor>", "<fluor>INF</fluor>", "fluor"),
        ("<fluor>0.8</fluor>", "<fluor>-inf</fluor>", "fluor"),
        ("<fluor>0.8</fluor>", "<fluor></fluor>", "fluor"),
        ("<cq>3.25</cq>", "<cq>3,25</cq>", "cq"),
        ("<cq>3.25</cq>", "<cq>undetermined</cq>", "cq"),
        (
            "<quantFluor>0.5</quantFluor>",
            "<quantFluor>x</quantFluor>",
            "quantFluor",
        ),
        (
            "<rdml:value> 1.875 </rdml:value>",
            "<rdml:value>1e999</rdml:value>",
            "value",
        ),
    ] {
        let err = read_str(&edit(SMALL_1_3, from, to)).unwrap_err();
        assert!(
            matches!(&err, RdmlError::NotANumber { element: e, .. } if e == element),
            "{to}: {err:?}"
        );
    }
    let err = read_str(&edit(SMALL_1_3, "<fluor>0.8</fluor>", "<fluor>NaN</fluor>")).unwrap_err();
    assert!(err.to_string().contains(PLACE_N1), "{err}");
    assert!(err.to_string().starts_with("line 48:"), "{err}");
}

#[test]
fn references_must_be_declared() {
    let err = read_str(&edit(
        SMALL_1_3,
        "<tar id=\"N1\"/>\n          <cq>3.25",
        "<tar id=\"N2\"/>\n          <cq>3.25",
    ))
    .unwrap_err();
    assert_eq!(
        err,
        RdmlError::UnknownTarget {
            place: r#"experiment "E" run "R" reaction 15"#.into(),
            target: "N2".into()
        }
    );
    let err = read_str(&edit(
        SMALL_1_3,
        "<sample id=\"NTC\"/>",
        "<sample id=\"NTC2\"/>",
    ))
    .unwrap_err();
    assert_eq!(
        err,
        RdmlError::UnknownSample {
            place: r#"experiment "E" run "R" reaction 96"#.into(),
            sample: "NTC2".into()
        }
    );
    let err = read_str(&edit(
        SMALL_1_3,
        "<dyeId id=\"HEX\"/>",
        "<dyeId id=\"ROX\"/>",
    ))
    .unwrap_err();
    assert!(
        matches!(&err, RdmlError::UnknownDye { dye, .. } if dye == "ROX"),
        "{err:?}"
    );
}

#[test]
fn ids_must_be_unique_where_rdml_says_so() {
    let err = read_str(&edit(SMALL_1_3, "<react id=\"96\">", "<react id=\"15\">")).unwrap_err();
    assert_eq!(
        err,
        RdmlError::DuplicateId {
            place: r#"experiment "E" run "R""#.into(),
            kind: "reaction",
            id: "15".into()
        }
    );
    let err = read_str(&edit(
        SMALL_1_3,
        "<sample id=\"NTC\"><type>",
        "<sample id=\"S1\"><type>",
    ))
    .unwrap_err();
    assert!(
        matches!(&err, RdmlError::DuplicateId { kind: "sample", id, .. } if id == "S1"),
        "{err:?}"
    );
    let err = read_str(&edit(
        SMALL_1_3,
        "<rdml:tar id=\"IC\"/>",
        "<rdml:tar id=\"N1\"/>",
    ))
    .unwrap_err();
    assert!(
        matches!(&err, RdmlError::DuplicateId { kind: "target", .. }),
        "{err:?}"
    );
    let err = read_str(&edit(SMALL_1_3, "<run id=\"free\">", "<run id=\"R\">")).unwrap_err();
    assert!(
        matches!(&err, RdmlError::DuplicateId { kind: "run", .. }),
        "{err:?}"
    );
}

#[test]
fn broken_structure_is_refused() {
    let cases: &[(&str, &str, &str)] = &[
        ("<sample id=\"S1\"/>", "", "sample"),
        ("<tar id=\"N1\"/>\n          <cq>3.25", "<cq>3.25", "tar"),
        ("<cyc>4</cyc>", "", "cyc"),
        ("<fluor>3.2</fluor>", "", "fluor"),
        ("<type>ref</type>", "", "type"),
        ("<react id=\"96\">", "<react>", "id"),
        (
            "<pcrFormat><rows>8</rows><columns>12</columns><rowLabel>ABC</rowLabel><columnLabel>123</columnLabel></pcrFormat>",
            "",
            "pcrFormat",
        ),
    ];
    for (from, to, what) in cases {
        let err = read_str(&edit(SMALL_1_3, from, to)).unwrap_err();
        assert!(
            matches!(&err, RdmlError::Missing { what: w, .. } if w.contains(what)),
            "{from}: {err:?}"
        );
    }
    let err = read_str(&edit(SMALL_1_3, "<cq>3.25</cq>", "<cq>3.25</cq><cq>4</cq>")).unwrap_err();
    assert!(
        matches!(&err, RdmlError::Repeated { element, .. } if element == "cq"),
        "{err:?}"
    );
    let err = read_str(&edit(SMALL_1_3, "<cq>3.25</cq>", "<cq>3.<b>2</b>5</cq>")).unwrap_err();
    assert!(matches!(&err, RdmlError::Unexpected { .. }), "{err:?}");
    let err = read_str(&edit(SMALL_1_3, "<cq>3.25</cq>", "3.25")).unwrap_err();
    assert!(matches!(&err, RdmlError::Unexpected { .. }), "{err:?}");
    for (from, to) in [
        ("<rows>8</rows>", "<rows>0</rows>"),
        ("<columns>12</columns>", "<columns>-1</columns>"),
        ("<rowLabel>ABC</rowLabel>", "<rowLabel>abc</rowLabel>"),
    ] {
        let err = read_str(&edit(SMALL_1_3, from, to)).unwrap_err();
        assert!(
            matches!(&err, RdmlError::BadPcrFormat { .. }),
            "{to}: {err:?}"
        );
    }
    for id in ["0", "B3", "-2", "99999999999"] {
        let err = read_str(&edit(
            SMALL_1_3,
            "<react id=\"96\">",
            &format!("<react id=\"{id}\">"),
        ))
        .unwrap_err();
        assert!(
            matches!(&err, RdmlError::BadReactionId { .. }),
            "{id}: {err:?}"
        );
    }
}

#[test]
fn malformed_xml_is_refused_with_a_line() {
    let err = read_str(&edit(SMALL_1_3, "</rdml:data>", "</data>")).unwrap_err();
    assert!(matches!(&err, RdmlError::Xml { line: 63, .. }), "{err:?}");
    let err = read_str(&edit(SMALL_1_3, "Notes &amp; more", "Notes &bogus; more")).unwrap_err();
    assert!(matches!(&err, RdmlError::Xml { line: 10, .. }), "{err:?}");
    let err = read_str(&edit(SMALL_1_3, "<rdml:dye id", "<zz:dye id")).unwrap_err();
    assert!(
        matches!(&err, RdmlError::Xml { .. }),
        "undeclared prefix: {err:?}"
    );
    let err = read_str(&format!("{SMALL_1_3}<rdml version=\"1.3\"/>")).unwrap_err();
    assert!(matches!(&err, RdmlError::Xml { .. }), "two roots: {err:?}");
    assert!(matches!(read_str(""), Err(RdmlError::Xml { .. })));
    let err = rdml::read(b"<rdml version=\"1.3\">\xff</rdml>").unwrap_err();
    assert_eq!(err, RdmlError::NotUtf8 { line: 1, byte: 20 });
    let err = read_str("<html xmlns=\"http://www.rdml.org\"/>").unwrap_err();
    assert!(
        matches!(&err, RdmlError::NotRdml { found, .. } if found == "html"),
        "{err:?}"
    );
    let err = read_str("<rdml xmlns=\"urn:other\" version=\"1.3\"/>").unwrap_err();
    assert!(matches!(&err, RdmlError::NotRdml { .. }), "{err:?}");
}

#[test]
fn unsupported_versions_are_refused() {
    for version in ["9.9", "1.5", "2.0", ""] {
        let xml = edit(
            SMALL_1_3,
            "version=\"1.3\"",
            &format!("version=\"{version}\""),
        );
        assert_eq!(
            read_str(&xml),
            Err(RdmlError::UnsupportedVersion {
                version: version.into()
            })
        );
    }
    let xml = edit(SMALL_1_3, "version=\"1.3\" ", "");
    assert_eq!(
        read_str(&xml),
        Err(RdmlError::UnsupportedVersion {
            version: String::new()
        })
    );
}

#[test]
fn a_truncated_file_is_an_error_at_every_cut() {
    let xml = SMALL_1_3.as_bytes();
    let end = SMALL_1_3.rfind("</rdml>").unwrap() + "</rdml>".len();
    for cut in 0..end {
        let result = rdml::read(&xml[..cut]);
        assert!(result.is_err(), "cut at {cut}: {result:?}");
    }
    assert!(rdml::read(&xml[..end]).is_ok());

    let zipped = rdml::write(&read_str(SMALL_1_3).unwrap());
    for cut in 0..zipped.len() {
        let result = rdml::read(&zipped[..cut]);
        assert!(result.is_err(), "zip cut at {cut}");
    }

    let real = vermeulen("data_vermeulen_std_150000_15000.rdml");
    for cut in (0..real.len()).step_by(real.len() / 40).skip(1) {
        assert!(rdml::read(&real[..cut]).is_err(), "cut at {cut}");
    }
}

#[test]
fn a_zip_without_rdml_data_is_refused() {
    let zip = zip_with(&[("data.xml", SMALL_1_3.as_bytes()), ("readme.txt", b"hi")]);
    assert_eq!(
        rdml::read(&zip),
        Err(RdmlError::MissingRdmlData {
            entries: "data.xml, readme.txt".into()
        })
    );
    let zip = zip_with(&[]);
    assert!(matches!(
        rdml::read(&zip),
        Err(RdmlError::MissingRdmlData { .. })
    ));
    // Other entries beside rdml_data.xml are fine.
    let zip = zip_with(&[("notes.txt", b"x"), ("rdml_data.xml", SMALL_1_3.as_bytes())]);
    assert!(rdml::read(&zip).is_ok());
}

#[test]
fn oversized_xml_is_refused_before_it_is_read_whole() {
    let doc = read_str(SMALL_1_3).unwrap();
    let zipped = rdml::write(&doc);
    let xml_len = rdml::write_xml(&doc).len() as u64;
    assert!(rdml::read_with_limit(&zipped, xml_len).is_ok());
    assert_eq!(
        rdml::read_with_limit(&zipped, xml_len - 1),
        Err(RdmlError::TooLarge { limit: xml_len - 1 })
    );
    assert_eq!(
        rdml::read_with_limit(SMALL_1_3.as_bytes(), 100),
        Err(RdmlError::TooLarge { limit: 100 })
    );

    // A zip bomb whose headers lie: 1 MiB of white space that claims to be 10 bytes.
    let bomb_xml = format!("{}{}", " ".repeat(1 << 20), SMALL_1_3);
    let mut bomb = zip_with(&[("rdml_data.xml", bomb_xml.as_bytes())]);
    let real_size = (bomb_xml.len() as u32).to_le_bytes();
    let mut patched = 0;
    for i in 0..bomb.len().saturating_sub(4) {
        if bomb[i..i + 4] == real_size {
            bomb[i..i + 4].copy_from_slice(&10u32.to_le_bytes());
            patched += 1;
        }
    }
    assert_eq!(patched, 2, "local and central header sizes");
    let result = rdml::read_with_limit(&bomb, 64 * 1024);
    assert!(
        matches!(
            result,
            Err(RdmlError::TooLarge { .. } | RdmlError::Zip { .. })
        ),
        "{result:?}"
    );
}

#[test]
fn validate_refuses_what_rdml_cannot_carry() {
    let mut doc = read_str(SMALL_1_3).unwrap();
    assert_eq!(doc.validate(), Ok(()));
    doc.experiments[0].runs[0].reactions[0].data[0].fluorescence[2] = f64::NAN;
    assert!(matches!(doc.validate(), Err(RdmlError::NotFinite { .. })));
    // And what the writer makes of it is refused on reading, not silently accepted.
    assert!(matches!(
        rdml::read(&rdml::write(&doc)),
        Err(RdmlError::NotANumber { .. })
    ));

    let fresh = || read_str(SMALL_1_3).unwrap();
    let breakages: [fn(&mut Document); 6] = [
        |d| d.samples[0].id.clear(),
        |d| d.experiments[0].runs[0].id.clear(),
        |d| d.experiments[0].runs[0].reactions[0].id = 0,
        |d| d.experiments[0].runs[0].format.columns = 0,
        |d| d.experiments[0].runs[0].format.row_label = "abc".into(),
        |d| d.experiments[0].runs[0].format.rows = u32::MAX,
    ];
    for (i, breakage) in breakages.iter().enumerate() {
        let mut doc = fresh();
        breakage(&mut doc);
        assert!(
            matches!(doc.validate(), Err(RdmlError::Invalid { .. })),
            "breakage {i}: {:?}",
            doc.validate()
        );
        assert!(rdml::read(&rdml::write(&doc)).is_err(), "breakage {i}");
    }
}

/// Documents that pass `validate`, with text that needs escaping.
fn documents() -> impl Strategy<Value = Document> {
    let text = "[ -~éµ\t\n\r]{0,12}";
    let token = "[a-zA-Z0-9&<>\"';_-]{1,8}";
    let finite = prop_oneof![
        any::<f64>().prop_filter("finite", |v| v.is_finite()),
        -1e6..1e6f64,
    ];
    let data = (
        prop::option::of(finite.clone().prop_filter("not -1", |v| *v != -1.0)),
        prop::option::of(text),
        prop::option::of(finite.clone()),
        prop::option::of(finite.clone()),
        prop::option::of(finite.clone()),
        prop::collection::vec(finite.clone(), 0..8),
    );
    let reaction = (prop::collection::vec(data, 0..3), 0usize..3);
    let run = (
        prop::option::of(text),
        prop::option::of(token),
        prop_oneof![Just((8u32, 12u32)), Just((0, 1)), (1u32..40, 1u32..40)],
        prop::sample::select(vec!["ABC", "123", "A1a1"]),
        prop::collection::vec(reaction, 0..4),
    );
    let sample = (token, prop::option::of((finite, token)));
    (
        prop::collection::vec(token, 1..3),
        prop::collection::vec(sample, 1..4),
        prop::collection::vec((token, 0usize..4), 1..4),
        prop::collection::vec(prop::collection::vec(run, 0..3), 0..3),
    )
        .prop_map(|(dyes, samples, targets, experiments)| {
            // Ids are made unique by an index; the generated part tests escaping.
            let dyes: Vec<Dye> = dyes
                .iter()
                .enumerate()
                .map(|(i, d)| Dye {
                    id: format!("{d}{i}"),
                })
                .collect();
            let samples: Vec<Sample> = samples
                .into_iter()
                .enumerate()
                .map(|(i, (kind, quantity))| Sample {
                    id: format!("s<{i}>"),
                    kind,
                    quantity: quantity.map(|(value, unit)| Quantity { value, unit }),
                })
                .collect();
            let targets: Vec<Target> = targets
                .into_iter()
                .enumerate()
                .map(|(i, (kind, dye))| Target {
                    id: format!("t&{i}"),
                    dye_id: dyes[dye % dyes.len()].id.clone(),
                    kind,
                })
                .collect();
            let experiments = experiments
                .into_iter()
                .enumerate()
                .map(|(e, runs)| Experiment {
                    id: format!("e\"{e}"),
                    runs: runs
                        .into_iter()
                        .enumerate()
                        .map(
                            |(r, (instrument, method, (rows, columns), label, reactions))| Run {
                                id: format!("r'{r}"),
                                instrument,
                                cq_detection_method: method,
                                format: PcrFormat {
                                    rows,
                                    columns,
                                    row_label: label.into(),
                                    column_label: label.into(),
                                },
                                reactions: reactions
                                    .into_iter()
                                    .enumerate()
                                    .map(|(k, (data, sample))| Reaction {
                                        id: k as u32 * 7 + 1,
                                        sample_id: samples[sample % samples.len()].id.clone(),
                                        data: data
                                            .into_iter()
                                            .zip(&targets)
                                            .map(
                                                |(
                                                    (
                                                        cq,
                                                        excluded,
                                                        threshold,
                                                        background,
                                                        slope,
                                                        fluorescence,
                                                    ),
                                                    t,
                                                )| {
                                                    ReactionData {
                                                        target_id: t.id.clone(),
                                                        cq,
                                                        excluded,
                                                        threshold,
                                                        background,
                                                        background_slope: slope,
                                                        fluorescence,
                                                    }
                                                },
                                            )
                                            .collect(),
                                    })
                                    .collect(),
                            },
                        )
                        .collect(),
                })
                .collect();
            Document {
                version: "1.3".into(),
                dyes,
                samples,
                targets,
                experiments,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// write → read gives the document back, bit for bit in every number.
    #[test]
    fn write_then_read_is_the_identity(doc in documents()) {
        prop_assert_eq!(doc.validate(), Ok(()));
        let back = rdml::read(&rdml::write(&doc));
        prop_assert_eq!(back.as_ref(), Ok(&doc));
        let bits = |d: &Document| -> Vec<u64> {
            d.reactions().flat_map(|(_, _, r)| r.data.iter().flat_map(|d| d.fluorescence.iter().map(|v| v.to_bits()))).collect()
        };
        prop_assert_eq!(bits(&back.unwrap()), bits(&doc));
    }
}
