//! Extraction instruments over Modbus RTU and TCP.
//!
//! Two layers, each with one job:
//!
//! - [`bus`]: one task owns a Modbus link (a TCP connection, or a serial
//!   port shared by several unit ids on one RS-485 bus). Everyone else holds a
//!   cloneable [`BusHandle`] and sends it requests with a oneshot for the
//!   reply. Every call runs under a timeout. After a timeout, a transport or
//!   framing error, or a reply that does not match the request, the
//!   tokio-modbus context is dropped, the device's late reply is waited out
//!   and the link is rebuilt: tokio-modbus would otherwise hand a late reply
//!   to the next request as its answer (protocols.md §4.1). Reconnects back
//!   off; while backing off, requests fail at once with the reason.
//! - [`extractor`]: one instrument (a unit id behind a bus) seen through its
//!   register-map [`Profile`](pcrd_protocol::extractor::Profile): identify,
//!   status, commands with their resend policy, and a monitor task that polls
//!   and turns what it sees into typed [`ExtractorEvent`]s.
//!
//! What the registers mean is not decided here: decoding and encoding are
//! pure functions in `pcrd_protocol::extractor`.

pub mod bus;
pub mod extractor;

pub use bus::{
    BusConfig, BusHandle, BusStats, LinkConfig, Parity, SerialConfig, StopBits, spawn_bus,
};
pub use extractor::{
    CommandOutcome, DEFAULT_STALL_AFTER, EventKind, ExtractorEvent, ExtractorHandle, Monitor,
    PollStats,
};

use std::time::Duration;

use pcrd_protocol::extractor::{ExtractorError, ExtractorStatus};

/// Why a Modbus call failed. Layers as in style.md §7: transport, protocol,
/// device-reported.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ModbusError {
    /// No reply within the call's timeout. The link was dropped and will be
    /// rebuilt; a write's outcome is unknown.
    #[error("no reply within {} ms", .0.as_millis())]
    Timeout(Duration),
    /// The socket or port failed (closed, reset, unplugged); the link is
    /// being rebuilt.
    #[error("link failed: {0}")]
    Transport(String),
    /// Connecting failed; requests fail at once until the backoff expires.
    #[error("instrument offline: {reason}")]
    Offline { reason: String },
    /// A reply that does not belong to the request (wrong header, function,
    /// or register count): most often a late answer to an earlier request.
    /// The link was dropped.
    #[error("reply does not match the request: {0}")]
    Mismatch(String),
    /// The device answered with a Modbus exception (protocols.md §4 table).
    #[error("device answered with Modbus exception {code:#04x} ({meaning})")]
    Exception { code: u8, meaning: &'static str },
    /// The reply decoded to something the profile cannot use.
    #[error(transparent)]
    Decode(#[from] ExtractorError),
    /// A state-changing command's reply was lost and the state read back
    /// does not show it took effect. It was not resent (start and abort
    /// never are): the caller decides.
    #[error(
        "{command} was not confirmed by the device (state read back: {observed:?}); not resent"
    )]
    NotConfirmed {
        command: &'static str,
        observed: Box<ExtractorStatus>,
    },
    /// A command's reply was lost and the state could not be read back
    /// either: whether it took effect is unknown.
    #[error("{command}: outcome unknown ({cause}); state could not be read back")]
    OutcomeUnknown {
        command: &'static str,
        cause: String,
    },
    /// The bus task has stopped (its handles outlived it).
    #[error("the bus task has stopped")]
    Closed,
}

impl ModbusError {
    /// Whether the request may have reached the device with its reply lost:
    /// for a write, the outcome is unknown and must be read back.
    pub fn outcome_unknown(&self) -> bool {
        matches!(
            self,
            ModbusError::Timeout(_) | ModbusError::Transport(_) | ModbusError::Mismatch(_)
        )
    }

    /// Whether the instrument should be shown offline.
    pub fn is_link_failure(&self) -> bool {
        matches!(
            self,
            ModbusError::Timeout(_)
                | ModbusError::Transport(_)
                | ModbusError::Offline { .. }
                | ModbusError::Mismatch(_)
                | ModbusError::Closed
                // 0B: the device behind a gateway did not answer; handled as a
                // timeout, but the TCP link to the gateway is kept
                // (protocols.md §4).
                | ModbusError::Exception { code: 0x0B, .. }
        )
    }
}

/// Meaning of a Modbus exception code (Modbus Application Protocol v1.1b3
/// §7; protocols.md §4).
pub fn exception_meaning(code: u8) -> &'static str {
    match code {
        0x01 => "illegal function",
        0x02 => "illegal data address",
        0x03 => "illegal data value",
        0x04 => "server device failure",
        0x05 => "acknowledge",
        0x06 => "server device busy",
        0x08 => "memory parity error",
        0x0A => "gateway path unavailable",
        0x0B => "gateway target device failed to respond",
        _ => "unknown exception",
    }
}
