//! Plate maps exported by an automatic decapper or sample loader: one row per
//! tube, with the plate's barcode, the well and the tube's barcode.
//!
//! The file is CSV, with ',' or ';' between fields (detected from the header
//! row), optionally starting with a UTF-8 byte-order mark. Headers are matched
//! case-insensitively, ignoring spaces and punctuation, against a few names
//! vendors use ([`PLATE_HEADERS`], [`WELL_HEADERS`], [`TUBE_HEADERS`]); other
//! columns are ignored. Fields are trimmed.
//!
//! A row whose tube field is blank or one of [`EMPTY_MARKERS`] ("EMPTY",
//! "NO TUBE", ..) is an empty well and is skipped. A row whose tube field is
//! one of [`UNREAD_MARKERS`] ("NOREAD", "ERROR", ..) is an error: a tube is
//! there but nobody knows which, and "NOREAD" would otherwise pass as a
//! barcode.
//!
//! One file may hold several plates; [`read_plate_maps`] returns them in the
//! order they first appear, [`read_plate_map`] insists on one.

use std::collections::HashMap;

use super::{ExportError, Table, decode, field, quote};
use crate::domain::{Barcode, PlateFormat, Well, WellError};

/// Header names (normalized: lower case, letters and digits only) of the
/// plate barcode column.
pub const PLATE_HEADERS: [&str; 6] = [
    "platebarcode",
    "plateid",
    "plate",
    "rackbarcode",
    "rackid",
    "rack",
];
/// Header names of the well column.
pub const WELL_HEADERS: [&str; 5] = ["well", "position", "wellposition", "tubeposition", "pos"];
/// Header names of the tube barcode column.
pub const TUBE_HEADERS: [&str; 6] = [
    "tubebarcode",
    "sampleid",
    "barcode",
    "tubeid",
    "samplebarcode",
    "tube",
];
/// Tube fields (compared case-insensitively, spaces, '_' and '-' ignored)
/// that mark an empty well: the row is skipped. A blank field does too.
pub const EMPTY_MARKERS: [&str; 4] = ["EMPTY", "NOTUBE", "NONE", "NA"];
/// Tube fields (compared as [`EMPTY_MARKERS`]) that mean a tube was seen but
/// its barcode not read: an error, never a barcode or an empty well.
pub const UNREAD_MARKERS: [&str; 5] = ["NOREAD", "ERROR", "FAILED", "UNREADABLE", "NOCODE"];

/// One plate's layout as the instrument loaded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlateMap {
    /// The plate's barcode, as exported (not checked against the tube
    /// barcode rules: plate labels follow their own).
    pub plate: String,
    /// The plate format: the one the caller gave, or the smallest that holds
    /// every well named for this plate.
    pub format: PlateFormat,
    /// Tube per well, in file order. No well and no tube appears twice.
    pub placements: Vec<(Well, Barcode)>,
}

impl PlateMap {
    /// The plate maps as a CSV file that [`read_plate_maps`] reads back equal
    /// (given the format): header `Plate Barcode,Well,Tube Barcode`, one row
    /// per placement.
    pub fn render(maps: &[PlateMap]) -> String {
        let mut out = String::from("Plate Barcode,Well,Tube Barcode\r\n");
        for map in maps {
            for (well, tube) in &map.placements {
                out.push_str(&format!("{},{well},{tube}\r\n", quote(&map.plate, ',')));
            }
        }
        out
    }
}

/// A placement with the line it was read from.
type Placed = (u64, Well, Barcode);

/// Reads every plate in a decapper export. `format`, if given, is the format
/// of every plate; otherwise each plate's is inferred from its wells.
pub fn read_plate_maps(
    bytes: &[u8],
    format: Option<PlateFormat>,
) -> Result<Vec<PlateMap>, ExportError> {
    let text = decode(bytes)?;
    let table = Table::read(text, 1)?;
    maps_of(&table, format)
}

