//! Property tests of the HL7 core: arbitrary bytes never make the MLLP decoder or the
//! ACK parser panic; frames survive frame → decode however the bytes are split; an
//! ACK's control id survives escaping; and whatever text a record holds, the encoded
//! message keeps its structure (same segments, same field counts) and every field
//! reads back, unescaped, as the text that went in.

use pcrd_protocol::hl7::escape::{Delimiters, unescape};
use pcrd_protocol::hl7::mllp::{self, MllpDecoder, MllpEvent};
use pcrd_protocol::hl7::{AckCode, MessageHeader, control_id, encode_oru_r01, parse_ack};
use pcrd_protocol::upstream::{
    Interpretation, KitRef, RESULT_SCHEMA_VERSION, ResultRecord, ResultStatus, TargetCall,
    TargetResult,
};
use proptest::prelude::*;

/// Feeds `wire` split at `cuts` and returns every event.
fn decode_split(wire: &[u8], cuts: &[usize], max: usize) -> Vec<MllpEvent> {
    let mut decoder = MllpDecoder::new(max);
    let mut events = Vec::new();
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
    points.sort_unstable();
    let mut from = 0;
    for to in points.into_iter().chain([wire.len()]) {
        decoder.feed(&wire[from..to], &mut events);
        from = to;
    }
    events
}

/// Text with a high share of the characters that matter to HL7.
fn tricky_text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            3 => prop::sample::select(vec!['|', '^', '~', '\\', '&', '\r', '\n', '\x0b', '\x1c', '\t', '\x7f', 'X', 'F', 'é', '中']),
            5 => any::<char>(),
            5 => prop::char::range('a', 'z'),
        ],
        1..24,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

