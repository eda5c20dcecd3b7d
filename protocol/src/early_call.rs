//! Early calls: whether a specimen's result is settled before its run ends.
//!
//! A strong positive crosses its threshold long before the last cycle and
//! its curve levels off; nothing the remaining cycles add can change its
//! call. Such a result may be reported as *preliminary* while the plate is
//! still cycling, and the final analysis follows as a new version
//! (docs/runs.md, "Early call").
//!
//! The rule, per viral target of the well, at the cycles read so far:
//!
//! - it crossed the threshold (a determined Ct from the analysis of the
//!   readings so far) at least [`EarlyCallRule::margin_cycles`] cycles before
//!   the last cycle read, and
//! - its curve reached its plateau: each of the last
//!   [`EarlyCallRule::plateau_readings`] increments (reading minus the one
//!   before) is below [`EarlyCallRule::plateau_fraction`] of the curve's
//!   amplitude (highest reading minus lowest, the rise the analysis
//!   subtracts its baseline from).
//!
//! And for the well and its plate, at that cycle ([`decide`]):
//!
//! - the kit's call of the well on the readings so far is `detected`, with no
//!   curve QC hold, and every viral target of the kit is positive and settled
//!   (a tube is never called early on some of its targets);
//! - the plate's positive control has crossed and its no-template control has
//!   not, and the kit judges the plate's controls valid so far.
//!
//! A negative is never called early: "not detected" is only known once the
//! last cycle is read.
//!
//! Pure: readings and Cts in, a decision out. The caller analyses the
//! readings (`crate::run_analysis`) and keeps the state.

use serde::Serialize;

use crate::analysis::MIN_CYCLES;
use crate::interpret::{Call, TargetState};

/// The early-call rule's numbers.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct EarlyCallRule {
    /// Cycles between the crossing and the last cycle read, at least.
    pub margin_cycles: u32,
    /// How many of the last increments must be small.
    pub plateau_readings: usize,
    /// What "small" is, as a fraction of the curve's amplitude.
    pub plateau_fraction: f64,
    /// A crossing before this cycle waits for the end: a curve rising that
    /// early leaves the analysis so little baseline that its Ct may not
    /// survive more cycles (the property test found Ct 9.8 at cycle 21 that
    /// was `baseline_error`, undetermined, at cycle 45).
    pub earliest_ct: f64,
}

impl Default for EarlyCallRule {
    /// The rule proposed for review in docs/runs.md: 5 cycles, the last 3
    /// increments below 5 % of the amplitude.
    fn default() -> Self {
        EarlyCallRule {
            margin_cycles: 5,
            plateau_readings: 3,
            plateau_fraction: 0.05,
            earliest_ct: 15.0,
        }
    }
}

/// Cycles whose readings give the background level (the default baseline
/// window of `crate::analysis` starts at cycle 3; the first 10 cycles of a
/// curve crossing at 12 or later are flat).
const BACKGROUND_CYCLES: usize = 10;

/// An amplification's steepest cycle adds at least this share of its rise:
/// a sigmoid's steepest increment is amplitude / (4 x slope), 10 % for a
/// slope of 2.5 cycles (an efficiency of 1.5, as poor as a kit accepts); a
/// linear creep over L cycles adds 1/L per cycle, so one that is levelled
/// (last increments under 5 %) is below this.
const MIN_STEEPEST_SHARE: f64 = 0.08;

