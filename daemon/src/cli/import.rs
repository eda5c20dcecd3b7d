//! Reading and checking a tube CSV before anything is sent.
//!
//! The daemon checks every batch too, but an import goes out in several batches: a bad
//! row found by the daemon in batch 3 would leave batches 1 and 2 received. Checking
//! the whole file here first means a bad file is refused as a whole, with every problem
//! and its line number, and the daemon sees nothing.

use std::collections::HashMap;
use std::io::Read;

use pcrd_protocol::domain::{Barcode, PoolSize, Priority, Timestamp};

use crate::api::dto::TubeIn;
use crate::lab::Due;

/// The columns a tube CSV may have; only `barcode` is required.
const COLUMNS: [&str; 5] = ["barcode", "pool_size", "priority", "due_in", "due_at"];

/// Where each known column is in the file.
#[derive(Debug, Default)]
struct Columns {
    index: [Option<usize>; COLUMNS.len()],
}

impl Columns {
    fn get<'r>(&self, record: &'r csv::StringRecord, column: usize) -> Option<&'r str> {
        let i = self.index[column]?;
        record.get(i).filter(|text| !text.is_empty())
    }
}

/// Reads every row of a tube CSV, or returns every problem found, each starting with
/// its line number.
pub(super) fn read_tubes(input: impl Read) -> Result<Vec<TubeIn>, Vec<String>> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        // Rows of the wrong length are reported below with their line, instead of
        // stopping at the first.
        .flexible(true)
        .from_reader(input);
    let header = reader
        .headers()
        .map_err(|e| vec![format!("line 1: cannot read the header: {e}")])?
        .clone();
    let columns = parse_header(&header)?;
    let mut problems = Vec::new();
    let mut tubes = Vec::new();
    let mut seen: HashMap<String, (u64, (u32, String))> = HashMap::new();
    for result in reader.records() {
        let record = match result {
            Ok(record) => record,
            Err(e) => {
                let line = e.position().map_or(0, csv::Position::line);
                let fatal = matches!(e.kind(), csv::ErrorKind::Io(_));
                problems.push(format!("line {line}: {e}"));
                if fatal {
                    break;
                }
                continue;
            }
        };
        let line = record.position().map_or(0, csv::Position::line);
        if record.len() != header.len() {
            problems.push(format!(
                "line {line}: {} fields, but the header has {}",
                record.len(),
                header.len()
            ));
            continue;
        }
        let mut row_problems = Vec::new();
        let tube = parse_row(&columns, &record, &mut row_problems);
        problems.extend(
            row_problems
                .into_iter()
                .map(|p| format!("line {line}: {p}")),
        );
        let Some(tube) = tube else { continue };
        // The daemon takes an identical repeat as a retry but refuses a tube listed twice
        // with different values; compare what the daemon would store, defaults included.
        let stored = (
            tube.pool_size.unwrap_or(1),
            tube.priority
                .clone()
                .unwrap_or_else(|| Priority::default().to_string()),
        );
        match seen.get(&tube.barcode) {
            Some((first, earlier)) if *earlier != stored => problems.push(format!(
                "line {line}: tube {} is also on line {first} with a different pool size or priority",
                tube.barcode
            )),
            Some(_) => {}
            None => {
                seen.insert(tube.barcode.clone(), (line, stored));
            }
        }
        tubes.push(tube);
    }
    if problems.is_empty() && tubes.is_empty() {
        problems.push("the file has a header but no tubes".into());
    }
    if problems.is_empty() {
        Ok(tubes)
    } else {
        Err(problems)
    }
}

fn parse_header(header: &csv::StringRecord) -> Result<Columns, Vec<String>> {
    let mut columns = Columns::default();
    let mut problems = Vec::new();
    let mut unknown = Vec::new();
    for (i, name) in header.iter().enumerate() {
        match COLUMNS.iter().position(|c| c.eq_ignore_ascii_case(name)) {
            Some(c) if columns.index[c].is_some() => {
                problems.push(format!("line 1: column {:?} appears twice", COLUMNS[c]));
            }
            Some(c) => columns.index[c] = Some(i),
            None => unknown.push(format!("{name:?}")),
        }
    }
    if !unknown.is_empty() {
        problems.push(format!(
            "line 1: unknown column(s) {}; the columns are {}",
            unknown.join(", "),
            COLUMNS.join(", ")
        ));
    }
    if columns.index[0].is_none() && header.iter().any(|name| !name.is_empty()) {
        problems.push("line 1: no barcode column in the header".into());
    } else if header.iter().all(str::is_empty) {
        problems.push(format!(
            "line 1: expected a header row naming the columns, at least \"barcode\" (of {})",
            COLUMNS.join(", ")
        ));
    }
    if problems.is_empty() {
        Ok(columns)
    } else {
        Err(problems)
    }
}

