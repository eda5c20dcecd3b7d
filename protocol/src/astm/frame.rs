//! One E1381 / LIS1-A frame (protocols.md §1.2, §1.3, §1.6): encode, decode, checksum,
//! and the split of a message's text into frames and back. Pure functions over bytes.

use super::{CR, ETB, ETX, LF, STX};

/// Largest frame accepted on receive, all bytes from STX to LF (CLSI LIS1-A /
/// E1381-02: 64,000; protocols.md §1.2).
pub const MAX_FRAME_LEN: usize = 64_000;

/// Text characters per frame pcrd sends unless configured otherwise (ASTM E1381-95:
/// 247-byte frames, 240 characters of text; protocols.md §1.2).
pub const DEFAULT_TEXT_PER_FRAME: usize = 240;

/// Bytes a frame adds around its text: STX, FN, ETB/ETX, two checksum digits, CR, LF.
pub const FRAME_OVERHEAD: usize = 7;

/// One frame: its number, its text, and whether it ends a record (ETX) or is an
/// intermediate piece of one (ETB).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Frame number 0..=7 (first frame of a transfer is 1; 7 rolls over to 0).
    pub number: u8,
    /// The text between FN and ETB/ETX; the CR ending a record is part of it.
    pub text: Vec<u8>,
    /// `true` for an end frame (ETX), `false` for an intermediate frame (ETB).
    pub end: bool,
}

/// What is wrong with a frame. Decoding errors carry no text: the link layer keeps
/// the raw bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The checksum digits do not match the bytes: a character was damaged on the line.
    #[error("bad checksum: the frame says {found}, its bytes sum to {expected:02X}")]
    BadChecksum {
        /// The two characters the frame carried, as text.
        found: String,
        /// The checksum computed over FN..ETB/ETX.
        expected: u8,
    },
    /// The byte after STX is not a digit 0..7.
    #[error("bad frame number {found:?}: expected a digit 0 to 7")]
    BadFrameNumber {
        /// The byte found, as a character.
        found: char,
    },
    /// The frame holds a restricted control character (protocols.md §1.6), or the
    /// caller tried to send one.
    #[error("restricted control character 0x{byte:02X} in frame text")]
    ForbiddenCharacter {
        /// The offending byte.
        byte: u8,
    },
    /// The frame is longer than allowed: the peer sends larger frames than configured,
    /// or ETX/ETB was lost on the line.
    #[error("frame longer than {limit} bytes")]
    TooLong {
        /// The limit in bytes, STX to LF.
        limit: usize,
    },
    /// The frame was cut short by another STX, EOT, ENQ, ACK or NAK before its end.
    #[error("frame cut short by control character 0x{byte:02X}")]
    Truncated {
        /// The control character that interrupted the frame.
        byte: u8,
    },
    /// The checksum is not followed by CR LF, or is not two hex digits.
    #[error("bad frame trailer: checksum must be two hex digits followed by CR LF")]
    BadTrailer,
    /// The bytes do not start with STX (decode was called in the wrong place).
    #[error("a frame starts with STX")]
    NoStx,
    /// A frame to encode has a number above 7 or text longer than the protocol allows.
    #[error("cannot encode frame: {reason}")]
    Unencodable {
        /// Why.
        reason: &'static str,
    },
}

/// The outcome of [`decode`] on bytes that start a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// More bytes are needed; nothing was consumed.
    Incomplete,
    /// A good frame, `len` bytes long.
    Frame {
        /// The frame.
        frame: Frame,
        /// Bytes it took from the input.
        len: usize,
    },
    /// A bad frame: drop `len` bytes (at least 1) and carry on.
    Invalid {
        /// What was wrong.
        error: FrameError,
        /// Bytes to drop.
        len: usize,
    },
}

/// The mod-256 sum of `bytes` (protocols.md §1.3: FN through ETB/ETX inclusive).
pub fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b))
}

/// Is `byte` forbidden in frame text (protocols.md §1.6)? CR is allowed (it ends records).
pub fn is_restricted(byte: u8) -> bool {
    matches!(byte, 0x01..=0x06 | 0x0A | 0x10..=0x17)
}

/// Checks that `text` holds no restricted character.
pub fn check_text(text: &[u8]) -> Result<(), FrameError> {
    match text.iter().find(|b| is_restricted(**b)) {
        Some(byte) => Err(FrameError::ForbiddenCharacter { byte: *byte }),
        None => Ok(()),
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        // Upper case is what the standard prescribes; lower case is harmless to accept.
        b'a'..=b'f' => Some(byte - b'a' + 10),
        _ => None,
    }
}

