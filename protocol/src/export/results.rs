//! The results table of a QuantStudio / 7500 export ("Export" > "Results"),
//! as CSV or tab-separated text.
//!
//! Layout read:
//! - preamble lines starting with `*`, `* Key = Value` (e.g. `* Block Type =
//!   96-Well Block (0.2mL)`), kept as metadata; a line without '=' is kept
//!   with an empty value; a repeated key keeps its last value;
//! - blank lines, ignored anywhere;
//! - optionally section markers such as `[Sample Setup]` and `[Results]`: if
//!   the file has any, only the `[Results]` section is read, up to the next
//!   marker; without markers the table starts at the first other line;
//! - a header row, then one row per well and target.
//!
//! Columns (headers matched case-insensitively, ignoring spaces and
//! punctuation): "Well" (a number, counted along rows: A1 = 1, A2 = 2; or a
//! well name) and/or "Well Position" (A1), "Sample Name", "Target Name"
//! ("Detector" in older 7500 exports), "Reporter", and "CT" or "Cq". Kept if
//! present: "Task", "Ct Threshold", "Baseline Start", "Baseline End",
//! "Automatic Ct Threshold", "Omit". Others ("Ct Mean", "Quantity", ..) are ignored.
//!
//! The delimiter is detected from the header row (tab, ';' or ','). With ';'
//! or a tab between fields, a ',' in a number is read as the decimal mark
//! ("28,53"), as spreadsheets in such locales write it.
//!
//! The plate format is taken from the metadata "Block Type" if it names 96 or
//! 384, else it is the smallest format that holds every well.

use std::collections::{BTreeMap, HashMap};

use super::{ExportError, Table, decode, detect_delimiter, field, normalize, quote};
use crate::analysis::Ct;
use crate::domain::{PlateFormat, Well, WellError};
use crate::echo;

const WELL: [&str; 1] = ["well"];
const POSITION: [&str; 1] = ["wellposition"];
const SAMPLE: [&str; 2] = ["samplename", "sample"];
const TARGET: [&str; 4] = ["targetname", "target", "detectorname", "detector"];
const REPORTER: [&str; 1] = ["reporter"];
const CT: [&str; 2] = ["ct", "cq"];
const TASK: [&str; 1] = ["task"];
const THRESHOLD: [&str; 3] = ["ctthreshold", "cqthreshold", "threshold"];
const BASELINE_START: [&str; 1] = ["baselinestart"];
const BASELINE_END: [&str; 1] = ["baselineend"];
const AUTO_THRESHOLD: [&str; 2] = ["automaticctthreshold", "automaticthreshold"];
const OMIT: [&str; 1] = ["omit"];

/// The metadata key whose value names the plate format.
pub const BLOCK_TYPE: &str = "Block Type";

/// A results export: its metadata and one row per well and target.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultsFile {
    /// The `* Key = Value` preamble, keys and values trimmed.
    pub metadata: BTreeMap<String, String>,
    /// The plate format: from "Block Type", else inferred from the wells.
    pub format: PlateFormat,
    /// The rows, in file order. No (well, target) appears twice.
    pub rows: Vec<ResultRow>,
}

/// One well and target of a results export.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultRow {
    /// The well.
    pub well: Well,
    /// "Sample Name", possibly empty.
    pub sample: String,
    /// "Target Name", never empty.
    pub target: String,
    /// "Reporter" (the dye, e.g. FAM), never empty.
    pub reporter: String,
    /// The Ct: "Undetermined" or a positive cycle number.
    pub ct: Ct,
    /// "Ct Threshold", if the column is there and the field not empty.
    pub threshold: Option<f64>,
    /// "Task" (UNKNOWN, NTC, STANDARD, ..), if present and not empty.
    pub task: Option<String>,
    /// "Baseline Start", a cycle.
    pub baseline_start: Option<u32>,
    /// "Baseline End", a cycle.
    pub baseline_end: Option<u32>,
    /// "Automatic Ct Threshold": whether the instrument chose the threshold.
    pub automatic_threshold: Option<bool>,
    /// "Omit": whether the operator excluded the well in the instrument's
    /// software. The row is kept (its Ct may still be a number); reporting it
    /// is the caller's decision.
    pub omitted: Option<bool>,
}

