//! The HL7 sink: one ORU^R01 v2.5.1 message per result version over MLLP, one ACK
//! per message, on one TCP connection kept open between batches (issue 6, sink 4;
//! protocols.md §3; the profile in docs/hl7.md).
//!
//! For each item, in order: encode (a record that cannot be written is dead-lettered
//! as unencodable), send, and wait for the ACK carrying the same control id:
//!
//! | receiver says / does | outcome | then |
//! |---|---|---|
//! | `AA` | delivered | next item |
//! | `AE` (or `CE`/`CR`) | retry | stop: the rest of the batch is retried, in order |
//! | `AR` | dead (rejected, with the MSA/ERR text) | next item |
//! | nothing within `ack_timeout_ms` | retry | drop the connection, stop |
//! | an ACK for another control id, garbage, a closed connection | retry | drop the connection, stop |
//!
//! A retry sends the same bytes with the same MSH-10 ([`pcrd_protocol::hl7::control_id`]
//! is derived from the result version, and MSH-7 is its release time), so a receiver
//! that stored the first copy can drop the second. After a timeout the connection is
//! dropped rather than read on: a late ACK must never be taken for the next message's.
//! A commit accept (`CA`, enhanced mode) is not a delivery: the sink asks for
//! application ACKs only (MSH-15 `NE`, MSH-16 `AL`) and keeps waiting for one.
//!
//! A connection that was idle between batches may have been closed by the receiver;
//! when the first exchange on a reused connection fails before any answer arrives,
//! the sink reconnects and sends again once, at once, instead of waiting for the
//! outbox's backoff.

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use pcrd_protocol::hl7::mllp::{self, MllpDecoder, MllpEvent};
use pcrd_protocol::hl7::{Ack, AckCode, AckError, MessageHeader, encode_oru_r01, parse_ack};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};
use tracing::{Instrument, debug, info_span, warn};

use super::{DeadReason, ItemOutcome, OutboxItem};

/// Default time to wait for the ACK of one message.
pub const DEFAULT_ACK_TIMEOUT_MS: u64 = 30_000;
/// Default time to wait for the TCP connection.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 10_000;
/// Largest ACK accepted: an ACK is a few hundred bytes; this leaves room for long ERR
/// text without letting a broken receiver fill memory.
const MAX_ACK_BYTES: usize = 256 * 1024;

/// `[sinks.hl7]` as written in the config file.
#[derive(Debug, Default, Deserialize)]
pub struct RawHl7Config {
    /// The receiver's MLLP listener, `host:port`.
    pub address: Option<String>,
    /// MSH-5 and MSH-6: how the receiver names itself; empty when not set.
    pub receiving_application: Option<String>,
    pub receiving_facility: Option<String>,
    pub ack_timeout_ms: Option<u64>,
    pub connect_timeout_ms: Option<u64>,
}

/// A validated `[sinks.hl7]`.
#[derive(Clone, Debug)]
pub struct Hl7Config {
    /// `host:port`, resolved at each connect (the receiver may move).
    pub address: String,
    pub header: MessageHeader,
    pub ack_timeout: Duration,
    pub connect_timeout: Duration,
}

