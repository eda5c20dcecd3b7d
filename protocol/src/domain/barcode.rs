//! Tube barcodes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::echo;

/// A tube barcode: 4..=32 ASCII letters, digits and '-'.
///
/// Barcodes are kept exactly as scanned (case included): two tubes whose
/// barcodes differ only in case are different tubes. Surrounding whitespace
/// is not trimmed here; a scanner's trailing newline is the caller's to strip,
/// so that what is stored is always what was checked.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Barcode(String);

impl Barcode {
    /// Fewest characters in a barcode. Shorter reads are almost always a
    /// partial scan.
    pub const MIN_LEN: usize = 4;
    /// Most characters in a barcode: longer than any tube label we print, and
    /// it bounds what a bad scan can make us store.
    pub const MAX_LEN: usize = 32;

    /// Checks `s` and wraps it. Length is counted in characters, so "é" is one
    /// (invalid) character rather than two bytes.
    pub fn new(s: impl Into<String>) -> Result<Self, BarcodeError> {
        let s = s.into();
        let len = s.chars().count();
        if len < Self::MIN_LEN {
            return Err(BarcodeError::TooShort { barcode: s, len });
        }
        if len > Self::MAX_LEN {
            return Err(BarcodeError::TooLong {
                barcode: echo(&s),
                len,
            });
        }
        if let Some((index, character)) = s
            .chars()
            .enumerate()
            .find(|&(_, c)| !(c.is_ascii_alphanumeric() || c == '-'))
        {
            return Err(BarcodeError::InvalidCharacter {
                barcode: s,
                character,
                position: index + 1,
            });
        }
        Ok(Barcode(s))
    }

    /// The barcode text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why a string is not a valid [`Barcode`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BarcodeError {
    /// Fewer than [`Barcode::MIN_LEN`] characters: usually a partial scan or
    /// an empty field.
    #[error(
        "barcode {barcode:?} is {len} characters long; at least {min} are required",
        min = Barcode::MIN_LEN
    )]
    TooShort {
        /// The rejected text.
        barcode: String,
        /// Its length in characters.
        len: usize,
    },
    /// More than [`Barcode::MAX_LEN`] characters: often two scans run
    /// together or the wrong field scanned.
    #[error(
        "barcode {barcode:?} is {len} characters long; at most {max} are allowed",
        max = Barcode::MAX_LEN
    )]
    TooLong {
        /// The rejected text, cut to its first 40 characters (followed by '…')
        /// so a runaway input does not end up whole in a message.
        barcode: String,
        /// Its full length in characters.
        len: usize,
    },
    /// A character other than an ASCII letter, digit or '-': a stray space,
    /// a scanner suffix, a non-ASCII letter such as 'é'.
    #[error(
        "barcode {barcode:?} has {character:?} at position {position}; only letters, digits and '-' are allowed"
    )]
    InvalidCharacter {
        /// The rejected text.
        barcode: String,
        /// The first offending character.
        character: char,
        /// Where it is, counted in characters from 1 (as a technician would
        /// count along the label).
        position: usize,
    },
}

impl FromStr for Barcode {
    type Err = BarcodeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Barcode::new(s)
    }
}

impl TryFrom<String> for Barcode {
    type Error = BarcodeError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Barcode::new(s)
    }
}

impl From<Barcode> for String {
    fn from(b: Barcode) -> Self {
        b.0
    }
}

impl AsRef<str> for Barcode {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Barcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_letters_digits_and_dashes_at_both_length_limits() {
        for ok in [
            "ABCD",
            "ab-1",
            "0000",
            "X".repeat(32).as_str(),
            "COV-2020-000123",
        ] {
            let b = Barcode::new(ok).unwrap();
            assert_eq!(b.as_str(), ok);
            assert_eq!(b.to_string(), ok);
            assert_eq!(ok.parse::<Barcode>().unwrap(), b);
            assert_eq!(String::from(b.clone()), ok);
            assert_eq!(AsRef::<str>::as_ref(&b), ok);
        }
    }

    #[test]
    fn too_short_names_the_length() {
        let err = Barcode::new("AB1").unwrap_err();
        assert_eq!(
            err,
            BarcodeError::TooShort {
                barcode: "AB1".into(),
                len: 3
            }
        );
        assert_eq!(
            err.to_string(),
            "barcode \"AB1\" is 3 characters long; at least 4 are required"
        );
        assert!(matches!(
            Barcode::new(""),
            Err(BarcodeError::TooShort { len: 0, .. })
        ));
    }

    #[test]
    fn too_long_truncates_the_echo() {
        let err = Barcode::new("A".repeat(33)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "barcode \"{}\" is 33 characters long; at most 32 are allowed",
                "A".repeat(33)
            )
        );
        let huge = "Z".repeat(1 << 20);
        let err = Barcode::new(huge).unwrap_err();
        let BarcodeError::TooLong { barcode, len } = &err else {
            panic!("expected TooLong, got {err:?}");
        };
        assert_eq!(*len, 1 << 20);
        assert_eq!(barcode, &format!("{}…", "Z".repeat(40)));
        assert!(err.to_string().len() < 200, "{err}");
    }

    #[test]
    fn invalid_character_names_character_and_position() {
        let err = Barcode::new("AB!1").unwrap_err();
        assert_eq!(
            err.to_string(),
            "barcode \"AB!1\" has '!' at position 3; only letters, digits and '-' are allowed"
        );
        // Length is in characters: "éABC" is 4 characters, so the problem is
        // the 'é', not the length.
        assert_eq!(
            Barcode::new("éABC").unwrap_err(),
            BarcodeError::InvalidCharacter {
                barcode: "éABC".into(),
                character: 'é',
                position: 1
            }
        );
        // A scanner's trailing newline is reported, escaped.
        let err = Barcode::new("ABCD\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "barcode \"ABCD\\n\" has '\\n' at position 5; only letters, digits and '-' are allowed"
        );
        assert!(matches!(
            Barcode::new("AB CD"),
            Err(BarcodeError::InvalidCharacter {
                character: ' ',
                position: 3,
                ..
            })
        ));
    }

    #[test]
    fn serde_is_a_plain_string_and_validates() {
        let b = Barcode::new("COV-0001").unwrap();
        let json = serde_json::to_string(&b).unwrap();
        assert_eq!(json, "\"COV-0001\"");
        assert_eq!(serde_json::from_str::<Barcode>(&json).unwrap(), b);
        let err = serde_json::from_str::<Barcode>("\"AB!1\"").unwrap_err();
        assert!(err.to_string().contains("'!' at position 3"), "{err}");
        assert!(serde_json::from_str::<Barcode>("\"AB\"").is_err());
    }

    /// Written independently of `Barcode::new`, from the rule in the docs.
    fn is_valid(s: &str) -> bool {
        let n = s.chars().count();
        (4..=32).contains(&n)
            && s.bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-'))
    }

    proptest! {
        #[test]
        fn new_never_panics_and_accepts_exactly_the_valid(s in any::<String>()) {
            let result = Barcode::new(s.clone());
            prop_assert_eq!(result.is_ok(), is_valid(&s));
            if let Ok(b) = result {
                prop_assert_eq!(b.as_str(), s.as_str());
            }
        }

        #[test]
        fn near_valid_strings_are_classified_correctly(s in "[A-Za-z0-9!é -]{0,40}") {
            // `any::<String>()` rarely produces valid barcodes; this draws
            // from an alphabet where both outcomes are common.
            prop_assert_eq!(Barcode::new(s.clone()).is_ok(), is_valid(&s));
        }
    }
}
