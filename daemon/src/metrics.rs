//! A latency histogram for /metrics in the Prometheus text format: fixed buckets and
//! atomic counters, so recording costs a few relaxed increments on the hot path.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds in seconds: from a fast fdatasync (0.1 ms) to a stalled disk (5 s).
const BOUNDS: [f64; 13] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0,
];

/// Durations observed, by bucket.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations at or below each bound (not cumulative here; summed when rendered),
    /// the last slot for those above every bound.
    buckets: [AtomicU64; BOUNDS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        let slot = BOUNDS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(BOUNDS.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(duration.as_micros() as u64, Ordering::Relaxed);
    }

    /// Appends the histogram as `name_bucket{le=..}`, `name_sum` and `name_count`.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (slot, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            match BOUNDS.get(slot) {
                Some(bound) => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum:.6}\n{name}_count {cumulative}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_count_every_observation() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(80)); // <= 0.0001
        h.observe(Duration::from_micros(300)); // <= 0.0005
        h.observe(Duration::from_millis(2)); // <= 0.0025
        h.observe(Duration::from_secs(9)); // above every bound
        let mut out = String::new();
        h.render(&mut out, "t", "test");
        assert!(out.contains("t_bucket{le=\"0.0001\"} 1\n"), "{out}");
        assert!(out.contains("t_bucket{le=\"0.00025\"} 1\n"), "{out}");
        assert!(out.contains("t_bucket{le=\"0.0005\"} 2\n"), "{out}");
        assert!(out.contains("t_bucket{le=\"0.0025\"} 3\n"), "{out}");
        assert!(out.contains("t_bucket{le=\"5\"} 3\n"), "{out}");
        assert!(out.contains("t_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("t_count 4\n"), "{out}");
        assert!(out.contains("t_sum 9.002380\n"), "{out}");
    }
}