impl Hl7Config {
    /// Validates the raw config; relative paths resolve against `base`, `env` reads
    /// environment variables (secrets). Returns every problem at once.
    pub fn from_raw(
        raw: RawHl7Config,
        base: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Hl7Config, Vec<String>> {
        // No paths and no secrets in this sink's config.
        let _ = (base, env);
        let mut problems = Vec::new();
        let address = match raw.address {
            None => {
                problems.push(
                    "[sinks.hl7] needs address = \"host:port\" (the receiver's MLLP listener)"
                        .to_owned(),
                );
                String::new()
            }
            Some(address) => {
                if let Err(problem) = check_address(&address) {
                    problems.push(format!("[sinks.hl7] address {address:?}: {problem}"));
                }
                address
            }
        };
        let mut millis = |key: &str, value: Option<u64>, default: u64, max: u64| {
            let value = value.unwrap_or(default);
            if !(100..=max).contains(&value) {
                problems.push(format!(
                    "[sinks.hl7] {key} {value} is outside 100..={max} (milliseconds)"
                ));
            }
            Duration::from_millis(value)
        };
        let ack_timeout = millis(
            "ack_timeout_ms",
            raw.ack_timeout_ms,
            DEFAULT_ACK_TIMEOUT_MS,
            600_000,
        );
        let connect_timeout = millis(
            "connect_timeout_ms",
            raw.connect_timeout_ms,
            DEFAULT_CONNECT_TIMEOUT_MS,
            120_000,
        );
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Hl7Config {
            address,
            header: MessageHeader {
                receiving_application: raw.receiving_application.unwrap_or_default(),
                receiving_facility: raw.receiving_facility.unwrap_or_default(),
            },
            ack_timeout,
            connect_timeout,
        })
    }
}

/// `host:port` with a host and a port from 1 to 65535.
fn check_address(address: &str) -> Result<(), &'static str> {
    let (host, port) = address
        .rsplit_once(':')
        .ok_or("expected host:port, such as lis.example.org:2575")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err("the host is missing (expected host:port)");
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err("the port is not a number from 1 to 65535"),
        Ok(_) => Ok(()),
    }
}

/// The connection to the receiver and what has been read from it.
#[derive(Debug)]
struct Connection {
    stream: TcpStream,
    decoder: MllpDecoder,
    /// Frames read but not yet looked at.
    frames: VecDeque<Vec<u8>>,
    events: Vec<MllpEvent>,
    read_buffer: Vec<u8>,
    /// Whether a message was exchanged on it already (so it may have gone stale).
    used: bool,
}

/// Why one exchange did not end with an ACK for the message sent.
#[derive(Debug, thiserror::Error)]
enum ExchangeError {
    #[error("cannot connect to {address}: {detail}")]
    Connect { address: String, detail: String },
    #[error("no connection to {address} within {after:?}")]
    ConnectTimeout { address: String, after: Duration },
    #[error("the connection failed: {0}")]
    Io(std::io::Error),
    #[error("the receiver closed the connection before acknowledging")]
    Closed,
    #[error(
        "no ACK within {0:?}; the connection is dropped and the same message (same MSH-10) is sent again later"
    )]
    Timeout(Duration),
    #[error("the receiver's answer is not an ACK: {0}")]
    BadAck(AckError),
    #[error("the receiver's answer is larger than {0} bytes")]
    Oversized(usize),
    #[error(
        "the receiver acknowledged control id {got:?} while {expected:?} was outstanding; the connection is dropped"
    )]
    WrongControlId { expected: String, got: String },
}

impl ExchangeError {
    /// Whether nothing at all came back, so a stale reused connection may be why.
    fn nothing_answered(&self) -> bool {
        matches!(self, ExchangeError::Io(_) | ExchangeError::Closed)
    }
}

#[derive(Debug)]
pub struct Hl7Sink {
    config: Hl7Config,
    /// Boxed: the sink lives in the `Sink` enum beside smaller sinks.
    connection: Option<Box<Connection>>,
    /// The framed message being sent (reused between messages).
    frame_buffer: Vec<u8>,
}

impl Hl7Sink {
    pub fn new(config: &Hl7Config) -> Result<Hl7Sink, String> {
        check_address(&config.address)
            .map_err(|problem| format!("hl7 sink address {:?}: {problem}", config.address))?;
        Ok(Hl7Sink {
            config: config.clone(),
            connection: None,
            frame_buffer: Vec::with_capacity(2048),
        })
    }

    /// Delivers `items` in order; one outcome per item (see the module documentation).
    pub async fn deliver(&mut self, items: &[OutboxItem]) -> Vec<ItemOutcome> {
        let span = info_span!("hl7_deliver", sink = "hl7", address = %self.config.address, items = items.len());
        self.deliver_in_order(items).instrument(span).await
    }

