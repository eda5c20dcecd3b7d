//! The arithmetic behind [`super::analyze_curve`]: baseline fit, threshold,
//! crossing, Cp and QC. Indices here are 0-based (`k` is cycle `k + 1`);
//! everything that leaves the module is in 1-based cycles.
//!
//! # How a Ct is found
//!
//! 1. **Baseline, up to three passes** (§6: "≤ 3 passes"). Pass 1 fits a
//!    line over the configured window. If the corrected curve rises, the
//!    next window ends where the rise, extrapolated back from the crossing,
//!    is [`WINDOW_TAIL`] of the threshold: earlier than configured for an
//!    early riser, later for a late one, so the line is extrapolated over as
//!    few cycles as possible (a Ct-40 curve's baseline extrapolated from
//!    cycles 3–15 has an SD of 2.3 reading SDs at the crossing; from 3–35,
//!    0.4). What is left of the rise inside the window (its [`Tail`]) is
//!    subtracted before the line is fitted, because the extrapolation
//!    multiplies whatever the window's last readings owe to the rise; the
//!    last pass checks the tail's size against the crossing it produces
//!    ([`rescale`]). If the rise already sat inside pass 1's window (an
//!    early riser tilts that line and looks late and steep), pass 2 uses a
//!    cautious window and pass 3 the usual one.
//! 2. **Threshold**: fixed, or [`AUTO_THRESHOLD_SDS`] noise SDs.
//! 3. **Crossing**: the first accepted crossing (§6: `F(i−1) < T ≤ F(i)`,
//!    `F(i+1) ≥ T`, the curve stays up and grows), read off a local fit
//!    ([`estimate`]) rather than two readings, so that one reading's noise
//!    does not move the Ct by σ / (T·ln E).
//!
//! # Speed
//!
//! A 1,536-curve plate should take under 2 ms on one core (issue 3; on the
//! machine this was written on it takes about 2.9 ms with common
//! thresholds, 1.1 µs per curve at a fixed threshold). Curves of up to
//! [`STACK_CYCLES`] cycles use stack buffers; medians select over integer
//! keys; every fit is a closed-form least-squares solution over a few
//! points, never an iterative optimiser; a curve that does not rise costs
//! one baseline fit, and one whose rise did not reach the first window two.
//!
//! A run reads each curve twice, at the automatic threshold (to choose the
//! common one) and at the chosen one. What does not depend on the
//! threshold (checks, spikes and robust SD, pass 1's line) is done once
//! per curve by [`prepare`]; [`finish`] does the rest per threshold, and
//! for choosing the threshold skips the final crossing fit
//! ([`Need::Acceptance`]). The baseline windows of passes 2 and 3 do
//! depend on the threshold (they end where the rise is [`WINDOW_TAIL`] of
//! it), so they are not shared: a window that ignored the threshold would
//! change every Ct, and the window's placement was tuned on the accuracy
//! population.

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

/// Baseline fits per curve (§6: "≤ 3 passes").
const BASELINE_PASSES: usize = 3;

/// A reading is a spike if it stands this many robust SDs beyond both
/// neighbours.
const SPIKE_SDS: f64 = 8.0;

/// Curves up to this long use stack buffers; longer ones (cyclers run 40
/// to 50 cycles, but nothing forbids more) a heap allocation or two. Not
/// larger: zeroing the buffers is paid on every curve.
const STACK_CYCLES: usize = 64;

/// A rising curve's baseline window ends at the last cycle where its
/// extrapolated rise is at most this share of the threshold (about 4 cycles
/// before the crossing at efficiency 1.7, 3 at 2). Measured on the
/// synthetic population of `tests/analysis_accuracy.rs`: 1/4 brings the
/// window closer but the tail's own error then costs as much as it saves;
/// 1/16 and 1/32 lengthen the extrapolation and lose about as much.
const WINDOW_TAIL: f64 = 0.125;

/// When the rise sat inside the window of the pass that found it, that
/// pass's line was tilted, its crossing late and its growth rate too high:
/// the next window ends where the tail is this share of the threshold,
/// reckoned at growth rate at most [`SLOW_RATE`].
const CAUTIOUS_TAIL: f64 = 1.0 / 32.0;

/// ln 1.6: slower than any amplification we accept as efficient.
const SLOW_RATE: f64 = 0.47;

/// A crossing this few cycles after the window's end (or inside it) means
/// the rise reached into the window.
const INSIDE_WINDOW: usize = 3;

/// The minimal baseline window must end at least this many cycles before
/// the first reading at or above T (§6: "3 cycles before the first
/// estimate"); if it cannot, the curve is a baseline error.
const BASELINE_GAP: usize = 3;

/// The local crossing fit uses corrected readings from this share of the
/// threshold ...
const FIT_LOW: f64 = 0.25;
/// ... and at least this many standard errors of the baseline line at the
/// crossing (an error Δ in the baseline moves ln F by Δ/F, most at the
/// lowest points: an early riser's short window, extrapolated, has an SE
/// of about one reading SD). 5, 10, 20: 95.06, 95.47, 95.25 % within 0.15
/// cycles on the accuracy test's population; without, 94.90 %.
const BASELINE_SES: f64 = 10.0;
/// ... up to this share of the curve's top when the curve has levelled off
/// (the fit is then in logit space, see [`estimate`]) ...
const FIT_HIGH_PLATEAU: f64 = 0.8;
/// ... or this share when it has not (plain log space, where the bend
/// towards the plateau must stay small enough for a quadratic).
const FIT_HIGH: f64 = 0.5;
/// The logit's plateau is this much above the highest corrected reading,
/// so that no fitted point sits at the logit's pole.
const PLATEAU_MARGIN: f64 = 1.02;
/// At most this many points below the bracketing pair ...
const FIT_MAX_BELOW: usize = 3;
/// ... and in all.
const FIT_MAX_POINTS: usize = 12;

/// The last pass measures the tail's size itself (see [`rescale`]) only
/// where the window's line, extrapolated to the tail's anchor, holds at
/// least this share of the tail: otherwise the correction is too small to
/// be worth a second crossing fit (measured: no change in accuracy up to
/// 0.3).
const RESCALE_MIN_SHARE: f64 = 0.2;

