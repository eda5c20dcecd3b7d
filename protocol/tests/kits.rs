//! Every kit file shipped in `kits/` parses, and the layouts they give are
//! the ones the lab expects.

use std::fs;
use std::path::{Path, PathBuf};

use pcrd_protocol::domain::{ControlKind, Layout, PlateFormat, Well};
use pcrd_protocol::kit::KitDefinition;

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

fn w(s: &str) -> Well {
    s.parse().expect("test well names are valid")
}

#[test]
fn every_kit_file_parses_and_is_named_after_its_id() {
    let files = kit_files();
    assert!(
        files.len() >= 2,
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
