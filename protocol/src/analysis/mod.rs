//! Ct analysis of real-time PCR amplification curves (protocols.md §6).
//!
//! Pure functions over `&[f64]`: one fluorescence reading per cycle, cycle 1
//! first. [`analyze_curve`] fits and subtracts a per-curve baseline, picks a
//! threshold (fixed from the kit, or automatic), finds the first accepted
//! crossing (or the second-derivative maximum, Cp) and raises QC flags.
//! [`common_threshold`] chooses one threshold for all curves of a target in
//! a run; [`compare_instrument`] checks a Ct against the cycler's own.
//!
//! The Ct is a threshold-crossing Ct, read off a local fit of the points
//! around the crossing rather than two readings, over a baseline whose
//! window ends just before each curve's rise (see the `numeric` module's
//! documentation for how and why, and `tests/analysis_accuracy.rs` for what
//! it achieves on a defined synthetic population).
//!
//! What this module does not do: LinRegPCR's per-target efficiency and N0,
//! multi-channel crosstalk correction, or deciding what a flag means for
//! release (the caller does).
//!
//! A curve that did not amplify gives [`Ct::Undetermined`], never 0, 40 or
//! NaN. Bad input (empty, too short, a NaN reading) is an [`AnalysisError`],
//! never a panic and never a made-up Ct.

mod numeric;
mod threshold;

pub mod model;

pub use threshold::common_threshold;

// For `run_analysis`, which prepares each curve once for both thresholds.
pub(crate) use numeric::{Need, Prepared, admit, finish, prepare};
pub(crate) use threshold::Chooser;

use std::fmt;

use serde::{Deserialize, Serialize};

/// Fewest cycles we analyse: a 3..=15 baseline plus a rise needs more, but
/// below 10 there is not even room for a minimal baseline and a crossing.
pub const MIN_CYCLES: usize = 10;

/// Fewest cycles for the Cp method: the 9-point Savitzky–Golay filter and
/// the ±3 refinement need room on both sides of the peak (protocols.md §6,
/// "≥ 18 cycles").
pub const MIN_CYCLES_CP: usize = 18;

/// Fewest cycles in a baseline window once it has been shortened for an
/// early riser: a line through fewer points says little about noise.
pub const MIN_BASELINE_POINTS: usize = 5;

/// The quantification cycle of one curve.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Option<f64>", into = "Option<f64>")]
pub enum Ct {
    /// The curve crossed the threshold (or had its Cp) at this real cycle.
    Determined(f64),
    /// No accepted crossing within the cycles run: target not detected at
    /// this threshold. Not a number, and never stored as 40 or 45.
    Undetermined,
}

impl Ct {
    /// The cycle, if determined.
    pub fn value(self) -> Option<f64> {
        match self {
            Ct::Determined(v) => Some(v),
            Ct::Undetermined => None,
        }
    }
}

impl fmt::Display for Ct {
    /// Two decimals, as reported (protocols.md §6), or "Undetermined".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ct::Determined(v) => write!(f, "{v:.2}"),
            Ct::Undetermined => f.write_str("Undetermined"),
        }
    }
}

impl From<Ct> for Option<f64> {
    fn from(ct: Ct) -> Self {
        ct.value()
    }
}

impl TryFrom<Option<f64>> for Ct {
    type Error = CtError;

    fn try_from(value: Option<f64>) -> Result<Self, Self::Error> {
        match value {
            None => Ok(Ct::Undetermined),
            Some(v) if v.is_finite() && v > 0.0 => Ok(Ct::Determined(v)),
            Some(v) => Err(CtError::NotACycle { value: v }),
        }
    }
}

/// Why a stored number is not a Ct.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CtError {
    /// Zero, negative or not finite: "none" must be `null`, not a sentinel.
    #[error("Ct {value} is not a cycle number; use null for Undetermined")]
    NotACycle {
        /// The value given.
        value: f64,
    },
}

