//! Every kit file shipped in `kits/` parses, the layouts they give are the
//! ones the lab expects, their decision tables are total, and a kit file
//! with a gap in its table or a bad field is refused with the field named.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use pcrd_protocol::analysis::Ct;
use pcrd_protocol::domain::{ControlKind, Layout, PlateFormat, Well};
use pcrd_protocol::interpret::{CutoffOp, DecidedBy, Target, TargetKind, TargetState};
use pcrd_protocol::kit::{ChannelError, KitDefinition, KitError, ProblemKind};

const KITS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../kits");

fn kit_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(KITS_DIR)
        .expect("kits directory is readable")
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    files.sort();
    files
}

fn load(path: &Path) -> KitDefinition {
    let text = fs::read_to_string(path).expect("kit file is readable");
    KitDefinition::from_toml_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn load_by_id(id: &str) -> KitDefinition {
    kit_files()
        .iter()
        .map(|p| load(p))
        .find(|kit| kit.id.as_str() == id)
        .unwrap_or_else(|| panic!("no kit with id {id} in {KITS_DIR}"))
}

fn text_of(id: &str) -> String {
    fs::read_to_string(Path::new(KITS_DIR).join(format!("{id}.toml"))).expect("kit file")
}

fn w(s: &str) -> Well {
    s.parse().expect("test well names are valid")
}

#[test]
fn every_kit_file_parses_and_is_named_after_its_id() {
    let files = kit_files();
    assert!(
        files.len() >= 3,
        "expected the shipped kits, found {files:?}"
    );
    let mut keys = Vec::new();
    for path in &files {
        let kit = load(path);
        // The file name is the id, so a kit can be found without parsing
        // every file, and two files cannot claim the same id.
        assert_eq!(
            path.file_stem().and_then(|s| s.to_str()),
            Some(kit.id.as_str()),
            "{}",
            path.display()
        );
        assert!(kit.formats().next().is_some());
        for format in kit.formats() {
            let template = kit.template(format).expect("listed format has a template");
            assert_eq!(template.format, format);
            // Every plate carries at least a positive and a no-template
            // control; a run without them cannot be interpreted.
            for needed in [ControlKind::PositiveControl, ControlKind::NoTemplateControl] {
                assert!(
                    template.controls.values().any(|&k| k == needed),
                    "{}: {format}-well plate has no {needed}",
                    kit.key()
                );
            }
        }
        keys.push(kit.key());
    }
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), files.len(), "duplicate kit keys: {keys:?}");
}

#[test]
fn sarscov2_kit_leaves_94_sample_wells_on_a_96_well_plate() {
    let kit = load_by_id("sarscov2-orf1ab-n-ic");
    assert_eq!(kit.key(), "sarscov2-orf1ab-n-ic@1.0");
    let template = kit
        .template(PlateFormat::Wells96)
        .expect("96-well template");
    let layout = Layout::from_template(template);
    assert_eq!(layout.free_count(), 94);
    assert_eq!(layout.control_count(), 2);
    assert_eq!(
        layout.controls().collect::<Vec<_>>(),
        [
            (w("G12"), ControlKind::NoTemplateControl),
            (w("H12"), ControlKind::PositiveControl),
        ]
    );
}

#[test]
fn sarscov2_384_controls_do_not_survive_a_rotation() {
    let kit = load_by_id("sarscov2-orf1ab-n-ic");
    let template = kit
        .template(PlateFormat::Wells384)
        .expect("384-well template");
    let kinds: Vec<ControlKind> = template.controls.values().copied().collect();
    assert_eq!(
        kinds
            .iter()
            .filter(|&&k| k == ControlKind::PositiveControl)
            .count(),
        2
    );
    assert_eq!(
        kinds
            .iter()
            .filter(|&&k| k == ControlKind::NoTemplateControl)
            .count(),
        2
    );
    for (&well, kind) in &template.controls {
        let rotated = Well::new(15 - well.row(), 23 - well.column());
        assert_eq!(
            template.controls.get(&rotated),
            None,
            "{kind} in {well} would land on control well {rotated} when the plate is rotated"
        );
    }
    assert_eq!(Layout::from_template(template).free_count(), 380);
}

