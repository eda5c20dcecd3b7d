//! One kit target: its channel, kind, LOINC code and the cut-off (and grey
//! zone) that turn a Ct into a state.

use std::fmt;

use serde::{Deserialize, Serialize, Serializer};

use crate::analysis::{Ct, Method};
use crate::kit::{ProblemKind, Problems};

/// A Ct at two decimals, as reported (protocols.md §6), held as hundredths
/// of a cycle. Cut-offs and windows compare these, so "39.995" is judged as
/// the "40.00" a person reads on the report, never as a number they cannot
/// see, and the comparison itself is exact integer arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CtValue(u32);

impl CtValue {
    /// Largest cycle we hold. No PCR programme runs anywhere near this many
    /// cycles; a bigger number is an export or unit error, not a Ct.
    pub const MAX_CYCLES: u32 = 10_000;

    /// The value a report shows for a Ct of `cycles`: rounded to two
    /// decimals exactly as [`Ct`]'s `Display` writes it. `None` if `cycles`
    /// is not finite, not above zero, or above [`CtValue::MAX_CYCLES`].
    pub fn reported(cycles: f64) -> Option<CtValue> {
        if !(cycles.is_finite() && cycles > 0.0 && cycles <= f64::from(Self::MAX_CYCLES)) {
            return None;
        }
        // The same formatting as `Ct`'s Display, so the value judged is the
        // text reported, digit for digit.
        let text = format!("{cycles:.2}");
        let (whole, fraction) = text.split_once('.')?;
        let whole: u32 = whole.parse().ok()?;
        let fraction: u32 = fraction.parse().ok()?;
        Some(CtValue(whole * 100 + fraction))
    }

    /// A value written in a kit file: like [`CtValue::reported`], but only if
    /// rounding changes nothing (a cut-off of 40.004 cannot be compared with a
    /// Ct reported to two decimals, so it is refused rather than rounded).
    pub fn exact(cycles: f64) -> Option<CtValue> {
        CtValue::reported(cycles).filter(|v| v.as_f64() == cycles)
    }

    /// The value in cycles.
    pub fn as_f64(self) -> f64 {
        f64::from(self.0) / 100.0
    }

    /// The value in hundredths of a cycle (40.00 is 4000).
    pub fn hundredths(self) -> u32 {
        self.0
    }
}

impl fmt::Display for CtValue {
    /// Two decimals: "40.00".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:02}", self.0 / 100, self.0 % 100)
    }
}

impl Serialize for CtValue {
    /// A JSON number, e.g. 39.99.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(self.as_f64())
    }
}

/// How a Ct is compared with a target's cut-off. Kits differ: the CDC panel
/// is positive at Ct < 40.00, many NMPA kits at Ct <= 40 (protocols.md §8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CutoffOp {
    /// Positive when the reported Ct is strictly below the cut-off.
    #[serde(rename = "<")]
    Below,
    /// Positive when the reported Ct is at or below the cut-off.
    #[serde(rename = "<=")]
    AtOrBelow,
}

impl fmt::Display for CutoffOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CutoffOp::Below => "<",
            CutoffOp::AtOrBelow => "<=",
        })
    }
}

/// A target is positive when its reported Ct passes this.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Cutoff {
    /// `<` or `<=`.
    pub op: CutoffOp,
    /// The cut-off Ct.
    pub ct: CtValue,
}

impl Cutoff {
    /// Whether a reported Ct passes the cut-off (is positive).
    pub fn passes(self, ct: CtValue) -> bool {
        match self.op {
            CutoffOp::Below => ct < self.ct,
            CutoffOp::AtOrBelow => ct <= self.ct,
        }
    }
}

impl fmt::Display for Cutoff {
    /// "< 40.00".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.op, self.ct)
    }
}

/// Ct values in `[low, high)` that do not pass the cut-off: neither positive
/// nor negative, so the kit's rules usually ask for a retest. Without `high`
/// every determined Ct from `low` up is grey (the "Ct >= 37 but not
/// Undetermined" case of the TaqPath-style kit, protocols.md §8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct GreyZone {
    /// Lowest grey Ct (inclusive).
    pub low: CtValue,
    /// First Ct above the zone (exclusive); `None` for no upper end.
    pub high: Option<CtValue>,
}

impl GreyZone {
    /// Whether a reported Ct lies in the zone.
    pub fn contains(self, ct: CtValue) -> bool {
        ct >= self.low && self.high.is_none_or(|high| ct < high)
    }
}

impl fmt::Display for GreyZone {
    /// "[38.00, 40.00)" or ">= 37.00".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.high {
            Some(high) => write!(f, "[{}, {})", self.low, high),
            None => write!(f, ">= {}", self.low),
        }
    }
}

