//! RDML, the Real-time PCR Data Markup Language (protocols.md §7): read RDML 1.0–1.4
//! files into a [`Document`], write a [`Document`] as RDML 1.3.
//!
//! An `.rdml` file is a zip archive holding `rdml_data.xml`; plain XML is accepted too.
//! [`read`] takes the file's bytes, [`write()`] gives them back. Both are pure: they open
//! no file, read no clock and keep nothing between calls, so the same input always gives
//! the same output (the zip entry carries the fixed DOS date 1980-01-01).
//!
//! The model keeps what pcrd needs to compute and check Ct values: dyes, samples (type,
//! quantity), targets (dye, type), and per run the plate format and, per reaction and
//! target, the amplification curve (`adp`: one raw fluorescence value per cycle), the
//! instrument's Cq, threshold (`quantFluor`), baseline (`bgFluor`, `bgFluorSlp`) and
//! exclusion note (`excl`).
//!
//! What this module does NOT do:
//! - keep what the model leaves out: documentation, experimenters, sequences, thermal
//!   cycling conditions, melting curves (`mdp`), digital PCR partitions, dates, `N0`,
//!   efficiencies, per-target sample types and quantities (only the first that applies
//!   to all targets is kept). Reading and writing a file drops them.
//! - validate against the XSD. The reader checks the structure it relies on (required
//!   elements, numbers that are numbers, whole cycle numbers 1, 2, 3… without gaps or
//!   repeats, references to declared samples, targets and dyes, unique ids) and skips
//!   elements it does not use; it does not check enumerations such as the sample type.
//! - write RDML 1.4 or any version but 1.3, or touch the file system.
//! - compute anything: Ct analysis is [`crate::analysis`].

mod container;
mod parse;
mod serialize;

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

/// The namespace of every RDML element (RDML_v1_3_REC.xsd, `targetNamespace`).
pub const NAMESPACE: &str = "http://www.rdml.org";

/// The name of the XML document inside an RDML zip archive (protocols.md §7; rdmlpython
/// `Rdml.load` reads exactly this entry).
pub const DATA_FILE_NAME: &str = "rdml_data.xml";

/// The RDML version [`write()`] produces.
pub const WRITTEN_VERSION: &str = "1.3";

/// The RDML versions [`read`] accepts: the four published schemas (1.0–1.3, shipped
/// with rdmlpython 1.7.2) and 1.4, whose files keep the 1.3 structure for everything
/// this module reads.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["1.0", "1.1", "1.2", "1.3", "1.4"];

/// The row and column labels of RDML_v1_3_REC.xsd (`labelFormatType`).
pub const LABELS: [&str; 3] = ["ABC", "123", "A1a1"];

/// Largest `rdml_data.xml` [`read`] accepts, decompressed: 256 MiB. A 384-well run of
/// 50 cycles is about 2 MiB, so this leaves a hundredfold margin while a zip bomb (a few
/// kilobytes inflating to gigabytes) is refused before it exhausts memory.
pub const MAX_XML_BYTES: u64 = 256 * 1024 * 1024;

/// One RDML file: the declarations (dyes, samples, targets) and the experiments that
/// refer to them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Document {
    /// The `version` attribute of the root element as read ("1.0" … "1.4"). [`write()`]
    /// ignores it and always writes [`WRITTEN_VERSION`].
    pub version: String,
    /// Declared dyes, in file order. For RDML 1.0, which has no `<dye>` element, one
    /// dye per distinct target `dyeId`.
    pub dyes: Vec<Dye>,
    /// Declared samples, in file order.
    pub samples: Vec<Sample>,
    /// Declared targets, in file order.
    pub targets: Vec<Target>,
    /// Experiments, in file order.
    pub experiments: Vec<Experiment>,
}

/// A dye (`<dye id>`), the detection chemistry a target is read through.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Dye {
    /// The dye's id, referred to by [`Target::dye_id`].
    pub id: String,
}

