//! Files that file-only instruments leave in a watched export folder (issue 8):
//! plate maps from an automatic decapper or sample loader, and the results table
//! of a QuantStudio / 7500 export.
//!
//! - [`plate_map`]: plate barcode, well and tube barcode, as a decapper exports
//!   them, into [`plate_map::PlateMap`]s;
//! - [`results`]: the `[Results]` table of a QuantStudio-style CSV or
//!   tab-separated text export into a [`results::ResultsFile`], one Ct per well
//!   and target;
//! - [`fingerprint`] and [`Sidecar`]: what the daemon needs to import a file
//!   once only and to tell the operator why a file was refused.
//!
//! Like [`crate::rdml`], the parsers are pure: bytes in, a typed document or an
//! error out. Every error names the line (counted from 1, as a text editor
//! does) and, where there is one, the column as it is headed in the file, so
//! the message can be shown to a technician as it is.
//!
//! A file read while the instrument is still writing it is usually refused
//! (its last row is shorter than the header: [`ExportError::ShortRow`]), but
//! not always: a cut that falls exactly at the end of a row, or inside the
//! last column, reads as a shorter file. Waiting until the file has stopped
//! changing is the daemon's job and comes first.
//!
//! What this module does NOT do: watch folders, wait for a file to stop
//! changing, remember which fingerprints were imported, move files to `done/`
//! or `failed/`, or check a plate map against the tubes received. Those are the
//! daemon's; it reads the bytes and hands them here.

pub mod plate_map;
pub mod results;

use std::fmt;

use sha2::{Digest, Sha256};

use crate::domain::{BarcodeError, WellError};
use crate::echo;