#[test]
fn cdc_kit_has_three_controls_and_93_sample_wells() {
    let kit = load_by_id("cdc-n1-n2-rp");
    assert_eq!(kit.formats().collect::<Vec<_>>(), [PlateFormat::Wells96]);
    let layout = Layout::from_template(kit.template(PlateFormat::Wells96).expect("96"));
    assert_eq!(layout.free_count(), 93);
    assert_eq!(
        layout.controls().collect::<Vec<_>>(),
        [
            (w("F12"), ControlKind::ExtractionNegativeControl),
            (w("G12"), ControlKind::NoTemplateControl),
            (w("H12"), ControlKind::PositiveControl),
        ]
    );
}

#[test]
fn taqpath_style_kit_layouts() {
    let kit = load_by_id("sarscov2-orf1ab-n-s-ms2");
    assert_eq!(kit.key(), "sarscov2-orf1ab-n-s-ms2@1.0");
    let l96 = Layout::from_template(kit.template(PlateFormat::Wells96).expect("96"));
    assert_eq!(l96.free_count(), 93);
    assert_eq!(
        l96.controls().collect::<Vec<_>>(),
        [
            (w("F12"), ControlKind::ExtractionNegativeControl),
            (w("G12"), ControlKind::NoTemplateControl),
            (w("H12"), ControlKind::PositiveControl),
        ]
    );
    let t384 = kit.template(PlateFormat::Wells384).expect("384");
    assert_eq!(Layout::from_template(t384).free_count(), 378);
    for kind in ControlKind::ALL {
        assert_eq!(t384.controls.values().filter(|&&k| k == kind).count(), 2);
    }
}

#[test]
fn no_shipped_layout_survives_a_rotation() {
    for path in kit_files() {
        let kit = load(&path);
        for format in kit.formats() {
            let template = kit.template(format).expect("template");
            let (rows, columns) = (format.rows(), format.columns());
            for (&well, kind) in &template.controls {
                let rotated = Well::new(rows - 1 - well.row(), columns - 1 - well.column());
                assert_eq!(
                    template.controls.get(&rotated),
                    None,
                    "{}: {kind} in {well} would land on control well {rotated} when the plate is rotated",
                    kit.key()
                );
            }
        }
    }
}

#[test]
fn targets_in_channel_order_and_channel_lookup() {
    let names = |kit: &KitDefinition| -> Vec<(String, String)> {
        kit.targets()
            .iter()
            .map(|t| (t.name.clone(), t.channel.clone()))
            .collect()
    };
    let pair = |a: &str, b: &str| (a.to_owned(), b.to_owned());
    let taqpath = load_by_id("sarscov2-orf1ab-n-s-ms2");
    assert_eq!(
        names(&taqpath),
        [
            pair("ORF1ab", "FAM"),
            pair("N", "VIC"),
            pair("S", "ABY"),
            pair("MS2", "JUN")
        ]
    );
    assert_eq!(
        taqpath.target_for_channel("jun").map(|t| t.name.as_str()),
        Some("MS2")
    );
    assert_eq!(
        taqpath.check_channels(["FAM", "VIC", "ABY", "JUN", "ROX"]),
        Ok(())
    );
    let e = taqpath.check_channels(["FAM", "VIC", "ABY"]).unwrap_err();
    assert!(matches!(e, ChannelError::Missing { ref missing, .. } if missing.len() == 1));
    assert!(e.to_string().contains("JUN (target MS2)"), "{e}");

    let two = load_by_id("sarscov2-orf1ab-n-ic");
    assert_eq!(
        names(&two),
        [pair("ORF1ab", "FAM"), pair("N", "VIC"), pair("IC", "CY5")]
    );
    // Bio-Rad calls the VIC channel HEX.
    assert_eq!(two.check_channels(["FAM", "HEX", "Cy5"]), Ok(()));
    assert_eq!(
        two.target_for_channel("HEX").map(|t| t.name.as_str()),
        Some("N")
    );

    let cdc = load_by_id("cdc-n1-n2-rp");
    assert_eq!(
        names(&cdc),
        [
            pair("N1", "FAM-N1"),
            pair("N2", "FAM-N2"),
            pair("RP", "FAM-RP")
        ]
    );
    assert_eq!(cdc.max_pool_size().map(|p| p.get()), Some(4));
    assert_eq!(cdc.result_loinc(), "94500-6");
}

