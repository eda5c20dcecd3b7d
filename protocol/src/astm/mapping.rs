//! Mapping profiles (issue 8): how one analyser model's results messages become
//! per-specimen readings of a pcrd kit's targets. Pure: TOML text and a parsed
//! [`Message`] in, readings and the reasons for anything left unmatched out.
//!
//! An analyser reports, per specimen (O record), R records whose universal test id
//! (R.3) names the manufacturer's test code (component 4), then vendor components:
//! the analyte (component 5 by default) and the kind of value (component 6 by
//! default, e.g. `Ct`). A profile says, per test code:
//!
//! - which pcrd kit the assay is, and which analyte code is which kit target;
//! - which R record carries a target's Ct (its analyte and value kind) and, if the
//!   analyser sends one, a per-target call (another value kind);
//! - which R record carries the assay's overall call (by default the one with no
//!   analyte component) and what its values mean (`POS` → detected…);
//! - whether pcrd re-interprets the Cts with the kit's rules (`call_source = "kit"`)
//!   or keeps the instrument's call (`call_source = "instrument"`).
//!
//! Nothing is dropped: an order whose test code the profile does not know, an R
//! record whose analyte it does not know, a value that is not a number, or a call
//! value outside the vocabulary is returned as an [`Unmatched`] item with its reason.
//!
//! What this module does NOT do: look tubes up or interpret (the daemon does, with
//! the kit), or read personal data (P records are not looked at).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::record::{Message, Record, RecordType};
use crate::analysis::Ct;
use crate::interpret::Call;
use crate::kit::KitDefinition;

/// Largest profile file accepted (a profile is a few dozen lines).
pub const MAX_PROFILE_BYTES: usize = 256 * 1024;

/// Where the call of a specimen comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallSource {
    /// pcrd interprets the mapped Cts with the kit's rules.
    Kit,
    /// The analyser's own call is kept (its meaning from `call_values`); the Cts are
    /// still reported.
    Instrument,
}

/// One analyser model's mapping.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingProfile {
    /// The analyser model (e.g. `SIM-AN01`).
    pub model: String,
    /// The profile's version; results record `model@version`.
    pub version: String,
    /// Free text for the operator.
    #[serde(default)]
    pub description: String,
    /// The tests (assays) the analyser reports.
    pub tests: Vec<TestMapping>,
}

/// One assay: a manufacturer test code and the kit it is.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestMapping {
    /// The manufacturer's test code (O.5 / R.3 component 4), e.g. `SARS2`.
    pub code: String,
    /// The pcrd kit (`id` or `id@version`).
    pub kit: String,
    /// Who makes the call.
    pub call_source: CallSource,
    /// Component of R.3 holding the analyte code (1-based; default 5).
    #[serde(default = "default_analyte_component")]
    pub analyte_component: usize,
    /// Component of R.3 holding the kind of value (1-based; default 6).
    #[serde(default = "default_kind_component")]
    pub kind_component: usize,
    /// Field of the R record holding the value (1-based; default 4, R.4).
    #[serde(default = "default_value_field")]
    pub value_field: usize,
    /// Values meaning "no Ct" (besides the empty value), e.g. `UNDET`, `-1`? (no:
    /// only text markers; a number is always a Ct or an error).
    #[serde(default)]
    pub undetermined: Vec<String>,
    /// The R record with the assay's overall call.
    #[serde(default)]
    pub assay_call: AssayCall,
    /// What the analyser's call values mean (exact match; case sensitive).
    #[serde(default)]
    pub call_values: BTreeMap<String, Call>,
    /// Analyte code -> kit target.
    pub targets: Vec<TargetMapping>,
}

fn default_analyte_component() -> usize {
    5
}
fn default_kind_component() -> usize {
    6
}
fn default_value_field() -> usize {
    4
}

/// How the R record with the assay's overall call is recognised.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssayCall {
    /// Its analyte component ("" = none, the usual).
    #[serde(default)]
    pub analyte: String,
    /// Its value-kind component ("" = none).
    #[serde(default)]
    pub kind: String,
}

