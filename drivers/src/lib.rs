//! pcrd's instrument drivers: the only crate that opens a serial port or an
//! instrument socket. Drivers own timeouts, retries and reconnects; protocol
//! logic lives in `pcrd-protocol`, state lives in the daemon.
//!
//! - [`astm`]: pcrd as the ASTM E1381/E1394 host of analysers that report
//!   their own results, over TCP or serial; each message handed to a
//!   [`astm::MessageStore`] before its last frame is acknowledged.
//! - [`modbus`]: nucleic-acid extractors over Modbus RTU and TCP, described
//!   by register-map profiles (`pcrd_protocol::extractor`).
//! - [`cycler`]: real-time PCR cyclers speaking pcrd's SCPI-style lines
//!   (`pcrd_protocol::cycler`) over serial or TCP; per-cycle data handed to
//!   a [`cycler::CycleSink`] before the run tracker moves on.
//! - [`panel`]: the gateway's status lamp, buzzer and start/abort button
//!   through the embedded-hal 1.0 digital traits; simulated pins always,
//!   Linux GPIO character devices with feature "gpio".
//! - `sim` (feature "sim"): simulators that speak the real wire protocols,
//!   with fault injection, for the tests and `pcrd demo`.

pub mod astm;
pub mod cycler;
pub mod modbus;
pub mod panel;
#[cfg(feature = "sim")]
pub mod sim;