/// A sample (`<sample id>`): what was put into reactions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    /// The sample's id, referred to by [`Reaction::sample_id`].
    pub id: String,
    /// The sample type (`<type>`): unkn, ntc, nac, std, ntp, nrt, pos or opt. "unkn"
    /// (the schema's default) when absent. When the file gives one type per target, the
    /// one without `targetId` is kept, else the first.
    pub kind: String,
    /// The sample's quantity (`<quantity>`), e.g. the copies of a standard. When the
    /// file gives one per target, the one without `targetId` is kept, else the first.
    pub quantity: Option<Quantity>,
}

/// A quantity with its unit (`<quantity><value/><unit/></quantity>`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Quantity {
    /// The value, finite.
    pub value: f64,
    /// The unit: cop (copies per µl), fold, dil, ng, nMol or other.
    pub unit: String,
}

/// A target (`<target id>`): what a reaction detects, through which dye.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Target {
    /// The target's id, referred to by [`ReactionData::target_id`].
    pub id: String,
    /// The dye the target is read through (`<dyeId id>`); a declared [`Dye`].
    pub dye_id: String,
    /// The target type (`<type>`): toi (target of interest) or ref (reference).
    pub kind: String,
}

/// An experiment (`<experiment id>`): a group of runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Experiment {
    /// The experiment's id.
    pub id: String,
    /// Its runs, in file order.
    pub runs: Vec<Run>,
}

/// A run (`<run id>`): one plate on one instrument.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Run {
    /// The run's id, unique within its experiment.
    pub id: String,
    /// The instrument, free text (`<instrument>`).
    pub instrument: Option<String>,
    /// How the file's Cq values were found (`<cqDetectionMethod>`): "automated threshold
    /// and baseline settings", "manual threshold and baseline settings", "second
    /// derivative maximum" or "other".
    pub cq_detection_method: Option<String>,
    /// The plate format, which maps reaction ids to wells.
    pub format: PcrFormat,
    /// The reactions (wells), in file order; ids are unique within the run.
    pub reactions: Vec<Reaction>,
}

/// A run's plate format (`<pcrFormat>`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PcrFormat {
    /// Rows: 8 for a 96-well plate, 16 for 384, the number of places for a rotor.
    /// 0 stands for RDML's "free format" (`<rows>-1</rows>`): a list, not a plate.
    pub rows: u32,
    /// Columns: 12 for a 96-well plate, 24 for 384, 1 for a rotor.
    pub columns: u32,
    /// How rows are labelled: "ABC" (letters), "123" (numbers) or "A1a1" (the 3072-well
    /// array's block-and-position label).
    pub row_label: String,
    /// How columns are labelled, as [`PcrFormat::row_label`].
    pub column_label: String,
}

/// One reaction (`<react id>`): a well, a capillary or a rotor place.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reaction {
    /// The reaction id: the position counted row by row from 1 (96-well B3 = 15), see
    /// [`PcrFormat::well_label`].
    pub id: u32,
    /// The sample in the reaction, a declared [`Sample`].
    pub sample_id: String,
    /// One entry per target measured in the reaction, in file order; each target at
    /// most once.
    pub data: Vec<ReactionData>,
}

/// What was measured for one target in one reaction (`<data>`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReactionData {
    /// The target (`<tar id>`), a declared [`Target`].
    pub target_id: String,
    /// The Cq the file reports (`<cq>`); `None` when absent or -1 (RDML's "not
    /// available").
    pub cq: Option<f64>,
    /// Why the data was excluded (`<excl>`), reasons separated by ';'. `None` when the
    /// data is not excluded.
    pub excluded: Option<String>,
    /// The threshold used for the Cq (`<quantFluor>`).
    pub threshold: Option<f64>,
    /// The baseline's intercept (`<bgFluor>`).
    pub background: Option<f64>,
    /// The baseline's slope per cycle (`<bgFluorSlp>`).
    pub background_slope: Option<f64>,
    /// The amplification curve (`<adp><cyc/><fluor/></adp>`): raw, not
    /// baseline-corrected fluorescence, index 0 = cycle 1. Empty for endpoint-only data.
    pub fluorescence: Vec<f64>,
}

