//! Golden transcripts (`protocol/src/astm/testdata/*.txt`): raw bytes from an
//! instrument into pcrd's link (computer side), and what must come out — the bytes pcrd
//! answers with, the events, and the records of each complete message.
//!
//! A transcript is a script; the harness replays its input lines and writes every
//! output line itself, then the whole file must come out unchanged:
//! - `# …` and blank lines: comments, copied;
//! - `@ max_frame_len N`: configuration, before any input;
//! - `> bytes`: the instrument sends these bytes (notation of `astm::from_mnemonics`);
//! - `+ ms`: time passes, then the link's timers run;
//! - `! store`: the caller has stored the complete message and acknowledges it;
//! - `< bytes`: a write pcrd makes (output);
//! - `= …`: an event, with the records of a complete message as indented lines (output).
//!
//! Set `PCRD_BLESS=1` to rewrite the files with what the code produces (then review
//! the diff: a blessed transcript is only as good as the person who read it).

use std::fmt::Write as _;
use std::path::PathBuf;

use pcrd_protocol::astm::link::{Link, LinkConfig, LinkEvent};
use pcrd_protocol::astm::record::{Message, RecordType, ResultRecord, TestId};
use pcrd_protocol::astm::{Millis, from_mnemonics, to_mnemonics};

fn test_id(t: &TestId) -> String {
    let mut parts = vec![t.code.clone()];
    parts.extend(t.extra.iter().cloned());
    parts.join("^")
}

fn describe(message: &Message, out: &mut String) {
    for record in &message.records {
        let line = match record.kind {
            RecordType::Header => {
                let h = message.header().expect("first record is the header");
                format!(
                    "H sender={} processing={} version={} time={}",
                    h.sender().value(),
                    h.processing_id(),
                    h.version(),
                    h.timestamp()
                )
            }
            RecordType::Patient => "P".to_owned(),
            RecordType::Order => {
                let o = pcrd_protocol::astm::record::Order::view(record).expect("an O record");
                let tests: Vec<String> = o.tests().iter().map(test_id).collect();
                format!(
                    "O specimen={} tests={} action={} report={}",
                    o.specimen_id(),
                    tests.join(","),
                    o.action_code(),
                    o.report_type()
                )
            }
            RecordType::Result => {
                let r = ResultRecord::view(record).expect("an R record");
                format!(
                    "R test={} value={} units={} flags={} status={} completed={}",
                    test_id(&r.test()),
                    r.value(),
                    r.units(),
                    r.flags().join(","),
                    r.status(),
                    r.completed()
                )
            }
            RecordType::Comment => {
                let text = record.field(4);
                let parts = text.repeats.first().map_or(0, Vec::len);
                format!(
                    "C components={parts} first={} last={}",
                    text.component(1, 2),
                    text.component(1, parts)
                )
            }
            RecordType::Terminator => format!("L code={}", message.termination_code()),
            other => format!("{}", other.letter()),
        };
        let _ = writeln!(out, "=   {line}");
    }
}

fn flush(link: &mut Link, out: &mut String) {
    while let Some(bytes) = link.poll_transmit() {
        let _ = writeln!(out, "< {}", to_mnemonics(&bytes));
    }
    while let Some(event) = link.poll_event() {
        match event {
            LinkEvent::MessageComplete(m) => {
                let _ = writeln!(out, "= complete seq={} raw={}", m.seq, to_mnemonics(&m.raw));
                match &m.records {
                    Ok(message) => describe(message, out),
                    Err(e) => {
                        let _ = writeln!(out, "=   refused: {e}");
                    }
                }
            }
            LinkEvent::TransmissionEnded { messages } => {
                let _ = writeln!(out, "= ended confirmed={messages:?}");
            }
            LinkEvent::MessageAborted {
                reason,
                raw,
                unconfirmed,
            } => {
                let _ = writeln!(
                    out,
                    "= aborted {reason:?} unconfirmed={unconfirmed:?} raw={}",
                    to_mnemonics(&raw)
                );
            }
            LinkEvent::FrameRejected { reason } => {
                let _ = writeln!(out, "= rejected: {reason}");
            }
            other => {
                let _ = writeln!(out, "= {other:?}");
            }
        }
    }
}

/// Replays a transcript and returns it as the code would write it.
fn replay(script: &str) -> String {
    let mut config = LinkConfig::computer();
    for line in script.lines() {
        if let Some(n) = line.strip_prefix("@ max_frame_len ") {
            config.max_frame_len = n.trim().parse().expect("a number");
        }
    }
    let mut link = Link::new(config);
    let mut now = Millis(0);
    let mut out = String::new();
    for line in script.lines() {
        if line.starts_with("< ") || line.starts_with("= ") {
            continue; // output: regenerated below
        }
        let _ = writeln!(out, "{line}");
        if let Some(bytes) = line.strip_prefix("> ") {
            link.handle_bytes(now, &from_mnemonics(bytes));
        } else if let Some(ms) = line.strip_prefix("+ ") {
            now = Millis(now.0 + ms.trim().parse::<u64>().expect("milliseconds"));
            link.handle_timeout(now);
        } else if line == "! store" {
            link.ack_last_frame(now)
                .expect("a message waits for its ACK");
        }
        flush(&mut link, &mut out);
    }
    out
}

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/astm/testdata")
}

