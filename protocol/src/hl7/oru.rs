//! One ORU^R01 (v2.5.1) message per tube, from a [`ResultRecord`].
//!
//! The profile (documented field by field in `docs/hl7.md`):
//!
//! ```text
//! MSH|^~\&|PCRD|<lab>|<receiving app>|<receiving facility>|<time>||ORU^R01^ORU_R01|<control id>|P|2.5.1|||NE|AL|||UNICODE UTF-8
//! PID|1||<tube>^^^<lab>^ACSN||^^^^^^S
//! ORC|RE||<result id>^<lab>
//! OBR|1||<result id>^<lab>|94500-6^SARS-CoV-2 RNA Resp Ql NAA+probe^LN|||<tested at>|...|<released at>|||<P/F/C>
//! [NTE|1|L|<correction reason>]
//! OBX|1|CWE|94500-6^...^LN||<SNOMED answer>|||<A/N>|||<P/F/C, X for invalid>|||<tested at>|||<kit>|<instrument>|<tested at>
//! OBX|n|NM|<target LOINC>^<target> Ct^LN||<Ct>|{Ct_value}^{Ct_value}^UCUM|||||<P/F/C, X when undetermined>|||...
//! SPM|1|<tube>&<lab>||123038009^Specimen^SCT|||||||||<pool size>
//! ```
//!
//! Every text taken from the record is escaped ([`super::escape::escape`]). The
//! message control id is [`control_id`]: the same for every resend of one result
//! version, after restarts too, so a receiver can drop the duplicate.

use std::fmt::Write as _;

use sha2::{Digest, Sha256};
use thiserror::Error;

use super::escape::escape;
use crate::echo;
use crate::upstream::{Interpretation, RESULT_SCHEMA_VERSION, ResultRecord, ResultStatus};

/// MSH-3: the sending application.
pub const SENDING_APPLICATION: &str = "PCRD";
/// The overall result's LOINC: SARS-CoV-2 RNA presence, respiratory, NAA with probe.
pub const OVERALL_LOINC: &str = "94500-6";
const OVERALL_TEXT: &str = "SARS-CoV-2 RNA Resp Ql NAA+probe";
/// SNOMED CT answers for the overall result.
pub const SNOMED_DETECTED: &str = "260373001";
pub const SNOMED_NOT_DETECTED: &str = "260415000";
pub const SNOMED_INCONCLUSIVE: &str = "419984006";
/// SPM-4: pcrd does not know the swab type, so the generic SNOMED CT "Specimen".
const SPECIMEN_TYPE: &str = "123038009^Specimen^SCT";
/// Length of [`control_id`]: MSH-10 is an ST of at most 20 characters in v2.5.1.
pub const CONTROL_ID_LEN: usize = 20;

/// What the receiver is told about itself (MSH-5, MSH-6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageHeader {
    pub receiving_application: String,
    pub receiving_facility: String,
}

/// An encoded message, not yet framed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hl7Message {
    /// MSH-10.
    pub control_id: String,
    /// The segments, each ended by CR.
    pub text: String,
}

/// Why a record cannot be written as an ORU^R01. Each is a fault in the record, so
/// resending will not help: the sink dead-letters it.
#[derive(Clone, Debug, PartialEq, Error)]
#[non_exhaustive]
pub enum EncodeError {
    #[error(
        "result record schema version {found} is not {RESULT_SCHEMA_VERSION}, the one this build writes as HL7"
    )]
    SchemaVersion { found: u32 },
    #[error("the record's {field} is empty; HL7 needs it")]
    Empty { field: &'static str },
    #[error(
        "the record's {field} {value:?} is not an RFC 3339 time such as 2026-11-27T06:00:00.000Z"
    )]
    BadTime { field: &'static str, value: String },
    #[error("target {target:?} has Ct {ct}, which is not a finite number of cycles ≥ 0")]
    BadCt { target: String, ct: f64 },
    #[error("target {target:?} has LOINC {loinc:?}, which is not a LOINC code such as 94759-8")]
    BadLoinc { target: String, loinc: String },
    #[error("pool size 0 is not a number of swabs")]
    EmptyPool,
}