impl ResultsFile {
    /// The file as QuantStudio-style CSV that [`read_results`] reads back
    /// equal, provided metadata keys and values hold no line break and keys
    /// no '=', text fields have no surrounding spaces, and either the
    /// metadata has a "Block Type" or the wells imply the format. Numbers are
    /// written in their shortest exact form.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (key, value) in &self.metadata {
            out.push_str(&format!("* {key} = {value}\r\n"));
        }
        out.push_str("\r\n[Results]\r\n");
        out.push_str("Well,Well Position,Sample Name,Target Name,Task,Reporter,CT,Ct Threshold,Baseline Start,Baseline End,Automatic Ct Threshold,Omit\r\n");
        let opt = |v: Option<String>| v.unwrap_or_default();
        for row in &self.rows {
            let number = usize::from(row.well.row()) * usize::from(self.format.columns())
                + usize::from(row.well.column())
                + 1;
            let ct = match row.ct {
                Ct::Determined(v) => v.to_string(),
                Ct::Undetermined => "Undetermined".to_owned(),
            };
            let fields = [
                number.to_string(),
                row.well.to_string(),
                quote(&row.sample, ','),
                quote(&row.target, ','),
                quote(row.task.as_deref().unwrap_or(""), ','),
                quote(&row.reporter, ','),
                ct,
                opt(row.threshold.map(|v| v.to_string())),
                opt(row.baseline_start.map(|v| v.to_string())),
                opt(row.baseline_end.map(|v| v.to_string())),
                opt(row.automatic_threshold.map(|v| v.to_string())),
                opt(row.omitted.map(|v| v.to_string())),
            ];
            out.push_str(&fields.join(","));
            out.push_str("\r\n");
        }
        out
    }
}

/// Where a row says its well is, before the plate format is known.
enum Place {
    Number(usize),
    Name(Well),
}

