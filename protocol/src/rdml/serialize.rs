//! [`Document`] → `rdml_data.xml`, RDML 1.3.
//!
//! Elements come in the order of the `xs:sequence`s of RDML_v1_3_REC.xsd:
//! - `rdml`: dateMade?, dateUpdated?, id*, experimenter*, documentation*, dye*,
//!   sample*, target*, thermalCyclingConditions*, experiment*
//! - `sample`: description?, documentation*, xRef*, annotation*, type*,
//!   interRunCalibrator?, quantity*, …
//! - `quantity`: value, unit
//! - `target`: description?, documentation*, xRef*, type, amplificationEfficiency…?,
//!   dyeId, sequences?, commercialAssay?
//! - `experiment`: description?, documentation*, run*
//! - `run`: description?, documentation*, experimenter*, instrument?,
//!   dataCollectionSoftware?, backgroundDeterminationMethod?, cqDetectionMethod?,
//!   thermalCyclingConditions?, pcrFormat, runDate?, react*
//! - `pcrFormat`: rows, columns, rowLabel, columnLabel
//! - `react`: sample, data*, partitions?
//! - `data`: tar, cq?, N0?, ampEffMet?, ampEff?, ampEffSE?, corrF?, corrP?, corrCq?,
//!   meltTemp?, excl?, note?, adp*, mdp*, endPt?, bgFluor?, bgFluorSlp?, quantFluor?
//! - `adp`: cyc, tmp?, fluor
//!
//! No dates: they are optional, and leaving them out keeps the output a function of
//! the document alone.

use std::fmt::Write as _;

use super::{Document, NAMESPACE, ReactionData, Sample, Target, WRITTEN_VERSION};

pub(super) fn to_xml(doc: &Document) -> String {
    let mut out = String::with_capacity(estimated_size(doc));
    out.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    // Both the default namespace and the rdml: prefix, as rdmlpython writes them.
    out.push_str(&format!(
        "<rdml version=\"{WRITTEN_VERSION}\" xmlns:rdml=\"{NAMESPACE}\" xmlns=\"{NAMESPACE}\">\n"
    ));
    for dye in &doc.dyes {
        out.push_str(&format!("  <dye id=\"{}\"/>\n", attr(&dye.id)));
    }
    for sample in &doc.samples {
        write_sample(&mut out, sample);
    }
    for target in &doc.targets {
        write_target(&mut out, target);
    }
    for experiment in &doc.experiments {
        out.push_str(&format!("  <experiment id=\"{}\">\n", attr(&experiment.id)));
        for run in &experiment.runs {
            out.push_str(&format!("    <run id=\"{}\">\n", attr(&run.id)));
            if let Some(instrument) = &run.instrument {
                element(&mut out, 6, "instrument", &text(instrument));
            }
            if let Some(method) = &run.cq_detection_method {
                element(&mut out, 6, "cqDetectionMethod", &text(method));
            }
            let f = &run.format;
            // rows 0 is RDML's free format, written -1 (pcrFormatType).
            let rows = if f.rows == 0 {
                "-1".to_owned()
            } else {
                f.rows.to_string()
            };
            out.push_str(&format!(
                "      <pcrFormat><rows>{rows}</rows><columns>{}</columns><rowLabel>{}</rowLabel><columnLabel>{}</columnLabel></pcrFormat>\n",
                f.columns,
                text(&f.row_label),
                text(&f.column_label)
            ));
            for reaction in &run.reactions {
                out.push_str(&format!("      <react id=\"{}\">\n", reaction.id));
                out.push_str(&format!(
                    "        <sample id=\"{}\"/>\n",
                    attr(&reaction.sample_id)
                ));
                for data in &reaction.data {
                    write_data(&mut out, data);
                }
                out.push_str("      </react>\n");
            }
            out.push_str("    </run>\n");
        }
        out.push_str("  </experiment>\n");
    }
    out.push_str("</rdml>\n");
    out
}

fn write_sample(out: &mut String, sample: &Sample) {
    out.push_str(&format!("  <sample id=\"{}\">\n", attr(&sample.id)));
    element(out, 4, "type", &text(&sample.kind));
    if let Some(q) = &sample.quantity {
        out.push_str(&format!(
            "    <quantity><value>{}</value><unit>{}</unit></quantity>\n",
            number(q.value),
            text(&q.unit)
        ));
    }
    out.push_str("  </sample>\n");
}

