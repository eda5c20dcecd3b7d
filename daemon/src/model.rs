//! The records pcrd keeps in its store, and their format versions.

use pcrd_protocol::domain::{
    Barcode, Layout, Lineage, PlateFormat, PoolSize, Priority, QueuedTube, Timestamp, Well,
};
use pcrd_protocol::kit::KitId;
use serde::{Deserialize, Serialize};

use crate::store::Versioned;

/// A plate's identifier: the barcode on the plate, or one pcrd generated (`PL-000001`).
/// Same alphabet and length as a tube barcode, so the same scanners and labels work.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PlateId(String);

impl PlateId {
    pub fn new(text: impl Into<String>) -> Result<PlateId, String> {
        let text = text.into();
        match Barcode::new(text.clone()) {
            Ok(_) => Ok(PlateId(text)),
            Err(e) => Err(format!("invalid plate id: {e}")),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for PlateId {
    type Error = String;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        PlateId::new(text)
    }
}

impl From<PlateId> for String {
    fn from(id: PlateId) -> String {
        id.0
    }
}

impl std::fmt::Display for PlateId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a tube sits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub plate: PlateId,
    pub well: Well,
}

/// A received tube: known by its barcode, pool size, priority and due time only
/// (no personal data is kept on the instrument PC).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TubeRecord {
    pub barcode: Barcode,
    pub pool_size: PoolSize,
    pub priority: Priority,
    pub due_at: Option<Timestamp>,
    pub received_at: Timestamp,
    pub received_by: String,
    /// The sample (extraction) plate the tube was put on; `None` while it waits.
    pub placement: Option<Placement>,
    /// Sequence numbers of the audit entries about this tube, oldest first. Kept in the
    /// record (rewritten by every change to the tube anyway) rather than in an index
    /// tree: a million tubes then cost a million fewer keys.
    pub history: Vec<u64>,
}

impl Versioned for TubeRecord {
    const TREE: &'static str = "tubes";
    const VERSION: u8 = 1;
}

impl TubeRecord {
    pub fn queued(&self) -> QueuedTube {
        QueuedTube {
            barcode: self.barcode.clone(),
            priority: self.priority,
            due_at: self.due_at,
            received_at: self.received_at,
        }
    }

    /// Key in the `waiting` tree: sorts in plating order (urgent first, then due time,
    /// then arrival).
    pub fn waiting_key(&self) -> Vec<u8> {
        let mut key = Vec::with_capacity(17 + self.barcode.as_str().len());
        key.push(match self.priority {
            Priority::Urgent => 0,
            Priority::Routine => 1,
        });
        key.extend_from_slice(&crate::store::ordered_i64(
            self.due_at.map_or(i64::MAX, Timestamp::as_millis),
        ));
        key.extend_from_slice(&crate::store::ordered_i64(self.received_at.as_millis()));
        key.extend_from_slice(self.barcode.as_str().as_bytes());
        key
    }

    /// The barcode at the end of a `waiting` key.
    pub fn barcode_of_waiting_key(key: &[u8]) -> &[u8] {
        key.get(17..).unwrap_or_default()
    }
}

/// What a plate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlateKind {
    /// Built from tubes by a technician; goes on an extractor.
    Extraction,
    /// Derived from extraction plates (1:1 or four 96 into one 384); goes on a cycler.
    Pcr,
}

/// Where a plate is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlateState {
    /// Tubes may be added and removed.
    Open,
    /// The contents are fixed.
    Sealed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlateRecord {
    pub id: PlateId,
    pub kind: PlateKind,
    pub kit_id: KitId,
    pub kit_version: String,
    pub format: PlateFormat,
    pub state: PlateState,
    /// Validated again when decoded: a stored layout never has a sample in a control
    /// well or a tube twice.
    pub layout: Layout,
    pub lineage: Option<Lineage>,
    /// PCR plates made from this one.
    pub children: Vec<PlateId>,
    pub created_at: Timestamp,
    pub created_by: String,
    pub sealed_at: Option<Timestamp>,
    pub sealed_by: Option<String>,
}

impl Versioned for PlateRecord {
    const TREE: &'static str = "plates";
    const VERSION: u8 = 1;
}

/// One entry of the append-only audit trail. Entries are chained: `hash` covers the
/// entry and the previous entry's hash, so a removed or edited entry shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub at: Timestamp,
    /// The user named by the API token.
    pub user: String,
    /// What happened, as `noun.verb` (`tube.received`, `plate.sealed`, ...).
    pub action: String,
    pub plate: Option<PlateId>,
    pub tubes: Vec<Barcode>,
    /// A one-line description for people.
    pub detail: String,
    /// Why, when the user gave a reason.
    pub reason: Option<String>,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
}

impl Versioned for AuditEntry {
    const TREE: &'static str = "audit";
    const VERSION: u8 = 1;
}