/// One row as the API takes it, with values normalised (`Urgent` -> `urgent`), or
/// `None` after adding what is wrong with it to `problems`.
fn parse_row(
    columns: &Columns,
    record: &csv::StringRecord,
    problems: &mut Vec<String>,
) -> Option<TubeIn> {
    let before = problems.len();
    let barcode = match columns.get(record, 0) {
        None => {
            problems.push("no barcode".into());
            None
        }
        Some(text) => Barcode::new(text)
            .map_err(|e| problems.push(e.to_string()))
            .ok(),
    };
    let pool_size = columns.get(record, 1).and_then(|text| {
        text.parse::<PoolSize>()
            .map(|p| u32::from(p.get()))
            .map_err(|e| problems.push(e.to_string()))
            .ok()
    });
    let priority = columns.get(record, 2).and_then(|text| {
        text.parse::<Priority>()
            .map(|p| p.to_string())
            .map_err(|e| problems.push(e.to_string()))
            .ok()
    });
    let due_in = columns.get(record, 3);
    let due_at = columns.get(record, 4);
    // The daemon's own rules, so a file that passes here is not refused there.
    let dues = [
        due_in.map(|t| Due::In(t.into())),
        due_at.map(|t| Due::At(t.into())),
    ];
    for due in dues.iter().flatten() {
        if let Err(e) = due.resolve(Timestamp::from_millis(0)) {
            problems.push(e);
        }
    }
    if due_in.is_some() && due_at.is_some() {
        problems.push("give due_in or due_at, not both".into());
    }
    if problems.len() > before {
        return None;
    }
    Some(TubeIn {
        barcode: barcode?.to_string(),
        pool_size,
        priority,
        due_at: due_at.map(str::to_string),
        due_in: due_in.map(str::to_string),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<Vec<TubeIn>, Vec<String>> {
        read_tubes(text.as_bytes())
    }

    #[test]
    fn reads_columns_in_any_order_and_case() {
        let tubes =
            read("Priority,BARCODE,due_in,pool_size\nurgent,SWAB-0001,4h,5\n,SWAB-0002,,\n")
                .expect("valid file");
        assert_eq!(tubes.len(), 2);
        assert_eq!(tubes[0].barcode, "SWAB-0001");
        assert_eq!(tubes[0].priority.as_deref(), Some("urgent"));
        assert_eq!(tubes[0].pool_size, Some(5));
        assert_eq!(tubes[0].due_in.as_deref(), Some("4h"));
        assert_eq!(tubes[1].barcode, "SWAB-0002");
        assert_eq!(tubes[1].priority, None);
        assert_eq!(tubes[1].pool_size, None);
        assert_eq!(tubes[1].due_in, None);
    }

    #[test]
    fn a_byte_order_mark_and_padding_are_ignored() {
        let tubes = read("\u{feff}barcode , priority\r\n SWAB-0001 , Routine \r\n").expect("valid");
        assert_eq!(tubes[0].barcode, "SWAB-0001");
        assert_eq!(tubes[0].priority.as_deref(), Some("routine"));
    }

    #[test]
    fn every_bad_row_is_reported_with_its_line() {
        let problems = read(
            "barcode,pool_size,priority\nSWAB-0001,1,routine\nAB,1,routine\nSWAB-0003,25,soon\nSWAB-0004,1\n",
        )
        .expect_err("bad rows");
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems[0].starts_with("line 3: ") && problems[0].contains("AB"));
        assert!(problems[1].starts_with("line 4: ") && problems[1].contains("25"));
        assert!(problems[2].starts_with("line 4: ") && problems[2].contains("soon"));
        assert!(problems[3].starts_with("line 5: ") && problems[3].contains("2 fields"));
    }

    #[test]
    fn unknown_and_missing_columns_are_named() {
        let problems = read("barcode,colour,ward\nSWAB-0001,red,3\n").expect_err("unknown");
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("\"colour\", \"ward\""), "{problems:?}");
        let problems = read("pool_size\n1\n").expect_err("no barcode");
        assert!(problems[0].contains("no barcode column"), "{problems:?}");
        let problems = read("barcode,Barcode\nA,B\n").expect_err("twice");
        assert!(problems[0].contains("twice"), "{problems:?}");
    }

    #[test]
    fn due_times_are_checked_like_the_daemon_does() {
        let problems = read(
            "barcode,due_in,due_at\nSWAB-0001,4h,2026-11-27T15:00:00Z\nSWAB-0002,soon,\nSWAB-0003,,tomorrow\nSWAB-0004,90d,\n",
        )
        .expect_err("bad due times");
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems[0].starts_with("line 2: ") && problems[0].contains("not both"));
        assert!(problems[1].starts_with("line 3: "));
        assert!(problems[2].starts_with("line 4: "));
        assert!(problems[3].starts_with("line 5: ") && problems[3].contains("30 days"));
    }

    #[test]
    fn a_tube_twice_is_fine_only_if_both_rows_agree() {
        assert_eq!(
            read("barcode,pool_size\nSWAB-0001,1\nSWAB-0001,\n")
                .expect("same tube twice")
                .len(),
            2
        );
        let problems =
            read("barcode,pool_size\nSWAB-0001,5\nSWAB-0001,10\n").expect_err("disagreeing rows");
        assert!(
            problems[0].starts_with("line 3: ") && problems[0].contains("line 2"),
            "{problems:?}"
        );
    }

    #[test]
    fn an_empty_file_or_header_only_is_refused() {
        assert!(read("").is_err());
        assert!(read("barcode\n").expect_err("no rows")[0].contains("no tubes"));
    }
}
