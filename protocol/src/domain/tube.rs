//! What we know about a tube before it is plated: how many swabs it pools,
//! how urgent it is, and the order tubes go onto plates.

use std::cmp::{Ordering, Reverse};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{Barcode, Timestamp};
use crate::echo;

/// How many swabs were pooled into the tube (1..=20; 5 and 10 are common in mass screening).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct PoolSize(u8);

impl PoolSize {
    /// Largest pool we accept. Pooling dilutes each swab; beyond about 20
    /// the loss of sensitivity is no longer acceptable for screening.
    pub const MAX: u8 = 20;

    /// Checks that `n` is in `1..=MAX`.
    pub fn new(n: u8) -> Result<Self, PoolSizeError> {
        if (1..=Self::MAX).contains(&n) {
            Ok(PoolSize(n))
        } else {
            Err(PoolSizeError::OutOfRange { value: n.into() })
        }
    }

    /// The number of swabs.
    pub fn get(self) -> u8 {
        self.0
    }
}

impl Default for PoolSize {
    /// A single, unpooled swab.
    fn default() -> Self {
        PoolSize(1)
    }
}

impl fmt::Display for PoolSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for PoolSize {
    type Err = PoolSizeError;

    /// Parses a decimal number ("5", "+5" and "05" are all 5). No whitespace
    /// is trimmed.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Parse wide so "25" and "-3" are reported as out of range (with the
        // number) rather than as "not a number".
        let value: i64 = s
            .parse()
            .map_err(|_| PoolSizeError::NotANumber { text: echo(s) })?;
        match u8::try_from(value) {
            Ok(n) => PoolSize::new(n),
            Err(_) => Err(PoolSizeError::OutOfRange { value }),
        }
    }
}

impl TryFrom<u8> for PoolSize {
    type Error = PoolSizeError;

    fn try_from(n: u8) -> Result<Self, Self::Error> {
        PoolSize::new(n)
    }
}

impl From<PoolSize> for u8 {
    fn from(p: PoolSize) -> Self {
        p.0
    }
}

/// Why a value is not a valid [`PoolSize`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PoolSizeError {
    /// A number, but zero, negative or more than [`PoolSize::MAX`].
    #[error("pool size {value} is outside 1..={max}", max = PoolSize::MAX)]
    OutOfRange {
        /// The number given.
        value: i64,
    },
    /// Text that is not a whole decimal number (or is too large to be one we
    /// could read).
    #[error("pool size {text:?} is not a whole number; expected 1 to {max}", max = PoolSize::MAX)]
    NotANumber {
        /// The text given (cut to 40 characters).
        text: String,
    },
}

/// How soon a tube's result is needed.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Normal turnaround.
    #[default]
    Routine,
    /// Plated before every routine tube (e.g. symptomatic staff, ward
    /// admissions).
    Urgent,
}

impl Priority {
    fn as_str(self) -> &'static str {
        match self {
            Priority::Routine => "routine",
            Priority::Urgent => "urgent",
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Priority {
    type Err = PriorityError;

    /// "routine" or "urgent", in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Priority::Routine, Priority::Urgent]
            .into_iter()
            .find(|p| s.eq_ignore_ascii_case(p.as_str()))
            .ok_or_else(|| PriorityError::Unknown { text: echo(s) })
    }
}

/// Why text is not a [`Priority`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PriorityError {
    /// Neither "routine" nor "urgent".
    #[error("unknown priority {text:?}; expected \"routine\" or \"urgent\"")]
    Unknown {
        /// The text given (cut to 40 characters).
        text: String,
    },
}

/// What the filling order needs to know about a tube waiting to be plated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuedTube {
    /// The tube.
    pub barcode: Barcode,
    /// Urgent tubes go first.
    pub priority: Priority,
    /// When the result is promised, if a time was promised.
    pub due_at: Option<Timestamp>,
    /// When the tube was received in the lab.
    pub received_at: Timestamp,
}

/// Sorts tubes into plating order: urgent first; within a priority, the earliest due time first (a tube with a due time before one without); then the earliest received; then barcode (to be deterministic). Stable.
pub fn plating_order(tubes: &mut [QueuedTube]) {
    tubes.sort_by(compare_for_plating);
}

fn compare_for_plating(a: &QueuedTube, b: &QueuedTube) -> Ordering {
    Reverse(a.priority)
        .cmp(&Reverse(b.priority))
        .then_with(|| compare_due(a.due_at, b.due_at))
        .then_with(|| a.received_at.cmp(&b.received_at))
        .then_with(|| a.barcode.cmp(&b.barcode))
}

