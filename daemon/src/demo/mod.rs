//! `pcrd demo`: a whole lab on one machine with no set-up. Simulated extractors
//! (Modbus TCP on 127.0.0.1) and cyclers (pseudo-terminals) run in this process;
//! `pcrd serve` runs as a child on an embedded store; the demo's staff
//! ([`robot`]) receive the scenario's tubes, build, extract and amplify plates,
//! review, and the released results land in the batch-file sink. At the end a
//! summary checks what arrived against the scenario's truth.
//!
//! docs/demo.md says what it shows and how the reliability test and the lab-day
//! benchmark use it.

pub mod robot;
pub mod scenario;
pub mod world;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pcrd_protocol::upstream::Interpretation;
use serde::Serialize;

use robot::{Api, KitInfo, Robot, RobotError};
use scenario::{Expected, Scenario};
use world::{DaemonProcess, Instruments, Timing};

/// Tokens of the demo's users (the config is written by the demo, on loopback).
const TECHNICIAN_TOKEN: &str = "demo-technician-token";
const REVIEWER_TOKEN: &str = "demo-reviewer-token";

/// What `pcrd demo` was asked to do.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// The store and the daemon's files; a new temporary directory when absent
    /// (removed at the end unless the demo fails).
    pub data_dir: Option<PathBuf>,
    /// Results (`results/`), the summary and the daemon's log.
    pub out: PathBuf,
    pub plates: usize,
    /// Tubes in all (default 94 per plate).
    pub tubes: Option<usize>,
    pub scenario: Option<PathBuf>,
    /// Acceleration over real time (1000: a 30-minute extraction takes 1.8 s).
    pub speed: f64,
    /// More `[[sinks]]` from this config file.
    pub config: Option<PathBuf>,
    pub extractors: usize,
    pub cyclers: usize,
    /// Give up after this long.
    pub deadline: Duration,
    /// Preliminary results for strong positives mid-run (`[review] early_calls`).
    pub early_calls: bool,
}

/// Why the demo did not finish.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Daemon(#[from] world::DaemonError),
    #[error(transparent)]
    Robot(#[from] RobotError),
    #[error(transparent)]
    Scenario(#[from] scenario::ScenarioError),
}

/// The summary, as printed and as written to `summary.json`.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub ok: bool,
    pub problems: Vec<String>,
    pub wall_seconds: f64,
    pub scenario: String,
    pub tubes: usize,
    pub pools_of_5: usize,
    pub pools_of_10: usize,
    pub urgent: usize,
    pub plates: Vec<PlateSummary>,
    pub plates_valid: usize,
    pub plates_invalid: usize,
    pub calls: BTreeMap<String, usize>,
    /// Decisions the reviewer made (releases and reruns).
    pub reviewer_decisions: usize,
    pub reruns_requested: usize,
    pub positives: Vec<PositiveSummary>,
    pub agree_with_scenario: usize,
    pub disagree_with_scenario: Vec<String>,
    /// Distinct result versions delivered with status final.
    pub final_results: usize,
    pub preliminary_results: usize,
    /// Records read from the batch files, counting re-delivered ones.
    pub records_read: usize,
    pub tubes_without_final: usize,
    pub tubes_with_several_finals: Vec<String>,
    /// Median seconds per plate.
    pub stage_medians: BTreeMap<String, f64>,
    pub results_per_second: f64,
    pub instruments: Vec<InstrumentSummary>,
    pub daemon_restarts: u32,
    pub daemon_peak_rss_mib: Option<f64>,
    pub results_dir: String,
    pub log: String,
}

#[derive(Debug, Serialize)]
pub struct PlateSummary {
    /// From the plate's creation to its stored analysis.
    pub seconds: f64,
    pub extraction_plate: String,
    pub pcr_plate: String,
    pub samples: usize,
    pub extractor: String,
    pub cycler: String,
    pub valid: Option<bool>,
    pub invalid_reason: Option<String>,
    pub restarted_runs: u32,
}