/// Reads a QuantStudio-style results export (CSV or tab-separated text).
pub fn read_results(bytes: &[u8]) -> Result<ResultsFile, ExportError> {
    let text = decode(bytes)?;
    let (metadata, table_start, table_end, first_line) = split(text);
    let table_text = &text[table_start..table_end];
    if table_text.trim().is_empty() {
        return Err(ExportError::Empty);
    }
    let table = Table::read(table_text, first_line)?;
    let decimal_comma = detect_delimiter(table_text.lines().next().unwrap_or("")) != b',';

    let well_col = table.column("well", &WELL)?;
    let position_col = table.column("well position", &POSITION)?;
    if well_col.is_none() && position_col.is_none() {
        return Err(table.missing("well", &["well", "wellposition"]));
    }
    let sample_col = table.required("sample name", &SAMPLE)?;
    let target_col = table.required("target name", &TARGET)?;
    let reporter_col = table.required("reporter", &REPORTER)?;
    let ct_col = table.required("Ct", &CT)?;
    let task_col = table.column("task", &TASK)?;
    let threshold_col = table.column("Ct threshold", &THRESHOLD)?;
    let start_col = table.column("baseline start", &BASELINE_START)?;
    let end_col = table.column("baseline end", &BASELINE_END)?;
    let auto_col = table.column("automatic Ct threshold", &AUTO_THRESHOLD)?;
    let omit_col = table.column("omit", &OMIT)?;
    let header = |i: usize| table.headers[i].clone();
    let number = |text: &str| -> Option<f64> {
        let text = if decimal_comma {
            text.replace(',', ".")
        } else {
            text.to_owned()
        };
        text.parse::<f64>().ok().filter(|v| v.is_finite())
    };
    let bad_value =
        |line: u64, col: usize, text: &str, expected: &'static str| ExportError::BadValue {
            line,
            column: header(col),
            text: echo(text),
            expected,
        };

    // First pass: everything but the well, which needs the format.
    let mut parsed = Vec::with_capacity(table.rows.len());
    for (line, row) in &table.rows {
        let line = *line;
        let required = |col: usize| -> Result<String, ExportError> {
            match field(row, col) {
                "" => Err(ExportError::MissingField {
                    line,
                    column: header(col),
                }),
                text => Ok(text.to_owned()),
            }
        };
        let bad_well = |col: usize, source: WellError| ExportError::BadWell {
            line,
            column: header(col),
            source,
        };
        let number_place = match well_col {
            None => None,
            Some(col) => {
                let text = required(col)?;
                Some(if text.bytes().all(|b| b.is_ascii_digit()) {
                    match text.trim_start_matches('0').parse::<usize>() {
                        Ok(n) if (1..=PlateFormat::Wells384.well_count()).contains(&n) => {
                            Place::Number(n)
                        }
                        _ => {
                            return Err(ExportError::BadWellNumber {
                                line,
                                column: header(col),
                                text: echo(&text),
                                count: PlateFormat::Wells384.well_count(),
                            });
                        }
                    }
                } else {
                    Place::Name(text.parse().map_err(|e| bad_well(col, e))?)
                })
            }
        };
        let position = match position_col {
            None => None,
            Some(col) => Some(
                required(col)?
                    .parse::<Well>()
                    .map_err(|e| bad_well(col, e))?,
            ),
        };
        let ct_text = field(row, ct_col);
        let ct = if ct_text.eq_ignore_ascii_case("undetermined") {
            Ct::Undetermined
        } else {
            match number(ct_text) {
                Some(v) if v > 0.0 => Ct::Determined(v),
                _ => {
                    return Err(ExportError::BadCt {
                        line,
                        column: header(ct_col),
                        text: echo(ct_text),
                    });
                }
            }
        };
        let optional = |col: Option<usize>| col.map(|c| field(row, c)).filter(|t| !t.is_empty());
        let threshold = match optional(threshold_col) {
            None => None,
            Some(t) => Some(
                number(t)
                    .filter(|v| *v >= 0.0)
                    .ok_or_else(|| bad_value(line, threshold_col.unwrap_or(0), t, "a number"))?,
            ),
        };
        let cycle = |col: Option<usize>| -> Result<Option<u32>, ExportError> {
            match optional(col) {
                None => Ok(None),
                Some(t) => t
                    .parse::<u32>()
                    .map(Some)
                    .map_err(|_| bad_value(line, col.unwrap_or(0), t, "a cycle number")),
            }
        };
        let flag = |col: Option<usize>| -> Result<Option<bool>, ExportError> {
            match optional(col) {
                None => Ok(None),
                Some(t) if t.eq_ignore_ascii_case("true") => Ok(Some(true)),
                Some(t) if t.eq_ignore_ascii_case("false") => Ok(Some(false)),
                Some(t) => Err(bad_value(line, col.unwrap_or(0), t, "true or false")),
            }
        };
        parsed.push((
            line,
            number_place,
            position,
            ResultRow {
                well: Well::new(0, 0),
                sample: field(row, sample_col).to_owned(),
                target: required(target_col)?,
                reporter: required(reporter_col)?,
                ct,
                threshold,
                task: optional(task_col).map(str::to_owned),
                baseline_start: cycle(start_col)?,
                baseline_end: cycle(end_col)?,
                automatic_threshold: flag(auto_col)?,
                omitted: flag(omit_col)?,
            },
        ));
    }

    let format = block_type(&metadata).unwrap_or_else(|| {
        let fits_96 = parsed.iter().all(|(_, number, position, _)| {
            let named_fits = |w: &Well| PlateFormat::Wells96.contains(*w);
            (match number {
                Some(Place::Number(n)) => *n <= PlateFormat::Wells96.well_count(),
                Some(Place::Name(w)) => named_fits(w),
                None => true,
            }) && position.as_ref().is_none_or(named_fits)
        });
        if fits_96 {
            PlateFormat::Wells96
        } else {
            PlateFormat::Wells384
        }
    });

    // Second pass: wells on the plate, number and position agreeing, and no
    // well and target twice.
    let mut seen: HashMap<(Well, String), u64> = HashMap::new();
    let mut rows = Vec::with_capacity(parsed.len());
    for (line, number, position, mut row) in parsed {
        let columns = usize::from(format.columns());
        let from_number = match number {
            Some(Place::Number(n)) => {
                if n > format.well_count() {
                    return Err(ExportError::BadWellNumber {
                        line,
                        column: header(well_col.unwrap_or(0)),
                        text: n.to_string(),
                        count: format.well_count(),
                    });
                }
                // Below 384, so row and column fit in a u8.
                let row = u8::try_from((n - 1) / columns).unwrap_or(u8::MAX);
                let column = u8::try_from((n - 1) % columns).unwrap_or(u8::MAX);
                Some((Well::new(row, column), Some(n)))
            }
            Some(Place::Name(w)) => Some((w, None)),
            None => None,
        };
        if let Some(p) = position.filter(|p| !format.contains(*p)) {
            return Err(ExportError::BadWell {
                line,
                column: header(position_col.unwrap_or(0)),
                source: WellError::OutsideFormat {
                    well: p.to_string(),
                    format,
                },
            });
        }
        let well = match (from_number, position) {
            (Some((a, n)), Some(b)) if a != b => {
                return Err(ExportError::WellMismatch {
                    line,
                    number: n.unwrap_or(0),
                    expected: a.to_string(),
                    position: b.to_string(),
                });
            }
            (_, Some(w)) | (Some((w, _)), None) => w,
            (None, None) => unreachable_well(),
        };
        if !format.contains(well) {
            return Err(ExportError::BadWell {
                line,
                column: header(position_col.or(well_col).unwrap_or(0)),
                source: WellError::OutsideFormat {
                    well: well.to_string(),
                    format,
                },
            });
        }
        row.well = well;
        if let Some(&first_line) = seen.get(&(well, row.target.clone())) {
            return Err(ExportError::DuplicateResult {
                line,
                first_line,
                well: well.to_string(),
                target: echo(&row.target),
            });
        }
        seen.insert((well, row.target.clone()), line);
        rows.push(row);
    }

    Ok(ResultsFile {
        metadata,
        format,
        rows,
    })
}