/// What can go wrong reading an RDML file (or checking a [`Document`] built by hand).
///
/// Messages name the place: the line in `rdml_data.xml` where the parser found the
/// problem, and the experiment, run, reaction and target it belongs to.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RdmlError {
    /// The bytes start like a zip archive but it cannot be read: cut short, corrupt,
    /// encrypted, or compressed with a method other than stored or deflate.
    #[error("not a readable zip archive: {reason}")]
    Zip {
        /// What the zip reader said.
        reason: String,
    },
    /// The zip archive has no `rdml_data.xml`: it is some other zip, or a tool stored
    /// the XML under another name.
    #[error("the zip archive holds no {DATA_FILE_NAME} (it holds: {entries})")]
    MissingRdmlData {
        /// The names the archive does hold, comma separated.
        entries: String,
    },
    /// The XML is larger than the limit once decompressed: most likely a zip bomb, or
    /// not an RDML file of a few runs.
    #[error("{DATA_FILE_NAME} is larger than {limit} bytes; refusing to read it")]
    TooLarge {
        /// The limit in bytes ([`MAX_XML_BYTES`] for [`read`]).
        limit: u64,
    },
    /// The XML is not UTF-8. RDML files are UTF-8; a UTF-16 export or a binary file
    /// ends up here.
    #[error("line {line}: the XML is not valid UTF-8 (at byte {byte})")]
    NotUtf8 {
        /// Line of the first invalid byte, from 1.
        line: u64,
        /// Offset of the first invalid byte.
        byte: u64,
    },
    /// The XML is not well-formed: cut short, a tag not closed, an unknown entity, an
    /// undeclared namespace prefix, text outside the root element.
    #[error("line {line} (byte {byte}): malformed XML: {reason}")]
    Xml {
        /// Line where the parser stopped, from 1.
        line: u64,
        /// Byte offset where the parser stopped.
        byte: u64,
        /// What the XML parser said.
        reason: String,
    },
    /// The root element is not `<rdml>` in the RDML namespace: the file is some other
    /// XML.
    #[error("line {line}: the root element is <{found}>, not <rdml> (namespace {NAMESPACE})")]
    NotRdml {
        /// Line of the root element.
        line: u64,
        /// The root element's name as written.
        found: String,
    },
    /// The root's `version` is missing or not one of [`SUPPORTED_VERSIONS`]: a future
    /// RDML version, or a typo.
    #[error("RDML version {version:?} is not supported (supported: 1.0 to 1.4)")]
    UnsupportedVersion {
        /// The version as written; empty when the attribute is missing.
        version: String,
    },
    /// A required element or attribute is missing (a reaction without a sample, data
    /// without a target, a point without a cycle, a run without a plate format…).
    #[error("line {line}: {place}: {what} is missing")]
    Missing {
        /// Line of the element that lacks it.
        line: u64,
        /// Where, e.g. `experiment "E" run "R" reaction 15`.
        place: String,
        /// What is missing, e.g. `<sample>` or `attribute id`.
        what: String,
    },
    /// An element that may appear once appears again (two `<cq>` in one data, two
    /// `<pcrFormat>` in one run).
    #[error("line {line}: {place}: <{element}> appears more than once")]
    Repeated {
        /// Line of the second occurrence.
        line: u64,
        /// Where.
        place: String,
        /// The element's name.
        element: String,
    },
    /// A number is not a finite number: text, empty, NaN or infinite. An instrument
    /// export that wrote "NaN" or "-" for a saturated or missing reading ends up here.
    #[error("line {line}: {place}: <{element}> is {text:?}, not a finite number")]
    NotANumber {
        /// Line of the element.
        line: u64,
        /// Where.
        place: String,
        /// The element's name, e.g. `fluor` or `cq`.
        element: String,
        /// The text found (cut to 40 characters).
        text: String,
    },
    /// A cycle number (`<cyc>`) is not a whole number from 1 up (1 and 1.0 are fine,
    /// 1.5, 0 and -3 are not).
    #[error("line {line}: {place}: cycle {text:?} is not a whole number from 1 up")]
    BadCycle {
        /// Line of the `<cyc>` element.
        line: u64,
        /// Where.
        place: String,
        /// The text found (cut to 40 characters).
        text: String,
    },
    /// The same cycle appears twice in one amplification curve.
    #[error("line {line}: {place}: cycle {cycle} appears twice")]
    DuplicateCycle {
        /// Line where the data element ends.
        line: u64,
        /// Where, down to the target.
        place: String,
        /// The repeated cycle.
        cycle: u32,
    },
    /// An amplification curve lacks a cycle: it has a gap, or does not start at 1.
    #[error(
        "line {line}: {place}: cycle {cycle} is missing (the curve has {points} points, up to cycle {last})"
    )]
    MissingCycle {
        /// Line where the data element ends.
        line: u64,
        /// Where, down to the target.
        place: String,
        /// The first cycle missing.
        cycle: u32,
        /// How many points the curve has.
        points: usize,
        /// The highest cycle present.
        last: u32,
    },
    /// A reaction id is not a whole number from 1 up (or, in RDML 1.0, not a well
    /// label of the run's plate format).
    #[error("line {line}: {place}: reaction id {text:?} is not valid: {reason}")]
    BadReactionId {
        /// Line of the reaction.
        line: u64,
        /// Where: the run.
        place: String,
        /// The id as written (cut to 40 characters).
        text: String,
        /// Why it is refused.
        reason: String,
    },
    /// The plate format is not usable: rows or columns not a positive whole number,
    /// or a label other than ABC, 123 or A1a1.
    #[error("line {line}: {place}: plate format: {reason}")]
    BadPcrFormat {
        /// Line of the `<pcrFormat>` element.
        line: u64,
        /// Where: the run.
        place: String,
        /// What is wrong.
        reason: String,
    },
    /// Text where only elements may be, or an element inside a text-only element: the
    /// structure is not RDML's.
    #[error("line {line}: {place}: unexpected {what}")]
    Unexpected {
        /// Line where it was found.
        line: u64,
        /// Where.
        place: String,
        /// What was found.
        what: String,
    },
    /// An id is declared twice where it must be unique: two dyes, samples, targets or
    /// experiments with one id, two runs with one id in an experiment, two reactions
    /// with one id in a run, or two data for one target in a reaction.
    #[error("{place}: {kind} {id:?} appears twice")]
    DuplicateId {
        /// Where (the document, an experiment, a run, a reaction).
        place: String,
        /// What kind of thing: dye, sample, target, experiment, run, reaction.
        kind: &'static str,
        /// The repeated id.
        id: String,
    },
    /// A reaction refers to a sample that is not declared.
    #[error("{place}: sample {sample:?} is not declared")]
    UnknownSample {
        /// Where: the reaction.
        place: String,
        /// The sample id it refers to.
        sample: String,
    },
    /// A reaction's data refers to a target that is not declared.
    #[error("{place}: target {target:?} is not declared")]
    UnknownTarget {
        /// Where: the reaction.
        place: String,
        /// The target id it refers to.
        target: String,
    },
    /// A target refers to a dye that is not declared.
    #[error("{place}: dye {dye:?} is not declared")]
    UnknownDye {
        /// Where: the target.
        place: String,
        /// The dye id it refers to.
        dye: String,
    },
    /// A [`Document`] built by hand breaks a rule of RDML the reader enforces: an empty
    /// id, reaction id 0, a plate with no columns, a label other than ABC, 123 or A1a1.
    /// The reader never produces one.
    #[error("{place}: {reason}")]
    Invalid {
        /// Where.
        place: String,
        /// What is wrong.
        reason: String,
    },
    /// A number in a [`Document`] built by hand is NaN or infinite, which RDML cannot
    /// carry (the reader never produces one).
    #[error("{place}: {what} is {value}, not a finite number")]
    NotFinite {
        /// Where.
        place: String,
        /// Which value, e.g. `fluorescence at cycle 3`.
        what: String,
        /// The value.
        value: f64,
    },
}

