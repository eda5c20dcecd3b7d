//! `common_threshold`: one threshold for all curves of a target in a run.
//!
//! A synthetic SYBR-like dilution series (raw fluorescence with a baseline
//! of 0.3–1 and a plateau of 2–6 arbitrary units, 45 cycles, ten-fold
//! dilutions, three replicates, no-template controls): the common
//! threshold must sit above the noise and in the lower exponential phase,
//! give a Cq linear in log10(copies) with the slope the efficiency implies,
//! scatter replicates less than per-curve automatic thresholds do, and
//! leave the controls Undetermined.
//!
//! `cargo test -p pcrd-protocol --release --test analysis_common_threshold -- --nocapture`

use pcrd_protocol::analysis::model::{CurveModel, NoiseRng};
use pcrd_protocol::analysis::{
    AnalysisError, AnalysisSettings, Ct, analyze_curve, common_threshold,
};

const EFFICIENCY: f64 = 1.92;
const DILUTIONS: usize = 5;
const REPLICATES: usize = 3;

struct Run {
    curves: Vec<Vec<f64>>,
    /// log10(copies) per curve; `None` for a no-template control.
    log_copies: Vec<Option<f64>>,
    plateau: f64,
    noise_sd: f64,
}

/// A run: Cq at the top dilution about 18, 10× less template per step.
fn run(seed: u64) -> Run {
    let mut rng = NoiseRng::new(seed);
    let slope = 1.0 / EFFICIENCY.ln();
    let plateau = rng.range(2.0, 6.0);
    let noise_sd = 0.004 * plateau;
    let mut curves = Vec::new();
    let mut log_copies = Vec::new();
    for dilution in 0..DILUTIONS {
        for _ in 0..REPLICATES {
            // Each cycle multiplies by E, so ten-fold less template delays
            // the rise by log(10) / log(E) cycles.
            let delay = dilution as f64 * 10f64.ln() / EFFICIENCY.ln();
            // Wells differ in plateau by ±15 % (reagents run out at
            // different points), not in their exponential phase, which only
            // the template sets: a logistic that is `amplitude` high follows
            // amplitude · exp((c − c_half) / slope) early on, so c_half
            // moves with ln(amplitude).
            let amplitude = plateau * rng.range(0.85, 1.15);
            let model = CurveModel {
                cycles: 45,
                baseline: rng.range(0.3, 1.0),
                drift: rng.range(-0.002, 0.002),
                amplitude,
                c_half: 22.0 + delay + slope * (amplitude / plateau).ln(),
                slope,
                noise_sd,
                seed: rng.next_u64(),
                ..CurveModel::default()
            };
            curves.push(model.readings());
            log_copies.push(Some(5.0 - dilution as f64));
        }
    }
    for _ in 0..3 {
        let model = CurveModel {
            baseline: rng.range(0.3, 1.0),
            drift: rng.range(-0.002, 0.002),
            amplitude: 0.0,
            noise_sd,
            seed: rng.next_u64(),
            ..CurveModel::default()
        };
        curves.push(model.readings());
        log_copies.push(None);
    }
    Run {
        curves,
        log_copies,
        plateau,
        noise_sd,
    }
}

/// Mean replicate SD over the dilutions, and slope and R² of Cq on
/// log10(copies), for Cqs in the run's order.
fn figures(run: &Run, cqs: &[Option<f64>]) -> (f64, f64, f64) {
    let mut sds = Vec::new();
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for d in 0..DILUTIONS {
        let group: Vec<f64> = (0..REPLICATES)
            .map(|r| cqs[d * REPLICATES + r].expect("positive determined"))
            .collect();
        let mean = group.iter().sum::<f64>() / REPLICATES as f64;
        let var = group.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / (REPLICATES - 1) as f64;
        sds.push(var.sqrt());
        for (r, &cq) in group.iter().enumerate() {
            xs.push(run.log_copies[d * REPLICATES + r].expect("standard"));
            ys.push(cq);
        }
    }
    let n = xs.len() as f64;
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let sxy: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let sxx: f64 = xs.iter().map(|x| (x - mx).powi(2)).sum();
    let syy: f64 = ys.iter().map(|y| (y - my).powi(2)).sum();
    let slope = sxy / sxx;
    let r2 = sxy * sxy / (sxx * syy);
    (sds.iter().sum::<f64>() / sds.len() as f64, slope, r2)
}

