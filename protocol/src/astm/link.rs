//! The E1381 / LIS1-A link layer as a sans-IO state machine (protocols.md §1.1–§1.5).
//!
//! One [`Link`] is one end of one line, sending and receiving (half duplex: idle →
//! establishment → transfer → termination → idle). The caller feeds it what the line
//! delivered ([`Link::handle_bytes`]) and wakes it at [`Link::next_deadline`]
//! ([`Link::handle_timeout`]); it hands back bytes to write ([`Link::poll_transmit`])
//! and events ([`Link::poll_event`]). Time is a [`Millis`] argument; nothing is read
//! from a clock, so a test can run an hour of timeouts in a microsecond.
//!
//! **Durability.** When the last frame of a message (the frame that ends its L record)
//! arrives, the link emits [`LinkEvent::MessageComplete`] and does *not* acknowledge
//! the frame. The caller stores the message, raw bytes included, and then calls
//! [`Link::ack_last_frame`]. Until then further input is buffered, not answered. A
//! message is only confirmed when the sender ends the transmission with EOT
//! ([`LinkEvent::TransmissionEnded`]); a transmission that times out or ends in the
//! middle of a message is reported as [`LinkEvent::MessageAborted`] with its bytes,
//! and any messages of it that were not confirmed are listed there for quarantine.
//!
//! **Sending.** [`Link::send_message`] queues one LIS2-A2 message (H … L). The link
//! bids with ENQ, sends one record per end frame (long records over intermediate
//! frames), resends a frame on NAK up to 6 attempts, and reports
//! [`LinkEvent::MessageSent`] or [`LinkEvent::SendFailed`]. It never resends a failed
//! message by itself: the caller keeps it and queues it again whole, because the peer
//! may already hold it (an ACK lost six times looks exactly like a NAK storm).

use std::collections::VecDeque;
use std::time::Duration;

use super::frame::{self, Decoded, FrameError};
use super::record::{Message, RecordError};
use super::{ACK, CR, ENQ, EOT, Millis, NAK, STX};

/// Which end of the line this is. It decides who wins contention (both sides bid
/// with ENQ at once): the instrument (protocols.md §1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The laboratory computer (pcrd as host): yields on contention.
    Computer,
    /// The instrument (simulators, tests): keeps bidding on contention.
    Instrument,
}

/// Timers, limits and the frame size. [`LinkConfig::computer`] and
/// [`LinkConfig::instrument`] give the standard's values (protocols.md §1.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkConfig {
    /// Who wins contention.
    pub role: Role,
    /// Text characters per frame sent (240 for E1381-95 peers; up to 63,993 for
    /// LIS1-A peers).
    pub text_per_frame: usize,
    /// Largest frame accepted, STX to LF (64,000 per LIS1-A).
    pub max_frame_len: usize,
    /// Largest message accepted, raw bytes; frames past it are refused with NAK. Not
    /// in the standard: a bound on memory against a peer that never sends L.
    pub max_message_len: usize,
    /// Sender: wait for a reply to ENQ or to a frame (15 s).
    pub reply_timeout: Duration,
    /// Receiver: wait for the next frame or EOT (30 s).
    pub receive_timeout: Duration,
    /// Sender: wait after a NAK to ENQ (or an unanswered ENQ) before bidding again
    /// (≥ 10 s).
    pub busy_retry: Duration,
    /// After contention: the computer waits this long for the instrument's ENQ (20 s);
    /// the instrument waits this long before bidding again (≥ 1 s).
    pub contention_wait: Duration,
    /// Sender: do not bid for this long after honouring a receiver interrupt (15 s),
    /// unless the other side sends and releases the line first.
    pub interrupt_hold: Duration,
    /// Sends of one frame before the sender gives up (6).
    pub max_attempts: u32,
    /// Unsuccessful bids (NAK or no answer to ENQ) before a message is reported as
    /// failed. Not in the standard, which retries for ever: a bound keeps a dead
    /// line visible.
    pub max_bids: u32,
}

impl LinkConfig {
    /// The laboratory computer's side, with the standard's timers.
    pub fn computer() -> LinkConfig {
        LinkConfig {
            role: Role::Computer,
            text_per_frame: frame::DEFAULT_TEXT_PER_FRAME,
            max_frame_len: frame::MAX_FRAME_LEN,
            max_message_len: 4 * 1024 * 1024,
            reply_timeout: Duration::from_secs(15),
            receive_timeout: Duration::from_secs(30),
            busy_retry: Duration::from_secs(10),
            contention_wait: Duration::from_secs(20),
            interrupt_hold: Duration::from_secs(15),
            max_attempts: 6,
            max_bids: 6,
        }
    }

