//! MLLP framing (HL7 v2.5.1 Appendix C, release 1): `VT message FS CR`.
//!
//! MLLP has no length and no checksum; a frame is whatever lies between a start byte
//! and an end byte. The decoder is fed bytes as they arrive (several frames in one
//! read, one frame over many reads) and says what it found:
//!
//! - a complete frame;
//! - bytes outside any frame (reported, then dropped; CR and LF between frames are
//!   taken as line noise and dropped silently);
//! - a frame larger than the limit (reported once, then skipped up to its end), so a
//!   peer that never sends FS cannot make pcrd buffer without bound;
//! - a frame cut short by a new start byte (reported as bytes outside frames).
//!
//! An FS not followed by CR still ends the frame: some senders omit the CR, and the
//! message inside is complete either way.

/// Start of a frame (VT).
pub const START: u8 = 0x0B;
/// End of a frame's data (FS).
pub const END: u8 = 0x1C;
/// Follows [`END`].
pub const CR: u8 = 0x0D;

/// The default largest frame accepted: far above any ACK or one-tube result.
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;

/// `message` framed for the wire.
pub fn frame(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 3);
    frame_into(message, &mut out);
    out
}

/// Appends `message`, framed, to `out`.
pub fn frame_into(message: &[u8], out: &mut Vec<u8>) {
    out.push(START);
    out.extend_from_slice(message);
    out.push(END);
    out.push(CR);
}

/// What the decoder found in the bytes fed to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MllpEvent {
    /// The content of one complete frame (without VT, FS and CR).
    Frame(Vec<u8>),
    /// This many bytes were found outside any frame (or in a frame cut short by a
    /// new start byte) and dropped.
    Garbage { bytes: usize },
    /// A frame grew beyond the limit; its bytes up to the next FS are dropped.
    Oversized { limit: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Between frames.
    Outside,
    /// Inside a frame, collecting.
    Inside,
    /// Just after an FS: a CR here belongs to the frame's end.
    AfterEnd,
    /// Inside a frame that outgrew the limit, waiting for its FS.
    Skipping,
}

/// A streaming MLLP decoder. Never panics, whatever it is fed.
#[derive(Debug)]
pub struct MllpDecoder {
    state: State,
    buffer: Vec<u8>,
    max_frame: usize,
    garbage: usize,
}

impl MllpDecoder {
    /// A decoder accepting frames of up to `max_frame` bytes of content.
    pub fn new(max_frame: usize) -> MllpDecoder {
        MllpDecoder {
            state: State::Outside,
            buffer: Vec::new(),
            max_frame,
            garbage: 0,
        }
    }

    /// Whether the decoder holds part of a frame.
    pub fn in_frame(&self) -> bool {
        matches!(self.state, State::Inside | State::Skipping)
    }

    /// Forgets everything buffered (after the connection it was reading is dropped).
    pub fn reset(&mut self) {
        self.state = State::Outside;
        self.buffer.clear();
        self.garbage = 0;
    }