#[derive(Debug, Serialize)]
pub struct PositiveSummary {
    pub tube: String,
    pub pool_size: u8,
    pub plate: String,
    pub well: String,
    pub ct: Vec<robot::TargetCt>,
}

#[derive(Debug, Serialize)]
pub struct InstrumentSummary {
    pub name: String,
    /// Start commands the simulated instrument received.
    pub starts: usize,
    /// Runs the daemon recorded on it that were started.
    pub runs: usize,
}

/// Runs the demo; the summary, or why it could not run.
pub async fn run(options: DemoOptions) -> Result<Summary, DemoError> {
    let began = Instant::now();
    let (data_dir, temporary) = match &options.data_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!(
                "pcrd-demo-{}-{}",
                std::process::id(),
                began.elapsed().as_nanos()
                    + std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis())
                        .unwrap_or_default()
            )),
            true,
        ),
    };
    let results_dir = options.out.join("results");
    for dir in [&data_dir, &options.out, &results_dir] {
        std::fs::create_dir_all(dir)
            .map_err(|e| DemoError::Setup(format!("cannot create {}: {e}", dir.display())))?;
    }
    let timing = Timing::at_speed(options.speed);
    let instruments = Arc::new(
        Instruments::start(options.extractors, options.cyclers, timing, &data_dir)
            .await
            .map_err(|e| DemoError::Setup(format!("simulated instruments: {e}")))?,
    );
    let config_path = data_dir.join("pcrd-demo.toml");
    let config = config_text(&options, &data_dir, &results_dir, &instruments)?;
    std::fs::write(&config_path, config)
        .map_err(|e| DemoError::Setup(format!("{}: {e}", config_path.display())))?;
    let listen = free_port()?;
    let log = options.out.join("pcrd.log");
    let daemon = DaemonProcess::start(
        config_path,
        listen,
        log.clone(),
        data_dir.join("pcrd-serve.pid"),
    )
    .await?;
    tracing::info!(url = %daemon.url, pid_file = %daemon.pid_file.display(), "pcrd serve is up.");
    let api = Api::new(&daemon.url, TECHNICIAN_TOKEN, REVIEWER_TOKEN);
    let outcome = drive(&options, &api, &instruments, &results_dir, timing).await;
    let peak_rss = daemon.peak_rss_kib();
    let restarts = daemon.restarts.load(std::sync::atomic::Ordering::SeqCst);
    let runs = match &outcome {
        Ok(_) => api.get_ok("/api/v1/runs?limit=100000").await.ok(),
        Err(_) => None,
    };
    daemon.stop().await;
    let robot = outcome?;
    let summary = summarise(
        &robot,
        runs.as_ref(),
        &instruments,
        began.elapsed(),
        restarts,
        peak_rss,
        &results_dir,
        &log,
    );
    if temporary && summary.ok {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    Ok(summary)
}

