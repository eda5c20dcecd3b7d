//! pcrd's instrument drivers: the only crate that opens a serial port or an
//! instrument socket. Drivers own timeouts, retries and reconnects; protocol
//! logic lives in `pcrd-protocol`, state lives in the daemon.
//!
//! The foundation has no drivers yet: extractors (Modbus), cyclers (SCPI-style
//! lines) and result sources (ASTM, watched folders) arrive with their issues.