/// Each reading replaced by the median of itself and its two neighbours
/// (the ends kept).
fn median3(readings: &[f64]) -> Vec<f64> {
    let n = readings.len();
    (0..n)
        .map(|i| {
            if i == 0 || i + 1 == n {
                readings[i]
            } else {
                let mut three = [readings[i - 1], readings[i], readings[i + 1]];
                three.sort_by(f64::total_cmp);
                three[1]
            }
        })
        .collect()
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Whether one curve's Ct is settled, and if not, why.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "settlement", rename_all = "snake_case")]
pub enum Settlement {
    /// Crossed long enough ago and levelled off.
    Settled,
    /// No determined Ct so far.
    NotCrossed,
    /// Crossed, but fewer than the margin's cycles before the last reading.
    TooRecent { ct: f64, last_cycle: u32 },
    /// Still rising: the largest of the last increments, and the amplitude.
    Rising {
        largest_increment: f64,
        amplitude: f64,
    },
    /// Levelled, but it never rose steeply (a late linear creep, not an
    /// amplification): its steepest cycle, and the amplitude.
    NoExponentialPhase { steepest: f64, amplitude: f64 },
    /// Readings stuck at the detector's ceiling (the same highest value
    /// twice): the plateau is the instrument's, not the reaction's.
    Saturated { top: f64 },
    /// Crossed before [`EarlyCallRule::earliest_ct`]: too little baseline
    /// for the analysis to be stable as cycles are added.
    TooEarly { ct: f64 },
    /// Too few readings, or a reading that is not a number.
    Unreadable { reason: String },
}

impl Settlement {
    pub fn is_settled(&self) -> bool {
        matches!(self, Settlement::Settled)
    }
}

/// Whether the curve `readings` (cycle 1 first, every cycle read so far),
/// whose analysis of those readings gave `ct`, is settled under `rule`.
pub fn settlement(readings: &[f64], ct: Option<f64>, rule: &EarlyCallRule) -> Settlement {
    let n = readings.len();
    if n < MIN_CYCLES.max(rule.plateau_readings.saturating_add(1)) {
        return Settlement::Unreadable {
            reason: format!("{n} readings; at least {MIN_CYCLES} are needed"),
        };
    }
    if let Some(cycle) = readings.iter().position(|v| !v.is_finite()) {
        return Settlement::Unreadable {
            reason: format!("reading {} is not a number", cycle + 1),
        };
    }
    let Some(ct) = ct.filter(|c| c.is_finite() && *c > 0.0) else {
        return Settlement::NotCrossed;
    };
    let last_cycle = u32::try_from(n).unwrap_or(u32::MAX);
    if ct + f64::from(rule.margin_cycles) > f64::from(last_cycle) {
        return Settlement::TooRecent { ct, last_cycle };
    }
    // Two readings exactly at the top are the detector's ceiling, not a
    // plateau: a saturated curve's shape (and Ct) is not what it seems.
    let top = readings.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if readings.iter().filter(|&&v| v == top).count() >= 2 {
        return Settlement::Saturated { top };
    }
    // Single-cycle reading errors (a bubble, a flash) must not make a curve
    // look levelled or steep: the background, the steepest rise and the
    // plateau level are read off a median-of-3 smoothing.
    let smooth = median3(readings);
    let background = median(&smooth[..BACKGROUND_CYCLES.min(n)]);
    let level = smooth[n - rule.plateau_readings.max(1)..]
        .iter()
        .sum::<f64>()
        / rule.plateau_readings.max(1) as f64;
    let amplitude = level - background;
    let largest_increment = readings[n - rule.plateau_readings - 1..]
        .windows(2)
        .map(|w| (w[1] - w[0]).abs())
        .fold(0.0, f64::max);
    // `!(a < b)` rather than `a >= b`: an amplitude of 0, a NaN or an
    // overflow to infinity is never a plateau.
    if !(amplitude.is_finite()
        && amplitude > 0.0
        && largest_increment < rule.plateau_fraction * amplitude)
    {
        return Settlement::Rising {
            largest_increment,
            amplitude,
        };
    }
    // A slow creep levels off relative to its height too, but never had an
    // exponential phase: its steepest cycle is a small part of its rise.
    let steepest = smooth
        .windows(2)
        .map(|w| w[1] - w[0])
        .fold(f64::NEG_INFINITY, f64::max);
    // A NaN comparison is false: no exponential phase.
    let steep_enough = steepest >= MIN_STEEPEST_SHARE * amplitude;
    if !steep_enough {
        return Settlement::NoExponentialPhase {
            steepest,
            amplitude,
        };
    }
    if ct < rule.earliest_ct {
        return Settlement::TooEarly { ct };
    }
    Settlement::Settled
}

/// One kit target of a well, at the cycles read so far.
#[derive(Clone, Copy, Debug)]
pub struct TargetSoFar<'a> {
    pub name: &'a str,
    /// Viral targets decide; controls (internal, human) are not required to
    /// be settled (a strong viral signal may outcompete the internal control).
    pub viral: bool,
    /// The kit's state of the target on the readings so far.
    pub state: TargetState,
    /// Every reading so far, cycle 1 first.
    pub readings: &'a [f64],
    /// The Ct the analysis of those readings gave.
    pub ct: Option<f64>,
}

