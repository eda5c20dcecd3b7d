//! `pcrd analyze`: Ct values (and, with a kit, calls) from an RDML file, offline.
//! No daemon and no store: the file is read, every run in it analysed with
//! pcrd-protocol's pure code, and one record per reaction and target printed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use pcrd_protocol::analysis::{AnalysisSettings, Method};
use pcrd_protocol::kit::KitDefinition;
use pcrd_protocol::rdml;
use pcrd_protocol::run_analysis::{
    ReactionRecord, RunJudgement, RunSettings, analyze_run, judge_run, run_with_results,
};
use serde::Serialize;

use super::exit;
use crate::kits::KitRegistry;

#[derive(Debug, Args)]
pub struct AnalyzeArgs {
    /// An RDML file (1.0–1.4; zip container or plain XML).
    pub file: PathBuf,
    /// Judge every well with this kit (id or id@version): calls and plate validity.
    #[arg(long)]
    pub kit: Option<String>,
    /// Kit files beside the shipped ones (like the daemon's `[kits] dir`).
    #[arg(long, requires = "kit")]
    pub kits_dir: Option<PathBuf>,
    /// How the Ct is read off the curve, for every target (default: the kit's
    /// choice per target, else threshold).
    #[arg(long, value_enum)]
    pub method: Option<MethodArg>,
    /// A fixed threshold for one target, on the baseline-corrected curve
    /// (repeatable; targets not named get a common automatic threshold).
    #[arg(long = "threshold", value_name = "TARGET=VALUE")]
    pub thresholds: Vec<String>,
    /// Only this experiment (default: all).
    #[arg(long)]
    pub experiment: Option<String>,
    /// Only this run (default: all).
    #[arg(long)]
    pub run: Option<String>,
    /// json: one object per line; csv: a header and one row per record.
    #[arg(long, value_enum, default_value_t = Format::Json)]
    pub format: Format,
    /// Also write the file as RDML 1.3 with pcrd's Cq, threshold and baseline in
    /// place of the instrument's (for the runs analysed), to re-analyse elsewhere.
    #[arg(long, value_name = "FILE")]
    pub rdml_out: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum MethodArg {
    Threshold,
    Cp,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    Json,
    Csv,
}

/// One output line: a reaction record with where it came from.
#[derive(Debug, Serialize)]
struct Line<'a> {
    /// "reaction", so consumers can tell these from the kit's "well" and
    /// "plate" lines.
    kind: &'static str,
    experiment: &'a str,
    run: &'a str,
    #[serde(flatten)]
    record: &'a ReactionRecord,
    /// The call of the record's well, with --kit ("control" for a control
    /// well, "not_judged" when one of its curves could not be analysed).
    #[serde(skip_serializing_if = "Option::is_none")]
    call: Option<&'a str>,
    /// Whether the run's controls passed, with --kit.
    #[serde(skip_serializing_if = "Option::is_none")]
    plate_valid: Option<bool>,
}

/// With --kit, one line per specimen well after the run's reactions.
#[derive(Debug, Serialize)]
struct WellLine<'a> {
    kind: &'static str,
    experiment: &'a str,
    run: &'a str,
    well: String,
    #[serde(flatten)]
    call: &'a pcrd_protocol::interpret::WellCall,
}

/// With --kit, one line per run: the plate's validity.
#[derive(Debug, Serialize)]
struct PlateLine<'a> {
    kind: &'static str,
    experiment: &'a str,
    run: &'a str,
    kit: String,
    valid: bool,
    reason: Option<String>,
    #[serde(flatten)]
    validity: &'a pcrd_protocol::interpret::PlateValidity,
    /// Specimen wells left without a call: a curve could not be analysed.
    not_judged: &'a [pcrd_protocol::run_analysis::UnjudgedWell],
}

