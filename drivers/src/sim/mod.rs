//! Simulators: product code that speaks the real wire protocols, with fault
//! injection. They power the tests and `pcrd demo` (style.md §10).
//!
//! - [`extractor`]: a nucleic-acid extractor as a Modbus server, over TCP on
//!   127.0.0.1 and over RTU on a pseudo-terminal.

pub mod extractor;