async fn drive(
    options: &DemoOptions,
    api: &Api,
    instruments: &Arc<Instruments>,
    results_dir: &Path,
    timing: Timing,
) -> Result<Arc<Robot>, DemoError> {
    // The instruments come online within a few polls.
    let started = Instant::now();
    loop {
        let listed = api.get_ok("/api/v1/instruments").await?;
        let all = listed.as_array().cloned().unwrap_or_default();
        if !all.is_empty() && all.iter().all(|i| i["online"] == true) {
            break;
        }
        if started.elapsed() > Duration::from_secs(30) {
            return Err(DemoError::Setup(format!(
                "the simulated instruments are not online after 30 s: {listed}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut scenario = match &options.scenario {
        Some(path) => Scenario::load(path)?,
        None => Scenario {
            kit: scenario::DEFAULT_KIT.into(),
            tubes: Vec::new(),
            source: String::new(),
        },
    };
    let kit = KitInfo::fetch(api, &scenario.kit).await?;
    if options.scenario.is_none() {
        scenario = Scenario::generated(&kit.viral(), options.plates, options.tubes);
    }
    scenario.check_targets(&kit.viral())?;
    let poll = (timing.cycle / 2).clamp(Duration::from_millis(25), Duration::from_millis(200));
    let robot = Arc::new(Robot::new(
        api.clone(),
        Arc::clone(instruments),
        Arc::new(scenario),
        kit,
        results_dir.to_path_buf(),
        poll,
    ));
    robot.receive_tubes().await?;
    let progress = spawn_progress(Arc::clone(&robot));
    let outcome = Arc::clone(&robot).run(options.deadline).await;
    progress.abort();
    outcome?;
    Ok(robot)
}

fn spawn_progress(robot: Arc<Robot>) -> tokio::task::JoinHandle<()> {
    use std::sync::atomic::Ordering::Relaxed;
    let bar = indicatif::ProgressBar::new(robot.scenario.tubes.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} tubes final at the sink  {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    tokio::spawn(async move {
        loop {
            let finals = robot
                .delivered
                .lock()
                .map(|d| d.tubes_with_final.len())
                .unwrap_or_default();
            bar.set_position(finals as u64);
            bar.set_message(format!(
                "plates started {}, analysed {}",
                robot.progress.plates_started.load(Relaxed),
                robot.progress.plates_analysed.load(Relaxed)
            ));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

/// The daemon's configuration: the simulated instruments, the batch-file sink
/// into `results`, auto-release of negatives, and any `[[sinks]]` of `--config`.
fn config_text(
    options: &DemoOptions,
    data_dir: &Path,
    results: &Path,
    instruments: &Instruments,
) -> Result<String, DemoError> {
    let mut text = format!(
        r#"# Written by `pcrd demo`.
[lab]
id = "LAB-DEMO-01"

[server]
listen = "127.0.0.1:0"

[store]
path = {store:?}

[[users]]
name = "tech"
role = "technician"
token = "{TECHNICIAN_TOKEN}"

[[users]]
name = "reviewer"
role = "reviewer"
token = "{REVIEWER_TOKEN}"

[review]
auto_release_negatives = true
early_calls = {early_calls}

[[sinks]]
name = "demo-files"
[sinks.files]
dir = {results:?}
ndjson = true
"#,
        store = data_dir.join("store").display().to_string(),
        early_calls = options.early_calls,
        results = results.display().to_string(),
    );
    text.push_str(&instruments.config_toml());
    if let Some(path) = &options.config {
        text.push_str(&extra_sinks(path)?);
    }
    Ok(text)
}

/// The `[[sinks]]` of another config file, paths made absolute against its directory.
fn extra_sinks(path: &Path) -> Result<String, DemoError> {
    let fail = |why: String| DemoError::Setup(format!("--config {}: {why}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let value: toml::Table = toml::from_str(&text).map_err(|e| fail(e.to_string()))?;
    let Some(sinks) = value.get("sinks") else {
        return Err(fail("has no [[sinks]]".into()));
    };
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
        .canonicalize()
        .map_err(|e| fail(e.to_string()))?;
    let mut sinks = sinks.clone();
    // Relative paths (a files sink's dir, a CA file) name files beside that config.
    for sink in sinks.as_array_mut().into_iter().flatten() {
        for (_, kind) in sink.as_table_mut().into_iter().flatten() {
            for key in ["dir", "ca_file"] {
                if let Some(toml::Value::String(p)) = kind.get_mut(key)
                    && Path::new(p.as_str()).is_relative()
                {
                    *p = base.join(&*p).display().to_string();
                }
            }
        }
    }
    let mut table = toml::Table::new();
    table.insert("sinks".into(), sinks);
    toml::to_string(&table)
        .map(|t| format!("\n{t}"))
        .map_err(|e| fail(e.to_string()))
}

fn free_port() -> Result<std::net::SocketAddr, DemoError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| DemoError::Setup(format!("no free port on 127.0.0.1: {e}")))?;
    listener
        .local_addr()
        .map_err(|e| DemoError::Setup(e.to_string()))
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[allow(clippy::too_many_arguments)]
fn summarise(
    robot: &Robot,
    runs: Option<&serde_json::Value>,
    instruments: &Instruments,
    wall: Duration,
    daemon_restarts: u32,
    peak_rss_kib: Option<u64>,
    results_dir: &Path,
    log: &Path,
) -> Summary {
    let delivered = robot
        .delivered
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let plates = robot
        .plates
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let viral = robot.kit.viral();
    let tubes = &robot.scenario.tubes;
    let mut problems = Vec::new();

    // Finals per tube: exactly one each.
    let mut finals_by_tube: HashMap<&str, Vec<&pcrd_protocol::upstream::ResultRecord>> =
        HashMap::new();
    let mut preliminary = 0;
    for record in delivered.by_key.values() {
        match record.status {
            pcrd_protocol::upstream::ResultStatus::Final => {
                finals_by_tube.entry(&record.tube).or_default().push(record)
            }
            pcrd_protocol::upstream::ResultStatus::Preliminary => preliminary += 1,
            _ => {}
        }
    }
    let without: Vec<&str> = tubes
        .iter()
        .filter(|t| !finals_by_tube.contains_key(t.barcode.as_str()))
        .map(|t| t.barcode.as_str())
        .collect();
    let mut several: Vec<String> = finals_by_tube
        .iter()
        .filter(|(_, v)| v.len() > 1)
        .map(|(t, v)| format!("{t} ({} finals)", v.len()))
        .collect();
    several.sort();
    if !without.is_empty() {
        problems.push(format!(
            "{} tubes have no final result at the sink",
            without.len()
        ));
    }
    if !several.is_empty() {
        problems.push(format!(
            "{} tubes have more than one final result",
            several.len()
        ));
    }

    // Calls against the scenario's truth, on the test that produced the final.
    let mut calls: BTreeMap<String, usize> = BTreeMap::new();
    let mut agree = 0;
    let mut disagree = Vec::new();
    let mut positives = Vec::new();
    for tube in tubes {
        let Some(records) = finals_by_tube.get(tube.barcode.as_str()) else {
            continue;
        };
        let record = records[0];
        let name = serde_json::to_value(record.interpretation)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        *calls.entry(name.clone()).or_default() += 1;
        // The final comes from the tube's last test.
        let attempt = if tube.rerun_ct.is_some() && tube.expected(0, &viral) == Expected::Partial {
            1
        } else {
            0
        };
        let ok = matches!(
            (tube.expected(attempt, &viral), record.interpretation),
            (Expected::Positive, Interpretation::Positive)
                | (Expected::Negative, Interpretation::Negative)
                | (Expected::Invalid, Interpretation::Invalid)
                | (Expected::Partial, Interpretation::Inconclusive)
        );
        if ok {
            agree += 1;
        } else {
            disagree.push(format!(
                "{}: expected {:?}, reported {name}",
                tube.barcode,
                tube.expected(attempt, &viral)
            ));
        }
        if record.interpretation == Interpretation::Positive {
            positives.push(PositiveSummary {
                tube: tube.barcode.clone(),
                pool_size: record.pool_size,
                plate: record.plate.clone(),
                well: record.well.clone(),
                ct: Robot::cts(record),
            });
        }
    }
    if !disagree.is_empty() {
        problems.push(format!(
            "{} results disagree with the scenario",
            disagree.len()
        ));
    }
    positives.sort_by(|a, b| a.tube.cmp(&b.tube));

    // No run started twice: start commands each instrument received, against the
    // runs the daemon recorded as started on it.
    let mut started_runs: HashMap<String, usize> = HashMap::new();
    for run in runs.and_then(|r| r.as_array()).into_iter().flatten() {
        if !run["started_at"].is_null() {
            *started_runs
                .entry(run["instrument"].as_str().unwrap_or_default().to_string())
                .or_default() += 1;
        }
    }
    let mut instrument_summaries = Vec::new();
    for (name, starts) in instruments.starts() {
        let runs = started_runs.get(&name).copied().unwrap_or(0);
        if starts > runs {
            problems.push(format!(
                "{name} received {starts} start commands for {runs} runs"
            ));
        }
        instrument_summaries.push(InstrumentSummary { name, starts, runs });
    }

    let mut stage_medians = BTreeMap::new();
    let stage = |f: &dyn Fn(&robot::PlateLog) -> f64| median(plates.iter().map(f).collect());
    stage_medians.insert("1 plating".into(), stage(&|p| p.plating));
    stage_medians.insert("2 extraction".into(), stage(&|p| p.extraction));
    stage_medians.insert("3 transfer and load".into(), stage(&|p| p.transfer));
    stage_medians.insert("4 pcr".into(), stage(&|p| p.pcr));
    stage_medians.insert("5 analysis".into(), stage(&|p| p.analysis));
    stage_medians.insert(
        "6 review and delivery".into(),
        median(
            plates
                .iter()
                .filter_map(|p| {
                    let delivered = delivered.plate_delivered.get(&p.pcr_plate)?;
                    Some(
                        delivered
                            .saturating_duration_since(p.analysed?)
                            .as_secs_f64(),
                    )
                })
                .collect(),
        ),
    );
    let mut plate_summaries: Vec<PlateSummary> = plates
        .iter()
        .map(|p| PlateSummary {
            seconds: p.plating
                + match (p.started, p.analysed) {
                    (Some(s), Some(a)) => a.saturating_duration_since(s).as_secs_f64(),
                    _ => 0.0,
                },
            extraction_plate: p.extraction_plate.clone(),
            pcr_plate: p.pcr_plate.clone(),
            samples: p.samples,
            extractor: p.extractor.clone(),
            cycler: p.cycler.clone(),
            valid: p.valid,
            invalid_reason: p.invalid_reason.clone(),
            restarted_runs: p.restarted_runs,
        })
        .collect();
    plate_summaries.sort_by(|a, b| a.extraction_plate.cmp(&b.extraction_plate));
    let final_results: usize = finals_by_tube.values().map(Vec::len).sum();
    Summary {
        ok: problems.is_empty(),
        problems,
        wall_seconds: wall.as_secs_f64(),
        scenario: robot.scenario.source.clone(),
        tubes: tubes.len(),
        pools_of_5: tubes.iter().filter(|t| t.pool_size == 5).count(),
        pools_of_10: tubes.iter().filter(|t| t.pool_size == 10).count(),
        urgent: tubes
            .iter()
            .filter(|t| t.priority.as_deref() == Some("urgent"))
            .count(),
        plates_valid: plates.iter().filter(|p| p.valid == Some(true)).count(),
        plates_invalid: plates.iter().filter(|p| p.valid == Some(false)).count(),
        plates: plate_summaries,
        calls,
        reviewer_decisions: robot
            .progress
            .reviewed
            .load(std::sync::atomic::Ordering::Relaxed),
        reruns_requested: robot
            .progress
            .reruns_requested
            .load(std::sync::atomic::Ordering::Relaxed),
        positives,
        agree_with_scenario: agree,
        disagree_with_scenario: disagree,
        final_results,
        preliminary_results: preliminary,
        records_read: delivered.records_read,
        tubes_without_final: without.len(),
        tubes_with_several_finals: several,
        stage_medians,
        results_per_second: final_results as f64 / wall.as_secs_f64().max(1e-9),
        instruments: instrument_summaries,
        daemon_restarts,
        daemon_peak_rss_mib: peak_rss_kib.map(|k| k as f64 / 1024.0),
        results_dir: results_dir.display().to_string(),
        log: log.display().to_string(),
    }
}

impl Summary {
    /// The summary for a person.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "pcrd demo: {} tubes on {} plates in {:.1} s ({})",
            self.tubes,
            self.plates.len(),
            self.wall_seconds,
            if self.ok {
                "all checks passed"
            } else {
                "PROBLEMS"
            }
        );
        let _ = writeln!(
            out,
            "  tubes: {} ({} pools of 5, {} pools of 10, {} urgent); scenario: {}",
            self.tubes, self.pools_of_5, self.pools_of_10, self.urgent, self.scenario
        );
        let _ = writeln!(
            out,
            "  plates: {} valid, {} invalid",
            self.plates_valid, self.plates_invalid
        );
        for p in self.plates.iter().take(10) {
            let _ = writeln!(
                out,
                "    {} -> {}: {} samples, {} then {}, {:.1} s, {}",
                p.extraction_plate,
                p.pcr_plate,
                p.samples,
                p.extractor,
                p.cycler,
                p.seconds,
                match (p.valid, &p.invalid_reason) {
                    (Some(true), _) => "controls valid".to_string(),
                    (_, Some(why)) => format!("INVALID: {why}"),
                    _ => "not analysed".to_string(),
                }
            );
        }
        if self.plates.len() > 10 {
            let _ = writeln!(out, "    ... and {} more", self.plates.len() - 10);
        }
        let calls: Vec<String> = self.calls.iter().map(|(k, v)| format!("{v} {k}")).collect();
        let _ = writeln!(
            out,
            "  final calls at the sink: {}; reviewer decisions: {} (reruns requested: {})",
            calls.join(", "),
            self.reviewer_decisions,
            self.reruns_requested
        );
        if !self.positives.is_empty() {
            let _ = writeln!(out, "  positives (Ct per target):");
            for p in self.positives.iter().take(20) {
                let cts: Vec<String> =
                    p.ct.iter()
                        .map(|t| match t.ct {
                            Some(ct) => format!("{} {ct:.2}", t.target),
                            None => format!("{} -", t.target),
                        })
                        .collect();
                let _ = writeln!(
                    out,
                    "    {:<16} pool {:>2}  {} {:<4} {}",
                    p.tube,
                    p.pool_size,
                    p.plate,
                    p.well,
                    cts.join("  ")
                );
            }
            if self.positives.len() > 20 {
                let _ = writeln!(out, "    ... and {} more", self.positives.len() - 20);
            }
        }
        let _ = writeln!(
            out,
            "  against the scenario's truth: {} of {} agree",
            self.agree_with_scenario, self.tubes
        );
        for d in self.disagree_with_scenario.iter().take(10) {
            let _ = writeln!(out, "    {d}");
        }
        let stages: Vec<String> = self
            .stage_medians
            .iter()
            .map(|(k, v)| format!("{} {v:.2} s", &k[2..]))
            .collect();
        let _ = writeln!(
            out,
            "  time per stage (median per plate): {}",
            stages.join(", ")
        );
        let _ = writeln!(
            out,
            "  at the sink: {} final results ({} preliminary), {:.0} results/s from start to end; {} records read counting re-deliveries",
            self.final_results,
            self.preliminary_results,
            self.results_per_second,
            self.records_read
        );
        let starts: Vec<String> = self
            .instruments
            .iter()
            .map(|i| format!("{} {}/{}", i.name, i.starts, i.runs))
            .collect();
        let _ = writeln!(out, "  instrument starts/runs: {}", starts.join(", "));
        if self.daemon_restarts > 0 {
            let _ = writeln!(
                out,
                "  the daemon was restarted {} times",
                self.daemon_restarts
            );
        }
        if let Some(rss) = self.daemon_peak_rss_mib {
            let _ = writeln!(out, "  daemon peak RSS: {rss:.0} MiB");
        }
        let _ = writeln!(
            out,
            "  results: {} (CSV, NDJSON, manifest per batch); daemon log: {}",
            self.results_dir, self.log
        );
        for p in &self.problems {
            let _ = writeln!(out, "  PROBLEM: {p}");
        }
        out
    }
}