#[test]
fn shipped_cutoffs_are_the_documented_ones() {
    let cutoffs = |id: &str| -> Vec<(String, CutoffOp, String, Option<String>)> {
        load_by_id(id)
            .targets()
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    t.cutoff.op,
                    t.cutoff.ct.to_string(),
                    t.grey_zone.map(|z| z.to_string()),
                )
            })
            .collect()
    };
    for (name, op, ct, grey) in cutoffs("cdc-n1-n2-rp") {
        assert_eq!(
            (op, ct.as_str(), grey),
            (CutoffOp::Below, "40.00", None),
            "{name}"
        );
    }
    for (name, op, ct, grey) in cutoffs("sarscov2-orf1ab-n-ic") {
        assert_eq!(
            (op, ct.as_str(), grey),
            (CutoffOp::AtOrBelow, "40.00", None),
            "{name}"
        );
    }
    for (name, op, ct, grey) in cutoffs("sarscov2-orf1ab-n-s-ms2") {
        let expected_grey = (name != "MS2").then(|| ">= 37.00".to_owned());
        assert_eq!(
            (op, ct.as_str(), grey),
            (CutoffOp::Below, "37.00", expected_grey),
            "{name}"
        );
    }
}

/// A Ct that puts `target` in `state`, from the target's own cut-off and
/// grey zone.
fn ct_for(target: &Target, state: TargetState) -> Ct {
    let cutoff = target.cutoff.ct.as_f64();
    match state {
        TargetState::Negative => Ct::Undetermined,
        TargetState::Positive => match target.cutoff.op {
            CutoffOp::Below => Ct::Determined(cutoff - 0.01),
            CutoffOp::AtOrBelow => Ct::Determined(cutoff),
        },
        TargetState::Grey => Ct::Determined(target.grey_zone.expect("grey zone").low.as_f64()),
    }
}

/// Independently of the load-time check: every combination of target
/// states, built as Cts and run through the public API, reaches a rule, and
/// every rule is reached by some combination.
#[test]
fn every_shipped_rule_table_is_total() {
    for path in kit_files() {
        let kit = load(&path);
        let targets = kit.targets();
        let mut combinations: Vec<Vec<TargetState>> = vec![Vec::new()];
        for target in targets {
            combinations = combinations
                .into_iter()
                .flat_map(|prefix| {
                    target.possible_states().iter().map(move |&s| {
                        let mut next = prefix.clone();
                        next.push(s);
                        next
                    })
                })
                .collect();
        }
        let mut reached = BTreeSet::new();
        for states in &combinations {
            let cts: BTreeMap<String, Ct> = targets
                .iter()
                .zip(states)
                .map(|(t, &s)| (t.name.clone(), ct_for(t, s)))
                .collect();
            let call = kit
                .interpret_sample(&cts)
                .unwrap_or_else(|e| panic!("{}: {states:?}: {e}", kit.key()));
            let got: Vec<TargetState> = call.targets.iter().map(|t| t.state).collect();
            assert_eq!(
                &got,
                states,
                "{}: the Cts give the intended states",
                kit.key()
            );
            let DecidedBy::Rule { index, .. } = call.decided_by else {
                panic!("{}: decided by {:?}", kit.key(), call.decided_by)
            };
            reached.insert(index);
            // A detected call needs a positive viral target; a not-detected
            // one needs none positive.
            let viral_positive = targets
                .iter()
                .zip(states)
                .filter(|(t, s)| t.kind == TargetKind::Viral && **s == TargetState::Positive)
                .count();
            match call.call {
                pcrd_protocol::interpret::Call::Detected => assert!(viral_positive > 0),
                pcrd_protocol::interpret::Call::NotDetected => assert_eq!(viral_positive, 0),
                _ => {}
            }
        }
        let all: BTreeSet<usize> = (0..kit.rules().len()).collect();
        assert_eq!(reached, all, "{}: every rule is reachable", kit.key());
        assert!(kit.rules().last().expect("rules").is_catch_all());
    }
}

fn refused(text: &str) -> KitError {
    KitDefinition::from_toml_str(text).expect_err("the kit must be refused")
}

