//! Text for people: plate maps, aligned tables and short relative times.
//!
//! Everything here is a pure function of API views (and, for relative times, of `now`
//! passed in), so the layout is unit-tested without a daemon or a terminal.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use pcrd_protocol::domain::{PlateFormat, Well};

use crate::api::dto::{PlateView, WellView};

/// Spaces between legend entries and table columns.
const GAP: &str = "  ";

/// A plate as a map: a header (id, kind, kit, format, state, counts, lineage), a grid
/// of short cell labels, and a legend from well to full barcode, so a cell that shows
/// only the end of a barcode is never ambiguous.
///
/// With `color`, controls are highlighted with ANSI codes; alignment is computed on the
/// plain text first, so colored and plain maps line up the same.
pub(super) fn render_plate(plate: &PlateView, color: bool) -> String {
    let mut out = plate_header(plate);
    let (placed, unplaced) = locate_wells(plate);
    let mut width = 0;
    match PlateFormat::try_from(plate.format) {
        Ok(format) => {
            let grid = plate_grid(format, &placed, color);
            width = grid.lines().map(str::len).max().unwrap_or(0);
            out.push('\n');
            out.push_str(&grid);
        }
        Err(_) => {
            let _ = writeln!(out, "\n(no map for a {}-well plate)", plate.format);
        }
    }
    let mut samples: Vec<(String, String)> = placed
        .iter()
        .filter_map(|(well, view)| Some((well.to_string(), view.barcode.clone()?)))
        .collect();
    samples.extend(
        unplaced
            .iter()
            .filter_map(|view| Some((view.well.clone(), view.barcode.clone()?))),
    );
    if !samples.is_empty() {
        out.push_str("\nsamples (well, tube):\n");
        out.push_str(&well_list(&samples, width.max(80)));
    }
    out
}

fn plate_header(plate: &PlateView) -> String {
    let mut rows = vec![
        (
            "plate",
            format!("{} ({}, {})", plate.id, plate.kind, plate.state),
        ),
        ("kit", format!("{}@{}", plate.kit, plate.kit_version)),
        ("format", format!("{} wells", plate.format)),
        (
            "contents",
            format!(
                "{} samples, {} controls, {} free",
                plate.samples, plate.controls, plate.free
            ),
        ),
        (
            "created",
            format!("{} by {}", short_time(&plate.created_at), plate.created_by),
        ),
    ];
    if let Some(at) = &plate.sealed_at {
        let by = plate.sealed_by.as_deref().unwrap_or("?");
        rows.push(("sealed", format!("{} by {by}", short_time(at))));
    }
    if let Some(lineage) = &plate.lineage {
        let text = if lineage.kind == "quadrants" {
            let quadrants: Vec<String> = lineage
                .sources
                .iter()
                .enumerate()
                .map(|(i, source)| format!("Q{} {source}", i + 1))
                .collect();
            format!("quadrants of {}", quadrants.join(", "))
        } else {
            format!("{} from {}", lineage.kind, lineage.sources.join(", "))
        };
        rows.push(("lineage", text));
    }
    if !plate.children.is_empty() {
        rows.push(("children", plate.children.join(", ")));
    }
    key_values(&rows)
}

/// Splits the occupied wells into those with a well name we can put on the grid and
/// any we cannot (a daemon newer than this client might send names we do not parse;
/// they still appear in the legend).
fn locate_wells(plate: &PlateView) -> (Vec<(Well, &WellView)>, Vec<&WellView>) {
    let mut placed = Vec::new();
    let mut unplaced = Vec::new();
    for view in &plate.wells {
        match view.well.parse::<Well>() {
            Ok(well) => placed.push((well, view)),
            Err(_) => unplaced.push(view),
        }
    }
    placed.sort_by_key(|(well, _)| *well);
    (placed, unplaced)
}