    async fn deliver_in_order(&mut self, items: &[OutboxItem]) -> Vec<ItemOutcome> {
        let mut outcomes = Vec::with_capacity(items.len());
        for item in items {
            let record = &item.record;
            let message = match encode_oru_r01(record, &self.config.header, &record.released_at) {
                Ok(message) => message,
                Err(error) => {
                    warn!(seq = item.seq, result = %record.idempotency_key(), %error, "result cannot be written as HL7; dead-lettered");
                    outcomes.push(ItemOutcome::Dead {
                        reason: DeadReason::Unencodable,
                        detail: error.to_string(),
                    });
                    continue;
                }
            };
            self.frame_buffer.clear();
            mllp::frame_into(message.text.as_bytes(), &mut self.frame_buffer);
            let result = self.exchange(&message.control_id).await;
            let outcome = match result {
                Ok(ack) => {
                    debug!(seq = item.seq, control_id = %message.control_id, code = ack.code.as_str(), "acknowledged");
                    match ack.code {
                        AckCode::ApplicationAccept => ItemOutcome::Delivered,
                        AckCode::ApplicationReject => {
                            warn!(seq = item.seq, control_id = %message.control_id, text = %ack.text, "receiver rejected the message (AR); dead-lettered");
                            outcomes.push(ItemOutcome::Dead {
                                reason: DeadReason::Rejected,
                                detail: describe("AR", &message.control_id, &ack),
                            });
                            continue;
                        }
                        code => {
                            warn!(seq = item.seq, control_id = %message.control_id, code = code.as_str(), text = %ack.text, "receiver answered with an error; retried later");
                            ItemOutcome::Retry {
                                reason: describe(code.as_str(), &message.control_id, &ack),
                                after: None,
                            }
                        }
                    }
                }
                Err(error) => {
                    warn!(seq = item.seq, control_id = %message.control_id, %error, "not delivered; retried later");
                    self.connection = None;
                    ItemOutcome::Retry {
                        reason: format!("control id {}: {error}", message.control_id),
                        after: None,
                    }
                }
            };
            let stop = !matches!(outcome, ItemOutcome::Delivered);
            outcomes.push(outcome);
            if stop {
                // Later items wait so that the receiver sees results in release order.
                let reason = format!(
                    "not sent: item {} before it in the batch was not delivered",
                    item.seq
                );
                while outcomes.len() < items.len() {
                    outcomes.push(ItemOutcome::Retry {
                        reason: reason.clone(),
                        after: None,
                    });
                }
                break;
            }
        }
        outcomes
    }

    /// Sends the framed message in `frame_buffer` and returns the receiver's ACK for
    /// `control_id` (an application ACK, or a commit error/reject).
    async fn exchange(&mut self, control_id: &str) -> Result<Ack, ExchangeError> {
        let reused = self.connection.as_ref().is_some_and(|c| c.used);
        match self.exchange_once(control_id).await {
            Err(error) if reused && error.nothing_answered() => {
                debug!(%error, "the idle connection went stale; reconnecting and sending again");
                self.connection = None;
                self.exchange_once(control_id).await
            }
            other => other,
        }
    }