/// Reads an RDML file: a zip archive holding `rdml_data.xml` (detected by the zip
/// signature `PK\x03\x04` or, for an empty archive, `PK\x05\x06`), or the plain XML.
///
/// The result has passed [`Document::validate`]. Never panics, whatever the bytes;
/// refuses XML larger than [`MAX_XML_BYTES`].
pub fn read(bytes: &[u8]) -> Result<Document, RdmlError> {
    read_with_limit(bytes, MAX_XML_BYTES)
}

/// [`read`] with another limit on the decompressed XML size, in bytes.
pub fn read_with_limit(bytes: &[u8], limit: u64) -> Result<Document, RdmlError> {
    let doc = if container::is_zip(bytes) {
        let xml = container::unzip_rdml_data(bytes, limit)?;
        parse::parse(&xml)?
    } else {
        if bytes.len() as u64 > limit {
            return Err(RdmlError::TooLarge { limit });
        }
        parse::parse(bytes)?
    };
    doc.validate()?;
    Ok(doc)
}

/// Writes `doc` as an RDML 1.3 file: a zip archive holding `rdml_data.xml`, elements in
/// the order of RDML_v1_3_REC.xsd, numbers in the shortest form that reads back to the
/// same `f64`. Deterministic: the same document gives the same bytes.
///
/// It does not check `doc`; a document that passes [`Document::validate`] and holds
/// values from the 1.3 enumerations (sample and target types, quantity units, Cq
/// methods, plate labels) gives a file valid against the 1.3 schema. A document read
/// from a file always passes `validate`.
pub fn write(doc: &Document) -> Vec<u8> {
    container::zip_rdml_data(&write_xml(doc))
}