pub(super) fn run(args: AnalyzeArgs) -> ExitCode {
    let method = args.method.map(|m| match m {
        MethodArg::Threshold => Method::Threshold,
        MethodArg::Cp => Method::Cp,
    });
    let mut settings = RunSettings {
        curve: AnalysisSettings {
            method: method.unwrap_or(Method::Threshold),
            ..AnalysisSettings::default()
        },
        ..RunSettings::default()
    };
    for spec in &args.thresholds {
        match parse_threshold(spec) {
            Ok((target, value)) => {
                settings.targets.entry(target).or_default().threshold = Some(value);
            }
            Err(e) => {
                eprintln!("pcrd analyze: {e}");
                return ExitCode::from(exit::USAGE);
            }
        }
    }
    let kit = match &args.kit {
        None => None,
        Some(spec) => match load_kit(spec, args.kits_dir.as_deref()) {
            Ok(kit) => Some(kit),
            Err(e) => {
                eprintln!("pcrd analyze: {e}");
                return ExitCode::from(exit::USAGE);
            }
        },
    };
    let bytes = match std::fs::read(&args.file) {
        Ok(bytes) => bytes,
        Err(e) => {
            eprintln!("pcrd analyze: cannot read {}: {e}", args.file.display());
            return ExitCode::from(exit::REJECTED);
        }
    };
    let doc = match rdml::read(&bytes) {
        Ok(doc) => doc,
        Err(e) => {
            eprintln!("pcrd analyze: {}: {e}", args.file.display());
            return ExitCode::from(exit::REJECTED);
        }
    };

    if let Some(kit) = &kit {
        settings = settings.with_kit(kit, &doc);
        if let Some(method) = method {
            // The command line wins over the kit's per-target choice.
            for target in settings.targets.values_mut() {
                target.method = Some(method);
            }
        }
    }

    let mut selected = Vec::new();
    for experiment in &doc.experiments {
        if args
            .experiment
            .as_ref()
            .is_some_and(|e| *e != experiment.id)
        {
            continue;
        }
        for run in &experiment.runs {
            if args.run.as_ref().is_none_or(|r| *r == run.id) {
                selected.push((experiment, run));
            }
        }
    }
    if selected.is_empty() {
        eprintln!(
            "pcrd analyze: {} has no run matching --experiment {:?} --run {:?}; it has: {}",
            args.file.display(),
            args.experiment.as_deref().unwrap_or("(any)"),
            args.run.as_deref().unwrap_or("(any)"),
            run_list(&doc)
        );
        return ExitCode::from(exit::REJECTED);
    }

    let stdout = std::io::BufWriter::new(std::io::stdout().lock());
    let mut sink = match args.format {
        Format::Json => Sink::Json(stdout),
        Format::Csv => Sink::Csv(Box::new(csv::Writer::from_writer(stdout))),
    };
    if let Err(e) = sink.header() {
        return output_failed(&e);
    }
    let mut failed = 0usize;
    let mut invalid_plates = 0usize;
    let mut annotated = args.rdml_out.as_ref().map(|_| doc.clone());
    for (experiment, run) in selected {
        let records = analyze_run(&doc, run, &settings);
        if let Some(out) = &mut annotated
            && let Some(slot) = out
                .experiments
                .iter_mut()
                .find(|e| e.id == experiment.id)
                .and_then(|e| e.runs.iter_mut().find(|r| r.id == run.id))
        {
            *slot = run_with_results(run, &records);
        }
        for record in &records {
            if let Some(error) = &record.error {
                eprintln!("pcrd analyze: run {:?}: {error}", run.id);
                failed += 1;
            }
        }
        let judgement = match &kit {
            None => None,
            Some(kit) => match judge_run(kit, run, &records) {
                Ok(judgement) => Some(judgement),
                Err(e) => {
                    eprintln!("pcrd analyze: {e}");
                    return ExitCode::from(exit::REJECTED);
                }
            },
        };
        let calls = match (&kit, &judgement) {
            (Some(kit), Some(judgement)) => well_calls(kit, judgement),
            _ => BTreeMap::new(),
        };
        let plate_valid = judgement.as_ref().map(|j| j.plate.validity.is_valid());
        for record in &records {
            // Cts are reported to two decimals (protocols.md §6), the value the
            // kit judged; the threshold keeps its full precision for re-analysis.
            let record = &ReactionRecord {
                ct: record.ct.map(two_decimals),
                ..record.clone()
            };
            let line = Line {
                kind: "reaction",
                experiment: &experiment.id,
                run: &run.id,
                record,
                call: calls.get(record.well.as_str()).map(String::as_str),
                plate_valid,
            };
            if let Err(e) = sink.write(&line) {
                return output_failed(&e);
            }
        }
        if let Some(judgement) = &judgement {
            if !judgement.plate.validity.is_valid() {
                invalid_plates += 1;
            }
            if let Err(e) = sink.judgement(&experiment.id, &run.id, judgement) {
                return output_failed(&e);
            }
        }
    }
    if let Err(e) = sink.flush() {
        return output_failed(&e);
    }
    if let (Some(path), Some(out)) = (&args.rdml_out, &annotated)
        && let Err(e) = write_whole(path, &rdml::write(out))
    {
        eprintln!("pcrd analyze: cannot write {}: {e}", path.display());
        return ExitCode::from(exit::REJECTED);
    }
    if invalid_plates > 0 {
        eprintln!(
            "pcrd analyze: {invalid_plates} plate(s) failed their run controls: every call on them is invalid"
        );
    }
    if failed > 0 {
        eprintln!("pcrd analyze: {failed} curve(s) could not be analysed (ct is null, see error)");
        return ExitCode::from(exit::REJECTED);
    }
    ExitCode::SUCCESS
}

