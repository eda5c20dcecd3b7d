//! A deterministic synthetic amplification curve, for tests and (later) the
//! cycler simulator.
//!
//! `F(c) = baseline + drift·c + amplitude / (1 + exp(-(c - c_half) / slope))`
//! plus optional late linear creep, single-cycle spikes, a detector ceiling
//! and Gaussian noise from a tiny seeded PRNG ([`NoiseRng`]). The same model
//! and seed always give the same readings, on every platform: no `rand`, no
//! clock.

use serde::{Deserialize, Serialize};

/// A one-cycle reading error added on top of the smooth curve (a bubble, a
/// flash from a neighbouring well).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Spike {
    /// Cycle number (1-based) that gets the spike.
    pub cycle: usize,
    /// Added to that one reading (negative for a dip).
    pub height: f64,
}

/// A slow linear rise that starts late and never turns exponential (probe
/// degradation, evaporation): a classic false positive under an automatic
/// threshold.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LateRise {
    /// First cycle (1-based) of the creep.
    pub start_cycle: f64,
    /// Added per cycle after `start_cycle`.
    pub per_cycle: f64,
}

/// Parameters of one synthetic curve. Build with [`CurveModel::default`]
/// (a clean positive, Ct ≈ 25 at threshold 0.2) and struct-update syntax.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CurveModel {
    /// Number of cycles run (readings produced).
    pub cycles: usize,
    /// Background fluorescence at cycle 0.
    pub baseline: f64,
    /// Background change per cycle (bleaching is negative).
    pub drift: f64,
    /// Plateau height above the background; 0 for a negative.
    pub amplitude: f64,
    /// Cycle where the sigmoid is at half its plateau.
    pub c_half: f64,
    /// Sigmoid steepness in cycles; the per-cycle efficiency early on is
    /// `exp(1 / slope)` (≈ 2 for slope 1.44).
    pub slope: f64,
    /// Standard deviation of the Gaussian reading noise.
    pub noise_sd: f64,
    /// Seed of the noise generator.
    pub seed: u64,
    /// Single-cycle reading errors.
    pub spikes: Vec<Spike>,
    /// Optional late linear creep.
    pub late_rise: Option<LateRise>,
    /// Detector ceiling: readings above it are reported as exactly this.
    pub ceiling: Option<f64>,
}

impl Default for CurveModel {
    fn default() -> Self {
        CurveModel {
            cycles: 45,
            baseline: 1.0,
            drift: 0.0,
            amplitude: 2.0,
            c_half: 28.0,
            slope: 1.5,
            noise_sd: 0.0,
            seed: 1,
            spikes: Vec::new(),
            late_rise: None,
            ceiling: None,
        }
    }
}

impl CurveModel {
    /// The noise-free value of the amplification term alone at (real) cycle
    /// `c`: what a perfect baseline subtraction would leave.
    pub fn amplification(&self, c: f64) -> f64 {
        if self.amplitude == 0.0 {
            return 0.0;
        }
        self.amplitude / (1.0 + (-(c - self.c_half) / self.slope).exp())
    }

    /// The cycle where the amplification term alone reaches `threshold`, or
    /// `None` if it never does (threshold at or above the plateau). This is
    /// the analytic Ct of a perfectly baselined, noise-free curve.
    pub fn crossing_cycle(&self, threshold: f64) -> Option<f64> {
        if !(threshold > 0.0 && threshold < self.amplitude) {
            return None;
        }
        Some(self.c_half - self.slope * (self.amplitude / threshold - 1.0).ln())
    }

    /// The readings, cycle 1 first.
    pub fn readings(&self) -> Vec<f64> {
        let mut rng = NoiseRng::new(self.seed);
        (1..=self.cycles)
            .map(|cycle| {
                let c = cycle as f64;
                let mut f = self.baseline + self.drift * c + self.amplification(c);
                if let Some(rise) = self.late_rise {
                    f += rise.per_cycle * (c - rise.start_cycle).max(0.0);
                }
                for spike in &self.spikes {
                    if spike.cycle == cycle {
                        f += spike.height;
                    }
                }
                // Draw noise for every cycle, even when the SD is 0, so that
                // changing one parameter does not shift the noise sequence.
                f += self.noise_sd * rng.normal();
                match self.ceiling {
                    Some(ceiling) if f > ceiling => ceiling,
                    _ => f,
                }
            })
            .collect()
    }
}

/// SplitMix64 (Steele, Lea & Flood 2014): tiny, fast, and good enough for
/// test noise. Not for anything that needs to be unpredictable.
#[derive(Clone, Debug)]
pub struct NoiseRng {
    state: u64,
}

impl NoiseRng {
    /// A generator whose whole output is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        NoiseRng { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`, from the top 53 bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[low, high)`.
    pub fn range(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.uniform()
    }

    /// Standard normal, by Box–Muller (one draw per call; the twin is
    /// discarded to keep the generator's state a single integer).
    pub fn normal(&mut self) -> f64 {
        // 1 - uniform() is in (0, 1], so the logarithm is finite.
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_readings_and_noise_free_curve_is_the_formula() {
        let model = CurveModel {
            noise_sd: 0.01,
            seed: 7,
            ..CurveModel::default()
        };
        assert_eq!(model.readings(), model.readings());
        let clean = CurveModel::default().readings();
        let c = 28.0;
        assert!((clean[27] - (1.0 + 1.0)).abs() < 1e-12, "{}", clean[27] - c);
    }

    #[test]
    fn crossing_cycle_inverts_the_sigmoid() {
        let model = CurveModel::default();
        let ct = model.crossing_cycle(0.2).expect("below plateau");
        assert!((model.amplification(ct) - 0.2).abs() < 1e-12);
        assert_eq!(model.crossing_cycle(2.0), None);
    }

    #[test]
    fn normal_noise_has_unit_variance() {
        let mut rng = NoiseRng::new(42);
        let n = 20_000;
        let draws: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
        let mean = draws.iter().sum::<f64>() / n as f64;
        let var = draws.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
    }
}
