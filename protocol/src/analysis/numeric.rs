//! The arithmetic behind [`super::analyze_curve`]: baseline fit, threshold,
//! crossing, Cp and QC. Indices here are 0-based (`k` is cycle `k + 1`);
//! everything that leaves the module is in 1-based cycles.

use std::collections::BTreeSet;

use super::{
    AUTO_THRESHOLD_FLOOR_OF_SPAN, AUTO_THRESHOLD_SDS, AnalysisError, AnalysisSettings, Baseline,
    Ct, CurveResult, GROWTH_CYCLES, GROWTH_FACTOR, MIN_BASELINE_POINTS, MIN_CYCLES, MIN_CYCLES_CP,
    Method, QcFlag,
};

/// Savitzky–Golay 9-point quadratic second-derivative weights, divided by
/// [`SG_NORM`] (protocols.md §6, after openreadout-qpcr).
const SG_D2: [f64; 9] = [28.0, 7.0, -8.0, -17.0, -20.0, -17.0, -8.0, 7.0, 28.0];
const SG_NORM: f64 = 462.0;

/// A Cp needs a second-derivative peak this many SDs of the
/// second-derivative noise above zero (§6: "50 SD").
const CP_PEAK_SDS: f64 = 50.0;

/// Baseline passes for early risers (§6: "≤ 3 passes").
const BASELINE_PASSES: usize = 3;

/// The window ends this many cycles before the first crossing estimate.
const BASELINE_GAP: usize = 3;

/// A reading is a spike if it stands this many robust SDs beyond both
/// neighbours.
const SPIKE_SDS: f64 = 8.0;

