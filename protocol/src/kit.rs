//! Kit definitions: which controls a PCR kit puts where, per plate format.
//!
//! Kits are data, shipped as TOML files (see `kits/` in the repository) and
//! parsed here from text the caller has read. A kit file looks like:
//!
//! ```toml
//! id = "sarscov2-orf1ab-n-ic"
//! version = "1.0"
//! name = "SARS-CoV-2 ORF1ab/N with internal control"
//! description = "..."          # optional
//!
//! [plates.96]
//! positive_control = ["H12"]
//! no_template_control = ["G12"]
//! extraction_negative_control = []   # each list optional, default empty
//! ```
//!
//! Unknown keys are rejected, so a misspelt key ("positive_controls") is an
//! error rather than a plate silently missing its control.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::domain::{ControlKind, LayoutError, PlateFormat, PlateTemplate, Well, WellError};
use crate::echo;

/// A kit's identifier: 1..=64 lowercase ASCII letters, digits, '-', '.' and
/// '_'. Lowercase only, so ids compare the same everywhere (file names,
/// URLs, the store).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KitId(String);

impl KitId {
    /// Most characters in a kit id.
    pub const MAX_LEN: usize = 64;

    /// Checks the id syntax.
    pub fn new(s: impl Into<String>) -> Result<Self, KitError> {
        let s = s.into();
        let valid = !s.is_empty()
            && s.len() <= Self::MAX_LEN
            && s.bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_'));
        if valid {
            Ok(KitId(s))
        } else {
            Err(KitError::InvalidId { id: echo(&s) })
        }
    }

    /// The id text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for KitId {
    type Err = KitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KitId::new(s)
    }
}

impl TryFrom<String> for KitId {
    type Error = KitError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        KitId::new(s)
    }
}

impl From<KitId> for String {
    fn from(id: KitId) -> Self {
        id.0
    }
}

/// A validated kit: its identity and a control template per plate format.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KitDefinition {
    /// The kit's id, e.g. "sarscov2-orf1ab-n-ic".
    pub id: KitId,
    /// The kit definition's version, e.g. "1.0". Results record
    /// [`KitDefinition::key`], so a changed layout must get a new version.
    pub version: String,
    /// A name for people.
    pub name: String,
    /// Optional longer description.
    pub description: Option<String>,
    templates: BTreeMap<PlateFormat, PlateTemplate>,
}

impl KitDefinition {
    /// Most characters in a version.
    pub const MAX_VERSION_LEN: usize = 32;

    /// Parses and validates a kit file's text. Checks, in order: the TOML
    /// shape (unknown keys rejected), the id, the version, that at least one
    /// plate format is defined, and for each format that its wells are on
    /// the plate and none is used twice.
    pub fn from_toml_str(text: &str) -> Result<Self, KitError> {
        let raw: RawKit = toml::from_str(text).map_err(|e| KitError::Toml {
            message: e.to_string().trim_end().to_owned(),
        })?;
        let id = KitId::new(raw.id)?;
        let version_ok = !raw.version.is_empty()
            && raw.version.chars().count() <= Self::MAX_VERSION_LEN
            && !raw
                .version
                .chars()
                .any(|c| c.is_whitespace() || c.is_control());
        if !version_ok {
            return Err(KitError::InvalidVersion {
                version: echo(&raw.version),
            });
        }
        if raw.plates.is_empty() {
            return Err(KitError::NoPlateFormats {
                kit: id.to_string(),
            });
        }
        let mut templates = BTreeMap::new();
        for (key, plate) in raw.plates {
            let format: PlateFormat = key.parse().map_err(|_| KitError::UnknownFormat {
                kit: id.to_string(),
                format: echo(&key),
            })?;
            let template = plate.into_template(&id, format)?;
            templates.insert(format, template);
        }
        Ok(KitDefinition {
            id,
            version: raw.version,
            name: raw.name,
            description: raw.description,
            templates,
        })
    }

    /// The control template for `format`, if the kit supports that format.
    pub fn template(&self, format: PlateFormat) -> Option<&PlateTemplate> {
        self.templates.get(&format)
    }