/// Why an export file cannot be imported. Lines are counted from 1; columns
/// are named by the header text found in the file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// The file is not UTF-8: a UTF-16 export, a spreadsheet saved in its
    /// binary format, or a file cut in the middle of a character.
    #[error("line {line}: the file is not UTF-8 text")]
    NotUtf8 {
        /// Line of the first invalid byte.
        line: u64,
    },
    /// Nothing but blank lines (and, for results, `*` metadata lines): often a
    /// file still being written when it was read, or an export of no wells.
    #[error("the file holds no table: it is empty or has only blank or metadata lines")]
    Empty,
    /// A header row but no data row under it.
    #[error("line {line}: the table has a header but no rows")]
    NoRows {
        /// The header's line.
        line: u64,
    },
    /// A column the parser needs is not in the header row (its accepted
    /// names are listed): the wrong export, or a vendor spelling not known yet.
    #[error("line {line}: no {column} column (accepted headers: {accepted}; found: {found})")]
    MissingColumn {
        /// The header's line.
        line: u64,
        /// What the column holds, e.g. "well".
        column: &'static str,
        /// The header names accepted for it.
        accepted: String,
        /// The headers that were found (the first 12, each cut to 40
        /// characters).
        found: String,
    },
    /// Two headers name the same column (e.g. both "Barcode" and "Tube
    /// Barcode", or both "Ct" and "Cq"); which one to believe is not guessed.
    #[error("line {line}: headers {first:?} and {second:?} both name the {column} column")]
    AmbiguousColumn {
        /// The header's line.
        line: u64,
        /// What the column holds.
        column: &'static str,
        /// The first header.
        first: String,
        /// The second header.
        second: String,
    },
    /// A required field is empty.
    #[error("line {line}: column {column:?} is empty")]
    MissingField {
        /// The row's line.
        line: u64,
        /// The column's header.
        column: String,
    },
    /// A row with fewer fields than the header: most often a file read while
    /// the instrument was still writing it, cut in the middle of a row, or a
    /// row whose fields were shifted by a stray delimiter.
    #[error("line {line}: {found} fields where the header has {expected}; the row is cut short")]
    ShortRow {
        /// The row's line.
        line: u64,
        /// Fields in the row.
        found: usize,
        /// Fields in the header.
        expected: usize,
    },
    /// Not a well name, or a well off the plate (H13 on a 96-well plate).
    #[error("line {line}, column {column:?}: {source}")]
    BadWell {
        /// The row's line.
        line: u64,
        /// The column's header.
        column: String,
        /// What is wrong with the well.
        source: WellError,
    },
    /// A well number (the "Well" column of a results export) that is not a
    /// whole number from 1 to the plate's well count.
    #[error("line {line}, column {column:?}: {text:?} is not a well number 1..={count}")]
    BadWellNumber {
        /// The row's line.
        line: u64,
        /// The column's header.
        column: String,
        /// The text found, cut to 40 characters.
        text: String,
        /// Wells on the plate (96 or 384).
        count: usize,
    },
    /// The "Well" number and the "Well Position" of a row are different wells:
    /// the file was edited by hand or the plate format is not the one assumed.
    #[error(
        "line {line}: well number {number} is {expected} on this plate, but the well position says {position}"
    )]
    WellMismatch {
        /// The row's line.
        line: u64,
        /// The well number.
        number: usize,
        /// The well that number is on this plate.
        expected: String,
        /// The well position given.
        position: String,
    },
    /// A tube barcode that breaks the barcode rules (see [`crate::domain::Barcode`]).
    #[error("line {line}, column {column:?}: {source}")]
    BadBarcode {
        /// The row's line.
        line: u64,
        /// The column's header.
        column: String,
        /// What is wrong with the barcode.
        source: BarcodeError,
    },
    /// The instrument says it saw a tube but could not read its barcode
    /// ("NOREAD", "ERROR"). The tube is there, so the well is not empty: it
    /// must be scanned by hand rather than skipped.
    #[error("line {line}: the tube in well {well} was not read ({text:?}); scan it by hand")]
    UnreadTube {
        /// The row's line.
        line: u64,
        /// The well.
        well: String,
        /// The instrument's marker.
        text: String,
    },
    /// The same well of the same plate is given two tubes.
    #[error("line {line}: well {well} of plate {plate:?} is already filled on line {first_line}")]
    DuplicateWell {
        /// The second row's line.
        line: u64,
        /// The first row's line.
        first_line: u64,
        /// The plate.
        plate: String,
        /// The well.
        well: String,
    },
    /// The same tube is placed twice (in one plate or two).
    #[error("line {line}: tube {barcode} is already placed on line {first_line}")]
    DuplicateTube {
        /// The second row's line.
        line: u64,
        /// The first row's line.
        first_line: u64,
        /// The tube.
        barcode: String,
    },
    /// A file expected to hold one plate names a second one.
    #[error("line {line}: plate {found:?}, but the file is for plate {expected:?}")]
    MixedPlates {
        /// The row naming the second plate.
        line: u64,
        /// The first plate named.
        expected: String,
        /// The other plate.
        found: String,
    },
    /// A Ct that is neither a positive cycle number nor "Undetermined": empty,
    /// "NaN", negative, zero or text. No sentinel is turned into a result.
    #[error(
        "line {line}, column {column:?}: {text:?} is not a Ct; expected a positive cycle number or \"Undetermined\""
    )]
    BadCt {
        /// The row's line.
        line: u64,
        /// The column's header.
        column: String,
        /// The text found, cut to 40 characters.
        text: String,
    },
    /// An optional numeric or true/false column holds something else.
    #[error("line {line}, column {column:?}: {text:?} is not {expected}")]
    BadValue {
        /// The row's line.
        line: u64,
        /// The column's header.
        column: String,
        /// The text found, cut to 40 characters.
        text: String,
        /// What was expected, e.g. "a number".
        expected: &'static str,
    },
    /// The same well and target twice: two results for one reaction.
    #[error(
        "line {line}: well {well}, target {target:?} already has a result on line {first_line}"
    )]
    DuplicateResult {
        /// The second row's line.
        line: u64,
        /// The first row's line.
        first_line: u64,
        /// The well.
        well: String,
        /// The target.
        target: String,
    },
    /// The CSV reader could not split a line into fields.
    #[error("line {line}: {reason}")]
    Csv {
        /// The line where the reader stopped.
        line: u64,
        /// What the reader said.
        reason: String,
    },
}

impl ExportError {
    /// The line at fault, counted from 1, if the error has one (all but
    /// [`ExportError::Empty`]).
    pub fn line(&self) -> Option<u64> {
        match self {
            ExportError::Empty => None,
            ExportError::NotUtf8 { line }
            | ExportError::NoRows { line }
            | ExportError::MissingColumn { line, .. }
            | ExportError::AmbiguousColumn { line, .. }
            | ExportError::MissingField { line, .. }
            | ExportError::ShortRow { line, .. }
            | ExportError::BadWell { line, .. }
            | ExportError::BadWellNumber { line, .. }
            | ExportError::WellMismatch { line, .. }
            | ExportError::BadBarcode { line, .. }
            | ExportError::UnreadTube { line, .. }
            | ExportError::DuplicateWell { line, .. }
            | ExportError::DuplicateTube { line, .. }
            | ExportError::MixedPlates { line, .. }
            | ExportError::BadCt { line, .. }
            | ExportError::BadValue { line, .. }
            | ExportError::DuplicateResult { line, .. }
            | ExportError::Csv { line, .. } => Some(*line),
        }
    }
}