pub(super) fn analyze(
    readings: &[f64],
    settings: &AnalysisSettings,
) -> Result<CurveResult, AnalysisError> {
    let n = readings.len();
    if n == 0 {
        return Err(AnalysisError::Empty);
    }
    let min = match settings.method {
        Method::Threshold => MIN_CYCLES,
        Method::Cp => MIN_CYCLES_CP,
    };
    if n < min {
        return Err(AnalysisError::TooFewCycles {
            cycles: n,
            min,
            method: settings.method,
        });
    }
    if let Some((k, &value)) = readings.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(AnalysisError::NonFinite {
            cycle: k + 1,
            value,
        });
    }
    if let Some(t) = settings.fixed_threshold
        && !(t.is_finite() && t > 0.0)
    {
        return Err(AnalysisError::BadThreshold { value: t });
    }
    // Leave at least two cycles after the window: a crossing needs F(i) and
    // F(i + 1).
    let start = settings.baseline_start;
    let mut end = settings.baseline_end.min(n - 2);
    if start == 0 || end + 1 < start + MIN_BASELINE_POINTS {
        return Err(AnalysisError::BadBaselineWindow {
            start,
            end,
            cycles: n,
        });
    }

    let mut flags = BTreeSet::new();
    let (spikes, robust_sd) = find_spikes(readings);
    if spikes.iter().any(|&s| s) {
        flags.insert(QcFlag::Spike);
    }

    // Fit, look for the rise, and pull the window's end back to a few cycles
    // before it if the rise reaches into the window (early risers).
    let mut baseline_error = false;
    let (mut fit, mut corrected, mut threshold, mut noise_sd);
    let mut pass = 0;
    loop {
        fit = fit_line(readings, start, end, &spikes);
        corrected = subtract(readings, &fit);
        // A spike can neither be a crossing nor make a creep look like
        // growth: judge the curve with each spike replaced by the mean of
        // its neighbours.
        for k in 1..n - 1 {
            if spikes[k] {
                corrected[k] = (corrected[k - 1] + corrected[k + 1]) / 2.0;
            }
        }
        // The SD of 13 residuals can easily come out at half the true noise,
        // and a threshold at 5 SDs lets noise and creep through; the robust
        // SD from all cycle-to-cycle differences is steadier, so take the
        // larger of the two.
        noise_sd = fit.residual_sd.max(robust_sd);
        threshold = pick_threshold(settings.fixed_threshold, noise_sd, &corrected, readings);
        if pass == BASELINE_PASSES {
            break;
        }
        pass += 1;
        // An early rise inside the window inflates the residual SD and so
        // the automatic threshold, which would then hide the very rise we
        // are looking for. Locate the rise with a threshold from the robust
        // noise estimate instead, which a handful of rising cycles cannot
        // inflate.
        let locate = match settings.fixed_threshold {
            Some(t) => t,
            None => threshold
                .min(AUTO_THRESHOLD_SDS * robust_sd)
                .max(f64::MIN_POSITIVE),
        };
        let Some(k) = first_crossing(&corrected, start, locate) else {
            break;
        };
        let cycle = k + 1;
        if cycle > end + BASELINE_GAP {
            break;
        }
        let new_end = cycle.saturating_sub(BASELINE_GAP);
        if new_end + 1 < start + MIN_BASELINE_POINTS {
            baseline_error = true;
            break;
        }
        if new_end >= end {
            break;
        }
        end = new_end;
    }
    let baseline = Baseline {
        intercept: fit.intercept,
        slope: fit.slope,
        window_start: start,
        window_end: end,
        residual_sd: fit.residual_sd,
    };

    if settings.fixed_threshold.is_some() && AUTO_THRESHOLD_SDS * fit.residual_sd > threshold {
        flags.insert(QcFlag::NoisyBaseline);
    }
    if (fit.slope * n as f64).abs() > threshold {
        flags.insert(QcFlag::Drift);
    }
    let max_reading = readings.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let at_max = readings.iter().filter(|&&v| v == max_reading).count();
    let rose = corrected.iter().any(|&v| v >= threshold);
    if rose && at_max >= 3 {
        flags.insert(QcFlag::Saturation);
    }

    let mut ct = Ct::Undetermined;
    if baseline_error {
        flags.insert(QcFlag::BaselineError);
    } else if threshold.is_finite() {
        match accepted_crossing(&corrected, start, threshold) {
            Crossing::None => {}
            Crossing::Weak => {
                flags.insert(QcFlag::LateWeakRise);
            }
            Crossing::At(value) => {
                ct = match settings.method {
                    Method::Threshold => Ct::Determined(value),
                    Method::Cp => cp(&corrected, start, fit.residual_sd)
                        .map_or(Ct::Undetermined, Ct::Determined),
                };
            }
        }
    }
    // Guard against arithmetic on absurd (but finite) readings.
    if let Ct::Determined(v) = ct
        && !(v.is_finite() && v > 0.0)
    {
        ct = Ct::Undetermined;
    }
    if ct != Ct::Undetermined && !levelled_off(&corrected) {
        flags.insert(QcFlag::NoPlateau);
    }

    Ok(CurveResult {
        ct,
        method: settings.method,
        threshold,
        threshold_fixed: settings.fixed_threshold.is_some(),
        noise_sd,
        baseline,
        flags: flags.into_iter().collect(),
    })
}

/// A least-squares line and the SD of its residuals.
#[derive(Clone, Copy, Debug)]
struct Line {
    intercept: f64,
    slope: f64,
    residual_sd: f64,
}