impl AuditEntry {
    /// The chain hash of this entry's content and its predecessor's hash.
    pub fn compute_hash(&self) -> [u8; 32] {
        use sha2::Digest;
        let content = (
            self.seq,
            self.at,
            &self.user,
            &self.action,
            &self.plate,
            &self.tubes,
            &self.detail,
            &self.reason,
            self.prev_hash,
        );
        let bytes = postcard::to_stdvec(&content).unwrap_or_default();
        sha2::Sha256::digest(bytes).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{decode, encode};

    #[test]
    fn tube_record_round_trips_through_the_store_encoding() {
        let tube = TubeRecord {
            barcode: Barcode::new("SWAB-0001").unwrap(),
            pool_size: PoolSize::new(10).unwrap(),
            priority: Priority::Urgent,
            due_at: Some(Timestamp::from_millis(1_700_000_000_000)),
            received_at: Timestamp::from_millis(1_699_990_000_000),
            received_by: "alice".into(),
            placement: Some(Placement {
                plate: PlateId::new("PL-000001").unwrap(),
                well: "B3".parse().unwrap(),
            }),
            history: vec![1, 7],
        };
        let bytes = encode(&tube);
        assert_eq!(bytes[0], TubeRecord::VERSION);
        assert_eq!(decode::<TubeRecord>(b"k", &bytes).unwrap(), tube);
        // A future version byte is refused, not misread.
        let mut newer = bytes.clone();
        newer[0] = 2;
        assert!(decode::<TubeRecord>(b"k", &newer).is_err());
    }

    #[test]
    fn plate_record_round_trips_with_its_layout_and_lineage() {
        use pcrd_protocol::domain::{ControlKind, PlateTemplate, WellContent};
        let template = PlateTemplate::new(
            PlateFormat::Wells96,
            [("H12".parse().unwrap(), ControlKind::PositiveControl)],
        )
        .unwrap();
        let mut layout = Layout::from_template(&template);
        layout
            .place("A1".parse().unwrap(), Barcode::new("SWAB-0001").unwrap())
            .unwrap();
        let plate = PlateRecord {
            id: PlateId::new("PL-000002").unwrap(),
            kind: PlateKind::Pcr,
            kit_id: "sarscov2-orf1ab-n-ic".parse().unwrap(),
            kit_version: "1.0".into(),
            format: PlateFormat::Wells96,
            state: PlateState::Sealed,
            layout,
            lineage: Some(Lineage::Transfer {
                source: "PL-000001".into(),
            }),
            children: Vec::new(),
            created_at: Timestamp::from_millis(1),
            created_by: "tina".into(),
            sealed_at: Some(Timestamp::from_millis(2)),
            sealed_by: Some("tina".into()),
        };
        let back: PlateRecord = decode(b"k", &encode(&plate)).unwrap();
        assert_eq!(back, plate);
        assert_eq!(
            back.layout.get("H12".parse().unwrap()),
            Some(&WellContent::Control {
                control: ControlKind::PositiveControl
            })
        );
    }

    #[test]
    fn waiting_keys_sort_urgent_then_due_then_arrival() {
        let tube = |code: &str, priority, due: Option<i64>, received: i64| TubeRecord {
            barcode: Barcode::new(code).unwrap(),
            pool_size: PoolSize::default(),
            priority,
            due_at: due.map(Timestamp::from_millis),
            received_at: Timestamp::from_millis(received),
            received_by: "t".into(),
            placement: None,
            history: Vec::new(),
        };
        let mut tubes = [
            tube("ROUT-NODUE", Priority::Routine, None, 1),
            tube("ROUT-DUE", Priority::Routine, Some(500), 5),
            tube("URG-LATE", Priority::Urgent, Some(900), 2),
            tube("URG-EARLY", Priority::Urgent, Some(100), 3),
            tube("ROUT-OLD", Priority::Routine, None, -5),
        ];
        tubes.sort_by_key(TubeRecord::waiting_key);
        let order: Vec<_> = tubes.iter().map(|t| t.barcode.as_str()).collect();
        assert_eq!(
            order,
            [
                "URG-EARLY",
                "URG-LATE",
                "ROUT-DUE",
                "ROUT-OLD",
                "ROUT-NODUE"
            ]
        );
        assert_eq!(
            TubeRecord::barcode_of_waiting_key(&tubes[0].waiting_key()),
            b"URG-EARLY"
        );
    }

    proptest::proptest! {
        /// A damaged value in the store is reported, never a panic.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = decode::<TubeRecord>(b"k", &bytes);
            let _ = decode::<PlateRecord>(b"k", &bytes);
            let _ = decode::<AuditEntry>(b"k", &bytes);
            let mut versioned = vec![PlateRecord::VERSION];
            versioned.extend_from_slice(&bytes);
            let _ = decode::<PlateRecord>(b"k", &versioned);
        }
    }
}
