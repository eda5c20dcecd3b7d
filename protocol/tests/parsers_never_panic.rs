//! Every parser in the core answers arbitrary input with a value or an error, never a
//! panic: kit files, well names, barcodes, pool sizes, priorities, plate formats, and
//! the JSON and postcard forms of layouts.

use pcrd_protocol::domain::{Barcode, Layout, PlateFormat, PoolSize, Priority, Well};
use pcrd_protocol::kit::KitDefinition;
use proptest::prelude::*;

const KIT: &str = include_str!("../../kits/sarscov2-orf1ab-n-ic.toml");

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn text_parsers_never_panic(text in "\\PC{0,64}") {
        let _ = Barcode::new(text.clone());
        let _ = text.parse::<Well>();
        let _ = Well::parse_in(&text, PlateFormat::Wells384);
        let _ = text.parse::<PoolSize>();
        let _ = text.parse::<Priority>();
        let _ = text.parse::<PlateFormat>();
        let _ = KitDefinition::from_toml_str(&text);
        let _ = serde_json::from_str::<Layout>(&text);
    }

    #[test]
    fn mutated_kit_files_never_panic(at in 0usize..2000, junk in "[\\[\\]=\"A-Z0-9_.\\n ]{0,10}") {
        let mut text = KIT.to_string();
        let cut = text.char_indices().map(|(i, _)| i).nth(at % KIT.len()).unwrap_or(0);
        text.insert_str(cut, &junk);
        let _ = KitDefinition::from_toml_str(&text);
    }

    #[test]
    fn layout_json_with_arbitrary_wells_never_panics(wells in prop::collection::vec(("\\PC{0,5}", "[A-Z0-9-]{0,8}"), 0..12), format in prop_oneof![Just(96u16), Just(384), any::<u16>()]) {
        let mut map = serde_json::Map::new();
        for (well, barcode) in wells {
            map.insert(well, serde_json::json!({"kind": "sample", "barcode": barcode}));
        }
        let json = serde_json::json!({"format": format, "wells": map});
        let _ = serde_json::from_value::<Layout>(json);
    }
}