fn plate_grid(format: PlateFormat, wells: &[(Well, &WellView)], color: bool) -> String {
    let rows = usize::from(format.rows());
    let columns = usize::from(format.columns());
    // Six characters tell tubes apart on a 96-well plate; on a 384-well plate four keep
    // 24 columns within about 125 characters.
    let tail = if columns > 12 { 4 } else { 6 };
    // "NTC" and "ENC" must fit even if a barcode tail is shorter.
    let cell = tail.max(3);
    let mut grid = vec![vec![Cell::Empty; columns]; rows];
    for (well, view) in wells {
        if let Some(slot) = grid
            .get_mut(usize::from(well.row()))
            .and_then(|row| row.get_mut(usize::from(well.column())))
        {
            *slot = Cell::of(view, tail);
        }
    }
    let mut out = String::from("   ");
    for column in 1..=columns {
        let _ = write!(out, " {column:<cell$}");
    }
    out = out.trim_end().to_string();
    out.push('\n');
    for (r, row) in grid.iter().enumerate() {
        let _ = write!(out, "{:<3}", row_letter(r));
        let mut line = String::new();
        for content in row {
            line.push(' ');
            line.push_str(&content.paint(cell, color));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// "A" for row 0, as the well names spell it.
fn row_letter(r: usize) -> String {
    let name = Well::new(u8::try_from(r).unwrap_or(u8::MAX), 0).to_string();
    name.trim_end_matches(|c: char| c.is_ascii_digit())
        .to_string()
}

/// What a grid cell shows.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cell {
    Empty,
    Sample(String),
    Control(&'static str),
}

impl Cell {
    fn of(view: &WellView, tail: usize) -> Cell {
        if let Some(control) = &view.control {
            return Cell::Control(control_label(control));
        }
        match &view.barcode {
            Some(barcode) => {
                let skip = barcode.chars().count().saturating_sub(tail);
                Cell::Sample(barcode.chars().skip(skip).collect())
            }
            None => Cell::Control("?"),
        }
    }

    /// The cell padded to `width`, then colored, so escape codes never shift columns.
    fn paint(&self, width: usize, color: bool) -> String {
        let (text, ansi) = match self {
            Cell::Empty => (".", "2"),
            Cell::Sample(tail) => (tail.as_str(), ""),
            Cell::Control("PC") => ("PC", "1;35"),
            Cell::Control("NTC") => ("NTC", "1;36"),
            Cell::Control(label) => (*label, "1;33"),
        };
        let padded = format!("{text:<width$}");
        if color && !ansi.is_empty() {
            let trimmed = padded.trim_end();
            let pad = &padded[trimmed.len()..];
            format!("\x1b[{ansi}m{trimmed}\x1b[0m{pad}")
        } else {
            padded
        }
    }
}

/// The label printed on plate maps for a control named as the API names it.
fn control_label(control: &str) -> &'static str {
    match control {
        "positive_control" => "PC",
        "no_template_control" => "NTC",
        "extraction_negative_control" => "ENC",
        // A control kind newer than this client: still visibly a control.
        _ => "CTL",
    }
}

/// `well  barcode` pairs laid out in as many columns as fit in `width`, read left to
/// right, so a full plate's legend stays about 25 lines instead of 94.
pub(super) fn well_list(pairs: &[(String, String)], width: usize) -> String {
    let well_w = pairs.iter().map(|(w, _)| w.len()).max().unwrap_or(0);
    let code_w = pairs
        .iter()
        .map(|(_, b)| b.chars().count())
        .max()
        .unwrap_or(0);
    let entry_w = well_w + 1 + code_w;
    let per_line = ((width + GAP.len()) / (entry_w + GAP.len())).max(1);
    let mut out = String::new();
    for line in pairs.chunks(per_line) {
        let entries: Vec<String> = line
            .iter()
            .map(|(well, barcode)| format!("{well:<well_w$} {barcode:<code_w$}"))
            .collect();
        out.push_str("  ");
        out.push_str(entries.join(GAP).trim_end());
        out.push('\n');
    }
    out
}

/// Left-aligned columns under a header row, two spaces apart, no trailing spaces.
pub(super) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (cell, width) in cells.zip(&widths) {
            let _ = write!(text, "{cell:<width$}{GAP}");
        }
        let mut text = text.trim_end().to_string();
        text.push('\n');
        text
    };
    let mut out = line(&mut header.iter().copied());
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

/// `key  value` lines with the values aligned.
pub(super) fn key_values(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(key, value)| format!("{key:<width$}  {value}\n"))
        .collect()
}

/// An API time (RFC 3339 with milliseconds) to the second, which is what people read;
/// text that does not parse is shown as it came.
pub(super) fn short_time(text: &str) -> String {
    match humantime::parse_rfc3339_weak(text) {
        Ok(t) => humantime::format_rfc3339_seconds(t).to_string(),
        Err(_) => text.to_string(),
    }
}

/// "in 3h12m" or "overdue 5m".
pub(super) fn due_in(due: SystemTime, now: SystemTime) -> String {
    match due.duration_since(now) {
        Ok(ahead) => format!("in {}", short_duration(ahead)),
        Err(late) => format!("overdue {}", short_duration(late.duration())),
    }
}