fn write_target(out: &mut String, target: &Target) {
    out.push_str(&format!("  <target id=\"{}\">\n", attr(&target.id)));
    element(out, 4, "type", &text(&target.kind));
    out.push_str(&format!("    <dyeId id=\"{}\"/>\n", attr(&target.dye_id)));
    out.push_str("  </target>\n");
}

fn write_data(out: &mut String, data: &ReactionData) {
    out.push_str("        <data>\n");
    out.push_str(&format!(
        "          <tar id=\"{}\"/>\n",
        attr(&data.target_id)
    ));
    if let Some(cq) = data.cq {
        element(out, 10, "cq", &number(cq));
    }
    if let Some(excluded) = &data.excluded {
        element(out, 10, "excl", &text(excluded));
    }
    for (cycle, &fluor) in (1u64..).zip(&data.fluorescence) {
        // Writing into a String cannot fail.
        let _ = writeln!(
            out,
            "          <adp><cyc>{cycle}</cyc><fluor>{}</fluor></adp>",
            number(fluor)
        );
    }
    let tail = [
        ("bgFluor", data.background),
        ("bgFluorSlp", data.background_slope),
        ("quantFluor", data.threshold),
    ];
    for (name, value) in tail {
        if let Some(value) = value {
            element(out, 10, name, &number(value));
        }
    }
    out.push_str("        </data>\n");
}

fn element(out: &mut String, indent: usize, name: &str, content: &str) {
    let _ = writeln!(out, "{:indent$}<{name}>{content}</{name}>", "");
}

/// An f64 as xs:float text. Rust's `Display` gives the shortest decimal that parses
/// back to the same f64, never an exponent, so values survive a round trip exactly.
/// NaN and infinities (which [`Document::validate`] refuses) are written in the XSD's
/// spelling so the XML stays well-typed.
fn number(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_owned()
    } else if value.is_infinite() {
        if value > 0.0 { "INF" } else { "-INF" }.to_owned()
    } else {
        value.to_string()
    }
}

/// Escapes element text: `&`, `<` and `>`; `\r` as a reference so it survives line-end
/// normalisation; characters XML 1.0 cannot carry at all (most C0 controls, U+FFFE,
/// U+FFFF) become U+FFFD.
fn text(s: &str) -> String {
    escape(s, false)
}

/// Escapes an attribute value: as [`text`], plus quotes, and tab and line ends as
/// references so that attribute-value normalisation does not turn them into spaces.
fn attr(s: &str) -> String {
    escape(s, true)
}

fn escape(s: &str, attribute: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' if attribute => out.push_str("&quot;"),
            '\r' => out.push_str("&#13;"),
            '\n' if attribute => out.push_str("&#10;"),
            '\t' if attribute => out.push_str("&#9;"),
            '\t' | '\n' => out.push(c),
            // XML 1.0 Char production (§2.2): no other C0 control, no surrogates (Rust
            // has none in a str), no U+FFFE / U+FFFF.
            '\u{0}'..='\u{1F}' | '\u{FFFE}' | '\u{FFFF}' => out.push('\u{FFFD}'),
            _ => out.push(c),
        }
    }
    out
}

/// A guess of the output size, so the buffer grows once or twice, not fifty times.
fn estimated_size(doc: &Document) -> usize {
    let points: usize = doc
        .reactions()
        .flat_map(|(_, _, r)| &r.data)
        .map(|d| d.fluorescence.len())
        .sum();
    4096 + points * 64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_shortest_round_trip_decimals() {
        for v in [
            0.4853,
            1.875,
            18750.0,
            -0.0,
            1e-7,
            1e300,
            0.1 + 0.2,
            f64::MIN_POSITIVE,
        ] {
            let s = number(v);
            assert!(!s.contains('e'), "{s}");
            assert_eq!(s.parse::<f64>().unwrap().to_bits(), v.to_bits(), "{s}");
        }
        assert_eq!(number(18750.0), "18750");
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(f64::NEG_INFINITY), "-INF");
    }

    #[test]
    fn escaping_keeps_xml_well_formed() {
        assert_eq!(text("a<b & c>d \"q\""), "a&lt;b &amp; c&gt;d \"q\"");
        assert_eq!(attr("a\"b\tc\nd\re"), "a&quot;b&#9;c&#10;d&#13;e");
        assert_eq!(text("x\u{1}y\u{FFFF}"), "x\u{FFFD}y\u{FFFD}");
        assert_eq!(text("line\nnext\ttab"), "line\nnext\ttab");
    }
}
