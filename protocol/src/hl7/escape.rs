//! HL7 v2 escape sequences (v2.5.1 chapter 2.7).
//!
//! Text written into a field must never be read as structure: a `|` would start a
//! new field, a `^` a new component, and a carriage return a new segment. Worse, a VT
//! (0x0B) or FS (0x1C) would break the MLLP frame around the message. So every text
//! pcrd writes goes through [`escape`]: the five delimiters become `\F\ \S\ \R\ \E\
//! \T\` and every control character becomes `\Xhh\` (hexadecimal). Text that is
//! already safe is returned unchanged without copying.

use std::borrow::Cow;

/// The delimiters of one message, as declared by MSH-1 and MSH-2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delimiters {
    pub field: u8,
    pub component: u8,
    pub repetition: u8,
    pub escape: u8,
    pub subcomponent: u8,
}

impl Delimiters {
    /// `|^~\&`, what pcrd writes.
    pub const STANDARD: Delimiters = Delimiters {
        field: b'|',
        component: b'^',
        repetition: b'~',
        escape: b'\\',
        subcomponent: b'&',
    };
}

impl Default for Delimiters {
    fn default() -> Self {
        Delimiters::STANDARD
    }
}

/// Whether `byte` must be escaped in a field written with [`Delimiters::STANDARD`].
fn needs_escape(byte: u8) -> bool {
    matches!(byte, b'|' | b'^' | b'~' | b'\\' | b'&') || byte < 0x20 || byte == 0x7F
}

/// `text` with every delimiter and control character escaped for a field of a
/// message written with [`Delimiters::STANDARD`].
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.bytes().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for ch in text.chars() {
        match ch {
            '|' => out.push_str("\\F\\"),
            '^' => out.push_str("\\S\\"),
            '~' => out.push_str("\\R\\"),
            '\\' => out.push_str("\\E\\"),
            '&' => out.push_str("\\T\\"),
            c if (c as u32) < 0x20 || c as u32 == 0x7F => {
                out.push_str(&format!("\\X{:02X}\\", c as u32));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// The text of a field read from a message with `delimiters`, escape sequences
/// resolved. Sequences pcrd does not interpret (formatting such as `\.br\`, character
/// set switches) and malformed ones are kept as written: this is for showing a
/// receiver's error text to an operator, not for reading data.
pub fn unescape(text: &str, delimiters: Delimiters) -> String {
    let esc = delimiters.escape as char;
    if !text.contains(esc) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(esc) {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let Some(end) = after.find(esc) else {
            out.push_str(&rest[start..]);
            return out;
        };
        let sequence = &after[..end];
        match sequence {
            "F" => out.push(delimiters.field as char),
            "S" => out.push(delimiters.component as char),
            "R" => out.push(delimiters.repetition as char),
            "E" => out.push(esc),
            "T" => out.push(delimiters.subcomponent as char),
            hex if hex.len() >= 3 && !hex.len().is_multiple_of(2) && hex.starts_with('X') => {
                match decode_hex(&hex[1..]) {
                    Some(bytes) => out.push_str(&String::from_utf8_lossy(&bytes)),
                    None => {
                        out.push(esc);
                        out.push_str(sequence);
                        out.push(esc);
                    }
                }
            }
            _ => {
                out.push(esc);
                out.push_str(sequence);
                out.push(esc);
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.is_ascii() || !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_delimiter_and_control_character_is_escaped() {
        assert_eq!(escape("a|b^c~d\\e&f"), "a\\F\\b\\S\\c\\R\\d\\E\\e\\T\\f");
        assert_eq!(escape("x\ry\n\x0b\x1c"), "x\\X0D\\y\\X0A\\\\X0B\\\\X1C\\");
        assert!(matches!(escape("T000123"), Cow::Borrowed(_)));
        assert_eq!(escape("Zürich"), "Zürich");
    }

    #[test]
    fn unescape_reverses_escape() {
        for text in ["a|b^c~d\\e&f", "line\rbreak", "plain", "\\", "ü\x01"] {
            assert_eq!(unescape(&escape(text), Delimiters::STANDARD), text);
        }
    }

    #[test]
    fn unescape_keeps_what_it_does_not_understand() {
        let d = Delimiters::STANDARD;
        assert_eq!(unescape("a\\.br\\b", d), "a\\.br\\b");
        assert_eq!(unescape("dangling \\F", d), "dangling \\F");
        assert_eq!(unescape("\\XZZ\\", d), "\\XZZ\\");
    }
}