impl Frame {
    /// The frame on the wire: `<STX> FN text <ETB|ETX> C1 C2 <CR><LF>`.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        if self.number > 7 {
            return Err(FrameError::Unencodable {
                reason: "frame number above 7",
            });
        }
        if self.text.len() + FRAME_OVERHEAD > MAX_FRAME_LEN {
            return Err(FrameError::TooLong {
                limit: MAX_FRAME_LEN,
            });
        }
        check_text(&self.text)?;
        let mut out = Vec::with_capacity(self.text.len() + FRAME_OVERHEAD);
        out.push(STX);
        out.push(b'0' + self.number);
        out.extend_from_slice(&self.text);
        out.push(if self.end { ETX } else { ETB });
        let sum = checksum(&out[1..]);
        out.push(HEX[usize::from(sum >> 4)]);
        out.push(HEX[usize::from(sum & 0x0F)]);
        out.push(CR);
        out.push(LF);
        Ok(out)
    }
}

/// Decodes the frame at the start of `input`, which should begin with STX. Never
/// panics; consumes nothing when more bytes are needed. `max_len` bounds the whole
/// frame (STX to LF); at most [`MAX_FRAME_LEN`] is sensible.
pub fn decode(input: &[u8], max_len: usize) -> Decoded {
    if input.first() != Some(&STX) {
        let len = input
            .iter()
            .position(|b| *b == STX)
            .unwrap_or(input.len())
            .max(1);
        return Decoded::Invalid {
            error: FrameError::NoStx,
            len,
        };
    }
    let mut forbidden = None;
    for (i, &byte) in input.iter().enumerate().skip(1) {
        if i + 5 > max_len {
            return Decoded::Invalid {
                error: FrameError::TooLong { limit: max_len },
                len: i,
            };
        }
        match byte {
            ETX | ETB => return finish(input, i, forbidden),
            STX | 0x04..=0x06 | 0x15 => {
                return Decoded::Invalid {
                    error: FrameError::Truncated { byte },
                    len: i,
                };
            }
            b if is_restricted(b) => forbidden = forbidden.or(Some(b)),
            _ => {}
        }
    }
    Decoded::Incomplete
}

/// The frame's end marker is at `end`: checks the trailer, the number and the sum.
fn finish(input: &[u8], end: usize, forbidden: Option<u8>) -> Decoded {
    let Some(trailer) = input.get(end + 1..end + 5) else {
        // A control character in the trailer position means the trailer was lost.
        if let Some(pos) = input[end + 1..]
            .iter()
            .position(|b| matches!(*b, STX | 0x04..=0x06 | 0x15))
        {
            return Decoded::Invalid {
                error: FrameError::BadTrailer,
                len: end + 1 + pos,
            };
        }
        return Decoded::Incomplete;
    };
    let bad = |error| Decoded::Invalid {
        error,
        len: end + 5,
    };
    if trailer[2] != CR || trailer[3] != LF {
        // Keep a following STX/EOT for the next round instead of swallowing it.
        let len = trailer
            .iter()
            .position(|b| matches!(*b, STX | 0x04..=0x06 | 0x15))
            .map_or(end + 5, |p| end + 1 + p);
        return Decoded::Invalid {
            error: FrameError::BadTrailer,
            len,
        };
    }
    let (Some(high), Some(low)) = (hex_value(trailer[0]), hex_value(trailer[1])) else {
        return bad(FrameError::BadTrailer);
    };
    if end < 2 {
        return bad(FrameError::BadFrameNumber {
            found: char::from(input[end]),
        });
    }
    let expected = checksum(&input[1..=end]);
    if (high << 4) | low != expected {
        return bad(FrameError::BadChecksum {
            found: String::from_utf8_lossy(&trailer[..2]).into_owned(),
            expected,
        });
    }
    let number = input[1];
    if !(b'0'..=b'7').contains(&number) {
        return bad(FrameError::BadFrameNumber {
            found: char::from(number),
        });
    }
    if let Some(byte) = forbidden {
        return bad(FrameError::ForbiddenCharacter { byte });
    }
    Decoded::Frame {
        frame: Frame {
            number: number - b'0',
            text: input[2..end].to_vec(),
            end: input[end] == ETX,
        },
        len: end + 5,
    }
}

