//! Ct accuracy on thousands of seeded synthetic positives.
//!
//! Reference: for each noisy curve, the Ct that the same analysis gives for
//! the same curve model with the noise switched off (same drift, plateau,
//! slope and fixed threshold). The difference is then exactly what noise
//! does to the Ct; baseline bias from the sigmoid's tail, which is the same
//! with and without noise, cancels. A separate test checks the noise-free
//! Ct against the analytic crossing `c_half - slope·ln(A/T - 1)`, so the
//! reference itself is pinned. Either test fails if, say, the baseline is
//! fitted over the wrong cycles, the interpolation is off by a cycle, or
//! noise is allowed to pick the crossing.
//!
//! Run with the figures printed:
//! `cargo test -p pcrd-protocol --release --test analysis_accuracy -- --nocapture`

use pcrd_protocol::analysis::model::{CurveModel, NoiseRng};
use pcrd_protocol::analysis::{AnalysisSettings, Ct, analyze_curve};

/// The kit's fixed threshold on baseline-corrected fluorescence.
const THRESHOLD: f64 = 0.2;
const CURVES: usize = 4000;

/// A positive whose analytic Ct (at [`THRESHOLD`]) is `target`, with the
/// other parameters drawn over realistic ranges: plateau 1–4 (so T is 5–20 %
/// of it), efficiency 1.74–2.3 per cycle, noise SD in `noise` (T / noise SD
/// noise SDs as asked by the caller), background 0.5–2 drifting up
/// to ±0.005 per cycle.
fn positive(rng: &mut NoiseRng, target: f64, noise: (f64, f64)) -> CurveModel {
    let amplitude = rng.range(1.0, 4.0);
    let slope = rng.range(1.2, 1.8);
    CurveModel {
        cycles: 45,
        baseline: rng.range(0.5, 2.0),
        drift: rng.range(-0.005, 0.005),
        amplitude,
        c_half: target + slope * (amplitude / THRESHOLD - 1.0).ln(),
        slope,
        noise_sd: rng.range(noise.0, noise.1),
        seed: rng.next_u64(),
        ..CurveModel::default()
    }
}

