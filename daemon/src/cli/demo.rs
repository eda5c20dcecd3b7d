//! `pcrd demo`: the whole lab on this machine, no set-up (crate::demo).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::exit;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the store here (default: a temporary directory, removed after a
    /// successful demo).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Results (`results/`: CSV, NDJSON and a manifest per batch), `summary.json`
    /// and the daemon's log `pcrd.log` go here.
    #[arg(long, default_value = "pcrd-demo-out")]
    pub out: PathBuf,
    /// Plates of 94 tubes (a rerun may add one).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=5000), conflicts_with = "scenario")]
    pub plates: u32,
    /// Tubes in all, spread over the plates (default 94 per plate).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000), conflicts_with = "scenario")]
    pub tubes: Option<u32>,
    /// The tubes and their truth from a TOML file (docs/demo.md).
    #[arg(long)]
    pub scenario: Option<PathBuf>,
    /// Acceleration over real time: at 1000 a 30-minute extraction takes 1.8 s
    /// and a 100-second PCR cycle 0.1 s.
    #[arg(long, default_value_t = 1000.0)]
    pub speed: f64,
    /// Also deliver to the [[sinks]] of this config file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Simulated extractors (Modbus TCP).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub extractors: u32,
    /// Simulated cyclers (each on a pseudo-terminal).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub cyclers: u32,
    /// Give up when not every tube has a final result after this long.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    pub deadline: std::time::Duration,
    /// Report strong positives as preliminary results mid-run (docs/runs.md).
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub early_calls: String,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

pub(super) fn run(args: DemoArgs) -> ExitCode {
    crate::telemetry::init(false);
    if !(args.speed.is_finite() && (1.0..=1_000_000.0).contains(&args.speed)) {
        eprintln!(
            "pcrd: --speed must be between 1 and 1000000, not {}",
            args.speed
        );
        return ExitCode::from(exit::USAGE);
    }
    let options = crate::demo::DemoOptions {
        data_dir: args.data_dir,
        out: args.out,
        plates: args.plates as usize,
        tubes: args.tubes.map(|t| t as usize),
        scenario: args.scenario,
        speed: args.speed,
        config: args.config,
        extractors: args.extractors as usize,
        cyclers: args.cyclers as usize,
        deadline: args.deadline,
        early_calls: args.early_calls == "on",
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pcrd: cannot start the async runtime: {e}");
            return ExitCode::from(exit::UNAVAILABLE);
        }
    };
    let out = options.out.clone();
    let json = args.json;
    match runtime.block_on(crate::demo::run(options)) {
        Ok(summary) => {
            let text = serde_json::to_string_pretty(&summary).unwrap_or_default();
            if let Err(e) = std::fs::write(out.join("summary.json"), &text) {
                eprintln!(
                    "pcrd: cannot write {}: {e}",
                    out.join("summary.json").display()
                );
            }
            if json {
                println!("{text}");
            } else {
                print!("{}", summary.render());
            }
            if summary.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("pcrd demo: {e}");
            ExitCode::FAILURE
        }
    }
}