/// Splits a message's text into frames: one record (ending in CR) per end frame, a
/// record longer than `text_per_frame` spread over intermediate frames
/// (protocols.md §2.1). Numbers start at `first_number` and roll 7 → 0. Text after the
/// last CR forms a final record of its own. `text_per_frame` of 0 counts as 1.
pub fn split_message(text: &[u8], text_per_frame: usize, first_number: u8) -> Vec<Frame> {
    let size = text_per_frame.max(1);
    let mut frames = Vec::new();
    let mut number = first_number % 8;
    for record in text.split_inclusive(|b| *b == CR) {
        let chunks: Vec<&[u8]> = record.chunks(size).collect();
        let last = chunks.len().saturating_sub(1);
        for (i, chunk) in chunks.into_iter().enumerate() {
            frames.push(Frame {
                number,
                text: chunk.to_vec(),
                end: i == last,
            });
            number = (number + 1) % 8;
        }
    }
    frames
}

/// Joins frames back into the message text (the inverse of [`split_message`]).
pub fn join_frames(frames: &[Frame]) -> Vec<u8> {
    frames.iter().flat_map(|f| f.text.iter().copied()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(s: &str) -> Vec<u8> {
        super::super::from_mnemonics(s)
    }

    #[test]
    fn checksum_matches_the_worked_examples() {
        // protocols.md §1.3: `1L|1|N<CR><ETX>` → 04; ORTHO keep-alive `2L||<CR><ETX>` → 86.
        assert_eq!(checksum(b"1L|1|N\r\x03"), 0x04);
        assert_eq!(checksum(b"2L||\r\x03"), 0x86);
        let frame = Frame {
            number: 1,
            text: b"L|1|N\r".to_vec(),
            end: true,
        };
        assert_eq!(
            frame.encode().unwrap(),
            wire("<STX>1L|1|N<CR><ETX>04<CR><LF>")
        );
    }

    #[test]
    fn decode_reads_a_good_frame_and_waits_for_more() {
        let bytes = wire("<STX>1L|1|N<CR><ETX>04<CR><LF>");
        for cut in 0..bytes.len() {
            assert_eq!(
                decode(&bytes[..cut.max(1)], MAX_FRAME_LEN),
                Decoded::Incomplete
            );
        }
        let Decoded::Frame { frame, len } = decode(&bytes, MAX_FRAME_LEN) else {
            panic!("not a frame");
        };
        assert_eq!(len, bytes.len());
        assert_eq!(frame.text, b"L|1|N\r");
        assert!(frame.end);
    }

    #[test]
    fn decode_names_each_fault() {
        let cases = [
            ("<STX>1L|1|N<CR><ETX>05<CR><LF>", "checksum"),
            ("<STX>8L|1|N<CR><ETX>0B<CR><LF>", "frame number"),
            ("<STX>1L|1<SOH>|N<CR><ETX>05<CR><LF>", "restricted"),
            ("<STX>1L|1|N<STX>1L", "cut short"),
            ("<STX>1L|1|N<CR><ETX>04<LF><CR>", "trailer"),
            ("<STX>1L|1|N<CR><ETX>0G<CR><LF>", "trailer"),
        ];
        for (input, needle) in cases {
            match decode(&wire(input), MAX_FRAME_LEN) {
                Decoded::Invalid { error, len } => {
                    assert!(len >= 1);
                    assert!(error.to_string().contains(needle), "{input}: {error}");
                }
                other => panic!("{input}: {other:?}"),
            }
        }
        let long = [b"\x021".as_slice(), &[b'A'; 300]].concat();
        assert!(matches!(
            decode(&long, 247),
            Decoded::Invalid {
                error: FrameError::TooLong { limit: 247 },
                ..
            }
        ));
    }

    #[test]
    fn split_puts_one_record_per_end_frame_and_wraps_numbers() {
        let text = b"H|\\^&\rP|1\rO|1\rR|1\rR|2\rR|3\rR|4\rL|1|N\r";
        let frames = split_message(text, 240, 1);
        let numbers: Vec<u8> = frames.iter().map(|f| f.number).collect();
        assert_eq!(numbers, [1, 2, 3, 4, 5, 6, 7, 0]);
        assert!(frames.iter().all(|f| f.end));
        assert_eq!(join_frames(&frames), text);
        let long = [vec![b'R'; 500], vec![CR]].concat();
        let frames = split_message(&long, 240, 7);
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[0].number, 7);
        assert_eq!(frames[1].number, 0);
        assert!(!frames[0].end && !frames[1].end && frames[2].end);
        assert_eq!(frames[2].text.len(), 501 - 480);
    }

    #[test]
    fn encode_refuses_restricted_text() {
        let frame = Frame {
            number: 1,
            text: b"a\nb".to_vec(),
            end: true,
        };
        assert_eq!(
            frame.encode(),
            Err(FrameError::ForbiddenCharacter { byte: LF })
        );
    }
}