/// A row with neither well column: impossible, the header check requires one.
/// A well that exists on no plate, so that even then nothing panics and the
/// row is refused as off the plate.
fn unreachable_well() -> Well {
    Well::new(u8::MAX, u8::MAX)
}

/// The format named by the "Block Type" metadata, if it names one.
fn block_type(metadata: &BTreeMap<String, String>) -> Option<PlateFormat> {
    let value = metadata
        .iter()
        .find(|(k, _)| normalize(k) == normalize(BLOCK_TYPE))?
        .1;
    if value.contains("384") {
        Some(PlateFormat::Wells384)
    } else if value.contains("96") {
        Some(PlateFormat::Wells96)
    } else {
        None
    }
}

/// Splits the text into the `*` metadata and the byte range of the table,
/// with the line number of the range's first line.
fn split(text: &str) -> (BTreeMap<String, String>, usize, usize, u64) {
    let has_sections = text.lines().any(is_marker);
    let mut metadata = BTreeMap::new();
    let mut start: Option<(usize, u64)> = None;
    let mut in_results = false;
    let mut offset = 0;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let line_no = index as u64 + 1;
        let here = offset;
        offset += line.len();
        let trimmed = line.trim();
        match start {
            None => {
                if let Some(meta) = trimmed.strip_prefix('*') {
                    let (key, value) = meta.split_once('=').unwrap_or((meta, ""));
                    metadata.insert(key.trim().to_owned(), value.trim().to_owned());
                } else if is_marker(trimmed) {
                    in_results = normalize(trimmed) == "results";
                } else if !trimmed.is_empty() && (in_results || !has_sections) {
                    start = Some((here, line_no));
                }
            }
            Some((begin, first)) => {
                if is_marker(trimmed) {
                    return (metadata, begin, here, first);
                }
            }
        }
    }
    match start {
        Some((begin, first)) => (metadata, begin, text.len(), first),
        None => (metadata, text.len(), text.len(), 1),
    }
}