    /// The instrument's side, with the standard's timers.
    pub fn instrument() -> LinkConfig {
        LinkConfig {
            role: Role::Instrument,
            contention_wait: Duration::from_secs(1),
            ..LinkConfig::computer()
        }
    }
}

/// Identifies a message queued with [`Link::send_message`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(pub u64);

/// A message received whole, announced before its last frame is acknowledged.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedMessage {
    /// Sequence number of this message on this link (from 0), used by
    /// [`LinkEvent::TransmissionEnded`] and [`LinkEvent::MessageAborted`].
    pub seq: u64,
    /// The message text: the frames' texts joined (records separated by CR).
    pub text: Vec<u8>,
    /// Every byte received for this message, as it came off the line: ENQ, noise,
    /// rejected and repeated frames included.
    pub raw: Vec<u8>,
    /// The records, or why they do not form a message (out of hierarchy, unknown
    /// delimiters…): such a message is quarantined, never turned into results.
    pub records: Result<Message, RecordError>,
}

/// Why a received transmission did not end well.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AbortReason {
    /// The sender sent EOT before the L record: it gave up on a frame (six NAKs or no
    /// reply) or was cut off.
    #[error("the sender ended the transmission before the message's terminator record")]
    EotBeforeTerminator,
    /// The sender sent EOT while the last frame was still waiting for the store: it
    /// did not get our ACK in time and will consider the message failed.
    #[error("the sender ended the transmission before the last frame was acknowledged")]
    EotBeforeAck,
    /// Neither a frame nor EOT arrived within the receive timeout: the line or the
    /// instrument went away.
    #[error("no frame or EOT within the receive timeout")]
    Timeout,
}

/// Why a frame was refused with NAK.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// The frame itself is bad (checksum, number, restricted character, size, trailer).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A good frame with a number that is neither the next nor a repeat of the last:
    /// a frame was lost.
    #[error("frame number {found} out of sequence (expected {expected})")]
    OutOfSequence {
        /// The number expected next.
        expected: u8,
        /// The number received.
        found: u8,
    },
    /// The message grew past [`LinkConfig::max_message_len`].
    #[error("message longer than {limit} bytes")]
    MessageTooLong {
        /// The limit.
        limit: usize,
    },
}

/// Why a message could not be sent. The caller keeps the message and may queue it
/// again; the peer may hold it already.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendFailure {
    /// The peer answered ENQ with NAK (busy) or not at all, [`LinkConfig::max_bids`]
    /// times.
    #[error("the peer did not accept the line")]
    LineRefused,
    /// A frame was refused [`LinkConfig::max_attempts`] times.
    #[error("a frame was refused too many times")]
    TooManyNaks,
    /// A frame got no reply within the reply timeout.
    #[error("no reply to a frame within the reply timeout")]
    NoReply,
}

/// What the link reports.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum LinkEvent {
    /// A whole message arrived. Store it durably, then call [`Link::ack_last_frame`].
    MessageComplete(ReceivedMessage),
    /// The sender ended the transmission with EOT: these messages are confirmed.
    TransmissionEnded {
        /// Sequence numbers of the messages of this transmission not yet confirmed.
        messages: Vec<u64>,
    },
    /// A transmission broke off. Its partial message (if any) is in `raw`; the
    /// `unconfirmed` messages completed but never saw EOT. Quarantine both.
    MessageAborted {
        /// What happened.
        reason: AbortReason,
        /// Bytes received since the last complete message (or since ENQ).
        raw: Vec<u8>,
        /// Messages of this transmission announced by `MessageComplete` but not
        /// confirmed by EOT.
        unconfirmed: Vec<u64>,
    },
    /// A frame was refused with NAK (for the log; the sender will retry).
    FrameRejected {
        /// Why.
        reason: Rejection,
    },
    /// A queued message was accepted by the peer, last frame ACKed.
    MessageSent {
        /// The message.
        id: MessageId,
    },
    /// A queued message could not be sent; it has left the queue.
    SendFailed {
        /// The message.
        id: MessageId,
        /// Why.
        reason: SendFailure,
    },
}

/// A call the link cannot honour.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The text to send holds a restricted control character (protocols.md §1.6).
    #[error("message text not sendable: {0}")]
    Text(#[from] FrameError),
    /// The text to send does not end with an L record, so the receiver could never
    /// tell that the message is whole.
    #[error("a message to send must end with a terminator (L) record")]
    NoTerminator,
    /// [`Link::ack_last_frame`] was called with no message waiting for it (already
    /// acknowledged, or the transmission was aborted meanwhile).
    #[error("no received frame is waiting for its acknowledgement")]
    NothingToAck,
}

