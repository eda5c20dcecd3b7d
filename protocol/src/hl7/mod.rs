//! HL7 v2.5.1 for sending results upstream (protocols.md §3; issue 6, sink 4):
//!
//! - [`escape`]: the HL7 escape sequences (`\F\ \S\ \T\ \R\ \E\`, `\Xhh\`) for text
//!   written into a field, and their reverse for text read from an ACK;
//! - [`oru`]: one ORU^R01 message per tube from a [`crate::upstream::ResultRecord`],
//!   with a message control id (MSH-10) derived from the result's idempotency key so
//!   that every resend of the same result version carries the same MSH-10;
//! - [`ack`]: the receiver's ACK (MSA-1 code, MSA-2 control id, ERR/MSA text),
//!   tolerant of CR, LF and CR LF segment ends, rejecting anything that is not an ACK
//!   with a typed error;
//! - [`mllp`]: the Minimal Lower Layer Protocol framing (`VT message FS CR`): an
//!   encoder and a streaming decoder with a size limit that reports bytes outside
//!   frames and never panics.
//!
//! The message profile (which field carries what, and why) is documented in
//! `docs/hl7.md`.
//!
//! What this module does NOT do: any I/O (the daemon's hl7 sink owns the TCP
//! connection, the ACK timeout and reconnects), read a clock (the message time is
//! passed in), or carry personal data: the tube barcode is the only identifier, and
//! PID's name, birth date and sex stay empty.

pub mod ack;
pub mod escape;
pub mod mllp;
pub mod oru;

pub use ack::{Ack, AckCode, AckError, parse_ack};
pub use mllp::{MllpDecoder, MllpEvent};
pub use oru::{EncodeError, Hl7Message, MessageHeader, control_id, encode_oru_r01};