/// How the Ct is read off the corrected curve.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// First accepted threshold crossing, read off a local fit of the
    /// readings around it (two-point log-linear interpolation where there
    /// are too few).
    Threshold,
    /// Second-derivative maximum (Cp): threshold-free but offset from Ct.
    Cp,
}

/// How an analysis is done. `Default` is the threshold method with an
/// automatic threshold and a 3..=15 baseline window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnalysisSettings {
    /// Threshold crossing or Cp.
    pub method: Method,
    /// A fixed threshold on the baseline-corrected curve (the kit's
    /// validated value; §6 recommends this for diagnostics). `None` means
    /// automatic: [`AUTO_THRESHOLD_SDS`] × the noise SD, the larger of the
    /// baseline residuals' SD and a robust SD from the median absolute
    /// cycle-to-cycle difference (reported as [`CurveResult::noise_sd`]).
    pub fixed_threshold: Option<f64>,
    /// First cycle of the default baseline window (1-based, inclusive).
    pub baseline_start: usize,
    /// Last cycle of the default baseline window (inclusive). Used as it is
    /// for a curve that does not rise; see `adaptive_baseline` for one that
    /// does.
    pub baseline_end: usize,
    /// For a rising curve, end the window a little before the rise (where
    /// the rise, extrapolated back, is an eighth of the threshold: 3–4
    /// cycles before the crossing), earlier or later than `baseline_end`,
    /// with what is left of the rise in the window subtracted: the line is
    /// then fitted over every flat cycle and extrapolated over as few
    /// cycles as possible. `false` keeps the
    /// configured end unless the rise reaches into it (early risers: §6
    /// requires ending the window before the rise either way), for
    /// comparison with software that used a fixed window.
    pub adaptive_baseline: bool,
}

impl Default for AnalysisSettings {
    fn default() -> Self {
        AnalysisSettings {
            method: Method::Threshold,
            fixed_threshold: None,
            baseline_start: 3,
            baseline_end: 15,
            adaptive_baseline: true,
        }
    }
}

/// Automatic threshold in SDs of the baseline residuals (protocols.md §6 (b)).
pub const AUTO_THRESHOLD_SDS: f64 = 10.0;

/// The automatic threshold is at least this fraction of the corrected
/// curve's span, so a noise-free synthetic curve does not get a threshold
/// of zero (which every rounding error would cross).
pub const AUTO_THRESHOLD_FLOOR_OF_SPAN: f64 = 0.01;

/// The baseline line fitted to one curve. For a rising curve the window is
/// the one of the last pass, which may end before or after the configured
/// end (see [`AnalysisSettings::adaptive_baseline`]).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    /// Fitted value at cycle 0.
    pub intercept: f64,
    /// Fitted change per cycle.
    pub slope: f64,
    /// First cycle of the window used (1-based, inclusive).
    pub window_start: usize,
    /// Last cycle of the window used (inclusive).
    pub window_end: usize,
    /// SD of the residuals in the window (spike cycles left out).
    pub residual_sd: f64,
}

/// A curve QC finding. Each blocks release of the well until a person has
/// looked (protocols.md §6, "Curve QC failures").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum QcFlag {
    /// Fixed threshold less than [`AUTO_THRESHOLD_SDS`] SDs of the baseline
    /// residuals ([`Baseline::residual_sd`]) above the baseline: noise alone
    /// may cross it.
    NoisyBaseline,
    /// The fitted baseline moves by more than the threshold over the run
    /// (drift or bleaching; it was subtracted, but check the well).
    Drift,
    /// A single reading stands more than 8 robust SDs (from the
    /// cycle-to-cycle differences) above or below both
    /// neighbours. It is left out of the baseline and replaced by the mean of
    /// its neighbours when looking for a crossing, so it cannot be one.
    Spike,
    /// An accepted curve still rises at the end: the last cycle's increase is
    /// more than half the steepest increase, so it has not levelled off.
    NoPlateau,
    /// The highest reading repeats exactly on 3 or more cycles: the detector
    /// was at its ceiling.
    Saturation,
    /// The curve crossed the threshold but did not reach [`GROWTH_FACTOR`]
    /// times it within [`GROWTH_CYCLES`] cycles (or before the run ended): a linear creep
    /// or a too-late rise, not exponential amplification. Ct is Undetermined.
    LateWeakRise,
    /// The rise reaches into the baseline window even after shortening it to
    /// [`MIN_BASELINE_POINTS`] cycles, so no baseline can be trusted. Ct is
    /// Undetermined; the well needs a look (or a re-run diluted).
    BaselineError,
    /// pcrd's Ct and the instrument's differ by more than the validated
    /// tolerance, or one is Undetermined and the other not (protocols.md
    /// §6, "pcrd Ct vs instrument Ct beyond a validated tolerance"). Raised
    /// by [`compare_instrument`], not by [`analyze_curve`].
    InstrumentDisagreement,
}