fn record(texts: &[String], ct: Option<f64>, interpretation: Interpretation) -> ResultRecord {
    ResultRecord {
        schema_version: RESULT_SCHEMA_VERSION,
        result_id: texts[0].clone(),
        version: 1,
        tube: texts[1].clone(),
        pool_size: 3,
        plate: texts[2].clone(),
        well: "A1".into(),
        run: texts[2].clone(),
        instrument: texts[3].clone(),
        kit: KitRef {
            id: texts[4].clone(),
            version: texts[5].clone(),
        },
        targets: vec![TargetResult {
            name: texts[6].clone(),
            dye: "FAM".into(),
            loinc: Some("94759-8".into()),
            ct,
            call: TargetCall::Detected,
        }],
        interpretation,
        status: ResultStatus::Corrected,
        correction_reason: Some(texts[7].clone()),
        tested_at: "2026-11-27T06:00:00.000Z".into(),
        released_at: "2026-11-27T06:10:00.000Z".into(),
        released_by: "auto".into(),
        lab_id: texts[8].clone(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_mllp_decoder_survives_any_bytes(
        bytes in prop::collection::vec(
            prop_oneof![3 => any::<u8>(), 1 => prop::sample::select(vec![0x0b, 0x1c, 0x0d, 0x0a])],
            0..600),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
        max in 0usize..64,
    ) {
        for event in decode_split(&bytes, &cuts, max) {
            if let MllpEvent::Frame(content) = event {
                prop_assert!(content.len() <= max);
                prop_assert!(!content.contains(&mllp::START) && !content.contains(&mllp::END));
            }
        }
    }

    #[test]
    fn frames_come_back_whole_however_the_bytes_are_split(
        messages in prop::collection::vec(
            prop::collection::vec(any::<u8>().prop_filter("no MLLP control bytes", |b| *b != 0x0b && *b != 0x1c), 0..80),
            0..5),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut wire = Vec::new();
        for m in &messages {
            mllp::frame_into(m, &mut wire);
        }
        let events = decode_split(&wire, &cuts, 1000);
        let expected: Vec<MllpEvent> = messages.into_iter().map(MllpEvent::Frame).collect();
        prop_assert_eq!(events, expected);
    }

    #[test]
    fn the_ack_parser_survives_any_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..300),
        prefix in prop::sample::select(vec!["", "MSH|^~\\&|", "MSH|^~\\&|A\rMSA|", "MSH|^~\\&|A\nMSA|AA|", "MSH#^~\\&\r\nERR|"]),
    ) {
        let mut input = prefix.as_bytes().to_vec();
        input.extend(bytes);
        let _ = parse_ack(&input);
    }

    #[test]
    fn an_acks_control_id_and_text_read_back(
        id in tricky_text(),
        text in tricky_text(),
        code in prop::sample::select(vec![("AA", AckCode::ApplicationAccept), ("AE", AckCode::ApplicationError), ("AR", AckCode::ApplicationReject)]),
        line_end in prop::sample::select(vec!["\r", "\n", "\r\n"]),
    ) {
        let esc = |s: &str| pcrd_protocol::hl7::escape::escape(s).into_owned();
        let ack = format!("MSH|^~\\&|LIS|C|PCRD|L|20260101000000||ACK^R01^ACK|1|P|2.5.1{line_end}MSA|{}|{}|{}{line_end}", code.0, esc(&id), esc(&text));
        let parsed = parse_ack(ack.as_bytes()).expect("a well-formed ACK parses");
        prop_assert_eq!(parsed.code, code.1);
        prop_assert_eq!(parsed.control_id, id);
    }

    #[test]
    fn every_text_field_is_escaped_and_reads_back(
        texts in prop::collection::vec(tricky_text(), 11),
        ct in prop::option::of(0.0f64..50.0),
        interpretation in prop::sample::select(vec![Interpretation::Positive, Interpretation::Negative, Interpretation::Inconclusive, Interpretation::Invalid]),
    ) {
        prop_assume!(texts[0].trim() != "" && texts[1].trim() != "" && texts[8].trim() != "");
        let record = record(&texts, ct, interpretation);
        let header = MessageHeader { receiving_application: texts[9].clone(), receiving_facility: texts[10].clone() };
        let message = encode_oru_r01(&record, &header, &record.released_at).expect("encode");
        prop_assert_eq!(&message.control_id, &control_id(&record));
        // No ASCII control character but the CR that ends each segment: nothing that
        // could end a segment or an MLLP frame early.
        prop_assert!(message.text.chars().all(|c| c == '\r' || !c.is_ascii_control()), "{:?}", message.text);
        let segs: Vec<Vec<&str>> = message.text.split_terminator('\r').map(|s| s.split('|').collect()).collect();
        let names: Vec<&str> = segs.iter().map(|s| s[0]).collect();
        prop_assert_eq!(names, ["MSH", "PID", "ORC", "OBR", "NTE", "OBX", "OBX", "SPM"]);
        let counts: Vec<usize> = segs.iter().map(Vec::len).collect();
        prop_assert_eq!(counts, [18, 6, 4, 26, 4, 20, 20, 14]);
        let d = Delimiters::STANDARD;
        let comps = |field: &str| -> Vec<String> { field.split('^').map(|c| unescape(c, d)).collect() };
        prop_assert_eq!(unescape(segs[0][3], d), texts[8].clone());
        prop_assert_eq!(unescape(segs[0][4], d), texts[9].clone());
        prop_assert_eq!(unescape(segs[0][5], d), texts[10].clone());
        prop_assert_eq!(comps(segs[1][3]), vec![texts[1].clone(), String::new(), String::new(), texts[8].clone(), "ACSN".into()]);
        prop_assert_eq!(comps(segs[2][3]), vec![texts[0].clone(), texts[8].clone()]);
        prop_assert_eq!(unescape(segs[4][3], d), texts[7].clone());
        prop_assert_eq!(comps(segs[5][18]), vec![texts[3].clone(), texts[8].clone()]);
        let method = comps(segs[5][17]);
        prop_assert_eq!(&method[0], &texts[4]);
        prop_assert_eq!(&method[1], &format!("{} version {}", texts[4], texts[5]));
        prop_assert_eq!(comps(segs[6][3])[1].clone(), format!("{} Ct", texts[6]));
        let specimen: Vec<String> = segs[7][2].split('&').map(|c| unescape(c, d)).collect();
        prop_assert_eq!(specimen, vec![texts[1].clone(), texts[8].clone()]);
    }
}