    async fn exchange_once(&mut self, control_id: &str) -> Result<Ack, ExchangeError> {
        if self.connection.is_none() {
            self.connection = Some(Box::new(self.connect().await?));
        }
        let Some(connection) = self.connection.as_mut() else {
            return Err(ExchangeError::Closed);
        };
        connection.used = true;
        let ack_timeout = self.config.ack_timeout;
        let deadline = Instant::now() + ack_timeout;
        match timeout_at(deadline, connection.stream.write_all(&self.frame_buffer)).await {
            Err(_) => return Err(ExchangeError::Timeout(ack_timeout)),
            Ok(Err(error)) => return Err(ExchangeError::Io(error)),
            Ok(Ok(())) => {}
        }
        loop {
            while let Some(frame) = connection.frames.pop_front() {
                let ack = parse_ack(&frame).map_err(ExchangeError::BadAck)?;
                if ack.control_id != control_id {
                    return Err(ExchangeError::WrongControlId {
                        expected: control_id.to_owned(),
                        got: ack.control_id,
                    });
                }
                if ack.code == AckCode::CommitAccept {
                    // Stored by the receiver, not yet processed: wait for the AA/AE/AR.
                    continue;
                }
                return Ok(ack);
            }
            let read = timeout_at(
                deadline,
                connection.stream.read(&mut connection.read_buffer),
            )
            .await;
            let n = match read {
                Err(_) => return Err(ExchangeError::Timeout(ack_timeout)),
                Ok(Err(error)) => return Err(ExchangeError::Io(error)),
                Ok(Ok(0)) => return Err(ExchangeError::Closed),
                Ok(Ok(n)) => n,
            };
            connection
                .decoder
                .feed(&connection.read_buffer[..n], &mut connection.events);
            for event in connection.events.drain(..) {
                match event {
                    MllpEvent::Frame(frame) => connection.frames.push_back(frame),
                    MllpEvent::Garbage { bytes } => {
                        warn!(bytes, "dropped bytes the receiver sent outside MLLP frames");
                    }
                    MllpEvent::Oversized { limit } => {
                        return Err(ExchangeError::Oversized(limit));
                    }
                }
            }
        }
    }

    async fn connect(&self) -> Result<Connection, ExchangeError> {
        let address = &self.config.address;
        let stream = match timeout(self.config.connect_timeout, TcpStream::connect(address)).await {
            Err(_) => {
                return Err(ExchangeError::ConnectTimeout {
                    address: address.clone(),
                    after: self.config.connect_timeout,
                });
            }
            Ok(Err(error)) => {
                return Err(ExchangeError::Connect {
                    address: address.clone(),
                    detail: error.to_string(),
                });
            }
            Ok(Ok(stream)) => stream,
        };
        // One small message, then wait for its answer: Nagle's delay would add up to
        // 40 ms to every exchange.
        stream.set_nodelay(true).map_err(ExchangeError::Io)?;
        debug!(address = %address, "connected");
        Ok(Connection {
            stream,
            decoder: MllpDecoder::new(MAX_ACK_BYTES),
            frames: VecDeque::new(),
            events: Vec::new(),
            read_buffer: vec![0; 16 * 1024],
            used: false,
        })
    }
}

/// What to record about a negative ACK.
fn describe(code: &str, control_id: &str, ack: &Ack) -> String {
    if ack.text.is_empty() {
        format!("receiver answered {code} to control id {control_id} (no error text)")
    } else {
        format!(
            "receiver answered {code} to control id {control_id}: {}",
            ack.text
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(address: &str) -> RawHl7Config {
        RawHl7Config {
            address: Some(address.into()),
            ..RawHl7Config::default()
        }
    }

    #[test]
    fn config_defaults_and_every_problem_at_once() {
        let env = |_: &str| None;
        let config =
            Hl7Config::from_raw(raw("lis.example.org:2575"), Path::new("."), &env).expect("valid");
        assert_eq!(
            config.ack_timeout,
            Duration::from_millis(DEFAULT_ACK_TIMEOUT_MS)
        );
        assert_eq!(config.header.receiving_application, "");
        let problems = Hl7Config::from_raw(
            RawHl7Config {
                address: Some("lis.example.org".into()),
                ack_timeout_ms: Some(5),
                connect_timeout_ms: Some(1_000_000),
                ..RawHl7Config::default()
            },
            Path::new("."),
            &env,
        )
        .expect_err("invalid");
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("host:port"), "{problems:?}");
        let missing = Hl7Config::from_raw(RawHl7Config::default(), Path::new("."), &env)
            .expect_err("no address");
        assert!(missing[0].contains("needs address"), "{missing:?}");
        assert!(check_address("[::1]:2575").is_ok());
        assert!(check_address("host:0").is_err());
        assert!(check_address(":2575").is_err());
    }
}