/// [`write()`] without the zip: the `rdml_data.xml` text, RDML 1.3.
pub fn write_xml(doc: &Document) -> String {
    serialize::to_xml(doc)
}

impl Document {
    /// The dye with this id.
    pub fn dye(&self, id: &str) -> Option<&Dye> {
        self.dyes.iter().find(|d| d.id == id)
    }

    /// The sample with this id.
    pub fn sample(&self, id: &str) -> Option<&Sample> {
        self.samples.iter().find(|s| s.id == id)
    }

    /// The target with this id.
    pub fn target(&self, id: &str) -> Option<&Target> {
        self.targets.iter().find(|t| t.id == id)
    }

    /// The experiment with this id.
    pub fn experiment(&self, id: &str) -> Option<&Experiment> {
        self.experiments.iter().find(|e| e.id == id)
    }

    /// Samples by id, for lookups in a loop over many reactions.
    pub fn samples_by_id(&self) -> BTreeMap<&str, &Sample> {
        self.samples.iter().map(|s| (s.id.as_str(), s)).collect()
    }

    /// Targets by id, for lookups in a loop over many reactions.
    pub fn targets_by_id(&self) -> BTreeMap<&str, &Target> {
        self.targets.iter().map(|t| (t.id.as_str(), t)).collect()
    }

    /// Every reaction with its experiment and run, in file order.
    pub fn reactions(&self) -> impl Iterator<Item = (&Experiment, &Run, &Reaction)> {
        self.experiments.iter().flat_map(|e| {
            e.runs
                .iter()
                .flat_map(move |r| r.reactions.iter().map(move |re| (e, r, re)))
        })
    }

