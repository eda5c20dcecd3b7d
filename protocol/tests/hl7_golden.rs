//! The ORU^R01 profile byte for byte (docs/hl7.md): a change to any field shows here,
//! and must be a deliberate change to the documented profile.

use pcrd_protocol::hl7::mllp::{self, MllpDecoder, MllpEvent};
use pcrd_protocol::hl7::{MessageHeader, encode_oru_r01, parse_ack};
use pcrd_protocol::upstream::{
    Interpretation, KitRef, RESULT_SCHEMA_VERSION, ResultRecord, ResultStatus, TargetCall,
    TargetResult,
};

fn header() -> MessageHeader {
    MessageHeader {
        receiving_application: "LIS".into(),
        receiving_facility: "CENTRAL".into(),
    }
}

fn target(name: &str, loinc: Option<&str>, ct: Option<f64>, call: TargetCall) -> TargetResult {
    TargetResult {
        name: name.into(),
        dye: "FAM".into(),
        loinc: loinc.map(str::to_owned),
        ct,
        call,
    }
}

fn record() -> ResultRecord {
    ResultRecord {
        schema_version: RESULT_SCHEMA_VERSION,
        result_id: "LAB1-R0001-A1-T000123".into(),
        version: 1,
        tube: "T000123".into(),
        pool_size: 5,
        plate: "P0001".into(),
        well: "A1".into(),
        run: "R0001".into(),
        instrument: "cycler-1".into(),
        kit: KitRef {
            id: "cdc-n1-n2-rp".into(),
            version: "1".into(),
        },
        targets: vec![
            target("N1", Some("94311-8"), Some(24.31), TargetCall::Detected),
            target("N2", Some("94312-6"), Some(25.0), TargetCall::Detected),
            target("RP", None, Some(27.12), TargetCall::Detected),
        ],
        interpretation: Interpretation::Positive,
        status: ResultStatus::Final,
        correction_reason: None,
        tested_at: "2026-11-27T06:00:00.000Z".into(),
        released_at: "2026-11-27T06:10:00.000Z".into(),
        released_by: "auto".into(),
        lab_id: "LAB1".into(),
    }
}

const POSITIVE_FINAL: &str = "\
MSH|^~\\&|PCRD|LAB1|LIS|CENTRAL|20261127061000.000+0000||ORU^R01^ORU_R01|ED389A47F914908A1597|P|2.5.1|||NE|AL||UNICODE UTF-8\r\
PID|1||T000123^^^LAB1^ACSN||^^^^^^S\r\
ORC|RE||LAB1-R0001-A1-T000123^LAB1\r\
OBR|1||LAB1-R0001-A1-T000123^LAB1|94500-6^SARS-CoV-2 RNA Resp Ql NAA+probe^LN|||20261127060000.000+0000|||||||||||||||20261127061000.000+0000|||F\r\
OBX|1|CWE|94500-6^SARS-CoV-2 RNA Resp Ql NAA+probe^LN||260373001^Detected^SCT|||A|||F|||20261127060000.000+0000|||cdc-n1-n2-rp^cdc-n1-n2-rp version 1^99PCRD|cycler-1^LAB1|20261127060000.000+0000\r\
OBX|2|NM|94311-8^N1 Ct^LN||24.31|{Ct_value}^{Ct_value}^UCUM|||||F|||20261127060000.000+0000|||cdc-n1-n2-rp^cdc-n1-n2-rp version 1^99PCRD|cycler-1^LAB1|20261127060000.000+0000\r\
OBX|3|NM|94312-6^N2 Ct^LN||25.00|{Ct_value}^{Ct_value}^UCUM|||||F|||20261127060000.000+0000|||cdc-n1-n2-rp^cdc-n1-n2-rp version 1^99PCRD|cycler-1^LAB1|20261127060000.000+0000\r\
SPM|1|T000123&LAB1||123038009^Specimen^SCT|||||||||5\r";

#[test]
fn a_positive_final_result_is_the_documented_message() {
    let record = record();
    let message = encode_oru_r01(&record, &header(), &record.released_at).expect("encode");
    assert_eq!(message.text, POSITIVE_FINAL);
    assert_eq!(message.control_id, "ED389A47F914908A1597");
}

#[test]
fn an_invalid_correction_with_an_undetermined_ct() {
    let mut record = record();
    record.version = 2;
    record.status = ResultStatus::Corrected;
    record.correction_reason = Some("re-read: curve N1 was a spike".into());
    record.interpretation = Interpretation::Invalid;
    record.targets[0].ct = None;
    record.targets[0].call = TargetCall::Invalid;
    let message = encode_oru_r01(&record, &header(), &record.released_at).expect("encode");
    let lines: Vec<&str> = message.text.split_terminator('\r').collect();
    assert_eq!(lines.len(), 9);
    assert!(lines[3].ends_with("|||C"), "{}", lines[3]);
    assert_eq!(lines[4], "NTE|1|L|re-read: curve N1 was a spike");
    assert!(
        lines[5].starts_with("OBX|1|CWE|94500-6^SARS-CoV-2 RNA Resp Ql NAA+probe^LN||||||||X|||"),
        "{}",
        lines[5]
    );
    assert!(
        lines[6].starts_with("OBX|2|NM|94311-8^N1 Ct^LN|||{Ct_value}^{Ct_value}^UCUM|||||X|||"),
        "{}",
        lines[6]
    );
    assert!(
        lines[7].starts_with("OBX|3|NM|94312-6^N2 Ct^LN||25.00|"),
        "{}",
        lines[7]
    );
    assert_ne!(
        message.control_id, "ED389A47F914908A1597",
        "a new version, a new id"
    );
}

#[test]
fn a_framed_message_decodes_and_an_echoing_ack_matches_it() {
    let record = record();
    let message = encode_oru_r01(&record, &header(), &record.released_at).expect("encode");
    let wire = mllp::frame(message.text.as_bytes());
    assert_eq!(
        (wire[0], wire[wire.len() - 2], wire[wire.len() - 1]),
        (0x0b, 0x1c, 0x0d)
    );
    let mut decoder = MllpDecoder::default();
    let mut events = Vec::new();
    decoder.feed(&wire, &mut events);
    assert_eq!(
        events,
        vec![MllpEvent::Frame(message.text.clone().into_bytes())]
    );
    let ack = format!(
        "MSH|^~\\&|LIS|CENTRAL|PCRD|LAB1|20261127061001||ACK^R01^ACK|A1|P|2.5.1\r\nMSA|AA|{}\r\n",
        message.control_id
    );
    assert_eq!(
        parse_ack(ack.as_bytes()).expect("ack").control_id,
        message.control_id
    );
}
