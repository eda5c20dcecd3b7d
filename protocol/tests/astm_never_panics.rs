//! Property tests of the ASTM core: arbitrary bytes never make the frame decoder, the
//! link or the record parser panic; frames and messages survive encode → decode and
//! split → join; and two links wired together through a faulty line deliver every
//! message intact and at most once, or report that they could not.

use std::collections::{BTreeMap, VecDeque};

use pcrd_protocol::astm::frame::{self, Decoded, Frame};
use pcrd_protocol::astm::link::{Link, LinkConfig, LinkEvent, MessageId};
use pcrd_protocol::astm::record::{Delimiters, Message, Record};
use pcrd_protocol::astm::{Millis, from_mnemonics};
use proptest::prelude::*;

const EXAMPLE: &str = include_str!("../src/astm/testdata/example_2_1.txt");

/// The instrument's bytes of the §2.1 transcript, as one stream.
fn example_input() -> Vec<u8> {
    EXAMPLE
        .lines()
        .filter_map(|l| l.strip_prefix("> "))
        .flat_map(from_mnemonics)
        .collect()
}

/// Bytes allowed in frame text (protocols.md §1.6: no restricted control characters).
fn text_byte() -> impl Strategy<Value = u8> {
    let allowed: Vec<u8> = (0..=255u8).filter(|b| !frame::is_restricted(*b)).collect();
    prop::sample::select(allowed)
}

#[derive(Debug, Clone)]
enum Op {
    Bytes(Vec<u8>),
    Advance(u64),
    Ack,
    Send(usize),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let interesting = prop::sample::select(vec![
        0x02u8, 0x03, 0x04, 0x05, 0x06, 0x0A, 0x0D, 0x15, 0x17, b'1', b'0', b'L', b'|',
    ]);
    let byte = prop_oneof![any::<u8>(), interesting];
    prop::collection::vec(
        prop_oneof![
            6 => prop::collection::vec(byte, 0..64).prop_map(Op::Bytes),
            2 => (0u64..40_000).prop_map(Op::Advance),
            1 => Just(Op::Ack),
            1 => (0usize..3).prop_map(Op::Send),
        ],
        0..60,
    )
}

