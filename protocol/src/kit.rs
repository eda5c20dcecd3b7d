//! Kit definitions: a PCR kit as data. Which controls it puts where per
//! plate format, its targets (channel, cut-off, grey zone, LOINC code), the
//! decision table that turns target states into a call, what each run
//! control must show, and the largest pool it accepts. [`crate::interpret`]
//! applies them.
//!
//! Kits are shipped as TOML files (see `kits/` in the repository) and parsed
//! here from text the caller has read. A new kit needs no code. In brief:
//!
//! ```toml
//! id = "sarscov2-orf1ab-n-ic"
//! version = "1.0"
//! name = "SARS-CoV-2 ORF1ab/N with internal control"
//! description = "..."              # optional
//! result_loinc = "94500-6"         # LOINC of the overall result
//! max_pool_size = 5                # optional: largest pool the kit accepts
//!
//! [[targets]]                      # in channel order
//! name = "ORF1ab"
//! channel = "FAM"
//! channel_aliases = []             # optional, e.g. ["HEX"] for "VIC"
//! kind = "viral"                   # viral | internal_control | human_control
//! loinc = "94511-3"                # Ct observation; required for viral
//! cutoff = { op = "<=", ct = 40.0 }            # positive when Ct <= 40.00
//! grey_zone = { low = 38.0, high = 40.0 }      # optional, [low, high); high optional
//! ct_method = "threshold"          # optional: threshold | cp
//! threshold = 0.15                 # optional fixed threshold
//! instrument_tolerance = 0.5       # optional, default 0.5 cycles
//!
//! [[rules]]                        # first match wins; the last has no conditions
//! name = "both viral targets"
//! viral_positive = ">= 2"          # also viral_grey, viral_negative: "1", "<= 1", ..
//! targets = { IC = "positive" }    # optional: a state or a list of states
//! call = "detected"                # detected | not_detected | inconclusive | retest | invalid
//! action = "Report detected."
//!
//! [controls.no_template_control]   # one table per control kind on the plates
//! ORF1ab = "negative"              # positive | negative | any, or a table:
//! IC = "any"                       # { expect = "positive", min = 20.0, max = 30.0 }
//!                                  # { expect = "negative", above = 40.0 }
//! [plates.96]
//! positive_control = ["H12"]
//! no_template_control = ["G12"]
//! extraction_negative_control = []   # each list optional, default empty
//! ```
//!
//! Unknown keys are rejected, so a misspelt key ("positive_controls") is an
//! error rather than a plate silently missing its control. Beyond the TOML
//! shape every problem is collected and reported at once, each naming the
//! kit and the field (`targets[2].grey_zone`, `rules[3]`,
//! `controls.positive_control.N1`). The decision table is checked against
//! every combination of target states: one that reaches no rule is named,
//! as is a rule no combination reaches.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::domain::{
    ControlKind, LayoutError, PlateFormat, PlateTemplate, PoolSize, Well, WellError,
};
use crate::echo;
use crate::interpret::{
    self, Expectation, MAX_RULES, MAX_TARGETS, RawExpectation, RawRule, RawTarget, Rule, Target,
    TargetKind,
};

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

/// A validated kit: its identity, a control template per plate format, and
/// the rules that interpret its readings.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KitDefinition {
    /// The kit's id, e.g. "sarscov2-orf1ab-n-ic".
    pub id: KitId,
    /// The kit definition's version, e.g. "1.0". Plates and results record
    /// [`KitDefinition::key`], so a changed layout or rule must get a new
    /// version.
    pub version: String,
    /// A name for people.
    pub name: String,
    /// Optional longer description.
    pub description: Option<String>,
    /// LOINC code of the overall result.
    result_loinc: String,
    /// Largest pool the kit accepts, if it limits pools.
    #[serde(skip_serializing_if = "Option::is_none")]
    max_pool_size: Option<PoolSize>,
    /// In channel order.
    targets: Vec<Target>,
    /// The decision table, first match wins.
    rules: Vec<Rule>,
    /// Per control kind, per target name.
    controls: BTreeMap<ControlKind, BTreeMap<String, Expectation>>,
    templates: BTreeMap<PlateFormat, PlateTemplate>,
}