/// What a target detects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetKind {
    /// A SARS-CoV-2 gene region (N1, ORF1ab, S, ..). Rules count these.
    Viral,
    /// Material added to every specimen (MS2 phage, an armored RNA) that
    /// shows extraction and amplification worked.
    InternalControl,
    /// A human gene (RNase P) that shows the swab held human cells.
    HumanControl,
}

impl fmt::Display for TargetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TargetKind::Viral => "viral",
            TargetKind::InternalControl => "internal_control",
            TargetKind::HumanControl => "human_control",
        })
    }
}

/// What one target's Ct says, after the cut-off and grey zone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetState {
    /// The reported Ct passes the cut-off.
    Positive,
    /// Determined, not positive, inside the grey zone.
    Grey,
    /// Undetermined, or determined above the cut-off and outside any grey
    /// zone.
    Negative,
}

impl TargetState {
    /// Every state, in declaration order.
    pub const ALL: [TargetState; 3] = [
        TargetState::Positive,
        TargetState::Grey,
        TargetState::Negative,
    ];
}

impl fmt::Display for TargetState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TargetState::Positive => "positive",
            TargetState::Grey => "grey",
            TargetState::Negative => "negative",
        })
    }
}

/// One target of a kit: what a channel of a well measures and how its Ct is
/// judged.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Target {
    /// The target's name, e.g. "N1" or "ORF1ab". Readings are keyed by it.
    pub name: String,
    /// The instrument channel (dye) it is read in, e.g. "FAM".
    pub channel: String,
    /// Other names instruments give the same channel (e.g. "HEX" for "VIC").
    pub channel_aliases: Vec<String>,
    /// Viral target, internal control or human control.
    pub kind: TargetKind,
    /// LOINC code of this target's Ct observation; required for viral
    /// targets, optional for controls (MS2 has none).
    pub loinc: Option<String>,
    /// Positive when the reported Ct passes this.
    pub cutoff: Cutoff,
    /// Optional grey zone above the cut-off.
    pub grey_zone: Option<GreyZone>,
    /// Ct method validated for this target, if the kit fixes one.
    pub ct_method: Option<Method>,
    /// Fixed threshold validated for this target, if any (protocols.md §6:
    /// fixed per target for diagnostics).
    pub threshold: Option<f64>,
    /// Largest |pcrd Ct - instrument Ct| accepted without a flag.
    pub instrument_tolerance: f64,
}

impl Target {
    /// Instrument-Ct tolerance when a kit gives none: the top of the
    /// 0.2-0.5 cycles suggested in protocols.md §6 ("validated tolerance").
    pub const DEFAULT_INSTRUMENT_TOLERANCE: f64 = 0.5;

    /// Largest tolerance a kit may set: beyond a few cycles the two
    /// analyses are no longer checking each other.
    pub const MAX_INSTRUMENT_TOLERANCE: f64 = 5.0;

    /// Whether this target is read in `channel` (its channel or an alias,
    /// ignoring ASCII case: exports write "Cy5", "CY5" and "cy5").
    pub fn reads_channel(&self, channel: &str) -> bool {
        self.channel.eq_ignore_ascii_case(channel)
            || self
                .channel_aliases
                .iter()
                .any(|alias| alias.eq_ignore_ascii_case(channel))
    }

    /// The states this target can be in: grey only with a grey zone.
    pub fn possible_states(&self) -> &'static [TargetState] {
        if self.grey_zone.is_some() {
            &TargetState::ALL
        } else {
            &[TargetState::Positive, TargetState::Negative]
        }
    }

    /// The state of a reported Ct (`None` = Undetermined).
    pub fn state_of(&self, reported: Option<CtValue>) -> TargetState {
        match reported {
            None => TargetState::Negative,
            Some(ct) if self.cutoff.passes(ct) => TargetState::Positive,
            Some(ct) if self.grey_zone.is_some_and(|zone| zone.contains(ct)) => TargetState::Grey,
            Some(_) => TargetState::Negative,
        }
    }

    /// The reported value of `ct`: `Ok(None)` for Undetermined, `Err(value)`
    /// when the number is not a cycle (NaN, zero, negative, absurdly large).
    pub fn reported(ct: Ct) -> Result<Option<CtValue>, f64> {
        match ct {
            Ct::Undetermined => Ok(None),
            Ct::Determined(v) => CtValue::reported(v).map(Some).ok_or(v),
        }
    }

    /// "N1 38.20 positive (< 40.00)", "S 37.50 grey (>= 37.00)",
    /// "RP Undetermined negative", "N 41.00 negative (not < 40.00)": the
    /// words a call's reason uses for this target.
    pub fn describe(&self, reported: Option<CtValue>, state: TargetState) -> String {
        let name = &self.name;
        let cutoff = self.cutoff;
        match (reported, state) {
            (None, _) => format!("{name} Undetermined {state}"),
            (Some(ct), TargetState::Positive) => format!("{name} {ct} positive ({cutoff})"),
            (Some(ct), TargetState::Grey) => match self.grey_zone {
                Some(zone) => format!("{name} {ct} grey ({zone})"),
                None => format!("{name} {ct} grey"),
            },
            (Some(ct), TargetState::Negative) => {
                format!("{name} {ct} negative (not {cutoff})")
            }
        }
    }
}