/// The SHA-256 of a file's bytes as 64 lower-case hex digits: the identity
/// under which the daemon imports a file once only. Two files with the same
/// bytes have the same fingerprint whatever their names; one changed byte
/// gives another.
pub fn fingerprint(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The note written next to a file moved to `failed/`, for the operator:
/// which file, which bytes (its fingerprint) and why it was refused.
///
/// Rendered with [`fmt::Display`] as a few `key: value` lines followed by a
/// sentence on what to do. Line breaks inside the fields are replaced by
/// spaces so each field stays on its line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sidecar {
    /// The file's name as found in the export folder.
    pub file: String,
    /// What the file was read as, e.g. "plate map" or "results".
    pub kind: String,
    /// [`fingerprint`] of the bytes that were read.
    pub fingerprint: String,
    /// Why it was refused: an [`ExportError`]'s message, or the daemon's own
    /// reason (a tube never received, a well clash with a plate in the store).
    pub error: String,
}

impl Sidecar {
    /// The sidecar for `file`, whose `bytes` were refused with `error`.
    pub fn new(
        file: impl Into<String>,
        kind: impl Into<String>,
        bytes: &[u8],
        error: &dyn std::error::Error,
    ) -> Self {
        Sidecar {
            file: file.into(),
            kind: kind.into(),
            fingerprint: fingerprint(bytes),
            error: error.to_string(),
        }
    }

    /// The suffix added to the refused file's name for its sidecar:
    /// `plate7.csv` gets `plate7.csv.error.txt`.
    pub const SUFFIX: &'static str = ".error.txt";
}

impl fmt::Display for Sidecar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let one_line = |s: &str| s.replace(['\r', '\n'], " ");
        writeln!(f, "pcrd did not import this file.")?;
        writeln!(f, "file: {}", one_line(&self.file))?;
        writeln!(f, "read as: {}", one_line(&self.kind))?;
        writeln!(f, "sha256: {}", one_line(&self.fingerprint))?;
        writeln!(f, "reason: {}", one_line(&self.error))?;
        writeln!(
            f,
            "Nothing from it was imported. Correct the file (or the instrument's export) and put it back in the folder; a file with the same bytes is recognised by its sha256 and not imported twice."
        )
    }
}

/// The file's text without a leading byte-order mark, or where it stops being
/// UTF-8.
fn decode(bytes: &[u8]) -> Result<&str, ExportError> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    std::str::from_utf8(bytes).map_err(|e| ExportError::NotUtf8 {
        line: line_of(&bytes[..e.valid_up_to()]),
    })
}

/// The line (from 1) on which the byte after `before` lies.
fn line_of(before: &[u8]) -> u64 {
    before.iter().filter(|&&b| b == b'\n').count() as u64 + 1
}

/// The field separator of a header line: a tab if there is one (QuantStudio's
/// .txt export), else whichever of ';' (spreadsheets in locales whose decimal
/// mark is ',') and ',' occurs more often; ',' on a tie.
fn detect_delimiter(header: &str) -> u8 {
    if header.contains('\t') {
        return b'\t';
    }
    let count = |c: char| header.matches(c).count();
    if count(';') > count(',') { b';' } else { b',' }
}