    /// Checks what the model promises: ids non-empty and unique where RDML requires it
    /// (dyes, samples, targets, experiments; runs within an experiment; reactions, from
    /// 1, within a run; targets within a reaction), every reference declared (target →
    /// dye, reaction → sample, data → target), plate formats the reader accepts, and
    /// every number finite. [`read`] calls it; call it before
    /// [`write()`] on a document built by hand.
    pub fn validate(&self) -> Result<(), RdmlError> {
        let dyes = unique("dye", "the document", self.dyes.iter().map(|d| &d.id))?;
        let samples = unique("sample", "the document", self.samples.iter().map(|s| &s.id))?;
        let targets = unique("target", "the document", self.targets.iter().map(|t| &t.id))?;
        unique(
            "experiment",
            "the document",
            self.experiments.iter().map(|e| &e.id),
        )?;
        for sample in &self.samples {
            if let Some(q) = &sample.quantity {
                finite(&format!("sample {:?}", sample.id), "quantity", q.value)?;
            }
        }
        for target in &self.targets {
            if !dyes.contains(target.dye_id.as_str()) {
                return Err(RdmlError::UnknownDye {
                    place: format!("target {:?}", target.id),
                    dye: target.dye_id.clone(),
                });
            }
        }
        let ids = self.dyes.iter().map(|d| ("dye", &d.id));
        let ids = ids.chain(self.samples.iter().map(|s| ("sample", &s.id)));
        let ids = ids.chain(self.targets.iter().map(|t| ("target", &t.id)));
        let ids = ids.chain(self.experiments.iter().map(|e| ("experiment", &e.id)));
        let runs = self.experiments.iter().flat_map(|e| &e.runs);
        if let Some((kind, _)) = ids
            .chain(runs.map(|r| ("run", &r.id)))
            .find(|(_, id)| id.is_empty())
        {
            return Err(invalid("the document", format!("a {kind} has an empty id")));
        }
        for experiment in &self.experiments {
            let place = format!("experiment {:?}", experiment.id);
            unique("run", &place, experiment.runs.iter().map(|r| &r.id))?;
            for run in &experiment.runs {
                let place = format!("{place} run {:?}", run.id);
                run.format
                    .check()
                    .map_err(|reason| invalid(&place, reason))?;
                let mut ids = BTreeSet::new();
                for reaction in &run.reactions {
                    if reaction.id == 0 {
                        return Err(invalid(&place, "reaction id 0 (ids count from 1)".into()));
                    }
                    if !ids.insert(reaction.id) {
                        return Err(RdmlError::DuplicateId {
                            place,
                            kind: "reaction",
                            id: reaction.id.to_string(),
                        });
                    }
                    let place = format!("{place} reaction {}", reaction.id);
                    if !samples.contains(reaction.sample_id.as_str()) {
                        return Err(RdmlError::UnknownSample {
                            place,
                            sample: reaction.sample_id.clone(),
                        });
                    }
                    unique("target", &place, reaction.data.iter().map(|d| &d.target_id))?;
                    for data in &reaction.data {
                        if !targets.contains(data.target_id.as_str()) {
                            return Err(RdmlError::UnknownTarget {
                                place,
                                target: data.target_id.clone(),
                            });
                        }
                        data.check_finite(&format!("{place} target {:?}", data.target_id))?;
                    }
                }
            }
        }
        Ok(())
    }
}

impl Experiment {
    /// The run with this id.
    pub fn run(&self, id: &str) -> Option<&Run> {
        self.runs.iter().find(|r| r.id == id)
    }
}

impl Run {
    /// The reaction with this id.
    pub fn reaction(&self, id: u32) -> Option<&Reaction> {
        self.reactions.iter().find(|r| r.id == id)
    }
}

impl Reaction {
    /// The data for this target.
    pub fn data_for(&self, target_id: &str) -> Option<&ReactionData> {
        self.data.iter().find(|d| d.target_id == target_id)
    }
}

