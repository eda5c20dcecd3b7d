//! How plates are derived from other plates: a 1:1 transfer (extraction
//! plate to PCR plate) or four 96-well plates stamped into one 384-well plate.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{Barcode, Layout, PlateFormat, Well, WellContent};

/// One of the four 96-well quadrants of a 384-well plate. Q1 holds A1, Q2 A2, Q3 B1, Q4 B2 (the standard interleaved stamp: 96-well (r,c) of quadrant q goes to 384-well (2r + q/2, 2c + q%2) with q = 0..3).
///
/// Interleaved rather than block quadrants because a 96-channel head with
/// 9 mm tip spacing lands on every other well of a 4.5 mm-pitch 384 plate;
/// shifting the head by one well gives the next quadrant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct Quadrant(u8);

impl Quadrant {
    /// Q1..Q4 in order.
    pub const ALL: [Quadrant; 4] = [Quadrant(1), Quadrant(2), Quadrant(3), Quadrant(4)];

    /// Quadrant `n`, for `n` in 1..=4.
    pub fn new(n: u8) -> Result<Self, LineageError> {
        if (1..=4).contains(&n) {
            Ok(Quadrant(n))
        } else {
            Err(LineageError::QuadrantOutOfRange { value: n })
        }
    }

    /// 1..=4.
    pub fn number(self) -> u8 {
        self.0
    }

    /// Where well `well96` of this quadrant's 96-well plate lands on the
    /// 384-well plate. Meant for wells of a 96-well plate; for a well beyond
    /// row 127 or column 127 the arithmetic saturates rather than panics.
    pub fn map(self, well96: Well) -> Well {
        let q = self.0 - 1;
        Well::new(
            well96.row().saturating_mul(2).saturating_add(q / 2),
            well96.column().saturating_mul(2).saturating_add(q % 2),
        )
    }

    /// The inverse of [`Quadrant::map`]: which quadrant a 384-well plate's
    /// well came from, and its well on that 96-well plate.
    pub fn source_of(well384: Well) -> (Quadrant, Well) {
        let q = (well384.row() % 2) * 2 + well384.column() % 2;
        (
            Quadrant(q + 1),
            Well::new(well384.row() / 2, well384.column() / 2),
        )
    }
}

impl TryFrom<u8> for Quadrant {
    type Error = LineageError;

    fn try_from(n: u8) -> Result<Self, Self::Error> {
        Quadrant::new(n)
    }
}

impl From<Quadrant> for u8 {
    fn from(q: Quadrant) -> Self {
        q.0
    }
}