/// A header name reduced to what identifies it: lower case, letters and digits
/// only ("Tube Barcode", "tube_barcode" and "TUBE-BARCODE" are all
/// "tubebarcode").
fn normalize(header: &str) -> String {
    header
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// One table: its header row and its data rows, fields trimmed, each with the
/// line it starts on. Rows with only empty fields are dropped; a row with
/// fewer fields than the header is an error (more are allowed: a trailing
/// delimiter is common).
#[derive(Debug)]
struct Table {
    header_line: u64,
    headers: Vec<String>,
    rows: Vec<(u64, Vec<String>)>,
}

impl Table {
    /// Reads `text`, whose first line is line `first_line` of the file and is
    /// the header row.
    fn read(text: &str, first_line: u64) -> Result<Table, ExportError> {
        let header_text = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .delimiter(detect_delimiter(header_text))
            .from_reader(text.as_bytes());
        // csv's line count skips blank lines, so lines are counted here from
        // the byte offset where each record starts.
        let line_at = |byte: u64| {
            let before = text
                .as_bytes()
                .get(..byte as usize)
                .unwrap_or(text.as_bytes());
            let rest = &text.as_bytes()[before.len()..];
            let blank = rest
                .iter()
                .take_while(|b| matches!(b, b'\r' | b'\n'))
                .count();
            first_line - 1 + line_of(&text.as_bytes()[..before.len() + blank])
        };
        let mut records = Vec::new();
        let mut record = csv::StringRecord::new();
        loop {
            let start = reader.position().byte();
            match reader.read_record(&mut record) {
                Ok(false) => break,
                Ok(true) => {
                    let byte = record.position().map_or(start, csv::Position::byte);
                    let fields: Vec<String> = record.iter().map(|f| f.trim().to_owned()).collect();
                    if fields.iter().any(|f| !f.is_empty()) {
                        records.push((line_at(byte), fields));
                    }
                }
                Err(e) => {
                    let byte = e.position().map_or(start, csv::Position::byte);
                    return Err(ExportError::Csv {
                        line: line_at(byte),
                        reason: e.to_string(),
                    });
                }
            }
        }
        let mut records = records.into_iter();
        let Some((header_line, headers)) = records.next() else {
            return Err(ExportError::Empty);
        };
        let rows: Vec<_> = records.collect();
        // Exports write every column, empty or not; a short row is a cut file.
        if let Some((line, row)) = rows.iter().find(|(_, row)| row.len() < headers.len()) {
            return Err(ExportError::ShortRow {
                line: *line,
                found: row.len(),
                expected: headers.len(),
            });
        }
        if rows.is_empty() {
            return Err(ExportError::NoRows { line: header_line });
        }
        Ok(Table {
            header_line,
            headers,
            rows,
        })
    }

    /// The index of the column whose normalized header is one of `aliases`.
    fn column(&self, column: &'static str, aliases: &[&str]) -> Result<Option<usize>, ExportError> {
        let mut found: Option<usize> = None;
        for (i, header) in self.headers.iter().enumerate() {
            if aliases.contains(&normalize(header).as_str()) {
                if let Some(first) = found {
                    return Err(ExportError::AmbiguousColumn {
                        line: self.header_line,
                        column,
                        first: echo(&self.headers[first]),
                        second: echo(header),
                    });
                }
                found = Some(i);
            }
        }
        Ok(found)
    }

    /// Like [`Table::column`], but the column must be there.
    fn required(&self, column: &'static str, aliases: &[&str]) -> Result<usize, ExportError> {
        self.column(column, aliases)?
            .ok_or_else(|| self.missing(column, aliases))
    }

    fn missing(&self, column: &'static str, aliases: &[&str]) -> ExportError {
        ExportError::MissingColumn {
            line: self.header_line,
            column,
            accepted: aliases.join(", "),
            found: headers_found(&self.headers),
        }
    }
}

/// The first headers of a table, for a message: at most 12, each cut to 40
/// characters.
fn headers_found(headers: &[String]) -> String {
    let mut found: Vec<String> = headers.iter().take(12).map(|h| echo(h)).collect();
    if headers.len() > 12 {
        found.push("…".to_owned());
    }
    found.join(", ")
}

/// A field of a row (rows are never shorter than the header; "" if one were).
fn field(row: &[String], index: usize) -> &str {
    row.get(index).map_or("", String::as_str)
}

/// `text` quoted for a CSV field if it needs to be.
fn quote(text: &str, delimiter: char) -> String {
    if text.contains([delimiter, '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_sha256_hex() {
        // SHA-256("abc") from FIPS 180-2, appendix B.1.
        assert_eq!(
            fingerprint(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_ne!(fingerprint(b"abc"), fingerprint(b"abd"));
    }

    #[test]
    fn sidecar_names_file_fingerprint_and_reason_on_their_own_lines() {
        let error = ExportError::NoRows { line: 3 };
        let sidecar = Sidecar::new("plate\n7.csv", "plate map", b"abc", &error);
        let text = sidecar.to_string();
        assert!(text.contains("file: plate 7.csv\n"), "{text}");
        assert!(text.contains("read as: plate map\n"), "{text}");
        assert!(
            text.contains(
                "sha256: ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("reason: line 3: the table has a header but no rows\n"),
            "{text}"
        );
    }

    #[test]
    fn decode_strips_bom_and_names_the_line_of_bad_bytes() {
        assert_eq!(decode(b"\xEF\xBB\xBFWell").unwrap(), "Well");
        assert_eq!(
            decode(b"a\nb\n\xFFc").unwrap_err(),
            ExportError::NotUtf8 { line: 3 }
        );
    }

    #[test]
    fn delimiter_detection() {
        assert_eq!(detect_delimiter("Well\tSample Name"), b'\t');
        assert_eq!(detect_delimiter("Plate;Well;Barcode"), b';');
        assert_eq!(detect_delimiter("Plate,Well,Barcode"), b',');
        assert_eq!(detect_delimiter("Plate"), b',');
    }

    #[test]
    fn short_rows_are_cut_files() {
        assert_eq!(
            Table::read("A,B,C\n1,2,3,\n1,2\n", 1).unwrap_err(),
            ExportError::ShortRow {
                line: 3,
                found: 2,
                expected: 3
            }
        );
    }

    #[test]
    fn table_keeps_line_numbers_across_blank_and_quoted_lines() {
        let t = Table::read("A,B\n\n1,\"x\ny\"\n2,z\n", 5).unwrap();
        assert_eq!(t.header_line, 5);
        assert_eq!(t.rows[0].0, 7);
        assert_eq!(t.rows[1].0, 9);
        assert_eq!(t.rows[0].1, vec!["1", "x\ny"]);
    }
}