#[test]
fn common_threshold_is_in_the_exponential_phase_and_tightens_replicates() {
    let (mut common_sd, mut own_sd) = (0.0, 0.0);
    let runs = 40;
    for seed in 0..runs {
        let run = run(seed);
        let curves: Vec<&[f64]> = run.curves.iter().map(Vec::as_slice).collect();
        let settings = AnalysisSettings::default();
        let threshold = common_threshold(&curves, &settings)
            .expect("valid run")
            .expect("a threshold");
        assert!(
            threshold > 10.0 * run.noise_sd && threshold < 0.25 * run.plateau,
            "threshold {threshold} for noise {} and plateau {}",
            run.noise_sd,
            run.plateau
        );
        let fixed = AnalysisSettings {
            fixed_threshold: Some(threshold),
            ..settings.clone()
        };
        let at = |settings: &AnalysisSettings| -> Vec<Option<f64>> {
            run.curves
                .iter()
                .map(|c| analyze_curve(c, settings).expect("valid curve").ct.value())
                .collect()
        };
        let common = at(&fixed);
        let own = at(&settings);
        for (cq, copies) in common.iter().zip(&run.log_copies) {
            assert_eq!(cq.is_some(), copies.is_some(), "{cq:?} for {copies:?}");
        }
        let (sd, slope, r2) = figures(&run, &common);
        let (sd_own, _, _) = figures(&run, &own);
        let expected = -1.0 / EFFICIENCY.log10();
        assert!(
            (slope / expected - 1.0).abs() < 0.02 && r2 > 0.999,
            "slope {slope} (expected {expected}), R² {r2}"
        );
        if seed == 0 {
            println!(
                "run 0: plateau {:.2}, noise SD {:.4}, common threshold {threshold:.3} \
                 ({:.1} % of the plateau, {:.0} noise SDs); slope {slope:.3} (expected \
                 {expected:.3}), R² {r2:.5}",
                run.plateau,
                run.noise_sd,
                100.0 * threshold / run.plateau,
                threshold / run.noise_sd
            );
        }
        common_sd += sd / runs as f64;
        own_sd += sd_own / runs as f64;
    }
    println!(
        "mean replicate SD over {runs} runs: {common_sd:.4} cycles at the common threshold, \
         {own_sd:.4} at per-curve automatic thresholds"
    );
    assert!(common_sd < own_sd, "{common_sd} vs {own_sd}");
    assert!(common_sd < 0.08, "{common_sd}");
}

#[test]
fn edge_cases() {
    let settings = AnalysisSettings::default();
    assert_eq!(common_threshold(&[], &settings), Ok(None));
    let flat = vec![1.0; 40];
    assert_eq!(common_threshold(&[&flat, &flat], &settings), Ok(None));
    let fixed = AnalysisSettings {
        fixed_threshold: Some(0.3),
        ..settings.clone()
    };
    assert_eq!(common_threshold(&[&flat], &fixed), Ok(Some(0.3)));
    let bad = AnalysisSettings {
        fixed_threshold: Some(-1.0),
        ..settings.clone()
    };
    assert!(matches!(
        common_threshold(&[&flat], &bad),
        Err(AnalysisError::BadThreshold { .. })
    ));
    // Curves that cannot be analysed are left out; if none can, the error.
    let short = vec![1.0; 5];
    let mut nan = vec![1.0; 40];
    nan[3] = f64::NAN;
    assert!(matches!(
        common_threshold(&[&short, &nan], &settings),
        Err(AnalysisError::TooFewCycles { .. })
    ));
    let noisy = CurveModel {
        amplitude: 0.0,
        noise_sd: 0.01,
        ..CurveModel::default()
    }
    .readings();
    let t = common_threshold(&[&short, &noisy, &nan], &settings)
        .expect("one usable curve")
        .expect("a threshold");
    assert!((0.05..0.2).contains(&t), "{t}");
    let result = analyze_curve(
        &noisy,
        &AnalysisSettings {
            fixed_threshold: Some(t),
            ..settings
        },
    )
    .expect("valid");
    assert_eq!(result.ct, Ct::Undetermined);
}