/// MSH-10 for one result version: the first 20 hexadecimal digits (80 bits) of the
/// SHA-256 of its idempotency key (`result_id:version`). Deterministic, so a resend
/// after a timeout or a restart carries the same id; 20 characters, the ST limit of
/// MSH-10; and collisions are out of reach (about 10^12 messages for an even chance).
pub fn control_id(record: &ResultRecord) -> String {
    let digest = Sha256::digest(record.idempotency_key().as_bytes());
    let mut id = String::with_capacity(CONTROL_ID_LEN);
    for byte in &digest[..CONTROL_ID_LEN / 2] {
        let _ = write!(id, "{byte:02X}");
    }
    id
}

/// The ORU^R01 for `record`. `message_time` (MSH-7, RFC 3339) is passed in; the sink
/// passes the record's release time, so every resend of one version is the same
/// bytes.
pub fn encode_oru_r01(
    record: &ResultRecord,
    header: &MessageHeader,
    message_time: &str,
) -> Result<Hl7Message, EncodeError> {
    if record.schema_version != RESULT_SCHEMA_VERSION {
        return Err(EncodeError::SchemaVersion {
            found: record.schema_version,
        });
    }
    for (field, value) in [
        ("result_id", &record.result_id),
        ("tube", &record.tube),
        ("lab_id", &record.lab_id),
    ] {
        if value.trim().is_empty() {
            return Err(EncodeError::Empty { field });
        }
    }
    if record.pool_size == 0 {
        return Err(EncodeError::EmptyPool);
    }
    let message_time = hl7_time("message time", message_time)?;
    let tested = hl7_time("tested_at", &record.tested_at)?;
    let released = hl7_time("released_at", &record.released_at)?;
    let control_id = control_id(record);
    let lab = escape(&record.lab_id);
    let tube = escape(&record.tube);
    let filler = format!("{}^{lab}", escape(&record.result_id));
    let status = match record.status {
        ResultStatus::Preliminary => "P",
        ResultStatus::Final => "F",
        ResultStatus::Corrected => "C",
    };
    // OBX-17 is a CE in v2.5.1 (six components, no version component): the kit id
    // as a local code, its version in the text.
    let kit_id = escape(&record.kit.id);
    let method = format!(
        "{kit_id}^{kit_id} version {}^99PCRD",
        escape(&record.kit.version)
    );
    let instrument = format!("{}^{lab}", escape(&record.instrument));

    let mut text = String::with_capacity(1024);
    let msh = Segment::new("MSH")
        .set(2, "^~\\&")
        .set(3, SENDING_APPLICATION)
        .set(4, &lab)
        .set(5, &escape(&header.receiving_application))
        .set(6, &escape(&header.receiving_facility))
        .set(7, &message_time)
        .set(9, "ORU^R01^ORU_R01")
        .set(10, &control_id)
        .set(11, "P")
        .set(12, "2.5.1")
        .set(15, "NE")
        .set(16, "AL")
        .set(18, "UNICODE UTF-8");
    msh.render_msh(&mut text);
    Segment::new("PID")
        .set(1, "1")
        .set(3, &format!("{tube}^^^{lab}^ACSN"))
        // PID-5 is required; pcrd knows no name, so an empty one of type S (coded
        // pseudo-name to ensure anonymity, table 0200).
        .set(5, "^^^^^^S")
        .render(&mut text);
    Segment::new("ORC")
        .set(1, "RE")
        .set(3, &filler)
        .render(&mut text);
    Segment::new("OBR")
        .set(1, "1")
        .set(3, &filler)
        .set(4, &format!("{OVERALL_LOINC}^{OVERALL_TEXT}^LN"))
        .set(7, &tested)
        .set(22, &released)
        .set(25, status)
        .render(&mut text);
    if let Some(reason) = record
        .correction_reason
        .as_deref()
        .filter(|r| !r.is_empty())
    {
        Segment::new("NTE")
            .set(1, "1")
            .set(2, "L")
            .set(3, &escape(reason))
            .render(&mut text);
    }
    let (answer, flag, overall_status) = match record.interpretation {
        Interpretation::Positive => (format!("{SNOMED_DETECTED}^Detected^SCT"), "A", status),
        Interpretation::Negative => (
            format!("{SNOMED_NOT_DETECTED}^Not detected^SCT"),
            "N",
            status,
        ),
        Interpretation::Inconclusive => (
            format!("{SNOMED_INCONCLUSIVE}^Inconclusive^SCT"),
            "",
            status,
        ),
        // No answer can be given: HL7's "results cannot be obtained" (X) with no value,
        // rather than an answer code a receiver might read as a result.
        Interpretation::Invalid => (String::new(), "", "X"),
    };
    Segment::new("OBX")
        .set(1, "1")
        .set(2, "CWE")
        .set(3, &format!("{OVERALL_LOINC}^{OVERALL_TEXT}^LN"))
        .set(5, &answer)
        .set(8, flag)
        .set(11, overall_status)
        .set(14, &tested)
        .set(17, &method)
        .set(18, &instrument)
        .set(19, &tested)
        .render(&mut text);
    let mut set_id = 1;
    for target in &record.targets {
        // Targets without a LOINC code (internal controls) are not sent upstream.
        let Some(loinc) = target.loinc.as_deref() else {
            continue;
        };
        if !is_loinc(loinc) {
            return Err(EncodeError::BadLoinc {
                target: echo(&target.name),
                loinc: echo(loinc),
            });
        }
        let (value, ct_status) = match target.ct {
            Some(ct) if ct.is_finite() && ct >= 0.0 => (format!("{ct:.2}"), status),
            Some(ct) => {
                return Err(EncodeError::BadCt {
                    target: echo(&target.name),
                    ct,
                });
            }
            // Undetermined: no Ct exists, and NM cannot say "undetermined", so no
            // value and status X; the overall OBX carries the call.
            None => (String::new(), "X"),
        };
        set_id += 1;
        Segment::new("OBX")
            .set(1, &set_id.to_string())
            .set(2, "NM")
            .set(3, &format!("{loinc}^{} Ct^LN", escape(&target.name)))
            .set(5, &value)
            .set(6, "{Ct_value}^{Ct_value}^UCUM")
            .set(11, ct_status)
            .set(14, &tested)
            .set(17, &method)
            .set(18, &instrument)
            .set(19, &tested)
            .render(&mut text);
    }
    Segment::new("SPM")
        .set(1, "1")
        .set(2, &format!("{tube}&{lab}"))
        .set(4, SPECIMEN_TYPE)
        .set(13, &record.pool_size.to_string())
        .render(&mut text);
    Ok(Hl7Message { control_id, text })
}