/// Earlier due first; a promised time beats no promise. (`Option`'s own
/// order puts `None` first, which is the opposite of what we want.)
fn compare_due(a: Option<Timestamp>, b: Option<Timestamp>) -> Ordering {
    match (a, b) {
        (Some(a), Some(b)) => a.cmp(&b),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_size_range() {
        assert_eq!(PoolSize::new(1).unwrap().get(), 1);
        assert_eq!(PoolSize::new(20).unwrap().get(), 20);
        assert_eq!(PoolSize::default().get(), 1);
        assert_eq!(
            PoolSize::new(0),
            Err(PoolSizeError::OutOfRange { value: 0 })
        );
        assert_eq!(
            PoolSize::new(21).unwrap_err().to_string(),
            "pool size 21 is outside 1..=20"
        );
    }

    #[test]
    fn pool_size_from_str() {
        assert_eq!("5".parse::<PoolSize>().unwrap().get(), 5);
        assert_eq!("010".parse::<PoolSize>().unwrap().get(), 10);
        assert_eq!(PoolSize::new(7).unwrap().to_string(), "7");
        assert_eq!(
            "25".parse::<PoolSize>().unwrap_err().to_string(),
            "pool size 25 is outside 1..=20"
        );
        assert_eq!(
            "-3".parse::<PoolSize>(),
            Err(PoolSizeError::OutOfRange { value: -3 })
        );
        assert_eq!(
            "300".parse::<PoolSize>(),
            Err(PoolSizeError::OutOfRange { value: 300 })
        );
        assert_eq!(
            "five".parse::<PoolSize>().unwrap_err().to_string(),
            "pool size \"five\" is not a whole number; expected 1 to 20"
        );
        assert!(matches!(
            " 5".parse::<PoolSize>(),
            Err(PoolSizeError::NotANumber { .. })
        ));
        assert!(matches!(
            "".parse::<PoolSize>(),
            Err(PoolSizeError::NotANumber { .. })
        ));
    }

    #[test]
    fn pool_size_serde_validates() {
        let p: PoolSize = serde_json::from_str("10").unwrap();
        assert_eq!(p.get(), 10);
        assert_eq!(serde_json::to_string(&p).unwrap(), "10");
        let err = serde_json::from_str::<PoolSize>("21").unwrap_err();
        assert!(
            err.to_string().contains("pool size 21 is outside 1..=20"),
            "{err}"
        );
        assert!(serde_json::from_str::<PoolSize>("0").is_err());
    }

    #[test]
    fn priority_text() {
        assert_eq!("URGENT".parse::<Priority>().unwrap(), Priority::Urgent);
        assert_eq!("Routine".parse::<Priority>().unwrap(), Priority::Routine);
        assert_eq!(Priority::Urgent.to_string(), "urgent");
        assert_eq!(Priority::default(), Priority::Routine);
        assert_eq!(
            "stat".parse::<Priority>().unwrap_err().to_string(),
            "unknown priority \"stat\"; expected \"routine\" or \"urgent\""
        );
        assert_eq!(
            serde_json::to_string(&Priority::Urgent).unwrap(),
            "\"urgent\""
        );
        assert_eq!(
            serde_json::from_str::<Priority>("\"routine\"").unwrap(),
            Priority::Routine
        );
    }

    fn tube(code: &str, priority: Priority, due: Option<i64>, received: i64) -> QueuedTube {
        QueuedTube {
            barcode: Barcode::new(code).unwrap(),
            priority,
            due_at: due.map(Timestamp),
            received_at: Timestamp(received),
        }
    }

    fn codes(tubes: &[QueuedTube]) -> Vec<&str> {
        tubes.iter().map(|t| t.barcode.as_str()).collect()
    }

    #[test]
    fn plating_order_urgent_then_due_then_received_then_barcode() {
        use Priority::{Routine, Urgent};
        let mut tubes = vec![
            tube("R-NODUE-OLD", Routine, None, 1),
            tube("R-DUE-LATE", Routine, Some(500), 50),
            tube("R-DUE-SOON", Routine, Some(100), 90),
            tube("U-NODUE", Urgent, None, 99),
            tube("U-DUE", Urgent, Some(900), 99),
            tube("R-TIE-B", Routine, None, 5),
            tube("R-TIE-A", Routine, None, 5),
            tube("R-NODUE-NEW", Routine, None, 7),
        ];
        let mut reversed: Vec<_> = tubes.iter().rev().cloned().collect();
        plating_order(&mut tubes);
        // The order depends only on the tubes, not on how they arrived.
        plating_order(&mut reversed);
        assert_eq!(tubes, reversed);
        assert_eq!(
            codes(&tubes),
            [
                "U-DUE",
                "U-NODUE",
                "R-DUE-SOON",
                "R-DUE-LATE",
                "R-NODUE-OLD",
                "R-TIE-A",
                "R-TIE-B",
                "R-NODUE-NEW",
            ]
        );
    }

    #[test]
    fn urgent_beats_an_earlier_due_routine_tube() {
        let mut tubes = vec![
            tube("ROUTINE1", Priority::Routine, Some(1), 1),
            tube("URGENT1", Priority::Urgent, None, 1000),
        ];
        plating_order(&mut tubes);
        assert_eq!(codes(&tubes), ["URGENT1", "ROUTINE1"]);
    }
}
