//! pcrd's pure core: the domain model of a SARS-CoV-2 PCR lab (tube barcodes,
//! plates, wells, layouts, plate lineage), and the path from raw fluorescence
//! to a call:
//!
//! - [`rdml`]: RDML files in and out (bytes, not files);
//! - [`analysis`]: one amplification curve to a Ct, with curve QC flags;
//! - [`run_analysis`]: a whole run, one threshold per target, one record per
//!   reaction and target, and with a kit the calls of a plate;
//! - [`kit`] and [`interpret`]: kit definitions as data (targets, cut-offs,
//!   decision table, run-control expectations, control layouts) and their
//!   application to Ct values, run controls and pools;
//! - [`upstream`]: the versioned result record sent to the central system.
//!
//! and the instruments' wire formats, each a sans-IO codec (bytes and time in;
//! frames, events, bytes to send and deadlines out):
//!
//! - [`extractor`]: Modbus register-map profiles of extractors, decode/encode;
//! - [`cycler`]: pcrd's SCPI-style cycler command lines and run tracking;
//! - [`astm`]: ASTM E1381 link layer and E1394 records;
//! - [`export`]: files of file-only instruments (decapper plate maps,
//!   QuantStudio-style results).
//!
//! This crate does no I/O and reads no clock. It never opens a file, a socket
//! or a serial port, and it never asks the system for the time: every instant
//! it needs is passed in as a [`domain::Timestamp`]. That keeps it
//! deterministic, so the daemon, the simulators and the tests all get the same
//! answer for the same input. Kit files are parsed from text the caller has
//! already read ([`kit::KitDefinition::from_toml_str`]).
//!
//! Errors are `#[non_exhaustive]` `thiserror` enums whose messages are meant
//! to be shown to lab technicians as they are: they name the barcode, well or
//! kit at fault and say what would have been accepted.

pub mod analysis;
pub mod astm;
pub mod cycler;
pub mod domain;
pub mod early_call;
pub mod export;
pub mod extractor;
pub mod hl7;
pub mod interpret;
pub mod kit;
pub mod rdml;
pub mod run_analysis;
pub mod upstream;

/// Longest piece of user input echoed back in an error message. A scanner
/// stuck in a loop or a bad API request can hand us a megabyte of text; the
/// message only needs enough of it to be recognised.
const ECHO_LIMIT: usize = 40;

/// Cuts `text` to [`ECHO_LIMIT`] characters for an error message, marking the
/// cut with '…'.
fn echo(text: &str) -> String {
    match text.char_indices().nth(ECHO_LIMIT) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_keeps_short_text_and_cuts_long_text_on_a_char_boundary() {
        assert_eq!(echo("ABC"), "ABC");
        let exactly = "x".repeat(ECHO_LIMIT);
        assert_eq!(echo(&exactly), exactly);
        let long = "é".repeat(1000);
        let cut = echo(&long);
        assert_eq!(cut.chars().count(), ECHO_LIMIT + 1);
        assert!(cut.ends_with('…'));
    }
}
