//! The ASTM E1381 / E1394 host (issue 8): pcrd as the laboratory computer for
//! analysers that report their own results, over TCP (pcrd listens) and over a
//! serial port.
//!
//! One task owns each line (a TCP connection, a serial port) and drives the sans-IO
//! [`Link`](pcrd_protocol::astm::link::Link) with real time. Everyone else holds a
//! cloneable [`HostHandle`] to send orders, and reads typed [`HostEvent`]s.
//!
//! **Durability barrier.** A complete message is handed, text and raw bytes, to the
//! caller's [`MessageStore`]; the last frame is acknowledged only after
//! [`MessageStore::store`] returned `Ok`. If it returns `Err`, the frame is **not**
//! acknowledged and nothing else is sent for it: the instrument's reply timer (15 s)
//! runs out, it ends the transmission with EOT and keeps the message to send again
//! later; the link reports that as an abort, which goes to
//! [`MessageStore::quarantine`] (the bytes are kept if the store can keep anything).
//! Waiting is chosen over a NAK: the link offers no NAK for a frame it has already
//! accepted, and a NAK would make the instrument resend the same frame into the
//! same failing store up to six times.
//!
//! **Quarantine, never results.** A transmission that breaks off (no EOT, EOT
//! before the terminator, EOT while the last frame waited for the store) and a
//! message whose records break the hierarchy go to [`MessageStore::quarantine`] with
//! their raw bytes. A broken message is acknowledged once quarantined (the bytes are
//! kept, and the instrument resending them would not make them valid); if the
//! quarantine itself fails it is not acknowledged. A message stored and then not
//! confirmed by EOT is quarantined as well, under the same [`MessageKey`], so the
//! daemon can withdraw what it stored. When the line goes down mid-transmission
//! (socket closed, port gone), the partial message is quarantined as an abort with
//! [`AbortReason::Timeout`]: the link has no separate reason for a lost line.
//!
//! **Peers.** Over TCP only the configured instrument addresses are served; any other
//! connection is closed at once, logged and reported ([`HostEvent::PeerRefused`]). A
//! new connection from an instrument replaces its previous one for orders.
//!
//! **Confirmation.** When the instrument ends a transmission with EOT, the messages
//! stored in it are passed to [`MessageStore::confirmed`]: from then on they are the
//! instrument's final word (the daemon turns them into results and answers queries).
//!
//! What this module does NOT do: store anything itself, map test codes to kit
//! targets, or answer queries (Q records reach the store as messages; the daemon
//! answers through [`HostHandle::send`] once they are confirmed).

mod host;

pub use host::{HostHandle, SerialHostConfig, TcpHostConfig, spawn_serial_host, spawn_tcp_host};

use std::future::Future;
use std::net::SocketAddr;

use pcrd_protocol::astm::link::{AbortReason, SendFailure};
use pcrd_protocol::astm::record::{Message, RecordError};

/// Identifies a received message: the instrument, the connection (counted from 0 per
/// host) and the message's sequence number on that connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MessageKey {
    /// The configured instrument name.
    pub instrument: String,
    /// Connection number (a TCP accept or a serial port open), from 0 per host.
    pub connection: u64,
    /// Message number on the connection, from 0 (the link's `seq`).
    pub seq: u64,
}

/// A complete message with valid records, to be stored durably before its last frame
/// is acknowledged.
#[derive(Debug, Clone)]
pub struct InboundMessage {
    /// Which message this is.
    pub key: MessageKey,
    /// The message text (records separated by CR).
    pub text: Vec<u8>,
    /// Every byte received for it, as it came off the line.
    pub raw: Vec<u8>,
    /// The parsed records.
    pub records: Message,
}

/// Why bytes were quarantined.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum QuarantineReason {
    /// The transmission broke off before a message was whole.
    #[error("transmission aborted: {0}")]
    Aborted(AbortReason),
    /// A message already handed to [`MessageStore::store`] was never confirmed by EOT
    /// (the transmission broke off after it): withdraw it.
    #[error("stored message not confirmed by EOT: {0}")]
    Unconfirmed(AbortReason),
    /// The message's records do not form a valid message (hierarchy, delimiters…).
    #[error("records rejected: {0}")]
    Records(RecordError),
}

/// Bytes that must be kept for an operator but never turned into results.
#[derive(Debug, Clone)]
pub struct Quarantined {
    /// The instrument name.
    pub instrument: String,
    /// The connection number.
    pub connection: u64,
    /// The message, when the bytes belong to a complete (or stored) message.
    pub key: Option<MessageKey>,
    /// Why.
    pub reason: QuarantineReason,
    /// The raw bytes.
    pub raw: Vec<u8>,
}

/// The store failed; the message was not acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("store failed: {0}")]
pub struct StoreError(pub String);

/// Where the host puts what it receives; the daemon implements it durably.
/// Both methods must return only once the data is durable.
pub trait MessageStore: Send + Sync + 'static {
    /// Stores a message; the last frame is acknowledged only after `Ok`.
    fn store(
        &self,
        message: &InboundMessage,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Keeps bytes that are not results.
    fn quarantine(&self, item: &Quarantined)
    -> impl Future<Output = Result<(), StoreError>> + Send;
    /// The instrument ended the transmission with EOT after these stored messages:
    /// they are confirmed, and will not be reported as
    /// [`QuarantineReason::Unconfirmed`]. Called on the line's task, so it must not
    /// wait on the line (e.g. send an answer through the [`HostHandle`]): queue such
    /// work instead. The default does nothing.
    fn confirmed(&self, keys: &[MessageKey]) -> impl Future<Output = ()> + Send {
        let _ = keys;
        async {}
    }
}

/// What the host reports.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum HostEvent {
    /// A line came up (TCP connection accepted, serial port opened).
    LinkUp {
        /// The instrument.
        instrument: String,
        /// The connection number.
        connection: u64,
    },
    /// A line went down (closed, failed).
    LinkDown {
        /// The instrument.
        instrument: String,
        /// The connection number.
        connection: u64,
        /// Why.
        reason: String,
    },
    /// A TCP peer not on the list was refused.
    PeerRefused {
        /// Its address.
        peer: SocketAddr,
    },
    /// A message was stored and its last frame acknowledged.
    MessageStored {
        /// Which.
        key: MessageKey,
    },
    /// The store failed; the message was not acknowledged.
    StoreFailed {
        /// Which.
        key: MessageKey,
        /// The store's error.
        error: StoreError,
    },
    /// Bytes were quarantined.
    Quarantined {
        /// The instrument.
        instrument: String,
        /// The message, if any.
        key: Option<MessageKey>,
        /// Why.
        reason: QuarantineReason,
    },
}

/// Why an order message was not delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// No line to this instrument is up.
    #[error("instrument {0} is not connected")]
    NotConnected(String),
    /// The message cannot be encoded or framed.
    #[error("message not sendable: {0}")]
    Invalid(String),
    /// The link gave up (busy line, NAKs, no reply). The analyser may hold it anyway.
    #[error("not accepted by the instrument: {0}")]
    Failed(SendFailure),
    /// The line went down before the outcome was known.
    #[error("line went down before the message was acknowledged")]
    LinkDown,
}
