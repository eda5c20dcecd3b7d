//! `pcrd run start|watch|abort|analysis` and `pcrd instrument list`: runs on
//! instruments through the daemon's API (docs/runs.md).
//!
//! A child of `client` so it shares its HTTP client, error handling and exit
//! codes: 0 done (for `watch`, the run finished), 1 refused (for `watch`, the
//! run failed or was aborted), 2 usage, 4 daemon unreachable.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;

use super::{ApiArgs, Client, ClientError};
use crate::api::dto::{InstrumentView, ReasonRequest, RunView, StartRunRequest};

#[derive(Debug, Subcommand)]
pub enum RunCommand {
    /// Start a run of a sealed plate on an instrument; prints the run.
    Start {
        /// The plate's id.
        #[arg(long)]
        plate: String,
        /// The instrument's name in the daemon's config.
        #[arg(long)]
        instrument: String,
        /// The thermal protocol, `NAME CHANNELS STAGES` (docs/cycler-protocol.md);
        /// without it the kit's channels with the default 45-cycle protocol.
        #[arg(long)]
        protocol: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Follow a run to its end with a progress bar (cycle, ETA). Exit 0 when it
    /// finished, 1 when it failed or was aborted.
    Watch {
        run: u64,
        /// Seconds between two looks at the run.
        #[arg(long, default_value_t = 0.5)]
        interval: f64,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Abort a run in progress (cycles stored so far are kept).
    Abort {
        run: u64,
        /// Why, for the audit and the run's record.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// The analysis of a finished run: validity, calls, Ct per well and target.
    Analysis {
        run: u64,
        #[command(flatten)]
        api: ApiArgs,
    },
}

impl RunCommand {
    pub(crate) fn api(&self) -> &ApiArgs {
        match self {
            RunCommand::Start { api, .. }
            | RunCommand::Watch { api, .. }
            | RunCommand::Abort { api, .. }
            | RunCommand::Analysis { api, .. } => api,
        }
    }
}

/// The parts of the stored analysis the text view shows.
#[derive(Debug, Deserialize)]
struct AnalysisText {
    plate: PlateText,
    wells: Vec<WellText>,
}

#[derive(Debug, Deserialize)]
struct PlateText {
    run: u64,
    plate: String,
    kit: String,
    valid: bool,
    failures: Vec<String>,
    error: Option<String>,
    calls: std::collections::BTreeMap<String, u32>,
}

#[derive(Debug, Deserialize)]
struct WellText {
    well: String,
    content: String,
    call: Option<String>,
    targets: Vec<TargetText>,
}

#[derive(Debug, Deserialize)]
struct TargetText {
    target: String,
    ct: Option<f64>,
}

pub(super) async fn run(client: &Client, command: RunCommand) -> Result<(), ClientError> {
    match command {
        RunCommand::Start {
            plate,
            instrument,
            protocol,
            ..
        } => {
            let body = StartRunRequest {
                plate,
                instrument,
                protocol,
            };
            let reply = client
                .send::<RunView>(client.post(&["runs"], &body))
                .await?;
            client.print(&reply, |r| {
                format!(
                    "run {} of plate {} started on {} ({}, {} cycles); follow it with `pcrd run watch {}`",
                    r.id, r.plate, r.instrument, r.protocol, r.cycles_expected, r.id
                )
            });
            Ok(())
        }
        RunCommand::Abort { run, reason, .. } => {
            let reply = client
                .send::<RunView>(client.post(
                    &["runs", &run.to_string(), "abort"],
                    &ReasonRequest { reason },
                ))
                .await?;
            client.print(&reply, outcome_text);
            Ok(())
        }
        RunCommand::Analysis { run, .. } => {
            let reply = client
                .send::<AnalysisText>(client.get(&["runs", &run.to_string(), "analysis"]))
                .await?;
            client.print(&reply, analysis_text);
            Ok(())
        }
        RunCommand::Watch { run, interval, .. } => watch(client, run, interval).await,
    }
}

async fn watch(client: &Client, id: u64, interval: f64) -> Result<(), ClientError> {
    if !(interval.is_finite() && interval > 0.0 && interval <= 3600.0) {
        return Err(ClientError::usage(format!(
            "--interval {interval}: give seconds between 0 and 3600"
        )));
    }
    let pause = Duration::from_secs_f64(interval);
    let tty = !client.json && std::io::stderr().is_terminal();
    let bar = if tty {
        let bar = ProgressBar::new(0);
        if let Ok(style) =
            ProgressStyle::with_template("run {prefix} [{bar:40}] {pos}/{len} {msg}  eta {eta}")
        {
            bar.set_style(style);
        }
        bar.set_prefix(id.to_string());
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut last_line = String::new();
    let first_seen = Instant::now();
    let mut first_cycles: Option<u32> = None;
    let reply = loop {
        let reply = client
            .send::<RunView>(client.get(&["runs", &id.to_string()]))
            .await?;
        let r = &reply.value;
        bar.set_length(u64::from(r.cycles_expected));
        bar.set_position(u64::from(r.cycles_stored));
        // An extraction run counts percent, a PCR run cycles.
        let unit = if r.channels.is_empty() { "%" } else { "cycles" };
        bar.set_message(format!("{unit} {}", r.state));
        if !tty && !client.json {
            // For logs: one line per change, no redraws.
            let start = *first_cycles.get_or_insert(r.cycles_stored);
            let done = r.cycles_stored.saturating_sub(start);
            let eta = if done > 0 && r.cycles_expected > r.cycles_stored {
                let per_cycle = first_seen.elapsed().as_secs_f64() / f64::from(done);
                format!(
                    ", eta {:.0} s",
                    per_cycle * f64::from(r.cycles_expected - r.cycles_stored)
                )
            } else {
                String::new()
            };
            let line = if r.channels.is_empty() {
                format!(
                    "run {id}: step progress {}/{} % {}",
                    r.cycles_stored, r.cycles_expected, r.state
                )
            } else {
                format!(
                    "run {id}: cycle {}/{} {}",
                    r.cycles_stored, r.cycles_expected, r.state
                )
            };
            if line != last_line {
                eprintln!("{line}{eta}");
                last_line = line;
            }
        }
        if matches!(r.state.as_str(), "finished" | "failed" | "aborted") {
            break reply;
        }
        tokio::time::sleep(pause).await;
    };
    bar.finish_and_clear();
    let r = &reply.value;
    if r.state == "finished" {
        client.print(&reply, |r| {
            let mut text = outcome_text(r);
            text.push_str(&format!("\nits analysis: `pcrd run analysis {}`", r.id));
            text
        });
        Ok(())
    } else {
        if client.json {
            super::print_json(&reply.json);
        }
        Err(ClientError::rejected(outcome_text(r)))
    }
}

fn outcome_text(r: &RunView) -> String {
    let mut text = format!(
        "run {} of plate {} on {}: {} ({}/{} cycles stored)",
        r.id, r.plate, r.instrument, r.state, r.cycles_stored, r.cycles_expected
    );
    if let Some(reason) = &r.reason {
        text.push_str(&format!(": {reason}"));
    }
    text
}

fn analysis_text(a: &AnalysisText) -> String {
    let p = &a.plate;
    let mut text = format!(
        "run {} of plate {} (kit {}): plate {}\n",
        p.run,
        p.plate,
        p.kit,
        if p.valid { "valid" } else { "INVALID" }
    );
    for f in &p.failures {
        text.push_str(&format!("  control failure: {f}\n"));
    }
    if let Some(e) = &p.error {
        text.push_str(&format!("  not judged: {e}\n"));
    }
    let calls: Vec<String> = p.calls.iter().map(|(c, n)| format!("{c} {n}")).collect();
    text.push_str(&format!("calls: {}\n", calls.join(", ")));
    for w in &a.wells {
        let cts: Vec<String> = w
            .targets
            .iter()
            .map(|t| match t.ct {
                Some(ct) => format!("{} {ct:.2}", t.target),
                None => format!("{} -", t.target),
            })
            .collect();
        text.push_str(&format!(
            "{:>4} {:<16} {:<13} {}\n",
            w.well,
            w.content,
            w.call.as_deref().unwrap_or("control"),
            cts.join("  ")
        ));
    }
    text
}

/// `pcrd instrument list`: every configured extractor and cycler with its state.
pub(super) async fn instrument_list(client: &Client) -> Result<(), ClientError> {
    let reply = client
        .send::<Vec<InstrumentView>>(client.get(&["instruments"]))
        .await?;
    client.print(&reply, |list| {
        if list.is_empty() {
            return "no instruments in the config".to_owned();
        }
        let mut text = String::new();
        for i in list {
            let run = i
                .cycler
                .as_ref()
                .and_then(|c| c.run.as_ref())
                .map(|r| {
                    format!(
                        "run {} plate {} cycle {}/{}",
                        r.id, r.plate, r.cycles_stored, r.cycles_expected
                    )
                })
                .or_else(|| {
                    i.run
                        .as_ref()
                        .map(|r| format!("step {} {:.0}%", r.step, r.progress))
                })
                .unwrap_or_default();
            text.push_str(&format!(
                "{:<12} {:<9} {:<8} {:<24} {}{}\n",
                i.name,
                i.kind,
                i.state,
                i.link,
                run,
                i.state_reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            ));
        }
        text.trim_end().to_owned()
    });
    Ok(())
}