/// Bounds on the log growth rate used to extrapolate the tail: per-cycle
/// efficiency 1.1 to 4 (anything outside is not PCR and only guards the
/// arithmetic).
const RATE_MIN: f64 = 0.095;
const RATE_MAX: f64 = 1.39;

/// Whether the crossing fit that places the next window (and the tail
/// subtracted in it) reweights from a first fit, like the one that gives
/// the Ct. Not worth its time there: 94.90 % within 0.15 cycles without,
/// 95.02 % with, at 10 % more time per plate.
const LOCATE_PRECISE: bool = false;

/// What analysing one curve at any threshold shares: the checks on the
/// readings, their range, the spikes and the robust noise SD, and the
/// first pass's baseline line over the configured window.
///
/// None of this depends on the threshold or the method, so a run analyses
/// each curve's readings once ([`prepare`]) and then reads the curve at
/// as many thresholds as it needs ([`finish`]): once at the automatic
/// threshold for [`super::common_threshold`], once at the threshold chosen
/// for its target. The spike search (two medians) and the first fit were
/// about a third of analysing a curve, paid twice per curve before.
#[derive(Clone, Debug)]
pub(crate) struct Prepared {
    /// Lowest and highest reading.
    low: f64,
    high: f64,
    /// Robust SD of one reading (see [`find_spikes`]).
    robust_sd: f64,
    /// Spike marks, one per reading; empty when there are none (most
    /// curves: no allocation).
    spikes: Vec<bool>,
    /// The configured window, clamped to the curve (1-based, inclusive).
    start: usize,
    configured_end: usize,
    /// Pass 1's line over the configured window.
    first: Line,
}

/// [`prepare`] for a run: the checks that depend on neither the threshold
/// nor the method are done here, those that do in [`admit`].
pub(crate) fn prepare(
    readings: &[f64],
    settings: &AnalysisSettings,
) -> Result<Prepared, AnalysisError> {
    let n = readings.len();
    if n == 0 {
        return Err(AnalysisError::Empty);
    }
    if n < MIN_CYCLES {
        return Err(AnalysisError::TooFewCycles {
            cycles: n,
            min: MIN_CYCLES,
            method: Method::Threshold,
        });
    }
    // One pass for validity and the readings' range.
    let (mut low, mut high) = (f64::INFINITY, f64::NEG_INFINITY);
    for (k, &value) in readings.iter().enumerate() {
        if !value.is_finite() {
            return Err(AnalysisError::NonFinite {
                cycle: k + 1,
                value,
            });
        }
        if value < low {
            low = value;
        }
        if value > high {
            high = value;
        }
    }
    // Leave at least two cycles after the window: a crossing needs F(i) and
    // F(i + 1).
    let start = settings.baseline_start;
    let configured_end = settings.baseline_end.min(n - 2);
    if start == 0 || configured_end + 1 < start + MIN_BASELINE_POINTS {
        return Err(AnalysisError::BadBaselineWindow {
            start,
            end: configured_end,
            cycles: n,
        });
    }
    let mut spike_stack = [false; STACK_CYCLES];
    let mut spike_heap;
    let marks: &mut [bool] = if n <= STACK_CYCLES {
        &mut spike_stack[..n]
    } else {
        spike_heap = vec![false; n];
        &mut spike_heap
    };
    let robust_sd = find_spikes(readings, high - low, marks);
    let spikes = if marks.contains(&true) {
        marks.to_vec()
    } else {
        Vec::new()
    };
    let (first, _) = fit_line(readings, start, configured_end, &spikes, None);
    Ok(Prepared {
        low,
        high,
        robust_sd,
        spikes,
        start,
        configured_end,
        first,
    })
}

/// The error [`analyze`] gives for `settings` on a curve of `n` readings
/// that [`prepare`] (with the same window) turned into `prepared`: the
/// checks run in the order they always have (empty, too few cycles for the
/// method, a reading that is not a number, a bad fixed threshold, a window
/// that does not fit), so a run reports exactly what `analyze_curve` would.
pub(crate) fn admit<'p>(
    prepared: &'p Result<Prepared, AnalysisError>,
    n: usize,
    settings: &AnalysisSettings,
) -> Result<&'p Prepared, AnalysisError> {
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
    if let Err(e @ (AnalysisError::NonFinite { .. } | AnalysisError::Empty)) = prepared {
        return Err(e.clone());
    }
    if let Some(t) = settings.fixed_threshold
        && !(t.is_finite() && t > 0.0)
    {
        return Err(AnalysisError::BadThreshold { value: t });
    }
    prepared.as_ref().map_err(Clone::clone)
}

/// How much of the answer [`finish`] must give.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Need {
    /// Everything `analyze_curve` returns.
    Full,
    /// Whether a crossing is accepted, not where: an accepted curve's Ct is
    /// the cycle of its first reading at or above T instead of the local
    /// fit's, and no flags are raised (what [`super::common_threshold`]
    /// needs: the final fit is about a fifth of a rising curve's time).
    Acceptance,
}

pub(super) fn analyze(
    readings: &[f64],
    settings: &AnalysisSettings,
) -> Result<CurveResult, AnalysisError> {
    let prepared = prepare(readings, settings);
    let prepared = admit(&prepared, readings.len(), settings)?;
    let mut stack = [0.0; STACK_CYCLES];
    let mut heap;
    let corrected: &mut [f64] = if readings.len() <= STACK_CYCLES {
        &mut stack[..readings.len()]
    } else {
        heap = vec![0.0; readings.len()];
        &mut heap
    };
    Ok(finish(readings, prepared, settings, corrected, Need::Full))
}