/// Writes `bytes` to a temporary file beside `path`, syncs it and renames it
/// over `path`, so a reader never sees half a file.
fn write_whole(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    let written = std::fs::File::create(&tmp).and_then(|mut file| {
        file.write_all(bytes)?;
        file.sync_all()
    });
    match written.and_then(|()| std::fs::rename(&tmp, path)) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn two_decimals(ct: f64) -> f64 {
    (ct * 100.0).round() / 100.0
}

fn load_kit(spec: &str, dir: Option<&std::path::Path>) -> Result<KitDefinition, String> {
    let registry = KitRegistry::load(dir).map_err(|problems| problems.join("; "))?;
    registry.find(spec).cloned()
}

/// Well label → call ("detected", ...; "control"; "not_judged").
fn well_calls(kit: &KitDefinition, judgement: &RunJudgement) -> BTreeMap<String, String> {
    let mut calls = BTreeMap::new();
    for (well, call) in &judgement.plate.samples {
        calls.insert(well.to_string(), call.call.to_string());
    }
    if let Some(template) = kit.template(judgement.plate.format) {
        for well in template.controls.keys() {
            calls.insert(well.to_string(), "control".to_owned());
        }
    }
    for well in &judgement.unjudged {
        calls.insert(well.well.clone(), "not_judged".to_owned());
    }
    calls
}

fn output_failed(e: &std::io::Error) -> ExitCode {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        // `pcrd analyze f.rdml | head`: the reader has what it wanted.
        return ExitCode::SUCCESS;
    }
    eprintln!("pcrd analyze: cannot write the output: {e}");
    ExitCode::from(exit::REJECTED)
}

fn run_list(doc: &rdml::Document) -> String {
    let runs: Vec<String> = doc
        .experiments
        .iter()
        .flat_map(|e| e.runs.iter().map(move |r| format!("{}/{}", e.id, r.id)))
        .collect();
    if runs.is_empty() {
        "no runs".to_owned()
    } else {
        runs.join(", ")
    }
}

/// `N1=0.2` → ("N1", 0.2).
fn parse_threshold(spec: &str) -> Result<(String, f64), String> {
    let (target, value) = spec
        .split_once('=')
        .ok_or_else(|| format!("--threshold {spec:?}: expected TARGET=VALUE, e.g. N1=0.2"))?;
    let value: f64 = value
        .trim()
        .parse()
        .map_err(|_| format!("--threshold {spec:?}: {value:?} is not a number"))?;
    if !(value.is_finite() && value > 0.0) {
        return Err(format!(
            "--threshold {spec:?}: the threshold must be a positive number"
        ));
    }
    Ok((target.trim().to_owned(), value))
}