#[test]
fn a_table_with_an_uncovered_combination_is_refused_naming_it() {
    // The TaqPath-style kit without its catch-all and without the grey rule:
    // "all four undetermined" and grey-only specimens would get no call.
    let text = text_of("sarscov2-orf1ab-n-s-ms2");
    let catch_all = "[[rules]]\nname = \"nothing amplified, MS2 failed\"\ncall = \"invalid\"\naction = \"Re-extract from the residual specimen and re-test; if still invalid, ask for a new specimen.\"\n";
    assert!(text.contains(catch_all));
    let e = refused(&text.replacen(catch_all, "", 1));
    let KitError::Invalid { kit, problems } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(kit, "sarscov2-orf1ab-n-s-ms2");
    assert_eq!(problems[0].field, "rules");
    assert_eq!(
        problems[0].problem,
        ProblemKind::Uncovered {
            combination: "ORF1ab=negative, N=negative, S=negative, MS2=negative".into(),
            more: 0
        }
    );
    assert!(
        problems
            .iter()
            .any(|p| p.problem == ProblemKind::NoCatchAll)
    );
    assert!(
        e.to_string().contains(
            "rules: the combination ORF1ab=negative, N=negative, S=negative, MS2=negative reaches no rule"
        ),
        "{e}"
    );

    // Remove the grey rule too: the first uncovered combination now has a
    // grey target, and more are counted.
    let grey_rule = text
        .split("[[rules]]")
        .find(|r| r.contains("late amplification only"))
        .expect("grey rule")
        .to_owned();
    let text = text
        .replacen(catch_all, "", 1)
        .replacen(&format!("[[rules]]{grey_rule}"), "", 1);
    let e = refused(&text);
    let message = e.to_string();
    assert!(
        message.contains("the combination ORF1ab=grey, N=grey, S=grey, MS2=positive reaches no rule (nor do 14 other combinations)"),
        "{message}"
    );
}