/// The plates of a decapper table.
fn maps_of(table: &Table, format: Option<PlateFormat>) -> Result<Vec<PlateMap>, ExportError> {
    let plate_col = table.required("plate barcode", &PLATE_HEADERS)?;
    let well_col = table.required("well", &WELL_HEADERS)?;
    let tube_col = table.required("tube barcode", &TUBE_HEADERS)?;
    let header = |i: usize| table.headers[i].clone();

    // Per plate: its placements with their lines, in file order.
    let mut plates: Vec<(String, Vec<Placed>)> = Vec::new();
    let mut well_seen: HashMap<(String, Well), u64> = HashMap::new();
    let mut tube_seen: HashMap<Barcode, u64> = HashMap::new();
    for (line, row) in &table.rows {
        let line = *line;
        let plate = field(row, plate_col);
        if plate.is_empty() {
            return Err(ExportError::MissingField {
                line,
                column: header(plate_col),
            });
        }
        let well_text = field(row, well_col);
        if well_text.is_empty() {
            return Err(ExportError::MissingField {
                line,
                column: header(well_col),
            });
        }
        let well: Well = well_text.parse().map_err(|source| ExportError::BadWell {
            line,
            column: header(well_col),
            source,
        })?;
        let tube = field(row, tube_col);
        let marker: String = tube
            .chars()
            .filter(|c| !matches!(c, ' ' | '_' | '-'))
            .map(|c| c.to_ascii_uppercase())
            .collect();
        if tube.is_empty() || EMPTY_MARKERS.contains(&marker.as_str()) {
            continue;
        }
        if UNREAD_MARKERS.contains(&marker.as_str()) {
            return Err(ExportError::UnreadTube {
                line,
                well: well.to_string(),
                text: crate::echo(tube),
            });
        }
        let tube = Barcode::new(tube).map_err(|source| ExportError::BadBarcode {
            line,
            column: header(tube_col),
            source,
        })?;
        if let Some(&first_line) = well_seen.get(&(plate.to_owned(), well)) {
            return Err(ExportError::DuplicateWell {
                line,
                first_line,
                plate: crate::echo(plate),
                well: well.to_string(),
            });
        }
        if let Some(&first_line) = tube_seen.get(&tube) {
            return Err(ExportError::DuplicateTube {
                line,
                first_line,
                barcode: tube.to_string(),
            });
        }
        well_seen.insert((plate.to_owned(), well), line);
        tube_seen.insert(tube.clone(), line);
        match plates.iter_mut().find(|(p, _)| p == plate) {
            Some((_, placements)) => placements.push((line, well, tube)),
            None => plates.push((plate.to_owned(), vec![(line, well, tube)])),
        }
    }

    plates
        .into_iter()
        .map(|(plate, placements)| {
            let format = format.unwrap_or_else(|| {
                if placements
                    .iter()
                    .all(|(_, w, _)| PlateFormat::Wells96.contains(*w))
                {
                    PlateFormat::Wells96
                } else {
                    PlateFormat::Wells384
                }
            });
            if let Some((line, well, _)) = placements.iter().find(|(_, w, _)| !format.contains(*w))
            {
                return Err(ExportError::BadWell {
                    line: *line,
                    column: header(well_col),
                    source: WellError::OutsideFormat {
                        well: well.to_string(),
                        format,
                    },
                });
            }
            Ok(PlateMap {
                plate,
                format,
                placements: placements.into_iter().map(|(_, w, t)| (w, t)).collect(),
            })
        })
        .collect()
}

