//! The receiver's acknowledgement of one message: MSH, MSA, optionally ERR.
//!
//! Segments may end in CR (the standard), LF or CR LF: receivers written on other
//! platforms send all three, and the ACK's meaning does not depend on it. What is
//! not an ACK (no MSH first, no MSA, an unknown MSA-1 code, no MSA-2) is refused with
//! an [`AckError`] naming what is missing, never guessed at.

use thiserror::Error;

use super::escape::{Delimiters, unescape};
use crate::echo;

/// MSA-1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AckCode {
    /// Application accept: the receiver took the message.
    ApplicationAccept,
    /// Application error: something in the content; may succeed when resent.
    ApplicationError,
    /// Application reject: the receiver refuses the message.
    ApplicationReject,
    /// Enhanced mode commit accept (stored, not yet processed).
    CommitAccept,
    /// Enhanced mode commit error.
    CommitError,
    /// Enhanced mode commit reject.
    CommitReject,
}

impl AckCode {
    /// The code as written in MSA-1.
    pub fn as_str(self) -> &'static str {
        match self {
            AckCode::ApplicationAccept => "AA",
            AckCode::ApplicationError => "AE",
            AckCode::ApplicationReject => "AR",
            AckCode::CommitAccept => "CA",
            AckCode::CommitError => "CE",
            AckCode::CommitReject => "CR",
        }
    }

    fn parse(text: &str) -> Option<AckCode> {
        Some(match text {
            "AA" => AckCode::ApplicationAccept,
            "AE" => AckCode::ApplicationError,
            "AR" => AckCode::ApplicationReject,
            "CA" => AckCode::CommitAccept,
            "CE" => AckCode::CommitError,
            "CR" => AckCode::CommitReject,
            _ => return None,
        })
    }
}

/// A parsed acknowledgement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    pub code: AckCode,
    /// MSA-2: the MSH-10 of the message acknowledged.
    pub control_id: String,
    /// What the receiver said about it (MSA-3 and the text of each ERR segment:
    /// ERR-3 text, ERR-7 diagnostics, ERR-8 user message), unescaped, joined by
    /// "; ". Empty when it said nothing.
    pub text: String,
}

/// Why bytes received as an ACK are not one.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum AckError {
    #[error("the receiver's answer is empty")]
    Empty,
    #[error("the receiver's answer does not start with an MSH segment (it starts {starts:?})")]
    NoHeader { starts: String },
    #[error(
        "the receiver's MSH segment does not declare its delimiters (MSH-1 and MSH-2 \
         such as |^~\\&)"
    )]
    BadDelimiters,
    #[error("the receiver's answer has no MSA segment, so it is not an acknowledgement")]
    NoMsa,
    #[error(
        "the receiver's MSA-1 is {code:?}; expected AA, AE or AR (or CA, CE, CR in \
         enhanced mode)"
    )]
    UnknownCode { code: String },
    #[error("the receiver's MSA segment has no MSA-2 (the control id it acknowledges)")]
    NoControlId,
}

/// Parses the content of one MLLP frame as an acknowledgement.
pub fn parse_ack(bytes: &[u8]) -> Result<Ack, AckError> {
    let text = String::from_utf8_lossy(bytes);
    let mut segments = text
        .split(['\r', '\n'])
        .map(|s| s.trim_matches(|c: char| c == ' ' || c == '\t'))
        .filter(|s| !s.is_empty());
    let header = segments.next().ok_or(AckError::Empty)?;
    if !header.starts_with("MSH") {
        return Err(AckError::NoHeader {
            starts: echo(header),
        });
    }
    let delimiters = delimiters_of(header)?;
    let field = delimiters.field as char;
    let mut msa: Option<(AckCode, String, String)> = None;
    let mut texts: Vec<String> = Vec::new();
    for segment in segments {
        let fields: Vec<&str> = segment.split(field).collect();
        let value = |n: usize| fields.get(n).copied().unwrap_or("");
        match fields[0] {
            "MSA" if msa.is_none() => {
                let code = value(1);
                let code = AckCode::parse(code)
                    .ok_or_else(|| AckError::UnknownCode { code: echo(code) })?;
                let control_id = unescape(value(2), delimiters);
                if control_id.is_empty() {
                    return Err(AckError::NoControlId);
                }
                msa = Some((code, control_id, unescape(value(3), delimiters)));
            }
            "ERR" => {
                let component = delimiters.component as char;
                let code_text = value(3).split(component).nth(1).unwrap_or("");
                for part in [value(1), code_text, value(7), value(8)] {
                    let part = unescape(part, delimiters);
                    if !part.is_empty() {
                        texts.push(part);
                    }
                }
            }
            _ => {}
        }
    }
    let (code, control_id, msa_text) = msa.ok_or(AckError::NoMsa)?;
    if !msa_text.is_empty() {
        texts.insert(0, msa_text);
    }
    Ok(Ack {
        code,
        control_id,
        text: texts.join("; "),
    })
}

