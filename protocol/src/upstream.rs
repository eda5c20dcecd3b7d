//! The result record pcrd sends upstream (to the central system), version 1.
//!
//! One record is one version of one tube's result. A correction is a new record
//! with the same `result_id`, a higher `version` and status `corrected`; nothing
//! sent is ever changed. Receivers deduplicate on [`ResultRecord::idempotency_key`]
//! (`result_id:version`), which is the same on every retry and after restarts.
//!
//! The JSON form is documented by `docs/result-record.schema.json`; every sink
//! (HTTP, PostgreSQL, batch files, HL7) is built from this one struct so they
//! cannot disagree. Times are RFC 3339 UTC strings with milliseconds; a Ct is a
//! number with two decimals as reported or `null` (undetermined), never a
//! sentinel.

use serde::{Deserialize, Serialize};

/// The schema version this build writes.
pub const RESULT_SCHEMA_VERSION: u32 = 1;

/// One version of one tube's result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultRecord {
    /// [`RESULT_SCHEMA_VERSION`] when written.
    pub schema_version: u32,
    /// Stable across versions of the same result (lab, run, well and tube).
    pub result_id: String,
    /// 1 for the first release; each correction or final-after-preliminary adds one.
    pub version: u32,
    /// The tube's barcode. pcrd holds no personal data.
    pub tube: String,
    /// Swabs in the tube (1 = single swab).
    pub pool_size: u8,
    pub plate: String,
    /// Well on the plate the result came from (A1..P24).
    pub well: String,
    pub run: String,
    pub instrument: String,
    pub kit: KitRef,
    /// One entry per kit target, in the kit's order.
    pub targets: Vec<TargetResult>,
    pub interpretation: Interpretation,
    pub status: ResultStatus,
    /// Why this version replaces the previous one; present exactly when status is
    /// `corrected`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correction_reason: Option<String>,
    /// When the run that produced the Cts ended (RFC 3339).
    pub tested_at: String,
    /// When this version was released (RFC 3339).
    pub released_at: String,
    /// Who released it: a user name, or `auto` for release by policy.
    pub released_by: String,
    pub lab_id: String,
}

impl ResultRecord {
    /// The key receivers deduplicate on: `result_id:version`.
    pub fn idempotency_key(&self) -> String {
        format!("{}:{}", self.result_id, self.version)
    }
}

/// The kit that judged the result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KitRef {
    pub id: String,
    pub version: String,
}

/// One target of the kit in one tube.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetResult {
    pub name: String,
    /// The reporter dye / channel (FAM, HEX, ...).
    pub dye: String,
    /// The LOINC code of the target's Ct observation, when the kit gives one.
    pub loinc: Option<String>,
    /// The Ct as reported (two decimals); `None` when undetermined.
    pub ct: Option<f64>,
    pub call: TargetCall,
}

/// What one target showed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetCall {
    Detected,
    NotDetected,
    /// In the kit's grey zone.
    Inconclusive,
    /// No usable reading (failed curve, failed run).
    Invalid,
}

/// The tube's overall result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interpretation {
    Positive,
    Negative,
    Inconclusive,
    Invalid,
}

impl Interpretation {
    pub fn as_str(self) -> &'static str {
        match self {
            Interpretation::Positive => "positive",
            Interpretation::Negative => "negative",
            Interpretation::Inconclusive => "inconclusive",
            Interpretation::Invalid => "invalid",
        }
    }
}

/// Where the result stands (HL7 OBX-11 P / F / C).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResultStatus {
    /// An early call released before the plate completed.
    Preliminary,
    Final,
    /// Replaces an earlier final version.
    Corrected,
}

impl ResultStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ResultStatus::Preliminary => "preliminary",
            ResultStatus::Final => "final",
            ResultStatus::Corrected => "corrected",
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A complete, plausible record for tests of every sink.
    pub(crate) fn sample() -> ResultRecord {
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
            targets: vec![TargetResult {
                name: "N1".into(),
                dye: "FAM".into(),
                loinc: Some("94759-8".into()),
                ct: Some(24.31),
                call: TargetCall::Detected,
            }],
            interpretation: Interpretation::Positive,
            status: ResultStatus::Final,
            correction_reason: None,
            tested_at: "2026-11-27T06:00:00.000Z".into(),
            released_at: "2026-11-27T06:10:00.000Z".into(),
            released_by: "auto".into(),
            lab_id: "LAB1".into(),
        }
    }

    #[test]
    fn json_round_trips_and_the_key_is_id_and_version() {
        let record = sample();
        let json = serde_json::to_string(&record).expect("serialise");
        assert!(json.contains("\"interpretation\":\"positive\""), "{json}");
        assert!(!json.contains("correction_reason"), "{json}");
        let back: ResultRecord = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, record);
        assert_eq!(record.idempotency_key(), "LAB1-R0001-A1-T000123:1");
    }
}