    /// The formats the kit supports, smallest first.
    pub fn formats(&self) -> impl Iterator<Item = PlateFormat> + '_ {
        self.templates.keys().copied()
    }

    /// "id@version": what a plate or result records to say which kit
    /// definition it was laid out with.
    pub fn key(&self) -> String {
        format!("{}@{}", self.id, self.version)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKit {
    id: String,
    version: String,
    name: String,
    #[serde(default)]
    description: Option<String>,
    // Keyed by the text of the table name ("96"), so an unsupported format
    // gets our own error rather than a generic TOML one.
    #[serde(default)]
    plates: BTreeMap<String, RawPlate>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlate {
    #[serde(default)]
    positive_control: Vec<String>,
    #[serde(default)]
    no_template_control: Vec<String>,
    #[serde(default)]
    extraction_negative_control: Vec<String>,
}

impl RawPlate {
    fn into_template(self, id: &KitId, format: PlateFormat) -> Result<PlateTemplate, KitError> {
        let lists = [
            (ControlKind::PositiveControl, self.positive_control),
            (ControlKind::NoTemplateControl, self.no_template_control),
            (
                ControlKind::ExtractionNegativeControl,
                self.extraction_negative_control,
            ),
        ];
        let mut controls: Vec<(Well, ControlKind)> = Vec::new();
        for (kind, wells) in lists {
            for text in wells {
                let well = Well::parse_in(&text, format).map_err(|source| KitError::BadWell {
                    kit: id.to_string(),
                    format,
                    source,
                })?;
                controls.push((well, kind));
            }
        }
        PlateTemplate::new(format, controls).map_err(|source| KitError::Template {
            kit: id.to_string(),
            format,
            source,
        })
    }
}

/// Why a kit file was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KitError {
    /// Not valid TOML, a required key (id, version, name) missing, a value of
    /// the wrong type, or an unknown key (often a typo).
    #[error("kit definition is malformed: {message}")]
    Toml {
        /// The TOML parser's description, with line and column.
        message: String,
    },
    /// The id is empty, too long, or has a character other than a lowercase
    /// letter, digit, '-', '.' or '_' (uppercase is the usual mistake).
    #[error(
        "kit id {id:?} is invalid; an id is 1 to {max} characters, each a lowercase letter, digit, '-', '.' or '_'",
        max = KitId::MAX_LEN
    )]
    InvalidId {
        /// The id given (cut to 40 characters).
        id: String,
    },
    /// The version is empty, too long, or contains whitespace.
    #[error(
        "kit version {version:?} is invalid; a version is 1 to {max} characters with no spaces",
        max = KitDefinition::MAX_VERSION_LEN
    )]
    InvalidVersion {
        /// The version given (cut to 40 characters).
        version: String,
    },
    /// The kit has no `[plates.96]` or `[plates.384]` table, so no plate
    /// could be laid out with it.
    #[error("kit {kit:?} defines no plate formats; add a [plates.96] or [plates.384] table")]
    NoPlateFormats {
        /// The kit id.
        kit: String,
    },
    /// A `[plates.N]` table for a format other than 96 or 384.
    #[error("kit {kit:?} has a plate table for format {format:?}; only 96 and 384 are supported")]
    UnknownFormat {
        /// The kit id.
        kit: String,
        /// The table name given (cut to 40 characters).
        format: String,
    },
    /// The same well is listed twice in one format's controls (for one
    /// control or two).
    #[error("kit {kit:?}, {format}-well plate: {source}")]
    Template {
        /// The kit id.
        kit: String,
        /// The plate format whose table is wrong.
        format: PlateFormat,
        /// What is wrong with it.
        source: LayoutError,
    },
    /// A control well is not a well name, or not on the format's plate.
    #[error("kit {kit:?}, {format}-well plate: {source}")]
    BadWell {
        /// The kit id.
        kit: String,
        /// The plate format whose table is wrong.
        format: PlateFormat,
        /// What is wrong with the well.
        source: WellError,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
id = "test-kit_1.0"
version = "2.1-rc1"
name = "Test kit"

[plates.96]
positive_control = ["H12"]
no_template_control = ["g12"]

[plates.384]
positive_control = ["P24", "O24"]
no_template_control = ["N24", "M24"]
extraction_negative_control = ["A24"]
"#;

    fn w(s: &str) -> Well {
        s.parse().unwrap()
    }

    fn err(text: &str) -> KitError {
        KitDefinition::from_toml_str(text).unwrap_err()
    }

    /// GOOD with one line replaced.
    fn good_with(from: &str, to: &str) -> String {
        assert!(GOOD.contains(from), "{from}");
        GOOD.replacen(from, to, 1)
    }

    #[test]
    fn parses_a_valid_kit() {
        let kit = KitDefinition::from_toml_str(GOOD).unwrap();
        assert_eq!(kit.id.as_str(), "test-kit_1.0");
        assert_eq!(kit.version, "2.1-rc1");
        assert_eq!(kit.name, "Test kit");
        assert_eq!(kit.description, None);
        assert_eq!(kit.key(), "test-kit_1.0@2.1-rc1");
        assert_eq!(
            kit.formats().collect::<Vec<_>>(),
            [PlateFormat::Wells96, PlateFormat::Wells384]
        );
        let t96 = kit.template(PlateFormat::Wells96).unwrap();
        assert_eq!(t96.format, PlateFormat::Wells96);
        assert_eq!(
            t96.controls,
            BTreeMap::from([
                (w("G12"), ControlKind::NoTemplateControl),
                (w("H12"), ControlKind::PositiveControl),
            ])
        );
        let t384 = kit.template(PlateFormat::Wells384).unwrap();
        assert_eq!(t384.controls.len(), 5);
        assert_eq!(
            t384.controls.get(&w("A24")),
            Some(&ControlKind::ExtractionNegativeControl)
        );
    }

    #[test]
    fn optional_keys_default() {
        let kit = KitDefinition::from_toml_str(
            "id = \"k\"\nversion = \"1\"\nname = \"K\"\ndescription = \"about\"\n[plates.96]\n",
        )
        .unwrap();
        assert_eq!(kit.description.as_deref(), Some("about"));
        assert!(
            kit.template(PlateFormat::Wells96)
                .unwrap()
                .controls
                .is_empty()
        );
        assert_eq!(kit.template(PlateFormat::Wells384), None);
    }

    #[test]
    fn serializes_for_the_api() {
        let kit = KitDefinition::from_toml_str(GOOD).unwrap();
        let json = serde_json::to_value(&kit).unwrap();
        assert_eq!(json["id"], "test-kit_1.0");
        assert_eq!(
            json["templates"]["96"]["controls"]["H12"],
            "positive_control"
        );
    }

    #[test]
    fn malformed_toml_and_unknown_keys() {
        let e = err("id = ");
        assert!(matches!(e, KitError::Toml { .. }), "{e:?}");
        assert!(
            e.to_string().starts_with("kit definition is malformed: "),
            "{e}"
        );

        let e = err(&good_with(
            "name = \"Test kit\"",
            "name = \"Test kit\"\ntargets = []",
        ));
        assert!(e.to_string().contains("targets"), "{e}");

        let e = err(&good_with(
            "positive_control = [\"H12\"]",
            "positive_controls = [\"H12\"]",
        ));
        assert!(e.to_string().contains("positive_controls"), "{e}");

        let e = err(&good_with("name = \"Test kit\"\n", ""));
        assert!(e.to_string().contains("name"), "{e}");

        let e = err(&good_with("[\"H12\"]", "\"H12\""));
        assert!(matches!(e, KitError::Toml { .. }), "{e:?}");
    }

    #[test]
    fn invalid_id() {
        for bad in ["Test-Kit", "", "kit id", "kit/1", &"k".repeat(65)] {
            let e = err(&good_with("\"test-kit_1.0\"", &format!("{bad:?}")));
            assert!(matches!(e, KitError::InvalidId { .. }), "{bad:?}: {e:?}");
        }
        assert!(KitId::new("k".repeat(64)).is_ok());
        assert_eq!(
            err(&good_with("\"test-kit_1.0\"", "\"SARS\"")).to_string(),
            "kit id \"SARS\" is invalid; an id is 1 to 64 characters, each a lowercase letter, digit, '-', '.' or '_'"
        );
        assert_eq!("a.b_c-1".parse::<KitId>().unwrap().to_string(), "a.b_c-1");
        assert_eq!(String::from(KitId::new("abc").unwrap()), "abc");
        assert!(serde_json::from_str::<KitId>("\"ABC\"").is_err());
        assert_eq!(
            serde_json::from_str::<KitId>("\"abc\"").unwrap(),
            KitId::new("abc").unwrap()
        );
    }

    #[test]
    fn invalid_version() {
        for bad in ["", "1 0", "1.0\n", &"1".repeat(33)] {
            let e = err(&good_with("\"2.1-rc1\"", &format!("{bad:?}")));
            assert!(
                matches!(e, KitError::InvalidVersion { .. }),
                "{bad:?}: {e:?}"
            );
        }
        assert_eq!(
            err(&good_with("\"2.1-rc1\"", "\"1 0\"")).to_string(),
            "kit version \"1 0\" is invalid; a version is 1 to 32 characters with no spaces"
        );
    }

    #[test]
    fn no_plate_formats() {
        let base = "id = \"k\"\nversion = \"1\"\nname = \"K\"\n";
        for text in [base.to_owned(), format!("{base}[plates]\n")] {
            let e = err(&text);
            assert_eq!(e, KitError::NoPlateFormats { kit: "k".into() });
            assert_eq!(
                e.to_string(),
                "kit \"k\" defines no plate formats; add a [plates.96] or [plates.384] table"
            );
        }
    }

    #[test]
    fn unknown_format() {
        let e = err(&good_with("[plates.384]", "[plates.1536]"));
        assert_eq!(
            e,
            KitError::UnknownFormat {
                kit: "test-kit_1.0".into(),
                format: "1536".into()
            }
        );
        assert_eq!(
            e.to_string(),
            "kit \"test-kit_1.0\" has a plate table for format \"1536\"; only 96 and 384 are supported"
        );
    }

    #[test]
    fn bad_well_names_kit_format_and_well() {
        let e = err(&good_with("[\"H12\"]", "[\"H13\"]"));
        assert_eq!(
            e.to_string(),
            "kit \"test-kit_1.0\", 96-well plate: well \"H13\" is outside a 96-well plate (A1..H12)"
        );
        assert!(matches!(
            e,
            KitError::BadWell {
                format: PlateFormat::Wells96,
                source: WellError::OutsideFormat { .. },
                ..
            }
        ));
        let e = err(&good_with("[\"N24\", \"M24\"]", "[\"N24\", \"M 24\"]"));
        assert!(matches!(
            e,
            KitError::BadWell {
                format: PlateFormat::Wells384,
                source: WellError::Malformed { .. },
                ..
            }
        ));
        assert!(e.to_string().contains("\"M 24\" is not a well"), "{e}");
    }

    #[test]
    fn repeated_well_names_kit_format_and_well() {
        // The same well as a positive and a no-template control.
        let e = err(&good_with("[\"N24\", \"M24\"]", "[\"N24\", \"P24\"]"));
        assert_eq!(
            e,
            KitError::Template {
                kit: "test-kit_1.0".into(),
                format: PlateFormat::Wells384,
                source: LayoutError::DuplicateWell { well: w("P24") }
            }
        );
        assert_eq!(
            e.to_string(),
            "kit \"test-kit_1.0\", 384-well plate: well P24 is listed more than once"
        );
        // Written differently, still the same well.
        let e = err(&good_with("[\"H12\"]", "[\"H12\", \"h012\"]"));
        assert!(
            e.to_string().ends_with("well H12 is listed more than once"),
            "{e}"
        );
    }

    #[test]
    fn errors_expose_their_source() {
        use std::error::Error as _;
        let e = err(&good_with("[\"H12\"]", "[\"H13\"]"));
        assert!(e.source().is_some());
    }
}