#[test]
fn a_bad_field_is_refused_naming_kit_and_field() {
    let cdc = text_of("cdc-n1-n2-rp");
    let taq = text_of("sarscov2-orf1ab-n-s-ms2");
    let two = text_of("sarscov2-orf1ab-n-ic");
    let cases: &[(&str, &str, &str, &str)] = &[
        // (kit text, replace, with, "field: words" the message must hold)
        (
            &cdc,
            "ct = 40.0 }",
            "ct = 40.004 }",
            "targets[0].cutoff.ct: 40.004 is not a Ct",
        ),
        (
            &cdc,
            "loinc = \"94311-8\"",
            "loinc = \"94311-9\"",
            "targets[0].loinc: LOINC code 94311-9 fails its check digit (expected 8)",
        ),
        (
            &cdc,
            "loinc = \"94312-6\"\n",
            "",
            "targets[1].loinc: a viral target needs the LOINC code",
        ),
        (
            &cdc,
            "result_loinc = \"94500-6\"",
            "result_loinc = \"COVID\"",
            "result_loinc: \"COVID\" is not a LOINC code",
        ),
        (
            &cdc,
            "name = \"N2\"",
            "name = \"n1\"",
            "targets[1].name: \"n1\" is already used at targets[0]",
        ),
        (
            &cdc,
            "channel = \"FAM-N2\"",
            "channel = \"FAM N2\"",
            "targets[1].channel: \"FAM N2\" is not a valid name",
        ),
        (
            &cdc,
            "targets = { RP = \"positive\" }",
            "targets = { RNP = \"positive\" }",
            "rules[2].targets.RNP: \"RNP\" is not a target of this kit; its targets are N1, N2, RP",
        ),
        (
            &cdc,
            "targets = { RP = \"positive\" }",
            "targets = { RP = \"grey\" }",
            "rules[2].targets.RP: target RP has no grey zone",
        ),
        (
            &cdc,
            "viral_positive = \"1\"",
            "viral_positive = \"3\"",
            "rules[1].viral_positive: \"3\" can never hold: the kit has 2 viral targets",
        ),
        (
            &cdc,
            "viral_positive = \"1\"",
            "viral_positive = \"one\"",
            "rules[1].viral_positive: \"one\" is not a count",
        ),
        (
            &cdc,
            "action = \"Report 2019-nCoV detected.\"",
            "action = \" \"",
            "rules[0].action: must not be empty",
        ),
        (
            &cdc,
            "name = \"one of N1, N2 positive\"",
            "name = \"N1 and N2 positive\"",
            "rules[1].name: rule name \"N1 and N2 positive\" is already used by rules[0]",
        ),
        (
            &cdc,
            "viral_positive = \"1\"",
            "viral_positive = \"2\"",
            "rules[1]: rule \"one of N1, N2 positive\" is never reached",
        ),
        (
            &cdc,
            "[controls.extraction_negative_control]",
            "[controls.spare]",
            "spare",
        ),
        (
            &cdc,
            "RP = \"positive\"\n\n# Controls at",
            "\n# Controls at",
            "controls.extraction_negative_control: no expectation for target RP",
        ),
        (
            &cdc,
            "N1 = \"negative\"\nN2 = \"negative\"\nRP = \"negative\"",
            "N1 = \"negative\"\nN2 = \"negative\"\nRP = \"negative\"\nN3 = \"negative\"",
            "controls.no_template_control.N3: \"N3\" is not a target of this kit",
        ),
        (
            &taq,
            "grey_zone = { low = 37.0 }   # decision 1: determined at Ct >= 37",
            "grey_zone = { low = 36.0 }",
            "targets[0].grey_zone: grey zone starts at 36.00, below the cut-off 37.00",
        ),
        (
            &taq,
            "grey_zone = { low = 37.0 }   # decision 1: determined at Ct >= 37",
            "grey_zone = { low = 38.0, high = 38.0 }",
            "targets[0].grey_zone: grey zone [38.00, 38.00) is empty",
        ),
        (
            &taq,
            "MS2 = { expect = \"positive\", max = 37.0 }",
            "MS2 = { expect = \"positive\", min = 38.0, max = 37.0 }",
            "controls.extraction_negative_control.MS2: min 38.00 is above max 37.00",
        ),
        (
            &taq,
            "MS2 = { expect = \"positive\", max = 37.0 }",
            "MS2 = { expect = \"positive\", above = 37.0 }",
            "controls.extraction_negative_control.MS2.above: `above` does not apply to expect = \"positive\"",
        ),
        (
            &taq,
            "channel = \"JUN\"",
            "channel = \"fam\"",
            "targets[3].channel: \"fam\" is already used at targets[0].channel",
        ),
        (
            &two,
            "channel_aliases = [\"HEX\"]",
            "channel_aliases = [\"cy5\"]",
            "targets[2].channel: \"CY5\" is already used at targets[1].channel_aliases[0]",
        ),
        (
            &two,
            "kind = \"viral\"",
            "kind = \"internal_control\"",
            "rules[0].viral_positive: \"2\" can never hold: the kit has 1 viral targets",
        ),
        (
            &two,
            "cutoff = { op = \"<=\", ct = 40.0 }   # UNCONFIRMED IC cut-off",
            "cutoff = { op = \"<=\", ct = 40.0 }\ninstrument_tolerance = 0.0",
            "targets[2].instrument_tolerance: 0 is out of range",
        ),
        (
            &two,
            "cutoff = { op = \"<=\", ct = 40.0 }   # UNCONFIRMED IC cut-off",
            "cutoff = { op = \"<=\", ct = 40.0 }\nthreshold = -0.1",
            "targets[2].threshold: -0.1 is out of range",
        ),
        (
            &two,
            "[controls.no_template_control]",
            "[controls.extraction_negative_control]",
            "controls: the kit's plates carry a no_template_control but there is no [controls.no_template_control] table",
        ),
    ];
    for (text, from, to, expected) in cases {
        assert!(text.contains(from), "{from:?} is not in the kit text");
        let e = refused(&text.replacen(from, to, 1));
        let message = e.to_string();
        assert!(message.contains(expected), "{from:?} -> {to:?}: {message}");
        let id = text
            .lines()
            .find_map(|l| l.strip_prefix("id = "))
            .expect("id line")
            .trim_matches('"');
        assert!(
            message.contains(&format!("\"{id}\"")),
            "{message} names the kit"
        );
    }
}

#[test]
fn optional_target_keys_parse() {
    let text = text_of("sarscov2-orf1ab-n-ic").replacen(
        "cutoff = { op = \"<=\", ct = 40.0 }   # UNCONFIRMED IC cut-off",
        "cutoff = { op = \"<=\", ct = 40.0 }\nct_method = \"cp\"\nthreshold = 0.15\ninstrument_tolerance = 0.2",
        1,
    );
    let kit = KitDefinition::from_toml_str(&text).expect("valid");
    let ic = kit.target("IC").expect("IC");
    assert_eq!(ic.ct_method, Some(pcrd_protocol::analysis::Method::Cp));
    assert_eq!(ic.threshold, Some(0.15));
    assert_eq!(ic.instrument_tolerance, 0.2);
    assert_eq!(kit.target("N").expect("N").ct_method, None);
    assert_eq!(
        kit.target("N").expect("N").instrument_tolerance,
        Target::DEFAULT_INSTRUMENT_TOLERANCE
    );
}