/// Where the records go, in the format asked for.
enum Sink<W: std::io::Write> {
    Json(W),
    Csv(Box<csv::Writer<W>>),
}

impl<W: std::io::Write> Sink<W> {
    fn header(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Json(_) => Ok(()),
            Sink::Csv(w) => Ok(w.write_record(CSV_HEADER)?),
        }
    }

    fn write(&mut self, line: &Line<'_>) -> std::io::Result<()> {
        match self {
            Sink::Json(w) => {
                serde_json::to_writer(&mut *w, line)?;
                w.write_all(b"\n")
            }
            Sink::Csv(w) => Ok(w.write_record(csv_row(line))?),
        }
    }

    /// The kit's well and plate lines (JSON only: in CSV the call and the
    /// plate's validity are columns of every reaction row).
    fn judgement(
        &mut self,
        experiment: &str,
        run: &str,
        judgement: &RunJudgement,
    ) -> std::io::Result<()> {
        let Sink::Json(w) = self else {
            return Ok(());
        };
        for (well, call) in &judgement.plate.samples {
            let line = WellLine {
                kind: "well",
                experiment,
                run,
                well: well.to_string(),
                call,
            };
            serde_json::to_writer(&mut *w, &line)?;
            w.write_all(b"\n")?;
        }
        let validity = &judgement.plate.validity;
        let line = PlateLine {
            kind: "plate",
            experiment,
            run,
            kit: judgement.plate.kit.to_string(),
            valid: validity.is_valid(),
            reason: validity.reason(),
            validity,
            not_judged: &judgement.unjudged,
        };
        serde_json::to_writer(&mut *w, &line)?;
        w.write_all(b"\n")
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Json(w) => w.flush(),
            Sink::Csv(w) => w.flush(),
        }
    }
}

const CSV_HEADER: [&str; 16] = [
    "experiment",
    "run",
    "reaction",
    "well",
    "sample",
    "sample_type",
    "target",
    "dye",
    "ct",
    "method",
    "threshold",
    "qc",
    "instrument_cq",
    "error",
    "call",
    "plate_valid",
];

/// A record as CSV cells: numbers in full precision, empty for none, QC flags
/// joined by ';' (as RDML joins exclusion reasons).
fn csv_row(line: &Line<'_>) -> [String; 16] {
    let r = line.record;
    let number = |v: Option<f64>| v.map_or_else(String::new, |v| v.to_string());
    let name = |v: serde_json::Result<serde_json::Value>| {
        v.ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    };
    let qc: Vec<String> = r.qc.iter().map(|f| name(serde_json::to_value(f))).collect();
    [
        line.experiment.to_owned(),
        line.run.to_owned(),
        r.reaction.to_string(),
        r.well.clone(),
        r.sample.clone(),
        r.sample_type.clone(),
        r.target.clone(),
        r.dye.clone(),
        number(r.ct),
        name(serde_json::to_value(r.method)),
        number(r.threshold),
        qc.join(";"),
        number(r.instrument_cq),
        r.error.clone().unwrap_or_default(),
        line.call.unwrap_or_default().to_owned(),
        line.plate_valid.map_or_else(String::new, |v| v.to_string()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_parse_or_say_what_is_wrong() {
        assert_eq!(parse_threshold("N1=0.2"), Ok(("N1".to_owned(), 0.2)));
        assert!(parse_threshold("N1").unwrap_err().contains("TARGET=VALUE"));
        assert!(
            parse_threshold("N1=abc")
                .unwrap_err()
                .contains("not a number")
        );
        assert!(parse_threshold("N1=-1").unwrap_err().contains("positive"));
        assert!(parse_threshold("N1=NaN").unwrap_err().contains("positive"));
    }
}