impl ReactionData {
    fn check_finite(&self, place: &str) -> Result<(), RdmlError> {
        let singles = [
            ("cq", self.cq),
            ("threshold", self.threshold),
            ("background", self.background),
            ("background slope", self.background_slope),
        ];
        for (what, value) in singles {
            if let Some(value) = value {
                finite(place, what, value)?;
            }
        }
        for (i, &value) in self.fluorescence.iter().enumerate() {
            finite(place, &format!("fluorescence at cycle {}", i + 1), value)?;
        }
        Ok(())
    }
}

impl PcrFormat {
    /// The usual 96-well plate: 8 rows A–H, 12 columns.
    pub fn plate_96() -> Self {
        Self::plate(8, 12)
    }

    /// The usual 384-well plate: 16 rows A–P, 24 columns.
    pub fn plate_384() -> Self {
        Self::plate(16, 24)
    }

    fn plate(rows: u32, columns: u32) -> Self {
        PcrFormat {
            rows,
            columns,
            row_label: "ABC".to_owned(),
            column_label: "123".to_owned(),
        }
    }

    /// What the reader requires of a plate format: at least one column, rows and
    /// columns within RDML's `xs:int`, labels ABC, 123 or A1a1.
    fn check(&self) -> Result<(), String> {
        if self.columns == 0 {
            return Err("plate format: 0 columns".into());
        }
        if self.rows > i32::MAX as u32 || self.columns > i32::MAX as u32 {
            return Err("plate format: more rows or columns than RDML can carry".into());
        }
        for label in [&self.row_label, &self.column_label] {
            if !LABELS.contains(&label.as_str()) {
                return Err(format!(
                    "plate format: label {:?} is not ABC, 123 or A1a1",
                    crate::echo(label)
                ));
            }
        }
        Ok(())
    }

    /// Whether this is RDML's free format (a list of reactions, no plate).
    pub fn is_free_format(&self) -> bool {
        self.rows == 0
    }

    /// The well label of a reaction id. Ids count row by row from 1 (RDML_v1_3_REC.xsd,
    /// `reactType/@id`): on a 96-well plate 1 = A1, 12 = A12, 13 = B1, 15 = B3; on a
    /// 384-well plate 326 = N14.
    ///
    /// Row labels "ABC" are letters (A…Z, then AA, AB… for 1536 wells); "123" are
    /// numbers; with one column only the row is given (a rotor place). Two numeric
    /// labels are joined by '-' ("2-3"). "A1a1" is the 3072-well array label, block
    /// letter and number then position letter and number (1 = A1a1, 3072 = D12h8).
    ///
    /// `None` when the id is 0 or beyond the plate, or the labels are not RDML's. For
    /// the free format the label is the id itself.
    pub fn well_label(&self, react_id: u32) -> Option<String> {
        if react_id == 0 || self.columns == 0 {
            return None;
        }
        if self.is_free_format() {
            return Some(react_id.to_string());
        }
        if u64::from(react_id) > u64::from(self.rows) * u64::from(self.columns) {
            return None;
        }
        let index = react_id - 1;
        let row = index / self.columns;
        let column = index % self.columns;
        if self.row_label == "A1a1" || self.column_label == "A1a1" {
            // RDML 1.0 "3072-well plate; A1a1-D12h8": 4 × 12 blocks of 8 × 8 positions
            // (rdmlpython migrate_version_1_0_to_1_1).
            if self.row_label != "A1a1" || self.column_label != "A1a1" {
                return None;
            }
            let block_row = char::from(b'A' + u8::try_from(row / 8).ok().filter(|r| *r < 26)?);
            let pos_row = char::from(b'a' + u8::try_from(row % 8).ok()?);
            return Some(format!(
                "{block_row}{}{pos_row}{}",
                column / 8 + 1,
                column % 8 + 1
            ));
        }
        let row_part = match self.row_label.as_str() {
            "ABC" => letters(row),
            "123" => (row + 1).to_string(),
            _ => return None,
        };
        if self.columns == 1 {
            return Some(row_part);
        }
        let column_part = match self.column_label.as_str() {
            "ABC" => letters(column),
            "123" => (column + 1).to_string(),
            _ => return None,
        };
        let separator = if self.row_label == "123" && self.column_label == "123" {
            "-"
        } else {
            ""
        };
        Some(format!("{row_part}{separator}{column_part}"))
    }
}

