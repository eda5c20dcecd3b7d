//! The sample decision table: rules evaluated top to bottom, the first whose
//! conditions all hold gives the call.
//!
//! A condition is a count of viral targets in a state ("viral_positive >=
//! 2") or the state of a named target ("IC positive"). That is enough for
//! every kit in protocols.md §8 without code per kit: the CDC panel (both N
//! markers, one, none with RP), the two-target kits with an internal
//! control, and 2-of-3 with a grey state.
//!
//! At load the table is checked against every combination of target states
//! (each target positive or negative, or grey if it has a grey zone): every
//! combination must reach a rule, every rule must be reached by some
//! combination, and the table must end with a catch-all. The combinations
//! number at most 3^[`MAX_TARGETS`], so this is cheap.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use super::Call;
use super::target::{Target, TargetKind, TargetState};
use crate::kit::{ProblemKind, Problems};

/// Most targets a kit may have. Instruments read at most six dyes in one
/// well; eight leaves room for a pseudo-channel layout like the CDC panel's
/// and keeps the load-time enumeration at most 3^8 = 6,561 combinations.
pub const MAX_TARGETS: usize = 8;

/// Most rules in one table: real kits need four or five.
pub const MAX_RULES: usize = 64;

/// How many viral targets a count condition accepts: `min..=max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CountRange {
    /// Fewest.
    pub min: u32,
    /// Most; `None` for no upper limit.
    pub max: Option<u32>,
}

impl CountRange {
    /// Parses "2", "== 2", ">= 2", "> 1", "<= 1" or "< 2".
    pub fn parse(text: &str) -> Option<CountRange> {
        let text = text.trim();
        let (op, number) = [">=", "<=", "==", ">", "<", "="]
            .into_iter()
            .find_map(|op| text.strip_prefix(op).map(|rest| (op, rest)))
            .unwrap_or(("==", text));
        let n: u32 = number.trim().parse().ok()?;
        match op {
            "==" | "=" => Some(CountRange {
                min: n,
                max: Some(n),
            }),
            ">=" => Some(CountRange { min: n, max: None }),
            ">" => Some(CountRange {
                min: n.checked_add(1)?,
                max: None,
            }),
            "<=" => Some(CountRange {
                min: 0,
                max: Some(n),
            }),
            // "< 0" matches nothing: refused rather than kept as a rule that
            // can never fire.
            _ => Some(CountRange {
                min: 0,
                max: Some(n.checked_sub(1)?),
            }),
        }
    }

    /// Whether `n` is in the range.
    pub fn contains(self, n: u32) -> bool {
        n >= self.min && self.max.is_none_or(|max| n <= max)
    }
}

impl fmt::Display for CountRange {
    /// "== 1", ">= 2", "<= 1" or "1..=2".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.min, self.max) {
            (min, Some(max)) if min == max => write!(f, "== {min}"),
            (min, None) => write!(f, ">= {min}"),
            (0, Some(max)) => write!(f, "<= {max}"),
            (min, Some(max)) => write!(f, "{min}..={max}"),
        }
    }
}

impl Serialize for CountRange {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// The states a condition on one target accepts: one state or several.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct StateSet(u8);

impl StateSet {
    fn bit(state: TargetState) -> u8 {
        match state {
            TargetState::Positive => 1,
            TargetState::Grey => 2,
            TargetState::Negative => 4,
        }
    }

    /// The set holding `states`.
    pub fn of(states: &[TargetState]) -> StateSet {
        StateSet(states.iter().fold(0, |bits, &s| bits | StateSet::bit(s)))
    }

    /// Whether `state` is accepted.
    pub fn contains(self, state: TargetState) -> bool {
        self.0 & StateSet::bit(state) != 0
    }

