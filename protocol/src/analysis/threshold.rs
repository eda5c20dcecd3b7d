//! One threshold for every curve of a target in a run.
//!
//! Per-curve automatic thresholds (10 × each curve's own noise SD) scatter
//! replicates: a noise SD estimated from 13 baseline cycles is uncertain by
//! about 20 %, and a threshold 20 % higher moves the Ct by
//! ln 1.2 / ln E ≈ 0.26 cycles at E = 2. Instruments therefore set one
//! threshold per target (the "auto threshold" of ABI and Bio-Rad software),
//! and LinRegPCR sets one inside a per-target window of linearity (Ruijter
//! et al. 2009; rdmlpython `_lrp_setWoL`, where it is half the window's
//! upper limit). Ruijter et al. 2013 compare quantification methods at one
//! threshold per target for the same reason.

use super::numeric::{self, Need, Prepared, cp};
use super::{AUTO_THRESHOLD_SDS, AnalysisError, AnalysisSettings, Ct, Method};

/// The exponential-phase candidate is this share of the median corrected
/// fluorescence at the amplifying curves' second-derivative maximum as the
/// 9-point Savitzky–Golay filter of the Cp method finds it.
///
/// The true maximum marks the top of the exponential phase (LinRegPCR's
/// "stop cycle" is found the same way); for a logistic it is at 21 % of the
/// plateau. The filter places it about a cycle early, at roughly half that
/// fluorescence, so taking the filtered maximum as it is puts the threshold
/// near half the top of the exponential phase (LinRegPCR puts its threshold
/// at half its window's top) and near 10 % of the plateau, where kit
/// thresholds usually sit. Measured on the synthetic dilution series of
/// `tests/analysis_common_threshold.rs` (noise 0.4 % of the plateau, wells
/// ±15 % in plateau): mean replicate SD 0.099 cycles at 0.5 × this, 0.059
/// at 1 ×, 0.048 at 1.5 × (17 % of the plateau), against 0.27 with per-curve
/// automatic thresholds. Higher is more precise on a logistic, but on real
/// curves the upper exponential phase is where wells start to differ in
/// efficiency, so this stays at 1.
const KNEE_SHARE: f64 = 1.0;

/// A threshold common to all `curves` of one target in a run, on the
/// baseline-corrected scale of [`analyze_curve`](super::analyze_curve):
/// pass it back as [`AnalysisSettings::fixed_threshold`] to analyse each
/// curve.
///
/// The threshold is the larger of two candidates:
///
/// * **above the noise**: [`AUTO_THRESHOLD_SDS`] × the median, over all
///   curves, of the baseline residual SD (§6 (b) for a whole run; the
///   median so that a few noisy wells or a baseline-error well do not
///   decide it, and the residual SD rather than the robust estimate that a
///   rise inflates);
/// * **in the lower exponential phase**: the median corrected
///   fluorescence at the second-derivative maximum (as the Cp method's
///   9-point filter finds it, about a cycle early, at roughly half the top
///   of the exponential phase) of the curves that amplified (their Ct
///   determined at their own automatic threshold).
///
/// The first keeps negatives and noise below the threshold; the second puts
/// it where the curves are still exponential and several noise SDs high,
/// so that replicates cross it at the same point of their rise and Cq is
/// linear in log10(copies) (a threshold near the plateau would mix in each
/// well's plateau height). On real SYBR data (baseline 0.3–1, plateau 2–6,
/// 40–50 cycles) the second candidate normally wins, at about a tenth of
/// the plateau.
///
/// If `settings` already fix the threshold, that is the answer. Curves that
/// cannot be analysed (too short, a NaN reading, a window that does not fit
/// them) are left out, as they would be reported with their own error; if
/// no curve can be analysed the first such error is returned. `Ok(None)`:
/// no curves, or nothing to put a threshold on (every curve perfectly
/// flat).
pub fn common_threshold(
    curves: &[&[f64]],
    settings: &AnalysisSettings,
) -> Result<Option<f64>, AnalysisError> {
    if let Some(t) = settings.fixed_threshold {
        if !(t.is_finite() && t > 0.0) {
            return Err(AnalysisError::BadThreshold { value: t });
        }
        return Ok(Some(t));
    }
    let mut chooser = Chooser::new(settings, curves.len());
    for &curve in curves {
        let prepared = numeric::prepare(curve, &chooser.auto);
        chooser.add(curve, &prepared);
    }
    chooser.threshold()
}