fn drive(link: &mut Link, ops: &[Op], prefix: &[u8]) {
    let texts: [&[u8]; 3] = [b"H|\\^&\rL|1|N\r", b"H|\\^&\rP|1\rO|1|S1\rL|1\r", b"nope"];
    let mut now = Millis(0);
    link.handle_bytes(now, prefix);
    for op in ops {
        match op {
            Op::Bytes(b) => link.handle_bytes(now, b),
            Op::Advance(ms) => {
                now = Millis(now.0 + ms);
                link.handle_timeout(now);
            }
            Op::Ack => {
                let _ = link.ack_last_frame(now);
            }
            Op::Send(i) => {
                let _ = link.send_message(now, texts[*i]);
            }
        }
        while link.poll_transmit().is_some() {}
        while link.poll_event().is_some() {}
        // The link never asks to be woken in the past (that would be a busy loop).
        if let Some(deadline) = link.next_deadline() {
            assert!(
                deadline > now,
                "deadline {deadline:?} not after {now:?} ({op:?})"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_the_frame_decoder(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
        max in 0usize..400,
    ) {
        match frame::decode(&bytes, max) {
            Decoded::Frame { len, .. } | Decoded::Invalid { len, .. } => {
                prop_assert!(len >= 1 && len <= bytes.len().max(1));
            }
            Decoded::Incomplete => {}
        }
    }

    #[test]
    fn arbitrary_input_never_panics_the_link(ops in ops(), instrument in any::<bool>()) {
        let config = if instrument { LinkConfig::instrument() } else { LinkConfig::computer() };
        drive(&mut Link::new(config), &ops, &[]);
    }

    #[test]
    fn arbitrary_input_after_a_good_start_never_panics_the_link(
        cut in 0usize..600,
        ops in ops(),
    ) {
        let input = example_input();
        let prefix = &input[..cut.min(input.len())];
        drive(&mut Link::new(LinkConfig::computer()), &ops, prefix);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_record_parser(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
        header in any::<bool>(),
    ) {
        let input = if header { [b"H|\\^&|".as_slice(), &bytes].concat() } else { bytes };
        if let Ok(message) = Message::parse(&input) {
            // What parses can be written back (or is refused with an error), and reads
            // back the same.
            if let Ok(text) = message.encode() {
                prop_assert_eq!(Message::parse(&text), Ok(message));
            }
        }
        let _ = Record::parse(&input, &Delimiters::default(), 1);
        let _ = Delimiters::from_header(&input);
    }

    #[test]
    fn frames_survive_encode_then_decode(
        number in 0u8..8,
        text in prop::collection::vec(text_byte(), 0..300),
        end in any::<bool>(),
    ) {
        let frame = Frame { number, text, end };
        let bytes = frame.encode().expect("encodable");
        prop_assert_eq!(bytes.len(), frame.text.len() + frame::FRAME_OVERHEAD);
        prop_assert_eq!(
            frame::decode(&bytes, frame::MAX_FRAME_LEN),
            Decoded::Frame { frame, len: bytes.len() }
        );
    }

    #[test]
    fn messages_survive_split_then_join(
        text in prop::collection::vec(prop_oneof![text_byte(), Just(b'\r')], 0..2000),
        size in 1usize..300,
        first in 0u8..8,
    ) {
        let frames = frame::split_message(&text, size, first);
        prop_assert_eq!(frame::join_frames(&frames), text.clone());
        for (i, f) in frames.iter().enumerate() {
            prop_assert!(f.text.len() <= size);
            prop_assert_eq!(usize::from(f.number), (usize::from(first) + i) % 8);
            // Only end frames end a record; every CR ends an end frame.
            prop_assert_eq!(f.end, f.text.last() == Some(&b'\r') || i + 1 == frames.len());
        }
    }
}

/// What the faulty line does to one write.
#[derive(Debug, Clone, Copy)]
enum Fault {
    None,
    Drop,
    /// Replace the byte at this position (mod length) by this value (never STX).
    Corrupt(usize, u8),
    /// Keep only this many bytes (mod length).
    Truncate(usize),
}

fn faults() -> impl Strategy<Value = Vec<Fault>> {
    prop::collection::vec(
        prop_oneof![
            12 => Just(Fault::None),
            1 => Just(Fault::Drop),
            1 => (any::<usize>(), any::<u8>().prop_filter("STX", |b| *b != 0x02))
                .prop_map(|(p, v)| Fault::Corrupt(p, v)),
            1 => any::<usize>().prop_map(Fault::Truncate),
        ],
        0..40,
    )
}

fn apply(fault: Fault, mut chunk: Vec<u8>) -> Option<Vec<u8>> {
    match fault {
        Fault::None => Some(chunk),
        Fault::Drop => None,
        Fault::Corrupt(p, v) => {
            let i = p % chunk.len().max(1);
            if let Some(b) = chunk.get_mut(i) {
                *b = v;
            }
            Some(chunk)
        }
        Fault::Truncate(p) => {
            chunk.truncate(p % chunk.len().max(1));
            Some(chunk)
        }
    }
}

/// A distinct, valid LIS2-A2 message; `long` ones need intermediate frames.
fn message_text(i: usize, long: bool) -> Vec<u8> {
    let comment = if long {
        "x".repeat(300 + i)
    } else {
        String::new()
    };
    format!(
        "H|\\^&|||SIM|||||||P|LIS2-A2|20240115103012\rP|1\rO|1|SPC{i:04}||^^^SARS2|R\r\
         R|1|^^^SARS2^E^Ct|{}.{:02}|||||F\rC|1|I|{comment}|G\rL|1|N\r",
        20 + i,
        i * 7 % 100
    )
    .into_bytes()
}

#[derive(Debug, Default)]
struct Outcome {
    sent: Vec<MessageId>,
    failed: Vec<MessageId>,
    /// Text of each message the receiver completed, in order.
    received: Vec<Vec<u8>>,
}

/// Wires an instrument link (sender) to a computer link (receiver) through a line that
/// applies `forward` faults to the instrument's writes and `backward` faults to the
/// computer's, one per write in turn. The computer stores each message at once.
fn simulate(
    texts: &[Vec<u8>],
    forward: &[Fault],
    backward: &[Fault],
) -> (Outcome, BTreeMap<MessageId, Vec<u8>>) {
    const LATENCY: u64 = 3;
    let mut sender = Link::new(LinkConfig::instrument());
    let mut receiver = Link::new(LinkConfig::computer());
    let mut now = Millis(0);
    let mut ids = BTreeMap::new();
    for text in texts {
        let id = sender.send_message(now, text).expect("valid message");
        ids.insert(id, text.clone());
    }
    // (deliver at, bytes) per direction.
    let mut to_receiver: VecDeque<(Millis, Vec<u8>)> = VecDeque::new();
    let mut to_sender: VecDeque<(Millis, Vec<u8>)> = VecDeque::new();
    let (mut f, mut b) = (0usize, 0usize);
    let mut outcome = Outcome::default();
    for _ in 0..100_000 {
        while let Some(chunk) = sender.poll_transmit() {
            let fault = forward
                .get(f % forward.len().max(1))
                .copied()
                .unwrap_or(Fault::None);
            f += 1;
            if let Some(chunk) = apply(fault, chunk) {
                to_receiver.push_back((Millis(now.0 + LATENCY), chunk));
            }
        }
        while let Some(chunk) = receiver.poll_transmit() {
            let fault = backward
                .get(b % backward.len().max(1))
                .copied()
                .unwrap_or(Fault::None);
            b += 1;
            if let Some(chunk) = apply(fault, chunk) {
                to_sender.push_back((Millis(now.0 + LATENCY), chunk));
            }
        }
        while let Some(event) = sender.poll_event() {
            match event {
                LinkEvent::MessageSent { id } => outcome.sent.push(id),
                LinkEvent::SendFailed { id, .. } => outcome.failed.push(id),
                other => panic!("the sender received something: {other:?}"),
            }
        }
        let mut stored = false;
        while let Some(event) = receiver.poll_event() {
            if let LinkEvent::MessageComplete(m) = event {
                outcome.received.push(m.text);
                stored = true;
            }
        }
        if stored {
            receiver
                .ack_last_frame(now)
                .expect("a frame waits for the store");
            continue;
        }
        let next = [
            to_receiver.front().map(|c| c.0),
            to_sender.front().map(|c| c.0),
            sender.next_deadline(),
            receiver.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min();
        let Some(next) = next else {
            break;
        };
        now = now.max(next);
        while to_receiver.front().is_some_and(|c| c.0 <= now) {
            if let Some((_, chunk)) = to_receiver.pop_front() {
                receiver.handle_bytes(now, &chunk);
            }
        }
        while to_sender.front().is_some_and(|c| c.0 <= now) {
            if let Some((_, chunk)) = to_sender.pop_front() {
                sender.handle_bytes(now, &chunk);
            }
        }
        sender.handle_timeout(now);
        receiver.handle_timeout(now);
    }
    assert_eq!(sender.queued(), 0, "the simulation ran out of steps");
    (outcome, ids)
}

fn check_delivery(
    outcome: &Outcome,
    ids: &BTreeMap<MessageId, Vec<u8>>,
) -> Result<(), TestCaseError> {
    // Never a corrupted message, never one twice.
    for (i, text) in outcome.received.iter().enumerate() {
        prop_assert!(
            ids.values().any(|t| t == text),
            "corrupted: {}",
            String::from_utf8_lossy(text)
        );
        prop_assert!(!outcome.received[..i].contains(text), "delivered twice");
        prop_assert!(Message::parse(text).is_ok());
    }
    // Every message ends as sent or failed, once.
    let mut ended: Vec<MessageId> = outcome
        .sent
        .iter()
        .chain(&outcome.failed)
        .copied()
        .collect();
    ended.sort();
    prop_assert_eq!(ended, ids.keys().copied().collect::<Vec<_>>());
    Ok(())
}

fn messages() -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop::collection::vec(any::<bool>(), 1..5).prop_map(|longs| {
        longs
            .iter()
            .enumerate()
            .map(|(i, long)| message_text(i, *long))
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Faults both ways, replies included (a NAK damaged into an ACK makes the sender
    /// believe a frame arrived — no ASTM sender can tell): what arrives is intact and
    /// arrives at most once, and every message is reported sent or failed.
    #[test]
    fn a_faulty_line_never_delivers_a_corrupted_or_duplicated_message(
        texts in messages(),
        forward in faults(),
        backward in faults(),
    ) {
        let (outcome, ids) = simulate(&texts, &forward, &backward);
        check_delivery(&outcome, &ids)?;
    }

    /// Frames damaged, replies only lost (never altered): then "sent" also means
    /// "the receiver has it".
    #[test]
    fn with_replies_only_lost_every_sent_message_was_received(
        texts in messages(),
        forward in faults(),
        backward in prop::collection::vec(prop_oneof![8 => Just(Fault::None), 1 => Just(Fault::Drop)], 0..20),
    ) {
        let (outcome, ids) = simulate(&texts, &forward, &backward);
        check_delivery(&outcome, &ids)?;
        for id in &outcome.sent {
            prop_assert!(outcome.received.contains(&ids[id]), "sent but never received");
        }
    }
}

/// On a clean line every message arrives exactly once, in order, and is reported sent.
#[test]
fn a_clean_line_delivers_every_message_exactly_once() {
    let texts: Vec<Vec<u8>> = (0..6).map(|i| message_text(i, i % 2 == 0)).collect();
    let (outcome, ids) = simulate(&texts, &[], &[]);
    assert_eq!(outcome.received, texts);
    assert_eq!(outcome.sent, ids.keys().copied().collect::<Vec<_>>());
    assert!(outcome.failed.is_empty());
}

/// The fault injector does damage (otherwise the properties above prove nothing).
#[test]
fn the_fault_injector_damages_writes() {
    assert_eq!(apply(Fault::Drop, vec![1, 2]), None);
    assert_eq!(apply(Fault::Corrupt(3, 9), vec![1, 2]), Some(vec![1, 9]));
    assert_eq!(apply(Fault::Truncate(1), vec![1, 2]), Some(vec![1]));
    let texts = vec![message_text(0, true)];
    let (outcome, _) = simulate(&texts, &[Fault::Corrupt(5, b'#')], &[]);
    assert!(
        outcome.received.is_empty(),
        "every frame damaged: nothing arrives"
    );
    assert_eq!(outcome.failed.len(), 1);
    // One damaged frame (the second write: ENQ goes first) is refused and resent.
    let once = [
        Fault::None,
        Fault::Corrupt(5, b'#'),
        Fault::None,
        Fault::None,
    ];
    let (outcome, ids) = simulate(&texts, &once, &[]);
    assert_eq!(outcome.received, texts);
    assert_eq!(outcome.sent, ids.keys().copied().collect::<Vec<_>>());
    // The receiver's ACK of the last frame is lost: the sender reports failure, though
    // the receiver has the message (it must resend it whole; the receiver dedupes).
    let replies = vec![Fault::None; 7]
        .into_iter()
        .chain([Fault::Drop])
        .collect::<Vec<_>>();
    let (outcome, _) = simulate(&texts, &[], &replies);
    assert_eq!(outcome.received, texts);
    assert_eq!(outcome.failed.len(), 1);
}
