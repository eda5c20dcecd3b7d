//! Plate formats and well positions.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::echo;

/// The plate formats the lab runs. Serialized as the well count (96 or 384).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u16", into = "u16")]
pub enum PlateFormat {
    /// 8 rows (A..H) by 12 columns: extraction plates and most PCR plates.
    Wells96,
    /// 16 rows (A..P) by 24 columns: high-throughput PCR, usually stamped
    /// from four 96-well plates.
    Wells384,
}

impl PlateFormat {
    /// Number of rows: 8 or 16.
    pub fn rows(self) -> u8 {
        match self {
            PlateFormat::Wells96 => 8,
            PlateFormat::Wells384 => 16,
        }
    }

    /// Number of columns: 12 or 24.
    pub fn columns(self) -> u8 {
        match self {
            PlateFormat::Wells96 => 12,
            PlateFormat::Wells384 => 24,
        }
    }

    /// Number of wells: 96 or 384.
    pub fn well_count(self) -> usize {
        usize::from(self.rows()) * usize::from(self.columns())
    }

    /// Every well, A1, B1, .., H1, A2, ..: column by column, the order labs
    /// pipette in (an 8-channel pipette fills a column at a time).
    pub fn wells_column_major(self) -> impl Iterator<Item = Well> {
        let rows = self.rows();
        (0..self.columns()).flat_map(move |column| (0..rows).map(move |row| Well::new(row, column)))
    }

    /// Whether `well` exists on a plate of this format.
    pub fn contains(self, well: Well) -> bool {
        well.row() < self.rows() && well.column() < self.columns()
    }

    /// The bottom-right well (H12 or P24), for messages that show the range.
    pub fn last_well(self) -> Well {
        Well::new(self.rows() - 1, self.columns() - 1)
    }

    fn as_u16(self) -> u16 {
        match self {
            PlateFormat::Wells96 => 96,
            PlateFormat::Wells384 => 384,
        }
    }
}

impl fmt::Display for PlateFormat {
    /// "96" or "384".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_u16())
    }
}

impl FromStr for PlateFormat {
    type Err = FormatError;

    /// "96" or "384".
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "96" => Ok(PlateFormat::Wells96),
            "384" => Ok(PlateFormat::Wells384),
            _ => Err(FormatError::Unsupported { text: echo(s) }),
        }
    }
}

impl TryFrom<u16> for PlateFormat {
    type Error = FormatError;

    fn try_from(n: u16) -> Result<Self, Self::Error> {
        match n {
            96 => Ok(PlateFormat::Wells96),
            384 => Ok(PlateFormat::Wells384),
            _ => Err(FormatError::Unsupported {
                text: n.to_string(),
            }),
        }
    }
}

impl From<PlateFormat> for u16 {
    fn from(f: PlateFormat) -> Self {
        f.as_u16()
    }
}

/// Why a value is not a [`PlateFormat`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// Not 96 or 384 (e.g. a 24- or 1536-well plate, which the lab does not run).
    #[error("plate format {text:?} is not supported; expected 96 or 384")]
    Unsupported {
        /// The value given (cut to 40 characters).
        text: String,
    },
}

/// A well position, 0-based row and column. Displays as "A1".."P24"; parses "A1", "a01", "H12" (case-insensitive, leading zeros allowed in the column).
///
/// A `Well` on its own is only a position: [`Well::new`] and [`FromStr`] do
/// not know the plate, so "H13" is a well. Whether it exists on a plate is
/// checked by [`PlateFormat::contains`] or, when parsing, [`Well::parse_in`].
///
/// Wells order column-major (A1 < B1 < .. < H1 < A2), so a `BTreeMap<Well, _>`
/// iterates in pipetting order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Well {
    row: u8,
    column: u8,
}

impl Well {
    /// Most rows a well name can spell with a single letter (A..=Z).
    const MAX_ROWS: u8 = 26;
    /// Most columns a well name can have (1..=99).
    const MAX_COLUMNS: u8 = 99;