    /// The accepted states, in [`TargetState::ALL`] order.
    pub fn states(self) -> impl Iterator<Item = TargetState> {
        TargetState::ALL
            .into_iter()
            .filter(move |&s| self.contains(s))
    }
}

impl fmt::Display for StateSet {
    /// "positive" or "negative|grey".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self.states().map(|s| s.to_string()).collect();
        f.write_str(&names.join("|"))
    }
}

impl Serialize for StateSet {
    /// A list of states.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.states())
    }
}

impl<'de> Deserialize<'de> for StateSet {
    /// `"positive"` or `["negative", "grey"]`.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StatesVisitor;

        impl<'de> Visitor<'de> for StatesVisitor {
            type Value = StateSet;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"positive\", \"grey\", \"negative\" or a list of them")
            }

            fn visit_str<E: de::Error>(self, s: &str) -> Result<StateSet, E> {
                let state = TargetState::deserialize(de::value::StrDeserializer::<E>::new(s))?;
                Ok(StateSet::of(&[state]))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StateSet, A::Error> {
                let mut set = StateSet::default();
                while let Some(state) = seq.next_element::<TargetState>()? {
                    set = StateSet(set.0 | StateSet::bit(state));
                }
                if set == StateSet::default() {
                    return Err(de::Error::invalid_length(0, &"at least one state"));
                }
                Ok(set)
            }
        }

        deserializer.deserialize_any(StatesVisitor)
    }
}

/// One row of the decision table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Rule {
    /// A short name, quoted in every call the rule makes.
    pub name: String,
    /// How many viral targets must be positive.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub viral_positive: Option<CountRange>,
    /// How many viral targets must be grey.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub viral_grey: Option<CountRange>,
    /// How many viral targets must be negative.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub viral_negative: Option<CountRange>,
    /// Required states of named targets.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub targets: BTreeMap<String, StateSet>,
    /// The call when the rule matches.
    pub call: Call,
    /// What the lab does next, in words for the technician.
    pub action: String,
    /// `targets`, by index into the kit's target list.
    #[serde(skip)]
    by_index: Vec<(usize, StateSet)>,
}

impl Rule {
    /// A rule with no conditions: it matches everything.
    pub fn is_catch_all(&self) -> bool {
        self.viral_positive.is_none()
            && self.viral_grey.is_none()
            && self.viral_negative.is_none()
            && self.targets.is_empty()
    }

    /// Whether the rule matches `states` (one per kit target, in order).
    pub(crate) fn matches(&self, counts: ViralCounts, states: &[TargetState]) -> bool {
        let count_ok =
            |condition: Option<CountRange>, n: u32| condition.is_none_or(|c| c.contains(n));
        count_ok(self.viral_positive, counts.positive)
            && count_ok(self.viral_grey, counts.grey)
            && count_ok(self.viral_negative, counts.negative)
            && self
                .by_index
                .iter()
                .all(|&(i, set)| states.get(i).is_some_and(|&s| set.contains(s)))
    }
}

/// How many viral targets are in each state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ViralCounts {
    positive: u32,
    grey: u32,
    negative: u32,
}

impl ViralCounts {
    pub(crate) fn of(targets: &[Target], states: &[TargetState]) -> ViralCounts {
        let mut counts = ViralCounts::default();
        for (target, state) in targets.iter().zip(states) {
            if target.kind == TargetKind::Viral {
                match state {
                    TargetState::Positive => counts.positive += 1,
                    TargetState::Grey => counts.grey += 1,
                    TargetState::Negative => counts.negative += 1,
                }
            }
        }
        counts
    }
}

/// The index of the first rule matching `states`, if any.
pub(crate) fn first_match(
    rules: &[Rule],
    targets: &[Target],
    states: &[TargetState],
) -> Option<usize> {
    let counts = ViralCounts::of(targets, states);
    rules.iter().position(|rule| rule.matches(counts, states))
}

/// A `[[rules]]` entry as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRule {
    name: String,
    #[serde(default)]
    viral_positive: Option<String>,
    #[serde(default)]
    viral_grey: Option<String>,
    #[serde(default)]
    viral_negative: Option<String>,
    #[serde(default)]
    targets: BTreeMap<String, StateSet>,
    call: Call,
    action: String,
}

