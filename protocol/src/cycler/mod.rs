//! Real-time PCR cyclers' command protocol (protocols.md §5; issue 5), as a pure codec:
//!
//! - [`line`](mod@line): SCPI-style ASCII lines ending CR LF (bare LF accepted), cut incrementally
//!   out of a receive buffer, with a length limit and resynchronisation;
//! - [`command`]: the commands as types carrying their reply type and their policy
//!   (timeout, attempts, resend safety): the IEEE 488.2 common commands `*IDN?`, `*RST`,
//!   `*CLS`, `*OPC?`, `SYST:ERR?`, and pcrd's status, lid, plate map, thermal protocol,
//!   start, abort and data fetch; one line each, and parsed back (the simulator's side);
//! - [`message`]: the instrument's lines told apart — a reply, an error reply
//!   (`ERR -222,"Data out of range"`), or an unsolicited event (`!CYCLE 12 FAM 96 ..`);
//! - [`tracker`]: [`RunTracker`], which checks per-cycle data against the plate and the
//!   cycles already received, so that a curve never has a silent gap;
//! - [`dialect`]: the words of a command set as data ([`Dialect::reference`] is pcrd's
//!   own, `pcrd-ref-1`), so another instrument is a new profile (TOML, checked by
//!   [`Dialect::validate`]) plus a small [`Adapter`].
//!
//! docs/cycler-protocol.md describes the reference dialect line by line.
//!
//! What this module does NOT do:
//! - any I/O: it opens no serial port or socket and reads no clock. Timeouts are data
//!   ([`Policy`]) for the driver to apply.
//! - send, retry or sequence commands, or match a reply to the command in flight: the
//!   driver owns the port and knows which command it is waiting on. [`parse_incoming`]
//!   only says whether a line is a reply, an error reply or an event.
//! - store readings. The tracker says which readings are new ([`Tracked::Accepted`]);
//!   the driver makes them durable.
//! - know anything of kits, targets or Ct: readings are raw fluorescence per well and
//!   channel.

pub mod command;
pub mod dialect;
mod error;
pub mod line;
pub mod message;
pub mod tracker;

pub use command::{
    Channel, Command, CycleRange, CyclerCommand, DeviceError, Identity, LidState, Operation,
    PlateMap, Policy, Response, RunState, Stage, Status, Step, ThermalProtocol,
};
pub use dialect::{Adapter, Dialect, NoAdapter};
pub use error::{CyclerError, Rejected};
pub use line::{Line, LineDecoder, LineError, MAX_LINE_LEN};
pub use message::{
    CycleData, Event, FaultKind, Incoming, Outcome, encode_error, encode_event, encode_reply,
    parse_incoming,
};
pub use tracker::{RunTracker, TrackError, Tracked};

#[cfg(test)]
mod tests;