    /// The well at 0-based `row` and `column` (A1 is `new(0, 0)`). No bounds
    /// are checked; see [`PlateFormat::contains`]. Wells beyond row Z or
    /// column 99 exist on no plate; they display in a form [`FromStr`] does
    /// not accept (rows past Z as "AA", "AB", ..).
    pub fn new(row: u8, column: u8) -> Self {
        Well { row, column }
    }

    /// 0-based row (A is 0).
    pub fn row(self) -> u8 {
        self.row
    }

    /// 0-based column (column "1" is 0).
    pub fn column(self) -> u8 {
        self.column
    }

    /// Parses a well name and checks the well exists on a `format` plate.
    pub fn parse_in(s: &str, format: PlateFormat) -> Result<Well, WellError> {
        let well: Well = s.parse()?;
        if format.contains(well) {
            Ok(well)
        } else {
            Err(WellError::OutsideFormat {
                well: well.to_string(),
                format,
            })
        }
    }
}

impl Ord for Well {
    /// Column first, then row: pipetting order.
    fn cmp(&self, other: &Self) -> Ordering {
        (self.column, self.row).cmp(&(other.column, other.row))
    }
}

impl PartialOrd for Well {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Well {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Rows past Z (never on a real plate, but `new` allows them) continue
        // as spreadsheet columns do: Z, AA, AB, .. so nothing ever panics.
        let mut letters = [0u8; 2];
        let mut n = usize::from(self.row);
        let mut start = letters.len();
        loop {
            start -= 1;
            letters[start] = b'A' + (n % 26) as u8;
            if n < 26 {
                break;
            }
            n = n / 26 - 1;
        }
        for &letter in &letters[start..] {
            write!(f, "{}", char::from(letter))?;
        }
        write!(f, "{}", u16::from(self.column) + 1)
    }
}

impl FromStr for Well {
    type Err = WellError;

    /// A row letter A..=Z (either case) then a column number 1..=99, with
    /// any number of leading zeros. Nothing else, not even spaces.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let malformed = || WellError::Malformed { text: echo(s) };
        let mut chars = s.chars();
        let row = match chars.next() {
            Some(c) if c.is_ascii_alphabetic() => c.to_ascii_uppercase() as u8 - b'A',
            _ => return Err(malformed()),
        };
        let digits = chars.as_str();
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(malformed());
        }
        // Leading zeros are allowed ("A01"), so strip them before the length
        // check that keeps the number small enough to parse.
        let significant = digits.trim_start_matches('0');
        if significant.is_empty() || significant.len() > 2 {
            return Err(malformed());
        }
        let number: u8 = significant.parse().map_err(|_| malformed())?;
        debug_assert!((1..=Self::MAX_COLUMNS).contains(&number) && row < Self::MAX_ROWS);
        Ok(Well::new(row, number - 1))
    }
}