/// Spreadsheet-style letters for a 0-based index: 0 = A, 25 = Z, 26 = AA.
fn letters(index: u32) -> String {
    let mut n = u64::from(index) + 1;
    let mut out = Vec::new();
    while n > 0 {
        n -= 1;
        // n % 26 < 26, so the cast cannot truncate.
        out.push(b'A' + (n % 26) as u8);
        n /= 26;
    }
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}

/// Checks that the ids are unique; returns them as a set.
fn unique<'a>(
    kind: &'static str,
    place: &str,
    ids: impl Iterator<Item = &'a String>,
) -> Result<BTreeSet<&'a str>, RdmlError> {
    let mut seen = BTreeSet::new();
    for id in ids {
        if !seen.insert(id.as_str()) {
            return Err(RdmlError::DuplicateId {
                place: place.to_owned(),
                kind,
                id: id.clone(),
            });
        }
    }
    Ok(seen)
}

fn invalid(place: &str, reason: String) -> RdmlError {
    RdmlError::Invalid {
        place: place.to_owned(),
        reason,
    }
}

fn finite(place: &str, what: &str, value: f64) -> Result<(), RdmlError> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(RdmlError::NotFinite {
            place: place.to_owned(),
            what: what.to_owned(),
            value,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_labels_count_row_by_row() {
        let p96 = PcrFormat::plate_96();
        assert_eq!(p96.well_label(1).as_deref(), Some("A1"));
        assert_eq!(p96.well_label(12).as_deref(), Some("A12"));
        assert_eq!(p96.well_label(15).as_deref(), Some("B3"));
        assert_eq!(p96.well_label(96).as_deref(), Some("H12"));
        assert_eq!(p96.well_label(97), None);
        assert_eq!(p96.well_label(0), None);
        let p384 = PcrFormat::plate_384();
        assert_eq!(p384.well_label(326).as_deref(), Some("N14"));
        assert_eq!(p384.well_label(384).as_deref(), Some("P24"));
        let p1536 = PcrFormat::plate(32, 48);
        assert_eq!(p1536.well_label(26 * 48 + 1).as_deref(), Some("AA1"));
        assert_eq!(p1536.well_label(1536).as_deref(), Some("AF48"));
        let rotor = PcrFormat {
            rows: 72,
            columns: 1,
            row_label: "123".into(),
            column_label: "123".into(),
        };
        assert_eq!(rotor.well_label(5).as_deref(), Some("5"));
        let array = PcrFormat {
            rows: 32,
            columns: 96,
            row_label: "A1a1".into(),
            column_label: "A1a1".into(),
        };
        assert_eq!(array.well_label(1).as_deref(), Some("A1a1"));
        assert_eq!(array.well_label(3072).as_deref(), Some("D12h8"));
        let free = PcrFormat {
            rows: 0,
            columns: 1,
            row_label: "123".into(),
            column_label: "123".into(),
        };
        assert_eq!(free.well_label(1234).as_deref(), Some("1234"));
    }

    #[test]
    fn letters_are_bijective_base_26() {
        assert_eq!(letters(0), "A");
        assert_eq!(letters(25), "Z");
        assert_eq!(letters(26), "AA");
        assert_eq!(letters(27), "AB");
        assert_eq!(letters(26 + 26 * 26), "AAA");
        assert_eq!(letters(u32::MAX).len(), 7);
    }
}