/// One analyte of the assay.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetMapping {
    /// The analyser's analyte code (R.3 component `analyte_component`).
    pub analyte: String,
    /// The kit's target name.
    pub target: String,
    /// Value kind of the R record carrying the Ct (default `Ct`).
    #[serde(default = "default_ct_kind")]
    pub ct: String,
    /// Value kind of an R record carrying this target's own call, if the analyser
    /// sends one (kept with the result, never used for the call).
    #[serde(default)]
    pub call: Option<String>,
    /// Value kinds the analyser also sends for this analyte that pcrd does not use
    /// (e.g. `EndPt`): accepted and ignored rather than listed as unmatched.
    #[serde(default)]
    pub ignore: Vec<String>,
}

fn default_ct_kind() -> String {
    "Ct".into()
}

/// Why a profile was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProfileError {
    /// Not valid TOML, or a key missing or unknown.
    #[error("mapping profile is not valid: {0}")]
    Syntax(String),
    /// Larger than [`MAX_PROFILE_BYTES`].
    #[error("mapping profile is larger than {MAX_PROFILE_BYTES} bytes")]
    TooLarge,
    /// Valid TOML that does not make sense; every problem is listed.
    #[error("mapping profile {model}: {}", problems.join("; "))]
    Invalid {
        /// The model named.
        model: String,
        /// Each problem.
        problems: Vec<String>,
    },
}

