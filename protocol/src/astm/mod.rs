//! ASTM for analysers that report their own results (protocols.md §1, §2; issue 8):
//!
//! - [`frame`]: one E1381 / LIS1-A frame — STX, frame number, text, ETB/ETX, the
//!   mod-256 checksum, CR LF — and the split of a message into frames and back;
//! - [`link`]: the E1381 link layer as a sans-IO state machine, both directions
//!   (pcrd receives results, pcrd sends orders): bytes and time in; bytes, events and
//!   the next deadline out;
//! - [`record`]: E1394 / LIS2-A2 records (H, P, O, R, C, Q, M, S, L) with the
//!   delimiters the header declares, escapes, repeats, components, the record
//!   hierarchy, typed views of what pcrd needs, and builders for orders and query
//!   answers.
//!
//! What this module does NOT do:
//! - any I/O: it opens no serial port or socket, and reads no clock. Time is a
//!   [`Millis`] value the caller passes in; the link tells the caller when it next
//!   needs to be woken ([`link::Link::next_deadline`]).
//! - store anything. The link announces a complete message *before* acknowledging its
//!   last frame and waits for [`link::Link::ack_last_frame`]; the caller makes the
//!   message (raw bytes included) durable in between.
//! - map test codes to a kit's targets, match specimen ids to tubes, or interpret
//!   values: a result's value is text here (a Ct, a call, or empty).
//! - expose personal data: patient (P) records are kept structurally, but no typed
//!   view reads their name, birth date or other demographic fields.
//! - send a receiver interrupt. A peer's interrupt is honoured; pcrd as receiver
//!   always ACKs.

pub mod frame;
pub mod link;
pub mod mapping;
pub mod record;

/// Start of a frame.
pub const STX: u8 = 0x02;
/// End of an end frame.
pub const ETX: u8 = 0x03;
/// End of transmission; as a reply to a frame, a receiver interrupt.
pub const EOT: u8 = 0x04;
/// Bid for the line.
pub const ENQ: u8 = 0x05;
/// Positive acknowledgement.
pub const ACK: u8 = 0x06;
/// Line feed: only the last byte of a frame.
pub const LF: u8 = 0x0A;
/// Carriage return: ends a record.
pub const CR: u8 = 0x0D;
/// Negative acknowledgement (also "busy" in reply to ENQ).
pub const NAK: u8 = 0x15;
/// End of an intermediate frame.
pub const ETB: u8 = 0x17;

/// A point in time in milliseconds since an epoch of the caller's choice (a monotonic
/// clock's start is fine). The link only compares and adds these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Millis(pub u64);

impl Millis {
    /// `self` plus `duration` (saturating).
    pub fn after(self, duration: std::time::Duration) -> Millis {
        let ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        Millis(self.0.saturating_add(ms))
    }
}

const MNEMONICS: [(&str, u8); 18] = [
    ("NUL", 0x00),
    ("SOH", 0x01),
    ("STX", STX),
    ("ETX", ETX),
    ("EOT", EOT),
    ("ENQ", ENQ),
    ("ACK", ACK),
    ("LF", LF),
    ("CR", CR),
    ("DLE", 0x10),
    ("DC1", 0x11),
    ("DC2", 0x12),
    ("DC3", 0x13),
    ("DC4", 0x14),
    ("NAK", NAK),
    ("SYN", 0x16),
    ("ETB", ETB),
    ("LT", b'<'),
];

/// Reads the notation of protocols.md and the transcripts in `testdata/`: control
/// characters written as `<STX>`, `<CR>`…, a literal `<` as `<LT>`, any byte as
/// `<xHH>`; real line breaks are ignored (they only lay the text out). An unknown
/// `<…>` is kept literally.
pub fn from_mnemonics(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if c == '<'
            && let Some(close) = rest.find('>')
        {
            let name = &rest[1..close];
            let byte = MNEMONICS
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, b)| *b)
                .or_else(|| {
                    name.strip_prefix('x')
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                });
            if let Some(byte) = byte {
                out.push(byte);
                rest = &rest[close + 1..];
                continue;
            }
        }
        if c != '\n' && c != '\r' {
            // Latin-1: a char above U+00FF cannot come from the wire; keep its low byte.
            out.push(u8::try_from(u32::from(c) & 0xFF).unwrap_or(b'?'));
        }
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// Writes bytes in the notation [`from_mnemonics`] reads (without line breaks).
pub fn to_mnemonics(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        match MNEMONICS.iter().find(|(_, m)| *m == b) {
            Some((name, _)) => {
                out.push('<');
                out.push_str(name);
                out.push('>');
            }
            None if (0x20..0x7F).contains(&b) => out.push(char::from(b)),
            None => out.push_str(&format!("<x{b:02X}>")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mnemonics_round_trip_every_byte() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(from_mnemonics(&to_mnemonics(&all)), all);
        assert_eq!(
            from_mnemonics("<STX>1<CR>\n<LF><bogus>"),
            b"\x021\r\n<bogus>"
        );
    }

    #[test]
    fn millis_adds_durations() {
        let t = Millis(5).after(std::time::Duration::from_secs(15));
        assert_eq!(t, Millis(15_005));
        assert_eq!(
            Millis(u64::MAX).after(std::time::Duration::from_secs(1)),
            Millis(u64::MAX)
        );
    }
}
