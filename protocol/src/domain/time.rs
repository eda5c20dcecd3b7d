//! Instants as plain numbers, so the protocol never has to read a clock.

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, UTC. The protocol never reads a clock; callers pass one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The instant `ms` milliseconds after the Unix epoch (negative: before it).
    pub fn from_millis(ms: i64) -> Self {
        Timestamp(ms)
    }

    /// Milliseconds since the Unix epoch.
    pub fn as_millis(self) -> i64 {
        self.0
    }

    /// The instant `ms` milliseconds later (earlier if negative), stopping at
    /// the ends of the range instead of overflowing: a deadline computed from
    /// a huge configured timeout should mean "never", not wrap into the past.
    pub fn saturating_add_millis(self, ms: i64) -> Self {
        Timestamp(self.0.saturating_add(ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_round_trip_and_order() {
        let t = Timestamp::from_millis(1_600_000_000_000);
        assert_eq!(t.as_millis(), 1_600_000_000_000);
        assert!(Timestamp::from_millis(-1) < Timestamp::from_millis(0));
    }

    #[test]
    fn saturating_add_adds_and_saturates() {
        assert_eq!(Timestamp(10).saturating_add_millis(5), Timestamp(15));
        assert_eq!(Timestamp(10).saturating_add_millis(-15), Timestamp(-5));
        assert_eq!(
            Timestamp(i64::MAX - 1).saturating_add_millis(10),
            Timestamp(i64::MAX)
        );
        assert_eq!(
            Timestamp(i64::MIN + 1).saturating_add_millis(-10),
            Timestamp(i64::MIN)
        );
    }

    #[test]
    fn serializes_as_a_bare_number() {
        let json = serde_json::to_string(&Timestamp(42)).unwrap();
        assert_eq!(json, "42");
        assert_eq!(
            serde_json::from_str::<Timestamp>("42").unwrap(),
            Timestamp(42)
        );
    }
}