/// "5m ago"; a time slightly in the future (clock skew with the daemon) reads "now".
pub(super) fn ago(then: SystemTime, now: SystemTime) -> String {
    match now.duration_since(then) {
        Ok(d) if d >= Duration::from_secs(1) => format!("{} ago", short_duration(d)),
        _ => "now".into(),
    }
}

/// Two units at most: "45s", "12m", "3h12m", "2d4h".
pub(super) fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (days, hours, minutes) = (s / 86_400, s / 3600 % 24, s / 60 % 60);
    match (days, hours, minutes) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, m) => format!("{m}m"),
        (0, h, 0) => format!("{h}h"),
        (0, h, m) => format!("{h}h{m}m"),
        (d, 0, _) => format!("{d}d"),
        (d, h, _) => format!("{d}d{h}h"),
    }
}

/// "1 tube", "3 tubes", "2 batches".
pub(super) fn count(n: usize, noun: &str) -> String {
    match n {
        1 => format!("1 {noun}"),
        _ if noun.ends_with("ch") => format!("{n} {noun}es"),
        _ => format!("{n} {noun}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::dto::LineageView;

    fn sample(well: &str, barcode: &str) -> WellView {
        WellView {
            well: well.into(),
            kind: "sample".into(),
            barcode: Some(barcode.into()),
            control: None,
        }
    }

    fn control(well: &str, control: &str) -> WellView {
        WellView {
            well: well.into(),
            kind: "control".into(),
            barcode: None,
            control: Some(control.into()),
        }
    }

    fn plate(format: u16, wells: Vec<WellView>) -> PlateView {
        let samples = wells.iter().filter(|w| w.kind == "sample").count();
        let controls = wells.len() - samples;
        PlateView {
            id: "PL-000001".into(),
            kind: "extraction".into(),
            kit: "sarscov2-orf1ab-n-ic".into(),
            kit_version: "1.0".into(),
            format,
            state: "open".into(),
            samples,
            controls,
            free: usize::from(format) - wells.len(),
            wells,
            lineage: None,
            children: Vec::new(),
            created_at: "2026-11-27T14:03:12.345Z".into(),
            created_by: "tina".into(),
            sealed_at: None,
            sealed_by: None,
        }
    }

    /// The grid's lines: the column header, then one per row letter.
    fn grid_lines(map: &str) -> Vec<&str> {
        let start = map
            .lines()
            .position(|l| l.trim_start().starts_with("1 "))
            .expect("column header");
        map.lines()
            .skip(start)
            .take_while(|l| !l.is_empty())
            .collect()
    }

    /// The cell text at `row` (0-based) and `column` (0-based) of a plain grid.
    fn cell(map: &str, row: usize, column: usize, width: usize) -> String {
        let line = grid_lines(map)[row + 1];
        let start = 3 + column * (width + 1) + 1;
        line.get(start..(start + width).min(line.len()))
            .unwrap_or("")
            .trim()
            .to_string()
    }

    #[test]
    fn a_96_well_plate_shows_controls_and_samples_in_their_wells() {
        let map = render_plate(
            &plate(
                96,
                vec![
                    sample("A1", "SWAB-000101"),
                    sample("B1", "SWAB-000102"),
                    control("G12", "no_template_control"),
                    control("H12", "positive_control"),
                ],
            ),
            false,
        );
        let grid = grid_lines(&map);
        assert_eq!(grid.len(), 9, "header and rows A..H:\n{map}");
        assert!(grid[0].trim_start().starts_with("1 ") && grid[0].ends_with("12"));
        for (i, line) in grid[1..].iter().enumerate() {
            let letter = char::from(b'A' + u8::try_from(i).unwrap());
            assert!(line.starts_with(letter), "row {i} is {line:?}");
        }
        assert_eq!(cell(&map, 0, 0, 6), "000101");
        assert_eq!(cell(&map, 1, 0, 6), "000102");
        assert_eq!(cell(&map, 2, 0, 6), ".");
        assert_eq!(cell(&map, 0, 1, 6), ".");
        assert_eq!(cell(&map, 6, 11, 6), "NTC");
        assert_eq!(cell(&map, 7, 11, 6), "PC");
        assert_eq!(cell(&map, 7, 10, 6), ".");
        // Every row has the same layout, so columns line up.
        assert!(
            grid[1..]
                .iter()
                .all(|l| l.len() <= grid[1].len().max(grid[7].len()))
        );
        assert!(!map.contains('\x1b'), "no color when not asked");
    }

    #[test]
    fn the_header_names_the_plate_and_counts_its_wells() {
        let mut view = plate(96, vec![control("H12", "positive_control")]);
        view.lineage = Some(LineageView {
            kind: "quadrants".into(),
            sources: vec!["P1".into(), "P2".into(), "P3".into(), "P4".into()],
        });
        let map = render_plate(&view, false);
        assert!(map.contains("PL-000001 (extraction, open)"), "{map}");
        assert!(map.contains("sarscov2-orf1ab-n-ic@1.0"));
        assert!(map.contains("0 samples, 1 controls, 95 free"));
        assert!(
            map.contains("created   2026-11-27T14:03:12Z by tina"),
            "{map}"
        );
        assert!(map.contains("quadrants of Q1 P1, Q2 P2, Q3 P3, Q4 P4"));
        assert!(
            !map.contains("samples (well, tube)"),
            "no legend without samples"
        );
    }

    #[test]
    fn the_legend_lists_every_sample_in_column_major_order() {
        let map = render_plate(
            &plate(
                96,
                vec![
                    sample("A2", "TUBE-C"),
                    sample("B1", "TUBE-B"),
                    sample("A1", "TUBE-A"),
                    control("H12", "positive_control"),
                ],
            ),
            false,
        );
        let legend = &map[map.find("samples (well, tube)").expect("legend")..];
        let a = legend.find("A1 TUBE-A").expect("A1");
        let b = legend.find("B1 TUBE-B").expect("B1");
        let c = legend.find("A2 TUBE-C").expect("A2");
        assert!(a < b && b < c, "{legend}");
        assert!(!legend.contains("H12"), "controls are on the grid only");
    }

    #[test]
    fn a_384_well_plate_has_16_rows_of_24_short_cells() {
        let wells = vec![
            sample("A1", "SWAB-000101"),
            sample("P1", "SWAB-000116"),
            control("P24", "positive_control"),
            control("M24", "no_template_control"),
        ];
        let map = render_plate(&plate(384, wells), false);
        let grid = grid_lines(&map);
        assert_eq!(grid.len(), 17, "{map}");
        assert!(grid[0].ends_with("24"));
        assert!(grid[16].starts_with('P'));
        assert!(grid.iter().all(|l| l.len() <= 160), "{map}");
        assert_eq!(cell(&map, 0, 0, 4), "0101");
        assert_eq!(cell(&map, 15, 0, 4), "0116");
        assert_eq!(cell(&map, 15, 23, 4), "PC");
        assert_eq!(cell(&map, 12, 23, 4), "NTC");
        assert!(
            map.contains("P1 SWAB-000116"),
            "legend keeps full barcodes:\n{map}"
        );
    }

    #[test]
    fn color_marks_controls_without_moving_columns() {
        let view = plate(
            96,
            vec![
                sample("A1", "SWAB-000101"),
                control("H12", "positive_control"),
            ],
        );
        let plain = render_plate(&view, false);
        let colored = render_plate(&view, true);
        assert!(colored.contains("\x1b[1;35mPC\x1b[0m"));
        let strip = |s: &str| {
            let mut out = String::new();
            let mut rest = s;
            while let Some(start) = rest.find('\x1b') {
                out.push_str(&rest[..start]);
                let end = rest[start..].find('m').expect("escape end");
                rest = &rest[start + end + 1..];
            }
            out.push_str(rest);
            out
        };
        assert_eq!(strip(&colored), plain);
    }

    #[test]
    fn tables_align_columns_without_trailing_spaces() {
        let text = table(
            &["ID", "STATE"],
            &[
                vec!["PL-1".into(), "open".into()],
                vec!["PL-000002".into(), "sealed".into()],
            ],
        );
        assert_eq!(
            text,
            "ID         STATE\nPL-1       open\nPL-000002  sealed\n"
        );
    }

    #[test]
    fn relative_times_read_like_people_write_them() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let later = |s| now + Duration::from_secs(s);
        let earlier = |s| now - Duration::from_secs(s);
        assert_eq!(due_in(later(3 * 3600 + 12 * 60), now), "in 3h12m");
        assert_eq!(due_in(earlier(5 * 60), now), "overdue 5m");
        assert_eq!(due_in(later(45), now), "in 45s");
        assert_eq!(due_in(later(2 * 86_400 + 4 * 3600 + 59), now), "in 2d4h");
        assert_eq!(due_in(later(4 * 3600), now), "in 4h");
        assert_eq!(ago(earlier(90), now), "1m ago");
        assert_eq!(ago(later(3), now), "now");
    }
}