/// A segment being built: field n at index n, so the code reads like the standard.
struct Segment {
    fields: Vec<String>,
}

impl Segment {
    fn new(name: &str) -> Segment {
        Segment {
            fields: vec![name.to_owned()],
        }
    }

    fn set(mut self, n: usize, value: &str) -> Segment {
        if self.fields.len() <= n {
            self.fields.resize(n + 1, String::new());
        }
        self.fields[n] = value.to_owned();
        self
    }

    fn render(&self, out: &mut String) {
        out.push_str(&self.fields.join("|"));
        out.push('\r');
    }

    /// MSH-1 is the field separator itself, so MSH-2 follows the name directly.
    fn render_msh(&self, out: &mut String) {
        out.push_str("MSH|");
        out.push_str(&self.fields[2..].join("|"));
        out.push('\r');
    }
}

/// `1234-5`: one to seven digits, a dash, a check digit.
fn is_loinc(code: &str) -> bool {
    match code.split_once('-') {
        Some((number, check)) => {
            (1..=7).contains(&number.len())
                && number.bytes().all(|b| b.is_ascii_digit())
                && check.len() == 1
                && check.bytes().all(|b| b.is_ascii_digit())
        }
        None => false,
    }
}

/// An RFC 3339 time as an HL7 DTM: `YYYYMMDDHHMMSS[.S[S[S[S]]]]+ZZZZ`.
fn hl7_time(field: &'static str, text: &str) -> Result<String, EncodeError> {
    let bad = || EncodeError::BadTime {
        field,
        value: echo(text),
    };
    let b = text.as_bytes();
    if b.len() < 20 || !text.is_ascii() {
        return Err(bad());
    }
    let digits = |from: usize, to: usize| -> Result<u32, EncodeError> {
        let part = &text[from..to];
        if part.bytes().all(|c| c.is_ascii_digit()) {
            part.parse().map_err(|_| bad())
        } else {
            Err(bad())
        }
    };
    let separators_ok = b[4] == b'-'
        && b[7] == b'-'
        && matches!(b[10], b'T' | b't' | b' ')
        && b[13] == b':'
        && b[16] == b':';
    if !separators_ok {
        return Err(bad());
    }
    let (year, month, day) = (digits(0, 4)?, digits(5, 7)?, digits(8, 10)?);
    let (hour, minute, second) = (digits(11, 13)?, digits(14, 16)?, digits(17, 19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return Err(bad());
    }
    let mut rest = &text[19..];
    let mut fraction = "";
    if let Some(after) = rest.strip_prefix('.') {
        let len = after.bytes().take_while(u8::is_ascii_digit).count();
        if len == 0 {
            return Err(bad());
        }
        // DTM carries at most four decimals of a second.
        fraction = &after[..len.min(4)];
        rest = &after[len..];
    }
    let zone = match rest {
        "Z" | "z" => "+0000".to_owned(),
        zone if zone.len() == 6
            && (zone.starts_with('+') || zone.starts_with('-'))
            && zone.as_bytes()[3] == b':' =>
        {
            let (h, m) = (&zone[1..3], &zone[4..6]);
            if !(h.bytes().chain(m.bytes()).all(|c| c.is_ascii_digit())) {
                return Err(bad());
            }
            format!("{}{h}{m}", &zone[..1])
        }
        _ => return Err(bad()),
    };
    let mut out = format!("{year:04}{month:02}{day:02}{hour:02}{minute:02}{second:02}");
    if !fraction.is_empty() {
        out.push('.');
        out.push_str(fraction);
    }
    out.push_str(&zone);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::tests::sample;
    use crate::upstream::{TargetCall, TargetResult};

    fn header() -> MessageHeader {
        MessageHeader {
            receiving_application: "LIS".into(),
            receiving_facility: "CENTRAL".into(),
        }
    }

    fn segments(message: &Hl7Message) -> Vec<Vec<String>> {
        message
            .text
            .split_terminator('\r')
            .map(|s| s.split('|').map(str::to_owned).collect())
            .collect()
    }

    #[test]
    fn a_positive_final_result_has_the_profile_segments_and_codes() {
        let record = sample();
        let message = encode_oru_r01(&record, &header(), &record.released_at).expect("encode");
        assert!(message.text.ends_with('\r'));
        let segs = segments(&message);
        let names: Vec<&str> = segs.iter().map(|s| s[0].as_str()).collect();
        assert_eq!(names, ["MSH", "PID", "ORC", "OBR", "OBX", "OBX", "SPM"]);
        let msh = &segs[0];
        // MSH-n is msh[n - 1]: MSH-1 is the separator itself.
        assert_eq!(msh[1], "^~\\&");
        assert_eq!(&msh[2..6], ["PCRD", "LAB1", "LIS", "CENTRAL"]);
        assert_eq!(msh[6], "20261127061000.000+0000");
        assert_eq!(msh[8], "ORU^R01^ORU_R01");
        assert_eq!(msh[9], message.control_id);
        assert_eq!(msh[9].len(), CONTROL_ID_LEN);
        assert_eq!(&msh[10..12], ["P", "2.5.1"]);
        assert_eq!(&msh[14..16], ["NE", "AL"]);
        assert_eq!(segs[1][3], "T000123^^^LAB1^ACSN");
        assert_eq!(segs[1].len(), 6, "no personal data fields after PID-5");
        assert_eq!(segs[1][5], "^^^^^^S", "an empty pseudonymous name");
        assert_eq!(segs[3][25], "F");
        let obx = &segs[4];
        assert_eq!(obx[2], "CWE");
        assert!(obx[3].starts_with("94500-6^"));
        assert_eq!(obx[5], "260373001^Detected^SCT");
        assert_eq!(obx[8], "A");
        assert_eq!(obx[11], "F");
        let ct = &segs[5];
        assert_eq!(&ct[1..3], ["2", "NM"]);
        assert_eq!(ct[3], "94759-8^N1 Ct^LN");
        assert_eq!(ct[5], "24.31");
        assert_eq!(ct[6], "{Ct_value}^{Ct_value}^UCUM");
        assert_eq!(ct[11], "F");
        assert_eq!(segs[6][2], "T000123&LAB1");
        assert_eq!(segs[6][13], "5");
    }

    #[test]
    fn answers_and_statuses_follow_the_record() {
        let cases = [
            (
                Interpretation::Negative,
                "260415000^Not detected^SCT",
                "N",
                ResultStatus::Preliminary,
                "P",
            ),
            (
                Interpretation::Inconclusive,
                "419984006^Inconclusive^SCT",
                "",
                ResultStatus::Corrected,
                "C",
            ),
            (Interpretation::Invalid, "", "", ResultStatus::Final, "X"),
        ];
        for (interpretation, answer, flag, status, obx11) in cases {
            let mut record = sample();
            record.interpretation = interpretation;
            record.status = status;
            let message = encode_oru_r01(&record, &header(), &record.released_at).expect("encode");
            let obx = &segments(&message)[4];
            assert_eq!(
                (obx[5].as_str(), obx[8].as_str(), obx[11].as_str()),
                (answer, flag, obx11)
            );
        }
    }

    #[test]
    fn undetermined_cts_have_no_value_and_status_x_and_controls_are_left_out() {
        let mut record = sample();
        record.targets[0].ct = None;
        record.targets.push(TargetResult {
            name: "RP".into(),
            dye: "CY5".into(),
            loinc: None,
            ct: Some(28.0),
            call: TargetCall::Detected,
        });
        let message = encode_oru_r01(&record, &header(), &record.released_at).expect("encode");
        let segs = segments(&message);
        assert_eq!(segs.iter().filter(|s| s[0] == "OBX").count(), 2);
        assert_eq!(segs[5][5], "");
        assert_eq!(segs[5][11], "X");
    }

    #[test]
    fn a_correction_carries_its_reason_in_an_nte() {
        let mut record = sample();
        record.status = ResultStatus::Corrected;
        record.version = 2;
        record.correction_reason = Some("well A1|A2 swapped".into());
        let message = encode_oru_r01(&record, &header(), &record.released_at).expect("encode");
        assert!(
            message.text.contains("\rNTE|1|L|well A1\\F\\A2 swapped\r"),
            "{}",
            message.text
        );
        assert_ne!(message.control_id, control_id(&sample()));
    }

    #[test]
    fn the_control_id_depends_only_on_the_result_version() {
        let a = sample();
        let mut b = sample();
        b.released_at = "2027-01-01T00:00:00Z".into();
        b.targets.clear();
        assert_eq!(control_id(&a), control_id(&b));
        b.version = 2;
        assert_ne!(control_id(&a), control_id(&b));
        assert!(control_id(&a).bytes().all(|c| c.is_ascii_hexdigit()));
        // Pinned: a receiver dedupes resends on MSH-10, so the derivation must never
        // change between pcrd versions (a result resent after an upgrade would
        // otherwise be taken for a new one).
        assert_eq!(control_id(&a), "ED389A47F914908A1597");
    }

    #[test]
    fn records_that_cannot_be_written_are_refused() {
        let mut r = sample();
        r.tube = " ".into();
        assert_eq!(
            encode_oru_r01(&r, &header(), "2026-11-27T06:00:00Z"),
            Err(EncodeError::Empty { field: "tube" })
        );
        let mut r = sample();
        r.targets[0].ct = Some(f64::NAN);
        assert!(matches!(
            encode_oru_r01(&r, &header(), "2026-11-27T06:00:00Z"),
            Err(EncodeError::BadCt { .. })
        ));
        let mut r = sample();
        r.targets[0].loinc = Some("94759|8".into());
        assert!(matches!(
            encode_oru_r01(&r, &header(), "2026-11-27T06:00:00Z"),
            Err(EncodeError::BadLoinc { .. })
        ));
        let mut r = sample();
        r.tested_at = "yesterday".into();
        assert!(matches!(
            encode_oru_r01(&r, &header(), "2026-11-27T06:00:00Z"),
            Err(EncodeError::BadTime {
                field: "tested_at",
                ..
            })
        ));
        let mut r = sample();
        r.pool_size = 0;
        assert_eq!(
            encode_oru_r01(&r, &header(), "2026-11-27T06:00:00Z"),
            Err(EncodeError::EmptyPool)
        );
    }

    #[test]
    fn rfc3339_times_become_dtm() {
        assert_eq!(
            hl7_time("t", "2026-11-27T06:00:00Z").unwrap(),
            "20261127060000+0000"
        );
        assert_eq!(
            hl7_time("t", "2026-11-27T06:00:00.123456+08:00").unwrap(),
            "20261127060000.1234+0800"
        );
        for bad in [
            "2026-13-27T06:00:00Z",
            "2026-11-27T06:00:00",
            "2026-11-27T06:00:00.Z",
            "2026-11-27T06:00:00+0800",
            "é026-11-27T06:00:00Z",
        ] {
            assert!(hl7_time("t", bad).is_err(), "{bad}");
        }
    }
}
