//! What the demo's tubes hold: per tube its barcode, pool size, priority and due time
//! (all pcrd is told), and the truth the simulated cycler amplifies (which the daemon
//! is not told, and which the summary checks its calls against).
//!
//! The default scenario is generated (deterministic, so a restarted demo builds the
//! same tubes); `--scenario FILE` reads one from TOML:
//!
//! ```toml
//! kit = "sarscov2-orf1ab-n-ic"          # optional; this is the default
//! [[tubes]]
//! barcode = "POOL-0001"
//! pool_size = 10                        # default 1
//! priority = "urgent"                   # default routine
//! due_in = "4h"                         # optional
//! ct = { ORF1ab = 18.2, N = 18.9 }      # viral targets that amplify; absent = negative
//! rerun_ct = { ORF1ab = 35.0, N = 35.5 }  # on a rerun (default: as `ct`)
//! control_fails = false                 # the internal control fails: invalid
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use pcrd_drivers::sim::cycler::{PlateScenario, WellCurve, WellRole};
use pcrd_protocol::analysis::model::NoiseRng;
use pcrd_protocol::domain::{PlateFormat, Well};
use serde::Deserialize;

/// The kit every plate of the default scenario uses.
pub const DEFAULT_KIT: &str = "sarscov2-orf1ab-n-ic";
/// Samples on a 96-well plate with the kit's two controls.
pub const SAMPLES_PER_PLATE: usize = 94;

/// One tube of the scenario.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TubeSpec {
    pub barcode: String,
    #[serde(default = "one")]
    pub pool_size: u8,
    /// `routine` (default) or `urgent`.
    pub priority: Option<String>,
    /// Due this long after receipt (`4h`, `90min`).
    pub due_in: Option<String>,
    /// True Ct of each viral target that amplifies on the first test.
    #[serde(default)]
    pub ct: BTreeMap<String, f64>,
    /// True Ct on a rerun; the first test's when absent.
    pub rerun_ct: Option<BTreeMap<String, f64>>,
    /// The internal control does not amplify (a failed extraction).
    #[serde(default)]
    pub control_fails: bool,
}

fn one() -> u8 {
    1
}

/// What the summary expects pcrd to report for a tube on a given test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expected {
    Positive,
    Negative,
    /// Some viral targets only: the kit decides (retest or inconclusive).
    Partial,
    Invalid,
}

impl TubeSpec {
    /// The viral targets' true Cts on test `attempt` (0 = first).
    pub fn truth(&self, attempt: u32) -> &BTreeMap<String, f64> {
        match (&self.rerun_ct, attempt) {
            (Some(rerun), 1..) => rerun,
            _ => &self.ct,
        }
    }

    pub fn expected(&self, attempt: u32, viral_targets: &[String]) -> Expected {
        let truth = self.truth(attempt);
        let amplified = viral_targets
            .iter()
            .filter(|t| truth.contains_key(*t))
            .count();
        if amplified == viral_targets.len() && amplified > 0 {
            Expected::Positive
        } else if amplified > 0 {
            Expected::Partial
        } else if self.control_fails {
            Expected::Invalid
        } else {
            Expected::Negative
        }
    }
}

/// Problems with a scenario file, all at once.
#[derive(Debug, thiserror::Error)]
#[error("scenario {path}: {}", problems.join("; "))]
pub struct ScenarioError {
    pub path: String,
    pub problems: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScenarioFile {
    kit: Option<String>,
    tubes: Vec<TubeSpec>,
}

/// The tubes of a demo and the kit they are tested with.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub kit: String,
    pub tubes: Vec<TubeSpec>,
    /// Where the tubes came from, for the summary.
    pub source: String,
}