/// Whether `text` is a target or channel name: 1 to 32 ASCII letters,
/// digits, '-', '_' or '.'.
pub(crate) fn valid_name(text: &str) -> bool {
    (1..=32).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Checks a LOINC code's syntax ("94500-6": 1 to 7 digits, '-', a check
/// digit) and its check digit (the mod-10 algorithm of the LOINC Users'
/// Guide, the same as Luhn's), so a mistyped code is refused at load rather
/// than sent to a receiver.
pub(crate) fn check_loinc(code: &str) -> Result<(), ProblemKind> {
    let bad = || ProblemKind::BadLoinc {
        code: crate::echo(code),
    };
    let (number, check) = code.split_once('-').ok_or_else(bad)?;
    let digits_only = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if !(1..=7).contains(&number.len()) || !digits_only(number) || check.len() != 1 {
        return Err(bad());
    }
    let given = check
        .bytes()
        .next()
        .filter(u8::is_ascii_digit)
        .ok_or_else(bad)?;
    let mut sum = 0u32;
    for (position, digit) in number.bytes().rev().enumerate() {
        let digit = u32::from(digit - b'0');
        // Counting from the right, the 1st, 3rd, .. digits are doubled and
        // the digits of the product added.
        sum += if position % 2 == 0 {
            let doubled = digit * 2;
            doubled / 10 + doubled % 10
        } else {
            digit
        };
    }
    let expected = (10 - sum % 10) % 10;
    if u32::from(given - b'0') == expected {
        Ok(())
    } else {
        Err(ProblemKind::LoincCheckDigit {
            code: code.to_owned(),
            expected: char::from(b'0' + expected as u8),
        })
    }
}

/// A `[[targets]]` entry as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTarget {
    name: String,
    channel: String,
    #[serde(default)]
    channel_aliases: Vec<String>,
    kind: TargetKind,
    #[serde(default)]
    loinc: Option<String>,
    cutoff: RawCutoff,
    #[serde(default)]
    grey_zone: Option<RawGreyZone>,
    #[serde(default)]
    ct_method: Option<Method>,
    #[serde(default)]
    threshold: Option<f64>,
    #[serde(default)]
    instrument_tolerance: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCutoff {
    op: CutoffOp,
    ct: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGreyZone {
    low: f64,
    #[serde(default)]
    high: Option<f64>,
}

/// A Ct written in a kit file, or a problem at `field`.
pub(crate) fn kit_ct(value: f64, field: &str, problems: &mut Problems) -> Option<CtValue> {
    let ct = CtValue::exact(value);
    if ct.is_none() {
        problems.push(
            field,
            ProblemKind::BadCt {
                value: value.to_string(),
            },
        );
    }
    ct
}

impl RawTarget {
    /// Checks everything that concerns this target alone; `field` is where
    /// it is (`targets[2]`). Returns `None` after recording the problems.
    pub(crate) fn validate(self, field: &str, problems: &mut Problems) -> Option<Target> {
        let before = problems.len();
        if !valid_name(&self.name) {
            problems.push(
                format!("{field}.name"),
                ProblemKind::BadName {
                    name: crate::echo(&self.name),
                },
            );
        }
        for (i, channel) in std::iter::once(&self.channel)
            .chain(&self.channel_aliases)
            .enumerate()
        {
            if !valid_name(channel) {
                let at = match i {
                    0 => format!("{field}.channel"),
                    n => format!("{field}.channel_aliases[{}]", n - 1),
                };
                problems.push(
                    at,
                    ProblemKind::BadName {
                        name: crate::echo(channel),
                    },
                );
            }
        }
        match (&self.loinc, self.kind) {
            (Some(code), _) => {
                if let Err(problem) = check_loinc(code) {
                    problems.push(format!("{field}.loinc"), problem);
                }
            }
            (None, TargetKind::Viral) => {
                problems.push(format!("{field}.loinc"), ProblemKind::MissingLoinc);
            }
            (None, _) => {}
        }
        let cutoff_ct = kit_ct(self.cutoff.ct, &format!("{field}.cutoff.ct"), problems);
        let mut grey_zone = None;
        if let Some(zone) = &self.grey_zone {
            let at = format!("{field}.grey_zone");
            let low = kit_ct(zone.low, &format!("{at}.low"), problems);
            let high = match zone.high {
                Some(high) => kit_ct(high, &format!("{at}.high"), problems).map(Some),
                None => Some(None),
            };
            if let (Some(low), Some(high)) = (low, high) {
                if high.is_some_and(|high| high <= low) {
                    problems.push(
                        at.clone(),
                        ProblemKind::EmptyGreyZone {
                            zone: GreyZone { low, high }.to_string(),
                        },
                    );
                }
                // A zone starting below the cut-off would be partly hidden
                // by it (positive is checked first): almost certainly a typo.
                if let Some(cutoff) = cutoff_ct
                    && low < cutoff
                {
                    problems.push(
                        at.clone(),
                        ProblemKind::GreyZoneBelowCutoff {
                            low: low.to_string(),
                            cutoff: cutoff.to_string(),
                        },
                    );
                }
                grey_zone = Some(GreyZone { low, high });
            }
        }
        if let Some(threshold) = self.threshold
            && !(threshold.is_finite() && threshold > 0.0)
        {
            problems.push(
                format!("{field}.threshold"),
                ProblemKind::OutOfRange {
                    value: threshold.to_string(),
                    expected: "a number above 0",
                },
            );
        }
        let instrument_tolerance = self
            .instrument_tolerance
            .unwrap_or(Target::DEFAULT_INSTRUMENT_TOLERANCE);
        if !(instrument_tolerance > 0.0 && instrument_tolerance <= Target::MAX_INSTRUMENT_TOLERANCE)
        {
            problems.push(
                format!("{field}.instrument_tolerance"),
                ProblemKind::OutOfRange {
                    value: instrument_tolerance.to_string(),
                    expected: "above 0 and at most 5 cycles",
                },
            );
        }
        if problems.len() > before {
            return None;
        }
        Some(Target {
            name: self.name,
            channel: self.channel,
            channel_aliases: self.channel_aliases,
            kind: self.kind,
            loinc: self.loinc,
            cutoff: Cutoff {
                op: self.cutoff.op,
                ct: cutoff_ct?,
            },
            grey_zone,
            ct_method: self.ct_method,
            threshold: self.threshold,
            instrument_tolerance,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(x: f64) -> CtValue {
        CtValue::reported(x).unwrap()
    }

    #[test]
    fn reported_value_rounds_like_the_display() {
        assert_eq!(v(40.004).to_string(), "40.00");
        assert_eq!(v(39.99).hundredths(), 3999);
        assert_eq!(v(40.0).as_f64(), 40.0);
        // 39.995 is stored just below, so it is shown (and judged) as 39.99.
        assert_eq!(v(39.995).to_string(), Ct::Determined(39.995).to_string());
        for x in [0.0, -1.0, f64::NAN, f64::INFINITY, 10_000.01, 1e300] {
            assert_eq!(CtValue::reported(x), None, "{x}");
        }
        assert_eq!(CtValue::exact(40.004), None);
        assert_eq!(CtValue::exact(37.5), Some(v(37.5)));
    }

    #[test]
    fn cutoff_operators_and_grey_zone() {
        let below = Cutoff {
            op: CutoffOp::Below,
            ct: v(40.0),
        };
        let at_or_below = Cutoff {
            op: CutoffOp::AtOrBelow,
            ..below
        };
        assert!(below.passes(v(39.99)) && !below.passes(v(40.0)) && !below.passes(v(40.004)));
        assert!(at_or_below.passes(v(40.004)) && !at_or_below.passes(v(40.01)));
        let zone = GreyZone {
            low: v(38.0),
            high: Some(v(40.0)),
        };
        assert!(zone.contains(v(38.0)) && zone.contains(v(39.99)) && !zone.contains(v(40.0)));
        let open = GreyZone {
            low: v(37.0),
            high: None,
        };
        assert!(open.contains(v(44.9)) && !open.contains(v(36.99)));
        assert_eq!(zone.to_string(), "[38.00, 40.00)");
        assert_eq!(open.to_string(), ">= 37.00");
    }

    #[test]
    fn loinc_check_digits() {
        for good in [
            "94500-6", "94311-8", "94312-6", "81326-1", "94510-5", "94511-3", "94642-6",
        ] {
            assert_eq!(check_loinc(good), Ok(()), "{good}");
        }
        assert_eq!(
            check_loinc("94500-7"),
            Err(ProblemKind::LoincCheckDigit {
                code: "94500-7".into(),
                expected: '6'
            })
        );
        for bad in [
            "",
            "94500",
            "-6",
            "94500-",
            "94500-66",
            "12345678-0",
            "9a500-6",
            "94500-x",
        ] {
            assert!(
                matches!(check_loinc(bad), Err(ProblemKind::BadLoinc { .. })),
                "{bad}"
            );
        }
    }
}