/// Default for [`compare_instrument`]'s tolerance, in cycles: the top of the
/// 0.2–0.5 range protocols.md §6 suggests (marked unverified there), until
/// a lab validates its own per instrument and kit.
pub const DEFAULT_INSTRUMENT_TOLERANCE: f64 = 0.5;

/// Compares pcrd's Ct with the one the instrument reported for the same
/// well and target, and returns [`QcFlag::InstrumentDisagreement`] if they
/// differ by more than `tolerance` cycles, or if one is Undetermined and
/// the other not.
///
/// `instrument` is `None` when the instrument reported nothing to compare
/// (no Cq in the export): that is no disagreement. Both values are compared
/// as reported, rounded to 2 decimals (§6: "compare cut-offs on the value
/// rounded as reported"), so that a person checking the flag against the
/// two printed Cts sees why it was raised. A tolerance that is negative or
/// not a number is a configuration slip, and [`DEFAULT_INSTRUMENT_TOLERANCE`]
/// is used instead of silently flagging everything or nothing.
pub fn compare_instrument(ct: Ct, instrument: Option<Ct>, tolerance: f64) -> Option<QcFlag> {
    let tolerance = if tolerance.is_finite() && tolerance >= 0.0 {
        tolerance
    } else {
        DEFAULT_INSTRUMENT_TOLERANCE
    };
    let round = |v: f64| (v * 100.0).round() / 100.0;
    let disagree = match (ct, instrument?) {
        (Ct::Undetermined, Ct::Undetermined) => false,
        (Ct::Determined(_), Ct::Undetermined) | (Ct::Undetermined, Ct::Determined(_)) => true,
        // The tiny allowance keeps a difference of exactly the tolerance
        // (in printed decimals) from flagging through binary rounding.
        (Ct::Determined(a), Ct::Determined(b)) => (round(a) - round(b)).abs() > tolerance + 1e-9,
    };
    disagree.then_some(QcFlag::InstrumentDisagreement)
}

/// An accepted crossing must reach [`GROWTH_FACTOR`] × threshold within this
/// many cycles (or by the end of the run, if sooner).
pub const GROWTH_CYCLES: usize = 4;

/// See [`GROWTH_CYCLES`]. Amplification at efficiency ≥ 1.32 triples in 4
/// cycles, and a kit threshold sits low enough under the plateau (≤ 20 %)
/// that the sigmoid's slowing still gets there; a linear creep that only
/// just reached T after many cycles needs twice as many again to triple it.
pub const GROWTH_FACTOR: f64 = 3.0;

/// Everything `analyze_curve` found out about one curve.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CurveResult {
    /// The Ct (or Cp, per `method`).
    pub ct: Ct,
    /// Method used.
    pub method: Method,
    /// Threshold used on the corrected curve (also for acceptance under Cp).
    pub threshold: f64,
    /// Whether `threshold` was fixed by the settings (false: automatic).
    pub threshold_fixed: bool,
    /// Noise SD the automatic threshold is based on: the larger of the
    /// baseline residuals' SD and the robust cycle-to-cycle estimate (which
    /// a positive's rise inflates, by about 1.8 × on the synthetic positives
    /// of the accuracy test, so automatic thresholds sit higher on positives
    /// than 10 residual SDs; [`common_threshold`] avoids that for a run).
    pub noise_sd: f64,
    /// The baseline subtracted.
    pub baseline: Baseline,
    /// QC findings, sorted, without repeats.
    pub flags: Vec<QcFlag>,
}