/// `analyze_run` prepares each curve once and reads it at both the
/// automatic threshold (to choose the common one) and the chosen one; that
/// must give exactly what `common_threshold` and `analyze_curve` give on
/// their own, for spiky, early, late, negative, drifting and broken curves
/// alike, with either method.
#[test]
fn a_run_reads_every_curve_as_analyze_curve_does_at_the_common_threshold() {
    use pcrd_protocol::analysis::Method;
    use pcrd_protocol::analysis::model::Spike;
    use pcrd_protocol::rdml::{
        Document, Dye, Experiment, PcrFormat, Reaction, ReactionData, Run as RdmlRun, Sample,
        Target,
    };
    use pcrd_protocol::run_analysis::{RunSettings, TargetSettings, analyze_run};

    let mut rng = NoiseRng::new(11);
    let mut curve = |k: u32| -> Vec<f64> {
        match k % 23 {
            0 => vec![1.0; 5],
            1 => vec![1.0, f64::NAN, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
            2 => Vec::new(),
            _ => CurveModel {
                cycles: if k.is_multiple_of(17) { 80 } else { 45 },
                baseline: rng.range(0.3, 2.0),
                drift: rng.range(-0.01, 0.01),
                amplitude: if k.is_multiple_of(4) {
                    0.0
                } else {
                    rng.range(1.0, 3.0)
                },
                c_half: rng.range(8.0, 46.0),
                slope: rng.range(1.2, 2.0),
                noise_sd: rng.range(0.0, 0.03),
                seed: rng.next_u64(),
                spikes: if k.is_multiple_of(9) {
                    vec![Spike {
                        cycle: 10,
                        height: 0.5,
                    }]
                } else {
                    Vec::new()
                },
                ..CurveModel::default()
            }
            .readings(),
        }
    };
    let targets = ["A", "B", "C"];
    let reactions: Vec<Reaction> = (1..=96)
        .map(|id| Reaction {
            id,
            sample_id: "S".to_owned(),
            data: targets
                .iter()
                .enumerate()
                .map(|(t, target)| ReactionData {
                    target_id: (*target).to_owned(),
                    cq: None,
                    excluded: None,
                    threshold: None,
                    background: None,
                    background_slope: None,
                    fluorescence: curve(id * 3 + t as u32),
                })
                .collect(),
        })
        .collect();
    let doc = Document {
        version: "1.3".to_owned(),
        dyes: vec![Dye {
            id: "FAM".to_owned(),
        }],
        samples: vec![Sample {
            id: "S".to_owned(),
            kind: "unkn".to_owned(),
            quantity: None,
        }],
        targets: targets
            .iter()
            .map(|t| Target {
                id: (*t).to_owned(),
                dye_id: "FAM".to_owned(),
                kind: "toi".to_owned(),
            })
            .collect(),
        experiments: vec![Experiment {
            id: "e".to_owned(),
            runs: vec![RdmlRun {
                id: "r".to_owned(),
                instrument: None,
                cq_detection_method: None,
                format: PcrFormat::plate_96(),
                reactions,
            }],
        }],
    };
    let run = &doc.experiments[0].runs[0];
    let mut settings = RunSettings::default();
    // B: Cp at its common threshold; C: a fixed threshold.
    settings.targets.insert(
        "B".to_owned(),
        TargetSettings {
            method: Some(Method::Cp),
            ..TargetSettings::default()
        },
    );
    settings.targets.insert(
        "C".to_owned(),
        TargetSettings {
            threshold: Some(0.2),
            ..TargetSettings::default()
        },
    );
    for adaptive_baseline in [true, false] {
        settings.curve.adaptive_baseline = adaptive_baseline;
        let records = analyze_run(&doc, run, &settings);
        for (t, target) in targets.iter().enumerate() {
            let curves: Vec<&[f64]> = run
                .reactions
                .iter()
                .map(|r| r.data[t].fluorescence.as_slice())
                .collect();
            let fixed = settings.targets.get(*target).and_then(|s| s.threshold);
            let threshold = match fixed {
                Some(t) => Some(t),
                None => common_threshold(&curves, &settings.curve).unwrap(),
            };
            let curve_settings = AnalysisSettings {
                fixed_threshold: threshold,
                method: settings
                    .targets
                    .get(*target)
                    .and_then(|s| s.method)
                    .unwrap_or(Method::Threshold),
                ..settings.curve.clone()
            };
            let mine = records.iter().filter(|r| r.target == *target);
            for (record, curve) in mine.zip(&curves) {
                match analyze_curve(curve, &curve_settings) {
                    Ok(result) => {
                        assert_eq!(record.ct, result.ct.value(), "{record:?}");
                        assert_eq!(record.threshold, Some(result.threshold));
                        assert_eq!(record.qc, result.flags);
                        assert_eq!(record.error, None);
                    }
                    Err(e) => {
                        assert_eq!(record.ct, None);
                        assert!(record.error.as_deref().unwrap().ends_with(&e.to_string()));
                    }
                }
            }
        }
    }
}