/// Fits a line over cycles `start..=end` (1-based), leaving out spikes
/// unless that would leave fewer than 3 points.
fn fit_line(readings: &[f64], start: usize, end: usize, spikes: &[bool]) -> Line {
    let window = (start - 1)..end.min(readings.len());
    let mut points: Vec<(f64, f64)> = window
        .clone()
        .filter(|&k| !spikes.get(k).copied().unwrap_or(false))
        .map(|k| ((k + 1) as f64, readings[k]))
        .collect();
    if points.len() < 3 {
        points = window.map(|k| ((k + 1) as f64, readings[k])).collect();
    }
    let m = points.len() as f64;
    let x_mean = points.iter().map(|p| p.0).sum::<f64>() / m;
    let y_mean = points.iter().map(|p| p.1).sum::<f64>() / m;
    let sxx: f64 = points.iter().map(|p| (p.0 - x_mean).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - x_mean) * (p.1 - y_mean)).sum();
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    let intercept = y_mean - slope * x_mean;
    let ss: f64 = points
        .iter()
        .map(|p| (p.1 - intercept - slope * p.0).powi(2))
        .sum();
    let residual_sd = if m > 2.0 {
        (ss / (m - 2.0)).sqrt()
    } else {
        0.0
    };
    Line {
        intercept,
        slope,
        residual_sd,
    }
}

fn subtract(readings: &[f64], line: &Line) -> Vec<f64> {
    readings
        .iter()
        .enumerate()
        .map(|(k, &v)| v - (line.intercept + line.slope * (k + 1) as f64))
        .collect()
}

fn pick_threshold(fixed: Option<f64>, residual_sd: f64, corrected: &[f64], raw: &[f64]) -> f64 {
    if let Some(t) = fixed {
        return t;
    }
    let max = corrected.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let min = corrected.iter().copied().fold(f64::INFINITY, f64::min);
    let magnitude = raw.iter().fold(0.0_f64, |m, v| m.max(v.abs()));
    // Floors: a share of the span (noise-free curves), then a share of the
    // readings' magnitude so rounding error in the subtraction can never
    // reach it, then the smallest positive number.
    (AUTO_THRESHOLD_SDS * residual_sd)
        .max(AUTO_THRESHOLD_FLOOR_OF_SPAN * (max - min))
        .max(1e-9 * magnitude)
        .max(f64::MIN_POSITIVE)
}

/// First index `k` (cycle `k + 1` after the window start) with
/// `F(k-1) < T <= F(k)` and `F(k+1) >= T`: a single-point spike never
/// counts because the next reading falls back.
fn first_crossing(corrected: &[f64], start: usize, threshold: f64) -> Option<usize> {
    crossings(corrected, start, threshold).next()
}

fn crossings(corrected: &[f64], start: usize, threshold: f64) -> impl Iterator<Item = usize> {
    (start.max(1)..corrected.len().saturating_sub(1)).filter(move |&k| {
        corrected[k - 1] < threshold && threshold <= corrected[k] && corrected[k + 1] >= threshold
    })
}

enum Crossing {
    None,
    /// Crossed and stayed up, but never doubled the threshold in time.
    Weak,
    /// Accepted, at this real cycle.
    At(f64),
}

/// The first crossing that stays up (every later reading ≥ T/2: a two-cycle
/// bump that falls back is not amplification) and grows to
/// [`GROWTH_FACTOR`] × T within
/// [`GROWTH_CYCLES`] cycles.
fn accepted_crossing(corrected: &[f64], start: usize, threshold: f64) -> Crossing {
    for k in crossings(corrected, start, threshold) {
        if corrected[k..].iter().any(|&v| v < threshold / 2.0) {
            continue;
        }
        let last = (k + GROWTH_CYCLES).min(corrected.len() - 1);
        if !corrected[k..=last]
            .iter()
            .any(|&v| v >= GROWTH_FACTOR * threshold)
        {
            return Crossing::Weak;
        }
        let (before, at) = (corrected[k - 1], corrected[k]);
        let fraction = if before > 0.0 {
            // Log-linear: exact for exponential growth.
            (threshold.ln() - before.ln()) / (at.ln() - before.ln())
        } else {
            (threshold - before) / (at - before)
        };
        // Cycle of index k-1 is k.
        return Crossing::At(k as f64 + fraction);
    }
    Crossing::None
}

