//! The line layer: SCPI-style ASCII lines ending CR LF (a bare LF is accepted on input),
//! cut out of a byte stream incrementally. Pure: bytes in, lines or errors out.

/// Longest line accepted, without its terminator. The longest line pcrd's reference
/// dialect produces is a `!CYCLE` event for a 384-well plate: 384 readings of up to ~20
/// characters each (an `f64` written shortest-round-trip) plus commas, about 8 KB; 16 KiB
/// leaves room without letting a stream with no line end grow the buffer without bound.
pub const MAX_LINE_LEN: usize = 16 * 1024;

/// Bytes of a refused line kept in [`LineError`] for diagnosis; enough to recognise it.
pub const KEPT_BYTES: usize = 256;

/// One line: printable ASCII (0x20..=0x7E) only, terminator removed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Line(String);

impl Line {
    /// Checks `text` is a valid line (printable ASCII, at most `max_len` bytes).
    pub fn new(text: &str, max_len: usize) -> Result<Line, LineError> {
        if text.len() > max_len {
            return Err(LineError::TooLong {
                limit: max_len,
                kept: text.as_bytes().iter().take(KEPT_BYTES).copied().collect(),
            });
        }
        check(text.as_bytes())?;
        Ok(Line(text.to_owned()))
    }

    /// The text of the line, without CR LF.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The line on the wire: its text and CR LF.
    pub fn to_wire(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.0.len() + 2);
        out.extend_from_slice(self.0.as_bytes());
        out.extend_from_slice(b"\r\n");
        out
    }
}

impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a line was refused. Each error has already removed the offending bytes from the
/// buffer, so decoding can simply go on with the next line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LineError {
    /// A byte outside printable ASCII (a control character, a stray CR, a non-ASCII
    /// byte): line noise, a wrong baud rate, or a peer that is not a cycler.
    #[error("byte 0x{byte:02X} at position {position} is not printable ASCII")]
    BadByte {
        /// The first offending byte.
        byte: u8,
        /// Its 0-based position in the line.
        position: usize,
        /// The whole line as received (without its LF), for diagnosis.
        line: Vec<u8>,
    },
    /// No line end within the limit: a lost LF, binary data, or a peer sending longer
    /// lines than this dialect allows. Everything up to the next line end is dropped.
    #[error("line longer than {limit} bytes")]
    TooLong {
        /// The limit, in bytes without the terminator.
        limit: usize,
        /// The first bytes of the line: at most [`KEPT_BYTES`], and at most the limit + 1.
        kept: Vec<u8>,
    },
}

fn check(bytes: &[u8]) -> Result<(), LineError> {
    match bytes.iter().position(|b| !(0x20..=0x7E).contains(b)) {
        Some(position) => Err(LineError::BadByte {
            byte: bytes[position],
            position,
            line: bytes.to_vec(),
        }),
        None => Ok(()),
    }
}

/// Cuts lines out of a receive buffer. It keeps one bit of state: whether it is
/// skipping the rest of a line that was too long.
#[derive(Debug, Clone)]
pub struct LineDecoder {
    max_len: usize,
    skipping: bool,
    skipped: u64,
}

impl Default for LineDecoder {
    fn default() -> Self {
        LineDecoder::new(MAX_LINE_LEN)
    }
}

impl LineDecoder {
    /// A decoder refusing lines longer than `max_len` bytes (terminator excluded).
    pub fn new(max_len: usize) -> LineDecoder {
        LineDecoder {
            max_len,
            skipping: false,
            skipped: 0,
        }
    }

    /// Bytes of a too-long line kept in the error: the same however the line arrived
    /// (all at once, or in pieces noticed before its end).
    fn kept_len(&self) -> usize {
        KEPT_BYTES.min(self.max_len.saturating_add(1))
    }

    /// Bytes dropped so far while skipping over too-long lines (for a metric or a log).
    pub fn skipped_bytes(&self) -> u64 {
        self.skipped
    }

