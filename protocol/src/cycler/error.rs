//! Errors of the command and message layer.

use super::line::LineError;
use crate::echo;

/// Why a line could not be turned into a command, reply or event, or a value into a line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CyclerError {
    /// The command word is not one of this dialect's: a typo, another instrument's
    /// command set, or a profile that does not match the instrument.
    #[error("unknown command {word:?}")]
    UnknownCommand {
        /// The command word found.
        word: String,
    },
    /// The line starts with the event marker but names no event of this dialect:
    /// firmware newer than the profile, or noise.
    #[error("unknown event {word:?}")]
    UnknownEvent {
        /// The event word found.
        word: String,
    },
    /// Parameters missing, extra, or not in the expected shape.
    #[error("{what}: expected {expected}")]
    BadShape {
        /// What was being read.
        what: &'static str,
        /// What would have been accepted.
        expected: &'static str,
    },
    /// A number that does not parse or lies outside its range.
    #[error("{what}: {text:?} is not {expected}")]
    BadNumber {
        /// What the number is.
        what: &'static str,
        /// The text found (cut to 40 characters).
        text: String,
        /// What would have been accepted.
        expected: &'static str,
    },
    /// A fluorescence reading that is not a finite number: the instrument sent text, a
    /// saturated channel's marker, or the line was damaged.
    #[error("reading {index} (well {well}) is {text:?}, not a finite number")]
    BadReading {
        /// 0-based position of the reading in the line.
        index: usize,
        /// 1-based well number, column-major (A1 = 1, B1 = 2, ...).
        well: usize,
        /// The text found (cut to 40 characters).
        text: String,
    },
    /// A cycle line declares one number of readings and carries another: readings lost
    /// or merged on the line.
    #[error("the line declares {declared} readings but carries {found}")]
    CountMismatch {
        /// The count the line declares.
        declared: usize,
        /// The readings it carries.
        found: usize,
    },
    /// A name (channel, plate id, protocol name, well label) with characters outside
    /// `A-Z a-z 0-9 _ . -`, empty or longer than 32 characters.
    #[error("{what} {text:?}: use 1 to 32 of A-Z a-z 0-9 _ . -")]
    BadName {
        /// What the name is.
        what: &'static str,
        /// The text found (cut to 40 characters).
        text: String,
    },
    /// A thermal protocol or plate map pcrd will not send or accept.
    #[error("{reason}")]
    Invalid {
        /// What is wrong, in a sentence.
        reason: String,
    },
    /// A reply that does not answer the command: a late reply to an earlier command, or
    /// the wrong profile.
    #[error("reply {text:?} does not answer {command}: expected {expected}")]
    UnexpectedReply {
        /// The command word that was asked.
        command: &'static str,
        /// The reply (cut to 40 characters).
        text: String,
        /// What would have been accepted.
        expected: &'static str,
    },
    /// The encoded line is not a valid line (too long, or a character not allowed).
    #[error("cannot encode: {0}")]
    Unencodable(#[from] LineError),
}

impl CyclerError {
    pub(crate) fn number(what: &'static str, text: &str, expected: &'static str) -> Self {
        CyclerError::BadNumber {
            what,
            text: echo(text),
            expected,
        }
    }
}

/// A line refused by the parser, kept whole for diagnosis.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error} (line: {})", echo(line))]
pub struct Rejected {
    /// The line as received (printable ASCII, terminator removed).
    pub line: String,
    /// Why it was refused.
    pub error: CyclerError,
}