impl RawRule {
    /// Checks one rule against the kit's (valid) targets; `field` is
    /// `rules[3]`.
    pub(crate) fn validate(
        self,
        field: &str,
        targets: &[Target],
        problems: &mut Problems,
    ) -> Option<Rule> {
        let before = problems.len();
        for (key, text) in [("name", &self.name), ("action", &self.action)] {
            if text.trim().is_empty() {
                problems.push(format!("{field}.{key}"), ProblemKind::Empty);
            }
        }
        let viral = targets
            .iter()
            .filter(|t| t.kind == TargetKind::Viral)
            .count();
        let viral = u32::try_from(viral).unwrap_or(u32::MAX);
        let mut count = |key: &str, text: Option<String>| -> Option<CountRange> {
            let text = text?;
            let at = format!("{field}.{key}");
            match CountRange::parse(&text) {
                None => {
                    problems.push(
                        at,
                        ProblemKind::BadCount {
                            text: crate::echo(&text),
                        },
                    );
                    None
                }
                Some(range) if range.min > viral => {
                    problems.push(
                        at,
                        ProblemKind::ImpossibleCount {
                            text: crate::echo(&text),
                            viral_targets: viral,
                        },
                    );
                    None
                }
                Some(range) => Some(range),
            }
        };
        let viral_positive = count("viral_positive", self.viral_positive);
        let viral_grey = count("viral_grey", self.viral_grey);
        let viral_negative = count("viral_negative", self.viral_negative);
        let mut by_index = Vec::new();
        for (name, &set) in &self.targets {
            let at = format!("{field}.targets.{name}");
            let Some(index) = targets.iter().position(|t| t.name == *name) else {
                problems.push(
                    at,
                    ProblemKind::UnknownTarget {
                        target: crate::echo(name),
                        known: target_names(targets),
                    },
                );
                continue;
            };
            if set.contains(TargetState::Grey) && targets[index].grey_zone.is_none() {
                problems.push(
                    at,
                    ProblemKind::NoGreyZone {
                        target: name.clone(),
                    },
                );
                continue;
            }
            by_index.push((index, set));
        }
        by_index.sort_by_key(|&(i, _)| i);
        if problems.len() > before {
            return None;
        }
        Some(Rule {
            name: self.name,
            viral_positive,
            viral_grey,
            viral_negative,
            targets: self.targets,
            call: self.call,
            action: self.action,
            by_index,
        })
    }
}