/// The plate's run controls at the cycles read so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlsSoFar {
    /// Every positive-control well has a determined Ct in every target.
    pub positive_control_crossed: bool,
    /// Some no-template-control well has a determined Ct in some target.
    pub no_template_control_crossed: bool,
    /// The kit's control rules pass on the readings so far.
    pub valid_so_far: bool,
}

/// What [`decide`] says about one well.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum EarlyDecision {
    /// Report it now as preliminary.
    CallEarly,
    /// Not now (perhaps later, or only at the end); why.
    Wait { reason: String },
}

impl EarlyDecision {
    pub fn is_early(&self) -> bool {
        matches!(self, EarlyDecision::CallEarly)
    }
}

/// Whether a well whose kit call on the readings so far is `call` (with
/// `held` true when a curve QC flag holds it for review) may be reported
/// early. See the module documentation for the rule.
pub fn decide(
    call: Call,
    held: bool,
    targets: &[TargetSoFar<'_>],
    controls: ControlsSoFar,
    rule: &EarlyCallRule,
) -> EarlyDecision {
    let wait = |reason: String| EarlyDecision::Wait { reason };
    if call != Call::Detected {
        return wait(format!(
            "the call so far is {call}; only a detected specimen is called early"
        ));
    }
    if held {
        return wait("a curve QC flag holds it for review".into());
    }
    if !controls.positive_control_crossed {
        return wait("the positive control has not crossed yet".into());
    }
    if controls.no_template_control_crossed {
        return wait("the no-template control crossed".into());
    }
    if !controls.valid_so_far {
        return wait("the run controls do not pass so far".into());
    }
    let mut viral = 0;
    for target in targets.iter().filter(|t| t.viral) {
        viral += 1;
        if target.state != TargetState::Positive {
            return wait(format!("{} is not positive so far", target.name));
        }
        match settlement(target.readings, target.ct, rule) {
            Settlement::Settled => {}
            other => {
                return wait(format!("{} is not settled: {other:?}", target.name));
            }
        }
    }
    if viral == 0 {
        return wait("no viral target".into());
    }
    EarlyDecision::CallEarly
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::model::CurveModel;
    use crate::analysis::{AnalysisSettings, analyze_curve};

    fn ct_of(readings: &[f64]) -> Option<f64> {
        analyze_curve(readings, &AnalysisSettings::default())
            .ok()
            .and_then(|r| r.ct.value())
    }

    fn strong() -> Vec<f64> {
        CurveModel {
            c_half: 20.0,
            noise_sd: 0.002,
            ..CurveModel::default()
        }
        .readings()
    }

    fn valid() -> ControlsSoFar {
        ControlsSoFar {
            positive_control_crossed: true,
            no_template_control_crossed: false,
            valid_so_far: true,
        }
    }

    #[test]
    fn a_strong_positive_settles_once_levelled_and_past_the_margin() {
        let curve = strong();
        let rule = EarlyCallRule::default();
        // Cycle 18: not crossed (or just), certainly not settled.
        assert!(!settlement(&curve[..18], ct_of(&curve[..18]), &rule).is_settled());
        // Cycle 24: crossed around 17-18 but still rising steeply.
        let at24 = settlement(&curve[..24], ct_of(&curve[..24]), &rule);
        assert!(
            matches!(
                at24,
                Settlement::Rising { .. } | Settlement::TooRecent { .. }
            ),
            "{at24:?}"
        );
        // Cycle 32: levelled for several cycles and crossed >5 cycles ago.
        assert_eq!(
            settlement(&curve[..32], ct_of(&curve[..32]), &rule),
            Settlement::Settled
        );
    }

    #[test]
    fn the_margin_counts_from_the_last_cycle_read() {
        // Flat, a jump at cycle 10, then a top rising by 0.001 a cycle.
        let flat_top: Vec<f64> = (1..=30)
            .map(|c| {
                if c < 10 {
                    1.0
                } else {
                    3.0 + 0.001 * f64::from(c)
                }
            })
            .collect();
        let rule = EarlyCallRule::default();
        assert_eq!(
            settlement(&flat_top, Some(25.5), &rule),
            Settlement::TooRecent {
                ct: 25.5,
                last_cycle: 30
            }
        );
        assert_eq!(
            settlement(&flat_top, Some(25.0), &rule),
            Settlement::Settled
        );
        assert_eq!(settlement(&flat_top, None, &rule), Settlement::NotCrossed);
    }

    #[test]
    fn bad_readings_are_unreadable_not_settled() {
        let rule = EarlyCallRule::default();
        assert!(matches!(
            settlement(&[1.0; 5], Some(1.0), &rule),
            Settlement::Unreadable { .. }
        ));
        let mut curve = strong();
        curve[30] = f64::NAN;
        assert!(matches!(
            settlement(&curve, Some(18.0), &rule),
            Settlement::Unreadable { .. }
        ));
        // A flat line (or a creep) never had an exponential phase.
        let flat: Vec<f64> = (0..40).map(|c| 2.0 + 1e-6 * f64::from(c)).collect();
        assert!(matches!(
            settlement(&flat, Some(20.0), &rule),
            Settlement::NoExponentialPhase { .. }
        ));
        // Readings stuck at the detector's ceiling: not a plateau.
        let mut stuck = strong();
        let top = stuck.iter().copied().fold(f64::MIN, f64::max);
        for v in &mut stuck[40..] {
            *v = top;
        }
        assert!(matches!(
            settlement(&stuck, ct_of(&stuck), &rule),
            Settlement::Saturated { .. }
        ));
        // A crossing before cycle 15 waits for the end.
        let early = CurveModel {
            c_half: 14.0,
            noise_sd: 0.002,
            ..CurveModel::default()
        }
        .readings();
        assert!(matches!(
            settlement(&early, Some(11.0), &rule),
            Settlement::TooEarly { .. }
        ));
    }

    fn target<'a>(readings: &'a [f64], state: TargetState, viral: bool) -> TargetSoFar<'a> {
        TargetSoFar {
            name: if viral { "N" } else { "IC" },
            viral,
            state,
            readings,
            ct: ct_of(readings),
        }
    }

    #[test]
    fn only_a_detected_well_on_a_plate_whose_controls_behave_is_called_early() {
        let curve = strong();
        let so_far = &curve[..34];
        let rule = EarlyCallRule::default();
        let n = target(so_far, TargetState::Positive, true);
        // The internal control need not be settled (nor positive).
        let ic = target(&so_far[..34], TargetState::Negative, false);
        assert!(decide(Call::Detected, false, &[n, ic], valid(), &rule).is_early());
        // Never a negative, an inconclusive, a held well.
        for call in [
            Call::NotDetected,
            Call::Inconclusive,
            Call::Retest,
            Call::Invalid,
        ] {
            assert!(!decide(call, false, &[n, ic], valid(), &rule).is_early());
        }
        assert!(!decide(Call::Detected, true, &[n], valid(), &rule).is_early());
        // Controls: PC not crossed, NTC crossed, or controls failing.
        for controls in [
            ControlsSoFar {
                positive_control_crossed: false,
                ..valid()
            },
            ControlsSoFar {
                no_template_control_crossed: true,
                ..valid()
            },
            ControlsSoFar {
                valid_so_far: false,
                ..valid()
            },
        ] {
            assert!(!decide(Call::Detected, false, &[n], controls, &rule).is_early());
        }
        // Every viral target must be settled: a second one still rising holds it.
        let late = CurveModel {
            c_half: 31.0,
            noise_sd: 0.002,
            ..CurveModel::default()
        }
        .readings();
        let rising = target(&late[..34], TargetState::Positive, true);
        let d = decide(Call::Detected, false, &[n, rising], valid(), &rule);
        assert!(!d.is_early(), "{d:?}");
        // No viral target at all: nothing to call.
        assert!(!decide(Call::Detected, false, &[ic], valid(), &rule).is_early());
    }
}