/// A section marker line such as `[Results]`.
fn is_marker(line: &str) -> bool {
    let line = line.trim();
    line.len() >= 2 && line.starts_with('[') && line.ends_with(']') && !line.contains(['\t', ','])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(s: &str) -> Well {
        s.parse().unwrap()
    }

    #[test]
    fn reads_the_96_well_fixture() {
        let file = read_results(include_bytes!("testdata/quantstudio_96.csv")).unwrap();
        assert_eq!(file.format, PlateFormat::Wells96);
        assert_eq!(
            file.metadata.get("Experiment Barcode").map(String::as_str),
            Some("PCR-20261127-03")
        );
        assert_eq!(
            file.metadata.get("Instrument Type").map(String::as_str),
            Some("QuantStudio™ 5 System")
        );
        assert_eq!(file.rows.len(), 24);
        let first = &file.rows[0];
        assert_eq!(first.well, w("A1"));
        assert_eq!(first.sample, "COV-2026-000101");
        assert_eq!(first.target, "N1");
        assert_eq!(first.reporter, "FAM");
        assert_eq!(first.ct, Ct::Determined(24.517));
        assert_eq!(first.threshold, Some(0.2));
        assert_eq!(first.task.as_deref(), Some("UNKNOWN"));
        assert_eq!(first.baseline_start, Some(3));
        assert_eq!(first.baseline_end, Some(18));
        assert_eq!(first.automatic_threshold, Some(false));
        assert_eq!(first.omitted, Some(false));
        let targets: std::collections::BTreeSet<_> =
            file.rows.iter().map(|r| r.target.as_str()).collect();
        assert_eq!(targets.len(), 3);
        assert!(file.rows.iter().any(|r| r.ct == Ct::Undetermined));
    }

    #[test]
    fn reads_the_384_well_tab_fixture() {
        let file = read_results(include_bytes!("testdata/quantstudio_384.txt")).unwrap();
        assert_eq!(file.format, PlateFormat::Wells384);
        assert_eq!(file.rows.len(), 12);
        // Well 25 on a 384-well plate is B1; the file says so in both columns.
        assert!(file.rows.iter().any(|r| r.well == w("B1")));
        assert!(file.rows.iter().any(|r| r.well == w("P24")));
        assert_eq!(file.rows[0].ct, Ct::Determined(31.25));
    }

    fn error(text: &str) -> String {
        read_results(text.as_bytes()).unwrap_err().to_string()
    }

    const HEAD: &str = "* Block Type = 96-Well Block (0.2mL)\n\nWell,Well Position,Sample Name,Target Name,Reporter,CT\n";

    #[test]
    fn ct_values_other_than_numbers_and_undetermined_are_refused() {
        for bad in ["", "NaN", "-1.5", "0", "n/a", "inf", "40*"] {
            let err = error(&format!("{HEAD}1,A1,S1,N1,FAM,{bad}\n"));
            assert_eq!(
                err,
                format!(
                    "line 4, column \"CT\": {bad:?} is not a Ct; expected a positive cycle number or \"Undetermined\""
                )
            );
        }
        let ok = read_results(format!("{HEAD}1,A1,S1,N1,FAM,UNDETERMINED\n").as_bytes()).unwrap();
        assert_eq!(ok.rows[0].ct, Ct::Undetermined);
    }

    #[test]
    fn well_errors() {
        assert_eq!(
            error(&format!("{HEAD}1,A2,S1,N1,FAM,20\n")),
            "line 4: well number 1 is A1 on this plate, but the well position says A2"
        );
        assert_eq!(
            error(&format!("{HEAD}97,A1,S1,N1,FAM,20\n")),
            "line 4, column \"Well\": \"97\" is not a well number 1..=96"
        );
        assert_eq!(
            error(&format!("{HEAD}1,A13,S1,N1,FAM,20\n")),
            "line 4, column \"Well Position\": well \"A13\" is outside a 96-well plate (A1..H12)"
        );
        assert_eq!(
            error(&format!("{HEAD}1,A1,S1,N1,FAM,20\n1,A1,S1,N1,FAM,21\n")),
            "line 5: well A1, target \"N1\" already has a result on line 4"
        );
    }

    #[test]
    fn sections_semicolons_and_decimal_commas() {
        let text = "* Experiment Name = run 7\n\n[Sample Setup]\nWell;Sample Name\n1;S1\n\n[Results]\nWell Position;Sample Name;Target Name;Reporter;Cq;Threshold\nB2;S1;N2;VIC;28,53;0,15\n\n[Amplification Data]\nWell;Cycle\n";
        let file = read_results(text.as_bytes()).unwrap();
        assert_eq!(file.rows.len(), 1);
        assert_eq!(file.rows[0].well, w("B2"));
        assert_eq!(file.rows[0].ct, Ct::Determined(28.53));
        assert_eq!(file.rows[0].threshold, Some(0.15));
        assert_eq!(file.metadata["Experiment Name"], "run 7");
    }

    #[test]
    fn missing_and_ambiguous_columns() {
        assert_eq!(
            error("Well Position,Sample Name,Target Name,Reporter\nA1,S,N1,FAM\n"),
            "line 1: no Ct column (accepted headers: ct, cq; found: Well Position, Sample Name, Target Name, Reporter)"
        );
        assert!(
            error("Well Position,Sample Name,Target Name,Reporter,CT,Cq\nA1,S,N1,FAM,1,1\n")
                .contains("both name the Ct column")
        );
        assert!(
            error("Sample Name,Target Name,Reporter,CT\nS,N1,FAM,1\n")
                .starts_with("line 1: no well column")
        );
        assert_eq!(
            read_results(b"* a = b\n\n").unwrap_err(),
            ExportError::Empty
        );
        assert_eq!(
            read_results(b"[Results]\nWell,Sample Name,Target Name,Reporter,CT\n").unwrap_err(),
            ExportError::NoRows { line: 2 }
        );
    }

    #[test]
    fn render_reads_back() {
        let file = read_results(include_bytes!("testdata/quantstudio_96.csv")).unwrap();
        assert_eq!(read_results(file.render().as_bytes()).unwrap(), file);
        let file = read_results(include_bytes!("testdata/quantstudio_384.txt")).unwrap();
        assert_eq!(read_results(file.render().as_bytes()).unwrap(), file);
    }
}