impl Scenario {
    /// Reads a scenario file; `viral_targets` are the kit's (checked against each
    /// tube's `ct`). The kit is checked by the caller, which knows the daemon's kits.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let fail = |problems: Vec<String>| ScenarioError {
            path: path.display().to_string(),
            problems,
        };
        let text = std::fs::read_to_string(path).map_err(|e| fail(vec![e.to_string()]))?;
        let file: ScenarioFile = toml::from_str(&text).map_err(|e| fail(vec![e.to_string()]))?;
        let mut problems = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, tube) in file.tubes.iter().enumerate() {
            let at = format!("tubes[{i}] ({})", tube.barcode);
            if !seen.insert(tube.barcode.as_str()) {
                problems.push(format!("{at}: barcode given twice"));
            }
            if !(1..=20).contains(&tube.pool_size) {
                problems.push(format!("{at}: pool_size must be 1..=20"));
            }
            if let Some(p) = &tube.priority
                && p != "routine"
                && p != "urgent"
            {
                problems.push(format!("{at}: priority must be routine or urgent"));
            }
            for ct in tube
                .ct
                .values()
                .chain(tube.rerun_ct.iter().flat_map(|m| m.values()))
            {
                if !(10.0..=40.0).contains(ct) {
                    problems.push(format!("{at}: Ct {ct} is outside 10..=40"));
                }
            }
        }
        if file.tubes.is_empty() {
            problems.push("no [[tubes]]".into());
        }
        if !problems.is_empty() {
            return Err(fail(problems));
        }
        Ok(Scenario {
            kit: file.kit.unwrap_or_else(|| DEFAULT_KIT.into()),
            tubes: file.tubes,
            source: path.display().to_string(),
        })
    }

    /// Checks the tubes' targets against the kit's viral targets.
    pub fn check_targets(&self, viral_targets: &[String]) -> Result<(), ScenarioError> {
        let mut problems = Vec::new();
        for tube in &self.tubes {
            for name in tube
                .ct
                .keys()
                .chain(tube.rerun_ct.iter().flat_map(|m| m.keys()))
            {
                if !viral_targets.contains(name) {
                    problems.push(format!(
                        "{}: {name} is not a viral target of {} ({})",
                        tube.barcode,
                        self.kit,
                        viral_targets.join(", ")
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ScenarioError {
                path: self.source.clone(),
                problems,
            })
        }
    }

    /// The default scenario: `tubes` tubes (94 per plate when not given) spread over
    /// `plates` plates' worth of barcodes. On each plate: pools of 5 and 10 beside
    /// single swabs, a few urgent tubes due in 4 h, eight positives across the Ct
    /// range (15 to 36), and one tube with only the last viral target amplifying
    /// late, which the kit sends for a retest and which is a clear positive on its
    /// rerun.
    pub fn generated(viral_targets: &[String], plates: usize, tubes: Option<usize>) -> Scenario {
        let total = tubes.unwrap_or(plates * SAMPLES_PER_PLATE);
        let per_plate = total.div_ceil(plates.max(1)).max(1);
        let mut out = Vec::with_capacity(total);
        for plate in 0..plates.max(1) {
            let first = plate * per_plate;
            let count = per_plate.min(total.saturating_sub(first));
            if count == 0 {
                break;
            }
            let mut rng = NoiseRng::new(0xDE30 + plate as u64);
            // Eight positives at spread Cts and one partial, at seeded positions.
            let mut slots: Vec<usize> = (0..count).collect();
            for i in (1..slots.len()).rev() {
                let j = (rng.next_u64() % (i as u64 + 1)) as usize;
                slots.swap(i, j);
            }
            let positives: Vec<usize> = slots.iter().copied().take(8.min(count)).collect();
            let partial = slots.get(8).copied();
            for i in 0..count {
                let pool_size = match i % 9 {
                    1 | 5 => 5,
                    3 => 10,
                    _ => 1,
                };
                let urgent = i % 16 == 0;
                let mut ct = BTreeMap::new();
                let mut rerun_ct = None;
                if let Some(rank) = positives.iter().position(|&p| p == i) {
                    // 15, 18, ..., 36: strong to weak.
                    let base = 15.0 + 3.0 * rank as f64 + rng.range(-0.5, 0.5);
                    for target in viral_targets {
                        ct.insert(target.clone(), base + rng.range(-0.4, 0.4));
                    }
                } else if partial == Some(i)
                    && let Some(last) = viral_targets.last()
                    && viral_targets.len() > 1
                {
                    ct.insert(last.clone(), 35.0 + rng.range(0.0, 1.0));
                    rerun_ct = Some(
                        viral_targets
                            .iter()
                            .map(|t| (t.clone(), 33.0 + rng.range(0.0, 1.0)))
                            .collect(),
                    );
                }
                out.push(TubeSpec {
                    barcode: format!("DEMO-{:04}-{:03}", plate + 1, i + 1),
                    // A pool of one is a single swab: the partial positive stays one.
                    pool_size: if partial == Some(i) { 1 } else { pool_size },
                    priority: Some(if urgent { "urgent" } else { "routine" }.into()),
                    due_in: Some(if urgent { "4h" } else { "24h" }.into()),
                    ct,
                    rerun_ct,
                    control_fails: false,
                });
            }
        }
        Scenario {
            kit: DEFAULT_KIT.into(),
            tubes: out,
            source: "generated".into(),
        }
    }
}

/// A plate's contents as the cycler sees them, well by well (column-major).
#[derive(Clone, Debug)]
pub enum WellFill<'a> {
    Empty,
    PositiveControl,
    NegativeControl,
    Sample { tube: &'a TubeSpec, attempt: u32 },
}

/// The curves the simulated cycler produces for a plate: per well and channel (the
/// kit's targets in channel order), the tube's truth on this attempt; the internal
/// control amplifies at Ct 24–30 in every sample unless the tube says it fails.
pub fn plate_curves(
    fills: &[WellFill<'_>],
    targets: &[(String, bool)],
    seed: u64,
) -> PlateScenario {
    let mut rng = NoiseRng::new(seed);
    let mut roles = Vec::with_capacity(fills.len());
    let mut curves = Vec::with_capacity(fills.len());
    for fill in fills {
        let role = match fill {
            WellFill::PositiveControl => WellRole::PositiveControl,
            WellFill::NegativeControl | WellFill::Empty => WellRole::NoTemplateControl,
            WellFill::Sample { .. } => WellRole::Sample,
        };
        let row = targets
            .iter()
            .map(|(name, viral)| {
                let ct = match fill {
                    WellFill::Empty | WellFill::NegativeControl => None,
                    WellFill::PositiveControl => Some(28.0),
                    WellFill::Sample { tube, attempt } if *viral => {
                        tube.truth(*attempt).get(name).copied()
                    }
                    WellFill::Sample { tube, .. } if tube.control_fails => None,
                    WellFill::Sample { .. } => Some(rng.range(24.0, 30.0)),
                };
                WellCurve {
                    ct,
                    efficiency: rng.range(1.88, 2.0),
                    baseline: rng.range(1_000.0, 3_000.0),
                    drift: rng.range(-1.5, 1.5),
                    plateau: rng.range(2_000.0, 4_000.0),
                    noise_sd: 3.0,
                    seed: rng.next_u64(),
                }
            })
            .collect();
        roles.push(role);
        curves.push(row);
    }
    PlateScenario { roles, curves }
}

/// Column-major index of a well name on a plate of this format.
pub fn well_index(format: PlateFormat, name: &str) -> Option<usize> {
    let well: Well = name.parse().ok()?;
    format.wells_column_major().position(|w| w == well)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn viral() -> Vec<String> {
        vec!["ORF1ab".into(), "N".into()]
    }

    #[test]
    fn the_generated_plate_has_positives_across_the_range_and_one_partial() {
        let s = Scenario::generated(&viral(), 1, None);
        assert_eq!(s.tubes.len(), 94);
        let positives: Vec<f64> = s
            .tubes
            .iter()
            .filter(|t| t.expected(0, &viral()) == Expected::Positive)
            .map(|t| t.ct["N"])
            .collect();
        assert_eq!(positives.len(), 8);
        assert!(positives.iter().any(|ct| *ct < 17.0), "{positives:?}");
        assert!(positives.iter().any(|ct| *ct > 34.0), "{positives:?}");
        let partial: Vec<&TubeSpec> = s
            .tubes
            .iter()
            .filter(|t| t.expected(0, &viral()) == Expected::Partial)
            .collect();
        assert_eq!(partial.len(), 1);
        assert_eq!(partial[0].expected(1, &viral()), Expected::Positive);
        assert!(s.tubes.iter().any(|t| t.pool_size == 10));
        assert!(s.tubes.iter().any(|t| t.pool_size == 5));
        // Deterministic: a restarted demo builds the same tubes.
        assert_eq!(s.tubes, Scenario::generated(&viral(), 1, None).tubes);
    }

    #[test]
    fn a_given_tube_count_is_spread_over_the_plates() {
        let s = Scenario::generated(&viral(), 13, Some(1200));
        assert_eq!(s.tubes.len(), 1200);
        let distinct: std::collections::HashSet<&str> =
            s.tubes.iter().map(|t| t.barcode.as_str()).collect();
        assert_eq!(distinct.len(), 1200);
    }

    #[test]
    fn a_scenario_file_with_problems_names_each() {
        let dir = std::env::temp_dir().join(format!("pcrd-scenario-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.toml");
        std::fs::write(
            &path,
            "[[tubes]]\nbarcode = \"A-0001\"\npool_size = 30\nct = { N = 50.0 }\n\
             [[tubes]]\nbarcode = \"A-0001\"\npriority = \"stat\"\n",
        )
        .unwrap();
        let e = Scenario::load(&path).unwrap_err().to_string();
        for needle in ["pool_size", "outside 10..=40", "given twice", "priority"] {
            assert!(e.contains(needle), "{needle}: {e}");
        }
        std::fs::write(
            &path,
            "[[tubes]]\nbarcode = \"A-0001\"\nct = { S = 20.0 }\n",
        )
        .unwrap();
        let s = Scenario::load(&path).unwrap();
        let e = s.check_targets(&viral()).unwrap_err().to_string();
        assert!(e.contains("S is not a viral target"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn controls_and_samples_get_the_curves_the_truth_says() {
        let s = Scenario::generated(&viral(), 1, None);
        let positive = s
            .tubes
            .iter()
            .find(|t| t.expected(0, &viral()) == Expected::Positive)
            .unwrap();
        let targets = vec![
            ("ORF1ab".to_string(), true),
            ("N".to_string(), true),
            ("IC".to_string(), false),
        ];
        let fills = [
            WellFill::Sample {
                tube: positive,
                attempt: 0,
            },
            WellFill::PositiveControl,
            WellFill::NegativeControl,
            WellFill::Empty,
        ];
        let plate = plate_curves(&fills, &targets, 1);
        assert_eq!(plate.curves[0][1].ct, positive.ct.get("N").copied());
        assert!(
            plate.curves[0][2].ct.is_some(),
            "internal control amplifies"
        );
        assert!(plate.curves[1].iter().all(|c| c.ct == Some(28.0)));
        assert!(plate.curves[2].iter().all(|c| c.ct.is_none()));
        assert_eq!(plate.roles[1], WellRole::PositiveControl);
        assert_eq!(well_index(PlateFormat::Wells96, "H12"), Some(95));
        assert_eq!(well_index(PlateFormat::Wells96, "B1"), Some(1));
    }
}
