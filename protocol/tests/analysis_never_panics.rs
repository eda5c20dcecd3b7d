//! `analyze_curve` answers any vector of f64 (NaN, ±inf, huge, tiny, empty)
//! with a result or a typed error, never a panic, and never a Ct that is
//! not a finite, positive cycle.

use pcrd_protocol::analysis::{AnalysisError, AnalysisSettings, Ct, Method, analyze_curve};
use proptest::prelude::*;

fn settings() -> impl Strategy<Value = AnalysisSettings> {
    (
        prop_oneof![Just(Method::Threshold), Just(Method::Cp)],
        prop_oneof![
            Just(None),
            any::<f64>().prop_map(Some),
            (1e-6..10.0f64).prop_map(Some)
        ],
        0usize..20,
        0usize..60,
        any::<bool>(),
    )
        .prop_map(
            |(method, fixed_threshold, baseline_start, baseline_end, adaptive_baseline)| {
                AnalysisSettings {
                    method,
                    fixed_threshold,
                    baseline_start,
                    baseline_end,
                    adaptive_baseline,
                }
            },
        )
}

fn reading() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => -10.0..10.0f64,
        1 => any::<f64>(),
        1 => prop_oneof![Just(f64::MAX), Just(-f64::MAX), Just(f64::MIN_POSITIVE), Just(1e300), Just(-1e300), Just(0.0)],
    ]
}

fn check(readings: &[f64], settings: &AnalysisSettings) {
    match analyze_curve(readings, settings) {
        Ok(result) => {
            if let Ct::Determined(v) = result.ct {
                assert!(v.is_finite() && v > 0.0, "bad Ct {v}");
                assert!(v <= readings.len() as f64 + 1.0, "Ct {v} beyond the run");
            }
        }
        Err(AnalysisError::NonFinite { cycle, value }) => {
            assert!(!readings[cycle - 1].is_finite());
            assert!(value.is_nan() || value.is_infinite());
        }
        Err(_) => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_curves_never_panic(readings in prop::collection::vec(reading(), 0..60), settings in settings()) {
        check(&readings, &settings);
        check(&readings, &AnalysisSettings::default());
    }

    #[test]
    fn fully_arbitrary_bits_never_panic(readings in prop::collection::vec(any::<f64>(), 0..50)) {
        check(&readings, &AnalysisSettings::default());
    }
}

#[test]
fn edge_cases_give_typed_errors() {
    let d = AnalysisSettings::default();
    assert_eq!(analyze_curve(&[], &d), Err(AnalysisError::Empty));
    assert!(matches!(
        analyze_curve(&[1.0; 9], &d),
        Err(AnalysisError::TooFewCycles {
            cycles: 9,
            min: 10,
            ..
        })
    ));
    let mut readings = vec![1.0; 40];
    readings[16] = f64::NAN;
    let err = analyze_curve(&readings, &d).expect_err("NaN");
    assert!(matches!(err, AnalysisError::NonFinite { cycle: 17, .. }));
    assert_eq!(
        err.to_string(),
        "reading at cycle 17 is NaN, not a finite number"
    );
    // Huge but finite readings: no panic, no NaN Ct.
    let huge: Vec<f64> = (0..40)
        .map(|c| if c % 2 == 0 { f64::MAX } else { -f64::MAX })
        .collect();
    check(&huge, &d);
}