#[derive(Debug)]
enum State {
    Idle,
    Bidding {
        deadline: Millis,
    },
    Sending {
        index: usize,
        attempts: u32,
        deadline: Millis,
    },
    Receiving {
        /// `None` while the last frame waits for [`Link::ack_last_frame`].
        deadline: Option<Millis>,
        last_number: Option<u8>,
    },
}

#[derive(Debug)]
struct Outgoing {
    id: MessageId,
    frames: Vec<Vec<u8>>,
}

/// One end of an ASTM line. See the module documentation.
#[derive(Debug)]
pub struct Link {
    config: LinkConfig,
    state: State,
    transmit: VecDeque<Vec<u8>>,
    events: VecDeque<LinkEvent>,
    outgoing: VecDeque<Outgoing>,
    next_id: u64,
    bids: u32,
    hold_until: Option<Millis>,
    // Receiving.
    rx_buf: Vec<u8>,
    partial_text: Vec<u8>,
    partial_raw: Vec<u8>,
    record_start: usize,
    frames_seen: bool,
    discarding: Option<FrameError>,
    unconfirmed: Vec<u64>,
    next_seq: u64,
}

impl Link {
    /// An idle link.
    pub fn new(mut config: LinkConfig) -> Link {
        config.text_per_frame = config
            .text_per_frame
            .clamp(1, frame::MAX_FRAME_LEN - frame::FRAME_OVERHEAD);
        config.max_frame_len = config.max_frame_len.max(frame::FRAME_OVERHEAD + 1);
        Link {
            config,
            state: State::Idle,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            outgoing: VecDeque::new(),
            next_id: 0,
            bids: 0,
            hold_until: None,
            rx_buf: Vec::new(),
            partial_text: Vec::new(),
            partial_raw: Vec::new(),
            record_start: 0,
            frames_seen: false,
            discarding: None,
            unconfirmed: Vec::new(),
            next_seq: 0,
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &LinkConfig {
        &self.config
    }

    /// Bytes to write to the line, in order.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmit.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<LinkEvent> {
        self.events.pop_front()
    }

    /// When [`Link::handle_timeout`] must be called next, if at all.
    pub fn next_deadline(&self) -> Option<Millis> {
        match self.state {
            State::Idle => self.hold_until.filter(|_| !self.outgoing.is_empty()),
            State::Bidding { deadline } | State::Sending { deadline, .. } => Some(deadline),
            State::Receiving { deadline, .. } => deadline,
        }
    }

    /// Is the line idle (no transmission in either direction)?
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Idle)
    }

    /// Messages queued or being sent.
    pub fn queued(&self) -> usize {
        self.outgoing.len()
    }

    /// Queues one message (records separated by CR, ending with an L record; a
    /// missing final CR is added) and bids for the line if it is free.
    pub fn send_message(&mut self, now: Millis, text: &[u8]) -> Result<MessageId, LinkError> {
        frame::check_text(text)?;
        let mut text = text.to_vec();
        if text.last() != Some(&CR) {
            text.push(CR);
        }
        let last_record = text[..text.len() - 1]
            .rsplit(|b| *b == CR)
            .next()
            .unwrap_or(&[]);
        if !last_record
            .first()
            .is_some_and(|b| b.eq_ignore_ascii_case(&b'L'))
        {
            return Err(LinkError::NoTerminator);
        }
        let frames = frame::split_message(&text, self.config.text_per_frame, 1)
            .iter()
            .map(frame::Frame::encode)
            .collect::<Result<Vec<_>, _>>()?;
        let id = MessageId(self.next_id);
        self.next_id += 1;
        self.outgoing.push_back(Outgoing { id, frames });
        self.maybe_bid(now);
        Ok(id)
    }

    /// Acknowledges the last frame of the message announced by
    /// [`LinkEvent::MessageComplete`]; call it once the message is stored durably.
    /// Input that arrived meanwhile is processed now.
    pub fn ack_last_frame(&mut self, now: Millis) -> Result<(), LinkError> {
        match self.state {
            State::Receiving {
                ref mut deadline,
                last_number: _,
            } if deadline.is_none() => {
                *deadline = Some(now.after(self.config.receive_timeout));
                self.transmit.push_back(vec![ACK]);
                self.process(now, Vec::new());
                self.maybe_bid(now);
                Ok(())
            }
            _ => Err(LinkError::NothingToAck),
        }
    }

    /// Feeds bytes read from the line at `now`.
    pub fn handle_bytes(&mut self, now: Millis, bytes: &[u8]) {
        self.process(now, bytes.to_vec());
        self.maybe_bid(now);
    }

    /// Acts on expired timers at `now` (harmless to call early or often).
    pub fn handle_timeout(&mut self, now: Millis) {
        match self.state {
            State::Bidding { deadline } if now >= deadline => {
                // No answer to ENQ: terminate and bid again later.
                self.transmit.push_back(vec![EOT]);
                self.bid_failed(now);
            }
            State::Sending { deadline, .. } if now >= deadline => {
                self.transmit.push_back(vec![EOT]);
                self.fail_front(SendFailure::NoReply);
                self.state = State::Idle;
            }
            State::Receiving {
                deadline: Some(deadline),
                ..
            } if now >= deadline => {
                // Unread bytes are already in `partial_raw` (`rx_buf` is its tail).
                let raw = std::mem::take(&mut self.partial_raw);
                if self.frames_seen || !self.unconfirmed.is_empty() {
                    self.events.push_back(LinkEvent::MessageAborted {
                        reason: AbortReason::Timeout,
                        raw,
                        unconfirmed: std::mem::take(&mut self.unconfirmed),
                    });
                }
                self.reset_receiver();
                self.state = State::Idle;
            }
            _ => {}
        }
        if self.hold_until.is_some_and(|h| now >= h) {
            self.hold_until = None;
        }
        self.maybe_bid(now);
    }

    fn maybe_bid(&mut self, now: Millis) {
        if matches!(self.state, State::Idle)
            && !self.outgoing.is_empty()
            && self.hold_until.is_none_or(|h| now >= h)
        {
            self.hold_until = None;
            self.transmit.push_back(vec![ENQ]);
            self.state = State::Bidding {
                deadline: now.after(self.config.reply_timeout),
            };
        }
    }

    fn bid_failed(&mut self, now: Millis) {
        self.bids += 1;
        if self.bids >= self.config.max_bids {
            self.fail_front(SendFailure::LineRefused);
        }
        self.state = State::Idle;
        self.hold_until = Some(now.after(self.config.busy_retry));
    }

    fn fail_front(&mut self, reason: SendFailure) {
        self.bids = 0;
        if let Some(out) = self.outgoing.pop_front() {
            self.events
                .push_back(LinkEvent::SendFailed { id: out.id, reason });
        }
    }

    fn send_frame(&mut self, now: Millis, index: usize, attempts: u32) {
        let Some(bytes) = self.outgoing.front().and_then(|o| o.frames.get(index)) else {
            self.state = State::Idle;
            return;
        };
        self.transmit.push_back(bytes.clone());
        self.state = State::Sending {
            index,
            attempts,
            deadline: now.after(self.config.reply_timeout),
        };
    }

    /// Runs `input` through the state machine; bytes left when a transmission ends are
    /// processed in the new state.
    fn process(&mut self, now: Millis, mut input: Vec<u8>) {
        loop {
            let leftover = match self.state {
                State::Idle => self.idle(now, &input),
                State::Bidding { .. } => {
                    self.bidding(now, &input);
                    None
                }
                State::Sending {
                    index, attempts, ..
                } => {
                    self.sending(now, &input, index, attempts);
                    None
                }
                State::Receiving { .. } => {
                    self.partial_raw.extend_from_slice(&input);
                    self.rx_buf.append(&mut input);
                    self.receiving(now)
                }
            };
            match leftover {
                Some(rest) if !rest.is_empty() => input = rest,
                _ => return,
            }
        }
    }

    fn idle(&mut self, now: Millis, input: &[u8]) -> Option<Vec<u8>> {
        // Anything but ENQ on an idle line is noise.
        let pos = input.iter().position(|b| *b == ENQ)?;
        self.transmit.push_back(vec![ACK]);
        self.reset_receiver();
        self.partial_raw.push(ENQ);
        self.state = State::Receiving {
            deadline: Some(now.after(self.config.receive_timeout)),
            last_number: None,
        };
        Some(input[pos + 1..].to_vec())
    }

    fn bidding(&mut self, now: Millis, input: &[u8]) {
        // Replies other than ACK, NAK or ENQ are ignored (protocols.md §1.1).
        match input.iter().find(|b| matches!(**b, ACK | NAK | ENQ)) {
            Some(&ACK) => {
                self.bids = 0;
                self.send_frame(now, 0, 1);
            }
            Some(&NAK) => self.bid_failed(now),
            Some(_) => {
                // Contention: the instrument wins. The computer waits for the
                // instrument's next ENQ; the instrument bids again shortly.
                self.state = State::Idle;
                self.hold_until = Some(now.after(self.config.contention_wait));
            }
            None => {}
        }
    }

    fn sending(&mut self, now: Millis, input: &[u8], index: usize, attempts: u32) {
        // One reply per frame; the rest of what arrived with it is noise.
        let Some(&reply) = input.first() else {
            return;
        };
        let frames = self.outgoing.front().map_or(0, |o| o.frames.len());
        if reply == ACK || reply == EOT {
            let next = index + 1;
            if next >= frames {
                if let Some(out) = self.outgoing.pop_front() {
                    self.events.push_back(LinkEvent::MessageSent { id: out.id });
                }
                self.transmit.push_back(vec![EOT]);
                self.state = State::Idle;
                if reply == EOT {
                    self.hold_until = Some(now.after(self.config.interrupt_hold));
                }
            } else if reply == EOT {
                // Receiver interrupt: honour it. The message stays first in the queue
                // and goes again whole; the receiver discards the partial one.
                self.transmit.push_back(vec![EOT]);
                self.state = State::Idle;
                self.hold_until = Some(now.after(self.config.interrupt_hold));
            } else {
                self.send_frame(now, next, 1);
            }
        } else if attempts >= self.config.max_attempts {
            self.transmit.push_back(vec![EOT]);
            self.fail_front(SendFailure::TooManyNaks);
            self.state = State::Idle;
        } else {
            self.send_frame(now, index, attempts + 1);
        }
    }

    fn reset_receiver(&mut self) {
        self.rx_buf.clear();
        self.partial_text.clear();
        self.partial_raw.clear();
        self.record_start = 0;
        self.frames_seen = false;
        self.discarding = None;
    }

    fn reject(&mut self, now: Millis, reason: Rejection) {
        self.transmit.push_back(vec![NAK]);
        self.events.push_back(LinkEvent::FrameRejected { reason });
        self.frames_seen = true;
        self.touch(now);
    }

    fn touch(&mut self, now: Millis) {
        if let State::Receiving { deadline, .. } = &mut self.state {
            *deadline = Some(now.after(self.config.receive_timeout));
        }
    }

    /// Works through `rx_buf`; returns the bytes after an EOT that ended the
    /// transmission.
    fn receiving(&mut self, now: Millis) -> Option<Vec<u8>> {
        loop {
            let State::Receiving {
                deadline,
                last_number,
            } = self.state
            else {
                return None;
            };
            if deadline.is_none() {
                // Waiting for the store: input is kept for later, except an EOT, which
                // means the sender gave up on our ACK (reported as EotBeforeAck).
                let first = self.rx_buf.iter().position(|b| *b == STX || *b == EOT)?;
                if self.rx_buf[first] != EOT {
                    return None;
                }
                let rest = self.rx_buf.split_off(first + 1);
                let keep = self.partial_raw.len().saturating_sub(rest.len());
                self.partial_raw.truncate(keep);
                self.end_transmission();
                return Some(rest);
            }
            if let Some(error) = self.discarding.clone() {
                // Skip the rest of an oversized frame, then refuse it.
                match self
                    .rx_buf
                    .iter()
                    .position(|b| matches!(*b, b'\n' | STX | EOT))
                {
                    Some(p) => {
                        let end = if self.rx_buf[p] == b'\n' { p + 1 } else { p };
                        self.rx_buf.drain(..end);
                        self.discarding = None;
                        self.reject(now, error.into());
                    }
                    None => {
                        self.rx_buf.clear();
                        return None;
                    }
                }
                continue;
            }
            let Some(start) = self.rx_buf.iter().position(|b| *b == STX || *b == EOT) else {
                self.rx_buf.clear(); // noise between frames
                return None;
            };
            self.rx_buf.drain(..start);
            if self.rx_buf.first() == Some(&EOT) {
                let rest = self.rx_buf.split_off(1);
                // The EOT stays in the raw bytes (it shows how the transmission ended);
                // what follows it is not part of this message.
                let keep = self.partial_raw.len().saturating_sub(rest.len());
                self.partial_raw.truncate(keep);
                self.end_transmission();
                return Some(rest);
            }
            match frame::decode(&self.rx_buf, self.config.max_frame_len) {
                Decoded::Incomplete => return None,
                Decoded::Invalid { error, len } => {
                    self.rx_buf.drain(..len.max(1));
                    match error {
                        FrameError::TooLong { .. } => {
                            self.frames_seen = true;
                            self.discarding = Some(error);
                        }
                        // The sender gave up mid-frame; its EOT comes next.
                        FrameError::Truncated { byte: EOT } => self.frames_seen = true,
                        _ => self.reject(now, error.into()),
                    }
                }
                Decoded::Frame { frame, len } => {
                    self.rx_buf.drain(..len);
                    self.frames_seen = true;
                    let expected = last_number.map_or(1, |n| (n + 1) % 8);
                    if frame.number == expected {
                        if self.partial_raw.len() > self.config.max_message_len {
                            self.reject(
                                now,
                                Rejection::MessageTooLong {
                                    limit: self.config.max_message_len,
                                },
                            );
                            continue;
                        }
                        self.state = State::Receiving {
                            deadline,
                            last_number: Some(frame.number),
                        };
                        self.partial_text.extend_from_slice(&frame.text);
                        let terminator = frame.end
                            && self
                                .partial_text
                                .get(self.record_start)
                                .is_some_and(|b| b.eq_ignore_ascii_case(&b'L'));
                        if terminator {
                            self.complete_message();
                            return None;
                        }
                        if frame.end {
                            self.record_start = self.partial_text.len();
                        }
                        self.transmit.push_back(vec![ACK]);
                        self.touch(now);
                    } else if Some(frame.number) == last_number {
                        // Our ACK was lost and the sender repeated the frame.
                        self.transmit.push_back(vec![ACK]);
                        self.touch(now);
                    } else {
                        self.reject(
                            now,
                            Rejection::OutOfSequence {
                                expected,
                                found: frame.number,
                            },
                        );
                    }
                }
            }
        }
    }

    fn complete_message(&mut self) {
        let text = std::mem::take(&mut self.partial_text);
        // Bytes still unread belong to whatever comes next.
        let cut = self.partial_raw.len().saturating_sub(self.rx_buf.len());
        let next_raw = self.partial_raw.split_off(cut);
        let raw = std::mem::replace(&mut self.partial_raw, next_raw);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.unconfirmed.push(seq);
        self.record_start = 0;
        self.frames_seen = false;
        let records = Message::parse(&text);
        self.events
            .push_back(LinkEvent::MessageComplete(ReceivedMessage {
                seq,
                text,
                raw,
                records,
            }));
        if let State::Receiving { deadline, .. } = &mut self.state {
            *deadline = None;
        }
    }

    fn end_transmission(&mut self) {
        let waiting_for_store = matches!(self.state, State::Receiving { deadline: None, .. });
        if waiting_for_store {
            self.events.push_back(LinkEvent::MessageAborted {
                reason: AbortReason::EotBeforeAck,
                raw: std::mem::take(&mut self.partial_raw),
                unconfirmed: std::mem::take(&mut self.unconfirmed),
            });
        } else {
            if !self.unconfirmed.is_empty() || !self.frames_seen {
                self.events.push_back(LinkEvent::TransmissionEnded {
                    messages: std::mem::take(&mut self.unconfirmed),
                });
            }
            if self.frames_seen {
                self.events.push_back(LinkEvent::MessageAborted {
                    reason: AbortReason::EotBeforeTerminator,
                    raw: std::mem::take(&mut self.partial_raw),
                    unconfirmed: Vec::new(),
                });
            }
        }
        self.reset_receiver();
        // The other side has sent and released the line: we may bid at once.
        self.hold_until = None;
        self.state = State::Idle;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::astm::from_mnemonics;

    const MESSAGE: &[u8] = b"H|\\^&\rP|1\rO|1|SPC1||^^^SARS2\rL|1|N\r";

    fn out(link: &mut Link) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| link.poll_transmit()).collect()
    }

    fn events(link: &mut Link) -> Vec<LinkEvent> {
        std::iter::from_fn(|| link.poll_event()).collect()
    }

    fn secs(s: u64) -> Millis {
        Millis(s * 1000)
    }

    #[test]
    fn sender_bids_sends_one_record_per_frame_and_terminates() {
        let mut link = Link::new(LinkConfig::computer());
        let id = link.send_message(Millis(0), MESSAGE).unwrap();
        assert_eq!(out(&mut link), [vec![ENQ]]);
        assert_eq!(link.next_deadline(), Some(secs(15)));
        link.handle_bytes(Millis(10), &[ACK]);
        assert_eq!(
            out(&mut link),
            [from_mnemonics("<STX>1H|\\^&<CR><ETX>E5<CR><LF>")]
        );
        for (i, _) in [2, 3, 4].iter().enumerate() {
            link.handle_bytes(Millis(20 + i as u64), &[ACK]);
            assert_eq!(out(&mut link).len(), 1);
        }
        assert!(events(&mut link).is_empty());
        link.handle_bytes(Millis(30), &[ACK]);
        assert_eq!(out(&mut link), [vec![EOT]]);
        assert_eq!(events(&mut link), [LinkEvent::MessageSent { id }]);
        assert!(link.is_idle());
        assert_eq!(link.next_deadline(), None);
    }

    #[test]
    fn sender_resends_on_nak_and_gives_up_after_six_attempts() {
        let mut link = Link::new(LinkConfig::computer());
        let id = link.send_message(Millis(0), MESSAGE).unwrap();
        link.handle_bytes(Millis(1), &[ACK]);
        let first = out(&mut link);
        assert_eq!(first.len(), 2); // ENQ, frame 1
        // Anything but ACK or EOT counts as NAK.
        for (attempt, reply) in [NAK, b'x', NAK, ENQ, NAK].into_iter().enumerate() {
            link.handle_bytes(Millis(2 + attempt as u64), &[reply]);
            assert_eq!(
                out(&mut link),
                [first[1].clone()],
                "attempt {}",
                attempt + 2
            );
        }
        link.handle_bytes(Millis(10), &[NAK]);
        assert_eq!(out(&mut link), [vec![EOT]]);
        assert_eq!(
            events(&mut link),
            [LinkEvent::SendFailed {
                id,
                reason: SendFailure::TooManyNaks
            }]
        );
        assert_eq!(link.queued(), 0);
    }

    #[test]
    fn sender_times_out_waiting_for_a_reply() {
        let mut link = Link::new(LinkConfig::computer());
        let id = link.send_message(Millis(0), MESSAGE).unwrap();
        link.handle_bytes(Millis(1_000), &[ACK]);
        out(&mut link);
        link.handle_timeout(Millis(15_999));
        assert!(out(&mut link).is_empty());
        link.handle_timeout(Millis(16_000));
        assert_eq!(out(&mut link), [vec![EOT]]);
        assert_eq!(
            events(&mut link),
            [LinkEvent::SendFailed {
                id,
                reason: SendFailure::NoReply
            }]
        );
    }

    #[test]
    fn busy_peer_is_asked_again_after_ten_seconds_then_given_up() {
        let mut link = Link::new(LinkConfig::computer());
        let id = link.send_message(Millis(0), MESSAGE).unwrap();
        let mut now = Millis(0);
        for bid in 1..=6 {
            assert_eq!(out(&mut link), [vec![ENQ]], "bid {bid}");
            link.handle_bytes(now, &[NAK]);
            if bid < 6 {
                assert_eq!(
                    link.next_deadline(),
                    Some(now.after(Duration::from_secs(10)))
                );
                link.handle_timeout(Millis(now.0 + 9_999));
                assert!(link.poll_transmit().is_none());
                now = Millis(now.0 + 10_000);
                link.handle_timeout(now);
            }
        }
        assert_eq!(
            events(&mut link),
            [LinkEvent::SendFailed {
                id,
                reason: SendFailure::LineRefused
            }]
        );
        assert_eq!(link.next_deadline(), None);
    }

    #[test]
    fn on_contention_the_computer_yields_and_receives() {
        let mut link = Link::new(LinkConfig::computer());
        link.send_message(Millis(0), MESSAGE).unwrap();
        assert_eq!(out(&mut link), [vec![ENQ]]);
        link.handle_bytes(Millis(5), &[ENQ]);
        assert!(
            out(&mut link).is_empty(),
            "the colliding ENQ is not answered"
        );
        assert_eq!(link.next_deadline(), Some(Millis(20_005)));
        link.handle_bytes(Millis(1_005), &[ENQ]);
        assert_eq!(out(&mut link), [vec![ACK]], "the instrument's next ENQ is");
        link.handle_bytes(Millis(1_010), &[EOT]);
        // The instrument released the line: the computer bids at once.
        assert_eq!(out(&mut link), [vec![ENQ]]);
    }

    #[test]
    fn on_contention_the_instrument_bids_again_after_a_second() {
        let mut link = Link::new(LinkConfig::instrument());
        link.send_message(Millis(0), MESSAGE).unwrap();
        out(&mut link);
        link.handle_bytes(Millis(5), &[ENQ]);
        assert!(out(&mut link).is_empty());
        link.handle_timeout(Millis(1_005));
        assert_eq!(out(&mut link), [vec![ENQ]]);
    }

    #[test]
    fn a_receiver_interrupt_ends_the_transmission_and_the_message_goes_again_whole() {
        let mut link = Link::new(LinkConfig::computer());
        let id = link.send_message(Millis(0), MESSAGE).unwrap();
        link.handle_bytes(Millis(1), &[ACK]);
        let frame1 = out(&mut link).remove(1);
        link.handle_bytes(Millis(2), &[EOT]);
        assert_eq!(out(&mut link), [vec![EOT]]);
        assert!(events(&mut link).is_empty());
        assert_eq!(link.queued(), 1);
        assert_eq!(link.next_deadline(), Some(Millis(15_002)));
        link.handle_timeout(Millis(15_002));
        link.handle_bytes(Millis(15_003), &[ACK]);
        assert_eq!(out(&mut link), [vec![ENQ], frame1], "from frame 1 again");
        for t in 0..4 {
            link.handle_bytes(Millis(15_010 + t), &[ACK]);
        }
        assert_eq!(events(&mut link), [LinkEvent::MessageSent { id }]);
    }

    #[test]
    fn send_message_refuses_what_cannot_be_sent() {
        let mut link = Link::new(LinkConfig::computer());
        assert_eq!(
            link.send_message(Millis(0), b"H|\\^&\rP|1\r"),
            Err(LinkError::NoTerminator)
        );
        assert!(matches!(
            link.send_message(Millis(0), b"H|\\^&\rC|1|\x02\rL|1\r"),
            Err(LinkError::Text(FrameError::ForbiddenCharacter {
                byte: 0x02
            }))
        ));
        assert_eq!(link.ack_last_frame(Millis(0)), Err(LinkError::NothingToAck));
        assert!(link.poll_transmit().is_none());
    }

    #[test]
    fn the_last_frame_waits_for_the_store_and_eot_meanwhile_is_reported() {
        let mut link = Link::new(LinkConfig::computer());
        link.handle_bytes(Millis(0), &[ENQ]);
        let frames: Vec<u8> = frame::split_message(MESSAGE, 240, 1)
            .iter()
            .flat_map(|f| f.encode().unwrap())
            .collect();
        link.handle_bytes(Millis(1), &frames);
        assert_eq!(
            out(&mut link),
            vec![vec![ACK]; 4],
            "ENQ and three frames, not L"
        );
        let LinkEvent::MessageComplete(message) = events(&mut link).remove(0) else {
            panic!("no message");
        };
        assert_eq!(message.text, MESSAGE);
        assert!(message.records.is_ok());
        assert_eq!(
            link.next_deadline(),
            None,
            "no timer runs against the store"
        );
        // The sender gives up before the store answers.
        link.handle_bytes(Millis(20_000), &[EOT]);
        assert_eq!(
            events(&mut link),
            [LinkEvent::MessageAborted {
                reason: AbortReason::EotBeforeAck,
                raw: vec![EOT],
                unconfirmed: vec![0],
            }]
        );
        assert_eq!(
            link.ack_last_frame(Millis(20_001)),
            Err(LinkError::NothingToAck)
        );
        assert!(out(&mut link).is_empty());
        assert!(link.is_idle());
    }

    #[test]
    fn two_messages_in_one_transmission_with_noise_between_frames() {
        let mut link = Link::new(LinkConfig::computer());
        let second = b"H|\\^&\rP|1\rO|1|SPC2||^^^SARS2\rL|1|N\r";
        let mut wire = vec![ENQ];
        let mut frames = frame::split_message(MESSAGE, 240, 1);
        frames.extend(frame::split_message(second, 240, 5));
        for f in &frames {
            wire.extend(b"~noise~");
            wire.extend(f.encode().unwrap());
        }
        link.handle_bytes(Millis(0), &wire);
        let LinkEvent::MessageComplete(first) = events(&mut link).remove(0) else {
            panic!("no first message");
        };
        assert_eq!((first.seq, first.text.as_slice()), (0, MESSAGE));
        assert!(first.raw.ends_with(&frames[3].encode().unwrap()));
        link.ack_last_frame(Millis(1)).unwrap();
        let LinkEvent::MessageComplete(next) = events(&mut link).remove(0) else {
            panic!("no second message");
        };
        assert_eq!((next.seq, next.text.as_slice()), (1, second.as_slice()));
        assert!(
            next.raw.starts_with(b"~noise~\x025H"),
            "raw starts after the first L"
        );
        link.ack_last_frame(Millis(2)).unwrap();
        assert_eq!(out(&mut link), vec![vec![ACK]; 9]);
        link.handle_bytes(Millis(3), &[EOT]);
        assert_eq!(
            events(&mut link),
            [LinkEvent::TransmissionEnded {
                messages: vec![0, 1]
            }]
        );
    }

    #[test]
    fn a_silent_sender_is_given_up_after_thirty_seconds_with_every_byte_kept() {
        let mut link = Link::new(LinkConfig::computer());
        let first = frame::split_message(MESSAGE, 240, 1)[0].encode().unwrap();
        let wire = [&[ENQ][..], &first, b"\x022P|"].concat();
        link.handle_bytes(Millis(0), &wire);
        assert_eq!(out(&mut link), [vec![ACK], vec![ACK]]);
        assert_eq!(link.next_deadline(), Some(Millis(30_000)));
        link.handle_timeout(Millis(30_000));
        assert_eq!(
            events(&mut link),
            [LinkEvent::MessageAborted {
                reason: AbortReason::Timeout,
                raw: wire,
                unconfirmed: vec![],
            }]
        );
        assert!(link.is_idle());
        assert!(out(&mut link).is_empty());
    }
}
