//! Curves that did not amplify must be Undetermined: zero false positives
//! over 32,500 seeded flat, drifting, bleaching, spiking, noisy and
//! late-creeping curves (noise SD 0.0005–0.05, i.e. up to T/4 of the kit
//! threshold T = 0.2 used for positives), each under the automatic
//! threshold (the one noise and drift can fool), a fixed kit threshold
//! (where the noise is under T/10), the Cp method, and a fixed baseline
//! window.
//!
//! `cargo test -p pcrd-protocol --release --test analysis_negatives -- --nocapture`

use pcrd_protocol::analysis::model::{CurveModel, LateRise, NoiseRng, Spike};
use pcrd_protocol::analysis::{AnalysisSettings, Ct, Method, QcFlag, analyze_curve};

const CASES: u64 = 6500;

fn negative(rng: &mut NoiseRng) -> CurveModel {
    CurveModel {
        cycles: 45,
        baseline: rng.range(-1.0, 5.0),
        amplitude: 0.0,
        noise_sd: rng.range(0.0005, 0.05),
        seed: rng.next_u64(),
        ..CurveModel::default()
    }
}

/// Every setting a negative must be Undetermined under. For the fixed
/// threshold the noise is kept under T/10: above that the curve is flagged
/// noisy_baseline and a crossing by noise is the flag's whole point.
fn assert_undetermined(model: &CurveModel, what: &str) -> Vec<QcFlag> {
    let readings = model.readings();
    analysed(&readings, model.noise_sd, what, &format!("{model:?}"))
}

/// As [`assert_undetermined`], for readings built outside the model.
fn analysed(readings: &[f64], noise_sd: f64, what: &str, model: &str) -> Vec<QcFlag> {
    let mut flags = Vec::new();
    for (method, adaptive_baseline) in [
        (Method::Threshold, true),
        (Method::Cp, true),
        (Method::Threshold, false),
    ] {
        let mut fixed = vec![None];
        if noise_sd <= 0.02 {
            fixed.push(Some(0.2));
        }
        for fixed_threshold in fixed {
            let settings = AnalysisSettings {
                method,
                fixed_threshold,
                adaptive_baseline,
                ..AnalysisSettings::default()
            };
            let result = analyze_curve(readings, &settings).expect("valid curve");
            assert_eq!(
                result.ct,
                Ct::Undetermined,
                "{what} called positive with {settings:?}: {model} -> {result:?}"
            );
            flags.extend(result.flags);
        }
    }
    flags
}

#[test]
fn flat_and_noisy_curves_are_undetermined() {
    let mut rng = NoiseRng::new(1);
    for _ in 0..CASES {
        let model = negative(&mut rng);
        assert_undetermined(&model, "flat noisy curve");
    }
    // Perfectly flat, at zero and at a large level.
    for level in [0.0, 1.0, 1e6] {
        let model = CurveModel {
            amplitude: 0.0,
            baseline: level,
            ..CurveModel::default()
        };
        assert_undetermined(&model, "perfectly flat curve");
    }
}

#[test]
fn drifting_curves_are_undetermined_and_flagged() {
    let mut rng = NoiseRng::new(2);
    let mut flagged = 0;
    for _ in 0..CASES {
        let model = CurveModel {
            drift: rng.range(-0.05, 0.05),
            ..negative(&mut rng)
        };
        if assert_undetermined(&model, "drifting curve").contains(&QcFlag::Drift) {
            flagged += 1;
        }
    }
    assert!(flagged > 0, "no drift ever flagged");
}

/// Photobleaching: the background decays towards a lower level, fast at
/// first (an exponential, which a straight baseline cannot follow), by 2 to
/// 15 % of a background of 0.5 to 5, with time constants of 3 to 30 cycles.
#[test]
fn bleaching_curves_are_undetermined() {
    let mut rng = NoiseRng::new(5);
    let mut drift_flags = 0;
    for _ in 0..CASES {
        let model = CurveModel {
            baseline: rng.range(0.5, 5.0),
            ..negative(&mut rng)
        };
        let depth = rng.range(0.02, 0.15) * model.baseline;
        let tau = rng.range(3.0, 30.0);
        let readings: Vec<f64> = model
            .readings()
            .iter()
            .enumerate()
            .map(|(k, v)| v - depth * (1.0 - (-((k + 1) as f64) / tau).exp()))
            .collect();
        let flags = analysed(
            &readings,
            model.noise_sd,
            "bleaching curve",
            &format!("{model:?} depth {depth} tau {tau}"),
        );
        if flags.contains(&QcFlag::Drift) {
            drift_flags += 1;
        }
    }
    println!("bleaching curves flagged drift: {drift_flags} of {CASES}");
    assert!(drift_flags > 0);
}

#[test]
fn single_spikes_are_undetermined_and_flagged() {
    let mut rng = NoiseRng::new(3);
    for _ in 0..CASES {
        let base = negative(&mut rng);
        let height = rng.range(30.0, 300.0) * base.noise_sd.max(0.01);
        let model = CurveModel {
            spikes: vec![Spike {
                cycle: 1 + (rng.next_u64() % 44) as usize,
                height,
            }],
            drift: rng.range(-0.01, 0.01),
            ..base
        };
        let flags = assert_undetermined(&model, "spiking curve");
        // A spike on cycle 1 or 45 has only one neighbour and is not judged.
        let cycle = model.spikes[0].cycle;
        if (2..45).contains(&cycle) {
            assert!(
                flags.contains(&QcFlag::Spike),
                "spike not flagged: {model:?}"
            );
        }
    }
}

#[test]
fn late_weak_linear_rises_are_undetermined() {
    let mut rng = NoiseRng::new(4);
    let mut flagged = 0;
    for _ in 0..CASES {
        let base = negative(&mut rng);
        // Creeping by 0.2 to 2 noise SDs per cycle (at least 0.001): it may
        // cross an automatic threshold late, but it never doubles it fast.
        let per_cycle = rng.range(0.2, 2.0) * base.noise_sd.max(0.001);
        let model = CurveModel {
            late_rise: Some(LateRise {
                start_cycle: rng.range(25.0, 40.0),
                per_cycle,
            }),
            ..base
        };
        if assert_undetermined(&model, "late weak rise").contains(&QcFlag::LateWeakRise) {
            flagged += 1;
        }
    }
    println!("late weak rises flagged late_weak_rise: {flagged} of {CASES}");
}