/// Reads one prepared curve at `settings`' threshold: baseline passes 2
/// and 3, threshold, crossing and flags. `readings` and `prepared` belong
/// together (and to `settings`' window, which [`admit`] has checked);
/// `corrected` is scratch of the curve's length and holds the corrected
/// curve afterwards.
pub(crate) fn finish(
    readings: &[f64],
    prepared: &Prepared,
    settings: &AnalysisSettings,
    corrected: &mut [f64],
    need: Need,
) -> CurveResult {
    let n = readings.len();
    let Prepared {
        low,
        high,
        robust_sd,
        start,
        configured_end,
        first,
        ..
    } = *prepared;
    let magnitude = low.abs().max(high.abs());
    let minimal_end = start + MIN_BASELINE_POINTS - 1;
    let mut flags = Vec::new();
    let spikes: &[bool] = &prepared.spikes;
    if !spikes.is_empty() {
        raise(&mut flags, need, QcFlag::Spike);
    }
    // An early rise inside the window inflates the residual SD and so the
    // automatic threshold, which would then hide the very rise we are
    // looking for. Locate the rise with a threshold from the robust noise
    // estimate instead, which a handful of rising cycles cannot inflate.
    let locate_at = |threshold: f64| match settings.fixed_threshold {
        Some(t) => t,
        None => threshold
            .min(AUTO_THRESHOLD_SDS * robust_sd)
            .max(f64::MIN_POSITIVE),
    };
    let mut end = configured_end;
    let mut tail: Option<Tail> = None;
    // Whether this pass measures the tail's size itself (see `rescale`).
    let mut measure_tail = false;
    let mut baseline_error = false;
    let mut pass = 1;
    let (fit, threshold, noise_sd, shape) = loop {
        // Pass 1's line is the prepared one.
        let (mut fit, tail_line) = if pass == 1 {
            (first, None)
        } else {
            fit_line(readings, start, end, spikes, tail)
        };
        let mut shape = correct(readings, &fit, spikes, corrected);
        // The SD of 13 residuals can easily come out at half the true noise,
        // and a threshold at 5 SDs lets noise and creep through; the robust
        // SD from all cycle-to-cycle differences is steadier, so take the
        // larger of the two.
        let noise_sd = fit.residual_sd.max(robust_sd);
        let mut threshold = pick_threshold(settings.fixed_threshold, noise_sd, &shape, magnitude);
        let last = pass == BASELINE_PASSES;
        if let (Some(t), Some(tail_line)) = (tail, tail_line)
            && (last || measure_tail)
            && let Some(scale) = rescale(
                corrected,
                &shape,
                (start, end),
                locate_at(threshold),
                t,
                tail_line,
                if measure_tail { 0.0 } else { RESCALE_MIN_SHARE },
            )
        {
            // The line fitted with the tail scaled by s is the one fitted
            // with the tail as estimated plus (1 − s) × the tail's own line.
            fit.intercept += (1.0 - scale) * tail_line.intercept;
            fit.slope += (1.0 - scale) * tail_line.slope;
            shape = correct(readings, &fit, spikes, corrected);
            threshold = pick_threshold(settings.fixed_threshold, noise_sd, &shape, magnitude);
        }
        if last {
            break (fit, threshold, noise_sd, shape);
        }
        let locate = locate_at(threshold);
        let Some(rise) = locate_rise(corrected, &shape, start, end, locate, LOCATE_PRECISE) else {
            break (fit, threshold, noise_sd, shape);
        };
        let found = rise.tail;
        let contaminated = tail.is_none()
            && end > minimal_end
            && (rise.index < end + INSIDE_WINDOW || found.at(end as f64) > CAUTIOUS_TAIL * locate);
        let (level, rate) = if contaminated {
            (CAUTIOUS_TAIL, found.rate.min(SLOW_RATE))
        } else {
            (WINDOW_TAIL, found.rate)
        };
        // Last cycle where the tail is at most `level` × T, never past the
        // tail's anchor or the bracketing reading below T.
        let reach = found.cycle + (level * locate / found.value).ln() / rate;
        let below = rise.index.saturating_sub(1); // cycle of index k - 2
        let mut new_end = reach.min(found.cycle).floor().clamp(0.0, below as f64) as usize;
        if rise.index + 1 >= minimal_end + BASELINE_GAP {
            new_end = new_end.max(minimal_end);
        }
        new_end = new_end.min(n - 2);
        if !settings.adaptive_baseline {
            if tail.is_none() && !contaminated {
                // A fixed window the rise does not reach: keep it as it is.
                break (fit, threshold, noise_sd, shape);
            }
            new_end = new_end.min(configured_end);
        }
        if new_end < minimal_end {
            baseline_error = true;
            break (fit, threshold, noise_sd, shape);
        }
        end = new_end;
        tail = Some(Tail { rate, ..found });
        measure_tail = contaminated;
        // After a clean first pass one more fit is all it takes (a third
        // changed no Ct by more than 0.01 on the synthetic population); after
        // a tilted one, two.
        pass = if contaminated {
            pass + 1
        } else {
            BASELINE_PASSES
        };
    };
    let baseline = Baseline {
        intercept: fit.intercept,
        slope: fit.slope,
        window_start: start,
        window_end: end,
        residual_sd: fit.residual_sd,
    };

    if settings.fixed_threshold.is_some() && AUTO_THRESHOLD_SDS * fit.residual_sd > threshold {
        raise(&mut flags, need, QcFlag::NoisyBaseline);
    }
    if (fit.slope * n as f64).abs() > threshold {
        raise(&mut flags, need, QcFlag::Drift);
    }
    if need == Need::Full
        && corrected.iter().any(|&v| v >= threshold)
        && readings.iter().filter(|&&v| v == high).count() >= 3
    {
        raise(&mut flags, need, QcFlag::Saturation);
    }

    let mut ct = Ct::Undetermined;
    if baseline_error {
        raise(&mut flags, need, QcFlag::BaselineError);
    } else if threshold.is_finite() {
        match accepted_crossing(corrected, readings, (start, end), threshold) {
            Crossing::None => {}
            Crossing::Weak => {
                raise(&mut flags, need, QcFlag::LateWeakRise);
            }
            Crossing::At(k) => {
                ct = match (settings.method, need) {
                    (Method::Threshold, Need::Full) => {
                        Ct::Determined(estimate(corrected, &shape, k, threshold, true).ct)
                    }
                    (Method::Threshold, Need::Acceptance) => Ct::Determined((k + 1) as f64),
                    (Method::Cp, _) => cp(corrected, start, fit.residual_sd)
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
    if ct != Ct::Undetermined && !shape.levelled {
        raise(&mut flags, need, QcFlag::NoPlateau);
    }
    flags.sort_unstable();
    flags.dedup();

    CurveResult {
        ct,
        method: settings.method,
        threshold,
        threshold_fixed: settings.fixed_threshold.is_some(),
        noise_sd,
        baseline,
        flags,
    }
}

/// Adds `flag`, unless only acceptance is needed (then there are no flags
/// to report, and no allocation for them).
fn raise(flags: &mut Vec<QcFlag>, need: Need, flag: QcFlag) {
    if need == Need::Full {
        flags.push(flag);
    }
}

/// A least-squares line and the SD of its residuals.
#[derive(Clone, Copy, Debug)]
struct Line {
    intercept: f64,
    slope: f64,
    residual_sd: f64,
    /// Points fitted, their mean cycle and Σ(c − mean)², for the line's
    /// standard error at any cycle ([`Line::se_at`]).
    count: f64,
    x_mean: f64,
    sxx: f64,
}

impl Line {
    /// Standard error of the fitted line at `cycle`, from the residual SD.
    fn se_at(&self, cycle: f64) -> f64 {
        if self.count > 0.0 && self.sxx > 0.0 {
            let d = cycle - self.x_mean;
            self.residual_sd * (1.0 / self.count + d * d / self.sxx).sqrt()
        } else {
            0.0
        }
    }
}

/// The start of a rise extrapolated back from the crossing fit as an
/// exponential: `value · exp(rate · (c − cycle))` before `cycle`, the lowest
/// point of the fit. Below a quarter of the threshold a sigmoid is within a
/// few per cent of an exponential, so the tail's error is a small share of
/// a small number.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Tail {
    cycle: f64,
    value: f64,
    rate: f64,
}

impl Tail {
    fn at(&self, cycle: f64) -> f64 {
        self.value * (self.rate * (cycle - self.cycle)).exp()
    }
}

/// Fits a line over cycles `start..=end` (1-based) to the readings less the
/// `tail`, leaving out spikes unless that would leave fewer than 3 points.
/// With a tail, also returns the line fitted to the tail alone (same
/// points), which [`rescale`] needs.
fn fit_line(
    readings: &[f64],
    start: usize,
    end: usize,
    spikes: &[bool],
    tail: Option<Tail>,
) -> (Line, Option<Line>) {
    let end = end.min(readings.len());
    let first = start.saturating_sub(1).min(end);
    // `spikes` is empty when there are none.
    let skip_spikes = !spikes.is_empty() && (first..end).filter(|&k| !spikes[k]).count() >= 3;
    let used = |k: usize| !(skip_spikes && spikes[k]);
    // Tail at each cycle of the window, by repeated multiplication (one
    // `exp` per fit, not one per point).
    let (mut shape, growth) = match tail {
        Some(t) => (t.at((first + 1) as f64), t.rate.exp()),
        None => (0.0, 1.0),
    };
    let first_tail = shape;
    // Pass 1: means. Pass 2: centred sums. Pass 3: residuals. Centring
    // keeps a baseline of 10^6 with noise of 10^-3 exact.
    let window = &readings[first..end];
    let (mut m, mut sx, mut sy, mut sp) = (0.0, 0.0, 0.0, 0.0);
    for (k, &reading) in (first..).zip(window) {
        if used(k) {
            m += 1.0;
            sx += (k + 1) as f64;
            sy += reading - shape;
            sp += shape;
        }
        shape *= growth;
    }
    if m == 0.0 {
        let zero = Line {
            intercept: 0.0,
            slope: 0.0,
            residual_sd: 0.0,
            count: 0.0,
            x_mean: 0.0,
            sxx: 0.0,
        };
        return (zero, tail.map(|_| zero));
    }
    let (x_mean, y_mean, p_mean) = (sx / m, sy / m, sp / m);
    let (mut sxx, mut sxy, mut sxp) = (0.0, 0.0, 0.0);
    shape = first_tail;
    for (k, &reading) in (first..).zip(window) {
        if used(k) {
            let dx = (k + 1) as f64 - x_mean;
            sxx += dx * dx;
            sxy += dx * (reading - shape - y_mean);
            sxp += dx * (shape - p_mean);
        }
        shape *= growth;
    }
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    let intercept = y_mean - slope * x_mean;
    let mut ss = 0.0;
    shape = first_tail;
    for (k, &reading) in (first..).zip(window) {
        if used(k) {
            let r = reading - shape - intercept - slope * (k + 1) as f64;
            ss += r * r;
        }
        shape *= growth;
    }
    let residual_sd = if m > 2.0 {
        (ss / (m - 2.0)).sqrt()
    } else {
        0.0
    };
    let tail_line = tail.map(|_| {
        let slope = if sxx > 0.0 { sxp / sxx } else { 0.0 };
        Line {
            intercept: p_mean - slope * x_mean,
            slope,
            residual_sd: 0.0,
            count: m,
            x_mean,
            sxx,
        }
    });
    (
        Line {
            intercept,
            slope,
            residual_sd,
            count: m,
            x_mean,
            sxx,
        },
        tail_line,
    )
}

/// The factor s by which the subtracted tail should have been scaled for
/// the pass to be consistent with itself: the tail that the crossing fit
/// measures at the tail's anchor, on a curve corrected with s × tail,
/// equals s × the tail's value there.
///
/// Scaling the subtracted tail by s moves the line by (1 − s) × the tail's
/// own line `tail_line`, whose value at the anchor is `la` × the tail's
/// value; so if the fit measures `v` × the value with s = 1, it measures
/// about `v − (1 − s)·la` with s, and s = (v − la) / (1 − la). Used where
/// the tail came from a pass whose line the rise had tilted (its size is
/// then badly off), and in the last pass where `la` is at least `min_la`.
/// `None` if there is no rise, or if the window cannot tell the tail from a
/// line (la of 0.7 or more).
fn rescale(
    corrected: &[f64],
    shape: &Shape,
    (start, end): (usize, usize),
    threshold: f64,
    tail: Tail,
    tail_line: Line,
    min_la: f64,
) -> Option<f64> {
    let la = (tail_line.intercept + tail_line.slope * tail.cycle) / tail.value;
    if !(la < 0.7 && la >= min_la) {
        return None;
    }
    let rise = locate_rise(corrected, shape, start, end, threshold, true)?;
    let v = rise.tail.at(tail.cycle) / tail.value;
    let scale = ((v - la) / (1.0 - la)).clamp(0.0, 3.0);
    scale.is_finite().then_some(scale)
}

/// Subtracts the line from every reading; a spike can neither be a
/// crossing nor make a creep look like growth, so each is replaced by the
/// mean of its neighbours (`spikes` is empty when there are none). Returns
/// the corrected curve's [`Shape`].
fn correct(readings: &[f64], line: &Line, spikes: &[bool], out: &mut [f64]) -> Shape {
    // Subtraction first, the shape after, each in a loop of its own: mixed
    // in one loop, the shape's running comparisons kept the subtraction from
    // vectorising, and this is called two to five times per reading of a
    // rising curve.
    let (intercept, slope) = (line.intercept, line.slope);
    if out.len() <= STACK_CYCLES {
        // The cycle numbers from a table: converting the index costs more
        // than the rest of the loop.
        for ((o, &v), &c) in out.iter_mut().zip(readings).zip(&CYCLE_NUMBERS) {
            *o = v - (intercept + slope * c);
        }
    } else {
        for (k, (o, &v)) in out.iter_mut().zip(readings).enumerate() {
            *o = v - (intercept + slope * (k + 1) as f64);
        }
    }
    for k in 1..spikes.len().min(out.len()).saturating_sub(1) {
        if spikes[k] {
            out[k] = (out[k - 1] + out[k + 1]) / 2.0;
        }
    }
    Shape::of(out, *line)
}

/// What the threshold and the crossing fit need to know about a corrected
/// curve.
#[derive(Clone, Copy, Debug)]
struct Shape {
    /// The baseline subtracted.
    line: Line,
    low: f64,
    top: f64,
    /// See [`Shape::of`].
    levelled: bool,
}

/// 1.0, 2.0, ...: `CYCLE_NUMBERS[k]` is `(k + 1) as f64`.
const CYCLE_NUMBERS: [f64; STACK_CYCLES] = {
    let mut numbers = [0.0; STACK_CYCLES];
    let mut k = 0;
    while k < STACK_CYCLES {
        numbers[k] = (k + 1) as f64;
        k += 1;
    }
    numbers
};

/// Independent running minima and maxima in [`Shape::of`]: one chain of
/// comparisons per lane instead of one for the whole curve, so that they
/// run side by side.
const LANES: usize = 4;

impl Shape {
    /// Lowest and highest value, and whether the curve has stopped rising
    /// steeply: the last cycle's increase (mean of the last two) is at most
    /// half the steepest one.
    ///
    /// Plain comparisons, not `f64::min` and `max`, which handle NaN on
    /// every call: a NaN here just never wins. Taken lane by lane and then
    /// across the lanes, the extremes are the same numbers as in one pass
    /// (at most a zero's sign could differ, which nothing here can tell).
    fn of(values: &[f64], line: Line) -> Self {
        let mut low = [f64::INFINITY; LANES];
        let mut top = [f64::NEG_INFINITY; LANES];
        let mut steepest = [f64::NEG_INFINITY; LANES];
        let mut chunks = values.chunks_exact(LANES);
        for chunk in &mut chunks {
            for j in 0..LANES {
                let v = chunk[j];
                if v < low[j] {
                    low[j] = v;
                }
                if v > top[j] {
                    top[j] = v;
                }
            }
        }
        for &v in chunks.remainder() {
            if v < low[0] {
                low[0] = v;
            }
            if v > top[0] {
                top[0] = v;
            }
        }
        let n = values.len();
        if n >= 2 {
            let (earlier, later) = (&values[..n - 1], &values[1..]);
            let mut pairs = earlier.chunks_exact(LANES).zip(later.chunks_exact(LANES));
            for (e, l) in &mut pairs {
                for j in 0..LANES {
                    let rise = l[j] - e[j];
                    if rise > steepest[j] {
                        steepest[j] = rise;
                    }
                }
            }
            let done = (n - 1) / LANES * LANES;
            for (e, l) in earlier[done..].iter().zip(&later[done..]) {
                let rise = l - e;
                if rise > steepest[0] {
                    steepest[0] = rise;
                }
            }
        }
        for j in 1..LANES {
            if low[j] < low[0] {
                low[0] = low[j];
            }
            if top[j] > top[0] {
                top[0] = top[j];
            }
            if steepest[j] > steepest[0] {
                steepest[0] = steepest[j];
            }
        }
        let levelled = n < 3 || (values[n - 1] - values[n - 3]) / 2.0 <= steepest[0] / 2.0;
        Shape {
            line,
            low: low[0],
            top: top[0],
            levelled,
        }
    }
}

/// The fixed threshold, or the automatic one. `magnitude` is the largest
/// absolute reading.
fn pick_threshold(fixed: Option<f64>, noise_sd: f64, shape: &Shape, magnitude: f64) -> f64 {
    if let Some(t) = fixed {
        return t;
    }
    let (min, max) = (shape.low, shape.top);
    // Floors: a share of the span (noise-free curves), then a share of the
    // readings' magnitude so rounding error in the subtraction can never
    // reach it, then the smallest positive number.
    (AUTO_THRESHOLD_SDS * noise_sd)
        .max(AUTO_THRESHOLD_FLOOR_OF_SPAN * (max - min))
        .max(1e-9 * magnitude)
        .max(f64::MIN_POSITIVE)
}

/// Indices `k` (cycle `k + 1`, from the window start on) with
/// `F(k-1) < T <= F(k)` and `F(k+1) >= T`: a single-point spike never
/// counts because the next reading falls back.
fn crossings(corrected: &[f64], start: usize, threshold: f64) -> impl Iterator<Item = usize> {
    (start.max(1)..corrected.len().saturating_sub(1)).filter(move |&k| {
        corrected[k - 1] < threshold && threshold <= corrected[k] && corrected[k + 1] >= threshold
    })
}

/// Whether the curve reaches [`GROWTH_FACTOR`] × T within [`GROWTH_CYCLES`]
/// cycles of index `k` (or by the end of the run).
fn grows(corrected: &[f64], k: usize, threshold: f64) -> bool {
    let last = (k + GROWTH_CYCLES).min(corrected.len() - 1);
    corrected[k..=last]
        .iter()
        .any(|&v| v >= GROWTH_FACTOR * threshold)
}

/// The first crossing that grows like amplification, for placing the
/// baseline window. Unlike [`accepted_crossing`] it does not ask the curve
/// to stay up afterwards, and a crossing inside the window (or less than
/// [`INSIDE_WINDOW`] cycles after it) need not even grow: a rise inside the
/// window tilts the line, so that the corrected plateau may sink below T/2
/// late in the run or never reach 3 T, which the next pass repairs.
fn locate_rise(
    corrected: &[f64],
    shape: &Shape,
    start: usize,
    window_end: usize,
    threshold: f64,
    precise: bool,
) -> Option<Estimate> {
    let k = crossings(corrected, start, threshold)
        .find(|&k| k < window_end + INSIDE_WINDOW || grows(corrected, k, threshold))?;
    Some(estimate(corrected, shape, k, threshold, precise))
}

enum Crossing {
    None,
    /// Crossed and stayed up, but never grew to GROWTH_FACTOR × T in time.
    Weak,
    /// Accepted, at this index (the Ct is read off there only if needed).
    At(usize),
}

/// The first crossing that stays up (every later reading ≥ T/2: a two-cycle
/// bump that falls back is not amplification) and grows to
/// [`GROWTH_FACTOR`] × T within [`GROWTH_CYCLES`] cycles, on a curve whose
/// raw readings do rise: one of them from the crossing on is at least T
/// above the mean raw reading of the baseline window `start..=end` (§6:
/// "accept only if the raw curve rises above its baseline by ≥ T"). A
/// bleaching background that levels off leaves the extrapolated line
/// below it, so the corrected curve climbs like a ramp and can pass the
/// other tests at a low automatic threshold; its raw readings never climb.
fn accepted_crossing(
    corrected: &[f64],
    raw: &[f64],
    (start, end): (usize, usize),
    threshold: f64,
) -> Crossing {
    let window = &raw[start.saturating_sub(1).min(end)..end.min(raw.len())];
    let level = window.iter().sum::<f64>() / window.len().max(1) as f64;
    for k in crossings(corrected, start, threshold) {
        if corrected[k..].iter().any(|&v| v < threshold / 2.0) {
            continue;
        }
        if !raw[k..].iter().any(|&v| v >= level + threshold) {
            return Crossing::None;
        }
        if !grows(corrected, k, threshold) {
            return Crossing::Weak;
        }
        return Crossing::At(k);
    }
    Crossing::None
}

/// Where a curve crosses the threshold, and how it rises below it.
#[derive(Clone, Copy, Debug)]
struct Estimate {
    /// Index of the first reading at or above T.
    index: usize,
    /// Real cycle of the crossing.
    ct: f64,
    /// The rise below the fitted points.
    tail: Tail,
}

/// The crossing at index `k` (`F(k-1) < T <= F(k)`), read off a local fit.
///
/// Interpolating between the two bracketing readings lets one reading's
/// noise move the Ct by about σ / (T · ln E): 0.07 cycles at T = 20 σ, so
/// 99 % within 0.15 is out of reach that way. Here the Ct is where a
/// weighted least-squares quadratic through the points around the crossing
/// reaches T: still the threshold crossing, of the curve smoothed over up
/// to 12 cycles instead of 2. The points run contiguously from the bracket
/// down to T/4 or [`BASELINE_SES`] standard errors of the baseline at the
/// crossing, whichever is higher (at most 3 below the bracket), and up to
/// 0.8 of the curve's top.
///
/// The quadratic is in `y = ln(F / (1 − F/P))`, with P just above the top
/// of a curve that has levelled off: the logit, in which a sigmoid is
/// nearly straight up to its plateau, so that the quadratic (which absorbs
/// asymmetry, a plateau that is not quite P, and the like) holds over the
/// whole lower half of the rise and beyond. For a curve still rising at
/// the end of the run P is infinite, `y` is ln F, and points stop at half
/// the top. Weights are 1 / var(y) = (F (1 − F/P) / σ)², from the fit after
/// a first pass rather than from the readings, so that noise does not
/// weight itself.
///
/// Measured with a perfect baseline at noise T/20 (`tests/analysis_accuracy.rs`
/// population): SD 0.045–0.060 cycles against 0.065–0.099 for two-point
/// interpolation, bias under 0.015. A straight line in ln F over the same
/// points is biased by up to 0.15 cycles when T is 20 % of the plateau.
///
/// With fewer than 4 points the fit is a line, with fewer than 3 (or if the
/// fit does not cross T within a cycle of the bracket) the two-point
/// log-linear interpolation of §6 is used. Without `precise` the weights
/// come from the readings only (one fit instead of two), which is enough
/// for placing a baseline window.
fn estimate(corrected: &[f64], shape: &Shape, k: usize, threshold: f64, precise: bool) -> Estimate {
    // The two-point answer, only worked out when the fit cannot be used
    // (its four logarithms were a tenth of a rising curve's time).
    let fallback = || {
        let (before, at) = (corrected[k - 1], corrected[k]);
        let two_point = if before > 0.0 {
            // Log-linear: exact for exponential growth.
            k as f64 + (threshold.ln() - before.ln()) / (at.ln() - before.ln())
        } else {
            k as f64 + (threshold - before) / (at - before)
        };
        let fallback_rate = if before > 0.0 {
            (at / before).ln()
        } else {
            corrected
                .get(k + 1)
                .map_or(f64::NAN, |&next| (next / at).ln())
        };
        Estimate {
            index: k,
            ct: two_point,
            tail: if before > 0.0 {
                Tail {
                    cycle: k as f64,
                    value: before,
                    rate: clamp_rate(fallback_rate),
                }
            } else {
                Tail {
                    cycle: two_point,
                    value: threshold,
                    rate: clamp_rate(fallback_rate),
                }
            },
        }
    };

    let (top, levelled) = (shape.top, shape.levelled);
    let plateau = if levelled {
        top * PLATEAU_MARGIN
    } else {
        f64::INFINITY
    };
    // Points: contiguous around the bracket, all at least T·FIT_LOW, those
    // above the bracket at most FIT_HIGH·top.
    let low = (threshold * FIT_LOW).max(BASELINE_SES * shape.line.se_at(k as f64 + 0.5));
    let high = top * if levelled { FIT_HIGH_PLATEAU } else { FIT_HIGH };
    let mut lo = k - 1;
    while lo > 0 && k - 1 - lo < FIT_MAX_BELOW && corrected[lo - 1] >= low {
        lo -= 1;
    }
    let mut hi = k;
    while hi + 1 < corrected.len() && hi + 1 - lo < FIT_MAX_POINTS && corrected[hi + 1] <= high {
        hi += 1;
    }
    let points = &corrected[lo..=hi];
    let m = points.len();
    let degree = match m {
        0..=2 => return fallback(),
        3 => 1,
        _ => 2,
    };
    // u = cycle − (k + ½): the bracket sits at u = ±½.
    let centre = k as f64 + 0.5;
    let u0 = lo as f64 + 1.0 - centre;
    // q = F / (1 − F/P) ("odds" in units of F), y = ln q, and the weight
    // (F (1 − F/P) / T)², scaled by T so it stays near 1 in any units.
    let odds = |f: f64| f / (1.0 - f / plateau);
    let weight = |f: f64| {
        let r = f * (1.0 - f / plateau) / threshold;
        r * r
    };
    let mut qs = [0.0; FIT_MAX_POINTS];
    let mut ys = [0.0; FIT_MAX_POINTS];
    let mut ws = [0.0; FIT_MAX_POINTS];
    for (j, &f) in points.iter().enumerate() {
        if !(f > 0.0 && f < plateau) {
            return fallback();
        }
        qs[j] = odds(f);
        ys[j] = qs[j].ln();
        ws[j] = weight(f);
    }
    let Some(first) = weighted_poly(&ys[..m], &ws[..m], u0, degree) else {
        return fallback();
    };
    let p = if precise {
        // Reweight from the fit: q̂ = q·exp(ŷ − y), the exponential by its
        // series (the residuals are small; clamped so a wild one cannot blow up).
        for j in 0..m {
            let d = (eval(&first, u0 + j as f64) - ys[j]).clamp(-1.0, 1.0);
            let q = qs[j] * (1.0 + d * (1.0 + d * (0.5 + d / 6.0)));
            let f = q / (1.0 + q / plateau);
            ws[j] = weight(f);
        }
        let Some(p) = weighted_poly(&ys[..m], &ws[..m], u0, degree) else {
            return fallback();
        };
        p
    } else {
        first
    };
    // Root of a + b·u + c·u² = y(T) on the rising side (where the slope
    // b + 2c·u is +√disc), in the form that stays exact when c is tiny.
    let [a, b, c] = p;
    let d = odds(threshold).ln() - a;
    let disc = b * b + 4.0 * c * d;
    if disc.is_nan() || disc <= 0.0 {
        return fallback();
    }
    let rate_at_t = disc.sqrt();
    let u = 2.0 * d / (b + rate_at_t);
    if u.is_nan() || u.abs() > 1.5 {
        return fallback();
    }
    // Growth rate of the tail below the fitted points. In the logit the
    // slope at the lowest point is already close to the rate at the bottom
    // of the rise. In ln F a sigmoid slows by a factor (1 − F/A) on its way
    // up, so the rate at T is scaled back by the top as an estimate of A.
    let rate = if levelled {
        slope_at(&p, u0)
    } else {
        rate_at_t / (1.0 - threshold / top).max(0.5)
    }
    .clamp(rate_at_t, 2.0 * rate_at_t);
    let q0 = eval(&p, u0).exp();
    let value = q0 / (1.0 + q0 / plateau);
    if !(value > 0.0 && value.is_finite()) {
        return fallback();
    }
    Estimate {
        index: k,
        ct: centre + u,
        tail: Tail {
            cycle: centre + u0,
            value,
            rate: clamp_rate(rate),
        },
    }
}

fn eval(p: &[f64; 3], u: f64) -> f64 {
    p[0] + u * (p[1] + u * p[2])
}

fn slope_at(p: &[f64; 3], u: f64) -> f64 {
    p[1] + 2.0 * u * p[2]
}

fn clamp_rate(rate: f64) -> f64 {
    if rate.is_finite() {
        rate.clamp(RATE_MIN, RATE_MAX)
    } else {
        std::f64::consts::LN_2
    }
}

/// Weighted least squares of `y_j` on `u_j = u0 + j` with a polynomial of
/// `degree` 1 or 2: coefficients `[a, b, c]` of `a + b·u + c·u²` (`c` = 0
/// for a line), or `None` if the system is singular.
fn weighted_poly(y: &[f64], w: &[f64], u0: f64, degree: usize) -> Option<[f64; 3]> {
    // Moments Σw·u^p and Σw·u^p·y.
    let mut s = [0.0; 5];
    let mut t = [0.0; 3];
    for (j, (&yj, &wj)) in y.iter().zip(w).enumerate() {
        let u = u0 + j as f64;
        let u2 = u * u;
        s[0] += wj;
        s[1] += wj * u;
        s[2] += wj * u2;
        s[3] += wj * u2 * u;
        s[4] += wj * u2 * u2;
        t[0] += wj * yj;
        t[1] += wj * u * yj;
        t[2] += wj * u2 * yj;
    }
    if degree == 1 {
        let det = s[0] * s[2] - s[1] * s[1];
        if det.is_nan() || det <= 1e-12 * s[0] * s[2] {
            return None;
        }
        let b = (s[0] * t[1] - s[1] * t[0]) / det;
        let a = (t[0] - b * s[1]) / s[0];
        return (a.is_finite() && b.is_finite()).then_some([a, b, 0.0]);
    }
    // Cramer's rule on the symmetric 3 × 3 normal equations.
    let c00 = s[2] * s[4] - s[3] * s[3];
    let c01 = s[2] * s[3] - s[1] * s[4];
    let c02 = s[1] * s[3] - s[2] * s[2];
    let det = s[0] * c00 + s[1] * c01 + s[2] * c02;
    if det.is_nan() || det <= 1e-12 * s[0] * s[2] * s[4] {
        return None;
    }
    let c11 = s[0] * s[4] - s[2] * s[2];
    let c12 = s[1] * s[2] - s[0] * s[3];
    let c22 = s[0] * s[2] - s[1] * s[1];
    let a = (c00 * t[0] + c01 * t[1] + c02 * t[2]) / det;
    let b = (c01 * t[0] + c11 * t[1] + c12 * t[2]) / det;
    let c = (c02 * t[0] + c12 * t[1] + c22 * t[2]) / det;
    (a.is_finite() && b.is_finite() && c.is_finite()).then_some([a, b, c])
}

/// Cycle of the maximal Savitzky–Golay second derivative after the window
/// start, refined by a quadratic over ±3 points; `None` if the peak is not
/// 50 SDs of the second-derivative noise. That noise is computed from the
/// baseline residual SD (a filter with weights w turns white noise of SD s
/// into noise of SD s·|w|), because comparing a second derivative with the
/// readings' own SD would mix units and reject most real curves.
pub(super) fn cp(corrected: &[f64], start: usize, residual_sd: f64) -> Option<f64> {
    let n = corrected.len();
    if n < SG_D2.len() {
        return None;
    }
    // On the stack for curves of up to STACK_CYCLES cycles: a run takes
    // the Cp of every amplifying curve to choose its thresholds.
    let len = n - SG_D2.len() + 1;
    let mut stack = [0.0; STACK_CYCLES];
    let mut heap;
    let d2: &mut [f64] = if len <= STACK_CYCLES {
        &mut stack[..len]
    } else {
        heap = vec![0.0; len];
        &mut heap
    };
    // Tap by tap over all positions rather than position by position: the
    // same sums in the same order (so the same bits), but the inner loop
    // runs across positions and vectorises. -0.0 is where `Iterator::sum`
    // starts.
    d2.fill(-0.0);
    for (t, w) in SG_D2.iter().enumerate() {
        for (d, f) in d2.iter_mut().zip(&corrected[t..]) {
            *d += w * f;
        }
    }
    for d in d2.iter_mut() {
        *d /= SG_NORM;
    }
    let d2: &[f64] = d2;
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

/// Marks readings that stand more than [`SPIKE_SDS`] robust SDs beyond both
/// neighbours, and returns that robust SD of one reading.
///
/// The SD comes from the median absolute deviation of the cycle-to-cycle
/// differences, which the few steep cycles of a rise cannot inflate much
/// (a rise still pushes it up, by about 1.8 × on the synthetic positives of
/// the accuracy test, which is why automatic thresholds sit higher on
/// positives than 10 baseline SDs; see [`CurveResult::noise_sd`]). It is
/// floored at 0.1 % of the curve's `span` so that a smooth, noise-free
/// curve has no "spikes".
///
/// [`CurveResult::noise_sd`]: super::CurveResult::noise_sd
fn find_spikes(readings: &[f64], span: f64, spikes: &mut [bool]) -> f64 {
    let n = readings.len();
    if n < 3 {
        return 0.0;
    }
    // Medians of integers that order like the differences (as f32: a
    // noise SD needs no more): selection over small integers is several
    // times faster than over floats with a comparison closure, and these two
    // medians were the slowest part of analysing a negative curve.
    let mut stack = [0_u32; STACK_CYCLES];
    let mut heap;
    let keys: &mut [u32] = if n - 1 <= STACK_CYCLES {
        &mut stack[..n - 1]
    } else {
        heap = vec![0_u32; n - 1];
        &mut heap
    };
    for (key, w) in keys.iter_mut().zip(readings.windows(2)) {
        *key = order_key(w[1] - w[0]);
    }
    let centre = median(keys);
    for (key, w) in keys.iter_mut().zip(readings.windows(2)) {
        *key = order_key((w[1] - w[0] - centre).abs());
    }
    let mad = median(keys);
    let sd = (1.4826 * mad / std::f64::consts::SQRT_2).max(1e-3 * span);
    let limit = SPIKE_SDS * sd;
    for k in 1..n - 1 {
        let (l, v, r) = (readings[k - 1], readings[k], readings[k + 1]);
        let (low, high) = if l < r { (l, r) } else { (r, l) };
        spikes[k] = v - high > limit || low - v > limit;
    }
    sd
}

/// An integer that orders like `x` (as `f32`, plenty for a noise SD) under
/// `total_cmp`: negative floats have all bits flipped, others just the sign
/// bit.
fn order_key(x: f64) -> u32 {
    let bits = (x as f32).to_bits();
    if bits >> 31 == 1 {
        !bits
    } else {
        bits | (1 << 31)
    }
}

fn from_order_key(key: u32) -> f64 {
    f64::from(f32::from_bits(if key >> 31 == 1 {
        key & !(1 << 31)
    } else {
        !key
    }))
}

/// Median of the floats behind `keys`, by selection (reorders `keys`).
fn median(keys: &mut [u32]) -> f64 {
    let len = keys.len();
    if len == 0 {
        return 0.0;
    }
    let (lower, &mut mid, _) = keys.select_nth_unstable(len / 2);
    let upper = from_order_key(mid);
    if len % 2 == 1 {
        upper
    } else {
        let below = lower.iter().copied().max().unwrap_or(mid);
        (from_order_key(below) + upper) / 2.0
    }
}