/// Why a curve could not be analysed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum AnalysisError {
    /// No readings at all (an empty export column, a well never read).
    #[error("curve has no readings")]
    Empty,
    /// Too few cycles for a baseline and a crossing (a run aborted early?).
    #[error("curve has {cycles} cycles; at least {min} are needed for {method:?}")]
    TooFewCycles {
        /// Readings given.
        cycles: usize,
        /// Readings needed.
        min: usize,
        /// Method asked for.
        method: Method,
    },
    /// A reading is NaN or infinite (an export glitch or a saturated
    /// detector written as "inf").
    #[error("reading at cycle {cycle} is {value}, not a finite number")]
    NonFinite {
        /// 1-based cycle.
        cycle: usize,
        /// The reading.
        value: f64,
    },
    /// The fixed threshold is zero, negative or not finite.
    #[error("fixed threshold {value} must be a positive finite number")]
    BadThreshold {
        /// The value configured.
        value: f64,
    },
    /// The baseline window is empty, starts at cycle 0, or leaves no cycles
    /// after it in this curve.
    #[error(
        "baseline window {start}..={end} does not fit a {cycles}-cycle curve \
         (need 1 <= start, start + {min} - 1 <= end, end < cycles)",
        min = MIN_BASELINE_POINTS
    )]
    BadBaselineWindow {
        /// First cycle configured.
        start: usize,
        /// Last cycle configured (after clamping to the curve).
        end: usize,
        /// Readings in the curve.
        cycles: usize,
    },
}

/// Analyses one curve. See the module documentation and [`QcFlag`] for the
/// rules; protocols.md §6 for their sources.
pub fn analyze_curve(
    readings: &[f64],
    settings: &AnalysisSettings,
) -> Result<CurveResult, AnalysisError> {
    numeric::analyze(readings, settings)
}

#[cfg(test)]
mod tests {
    use super::model::CurveModel;
    use super::*;

    fn fixed(t: f64) -> AnalysisSettings {
        AnalysisSettings {
            fixed_threshold: Some(t),
            ..AnalysisSettings::default()
        }
    }