/// "N1, N2, RP": the kit's target names, for messages.
pub(crate) fn target_names(targets: &[Target]) -> String {
    targets
        .iter()
        .map(|t| t.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// "ORF1ab=positive, N=negative, IC=negative".
fn combination_text(targets: &[Target], states: &[TargetState]) -> String {
    targets
        .iter()
        .zip(states)
        .map(|(t, s)| format!("{}={s}", t.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks the whole table: total, every rule reachable, a final catch-all,
/// unique names. `targets` and `rules` are the valid ones; the caller has
/// already bounded their numbers.
pub(crate) fn check_table(targets: &[Target], rules: &[Rule], problems: &mut Problems) {
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, rule) in rules.iter().enumerate() {
        if let Some(first) = names.insert(&rule.name, i) {
            problems.push(
                format!("rules[{i}].name"),
                ProblemKind::DuplicateRuleName {
                    name: rule.name.clone(),
                    first: format!("rules[{first}]"),
                },
            );
        }
    }

    // Mixed-radix counter over each target's possible states.
    let options: Vec<&[TargetState]> = targets.iter().map(Target::possible_states).collect();
    let mut digits = vec![0usize; targets.len()];
    let mut states: Vec<TargetState> = options.iter().map(|o| o[0]).collect();
    let mut reached = vec![false; rules.len()];
    let mut uncovered: Option<String> = None;
    let mut uncovered_more = 0usize;
    loop {
        match first_match(rules, targets, &states) {
            Some(i) => reached[i] = true,
            None if uncovered.is_none() => uncovered = Some(combination_text(targets, &states)),
            None => uncovered_more += 1,
        }
        // Next combination; stop after the last.
        let mut position = 0;
        loop {
            if position == digits.len() {
                break;
            }
            digits[position] += 1;
            if digits[position] < options[position].len() {
                states[position] = options[position][digits[position]];
                break;
            }
            digits[position] = 0;
            states[position] = options[position][0];
            position += 1;
        }
        if position == digits.len() {
            break;
        }
    }

    if let Some(combination) = uncovered {
        problems.push(
            "rules",
            ProblemKind::Uncovered {
                combination,
                more: uncovered_more,
            },
        );
    }
    let last = rules.len().checked_sub(1);
    for (i, rule) in rules.iter().enumerate() {
        // A final catch-all is allowed to be reached by nothing: it is the
        // table's guarantee, not a case of its own.
        let final_catch_all = Some(i) == last && rule.is_catch_all();
        if !(reached[i] || final_catch_all) {
            problems.push(
                format!("rules[{i}]"),
                ProblemKind::Unreachable {
                    rule: rule.name.clone(),
                },
            );
        }
    }
    match rules.last() {
        None => problems.push("rules", ProblemKind::NoRules),
        Some(rule) if !rule.is_catch_all() => problems.push(
            format!("rules[{}]", rules.len() - 1),
            ProblemKind::NoCatchAll,
        ),
        Some(_) => {}
    }
    for (i, rule) in rules.iter().enumerate().take(rules.len().saturating_sub(1)) {
        if rule.is_catch_all() {
            // Everything after it is unreachable and reported above; say why.
            problems.push(format!("rules[{i}]"), ProblemKind::EarlyCatchAll);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_ranges_parse() {
        let r = |min, max| Some(CountRange { min, max });
        assert_eq!(CountRange::parse("2"), r(2, Some(2)));
        assert_eq!(CountRange::parse("== 1"), r(1, Some(1)));
        assert_eq!(CountRange::parse("=1"), r(1, Some(1)));
        assert_eq!(CountRange::parse(">= 2"), r(2, None));
        assert_eq!(CountRange::parse(" > 1 "), r(2, None));
        assert_eq!(CountRange::parse("<= 1"), r(0, Some(1)));
        assert_eq!(CountRange::parse("< 2"), r(0, Some(1)));
        for bad in ["", "< 0", "two", ">= -1", "=> 2", "1.5", "99999999999"] {
            assert_eq!(CountRange::parse(bad), None, "{bad:?}");
        }
        assert_eq!(CountRange::parse("< 2").unwrap().to_string(), "<= 1");
        assert_eq!(CountRange::parse(">2").unwrap().to_string(), ">= 3");
        assert_eq!(
            CountRange {
                min: 1,
                max: Some(2)
            }
            .to_string(),
            "1..=2"
        );
    }

    #[test]
    fn state_sets() {
        let set = StateSet::of(&[TargetState::Negative, TargetState::Grey]);
        assert!(set.contains(TargetState::Grey) && !set.contains(TargetState::Positive));
        assert_eq!(set.to_string(), "grey|negative");
        #[derive(Deserialize)]
        struct T {
            s: StateSet,
        }
        let t: T = toml::from_str("s = \"positive\"").unwrap();
        assert_eq!(t.s, StateSet::of(&[TargetState::Positive]));
        let t: T = toml::from_str("s = [\"grey\", \"negative\"]").unwrap();
        assert_eq!(t.s, set);
        assert!(toml::from_str::<T>("s = []").is_err());
        let e = toml::from_str::<T>("s = \"positiv\"")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("positiv"), "{e}");
        assert!(toml::from_str::<T>("s = 3").is_err());
    }
}