    /// Feeds `bytes` and appends what they completed to `events`, in order.
    pub fn feed(&mut self, bytes: &[u8], events: &mut Vec<MllpEvent>) {
        let mut i = 0;
        while i < bytes.len() {
            match self.state {
                State::Outside | State::AfterEnd => {
                    let byte = bytes[i];
                    i += 1;
                    match byte {
                        START => {
                            self.flush_garbage(events);
                            self.buffer.clear();
                            self.state = State::Inside;
                        }
                        CR if self.state == State::AfterEnd => self.state = State::Outside,
                        CR | b'\n' => self.state = State::Outside,
                        _ => {
                            self.garbage += 1;
                            self.state = State::Outside;
                        }
                    }
                }
                State::Inside => {
                    // Copy the run up to the next control byte in one go.
                    let rest = &bytes[i..];
                    let stop = rest.iter().position(|&b| b == END || b == START);
                    let take = stop.unwrap_or(rest.len());
                    if self.buffer.len() + take > self.max_frame {
                        self.buffer.clear();
                        self.buffer.shrink_to(4096);
                        events.push(MllpEvent::Oversized {
                            limit: self.max_frame,
                        });
                        self.state = State::Skipping;
                        continue;
                    }
                    self.buffer.extend_from_slice(&rest[..take]);
                    i += take;
                    match stop.map(|at| rest[at]) {
                        Some(END) => {
                            i += 1;
                            events.push(MllpEvent::Frame(std::mem::take(&mut self.buffer)));
                            self.state = State::AfterEnd;
                        }
                        Some(_) => {
                            // A new start inside a frame: the frame so far is cut short.
                            i += 1;
                            events.push(MllpEvent::Garbage {
                                bytes: self.buffer.len() + 1,
                            });
                            self.buffer.clear();
                        }
                        None => {}
                    }
                }
                State::Skipping => {
                    let rest = &bytes[i..];
                    match rest.iter().position(|&b| b == END) {
                        Some(at) => {
                            i += at + 1;
                            self.state = State::AfterEnd;
                        }
                        None => i = bytes.len(),
                    }
                }
            }
        }
        if self.state == State::Outside || self.state == State::AfterEnd {
            self.flush_garbage(events);
        }
    }

    fn flush_garbage(&mut self, events: &mut Vec<MllpEvent>) {
        if self.garbage > 0 {
            events.push(MllpEvent::Garbage {
                bytes: self.garbage,
            });
            self.garbage = 0;
        }
    }
}

impl Default for MllpDecoder {
    fn default() -> Self {
        MllpDecoder::new(DEFAULT_MAX_FRAME)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(chunks: &[&[u8]], max: usize) -> Vec<MllpEvent> {
        let mut decoder = MllpDecoder::new(max);
        let mut events = Vec::new();
        for chunk in chunks {
            decoder.feed(chunk, &mut events);
        }
        events
    }

    #[test]
    fn frames_round_trip_whole_and_byte_by_byte() {
        let mut wire = frame(b"MSH|one\r");
        wire.extend(frame(b"MSH|two\r"));
        let whole = decode(&[&wire], 100);
        assert_eq!(
            whole,
            vec![
                MllpEvent::Frame(b"MSH|one\r".to_vec()),
                MllpEvent::Frame(b"MSH|two\r".to_vec())
            ]
        );
        let bytes: Vec<&[u8]> = wire.chunks(1).collect();
        assert_eq!(decode(&bytes, 100), whole);
    }

    #[test]
    fn garbage_outside_frames_is_reported_and_line_ends_are_not() {
        let mut wire = b"junk".to_vec();
        wire.extend(frame(b"A"));
        wire.extend(b"\r\n\n");
        wire.extend(frame(b"B"));
        wire.extend(b"xy");
        assert_eq!(
            decode(&[&wire], 100),
            vec![
                MllpEvent::Garbage { bytes: 4 },
                MllpEvent::Frame(b"A".to_vec()),
                MllpEvent::Frame(b"B".to_vec()),
                MllpEvent::Garbage { bytes: 2 },
            ]
        );
    }

    #[test]
    fn a_frame_without_the_final_cr_still_ends_at_fs() {
        assert_eq!(
            decode(&[b"\x0bA\x1c\x0bB\x1c\r"], 100),
            vec![
                MllpEvent::Frame(b"A".to_vec()),
                MllpEvent::Frame(b"B".to_vec())
            ]
        );
    }

    #[test]
    fn oversized_frames_are_skipped_and_the_next_frame_is_read() {
        let mut wire = frame(&[b'x'; 50]);
        wire.extend(frame(b"ok"));
        assert_eq!(
            decode(&[&wire[..20], &wire[20..]], 10),
            vec![
                MllpEvent::Oversized { limit: 10 },
                MllpEvent::Frame(b"ok".to_vec())
            ]
        );
    }

    #[test]
    fn a_frame_cut_short_by_a_new_start_is_reported() {
        assert_eq!(
            decode(&[b"\x0bhalf\x0bfull\x1c\r"], 100),
            vec![
                MllpEvent::Garbage { bytes: 5 },
                MllpEvent::Frame(b"full".to_vec())
            ]
        );
    }
}