/// Cycle of the maximal Savitzky–Golay second derivative after the window
/// start, refined by a quadratic over ±3 points; `None` if the peak is not
/// 50 SDs of the second-derivative noise. That noise is computed from the
/// baseline residual SD (a filter with weights w turns white noise of SD s
/// into noise of SD s·|w|), because comparing a second derivative with the
/// readings' own SD would mix units and reject most real curves.
fn cp(corrected: &[f64], start: usize, residual_sd: f64) -> Option<f64> {
    let n = corrected.len();
    if n < SG_D2.len() {
        return None;
    }
    let d2: Vec<f64> = (0..=n - SG_D2.len())
        .map(|j| {
            SG_D2
                .iter()
                .zip(&corrected[j..])
                .map(|(w, f)| w * f)
                .sum::<f64>()
                / SG_NORM
        })
        .collect();
    // d2[j] is centred on index j + 4.
    let first = start.saturating_sub(1).saturating_sub(4);
    let (peak, &value) = d2
        .iter()
        .enumerate()
        .skip(first)
        .max_by(|a, b| a.1.total_cmp(b.1))?;
    let norm = SG_D2.iter().map(|w| w * w).sum::<f64>().sqrt() / SG_NORM;
    if !(value > CP_PEAK_SDS * norm * residual_sd && value > 0.0) {
        return None;
    }
    let mut offset = 0.0;
    if peak >= 3 && peak + 3 < d2.len() {
        let window = &d2[peak - 3..=peak + 3];
        let (mut b, mut a) = (0.0, 0.0);
        for (x, y) in (-3i32..=3).zip(window) {
            let x = f64::from(x);
            b += x * y;
            a += (x * x - 4.0) * y;
        }
        // Orthogonal polynomials over -3..=3: sums of x² = 28, (x²-4)² = 84.
        let (b, a) = (b / 28.0, a / 84.0);
        if a < 0.0 {
            offset = (-b / (2.0 * a)).clamp(-1.0, 1.0);
        }
    }
    // Index peak + 4 is cycle peak + 5.
    Some((peak + 5) as f64 + offset)
}

/// Whether the curve has stopped rising steeply: the last cycle's increase
/// (mean of the last two) is at most half the steepest increase.
fn levelled_off(corrected: &[f64]) -> bool {
    let diffs: Vec<f64> = corrected.windows(2).map(|w| w[1] - w[0]).collect();
    let steepest = diffs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    match diffs.as_slice() {
        [.., a, b] => (a + b) / 2.0 <= steepest / 2.0,
        _ => true,
    }
}

/// Readings that stand more than [`SPIKE_SDS`] robust SDs beyond both
/// neighbours. The SD comes from the median absolute deviation of the
/// cycle-to-cycle differences, which the few steep cycles of a rise cannot
/// inflate; it is floored at 0.1 % of the curve's span so that a smooth,
/// noise-free curve has no "spikes".
///
/// Also returns that robust SD of one reading (floor included).
fn find_spikes(readings: &[f64]) -> (Vec<bool>, f64) {
    let n = readings.len();
    let mut spikes = vec![false; n];
    if n < 3 {
        return (spikes, 0.0);
    }
    let mut diffs: Vec<f64> = readings.windows(2).map(|w| w[1] - w[0]).collect();
    let med = median(&mut diffs);
    let mut dev: Vec<f64> = diffs.iter().map(|d| (d - med).abs()).collect();
    let mad = median(&mut dev);
    let max = readings.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let min = readings.iter().copied().fold(f64::INFINITY, f64::min);
    let sd = (1.4826 * mad / std::f64::consts::SQRT_2).max(1e-3 * (max - min));
    let limit = SPIKE_SDS * sd;
    for k in 1..n - 1 {
        let (l, v, r) = (readings[k - 1], readings[k], readings[k + 1]);
        if v - l.max(r) > limit || l.min(r) - v > limit {
            spikes[k] = true;
        }
    }
    (spikes, sd)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        len if len % 2 == 1 => values[len / 2],
        len => (values[len / 2 - 1] + values[len / 2]) / 2.0,
    }
}
