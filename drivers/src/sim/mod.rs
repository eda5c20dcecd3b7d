//! Simulators: product code that speaks the real wire protocols, with fault
//! injection. They power the tests and `pcrd demo` (style.md §10).
//!
//! - [`extractor`]: a nucleic-acid extractor as a Modbus server, over TCP on
//!   127.0.0.1 and over RTU on a pseudo-terminal.
//! - [`line`](mod@line): faults on the RTU wire (bad CRC, corrupted bytes, noise, a
//!   pulled cable, a closed port) that a well-behaved Modbus server cannot
//!   produce.

pub mod analyser;
pub mod cycler;
pub mod extractor;
pub mod line;