fn ct_of(model: &CurveModel, settings: &AnalysisSettings) -> Option<f64> {
    let result = analyze_curve(&model.readings(), settings).expect("valid curve");
    match result.ct {
        Ct::Determined(v) => Some(v),
        Ct::Undetermined => None,
    }
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

/// Noise-induced |Ct error| against the noise-free twin: (sorted errors,
/// undetermined count).
fn noise_errors(seed: u64, noise: (f64, f64)) -> (Vec<f64>, usize) {
    let settings = AnalysisSettings {
        fixed_threshold: Some(THRESHOLD),
        ..AnalysisSettings::default()
    };
    let mut rng = NoiseRng::new(seed);
    let mut errors = Vec::with_capacity(CURVES);
    let mut missed = 0;
    for i in 0..CURVES {
        let target = 12.0 + 28.0 * i as f64 / (CURVES - 1) as f64;
        let noisy = positive(&mut rng, target, noise);
        let clean = CurveModel {
            noise_sd: 0.0,
            ..noisy.clone()
        };
        let reference = ct_of(&clean, &settings)
            .unwrap_or_else(|| panic!("noise-free positive undetermined: {clean:?}"));
        match ct_of(&noisy, &settings) {
            Some(ct) => errors.push((ct - reference).abs()),
            None => missed += 1,
        }
    }
    errors.sort_by(f64::total_cmp);
    (errors, missed)
}

fn report(label: &str, errors: &[f64], missed: usize) -> f64 {
    let within = errors.iter().filter(|&&e| e <= 0.15).count();
    let share = within as f64 / (errors.len() + missed) as f64;
    println!(
        "{label}: {} positives (Ct 12..40), {missed} undetermined, |error| p50 {:.4} \
         p99 {:.4} max {:.4}; {within} ({:.2} %) within 0.15 cycles",
        errors.len() + missed,
        quantile(errors, 0.5),
        quantile(errors, 0.99),
        errors.last().copied().unwrap_or(f64::NAN),
        share * 100.0
    );
    share
}

/// Noise SD 0.001–0.004 with T = 0.2: the threshold is 50–200 noise SDs
/// above the baseline, as for a validated kit threshold on a clean
/// instrument. (With the §6 baseline window 3..=15 a Ct near 40 is
/// extrapolated ~25 cycles from the window, so the baseline's own noise
/// dominates; see the next test for noisier curves.)
#[test]
fn noise_moves_ct_by_at_most_0_15_cycles_for_99_percent_of_positives() {
    let (errors, missed) = noise_errors(2026, (0.001, 0.004));
    let share = report("fixed T 0.2, noise SD 0.001-0.004", &errors, missed);
    assert_eq!(missed, 0, "positives called Undetermined");
    assert!(
        share >= 0.99,
        "only {:.2} % within 0.15 cycles",
        share * 100.0
    );
}

/// Noise SD 0.004–0.01 (T only 20–50 noise SDs): still every positive found
/// and a median error well under 0.15; the 99th percentile is reported, not
/// held to 0.15 (see above).
#[test]
fn noisier_positives_are_all_found_with_a_small_median_error() {
    let (errors, missed) = noise_errors(2027, (0.004, 0.01));
    report("fixed T 0.2, noise SD 0.004-0.01", &errors, missed);
    assert_eq!(missed, 0, "positives called Undetermined");
    assert!(quantile(&errors, 0.5) <= 0.1);
    assert!(quantile(&errors, 0.99) <= 0.5);
}

#[test]
fn noise_free_ct_matches_the_analytic_crossing() {
    let settings = AnalysisSettings {
        fixed_threshold: Some(THRESHOLD),
        ..AnalysisSettings::default()
    };
    let mut rng = NoiseRng::new(7);
    let mut worst: f64 = 0.0;
    // From Ct 22 on the sigmoid's tail in the 3..=15 window is below 1 % of
    // T; earlier risers keep the bias that §6's window rule leaves (up to
    // ~0.9 cycles late at Ct 12, printed below, the same with and without
    // noise).
    let mut early: f64 = 0.0;
    for i in 0..500 {
        let target = 12.0 + 28.0 * i as f64 / 499.0;
        let model = CurveModel {
            noise_sd: 0.0,
            ..positive(&mut rng, target, (0.0, 0.0))
        };
        let ct = ct_of(&model, &settings).expect("noise-free positive");
        if target >= 22.0 {
            worst = worst.max((ct - target).abs());
        } else {
            early = early.max((ct - target).abs());
        }
    }
    println!(
        "noise-free: worst |Ct - analytic crossing| {worst:.4} for Ct >= 22, {early:.4} below"
    );
    assert!(worst <= 0.05, "worst analytic error {worst}");
    assert!(early <= 1.0, "worst early-riser bias {early}");
}

/// Automatic threshold: compared with the analytic crossing of the model at
/// the threshold the analysis chose (so the threshold's own noise does not
/// count as error, but baseline and interpolation errors do).
#[test]
fn automatic_threshold_ct_matches_the_analytic_crossing_at_that_threshold() {
    let settings = AnalysisSettings::default();
    let mut rng = NoiseRng::new(99);
    let mut errors = Vec::new();
    let mut missed = 0;
    for i in 0..CURVES {
        let target = 12.0 + 28.0 * i as f64 / (CURVES - 1) as f64;
        let model = positive(&mut rng, target, (0.001, 0.01));
        let result = analyze_curve(&model.readings(), &settings).expect("valid curve");
        let analytic = model
            .crossing_cycle(result.threshold)
            .expect("below plateau");
        match result.ct {
            Ct::Determined(ct) => errors.push((ct - analytic).abs()),
            Ct::Undetermined => missed += 1,
        }
    }
    errors.sort_by(f64::total_cmp);
    let within = errors.iter().filter(|&&e| e <= 0.15).count();
    println!(
        "automatic threshold: {CURVES} positives, {missed} undetermined, |error| p50 {:.4} \
         p99 {:.4}, {within} within 0.15",
        quantile(&errors, 0.5),
        quantile(&errors, 0.99),
    );
    assert_eq!(missed, 0);
}