impl MappingProfile {
    /// Parses and checks a profile on its own (kits are checked by [`Self::validate`]).
    pub fn from_toml_str(text: &str) -> Result<MappingProfile, ProfileError> {
        if text.len() > MAX_PROFILE_BYTES {
            return Err(ProfileError::TooLarge);
        }
        let profile: MappingProfile =
            toml::from_str(text).map_err(|e| ProfileError::Syntax(e.to_string()))?;
        let mut problems = Vec::new();
        if profile.model.trim().is_empty() {
            problems.push("model must not be empty".to_owned());
        }
        if profile.version.trim().is_empty() {
            problems.push("version must not be empty".to_owned());
        }
        if profile.tests.is_empty() {
            problems.push("no [[tests]]".to_owned());
        }
        let mut codes = BTreeSet::new();
        for (i, t) in profile.tests.iter().enumerate() {
            let at = format!("tests[{i}] ({:?})", t.code);
            if t.code.is_empty() {
                problems.push(format!("{at}: code must not be empty"));
            }
            if !codes.insert(t.code.as_str()) {
                problems.push(format!("{at}: test code appears twice"));
            }
            for (name, n) in [
                ("analyte_component", t.analyte_component),
                ("kind_component", t.kind_component),
            ] {
                if !(5..=16).contains(&n) {
                    problems.push(format!(
                        "{at}: {name} {n} is outside 5..=16 (components 1-4 are the universal id and test code)"
                    ));
                }
            }
            if t.analyte_component == t.kind_component {
                problems.push(format!(
                    "{at}: analyte_component and kind_component are the same"
                ));
            }
            if !(3..=14).contains(&t.value_field) || t.value_field == 3 {
                problems.push(format!(
                    "{at}: value_field {} is not an R-record value field (4..=14)",
                    t.value_field
                ));
            }
            if t.call_source == CallSource::Instrument && t.call_values.is_empty() {
                problems.push(format!(
                    "{at}: call_source = \"instrument\" needs call_values (what POS, NEG… mean)"
                ));
            }
            if t.targets.is_empty() {
                problems.push(format!("{at}: no [[tests.targets]]"));
            }
            let mut analytes = BTreeSet::new();
            let mut targets = BTreeSet::new();
            for m in &t.targets {
                if m.analyte.is_empty() {
                    problems.push(format!("{at}: a target has an empty analyte code"));
                }
                if m.analyte == t.assay_call.analyte {
                    problems.push(format!(
                        "{at}: analyte {:?} is also the assay call's analyte",
                        m.analyte
                    ));
                }
                if !analytes.insert(m.analyte.as_str()) {
                    problems.push(format!("{at}: analyte {:?} mapped twice", m.analyte));
                }
                if !targets.insert(m.target.as_str()) {
                    problems.push(format!("{at}: target {:?} mapped twice", m.target));
                }
                if m.call.as_deref() == Some(m.ct.as_str()) {
                    problems.push(format!(
                        "{at}: analyte {:?}: ct and call are the same value kind",
                        m.analyte
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok(profile)
        } else {
            Err(ProfileError::Invalid {
                model: profile.model,
                problems,
            })
        }
    }

    /// `model@version`, as results record it.
    pub fn key(&self) -> String {
        format!("{}@{}", self.model, self.version)
    }

    /// Checks the profile against the kits: every kit named must exist
    /// (`find` looks one up by `id` or `id@version`), every target mapped must be one
    /// of its targets, and (for `call_source = "kit"`) every kit target must be
    /// mapped, since interpretation needs all of them. Returns every problem.
    pub fn validate<'k>(
        &self,
        find: impl Fn(&str) -> Option<&'k KitDefinition>,
    ) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        for t in &self.tests {
            let at = format!("test {:?}", t.code);
            let Some(kit) = find(&t.kit) else {
                problems.push(format!("{at}: unknown kit {:?}", t.kit));
                continue;
            };
            for m in &t.targets {
                if kit.target(&m.target).is_none() {
                    let known: Vec<&str> = kit.targets().iter().map(|x| x.name.as_str()).collect();
                    problems.push(format!(
                        "{at}: kit {} has no target {:?} (its targets: {})",
                        kit.key(),
                        m.target,
                        known.join(", ")
                    ));
                }
            }
            if t.call_source == CallSource::Kit {
                for target in kit.targets() {
                    if !t.targets.iter().any(|m| m.target == target.name) {
                        problems.push(format!(
                            "{at}: kit {} target {:?} has no analyte mapped; the kit cannot interpret without it",
                            kit.key(),
                            target.name
                        ));
                    }
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// The mapping for a test code.
    pub fn test(&self, code: &str) -> Option<&TestMapping> {
        self.tests.iter().find(|t| t.code == code)
    }

    /// Applies the profile to a message: one [`SpecimenReading`] per order whose test
    /// code is known and whose records all map, one [`Unmatched`] item for anything
    /// else (never dropped). An order with no results (e.g. a pending order echoed
    /// back) is neither.
    pub fn apply(&self, message: &Message) -> Mapped {
        let mut out = Mapped::default();
        for (index, (order, results)) in order_groups(message).into_iter().enumerate() {
            let specimen_id = order.field(3).value().to_owned();
            if results.is_empty() {
                continue;
            }
            let order_code = order.field(5).component(1, 4).to_owned();
            let unmatched =
                |test_code: &str, analyte: &str, reason: String, values: Vec<String>| Unmatched {
                    order_index: index,
                    specimen_id: specimen_id.clone(),
                    test_code: test_code.to_owned(),
                    analyte: analyte.to_owned(),
                    reason,
                    values,
                };
            // All R records of one order are of one test, the order's; an R record
            // naming another code is reported as unmatched on its own.
            let Some(test) = self.test(&order_code) else {
                out.unmatched.push(unmatched(
                    &order_code,
                    "",
                    format!(
                        "unknown test code {:?} (profile {} knows {})",
                        order_code,
                        self.key(),
                        self.tests
                            .iter()
                            .map(|t| t.code.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    results.iter().map(|r| describe(r, 4)).collect(),
                ));
                continue;
            };
            let mut reading = SpecimenReading {
                order_index: index,
                specimen_id: specimen_id.clone(),
                test_code: test.code.clone(),
                kit: test.kit.clone(),
                call_source: test.call_source,
                instrument_call: None,
                targets: BTreeMap::new(),
            };
            let mut problems = Vec::new();
            // Analytes the order is refused over, for the technician's list.
            let mut odd: Vec<String> = Vec::new();
            for record in &results {
                let field = record.field(3);
                let code = field.component(1, 4);
                let analyte = field.component(1, test.analyte_component);
                let kind = field.component(1, test.kind_component);
                let value = record.field(test.value_field).value().trim().to_owned();
                if code != test.code {
                    problems.push(format!(
                        "R record of test {code:?} under an order of test {:?}",
                        test.code
                    ));
                    continue;
                }
                if analyte == test.assay_call.analyte && kind == test.assay_call.kind {
                    let meaning = test.call_values.get(&value).copied();
                    if meaning.is_none() && test.call_source == CallSource::Instrument {
                        problems.push(format!(
                            "assay call {value:?} is not in the profile's call_values"
                        ));
                    }
                    reading.instrument_call = Some(InstrumentCall { value, meaning });
                    continue;
                }
                // An order with anything the profile does not know makes no reading
                // at all: a result built from the part understood could be wrong.
                let Some(m) = test.targets.iter().find(|m| m.analyte == analyte) else {
                    problems.push(format!("unknown analyte {analyte:?} for test {code:?}"));
                    odd.push(analyte.to_owned());
                    continue;
                };
                let slot =
                    reading
                        .targets
                        .entry(m.target.clone())
                        .or_insert_with(|| TargetReading {
                            analyte: m.analyte.clone(),
                            ct: None,
                            call: None,
                        });
                if kind == m.ct {
                    if slot.ct.is_some() {
                        problems.push(format!("two Ct records for analyte {analyte:?}"));
                        odd.push(analyte.to_owned());
                    }
                    match parse_ct(&value, &test.undetermined) {
                        Ok(ct) => slot.ct = Some(ct),
                        Err(reason) => {
                            problems.push(format!("analyte {analyte:?}: {reason}"));
                            odd.push(analyte.to_owned());
                        }
                    }
                } else if m.call.as_deref() == Some(kind) {
                    slot.call = Some(value);
                } else if !m.ignore.iter().any(|k| k == kind) {
                    problems.push(format!(
                        "unknown value kind {kind:?} for analyte {analyte:?}"
                    ));
                    odd.push(analyte.to_owned());
                }
            }
            for m in &test.targets {
                let missing = reading
                    .targets
                    .get(&m.target)
                    .is_none_or(|t| t.ct.is_none());
                if missing && !odd.contains(&m.analyte) {
                    problems.push(format!("analyte {:?} has no Ct record", m.analyte));
                    odd.push(m.analyte.clone());
                }
            }
            if test.call_source == CallSource::Instrument && reading.instrument_call.is_none() {
                problems.push(
                    "no assay call record, and the profile keeps the instrument's call".into(),
                );
            }
            if problems.is_empty() {
                out.readings.push(reading);
            } else {
                odd.dedup();
                out.unmatched.push(unmatched(
                    &test.code,
                    &odd.join(","),
                    problems.join("; "),
                    results
                        .iter()
                        .map(|r| describe(r, test.value_field))
                        .collect(),
                ));
            }
        }
        out
    }
}

/// Every O record with the R records that follow it (up to the next O, P, Q or L;
/// C, M and S records in between are skipped), as [`Message::orders`] groups them.
fn order_groups(message: &Message) -> Vec<(&Record, Vec<&Record>)> {
    let mut out: Vec<(&Record, Vec<&Record>)> = Vec::new();
    let mut open = false;
    for record in &message.records {
        match record.kind {
            RecordType::Order => {
                out.push((record, Vec::new()));
                open = true;
            }
            RecordType::Result => {
                if let (true, Some(last)) = (open, out.last_mut()) {
                    last.1.push(record);
                }
            }
            RecordType::Comment | RecordType::Manufacturer | RecordType::Scientific => {}
            _ => open = false,
        }
    }
    out
}

/// `test id = value` of an R record, for the technician.
fn describe(record: &Record, value_field: usize) -> String {
    let id: Vec<&str> = record
        .field(3)
        .repeats
        .first()
        .map(|c| c.iter().map(String::as_str).collect())
        .unwrap_or_default();
    format!("{} = {:?}", id.join("^"), record.field(value_field).value())
}

/// A Ct as the analyser wrote it: empty or an undetermined marker → undetermined; a
/// positive finite number → that cycle; anything else is refused.
pub fn parse_ct(value: &str, undetermined: &[String]) -> Result<Ct, String> {
    let value = value.trim();
    if value.is_empty() || undetermined.iter().any(|u| u == value) {
        return Ok(Ct::Undetermined);
    }
    let number: f64 = value
        .parse()
        .map_err(|_| format!("Ct {value:?} is not a number or an undetermined marker"))?;
    Ct::try_from(Some(number)).map_err(|e| format!("Ct {value:?}: {e}"))
}

/// What a message yields under a profile.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Mapped {
    /// Specimens whose results all mapped.
    pub readings: Vec<SpecimenReading>,
    /// Everything else, with why.
    pub unmatched: Vec<Unmatched>,
}

/// One specimen's mapped results.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecimenReading {
    /// Index of the order in the message (0-based).
    pub order_index: usize,
    /// O.3, the tube barcode if the analyser read it.
    pub specimen_id: String,
    /// The test code.
    pub test_code: String,
    /// The kit as the profile names it.
    pub kit: String,
    /// Who makes the call.
    pub call_source: CallSource,
    /// The analyser's overall call, if it sent one.
    pub instrument_call: Option<InstrumentCall>,
    /// Kit target -> reading.
    pub targets: BTreeMap<String, TargetReading>,
}

/// The analyser's call as sent and what the profile says it means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstrumentCall {
    /// As sent.
    pub value: String,
    /// Its meaning, if the vocabulary has it.
    pub meaning: Option<Call>,
}

/// One target's reading.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetReading {
    /// The analyser's analyte code.
    pub analyte: String,
    /// The Ct (always present in a returned reading).
    pub ct: Option<Ct>,
    /// The analyser's per-target call, as sent, if any.
    pub call: Option<String>,
}

/// Something in a message that did not map, kept for the technician.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unmatched {
    /// Index of the order in the message.
    pub order_index: usize,
    /// O.3.
    pub specimen_id: String,
    /// The test code concerned.
    pub test_code: String,
    /// The analyte concerned ("" for the whole order).
    pub analyte: String,
    /// Why.
    pub reason: String,
    /// The records concerned, `test id = value`.
    pub values: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROFILE: &str = include_str!("../../../analysers/sim-an01.toml");
    const KIT: &str = include_str!("../../../kits/sarscov2-orf1ab-n-ic.toml");

    fn message(text: &str) -> Message {
        Message::parse(text.replace('\n', "\r").as_bytes()).unwrap()
    }

    #[test]
    fn the_shipped_profile_loads_and_matches_the_kit() {
        let profile = MappingProfile::from_toml_str(PROFILE).unwrap();
        let kit = KitDefinition::from_toml_str(KIT).unwrap();
        profile
            .validate(|id| (id == "sarscov2-orf1ab-n-ic").then_some(&kit))
            .unwrap();
        let err = profile.validate(|_| None).unwrap_err();
        assert!(err[0].contains("unknown kit"), "{err:?}");
    }

    #[test]
    fn unknown_targets_and_unmapped_kit_targets_are_named() {
        let kit = KitDefinition::from_toml_str(KIT).unwrap();
        let text = PROFILE.replace("target = \"N\"", "target = \"N9\"");
        let profile = MappingProfile::from_toml_str(&text).unwrap();
        let problems = profile.validate(|_| Some(&kit)).unwrap_err();
        assert!(
            problems.iter().any(|p| p.contains("no target \"N9\"")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("target \"N\" has no analyte")),
            "{problems:?}"
        );
        for bad in [
            PROFILE.replace("model = \"SIM-AN01\"", "model = \"\""),
            PROFILE.replace("analyte = \"N\"", "analyte = \"ORF1ab\""),
            format!("{PROFILE}\nbogus = 1\n"),
        ] {
            assert!(MappingProfile::from_toml_str(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn results_map_to_targets_and_the_rest_is_unmatched() {
        let profile = MappingProfile::from_toml_str(PROFILE).unwrap();
        let m = message(
            "H|\\^&|||SIM-AN01\n\
             P|1\nO|1|T-0001||^^^SARS2|R\n\
             R|1|^^^SARS2|POS|||A||F\n\
             R|2|^^^SARS2^ORF1ab^Ct|24.61|||||F\n\
             R|3|^^^SARS2^N^Ct|26.02|||||F\n\
             R|4|^^^SARS2^IC^Ct|28.40|||||F\n\
             P|2\nO|1|T-0002||^^^FLUAB|R\nR|1|^^^FLUAB|NEG\n\
             P|3\nO|1|T-0003||^^^SARS2|R\nR|1|^^^SARS2|NEG\nR|2|^^^SARS2^ORF1ab^Ct|\nR|3|^^^SARS2^N^Ct|\nR|4|^^^SARS2^IC^Ct|27.9\nR|5|^^^SARS2^RdRP^Ct|31\n\
             P|4\nO|1|T-0004||^^^SARS2|R\nR|1|^^^SARS2|NEG\nR|2|^^^SARS2^ORF1ab^Ct|n/a\nR|3|^^^SARS2^N^Ct|\nR|4|^^^SARS2^IC^Ct|27.9\n\
             L|1|N\n",
        );
        let mapped = profile.apply(&m);
        // T-0003 has an analyte the profile does not know: no reading at all.
        assert_eq!(mapped.readings.len(), 1);
        let first = &mapped.readings[0];
        assert_eq!(first.specimen_id, "T-0001");
        assert_eq!(
            first.instrument_call.as_ref().unwrap().meaning,
            Some(Call::Detected)
        );
        assert_eq!(first.targets["ORF1ab"].ct, Some(Ct::Determined(24.61)));
        assert_eq!(first.targets["IC"].ct, Some(Ct::Determined(28.4)));
        let reasons: Vec<(&str, &str)> = mapped
            .unmatched
            .iter()
            .map(|u| (u.specimen_id.as_str(), u.reason.as_str()))
            .collect();
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert!(reasons[0].0 == "T-0002" && reasons[0].1.contains("unknown test code \"FLUAB\""));
        assert!(reasons[1].0 == "T-0003" && reasons[1].1.contains("unknown analyte \"RdRP\""));
        assert!(reasons[2].0 == "T-0004" && reasons[2].1.contains("\"n/a\" is not a number"));
    }

    /// What the mapping makes of a message, one line each, for the golden files.
    fn render(mapped: &Mapped) -> Vec<String> {
        let mut out = Vec::new();
        for r in &mapped.readings {
            let call = r.instrument_call.as_ref().map_or("-".to_owned(), |c| {
                format!(
                    "{}({})",
                    c.value,
                    c.meaning.map_or("?".to_owned(), |m| m.to_string())
                )
            });
            let targets: Vec<String> = r
                .targets
                .iter()
                .map(|(t, v)| {
                    let ct = v.ct.map_or("-".to_owned(), |c| c.to_string());
                    format!("{t}<-{}={ct}", v.analyte)
                })
                .collect();
            out.push(format!(
                "= reading order={} specimen={} test={} kit={} source={:?} call={} {}",
                r.order_index,
                r.specimen_id,
                r.test_code,
                r.kit,
                r.call_source,
                call,
                targets.join(" ")
            ));
        }
        for u in &mapped.unmatched {
            out.push(format!(
                "= unmatched order={} specimen={} test={} analyte={} reason={} values=[{}]",
                u.order_index,
                u.specimen_id,
                u.test_code,
                u.analyte,
                u.reason,
                u.values.join("; ")
            ));
        }
        out
    }

    /// Golden transcripts in `testdata/astm/`: `>` lines are the message's records,
    /// `=` lines what the shipped profile makes of them (written by this harness;
    /// `PCRD_BLESS=1` rewrites them, then review the diff).
    #[test]
    fn golden_mapping_transcripts() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/astm");
        let profile = MappingProfile::from_toml_str(PROFILE).unwrap();
        let mut seen = 0;
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "txt"))
            .collect();
        entries.sort();
        for path in entries {
            let text = std::fs::read_to_string(&path).unwrap();
            let kept: Vec<&str> = text.lines().filter(|l| !l.starts_with("= ")).collect();
            let records: Vec<&str> = kept.iter().filter_map(|l| l.strip_prefix("> ")).collect();
            let message = Message::parse(records.join("\r").as_bytes())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let mut expected = kept.join("\n");
            expected.push('\n');
            for line in render(&profile.apply(&message)) {
                expected.push_str(&line);
                expected.push('\n');
            }
            if std::env::var_os("PCRD_BLESS").is_some() {
                std::fs::write(&path, &expected).unwrap();
            } else {
                assert_eq!(text, expected, "{} differs", path.display());
            }
            seen += 1;
        }
        assert!(seen >= 3, "golden files missing in {}", dir.display());
    }

    proptest::proptest! {
        /// Whatever a parsed message holds, applying the profile never panics, and
        /// every order with results is accounted for: a reading or an unmatched item.
        #[test]
        fn any_message_maps_without_panic_and_nothing_is_dropped(
            records in proptest::collection::vec(
                (
                    proptest::sample::select(vec!["O", "R", "R", "R", "C", "P"]),
                    proptest::sample::select(vec!["SARS2", "FLUAB", ""]),
                    proptest::sample::select(vec!["", "ORF1ab", "N", "IC", "RdRP"]),
                    proptest::sample::select(vec!["", "Ct", "EndPt"]),
                    "[ -~]{0,8}",
                ),
                0..40,
            )
        ) {
            let profile = MappingProfile::from_toml_str(PROFILE).unwrap();
            let mut text = String::from("H|\\^&\r");
            let mut open = false;
            for (kind, code, analyte, value_kind, value) in &records {
                let value: String = value.chars().filter(|c| !"|\\^&".contains(*c)).collect();
                match *kind {
                    "O" => { text.push_str(&format!("O|1|T-1||^^^{code}\r")); open = true; }
                    "R" if open => text.push_str(&format!("R|1|^^^{code}^{analyte}^{value_kind}|{value}\r")),
                    "C" if open => text.push_str("C|1|I|note\r"),
                    "P" => { text.push_str("P|1\r"); open = false; }
                    _ => {}
                }
            }
            text.push_str("L|1|N\r");
            let Ok(message) = Message::parse(text.as_bytes()) else {
                return Ok(());
            };
            let mapped = profile.apply(&message);
            let with_results = order_groups(&message)
                .iter()
                .filter(|(_, results)| !results.is_empty())
                .count();
            let mut orders: Vec<usize> = mapped
                .readings
                .iter()
                .map(|r| r.order_index)
                .chain(mapped.unmatched.iter().map(|u| u.order_index))
                .collect();
            orders.sort_unstable();
            orders.dedup();
            proptest::prop_assert_eq!(orders.len(), with_results);
            for r in &mapped.readings {
                proptest::prop_assert_eq!(r.targets.len(), 3);
                proptest::prop_assert!(r.targets.values().all(|t| t.ct.is_some()));
            }
        }
    }

    #[test]
    fn cts_are_numbers_or_undetermined_never_sentinels() {
        let none: Vec<String> = vec!["UNDET".into()];
        assert_eq!(parse_ct("", &none), Ok(Ct::Undetermined));
        assert_eq!(parse_ct("UNDET", &none), Ok(Ct::Undetermined));
        assert_eq!(parse_ct(" 31.5 ", &none), Ok(Ct::Determined(31.5)));
        assert!(parse_ct("0", &none).is_err());
        assert!(parse_ct("-1", &none).is_err());
        assert!(parse_ct("NaN", &none).is_err());
        assert!(parse_ct("inf", &none).is_err());
    }
}