impl KitDefinition {
    /// Most characters in a version.
    pub const MAX_VERSION_LEN: usize = 32;

    /// Parses and validates a kit file's text. Checks, in order: the TOML
    /// shape (unknown keys rejected), the id, the version, that at least one
    /// plate format is defined, and for each format that its wells are on
    /// the plate and none is used twice. Then, collecting every problem
    /// into one [`KitError::Invalid`]: the targets, the result LOINC code,
    /// each rule, the decision table as a whole, and the control
    /// expectations.
    pub fn from_toml_str(text: &str) -> Result<Self, KitError> {
        let raw: RawKit = toml::from_str(text).map_err(|e| KitError::Toml {
            kit: id_in(text),
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

        let mut problems = Problems::default();
        if let Err(problem) = interpret::check_loinc(&raw.result_loinc) {
            problems.push("result_loinc", problem);
        }
        let targets = validate_targets(raw.targets, &mut problems);
        let (rules, controls) = match &targets {
            // Rules and controls name targets: with a target refused, they
            // would only add echoes of the same problem.
            None => (Vec::new(), BTreeMap::new()),
            Some(targets) => (
                validate_rules(raw.rules, targets, &mut problems),
                validate_controls(raw.controls, targets, &templates, &mut problems),
            ),
        };
        if !problems.is_empty() {
            return Err(KitError::Invalid {
                kit: id.to_string(),
                problems: problems.0,
            });
        }
        Ok(KitDefinition {
            id,
            version: raw.version,
            name: raw.name,
            description: raw.description,
            result_loinc: raw.result_loinc,
            max_pool_size: raw.max_pool_size,
            targets: targets.unwrap_or_default(),
            rules,
            controls,
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

    /// The targets in channel order (the order of the kit file).
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// The target called `name` (exact, case-sensitive).
    pub fn target(&self, name: &str) -> Option<&Target> {
        self.targets.iter().find(|t| t.name == name)
    }

    /// The target read in `channel` (its channel or an alias; ASCII case is
    /// ignored).
    pub fn target_for_channel(&self, channel: &str) -> Option<&Target> {
        self.targets.iter().find(|t| t.reads_channel(channel))
    }

    /// Checks that a run read every channel the kit needs: each target's
    /// channel, or one of its aliases, must be among `run_channels` (ASCII
    /// case ignored). The error names every missing channel and its target.
    pub fn check_channels<I>(&self, run_channels: I) -> Result<(), ChannelError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let run: Vec<I::Item> = run_channels.into_iter().collect();
        let missing: Vec<MissingChannel> = self
            .targets
            .iter()
            .filter(|t| !run.iter().any(|c| t.reads_channel(c.as_ref())))
            .map(|t| MissingChannel {
                target: t.name.clone(),
                channel: t.channel.clone(),
            })
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(ChannelError::Missing {
            kit: self.key(),
            missing,
            run: run
                .iter()
                .map(|c| echo(c.as_ref()))
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// The decision table, in evaluation order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// What each target of `control` must show, by target name (`None` if
    /// the kit has no expectations for that control, which happens only for
    /// a control none of its layouts uses).
    pub fn control_expectations(
        &self,
        control: ControlKind,
    ) -> Option<&BTreeMap<String, Expectation>> {
        self.controls.get(&control)
    }

    /// LOINC code of the overall result.
    pub fn result_loinc(&self) -> &str {
        &self.result_loinc
    }

    /// Largest pool the kit accepts, if it limits pools.
    pub fn max_pool_size(&self) -> Option<PoolSize> {
        self.max_pool_size
    }
}

/// The kit id in a file that failed to parse, if one can be read, so the
/// error can say which kit it is about.
fn id_in(text: &str) -> Option<String> {
    let table: toml::Table = toml::from_str(text).ok()?;
    table.get("id")?.as_str().map(echo)
}

fn validate_targets(raw: Vec<RawTarget>, problems: &mut Problems) -> Option<Vec<Target>> {
    let before = problems.len();
    if raw.len() > MAX_TARGETS {
        problems.push(
            "targets",
            ProblemKind::TooMany {
                count: raw.len(),
                max: MAX_TARGETS,
            },
        );
        return None;
    }
    let mut targets = Vec::new();
    for (i, target) in raw.into_iter().enumerate() {
        if let Some(target) = target.validate(&format!("targets[{i}]"), problems) {
            targets.push((i, target));
        }
    }
    // Names and channels are matched ignoring ASCII case, so they must
    // differ in more than case.
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    let mut channels: BTreeMap<String, String> = BTreeMap::new();
    for (i, target) in &targets {
        if let Some(first) = names.insert(target.name.to_ascii_lowercase(), *i) {
            problems.push(
                format!("targets[{i}].name"),
                ProblemKind::Duplicate {
                    name: target.name.clone(),
                    first: format!("targets[{first}]"),
                },
            );
        }
        let all = std::iter::once(&target.channel).chain(&target.channel_aliases);
        for (j, channel) in all.enumerate() {
            let field = match j {
                0 => format!("targets[{i}].channel"),
                n => format!("targets[{i}].channel_aliases[{}]", n - 1),
            };
            if let Some(first) = channels.insert(channel.to_ascii_lowercase(), field.clone()) {
                problems.push(
                    field,
                    ProblemKind::Duplicate {
                        name: channel.clone(),
                        first,
                    },
                );
            }
        }
    }
    if !targets.iter().any(|(_, t)| t.kind == TargetKind::Viral) && problems.len() == before {
        problems.push("targets", ProblemKind::NoViralTarget);
    }
    (problems.len() == before).then(|| targets.into_iter().map(|(_, t)| t).collect())
}

fn validate_rules(raw: Vec<RawRule>, targets: &[Target], problems: &mut Problems) -> Vec<Rule> {
    if raw.len() > MAX_RULES {
        problems.push(
            "rules",
            ProblemKind::TooMany {
                count: raw.len(),
                max: MAX_RULES,
            },
        );
        return Vec::new();
    }
    let before = problems.len();
    let count = raw.len();
    let rules: Vec<Rule> = raw
        .into_iter()
        .enumerate()
        .filter_map(|(i, rule)| rule.validate(&format!("rules[{i}]"), targets, problems))
        .collect();
    // The table as a whole only means something once every rule is read.
    if problems.len() == before && rules.len() == count {
        interpret::check_table(targets, &rules, problems);
    }
    rules
}

fn validate_controls(
    raw: BTreeMap<ControlKind, BTreeMap<String, RawExpectation>>,
    targets: &[Target],
    templates: &BTreeMap<PlateFormat, PlateTemplate>,
    problems: &mut Problems,
) -> BTreeMap<ControlKind, BTreeMap<String, Expectation>> {
    let used: std::collections::BTreeSet<ControlKind> = templates
        .values()
        .flat_map(|t| t.controls.values().copied())
        .collect();
    for control in &used {
        if !raw.contains_key(control) {
            problems.push(
                "controls",
                ProblemKind::MissingControlRules { control: *control },
            );
        }
    }
    let mut controls = BTreeMap::new();
    for (control, table) in raw {
        // Every target is stated for every control, "any" included: a
        // target left out is more often forgotten than meant to be ignored.
        for target in targets {
            if !table.contains_key(&target.name) {
                problems.push(
                    format!("controls.{control}"),
                    ProblemKind::MissingExpectation {
                        target: target.name.clone(),
                    },
                );
            }
        }
        let table = interpret::validate_control_table(control, table, targets, problems);
        controls.insert(control, table);
    }
    controls
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKit {
    id: String,
    version: String,
    name: String,
    #[serde(default)]
    description: Option<String>,
    result_loinc: String,
    #[serde(default)]
    max_pool_size: Option<PoolSize>,
    targets: Vec<RawTarget>,
    rules: Vec<RawRule>,
    #[serde(default)]
    controls: BTreeMap<ControlKind, BTreeMap<String, RawExpectation>>,
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

/// Collects problems while a kit is validated, so all are reported at once.
#[derive(Debug, Default)]
pub(crate) struct Problems(Vec<KitProblem>);

impl Problems {
    pub(crate) fn push(&mut self, field: impl Into<String>, problem: ProblemKind) {
        self.0.push(KitProblem {
            field: field.into(),
            problem,
        });
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One problem in a kit file, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KitProblem {
    /// Where: `targets[1].cutoff.ct`, `rules[2]`, `controls.positive_control.N1`.
    pub field: String,
    /// What.
    pub problem: ProblemKind,
}

impl fmt::Display for KitProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

/// What is wrong with one field of a kit file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProblemKind {
    /// A target or channel name with a space or a character other than a
    /// letter, digit, '-', '_' or '.', or longer than 32 characters.
    #[error("{name:?} is not a valid name; use 1 to 32 letters, digits, '-', '_' or '.'")]
    BadName {
        /// The name given (cut to 40 characters).
        name: String,
    },
    /// Two targets share a name or a channel (names and channels are
    /// compared ignoring ASCII case).
    #[error("{name:?} is already used at {first}")]
    Duplicate {
        /// The repeated name.
        name: String,
        /// Where it was first used.
        first: String,
    },
    /// More targets or rules than pcrd accepts.
    #[error("{count} entries; at most {max} are accepted")]
    TooMany {
        /// How many were given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// No target has kind "viral", so nothing could ever be detected.
    #[error("the kit has no target with kind = \"viral\"")]
    NoViralTarget,
    /// A viral target without the LOINC code of its Ct observation, which
    /// results need.
    #[error("a viral target needs the LOINC code of its Ct observation")]
    MissingLoinc,
    /// Not shaped like a LOINC code ("94500-6").
    #[error("{code:?} is not a LOINC code (digits, '-', a check digit, e.g. \"94500-6\")")]
    BadLoinc {
        /// The code given (cut to 40 characters).
        code: String,
    },
    /// A LOINC code whose check digit does not match: usually a typo.
    #[error("LOINC code {code} fails its check digit (expected {expected}); is it mistyped?")]
    LoincCheckDigit {
        /// The code given.
        code: String,
        /// The check digit its number gives.
        expected: char,
    },
    /// A Ct that is not a number above 0 and at most 10,000 with at most
    /// two decimals (Cts are reported to two decimals, so a cut-off with
    /// more could not be compared with them).
    #[error("{value} is not a Ct between 0 and 10000 with at most two decimals")]
    BadCt {
        /// The value given.
        value: String,
    },
    /// A grey zone whose high end is not above its low end.
    #[error("grey zone {zone} is empty; high must be above low")]
    EmptyGreyZone {
        /// The zone.
        zone: String,
    },
    /// A grey zone starting below the cut-off: positive is judged first,
    /// so part of the zone could never be grey.
    #[error(
        "grey zone starts at {low}, below the cut-off {cutoff}; start it at or above the cut-off"
    )]
    GreyZoneBelowCutoff {
        /// The zone's low end.
        low: String,
        /// The cut-off.
        cutoff: String,
    },
    /// A number outside what the field accepts.
    #[error("{value} is out of range; expected {expected}")]
    OutOfRange {
        /// The value given.
        value: String,
        /// What is accepted.
        expected: &'static str,
    },
    /// Text that must say something is empty.
    #[error("must not be empty")]
    Empty,
    /// A count condition that does not parse.
    #[error("{text:?} is not a count; write e.g. \"2\", \">= 2\" or \"<= 1\"")]
    BadCount {
        /// The text given (cut to 40 characters).
        text: String,
    },
    /// A count condition asking for more viral targets than the kit has.
    #[error("{text:?} can never hold: the kit has {viral_targets} viral targets")]
    ImpossibleCount {
        /// The condition.
        text: String,
        /// How many viral targets the kit has.
        viral_targets: u32,
    },
    /// A rule or control names a target the kit does not have.
    #[error("{target:?} is not a target of this kit; its targets are {known}")]
    UnknownTarget {
        /// The name given (cut to 40 characters).
        target: String,
        /// The kit's targets.
        known: String,
    },
    /// A rule asks for a grey state of a target with no grey zone.
    #[error("target {target} has no grey zone, so it is never grey")]
    NoGreyZone {
        /// The target.
        target: String,
    },
    /// Two rules with one name: calls quote the name, so it must say which.
    #[error("rule name {name:?} is already used by {first}")]
    DuplicateRuleName {
        /// The name.
        name: String,
        /// The first rule with it.
        first: String,
    },
    /// Some combination of target states reaches no rule: a specimen with
    /// it would get no call.
    #[error(
        "the combination {combination} reaches no rule{}; end the table with a catch-all rule (one with no conditions)",
        if *more == 0 { String::new() } else { format!(" (nor do {more} other combinations)") }
    )]
    Uncovered {
        /// The first such combination, "N1=positive, N2=negative, RP=negative".
        combination: String,
        /// How many more there are.
        more: usize,
    },
    /// A rule no combination of target states reaches: the rules above it
    /// take every case it matches (or it matches none). Usually rules in
    /// the wrong order.
    #[error("rule {rule:?} is never reached: the rules before it take every case it matches")]
    Unreachable {
        /// The rule's name.
        rule: String,
    },
    /// The kit has no rules at all.
    #[error("the kit has no rules; add [[rules]] ending with a catch-all")]
    NoRules,
    /// The last rule has conditions. The table must end with a catch-all so
    /// every specimen gets a call, whatever its states.
    #[error("the last rule must be a catch-all (a rule with no conditions)")]
    NoCatchAll,
    /// A catch-all before the last rule hides every rule after it.
    #[error("a catch-all (a rule with no conditions) must be the last rule")]
    EarlyCatchAll,
    /// A control placed on the kit's plates has no `[controls.<kind>]`
    /// table, so its wells could not be judged.
    #[error("the kit's plates carry a {control} but there is no [controls.{control}] table")]
    MissingControlRules {
        /// The control.
        control: ControlKind,
    },
    /// A control table does not state a target; write `"any"` to ignore it.
    #[error("no expectation for target {target}; write {target} = \"any\" to ignore it")]
    MissingExpectation {
        /// The target.
        target: String,
    },
    /// A key that does not apply to this expectation (e.g. `above` on a
    /// positive).
    #[error("`{key}` does not apply to expect = \"{expect}\"")]
    Misplaced {
        /// The key.
        key: &'static str,
        /// The expectation.
        expect: &'static str,
    },
    /// A positive window whose `min` is above its `max`.
    #[error("min {min} is above max {max}")]
    EmptyWindow {
        /// The window's low end.
        min: String,
        /// The window's high end.
        max: String,
    },
}

/// A channel a kit needs that a run did not read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MissingChannel {
    /// The target read in it.
    pub target: String,
    /// The channel (its main name).
    pub channel: String,
}

impl fmt::Display for MissingChannel {
    /// "CY5 (target IC)".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (target {})", self.channel, self.target)
    }
}

/// Why a run's channels do not fit a kit.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    /// The run did not read a channel the kit needs: the dye was not
    /// enabled on the instrument, the export left it out, or the run was
    /// set up for another kit.
    #[error(
        "kit {kit} needs channel {} which the run does not have (the run has: {run})",
        list(missing)
    )]
    Missing {
        /// "id@version".
        kit: String,
        /// Every missing channel, in the kit's channel order.
        missing: Vec<MissingChannel>,
        /// The run's channels, comma-separated.
        run: String,
    },
}

fn list<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(T::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn kit_label(kit: &Option<String>) -> String {
    kit.as_ref().map(|k| format!(" {k:?}")).unwrap_or_default()
}

/// Why a kit file was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KitError {
    /// Not valid TOML, a required key (id, version, name, result_loinc,
    /// targets, rules) missing, a value of the wrong type, or an unknown key
    /// (often a typo).
    #[error("kit definition{} is malformed: {message}", kit_label(.kit))]
    Toml {
        /// The kit id, if the file got far enough to have one.
        kit: Option<String>,
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
    /// The targets, rules or control expectations have problems: every one
    /// found is listed, each with its field.
    #[error("kit {kit:?} is invalid: {}", list(problems))]
    Invalid {
        /// The kit id.
        kit: String,
        /// Every problem, in file order.
        problems: Vec<KitProblem>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interpret::{Call, CutoffOp, TargetState};

    /// The interpretation part every test kit shares: one viral target, an
    /// internal control, a three-rule table, and expectations for all three
    /// controls.
    const RULES: &str = r#"
result_loinc = "94500-6"

[[targets]]
name = "N"
channel = "FAM"
kind = "viral"
loinc = "94510-5"
cutoff = { op = "<", ct = 40.0 }

[[targets]]
name = "IC"
channel = "VIC"
channel_aliases = ["HEX"]
kind = "internal_control"
cutoff = { op = "<=", ct = 35.0 }

[[rules]]
name = "N positive"
viral_positive = "1"
call = "detected"
action = "Report detected."

[[rules]]
name = "IC only"
targets = { IC = "positive" }
call = "not_detected"
action = "Report not detected."

[[rules]]
name = "nothing"
call = "invalid"
action = "Re-extract."

[controls.positive_control]
N = "positive"
IC = "any"

[controls.no_template_control]
N = "negative"
IC = "any"

[controls.extraction_negative_control]
N = "negative"
IC = "positive"
"#;

    const PLATES: &str = r#"
[plates.96]
positive_control = ["H12"]
no_template_control = ["g12"]

[plates.384]
positive_control = ["P24", "O24"]
no_template_control = ["N24", "M24"]
extraction_negative_control = ["A24"]
"#;

    const HEAD: &str = "id = \"test-kit_1.0\"\nversion = \"2.1-rc1\"\nname = \"Test kit\"\n";

    fn good() -> String {
        format!("{HEAD}{RULES}{PLATES}")
    }

    fn w(s: &str) -> Well {
        s.parse().unwrap()
    }

    fn err(text: &str) -> KitError {
        KitDefinition::from_toml_str(text).unwrap_err()
    }

    /// The good kit with one piece of text replaced.
    fn good_with(from: &str, to: &str) -> String {
        let good = good();
        assert!(good.contains(from), "{from}");
        good.replacen(from, to, 1)
    }

    fn problems(text: &str) -> Vec<KitProblem> {
        match err(text) {
            KitError::Invalid { kit, problems } => {
                assert_eq!(kit, "test-kit_1.0");
                problems
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn parses_a_valid_kit() {
        let kit = KitDefinition::from_toml_str(&good()).unwrap();
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
    fn parses_targets_rules_and_controls() {
        let kit = KitDefinition::from_toml_str(&good()).unwrap();
        assert_eq!(kit.result_loinc(), "94500-6");
        assert_eq!(kit.max_pool_size(), None);
        let names: Vec<&str> = kit.targets().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["N", "IC"]);
        let n = kit.target("N").unwrap();
        assert_eq!(n.kind, TargetKind::Viral);
        assert_eq!(n.cutoff.op, CutoffOp::Below);
        assert_eq!(n.cutoff.ct.to_string(), "40.00");
        assert_eq!(n.instrument_tolerance, Target::DEFAULT_INSTRUMENT_TOLERANCE);
        assert_eq!(n.loinc.as_deref(), Some("94510-5"));
        assert_eq!(kit.target("n"), None, "names are exact");
        assert_eq!(kit.target_for_channel("fam").unwrap().name, "N");
        assert_eq!(kit.target_for_channel("HEX").unwrap().name, "IC");
        assert_eq!(kit.target_for_channel("ROX"), None);
        assert_eq!(kit.rules().len(), 3);
        assert!(kit.rules()[2].is_catch_all());
        assert_eq!(kit.rules()[0].call, Call::Detected);
        let ntc = kit
            .control_expectations(ControlKind::NoTemplateControl)
            .unwrap();
        assert_eq!(ntc["IC"], Expectation::Any);
        assert_eq!(ntc["N"], Expectation::Negative { above: None });
        let ic = kit.target("IC").unwrap();
        assert_eq!(
            ic.possible_states(),
            [TargetState::Positive, TargetState::Negative]
        );
    }

    #[test]
    fn channels_present_in_a_run() {
        let kit = KitDefinition::from_toml_str(&good()).unwrap();
        assert_eq!(kit.check_channels(["FAM", "VIC", "ROX"]), Ok(()));
        assert_eq!(
            kit.check_channels(vec!["fam".to_owned(), "hex".to_owned()]),
            Ok(())
        );
        let e = kit.check_channels(["FAM", "ROX"]).unwrap_err();
        assert_eq!(
            e,
            ChannelError::Missing {
                kit: "test-kit_1.0@2.1-rc1".into(),
                missing: vec![MissingChannel {
                    target: "IC".into(),
                    channel: "VIC".into()
                }],
                run: "FAM, ROX".into(),
            }
        );
        assert_eq!(
            e.to_string(),
            "kit test-kit_1.0@2.1-rc1 needs channel VIC (target IC) which the run does not have (the run has: FAM, ROX)"
        );
        let e = kit.check_channels(Vec::<String>::new()).unwrap_err();
        assert!(
            e.to_string().contains("FAM (target N), VIC (target IC)"),
            "{e}"
        );
    }

    #[test]
    fn optional_keys_default() {
        let kit = KitDefinition::from_toml_str(&format!(
            "{HEAD}description = \"about\"\nmax_pool_size = 4\n{RULES}[plates.96]\n"
        ))
        .unwrap();
        assert_eq!(kit.description.as_deref(), Some("about"));
        assert_eq!(kit.max_pool_size(), PoolSize::new(4).ok());
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
        let kit = KitDefinition::from_toml_str(&good()).unwrap();
        let json = serde_json::to_value(&kit).unwrap();
        assert_eq!(json["id"], "test-kit_1.0");
        assert_eq!(
            json["templates"]["96"]["controls"]["H12"],
            "positive_control"
        );
        assert_eq!(json["targets"][0]["cutoff"]["op"], "<");
        assert_eq!(json["targets"][0]["cutoff"]["ct"], 40.0);
        assert_eq!(json["rules"][0]["viral_positive"], "== 1");
        assert_eq!(json["rules"][1]["targets"]["IC"][0], "positive");
        assert_eq!(
            json["controls"]["no_template_control"]["N"]["expect"],
            "negative"
        );
        assert_eq!(json["result_loinc"], "94500-6");
    }

    #[test]
    fn malformed_toml_and_unknown_keys() {
        let e = err("id = ");
        assert!(matches!(e, KitError::Toml { kit: None, .. }), "{e:?}");
        assert!(
            e.to_string().starts_with("kit definition is malformed: "),
            "{e}"
        );

        let e = err(&good_with(
            "name = \"Test kit\"",
            "name = \"Test kit\"\ncolour = \"red\"",
        ));
        assert!(e.to_string().contains("colour"), "{e}");
        // Once the id can be read, the message names the kit.
        assert!(
            e.to_string()
                .starts_with("kit definition \"test-kit_1.0\" is malformed: "),
            "{e}"
        );

        let e = err(&good_with(
            "positive_control = [\"H12\"]",
            "positive_controls = [\"H12\"]",
        ));
        assert!(e.to_string().contains("positive_controls"), "{e}");

        let e = err(&good_with("name = \"Test kit\"\n", ""));
        assert!(e.to_string().contains("name"), "{e}");

        let e = err(&good_with("[\"H12\"]", "\"H12\""));
        assert!(matches!(e, KitError::Toml { .. }), "{e:?}");

        // Inside the new sections too.
        for (from, to, word) in [
            ("op = \"<\"", "op = \"=<\"", "=<"),
            ("kind = \"viral\"", "kind = \"virus\"", "virus"),
            ("call = \"detected\"", "call = \"positive\"", "positive"),
            (
                "cutoff = { op = \"<\", ct = 40.0 }",
                "cutoff = { op = \"<\", ct = 40.0, cy = 1 }",
                "cy",
            ),
            ("[controls.positive_control]", "[controls.pc]", "pc"),
            ("N = \"positive\"", "N = \"postive\"", "postive"),
            (
                "viral_positive = \"1\"",
                "viral_positve = \"1\"",
                "viral_positve",
            ),
            (
                "targets = { IC = \"positive\" }",
                "targets = { IC = [] }",
                "IC",
            ),
        ] {
            let e = err(&good_with(from, to));
            assert!(matches!(e, KitError::Toml { .. }), "{to}: {e:?}");
            assert!(e.to_string().contains(word), "{to}: {e}");
        }
        for missing in ["result_loinc = \"94500-6\"\n", "channel = \"FAM\"\n"] {
            let e = err(&good_with(missing, ""));
            assert!(matches!(e, KitError::Toml { .. }), "{missing}: {e:?}");
        }
        let e = err(&format!("{HEAD}max_pool_size = 40\n{RULES}{PLATES}"));
        assert!(e.to_string().contains("pool size 40"), "{e}");
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
        let base = format!("id = \"k\"\nversion = \"1\"\nname = \"K\"\n{RULES}");
        for text in [base.clone(), format!("{base}[plates]\n")] {
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
    fn every_problem_is_reported_at_once_with_its_field() {
        let text = good_with("ct = 40.0 }", "ct = 40.004 }")
            .replacen("loinc = \"94510-5\"", "loinc = \"94510-4\"", 1)
            .replacen("result_loinc = \"94500-6\"", "result_loinc = \"94500\"", 1);
        let found = problems(&text);
        let fields: Vec<&str> = found.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            ["result_loinc", "targets[0].loinc", "targets[0].cutoff.ct"]
        );
        assert_eq!(
            found[1].problem,
            ProblemKind::LoincCheckDigit {
                code: "94510-4".into(),
                expected: '5'
            }
        );
        let message = err(&text).to_string();
        assert!(
            message.starts_with("kit \"test-kit_1.0\" is invalid: result_loinc: "),
            "{message}"
        );
        assert!(
            message.contains("targets[0].cutoff.ct: 40.004 is not a Ct"),
            "{message}"
        );
    }

    #[test]
    fn rule_table_problems_name_the_combination_or_rule() {
        // Without the catch-all, "nothing amplified" reaches no rule.
        let text = good_with(
            "[[rules]]\nname = \"nothing\"\ncall = \"invalid\"\naction = \"Re-extract.\"\n",
            "",
        );
        let found = problems(&text);
        assert_eq!(
            found[0],
            KitProblem {
                field: "rules".into(),
                problem: ProblemKind::Uncovered {
                    combination: "N=negative, IC=negative".into(),
                    more: 0
                }
            }
        );
        assert_eq!(found[1].field, "rules[1]");
        assert_eq!(found[1].problem, ProblemKind::NoCatchAll);
        assert!(
            err(&text)
                .to_string()
                .contains("the combination N=negative, IC=negative reaches no rule"),
        );

        // A rule shadowed by an earlier one.
        let text = good_with("targets = { IC = \"positive\" }", "viral_positive = \"1\"");
        let found = problems(&text);
        assert_eq!(found[0].field, "rules[1]");
        assert_eq!(
            found[0].problem,
            ProblemKind::Unreachable {
                rule: "IC only".into()
            }
        );

        // A catch-all in the middle.
        let text = good_with("targets = { IC = \"positive\" }\n", "");
        // (The final catch-all after it is not reported as unreachable: a
        // final catch-all may be reached by nothing.)
        let found = problems(&text);
        assert_eq!(
            found,
            [KitProblem {
                field: "rules[1]".into(),
                problem: ProblemKind::EarlyCatchAll
            }]
        );
    }
}
