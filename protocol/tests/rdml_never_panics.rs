//! The RDML reader answers any bytes with a document or an error, never a panic: random
//! bytes, random bytes behind a zip signature, and a small valid document (as XML and as
//! a zip) with bytes flipped, cut off, or text inserted.

use pcrd_protocol::rdml;
use proptest::prelude::*;

const SMALL_1_3: &str = include_str!("../src/rdml/testdata/small_1_3.xml");
const SMALL_1_0: &str = include_str!("../src/rdml/testdata/small_1_0.xml");

/// Bits of RDML and XML worth inserting: they make the mutants reach deeper than
/// random bytes would.
const SNIPPETS: &[&str] = &[
    "<",
    ">",
    "/>",
    "</",
    "&",
    "&amp;",
    "&#0;",
    "&#x110000;",
    "&bogus;",
    "\"",
    "<![CDATA[",
    "]]>",
    "<!--",
    "-->",
    "<?pi?>",
    "<!DOCTYPE rdml [<!ENTITY a \"b\">]>",
    "<adp>",
    "</adp>",
    "<cyc>1</cyc>",
    "<cyc>0.5</cyc>",
    "<fluor>NaN</fluor>",
    "<cq>-1</cq>",
    "<data><tar id=\"N1\"/></data>",
    "<react id=\"2\"><sample id=\"S1\"/></react>",
    "<x:y>",
    "xmlns=\"urn:x\"",
    "xmlns:rdml=\"\"",
    "rdml:",
    "id=\"\"",
    "-1",
    "1e308",
    "\u{feff}",
    "\u{0}",
    "é",
    "\u{10FFFF}",
    "\n",
];

fn mutate(base: &[u8], edits: &[(usize, u8, usize)]) -> Vec<u8> {
    let mut bytes = base.to_vec();
    for &(at, byte, kind) in edits {
        if bytes.is_empty() {
            break;
        }
        let at = at % bytes.len();
        match kind % 4 {
            0 => bytes[at] ^= byte | 1,
            1 => bytes.truncate(at),
            2 => {
                let snippet = SNIPPETS[usize::from(byte) % SNIPPETS.len()];
                bytes.splice(at..at, snippet.bytes());
            }
            _ => {
                bytes.remove(at);
            }
        }
    }
    bytes
}

fn edits() -> impl Strategy<Value = Vec<(usize, u8, usize)>> {
    prop::collection::vec((any::<usize>(), any::<u8>(), any::<usize>()), 1..6)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = rdml::read(&bytes);
    }

    #[test]
    fn arbitrary_bytes_behind_a_zip_signature_never_panic(
        magic in prop::sample::select(vec![b"PK\x03\x04".as_slice(), b"PK\x05\x06".as_slice()]),
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        let input = [magic, bytes.as_slice()].concat();
        let _ = rdml::read(&input);
    }

    #[test]
    fn mutated_xml_never_panics(edits in edits(), old in any::<bool>()) {
        let base = if old { SMALL_1_0 } else { SMALL_1_3 };
        let input = mutate(base.as_bytes(), &edits);
        let _ = rdml::read(&input);
    }

    #[test]
    fn mutated_zips_never_panic(edits in edits()) {
        let doc = rdml::read(SMALL_1_3.as_bytes()).expect("the fixture reads");
        let input = mutate(&rdml::write(&doc), &edits);
        let _ = rdml::read(&input);
    }
}

/// The mutation helper does change its input (otherwise the tests above would prove
/// nothing), and some mutants of the fixture are refused.
#[test]
fn mutants_differ_from_the_original_and_some_are_refused() {
    let base = SMALL_1_3.as_bytes();
    let flipped = mutate(base, &[(100, 0x20, 0)]);
    assert_ne!(flipped, base);
    let cut = mutate(base, &[(500, 0, 1)]);
    assert_eq!(cut.len(), 500);
    assert!(rdml::read(&cut).is_err());
    let inserted = mutate(base, &[(700, 0, 2)]);
    assert_eq!(inserted.len(), base.len() + 1);
    assert!(rdml::read(&inserted).is_err(), "a stray '<'");
}