/// [`common_threshold`] one curve at a time, on curves already prepared
/// (`numeric::prepare`), so that a run that goes on to read every curve at
/// the chosen threshold prepares each curve once, not twice.
pub(crate) struct Chooser {
    /// The automatic-threshold settings each curve is read at.
    auto: AnalysisSettings,
    noise: Vec<f64>,
    knees: Vec<f64>,
    first_error: Option<AnalysisError>,
    /// Scratch, reused from curve to curve.
    corrected: Vec<f64>,
}

impl Chooser {
    /// For curves of one target analysed with `settings` (its fixed
    /// threshold and method are not used: curves are read at their
    /// automatic threshold).
    pub(crate) fn new(settings: &AnalysisSettings, curves: usize) -> Self {
        Chooser {
            auto: AnalysisSettings {
                method: Method::Threshold,
                fixed_threshold: None,
                ..settings.clone()
            },
            noise: Vec::with_capacity(curves),
            knees: Vec::new(),
            first_error: None,
            corrected: Vec::new(),
        }
    }

    /// One more curve: its baseline noise, and its knee if it amplified.
    /// `prepared` must come from `numeric::prepare` with the same baseline
    /// window as `settings` in [`Chooser::new`].
    pub(crate) fn add(&mut self, curve: &[f64], prepared: &Result<Prepared, AnalysisError>) {
        let prepared = match numeric::admit(prepared, curve.len(), &self.auto) {
            Ok(prepared) => prepared,
            Err(e) => {
                self.first_error.get_or_insert(e);
                return;
            }
        };
        self.corrected.clear();
        self.corrected.resize(curve.len(), 0.0);
        // Only whether the curve amplified counts here, not its Ct.
        let result = numeric::finish(
            curve,
            prepared,
            &self.auto,
            &mut self.corrected,
            Need::Acceptance,
        );
        let line = result.baseline;
        if line.residual_sd.is_finite() {
            self.noise.push(line.residual_sd);
        }
        if let Ct::Determined(_) = result.ct {
            // The knee is read off the curve less its line alone (spikes
            // left in), as it always has been.
            for (k, (c, &v)) in self.corrected.iter_mut().zip(curve).enumerate() {
                *c = v - line.intercept - line.slope * (k + 1) as f64;
            }
            if let Some(knee) = cp(&self.corrected, line.window_start, line.residual_sd)
                .and_then(|cycle| value_at(&self.corrected, cycle))
                .filter(|v| v.is_finite() && *v > 0.0)
            {
                self.knees.push(knee);
            }
        }
    }

    /// The threshold (see [`common_threshold`]).
    pub(crate) fn threshold(mut self) -> Result<Option<f64>, AnalysisError> {
        if self.noise.is_empty() {
            return self.first_error.map_or(Ok(None), Err);
        }
        let above_noise = AUTO_THRESHOLD_SDS * median(&mut self.noise);
        let in_exponential_phase = if self.knees.is_empty() {
            0.0
        } else {
            KNEE_SHARE * median(&mut self.knees)
        };
        let threshold = above_noise.max(in_exponential_phase);
        Ok((threshold.is_finite() && threshold > 0.0).then_some(threshold))
    }
}

/// The corrected curve at a real (1-based) cycle, linearly interpolated.
fn value_at(corrected: &[f64], cycle: f64) -> Option<f64> {
    let position = cycle - 1.0;
    if position.is_nan() || position < 0.0 {
        return None;
    }
    let index = position.floor() as usize;
    let fraction = position - index as f64;
    let here = *corrected.get(index)?;
    let next = corrected.get(index + 1).copied().unwrap_or(here);
    Some(here + fraction * (next - here))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_unstable_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        len if len % 2 == 1 => values[len / 2],
        len => (values[len / 2 - 1] + values[len / 2]) / 2.0,
    }
}