/// Reads a decapper export that must hold exactly one plate. A file whose
/// wells are all empty gives a map with no placements.
pub fn read_plate_map(bytes: &[u8], format: Option<PlateFormat>) -> Result<PlateMap, ExportError> {
    // The second plate is found on the raw rows, so that a file whose first
    // plate is all empty wells is still caught.
    let text = decode(bytes)?;
    let table = Table::read(text, 1)?;
    let plate_col = table.required("plate barcode", &PLATE_HEADERS)?;
    let mut expected: Option<&str> = None;
    for (line, row) in &table.rows {
        let plate = field(row, plate_col);
        match expected {
            Some(first) if !plate.is_empty() && plate != first => {
                return Err(ExportError::MixedPlates {
                    line: *line,
                    expected: crate::echo(first),
                    found: crate::echo(plate),
                });
            }
            None if !plate.is_empty() => expected = Some(plate),
            _ => {}
        }
    }
    let mut maps = maps_of(&table, format)?;
    match maps.pop() {
        Some(map) => Ok(map),
        // Every well empty: one plate, no tubes.
        None => Ok(PlateMap {
            plate: expected.unwrap_or_default().to_owned(),
            format: format.unwrap_or(PlateFormat::Wells96),
            placements: Vec::new(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(s: &str) -> Well {
        s.parse().unwrap()
    }
    fn b(s: &str) -> Barcode {
        Barcode::new(s).unwrap()
    }

    #[test]
    fn reads_the_decapper_fixture() {
        let map = read_plate_map(include_bytes!("testdata/decapper_map.csv"), None).unwrap();
        assert_eq!(map.plate, "EXT-20261127-01");
        assert_eq!(map.format, PlateFormat::Wells96);
        assert_eq!(map.placements.len(), 10);
        assert_eq!(map.placements[0], (w("A1"), b("COV-2026-000101")));
        assert_eq!(map.placements[9], (w("D2"), b("COV-2026-000110")));
        // C1 says NO TUBE, D1 is blank: skipped.
        assert!(!map.placements.iter().any(|(well, _)| *well == w("D1")));
    }

    #[test]
    fn aliases_semicolons_bom_and_several_plates() {
        let text = "\u{FEFF}PlateID;Position;Sample ID;Volume\nP1;A01;TUBE-0001;200\nP2;a1;TUBE-0002;200\nP1;P24;TUBE-0003;200\n";
        let maps = read_plate_maps(text.as_bytes(), None).unwrap();
        assert_eq!(maps.len(), 2);
        assert_eq!(maps[0].plate, "P1");
        assert_eq!(maps[0].format, PlateFormat::Wells384);
        assert_eq!(
            maps[0].placements,
            vec![(w("A1"), b("TUBE-0001")), (w("P24"), b("TUBE-0003"))]
        );
        assert_eq!(maps[1].format, PlateFormat::Wells96);
        let err = read_plate_map(text.as_bytes(), None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "line 3: plate \"P2\", but the file is for plate \"P1\""
        );
    }

    fn error(text: &str, format: Option<PlateFormat>) -> String {
        read_plate_maps(text.as_bytes(), format)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn errors_name_line_and_field() {
        let h = "Plate Barcode,Well,Tube Barcode\n";
        assert_eq!(
            error(&format!("{h}P1,A1,TUBE-0001\nP1,Z0,TUBE-0002\n"), None),
            "line 3, column \"Well\": \"Z0\" is not a well; expected a row letter and a column number, such as \"A1\" or \"H12\""
        );
        assert_eq!(
            error(
                &format!("{h}P1,A1,TUBE-0001\nP1,A13,TUBE-0002\n"),
                Some(PlateFormat::Wells96)
            ),
            "line 3, column \"Well\": well \"A13\" is outside a 96-well plate (A1..H12)"
        );
        assert_eq!(
            error(&format!("{h}P1,Q1,TUBE-0001\n"), None),
            "line 2, column \"Well\": well \"Q1\" is outside a 384-well plate (A1..P24)"
        );
        assert_eq!(
            error(&format!("{h}P1,A1,TUBE 0001\n"), None),
            "line 2, column \"Tube Barcode\": barcode \"TUBE 0001\" has ' ' at position 5; only letters, digits and '-' are allowed"
        );
        assert_eq!(
            error(&format!("{h}P1,A1,TUBE-0001\n\nP1,A01,TUBE-0002\n"), None),
            "line 4: well A1 of plate \"P1\" is already filled on line 2"
        );
        assert_eq!(
            error(&format!("{h}P1,A1,TUBE-0001\nP2,B1,TUBE-0001\n"), None),
            "line 3: tube TUBE-0001 is already placed on line 2"
        );
        assert_eq!(
            error(&format!("{h}P1,A1,NoRead\n"), None),
            "line 2: the tube in well A1 was not read (\"NoRead\"); scan it by hand"
        );
        assert_eq!(
            error(&format!("{h},A1,TUBE-0001\n"), None),
            "line 2: column \"Plate Barcode\" is empty"
        );
        assert_eq!(
            error("Plate Barcode,Tube Barcode\nP1,TUBE-0001\n", None),
            "line 1: no well column (accepted headers: well, position, wellposition, tubeposition, pos; found: Plate Barcode, Tube Barcode)"
        );
        assert_eq!(
            error("Plate,Well,Barcode,Tube Barcode\nP1,A1,X,TUBE-0001\n", None),
            "line 1: headers \"Barcode\" and \"Tube Barcode\" both name the tube barcode column"
        );
        assert_eq!(read_plate_maps(b"", None).unwrap_err(), ExportError::Empty);
        assert_eq!(
            read_plate_maps(b"\xEF\xBB\xBF\r\n\r\n", None).unwrap_err(),
            ExportError::Empty
        );
        assert_eq!(
            read_plate_maps(h.as_bytes(), None).unwrap_err(),
            ExportError::NoRows { line: 1 }
        );
    }

    #[test]
    fn empty_markers_are_skipped_in_any_spelling() {
        let text = "Plate,Well,Tube\nP1,A1,empty\nP1,B1,No Tube\nP1,C1,NO_TUBE\nP1,D1,\nP1,E1,n/a\nP1,F1,TUBE-0001\n";
        // "n/a" is not a marker (the '/' stays), so it is a bad barcode.
        assert!(error(text, None).starts_with("line 6, column \"Tube\""));
        let text = text.replace("n/a", "NA");
        let map = read_plate_map(text.as_bytes(), None).unwrap();
        assert_eq!(map.placements, vec![(w("F1"), b("TUBE-0001"))]);
    }

    #[test]
    fn render_reads_back() {
        let maps = vec![
            PlateMap {
                plate: "P,1".into(),
                format: PlateFormat::Wells96,
                placements: vec![(w("H12"), b("TUBE-0001")), (w("A1"), b("TUBE-0002"))],
            },
            PlateMap {
                plate: "P2".into(),
                format: PlateFormat::Wells96,
                placements: vec![(w("B3"), b("TUBE-0003"))],
            },
        ];
        let text = PlateMap::render(&maps);
        assert_eq!(read_plate_maps(text.as_bytes(), None).unwrap(), maps);
    }
}