impl TryFrom<String> for Well {
    type Error = WellError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Well> for String {
    fn from(w: Well) -> Self {
        w.to_string()
    }
}

/// Why text is not a usable well.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WellError {
    /// Not a row letter followed by a column number 1..=99.
    #[error(
        "{text:?} is not a well; expected a row letter and a column number, such as \"A1\" or \"H12\""
    )]
    Malformed {
        /// The text given (cut to 40 characters).
        text: String,
    },
    /// A well name that does not exist on this plate format, e.g. "H13" on
    /// a 96-well plate or "Q1" on any plate.
    #[error("well {well:?} is outside a {format}-well plate (A1..{last})", last = format.last_well())]
    OutsideFormat {
        /// The well, as normalized text ("a013" is reported as "A13").
        well: String,
        /// The plate format it was checked against.
        format: PlateFormat,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn format_dimensions() {
        assert_eq!(
            (PlateFormat::Wells96.rows(), PlateFormat::Wells96.columns()),
            (8, 12)
        );
        assert_eq!(
            (
                PlateFormat::Wells384.rows(),
                PlateFormat::Wells384.columns()
            ),
            (16, 24)
        );
        assert_eq!(PlateFormat::Wells96.well_count(), 96);
        assert_eq!(PlateFormat::Wells384.well_count(), 384);
        assert_eq!(PlateFormat::Wells96.wells_column_major().count(), 96);
        assert_eq!(PlateFormat::Wells384.wells_column_major().count(), 384);
        assert_eq!(PlateFormat::Wells96.last_well().to_string(), "H12");
        assert_eq!(PlateFormat::Wells384.last_well().to_string(), "P24");
    }

    #[test]
    fn wells_column_major_is_pipetting_order() {
        let names: Vec<String> = PlateFormat::Wells96
            .wells_column_major()
            .map(|w| w.to_string())
            .collect();
        assert_eq!(
            &names[..10],
            ["A1", "B1", "C1", "D1", "E1", "F1", "G1", "H1", "A2", "B2"]
        );
        assert_eq!(names.last().map(String::as_str), Some("H12"));
        let names384: Vec<String> = PlateFormat::Wells384
            .wells_column_major()
            .map(|w| w.to_string())
            .collect();
        assert_eq!(names384[15], "P1");
        assert_eq!(names384[16], "A2");
        assert_eq!(names384[383], "P24");
    }

    #[test]
    fn well_ord_is_column_major_and_matches_iteration() {
        assert!(Well::new(7, 0) < Well::new(0, 1)); // H1 < A2
        assert!(Well::new(0, 0) < Well::new(1, 0)); // A1 < B1
        for format in [PlateFormat::Wells96, PlateFormat::Wells384] {
            let wells: Vec<Well> = format.wells_column_major().collect();
            assert!(wells.windows(2).all(|w| w[0] < w[1]));
            // A map built in any order iterates in pipetting order.
            let map: BTreeMap<Well, ()> = wells.iter().rev().map(|&w| (w, ())).collect();
            assert!(map.keys().copied().eq(wells.iter().copied()));
        }
    }

    #[test]
    fn contains_checks_both_bounds() {
        let f = PlateFormat::Wells96;
        assert!(f.contains(Well::new(7, 11)));
        assert!(!f.contains(Well::new(8, 0)));
        assert!(!f.contains(Well::new(0, 12)));
        assert!(PlateFormat::Wells384.contains(Well::new(15, 23)));
        assert!(!PlateFormat::Wells384.contains(Well::new(16, 23)));
        assert!(!PlateFormat::Wells384.contains(Well::new(15, 24)));
    }

    #[test]
    fn format_text_and_numbers() {
        assert_eq!("96".parse::<PlateFormat>().unwrap(), PlateFormat::Wells96);
        assert_eq!("384".parse::<PlateFormat>().unwrap(), PlateFormat::Wells384);
        assert_eq!(PlateFormat::Wells384.to_string(), "384");
        assert_eq!(u16::from(PlateFormat::Wells96), 96);
        assert_eq!(PlateFormat::try_from(384).unwrap(), PlateFormat::Wells384);
        assert_eq!(
            PlateFormat::try_from(48).unwrap_err().to_string(),
            "plate format \"48\" is not supported; expected 96 or 384"
        );
        assert_eq!(
            "1536".parse::<PlateFormat>(),
            Err(FormatError::Unsupported {
                text: "1536".into()
            })
        );
        assert!(" 96".parse::<PlateFormat>().is_err());
    }

    #[test]
    fn format_serde_is_the_well_count() {
        assert_eq!(serde_json::to_string(&PlateFormat::Wells96).unwrap(), "96");
        assert_eq!(
            serde_json::from_str::<PlateFormat>("384").unwrap(),
            PlateFormat::Wells384
        );
        let err = serde_json::from_str::<PlateFormat>("24").unwrap_err();
        assert!(
            err.to_string()
                .contains("plate format \"24\" is not supported"),
            "{err}"
        );
        assert!(serde_json::from_str::<PlateFormat>("\"96\"").is_err());
    }

    #[test]
    fn well_parse_and_display() {
        assert_eq!("A1".parse::<Well>().unwrap(), Well::new(0, 0));
        assert_eq!("a01".parse::<Well>().unwrap(), Well::new(0, 0));
        assert_eq!("h12".parse::<Well>().unwrap(), Well::new(7, 11));
        assert_eq!("P24".parse::<Well>().unwrap(), Well::new(15, 23));
        assert_eq!("Z99".parse::<Well>().unwrap(), Well::new(25, 98));
        assert_eq!("B0007".parse::<Well>().unwrap(), Well::new(1, 6));
        assert_eq!(Well::new(15, 23).to_string(), "P24");
        assert_eq!(Well::new(0, 0).row(), 0);
        assert_eq!(Well::new(3, 5).column(), 5);
    }

    #[test]
    fn well_parse_rejects_malformed_text() {
        for bad in [
            "", "A", "1", "A0", "A00", "A100", "AA1", "A1 ", " A1", "A-1", "A+1", "É1", "A1B",
            "A٣", "1A",
        ] {
            assert_eq!(
                bad.parse::<Well>(),
                Err(WellError::Malformed { text: bad.into() }),
                "{bad:?}"
            );
        }
        assert_eq!(
            "X".parse::<Well>().unwrap_err().to_string(),
            "\"X\" is not a well; expected a row letter and a column number, such as \"A1\" or \"H12\""
        );
    }

    #[test]
    fn parse_in_checks_the_format() {
        assert_eq!(
            Well::parse_in("h12", PlateFormat::Wells96).unwrap(),
            Well::new(7, 11)
        );
        let err = Well::parse_in("H13", PlateFormat::Wells96).unwrap_err();
        assert_eq!(
            err,
            WellError::OutsideFormat {
                well: "H13".into(),
                format: PlateFormat::Wells96
            }
        );
        assert_eq!(
            err.to_string(),
            "well \"H13\" is outside a 96-well plate (A1..H12)"
        );
        assert_eq!(
            Well::parse_in("i01", PlateFormat::Wells96)
                .unwrap_err()
                .to_string(),
            "well \"I1\" is outside a 96-well plate (A1..H12)"
        );
        assert_eq!(
            Well::parse_in("Q1", PlateFormat::Wells384)
                .unwrap_err()
                .to_string(),
            "well \"Q1\" is outside a 384-well plate (A1..P24)"
        );
        assert!(matches!(
            Well::parse_in("H1x", PlateFormat::Wells96),
            Err(WellError::Malformed { .. })
        ));
    }

    #[test]
    fn well_display_never_panics_beyond_z() {
        assert_eq!(Well::new(25, 0).to_string(), "Z1");
        assert_eq!(Well::new(26, 0).to_string(), "AA1");
        assert_eq!(Well::new(27, 0).to_string(), "AB1");
        assert_eq!(Well::new(255, 255).to_string(), "IV256");
    }

    #[test]
    fn well_serde_is_its_name() {
        let w = Well::new(7, 11);
        assert_eq!(serde_json::to_string(&w).unwrap(), "\"H12\"");
        assert_eq!(serde_json::from_str::<Well>("\"h012\"").unwrap(), w);
        let err = serde_json::from_str::<Well>("\"H 12\"").unwrap_err();
        assert!(err.to_string().contains("is not a well"), "{err}");
    }

    proptest! {
        #[test]
        fn well_from_str_never_panics(s in any::<String>()) {
            let _ = s.parse::<Well>();
        }

        #[test]
        fn well_from_str_never_panics_on_well_like_text(s in "[A-Za-z]?[0-9]{0,6}.?") {
            if let Ok(w) = s.parse::<Well>() {
                // Whatever parses displays as its canonical form, which parses back.
                prop_assert_eq!(w.to_string().parse::<Well>(), Ok(w));
                prop_assert!(w.row() < 26 && w.column() < 99);
            }
        }

        #[test]
        fn display_from_str_round_trips_for_every_nameable_well(row in 0u8..26, column in 0u8..99) {
            let w = Well::new(row, column);
            prop_assert_eq!(w.to_string().parse::<Well>(), Ok(w));
        }
    }

    #[test]
    fn display_from_str_round_trips_every_well_of_both_formats() {
        for format in [PlateFormat::Wells96, PlateFormat::Wells384] {
            for well in format.wells_column_major() {
                let text = well.to_string();
                assert_eq!(text.parse::<Well>(), Ok(well));
                assert_eq!(text.to_lowercase().parse::<Well>(), Ok(well));
                assert_eq!(Well::parse_in(&text, format), Ok(well));
                let json = serde_json::to_string(&well).unwrap();
                assert_eq!(serde_json::from_str::<Well>(&json).unwrap(), well);
            }
        }
    }
}