    #[test]
    fn ct_serialises_as_a_number_or_null_and_rejects_sentinels() {
        let json = serde_json::to_string(&[Ct::Determined(23.5), Ct::Undetermined]).unwrap();
        assert_eq!(json, "[23.5,null]");
        let back: Vec<Ct> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, [Ct::Determined(23.5), Ct::Undetermined]);
        assert!(serde_json::from_str::<Ct>("0.0").is_err());
        assert!(serde_json::from_str::<Ct>("-3").is_err());
        assert_eq!(Ct::Determined(23.456).to_string(), "23.46");
        assert_eq!(Ct::Undetermined.to_string(), "Undetermined");
    }

    #[test]
    fn settings_default_what_is_left_out_and_reject_unknown_keys() {
        let s: AnalysisSettings =
            serde_json::from_str(r#"{"method":"cp","fixed_threshold":0.2}"#).unwrap();
        assert_eq!(s.method, Method::Cp);
        assert_eq!(s.fixed_threshold, Some(0.2));
        assert_eq!((s.baseline_start, s.baseline_end), (3, 15));
        assert!(s.adaptive_baseline);
        assert!(serde_json::from_str::<AnalysisSettings>(r#"{"treshold":0.2}"#).is_err());
    }

    #[test]
    fn flags_and_methods_serialise_in_snake_case() {
        let json = serde_json::to_string(&[QcFlag::NoisyBaseline, QcFlag::LateWeakRise]).unwrap();
        assert_eq!(json, r#"["noisy_baseline","late_weak_rise"]"#);
        assert_eq!(serde_json::to_string(&Method::Cp).unwrap(), r#""cp""#);
    }

    #[test]
    fn clean_positive_gets_its_analytic_ct_with_no_flags() {
        let model = CurveModel::default();
        let result = analyze_curve(&model.readings(), &fixed(0.2)).unwrap();
        let expected = model.crossing_cycle(0.2).unwrap();
        let ct = result.ct.value().unwrap();
        assert!((ct - expected).abs() < 0.02, "{ct} vs {expected}");
        assert_eq!(result.flags, []);
        // The window ends about 4 cycles before the crossing (at 24.7), not
        // at the configured 15.
        assert_eq!(
            (result.baseline.window_start, result.baseline.window_end),
            (3, 21)
        );
        assert!((result.baseline.intercept - 1.0).abs() < 1e-3);
    }

    #[test]
    fn a_fixed_window_is_kept_unless_the_rise_reaches_it() {
        let settings = AnalysisSettings {
            adaptive_baseline: false,
            ..fixed(0.2)
        };
        let late = analyze_curve(&CurveModel::default().readings(), &settings).unwrap();
        assert_eq!(
            (late.baseline.window_start, late.baseline.window_end),
            (3, 15)
        );
        let early = CurveModel {
            c_half: 17.0,
            ..CurveModel::default()
        };
        let early = analyze_curve(&early.readings(), &settings).unwrap();
        assert!(early.baseline.window_end < 12, "{early:?}");
        let expected = CurveModel {
            c_half: 17.0,
            ..CurveModel::default()
        }
        .crossing_cycle(0.2)
        .unwrap();
        let ct = early.ct.value().unwrap();
        assert!((ct - expected).abs() < 0.05, "{ct} vs {expected}");
    }

    #[test]
    fn instrument_disagreement_is_beyond_the_tolerance_as_reported() {
        let d = Ct::Determined;
        let tol = DEFAULT_INSTRUMENT_TOLERANCE;
        assert_eq!(compare_instrument(d(25.0), None, tol), None);
        assert_eq!(compare_instrument(Ct::Undetermined, None, tol), None);
        assert_eq!(
            compare_instrument(Ct::Undetermined, Some(Ct::Undetermined), tol),
            None
        );
        let flag = Some(QcFlag::InstrumentDisagreement);
        assert_eq!(
            compare_instrument(d(38.2), Some(Ct::Undetermined), tol),
            flag
        );
        assert_eq!(
            compare_instrument(Ct::Undetermined, Some(d(38.2)), tol),
            flag
        );
        assert_eq!(compare_instrument(d(25.0), Some(d(25.5)), tol), None);
        assert_eq!(compare_instrument(d(25.5), Some(d(25.0)), tol), None);
        assert_eq!(compare_instrument(d(25.0), Some(d(25.51)), tol), flag);
        // Compared as reported: 25.004 prints as 25.00, 25.504 as 25.50.
        assert_eq!(compare_instrument(d(25.004), Some(d(25.504)), tol), None);
        assert_eq!(compare_instrument(d(25.0), Some(d(25.25)), 0.2), flag);
        // A broken tolerance falls back to the default, not to "never".
        assert_eq!(compare_instrument(d(25.0), Some(d(27.0)), f64::NAN), flag);
        assert_eq!(compare_instrument(d(25.0), Some(d(25.3)), -1.0), None);
        let json = serde_json::to_string(&QcFlag::InstrumentDisagreement).unwrap();
        assert_eq!(json, r#""instrument_disagreement""#);
    }

    #[test]
    fn linear_drift_is_subtracted() {
        let flat = CurveModel::default();
        let drifting = CurveModel {
            drift: 0.02,
            ..CurveModel::default()
        };
        let a = analyze_curve(&flat.readings(), &fixed(0.2)).unwrap();
        let b = analyze_curve(&drifting.readings(), &fixed(0.2)).unwrap();
        let (a, b_ct) = (a.ct.value().unwrap(), b.ct.value().unwrap());
        assert!((a - b_ct).abs() < 0.01, "{a} vs {b_ct}");
        assert!((b.baseline.slope - 0.02).abs() < 1e-3);
        assert!(b.flags.contains(&QcFlag::Drift));
    }

    #[test]
    fn early_riser_gets_a_shorter_window() {
        let model = CurveModel {
            c_half: 17.0,
            ..CurveModel::default()
        };
        let result = analyze_curve(&model.readings(), &fixed(0.2)).unwrap();
        assert!(result.baseline.window_end < 15, "{result:?}");
        assert!(result.ct.value().is_some());
        assert!(!result.flags.contains(&QcFlag::BaselineError));
    }

    #[test]
    fn rise_inside_the_minimal_window_is_a_baseline_error_not_a_ct() {
        let model = CurveModel {
            c_half: 6.0,
            slope: 1.0,
            ..CurveModel::default()
        };
        let result = analyze_curve(&model.readings(), &fixed(0.2)).unwrap();
        assert_eq!(result.ct, Ct::Undetermined);
        assert!(result.flags.contains(&QcFlag::BaselineError), "{result:?}");
    }

    #[test]
    fn ceiling_is_flagged_as_saturation() {
        let model = CurveModel {
            ceiling: Some(2.5),
            ..CurveModel::default()
        };
        let result = analyze_curve(&model.readings(), &fixed(0.2)).unwrap();
        assert!(result.ct.value().is_some());
        assert!(result.flags.contains(&QcFlag::Saturation), "{result:?}");
    }

    #[test]
    fn curve_still_rising_at_the_end_has_no_plateau() {
        let model = CurveModel {
            c_half: 44.0,
            ..CurveModel::default()
        };
        let result = analyze_curve(&model.readings(), &fixed(0.2)).unwrap();
        assert!(result.ct.value().is_some(), "{result:?}");
        assert!(result.flags.contains(&QcFlag::NoPlateau), "{result:?}");
    }

    #[test]
    fn noise_near_a_fixed_threshold_is_flagged() {
        let model = CurveModel {
            noise_sd: 0.05,
            ..CurveModel::default()
        };
        let result = analyze_curve(&model.readings(), &fixed(0.2)).unwrap();
        assert!(result.flags.contains(&QcFlag::NoisyBaseline), "{result:?}");
    }

    #[test]
    fn cp_is_near_the_sigmoids_second_derivative_maximum() {
        // For a logistic the second derivative peaks at
        // c_half - slope·ln(2 + √3).
        // The 9-point filter is wide against a real curve: it blends the
        // peak with the trough 2.6 slopes later and pulls the peak about a
        // cycle early (the unrefined filter peak, computed independently, is
        // at cycle 25 for slope 1.5 and 24 for slope 2.5). That offset is
        // why §6 says Cp is "offset from Ct".
        let bounds = [(1.5, 24.6, 25.6), (2.5, 23.3, 24.3)];
        let settings = AnalysisSettings {
            method: Method::Cp,
            ..fixed(0.2)
        };
        for (slope, low, high) in bounds {
            let model = CurveModel {
                noise_sd: 0.002,
                slope,
                ..CurveModel::default()
            };
            let result = analyze_curve(&model.readings(), &settings).unwrap();
            let expected = model.c_half - model.slope * (2.0 + 3f64.sqrt()).ln();
            let cp = result.ct.value().unwrap();
            assert!(
                (low..=high).contains(&cp) && cp < expected,
                "{cp} vs {expected}"
            );
        }
        // Too short for Cp.
        assert!(matches!(
            analyze_curve(&[0.0; 17], &settings),
            Err(AnalysisError::TooFewCycles { min: 18, .. })
        ));
    }

    #[test]
    fn bad_settings_are_typed_errors() {
        let readings = CurveModel::default().readings();
        assert_eq!(
            analyze_curve(&readings, &fixed(0.0)),
            Err(AnalysisError::BadThreshold { value: 0.0 })
        );
        let settings = AnalysisSettings {
            baseline_start: 0,
            ..AnalysisSettings::default()
        };
        assert!(matches!(
            analyze_curve(&readings, &settings),
            Err(AnalysisError::BadBaselineWindow { .. })
        ));
    }
}