/// The delimiters MSH-1 and MSH-2 declare.
fn delimiters_of(header: &str) -> Result<Delimiters, AckError> {
    let bytes = header.as_bytes();
    let field = *bytes.get(3).ok_or(AckError::BadDelimiters)?;
    let encoding: Vec<u8> = bytes[4..]
        .iter()
        .copied()
        .take_while(|&b| b != field)
        .collect();
    if encoding.len() < 4 || !field.is_ascii_punctuation() {
        return Err(AckError::BadDelimiters);
    }
    let delimiters = Delimiters {
        field,
        component: encoding[0],
        repetition: encoding[1],
        escape: encoding[2],
        subcomponent: encoding[3],
    };
    let all = [field, encoding[0], encoding[1], encoding[2], encoding[3]];
    let distinct = all
        .iter()
        .enumerate()
        .all(|(i, a)| a.is_ascii_punctuation() && !all[i + 1..].contains(a));
    if !distinct {
        return Err(AckError::BadDelimiters);
    }
    Ok(delimiters)
}

#[cfg(test)]
mod tests {
    use super::*;

    const AA: &str = "MSH|^~\\&|LIS|CENTRAL|PCRD|LAB01|20240115103013+0800||ACK^R01^ACK|ACK-98765|P|2.5.1\rMSA|AA|PCRD-000123\r";

    #[test]
    fn an_accept_is_read_with_any_line_ends() {
        for text in [
            AA.to_owned(),
            AA.replace('\r', "\n"),
            AA.replace('\r', "\r\n"),
        ] {
            let ack = parse_ack(text.as_bytes()).expect("parse");
            assert_eq!(ack.code, AckCode::ApplicationAccept);
            assert_eq!(ack.control_id, "PCRD-000123");
            assert_eq!(ack.text, "");
        }
    }

    #[test]
    fn error_text_comes_from_msa_and_err_unescaped() {
        let text = "MSH|^~\\&|LIS||||||ACK|1|P|2.5.1\rMSA|AR|C1|bad \\F\\ thing\rERR||OBX^1^5|102^Data type error^HL70357|E|||diag|call \\T\\ check\r";
        let ack = parse_ack(text.as_bytes()).expect("parse");
        assert_eq!(ack.code, AckCode::ApplicationReject);
        assert_eq!(ack.control_id, "C1");
        assert_eq!(ack.text, "bad | thing; Data type error; diag; call & check");
    }

    #[test]
    fn other_delimiters_are_honoured() {
        let text = "MSH#*~\\&#LIS#######ACK#1#P#2.5.1\rMSA#AE#X*Y\r";
        let ack = parse_ack(text.as_bytes()).expect("parse");
        assert_eq!(ack.code, AckCode::ApplicationError);
        assert_eq!(ack.control_id, "X*Y");
    }

    #[test]
    fn what_is_not_an_ack_is_refused_with_the_reason() {
        assert_eq!(parse_ack(b"\r\n"), Err(AckError::Empty));
        assert!(matches!(
            parse_ack(b"HELLO"),
            Err(AckError::NoHeader { .. })
        ));
        assert_eq!(parse_ack(b"MSH"), Err(AckError::BadDelimiters));
        assert_eq!(parse_ack(b"MSH|||||"), Err(AckError::BadDelimiters));
        assert_eq!(parse_ack(b"MSH|^~\\&|A\rPID|1"), Err(AckError::NoMsa));
        assert_eq!(
            parse_ack(b"MSH|^~\\&|A\rMSA|OK|1"),
            Err(AckError::UnknownCode { code: "OK".into() })
        );
        assert_eq!(
            parse_ack(b"MSH|^~\\&|A\rMSA|AA|"),
            Err(AckError::NoControlId)
        );
    }
}