fn check(name: &str) {
    let path = testdata().join(name);
    let script = std::fs::read_to_string(&path).expect("transcript readable");
    let produced = replay(&script);
    if std::env::var_os("PCRD_BLESS").is_some() {
        std::fs::write(&path, &produced).expect("transcript writable");
        return;
    }
    assert_eq!(
        produced, script,
        "{name}: the link's output differs from the transcript"
    );
}

#[test]
fn worked_example_of_protocols_md_2_1() {
    check("example_2_1.txt");
}

#[test]
fn a_long_record_over_an_intermediate_frame() {
    check("multi_frame_etb.txt");
}

#[test]
fn escapes_repeats_and_other_delimiters() {
    check("escapes_repeats.txt");
}

#[test]
fn a_bad_checksum_is_refused_and_the_resend_accepted() {
    check("bad_checksum.txt");
}

#[test]
fn a_repeated_frame_is_acknowledged_and_dropped() {
    check("repeated_frame.txt");
}

#[test]
fn an_out_of_sequence_frame_is_refused() {
    check("out_of_sequence.txt");
}

#[test]
fn an_oversized_frame_is_refused() {
    check("oversized_frame.txt");
}

#[test]
fn a_transmission_without_eot_is_aborted_with_its_bytes() {
    check("missing_eot.txt");
}

#[test]
fn eot_before_the_terminator_aborts_the_message() {
    check("eot_mid_message.txt");
}

#[test]
fn records_out_of_hierarchy_are_refused_not_turned_into_results() {
    check("hierarchy_broken.txt");
}

/// The host's other direction: an instrument asks for the orders of a specimen (Q), pcrd
/// answers with an order message it builds and sends. The expected frames were written
/// by hand (checksums computed apart from this code).
#[test]
fn a_host_query_is_received_and_answered_with_orders() {
    use pcrd_protocol::astm::record::{HeaderSpec, OrderSpec};

    let mut link = Link::new(LinkConfig::computer());
    let query = "<ENQ>\
        <STX>1H|\\^&|||AN01|||||||P|LIS2-A2|20240115103012<CR><ETX>65<CR><LF>\
        <STX>2Q|1|^SPC0042||^^^ALL||||||||O<CR><ETX>E0<CR><LF>\
        <STX>3L|1|N<CR><ETX>06<CR><LF>";
    link.handle_bytes(Millis(0), &from_mnemonics(query));
    let Some(LinkEvent::MessageComplete(received)) = link.poll_event() else {
        panic!("no query message");
    };
    let message = received.records.expect("a well-formed query");
    let queries = message.queries();
    assert_eq!(queries[0].specimen_ids(), ["SPC0042"]);
    assert_eq!(queries[0].tests()[0].code, "ALL");
    link.ack_last_frame(Millis(1))
        .expect("waiting for the store");
    link.handle_bytes(Millis(2), &[0x04]);
    assert_eq!(
        link.poll_event(),
        Some(LinkEvent::TransmissionEnded { messages: vec![0] })
    );
    while link.poll_transmit().is_some() {}

    let header = HeaderSpec {
        sender: "pcrd".into(),
        timestamp: "20240115103015".into(),
        ..HeaderSpec::default()
    };
    let orders = [OrderSpec {
        specimen_id: queries[0].specimen_ids()[0].to_owned(),
        tests: vec![TestId::new("SARS2", &[])],
        report_type: "Q".into(),
        ..OrderSpec::default()
    }];
    let answer = Message::orders_message(&header, &orders)
        .encode()
        .expect("encodable");
    let id = link.send_message(Millis(3), &answer).expect("sendable");
    let mut wire = String::new();
    for t in 4..9 {
        while let Some(bytes) = link.poll_transmit() {
            wire.push_str(&to_mnemonics(&bytes));
        }
        link.handle_bytes(Millis(t), &[0x06]);
    }
    while let Some(bytes) = link.poll_transmit() {
        wire.push_str(&to_mnemonics(&bytes));
    }
    assert_eq!(
        wire,
        "<ENQ>\
         <STX>1H|\\^&|||pcrd|||||||P|LIS2-A2|20240115103015<CR><ETX>21<CR><LF>\
         <STX>2P|1<CR><ETX>3F<CR><LF>\
         <STX>3O|1|SPC0042||^^^SARS2|R||||||N||||||||||||||Q<CR><ETX>01<CR><LF>\
         <STX>4L|1|N<CR><ETX>07<CR><LF>\
         <EOT>"
    );
    assert_eq!(link.poll_event(), Some(LinkEvent::MessageSent { id }));
}

/// Every transcript in testdata/ is exercised by a test above.
#[test]
fn every_transcript_has_a_test() {
    let source = include_str!("astm_golden.rs");
    for entry in std::fs::read_dir(testdata()).expect("testdata listable") {
        let name = entry.expect("entry").file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".txt") {
            assert!(
                source.contains(&format!("check(\"{name}\")")),
                "{name} has no test"
            );
        }
    }
}
