//! What the benchmarks (`tests/benches/*.rs`) print, in one format: a figure is
//! `BENCH <name> <median> <unit> runs=<each run>` and a goal
//! `GOAL <name> <value> <op> <target> met|MISSED` (BENCHMARKS.md quotes these lines).

/// The median of `values` (the mean of the two middle ones for an even count);
/// NaN for none.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// A `BENCH` line: the figure and the first ten runs behind it.
pub fn bench(name: &str, value: f64, unit: &str, runs: &[f64]) -> String {
    let shown: Vec<String> = runs.iter().take(10).map(|v| format!("{v:.3}")).collect();
    let more = if runs.len() > 10 {
        format!(",...({} runs)", runs.len())
    } else {
        String::new()
    };
    format!(
        "BENCH {name} {value:.3} {unit} runs={}{more}",
        shown.join(",")
    )
}

/// A `GOAL` line: whether `value` is below (`op` "<") or above (">") `target`.
pub fn goal(name: &str, value: f64, op: &str, target: f64) -> String {
    let met = match op {
        "<" => value < target,
        _ => value > target,
    };
    format!(
        "GOAL {name} {value:.3} {op} {target} {}",
        if met { "met" } else { "MISSED" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_no_runs() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn lines_say_the_figure_and_whether_the_goal_is_met() {
        assert_eq!(
            bench("x", 1.5, "ms", &[1.0, 2.0]),
            "BENCH x 1.500 ms runs=1.000,2.000"
        );
        assert_eq!(goal("x", 1.5, "<", 2.0), "GOAL x 1.500 < 2 met");
        assert_eq!(goal("x", 1.5, ">", 2.0), "GOAL x 1.500 > 2 MISSED");
    }
}