/// How a plate was derived from its parents.
///
/// Human-readable formats write `{"kind": "transfer", "source": ".."}` or
/// `{"kind": "quadrants", "sources": [..]}`; compact binary formats (postcard)
/// get a plain enum, since they cannot read an internally tagged one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lineage {
    /// Copied well for well from one plate.
    Transfer {
        /// The parent plate's id.
        source: String,
    },
    /// Stamped from four 96-well plates.
    Quadrants {
        /// The parent plates' ids, Q1 first.
        sources: [String; 4],
    },
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum TaggedLineage {
    Transfer { source: String },
    Quadrants { sources: [String; 4] },
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum CompactLineage {
    Transfer { source: String },
    Quadrants { sources: [String; 4] },
}

impl Serialize for Lineage {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Lineage is written once per plate; cloning two short ids is cheaper
        // than a second pair of borrowed mirror types.
        if serializer.is_human_readable() {
            match self.clone() {
                Lineage::Transfer { source } => TaggedLineage::Transfer { source },
                Lineage::Quadrants { sources } => TaggedLineage::Quadrants { sources },
            }
            .serialize(serializer)
        } else {
            match self.clone() {
                Lineage::Transfer { source } => CompactLineage::Transfer { source },
                Lineage::Quadrants { sources } => CompactLineage::Quadrants { sources },
            }
            .serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for Lineage {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(if deserializer.is_human_readable() {
            match TaggedLineage::deserialize(deserializer)? {
                TaggedLineage::Transfer { source } => Lineage::Transfer { source },
                TaggedLineage::Quadrants { sources } => Lineage::Quadrants { sources },
            }
        } else {
            match CompactLineage::deserialize(deserializer)? {
                CompactLineage::Transfer { source } => Lineage::Transfer { source },
                CompactLineage::Quadrants { sources } => Lineage::Quadrants { sources },
            }
        })
    }
}

/// 1:1 transfer (extraction plate -> PCR plate): the same wells.
pub fn transfer_layout(source: &Layout) -> Layout {
    source.clone()
}

/// Four 96-well layouts -> one 384-well layout by quadrant (`sources[0]` is Q1). Errors: NotA96WellPlate { index }, ...
///
/// Samples and controls keep their content and move to [`Quadrant::map`] of
/// their well. Errors: [`LineageError::NotA96WellPlate`] (with the quadrant
/// number), [`LineageError::DuplicateBarcode`] when a tube is on two of the
/// source plates.
pub fn combine_quadrants(sources: [&Layout; 4]) -> Result<Layout, LineageError> {
    for (quadrant, source) in Quadrant::ALL.into_iter().zip(sources) {
        if source.format() != PlateFormat::Wells96 {
            return Err(LineageError::NotA96WellPlate {
                position: quadrant.number().into(),
                format: source.format(),
            });
        }
    }
    let mut wells = BTreeMap::new();
    let mut seen: HashSet<&Barcode> = HashSet::new();
    for (quadrant, source) in Quadrant::ALL.into_iter().zip(sources) {
        for (well, content) in source.iter() {
            if let WellContent::Sample { barcode } = content
                && !seen.insert(barcode)
            {
                return Err(LineageError::DuplicateBarcode {
                    barcode: barcode.clone(),
                });
            }
            // Distinct (quadrant, well) pairs map to distinct 384 wells, all
            // on the plate, so nothing is overwritten and the result keeps
            // the layout invariants.
            wells.insert(quadrant.map(well), content.clone());
        }
    }
    Ok(Layout::from_parts(PlateFormat::Wells384, wells))
}

/// Why plates cannot be derived as asked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LineageError {
    /// A quadrant number other than 1..=4.
    #[error("quadrant {value} does not exist; a 384-well plate has quadrants 1 to 4")]
    QuadrantOutOfRange {
        /// The number given.
        value: u8,
    },
    /// A source plate for a 384-well stamp is not a 96-well plate.
    #[error(
        "the plate for quadrant {position} is a {format}-well plate; quadrants take 96-well plates"
    )]
    NotA96WellPlate {
        /// The quadrant it was meant for, 1..=4 (index in the sources + 1).
        position: usize,
        /// Its actual format.
        format: PlateFormat,
    },
    /// The same tube is on two of the source plates: combining them would
    /// test it twice and give two results for one tube.
    #[error("tube {barcode} is on more than one of the source plates")]
    DuplicateBarcode {
        /// The tube.
        barcode: Barcode,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ControlKind, PlateTemplate};

    fn w(s: &str) -> Well {
        s.parse().unwrap()
    }

    fn b(s: &str) -> Barcode {
        Barcode::new(s).unwrap()
    }

    #[test]
    fn quadrant_numbers() {
        assert_eq!(Quadrant::ALL.map(Quadrant::number), [1, 2, 3, 4]);
        assert_eq!(Quadrant::new(3).unwrap().number(), 3);
        assert_eq!(
            Quadrant::new(0),
            Err(LineageError::QuadrantOutOfRange { value: 0 })
        );
        assert_eq!(
            Quadrant::new(5).unwrap_err().to_string(),
            "quadrant 5 does not exist; a 384-well plate has quadrants 1 to 4"
        );
        assert_eq!(serde_json::to_string(&Quadrant::ALL[1]).unwrap(), "2");
        assert_eq!(
            serde_json::from_str::<Quadrant>("4").unwrap(),
            Quadrant::ALL[3]
        );
        assert!(serde_json::from_str::<Quadrant>("0").is_err());
    }

    #[test]
    fn quadrant_map_examples() {
        let [q1, q2, q3, q4] = Quadrant::ALL;
        assert_eq!(q1.map(w("A1")), w("A1"));
        assert_eq!(q2.map(w("A1")), w("A2"));
        assert_eq!(q3.map(w("A1")), w("B1"));
        assert_eq!(q4.map(w("A1")), w("B2"));
        assert_eq!(q4.map(w("H12")), w("P24"));
        assert_eq!(q1.map(w("H12")), w("O23"));
        assert_eq!(q2.map(w("B3")), w("C6"));
        // Saturates instead of overflowing.
        assert_eq!(q4.map(Well::new(200, 200)), Well::new(255, 255));
    }

    #[test]
    fn source_of_inverts_map_for_every_384_well() {
        let mut hit = HashSet::new();
        for well in PlateFormat::Wells384.wells_column_major() {
            let (quadrant, well96) = Quadrant::source_of(well);
            assert!(PlateFormat::Wells96.contains(well96), "{well} -> {well96}");
            assert_eq!(quadrant.map(well96), well, "{well}");
            hit.insert((quadrant, well96));
        }
        // And the map is a bijection: every (quadrant, 96-well) pair is hit once.
        assert_eq!(hit.len(), 384);
        for q in Quadrant::ALL {
            for well96 in PlateFormat::Wells96.wells_column_major() {
                assert_eq!(Quadrant::source_of(q.map(well96)), (q, well96));
            }
        }
    }

    fn plate96(prefix: &str, n: usize) -> Layout {
        let template = PlateTemplate::new(
            PlateFormat::Wells96,
            [
                (w("H12"), ControlKind::PositiveControl),
                (w("G12"), ControlKind::NoTemplateControl),
            ],
        )
        .unwrap();
        let mut layout = Layout::from_template(&template);
        let tubes: Vec<Barcode> = (0..n).map(|i| b(&format!("{prefix}{i:03}"))).collect();
        layout.fill(&tubes).unwrap();
        layout
    }

    #[test]
    fn combine_quadrants_keeps_barcodes_and_controls() {
        let plates = [
            plate96("QA", 94),
            plate96("QB", 10),
            plate96("QC", 1),
            plate96("QD", 0),
        ];
        let combined = combine_quadrants([&plates[0], &plates[1], &plates[2], &plates[3]]).unwrap();
        assert_eq!(combined.format(), PlateFormat::Wells384);
        assert_eq!(combined.sample_count(), 94 + 10 + 1);
        assert_eq!(combined.control_count(), 8);
        for (quadrant, plate) in Quadrant::ALL.into_iter().zip(&plates) {
            for (well, content) in plate.iter() {
                assert_eq!(combined.get(quadrant.map(well)), Some(content));
            }
        }
        // Spot checks against hand-computed positions.
        assert_eq!(combined.well_of(&b("QA000")), Some(w("A1")));
        assert_eq!(combined.well_of(&b("QB000")), Some(w("A2")));
        assert_eq!(combined.well_of(&b("QC000")), Some(w("B1")));
        assert_eq!(combined.well_of(&b("QA001")), Some(w("C1")));
        assert_eq!(
            combined.get(w("P24")),
            Some(&WellContent::Control {
                control: ControlKind::PositiveControl
            })
        );
        assert_eq!(
            combined.get(w("M23")),
            Some(&WellContent::Control {
                control: ControlKind::NoTemplateControl
            })
        );
        // Every other well is free, and the result is a valid stored layout.
        assert_eq!(combined.free_count(), 384 - 105 - 8);
        let json = serde_json::to_string(&combined).unwrap();
        assert_eq!(serde_json::from_str::<Layout>(&json).unwrap(), combined);
    }

    #[test]
    fn combine_quadrants_rejects_a_384_source() {
        let p = plate96("QA", 3);
        let big = Layout::empty(PlateFormat::Wells384);
        let err = combine_quadrants([&p, &p, &big, &p]).unwrap_err();
        // (p is also repeated, but the format is checked first.)
        assert_eq!(
            err,
            LineageError::NotA96WellPlate {
                position: 3,
                format: PlateFormat::Wells384
            }
        );
        assert_eq!(
            err.to_string(),
            "the plate for quadrant 3 is a 384-well plate; quadrants take 96-well plates"
        );
    }

    #[test]
    fn combine_quadrants_rejects_a_tube_on_two_plates() {
        let a = plate96("QA", 3);
        let mut d = plate96("QD", 3);
        d.place(w("A5"), b("QA002")).unwrap();
        let empty = Layout::empty(PlateFormat::Wells96);
        let err = combine_quadrants([&a, &empty, &empty, &d]).unwrap_err();
        assert_eq!(
            err,
            LineageError::DuplicateBarcode {
                barcode: b("QA002")
            }
        );
        assert_eq!(
            err.to_string(),
            "tube QA002 is on more than one of the source plates"
        );
    }

    #[test]
    fn transfer_keeps_every_well() {
        let p = plate96("QA", 50);
        assert_eq!(transfer_layout(&p), p);
    }

    #[test]
    fn lineage_json_shape() {
        let t = Lineage::Transfer {
            source: "EXT-1".into(),
        };
        let json = serde_json::to_value(&t).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"kind": "transfer", "source": "EXT-1"})
        );
        assert_eq!(serde_json::from_value::<Lineage>(json).unwrap(), t);

        let q = Lineage::Quadrants {
            sources: ["P1".into(), "P2".into(), "P3".into(), "P4".into()],
        };
        let json = serde_json::to_value(&q).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"kind": "quadrants", "sources": ["P1", "P2", "P3", "P4"]})
        );
        assert_eq!(serde_json::from_value::<Lineage>(json).unwrap(), q);

        let err = serde_json::from_str::<Lineage>(
            r#"{"kind": "quadrants", "sources": ["P1", "P2", "P3"]}"#,
        );
        assert!(err.is_err());
    }
}