    /// Takes the next line from the front of `buf`.
    ///
    /// - `Ok(None)`: no complete line yet; nothing was consumed (except the bytes of a
    ///   too-long line being skipped, which are never needed again).
    /// - `Ok(Some(line))`: the line and its terminator were consumed.
    /// - `Err(_)`: a bad line; its bytes were consumed and are kept in the error. Call
    ///   again for the next line.
    ///
    /// Never panics, whatever the bytes.
    pub fn decode(&mut self, buf: &mut Vec<u8>) -> Result<Option<Line>, LineError> {
        loop {
            let end = buf.iter().position(|b| *b == b'\n');
            if self.skipping {
                match end {
                    Some(end) => {
                        buf.drain(..=end);
                        self.skipped += end as u64 + 1;
                        self.skipping = false;
                        continue;
                    }
                    None => {
                        self.skipped += buf.len() as u64;
                        buf.clear();
                        return Ok(None);
                    }
                }
            }
            let Some(end) = end else {
                // One byte of slack: the CR of a CR LF may already be here.
                if buf.len() > self.max_len.saturating_add(1) {
                    let kept = buf.iter().take(self.kept_len()).copied().collect();
                    self.skipped += buf.len() as u64;
                    buf.clear();
                    self.skipping = true;
                    return Err(LineError::TooLong {
                        limit: self.max_len,
                        kept,
                    });
                }
                return Ok(None);
            };
            let raw: Vec<u8> = buf.drain(..=end).collect();
            let mut text = &raw[..end];
            if let [rest @ .., b'\r'] = text {
                text = rest;
            }
            if text.len() > self.max_len {
                return Err(LineError::TooLong {
                    limit: self.max_len,
                    kept: text.iter().take(self.kept_len()).copied().collect(),
                });
            }
            check(text)?;
            // `check` has proved the bytes are ASCII, so this cannot fail.
            let text = String::from_utf8_lossy(text).into_owned();
            return Ok(Some(Line(text)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(decoder: &mut LineDecoder, buf: &mut Vec<u8>) -> Vec<Result<String, LineError>> {
        let mut out = Vec::new();
        loop {
            match decoder.decode(buf) {
                Ok(Some(line)) => out.push(Ok(line.as_str().to_owned())),
                Ok(None) => return out,
                Err(e) => out.push(Err(e)),
            }
        }
    }

    #[test]
    fn reads_crlf_and_bare_lf_and_waits_for_the_end() {
        let mut d = LineDecoder::default();
        let mut buf = b"*IDN?\r\nOK\nSTAT".to_vec();
        let lines = all(&mut d, &mut buf);
        assert_eq!(lines, [Ok("*IDN?".to_owned()), Ok("OK".to_owned())]);
        assert_eq!(buf, b"STAT");
        buf.extend_from_slice(b"?\r");
        assert_eq!(d.decode(&mut buf), Ok(None));
        assert_eq!(buf, b"STAT?\r");
        buf.push(b'\n');
        assert_eq!(d.decode(&mut buf).unwrap().unwrap().as_str(), "STAT?");
        assert!(buf.is_empty());
    }

    #[test]
    fn control_and_non_ascii_bytes_are_refused_with_the_line_kept() {
        let mut d = LineDecoder::default();
        let mut buf = b"OK\x07\r\nER\xC3\xA9\r\na\rb\r\nnext\r\n".to_vec();
        let lines = all(&mut d, &mut buf);
        assert_eq!(
            lines[0],
            Err(LineError::BadByte {
                byte: 7,
                position: 2,
                line: b"OK\x07".to_vec()
            })
        );
        assert!(matches!(
            lines[1],
            Err(LineError::BadByte { byte: 0xC3, .. })
        ));
        assert!(matches!(
            lines[2],
            Err(LineError::BadByte { byte: b'\r', .. })
        ));
        assert_eq!(lines[3], Ok("next".to_owned()));
    }

    #[test]
    fn too_long_lines_are_refused_and_decoding_resynchronises() {
        let mut d = LineDecoder::new(8);
        let mut buf = b"0123456789abcdef".to_vec();
        assert!(matches!(
            d.decode(&mut buf),
            Err(LineError::TooLong { limit: 8, .. })
        ));
        assert!(buf.is_empty());
        buf.extend_from_slice(b"still the same line\r\nOK\r\n");
        assert_eq!(d.decode(&mut buf).unwrap().unwrap().as_str(), "OK");
        assert_eq!(d.skipped_bytes(), 16 + 21);
        // A too-long line that arrives whole is refused the same way.
        let mut buf = b"0123456789\r\nOK\r\n".to_vec();
        assert!(matches!(d.decode(&mut buf), Err(LineError::TooLong { .. })));
        assert_eq!(d.decode(&mut buf).unwrap().unwrap().as_str(), "OK");
        // Exactly the limit, with CR LF arriving separately, is fine.
        let mut buf = b"01234567\r".to_vec();
        assert_eq!(d.decode(&mut buf), Ok(None));
        buf.push(b'\n');
        assert_eq!(d.decode(&mut buf).unwrap().unwrap().as_str(), "01234567");
    }

    #[test]
    fn lines_check_what_they_are_built_from() {
        assert!(Line::new("RUN:START", 64).is_ok());
        assert!(Line::new("a\nb", 64).is_err());
        assert!(Line::new("abc", 2).is_err());
        assert_eq!(Line::new("OK", 64).unwrap().to_wire(), b"OK\r\n");
    }
}
