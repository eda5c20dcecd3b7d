//! Watched export folders (issue 8): one folder per file-only instrument.
//!
//! A decapper or sample loader leaves plate maps (plate barcode, well, tube
//! barcode) in its folder; a cycler's software leaves result files (RDML, or a
//! QuantStudio-style results CSV). One task per folder polls it, waits until a
//! file has stopped changing, imports it once only (by the SHA-256 of its
//! bytes), and moves it to `done/` or, with the reason in a sidecar file, to
//! `failed/`. docs/folders.md is the operator's version of this text.
//!
//! # Order of events for one file
//! 1. Seen with the same size and mtime for `settle_ms` (and not a temporary
//!    name: dotfiles, `~*`, `*.tmp`, `*.part`), it is read whole; if its size or
//!    mtime changed while it was read, it is not settled yet.
//! 2. Its fingerprint is looked up in the `imports` tree. Imported before under
//!    the same folder and name: a crash came between the import and the move, so
//!    the move is finished and nothing is imported. Imported before under another
//!    name or folder: a copy; it goes to `done/` with a sidecar saying when and as
//!    what it was imported.
//! 3. The import: a plate map goes through [`Lab::apply_plate_maps`] (one lab
//!    transaction for the whole file, all or nothing, durable); results are
//!    parsed, judged with the plate's kit and stored as [`ImportedResult`]s.
//! 4. The outcome is committed to the `imports` tree in one transaction (for
//!    results, together with the results) and made durable by the store's
//!    barrier, and only then is the file moved: `rename` within the folder's
//!    filesystem, then `fsync` of the destination and the source directory.
//!
//! A crash between 3 and 4 for a plate map is harmless because applying a map
//! whose tubes are already in their wells changes nothing (see
//! [`Lab::apply_plate_maps`]); results are committed in the same transaction
//! as the fingerprint, so they are there once or not at all.
//!
//! A failed import (the file's fault: bad bytes, an unknown tube or plate, a
//! well clash) is recorded as a failed event and the file moves to `failed/`
//! with a [`Sidecar`]; nothing of it is in the store. A store failure is not
//! the file's fault: the file stays where it is and is tried again.
//!
//! # Store layout (tree `imports`)
//! - `f` ++ fingerprint (64 hex ASCII) -> [`ImportRecord`]: files imported, the
//!   once-only index.
//! - `l` ++ folder name ++ 0x00 ++ time (ms, i64 ordered BE) ++ fingerprint ->
//!   [`ImportEvent`]: every outcome (imported, failed, already imported), per
//!   folder in time order, for `GET /api/v1/imports`.
//! - `r` ++ tube barcode ++ 0x00 ++ fingerprint -> [`ImportedResult`]: results
//!   reported by an instrument's file, per tube.
//!
//! # Which plate a results file is for
//! QuantStudio CSV: the metadata `Experiment Barcode`, then `Experiment Name`,
//! then the file name without its extension. RDML: per run, the run id, then the
//! experiment id, then the file name without its extension. The first candidate
//! that names a plate in the store is taken; if two candidates name two
//! different existing plates the file fails (which one is meant is not guessed);
//! if none names a plate the file fails listing them.
//!
//! # Wells
//! Every specimen well with a call is matched to the plate's tube in that well.
//! A result for a well that holds no tube on the plate is *unmatched*: kept in
//! the import's event with its call and listed by the API, never attached to a
//! tube. A file whose sample name for a well is another received tube than the
//! one the plate has there fails (a plate loaded the wrong way round, or the
//! wrong plate). A target that is not the kit's fails the file, as does a plate
//! of another kit than the folder's, or a file for another plate format.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pcrd_protocol::domain::{PlateFormat, Timestamp, Well, WellContent};
use pcrd_protocol::export::plate_map::read_plate_maps;
use pcrd_protocol::export::results::{ResultsFile, read_results};
use pcrd_protocol::export::{ExportError, Sidecar, fingerprint};
use pcrd_protocol::interpret::{PlateJudgement, Reading};
use pcrd_protocol::kit::KitDefinition;
use pcrd_protocol::rdml;
use pcrd_protocol::run_analysis::{RunSettings, analyze_run, judge_run, kit_target};
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::kits::KitRegistry;
use crate::lab::{Actor, Lab, LabError, MappedPlate, rfc3339};
use crate::model::PlateRecord;
use crate::store::{StoreError, Versioned, decode, encode, ordered_i64};

// ----- configuration -----

/// What a folder's files are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FolderKind {
    /// A decapper's or sample loader's plate maps.
    PlateMap,
    /// A cycler's result files.
    Results,
}

impl FolderKind {
    fn label(self) -> &'static str {
        match self {
            FolderKind::PlateMap => "plate map",
            FolderKind::Results => "results",
        }
    }
}

/// How a results folder's files are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResultsFormat {
    Rdml,
    QuantStudioCsv,
    /// By extension: `.rdml`, `.rdm`, `.xml` are RDML; `.csv`, `.txt` are
    /// QuantStudio-style results.
    Auto,
}

/// `[[folders]]` as written in the config file (see [`parse_folders`]).
#[derive(Debug, Deserialize)]
pub struct RawFolder {
    name: String,
    path: PathBuf,
    kind: String,
    kit: Option<String>,
    format: Option<String>,
    plate_format: Option<u16>,
    poll_ms: Option<u64>,
    settle_ms: Option<u64>,
    done: Option<String>,
    failed: Option<String>,
    hold_before_move_ms: Option<u64>,
}

/// One watched folder.
#[derive(Clone, Debug)]
pub struct FolderConfig {
    /// The instrument whose folder it is; names the folder in the API and metrics.
    pub name: String,
    pub path: PathBuf,
    pub kind: FolderKind,
    /// The kit (id or id@version): plates a plate map creates get its layout;
    /// results are judged with it and must be for plates of it.
    pub kit: String,
    /// Results folders only.
    pub format: ResultsFormat,
    /// Plate maps only: the plates' format; unset, the smallest that holds every
    /// well named (a loader filling only A1..H12 of a 384 plate needs 384 here).
    pub plate_format: Option<PlateFormat>,
    pub poll: Duration,
    /// How long a file's size and mtime must stay unchanged before it is read.
    pub settle: Duration,
    /// Subfolder names (inside `path`) for imported and refused files.
    pub done: String,
    pub failed: String,
    /// Testing only: a pause after an import is durable and before the file is
    /// moved, so a crash test can kill the daemon in that window. 0 in production.
    pub hold_before_move: Duration,
}

pub const DEFAULT_POLL_MS: u64 = 1000;
/// Largest export file read. A 384-well RDML run with three targets and 45 cycles
/// is about 2 MB of XML; anything far larger is not an export of one run.
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;
pub const DEFAULT_SETTLE_MS: u64 = 2000;

/// Validates `[[folders]]`; relative paths are resolved against `base` (the config
/// file's directory). Every problem is pushed to `problems`.
pub fn parse_folders(
    raw: Vec<RawFolder>,
    base: &Path,
    problems: &mut Vec<String>,
) -> Vec<FolderConfig> {
    let mut names = std::collections::BTreeSet::new();
    let mut paths = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for (i, f) in raw.into_iter().enumerate() {
        let at = format!("folders[{i}] ({:?})", f.name);
        let before = problems.len();
        let name = f.name.trim().to_owned();
        if name.is_empty() {
            problems.push(format!("folders[{i}].name must not be empty"));
        } else if name
            .chars()
            .any(|c| c.is_control() || c == '"' || c == '\\')
        {
            problems.push(format!(
                "{at}: name must not hold control characters, quotes or backslashes"
            ));
        }
        if !names.insert(name.clone()) {
            problems.push(format!("{at}: folder name appears twice"));
        }
        let path = base.join(&f.path);
        if f.path.as_os_str().is_empty() {
            problems.push(format!("{at}: path must not be empty"));
        }
        if !paths.insert(path.clone()) {
            problems.push(format!(
                "{at}: path {} is watched by another folder",
                path.display()
            ));
        }
        let kind = match f.kind.as_str() {
            "plate_map" => Some(FolderKind::PlateMap),
            "results" => Some(FolderKind::Results),
            other => {
                problems.push(format!(
                    "{at}: kind {other:?} is not \"plate_map\" or \"results\""
                ));
                None
            }
        };
        let kit = f.kit.unwrap_or_default();
        if kit.trim().is_empty() {
            problems.push(format!(
                "{at}: needs kit = \"<kit id>\" (plate maps create plates of it, results are judged with it)"
            ));
        }
        let format = match (kind, f.format.as_deref()) {
            (_, None) => ResultsFormat::Auto,
            (Some(FolderKind::PlateMap), Some(_)) => {
                problems.push(format!(
                    "{at}: format applies to results folders; a plate-map folder reads decapper CSV"
                ));
                ResultsFormat::Auto
            }
            (_, Some("rdml")) => ResultsFormat::Rdml,
            (_, Some("quantstudio_csv")) => ResultsFormat::QuantStudioCsv,
            (_, Some("auto")) => ResultsFormat::Auto,
            (_, Some(other)) => {
                problems.push(format!(
                    "{at}: format {other:?} is not \"rdml\", \"quantstudio_csv\" or \"auto\""
                ));
                ResultsFormat::Auto
            }
        };
        let plate_format = match (kind, f.plate_format) {
            (_, None) => None,
            (Some(FolderKind::Results), Some(_)) => {
                problems.push(format!(
                    "{at}: plate_format applies to plate-map folders; results files say their format"
                ));
                None
            }
            (_, Some(n)) => match PlateFormat::try_from(n) {
                Ok(format) => Some(format),
                Err(e) => {
                    problems.push(format!("{at}: plate_format: {e}"));
                    None
                }
            },
        };
        let poll_ms = f.poll_ms.unwrap_or(DEFAULT_POLL_MS);
        if !(50..=600_000).contains(&poll_ms) {
            problems.push(format!("{at}: poll_ms {poll_ms} is outside 50..=600000"));
        }
        let settle_ms = f.settle_ms.unwrap_or(DEFAULT_SETTLE_MS);
        if settle_ms > 3_600_000 {
            problems.push(format!("{at}: settle_ms {settle_ms} is above 3600000"));
        }
        let hold_ms = f.hold_before_move_ms.unwrap_or(0);
        if hold_ms > 60_000 {
            problems.push(format!(
                "{at}: hold_before_move_ms {hold_ms} is above 60000 (it is for crash tests)"
            ));
        }
        let mut subfolder = |key: &str, value: Option<String>, default: &str| {
            let value = value.unwrap_or_else(|| default.to_owned());
            let simple = !value.is_empty()
                && value != "."
                && value != ".."
                && !value.contains(['/', '\\'])
                && !value.starts_with('.');
            if !simple {
                problems.push(format!(
                    "{at}: {key} {value:?} must be a plain subfolder name such as {default:?}"
                ));
            }
            value
        };
        let done = subfolder("done", f.done, "done");
        let failed = subfolder("failed", f.failed, "failed");
        if done == failed {
            problems.push(format!(
                "{at}: done and failed must be different subfolders"
            ));
        }
        if problems.len() == before
            && let Some(kind) = kind
        {
            out.push(FolderConfig {
                name,
                path,
                kind,
                kit,
                format,
                plate_format,
                poll: Duration::from_millis(poll_ms),
                settle: Duration::from_millis(settle_ms),
                done,
                failed,
                hold_before_move: Duration::from_millis(hold_ms),
            });
        }
    }
    out
}

/// Problems with the folders' kits, which the config parser cannot see: each kit
/// must be known, and for a plate-map folder have a layout for the plate format.
pub fn check_kits(folders: &[FolderConfig], kits: &KitRegistry) -> Vec<String> {
    let mut problems = Vec::new();
    for f in folders {
        match kits.find(&f.kit) {
            Err(e) => problems.push(format!("folder {:?}: {e}", f.name)),
            Ok(kit) => {
                if let Some(format) = f.plate_format
                    && kit.template(format).is_none()
                {
                    problems.push(format!(
                        "folder {:?}: kit {} has no {format}-well layout",
                        f.name,
                        kit.key()
                    ));
                }
            }
        }
    }
    problems
}

// ----- stored records -----

/// A file imported, under its fingerprint: the once-only index.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImportRecord {
    pub fingerprint: String,
    pub folder: String,
    /// The file's name when it was imported.
    pub file: String,
    pub kind: FolderKind,
    pub imported_at: Timestamp,
    /// What the import created, in words.
    pub summary: String,
    /// Set once the file is in `done/`: the same name with the same bytes found
    /// later is then a new copy, not a move left unfinished by a crash.
    pub moved: bool,
}

impl Versioned for ImportRecord {
    const TREE: &'static str = "imports";
    const VERSION: u8 = 1;
}

/// What became of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Imported,
    /// Refused; the file is in `failed/` with the reason beside it.
    Failed,
    /// The same bytes were imported before; moved to `done/` unimported.
    AlreadyImported,
}

/// A result in a file for a well that holds no tube, or a tube's well that got
/// no call: kept and shown, never attached to a tube.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UnmatchedWell {
    pub plate: String,
    pub well: String,
    /// The sample name the file gives the well.
    pub sample: String,
    /// The call, when there is one.
    pub call: Option<String>,
    /// Why it is not on a tube.
    pub reason: String,
}

/// One outcome of one file in one folder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImportEvent {
    pub folder: String,
    pub file: String,
    pub fingerprint: String,
    pub at: Timestamp,
    pub outcome: Outcome,
    /// What was created, or why the file was refused.
    pub detail: String,
    /// Plates the file was for.
    pub plates: Vec<String>,
    /// Results stored on tubes (results files) or tubes placed (plate maps).
    pub tubes: u32,
    /// At most [`MAX_LISTED`] wells whose results are not on a tube.
    pub unmatched: Vec<UnmatchedWell>,
    /// At most [`MAX_LISTED`] tubes on the plate the file gave no result for.
    pub missing: Vec<String>,
}

impl Versioned for ImportEvent {
    const TREE: &'static str = "imports";
    const VERSION: u8 = 1;
}

/// Wells and tubes listed per event: enough for a 384-well plate, and small
/// enough that the event stays far below the store's 64 KiB value limit.
pub const MAX_LISTED: usize = 400;
/// Longest detail kept in an event.
const MAX_DETAIL: usize = 4000;

/// Where an imported result came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ResultSource {
    /// The folder's (instrument's) name.
    pub folder: String,
    pub file: String,
    pub fingerprint: String,
    /// "rdml" or "quantstudio_csv".
    pub format: String,
    /// RFC 3339.
    pub imported_at: String,
}

/// One target of an imported result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImportedTarget {
    pub target: String,
    pub channel: String,
    /// The Ct as given (QuantStudio) or as pcrd analysed the curve (RDML);
    /// `null` = Undetermined.
    pub ct: Option<f64>,
    /// positive, negative, grey_zone.. under the kit's cut-off.
    pub state: String,
}

/// A result an instrument's file reported for one tube, as judged with the kit.
/// Not released: review and release are separate (issue 6).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImportedResult {
    pub tube: String,
    pub plate: String,
    pub well: String,
    /// "id@version" of the kit that judged it.
    pub kit: String,
    /// detected, not_detected, inconclusive, retest, invalid.
    pub call: String,
    pub action: String,
    pub reason: String,
    /// Whether the plate's run controls passed.
    pub plate_valid: bool,
    /// Curve QC flags holding the result for review ("target: flag").
    pub qc_holds: Vec<String>,
    pub targets: Vec<ImportedTarget>,
    pub source: ResultSource,
}

impl Versioned for ImportedResult {
    const TREE: &'static str = "imports";
    const VERSION: u8 = 1;
}

fn record_key(fingerprint: &str) -> Vec<u8> {
    let mut key = vec![b'f'];
    key.extend_from_slice(fingerprint.as_bytes());
    key
}

fn event_prefix(folder: &str) -> Vec<u8> {
    let mut key = vec![b'l'];
    key.extend_from_slice(folder.as_bytes());
    key.push(0);
    key
}

fn event_key(event: &ImportEvent) -> Vec<u8> {
    let mut key = event_prefix(&event.folder);
    key.extend_from_slice(&ordered_i64(event.at.as_millis()));
    key.extend_from_slice(event.fingerprint.as_bytes());
    key
}

fn result_prefix(tube: &str) -> Vec<u8> {
    let mut key = vec![b'r'];
    key.extend_from_slice(tube.as_bytes());
    key.push(0);
    key
}

fn result_key(result: &ImportedResult) -> Vec<u8> {
    let mut key = result_prefix(&result.tube);
    key.extend_from_slice(result.source.fingerprint.as_bytes());
    key
}

// ----- what the API shows -----

/// A watched folder and what it has done.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct FolderView {
    pub name: String,
    pub path: String,
    pub kind: FolderKind,
    pub kit: String,
    /// Files that settled and were read since the daemon started.
    pub files_seen: u64,
    /// Files imported (all time, from the store).
    pub imported: u64,
    /// Files refused (all time, from the store).
    pub failed: u64,
    /// Copies of files imported before (all time, from the store).
    pub already_imported: u64,
    /// The newest import: file name and time (RFC 3339).
    pub last_import: Option<LastImport>,
    /// The last problem with the folder itself (unreadable, a file that cannot be
    /// moved), if any since start.
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct LastImport {
    pub file: String,
    pub at: String,
}

/// One file's outcome, for `GET /api/v1/imports`.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ImportView {
    pub folder: String,
    pub file: String,
    pub fingerprint: String,
    /// RFC 3339.
    pub at: String,
    pub outcome: Outcome,
    pub detail: String,
    pub plates: Vec<String>,
    pub tubes: u32,
    pub unmatched: Vec<UnmatchedWell>,
    pub missing: Vec<String>,
}

impl From<ImportEvent> for ImportView {
    fn from(e: ImportEvent) -> ImportView {
        ImportView {
            folder: e.folder,
            file: e.file,
            fingerprint: e.fingerprint,
            at: rfc3339(e.at),
            outcome: e.outcome,
            detail: e.detail,
            plates: e.plates,
            tubes: e.tubes,
            unmatched: e.unmatched,
            missing: e.missing,
        }
    }
}

// ----- the watchers -----

/// Picks one counter of a folder, for rendering a metric family.
type CounterOf = fn(&FolderCounters) -> &AtomicU64;

/// Counters of one folder, since start.
#[derive(Debug, Default)]
struct FolderCounters {
    seen: AtomicU64,
    imported: AtomicU64,
    failed: AtomicU64,
    already: AtomicU64,
}

#[derive(Debug)]
struct Folder {
    config: FolderConfig,
    counters: FolderCounters,
    last_error: Mutex<Option<String>>,
}

impl Folder {
    fn set_error(&self, error: Option<String>) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = error;
    }
}

/// The watched folders of a daemon.
#[derive(Debug, Default)]
pub struct Folders {
    folders: Vec<Arc<Folder>>,
    /// From a file found settled to its outcome durable.
    latency: crate::metrics::Histogram,
}

impl Folders {
    /// No folders (a daemon without `[[folders]]`, or tests of other parts).
    pub fn none() -> Arc<Folders> {
        Arc::new(Folders::default())
    }

    /// Starts one polling task per folder on the current tokio runtime.
    pub fn start(lab: Arc<Lab>, configs: &[FolderConfig]) -> Arc<Folders> {
        let folders = Arc::new(Folders {
            folders: configs
                .iter()
                .map(|config| {
                    Arc::new(Folder {
                        config: config.clone(),
                        counters: FolderCounters::default(),
                        last_error: Mutex::new(None),
                    })
                })
                .collect(),
            latency: crate::metrics::Histogram::default(),
        });
        for folder in &folders.folders {
            let span = tracing::info_span!("folder", folder = %folder.config.name);
            tokio::spawn(
                watch(Arc::clone(&lab), Arc::clone(&folders), Arc::clone(folder)).instrument(span),
            );
        }
        folders
    }

    /// Every folder with its counts.
    pub fn status(&self, lab: &Lab) -> Result<Vec<FolderView>, StoreError> {
        let mut views = Vec::new();
        for folder in &self.folders {
            let c = &folder.config;
            let (mut imported, mut failed, mut already) = (0, 0, 0);
            let mut last_import = None;
            for item in lab
                .store()
                .trees()
                .imports
                .scan_prefix(event_prefix(&c.name))
            {
                let (key, raw) = item?;
                let event: ImportEvent = decode(&key, &raw)?;
                match event.outcome {
                    Outcome::Imported => {
                        imported += 1;
                        last_import = Some(LastImport {
                            file: event.file,
                            at: rfc3339(event.at),
                        });
                    }
                    Outcome::Failed => failed += 1,
                    Outcome::AlreadyImported => already += 1,
                }
            }
            views.push(FolderView {
                name: c.name.clone(),
                path: c.path.display().to_string(),
                kind: c.kind,
                kit: c.kit.clone(),
                files_seen: folder.counters.seen.load(Ordering::Relaxed),
                imported,
                failed,
                already_imported: already,
                last_import,
                last_error: folder
                    .last_error
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone(),
            });
        }
        Ok(views)
    }

    /// Whether a folder of this name is configured.
    pub fn has(&self, name: &str) -> bool {
        self.folders.iter().any(|f| f.config.name == name)
    }

    /// The newest `limit` outcomes, newest first; of one folder or of all.
    pub fn events(
        &self,
        lab: &Lab,
        folder: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ImportView>, StoreError> {
        let tree = &lab.store().trees().imports;
        let mut events = Vec::new();
        let prefix = match folder {
            Some(name) => event_prefix(name),
            None => vec![b'l'],
        };
        for item in tree.scan_prefix(prefix).rev() {
            let (key, raw) = item?;
            events.push(decode::<ImportEvent>(&key, &raw)?);
            if folder.is_some() && events.len() >= limit {
                break;
            }
        }
        events.sort_by_key(|e| std::cmp::Reverse(e.at));
        events.truncate(limit);
        Ok(events.into_iter().map(ImportView::from).collect())
    }

    /// Every result instrument files reported for a tube, oldest import first.
    pub fn results_for_tube(lab: &Lab, barcode: &str) -> Result<Vec<ImportedResult>, StoreError> {
        let mut results = Vec::new();
        for item in lab
            .store()
            .trees()
            .imports
            .scan_prefix(result_prefix(barcode))
        {
            let (key, raw) = item?;
            results.push(decode::<ImportedResult>(&key, &raw)?);
        }
        results.sort_by(|a, b| a.source.imported_at.cmp(&b.source.imported_at));
        Ok(results)
    }

    /// Appends the folders' counters and the import latency to a /metrics page.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        if self.folders.is_empty() {
            return;
        }
        let families: [(&str, &str, CounterOf); 4] = [
            (
                "pcrd_folder_files_seen_total",
                "Files that settled in a watched folder and were read, since start.",
                |c| &c.seen,
            ),
            (
                "pcrd_folder_files_imported_total",
                "Files imported from a watched folder, since start.",
                |c| &c.imported,
            ),
            (
                "pcrd_folder_files_failed_total",
                "Files refused and moved to failed/, since start.",
                |c| &c.failed,
            ),
            (
                "pcrd_folder_files_already_imported_total",
                "Copies of files imported before, moved to done/ unimported, since start.",
                |c| &c.already,
            ),
        ];
        for (name, help, counter) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for folder in &self.folders {
                let _ = writeln!(
                    out,
                    "{name}{{folder=\"{}\"}} {}",
                    folder.config.name,
                    counter(&folder.counters).load(Ordering::Relaxed)
                );
            }
        }
        self.latency.render(
            out,
            "pcrd_folder_import_seconds",
            "From a file found settled to its import (or refusal) durable.",
        );
    }
}

/// A file's size and modification time: unchanged for the settle time means the
/// instrument has finished writing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime: Option<SystemTime>,
}

/// Names an instrument or a copy tool uses while a file is still being written,
/// and the sidecars pcrd writes.
fn is_temporary(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    name.starts_with('.')
        || name.starts_with('~')
        || [".tmp", ".part", ".partial", ".crdownload", ".swp"]
            .iter()
            .any(|ext| lower.ends_with(ext))
        || lower.ends_with(Sidecar::SUFFIX)
}

async fn watch(lab: Arc<Lab>, folders: Arc<Folders>, folder: Arc<Folder>) {
    let config = &folder.config;
    tracing::info!(path = %config.path.display(), kind = config.kind.label(), "Watching the folder.");
    // name -> (stamp, since when unchanged)
    let mut settling: HashMap<OsString, (Stamp, Instant)> = HashMap::new();
    // Files whose move failed with this stamp: not tried again until they change.
    let mut stuck: HashMap<OsString, Stamp> = HashMap::new();
    loop {
        match list(&config.path).await {
            Ok(files) => {
                folder.set_error(None);
                settling.retain(|name, _| files.iter().any(|(n, _)| n == name));
                stuck.retain(|name, _| files.iter().any(|(n, _)| n == name));
                for (name, stamp) in files {
                    if stuck.get(&name) == Some(&stamp) {
                        continue;
                    }
                    let settled = match settling.get(&name) {
                        Some((seen, since)) if *seen == stamp => since.elapsed() >= config.settle,
                        _ => {
                            settling.insert(name.clone(), (stamp, Instant::now()));
                            config.settle.is_zero()
                        }
                    };
                    if !settled {
                        continue;
                    }
                    let span = tracing::info_span!("import", file = %name.to_string_lossy());
                    match handle(&lab, &folders, &folder, &name, stamp)
                        .instrument(span)
                        .await
                    {
                        Handled::Done => {
                            settling.remove(&name);
                        }
                        Handled::NotSettled => {
                            settling.remove(&name);
                        }
                        Handled::Retry(why) => {
                            // Not the file's fault (the store failed): keep it, try later.
                            folder.set_error(Some(why));
                        }
                        Handled::Stuck(why) => {
                            folder.set_error(Some(why));
                            stuck.insert(name.clone(), stamp);
                        }
                    }
                }
            }
            Err(e) => {
                let why = format!("cannot read folder {}: {e}", config.path.display());
                tracing::warn!(error = %why, "Folder unreadable; trying again.");
                folder.set_error(Some(why));
            }
        }
        tokio::time::sleep(config.poll).await;
    }
}

/// The regular files directly in `dir` that are not temporary, with their stamps.
/// Creates the folder (and nothing else) if it is missing.
async fn list(dir: &Path) -> std::io::Result<Vec<(OsString, Stamp)>> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dir)?;
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name();
            if is_temporary(&name.to_string_lossy()) {
                continue;
            }
            // Not following links: a link's target may be anywhere, and moving the
            // link would not move the file.
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            files.push((
                name,
                Stamp {
                    len: meta.len(),
                    mtime: meta.modified().ok(),
                },
            ));
        }
        files.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(files)
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
}

#[derive(Debug)]
enum Handled {
    Done,
    /// It changed while it was read.
    NotSettled,
    /// The store failed; the file stays.
    Retry(String),
    /// The file could not be moved; left until it changes.
    Stuck(String),
}

/// Why a file was not imported.
#[derive(Debug, thiserror::Error)]
enum ImportError {
    /// The file's fault: it goes to failed/ with this reason.
    #[error("{0}")]
    Refused(String),
    /// The store's: the file stays and is tried again.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<ExportError> for ImportError {
    fn from(e: ExportError) -> ImportError {
        ImportError::Refused(e.to_string())
    }
}

impl From<LabError> for ImportError {
    fn from(e: LabError) -> ImportError {
        match e {
            LabError::Store(e) => ImportError::Store(e),
            LabError::Invalid { message, problems } | LabError::Conflict { message, problems } => {
                if problems.is_empty() {
                    ImportError::Refused(message)
                } else {
                    ImportError::Refused(format!("{message}: {}", problems.join("; ")))
                }
            }
            LabError::NotFound { message } => ImportError::Refused(message),
        }
    }
}

fn refused(message: impl Into<String>) -> ImportError {
    ImportError::Refused(message.into())
}

/// What an import made, before it is committed.
#[derive(Debug, Default)]
struct Imported {
    summary: String,
    plates: Vec<String>,
    tubes: u32,
    unmatched: Vec<UnmatchedWell>,
    missing: Vec<String>,
    results: Vec<ImportedResult>,
    /// Review candidates of the same results (issue 7), staged with the import.
    candidates: Vec<crate::review::Candidate>,
}

fn now() -> Timestamp {
    Timestamp::from_millis(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64),
    )
}

fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

async fn handle(
    lab: &Arc<Lab>,
    folders: &Folders,
    folder: &Folder,
    name: &OsStr,
    stamp: Stamp,
) -> Handled {
    let config = &folder.config;
    let file = name.to_string_lossy().into_owned();
    let path = config.path.join(name);
    let started = Instant::now();
    if stamp.len > MAX_FILE_BYTES {
        folder.counters.seen.fetch_add(1, Ordering::Relaxed);
        let reason = format!(
            "the file has {} bytes; pcrd reads export files of at most {MAX_FILE_BYTES} bytes",
            stamp.len
        );
        // Not read, so not fingerprinted: the sidecar shows the hash of no bytes.
        return fail(
            lab,
            folders,
            folder,
            name,
            fingerprint(&[]),
            reason,
            started,
        )
        .await;
    }
    let bytes = match tokio::fs::read(&path).await {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Handled::NotSettled,
        Err(e) => {
            folder.counters.seen.fetch_add(1, Ordering::Relaxed);
            let reason = format!("the file cannot be read: {e}");
            return fail(
                lab,
                folders,
                folder,
                name,
                fingerprint(&[]),
                reason,
                started,
            )
            .await;
        }
    };
    // A writer that resumed while the file was read: not settled after all.
    match tokio::fs::metadata(&path).await {
        Ok(meta)
            if meta.len() == stamp.len
                && meta.modified().ok() == stamp.mtime
                && bytes.len() as u64 == stamp.len => {}
        _ => {
            tracing::debug!("The file changed while it was read; waiting for it to settle.");
            return Handled::NotSettled;
        }
    }
    folder.counters.seen.fetch_add(1, Ordering::Relaxed);
    let print = fingerprint(&bytes);

    // Once only: the fingerprint first, so that a crash after the import and before
    // the move never imports twice.
    let earlier = match lookup(lab, &print) {
        Ok(earlier) => earlier,
        Err(e) => return Handled::Retry(format!("store: {e}")),
    };
    if let Some(earlier) = earlier {
        if earlier.folder == config.name && earlier.file == file && !earlier.moved {
            tracing::info!(
                fingerprint = %print,
                "Imported before the daemon stopped; finishing the move to {}/.",
                config.done
            );
            let handled = finish_move(folder, name, &config.done, None);
            if matches!(handled, Handled::Done) {
                mark_moved(lab, &print).await;
            }
            return handled;
        }
        let reason = format!(
            "already imported at {} from folder {:?} as {:?}; not imported again",
            rfc3339(earlier.imported_at),
            earlier.folder,
            earlier.file
        );
        let event = ImportEvent {
            folder: config.name.clone(),
            file: file.clone(),
            fingerprint: print.clone(),
            at: now(),
            outcome: Outcome::AlreadyImported,
            detail: reason.clone(),
            plates: Vec::new(),
            tubes: 0,
            unmatched: Vec::new(),
            missing: Vec::new(),
        };
        if let Err(e) = commit_event(lab, &event).await {
            return Handled::Retry(format!("store: {e}"));
        }
        folder.counters.already.fetch_add(1, Ordering::Relaxed);
        tracing::info!(fingerprint = %print, "{reason}");
        let sidecar = Sidecar {
            file: file.clone(),
            kind: config.kind.label().to_owned(),
            fingerprint: print,
            error: reason,
        };
        return finish_move(folder, name, &config.done, Some(sidecar.to_string()));
    }

    let outcome = match config.kind {
        FolderKind::PlateMap => import_plate_map(lab, config, &bytes).await,
        FolderKind::Results => {
            // Curve analysis of a whole run is CPU work: off the async workers.
            let (lab, config, file, print) =
                (Arc::clone(lab), config.clone(), file.clone(), print.clone());
            tokio::task::spawn_blocking(move || {
                import_results(&lab, &config, &file, &print, &bytes)
            })
            .await
            .unwrap_or_else(|e| Err(refused(format!("the import stopped: {e}"))))
        }
    };
    let imported = match outcome {
        Ok(imported) => imported,
        Err(ImportError::Store(e)) => {
            tracing::error!(error = %e, "The store failed; the file stays and is tried again.");
            return Handled::Retry(format!("store: {e}"));
        }
        Err(ImportError::Refused(reason)) => {
            return fail(lab, folders, folder, name, print, reason, started).await;
        }
    };
    let at = now();
    let record = ImportRecord {
        fingerprint: print.clone(),
        folder: config.name.clone(),
        file: file.clone(),
        kind: config.kind,
        imported_at: at,
        summary: cut(imported.summary.clone(), MAX_DETAIL),
        moved: false,
    };
    let mut unmatched = imported.unmatched;
    unmatched.truncate(MAX_LISTED);
    let mut missing = imported.missing;
    missing.truncate(MAX_LISTED);
    let event = ImportEvent {
        folder: config.name.clone(),
        file: file.clone(),
        fingerprint: print.clone(),
        at,
        outcome: Outcome::Imported,
        detail: record.summary.clone(),
        plates: imported.plates,
        tubes: imported.tubes,
        unmatched,
        missing,
    };
    let mut results = imported.results;
    for result in &mut results {
        result.source.imported_at = rfc3339(at);
    }
    match commit_import(lab, &record, &event, &results, imported.candidates).await {
        Ok(true) => {}
        Ok(false) => {
            // Another folder imported the same bytes in the meantime; nothing of
            // this one was written (a plate map's lab changes are idempotent).
            return Handled::NotSettled;
        }
        Err(e) => {
            tracing::error!(error = %e, "The store failed; the file stays and is tried again.");
            return Handled::Retry(format!("store: {e}"));
        }
    }
    folders.latency.observe(started.elapsed());
    folder.counters.imported.fetch_add(1, Ordering::Relaxed);
    tracing::info!(
        fingerprint = %print,
        plates = %event.plates.join(","),
        tubes = event.tubes,
        unmatched = event.unmatched.len(),
        "Imported: {}",
        event.detail
    );
    if !config.hold_before_move.is_zero() {
        tracing::warn!(
            hold_ms = config.hold_before_move.as_millis() as u64,
            "Import durable; holding before the move (hold_before_move_ms, for crash tests)."
        );
        tokio::time::sleep(config.hold_before_move).await;
    }
    let handled = finish_move(folder, name, &config.done, None);
    if matches!(handled, Handled::Done) {
        mark_moved(lab, &print).await;
    }
    handled
}

/// Notes in the import's record that its file is in `done/`. Best effort: if this
/// is lost, a later copy of the same bytes under the same name is moved to `done/`
/// without a sidecar instead of with one; nothing is imported twice either way.
async fn mark_moved(lab: &Lab, print: &str) {
    let tree = &lab.store().trees().imports;
    let key = record_key(print);
    let outcome = match lookup(lab, print) {
        Ok(Some(mut record)) => {
            record.moved = true;
            tree.insert(key, encode(&record))
                .map_err(StoreError::from)
                .map(drop)
        }
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    let outcome = match outcome {
        Ok(()) => lab.store().durable().await,
        Err(e) => Err(e),
    };
    if let Err(e) = outcome {
        tracing::warn!(error = %e, "Could not note the move in the store.");
    }
}

/// Records a refusal (durably) and moves the file to failed/ with its sidecar.
async fn fail(
    lab: &Arc<Lab>,
    folders: &Folders,
    folder: &Folder,
    name: &OsStr,
    print: String,
    reason: String,
    started: Instant,
) -> Handled {
    let config = &folder.config;
    let file = name.to_string_lossy().into_owned();
    let event = ImportEvent {
        folder: config.name.clone(),
        file: file.clone(),
        fingerprint: print.clone(),
        at: now(),
        outcome: Outcome::Failed,
        detail: cut(reason.clone(), MAX_DETAIL),
        plates: Vec::new(),
        tubes: 0,
        unmatched: Vec::new(),
        missing: Vec::new(),
    };
    if let Err(e) = commit_event(lab, &event).await {
        return Handled::Retry(format!("store: {e}"));
    }
    folders.latency.observe(started.elapsed());
    folder.counters.failed.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(fingerprint = %print, reason = %reason, "Refused; moving it to {}/.", config.failed);
    let sidecar = Sidecar {
        file,
        kind: config.kind.label().to_owned(),
        fingerprint: print,
        error: reason,
    };
    finish_move(folder, name, &config.failed, Some(sidecar.to_string()))
}

fn finish_move(folder: &Folder, name: &OsStr, subfolder: &str, sidecar: Option<String>) -> Handled {
    let dir = &folder.config.path;
    match move_into(dir, name, &dir.join(subfolder), sidecar.as_deref()) {
        Ok(to) => {
            tracing::info!(to = %to.display(), "Moved.");
            Handled::Done
        }
        Err(e) => {
            let why = format!(
                "cannot move {} to {subfolder}/: {e}",
                name.to_string_lossy()
            );
            tracing::error!(error = %why, "The file stays until it changes.");
            Handled::Stuck(why)
        }
    }
}

/// Moves `dir/name` into `dest` (same filesystem: a rename), first writing the
/// sidecar beside where it will be; then syncs both directories so the move
/// survives a power cut. An existing file of the same name in `dest` is kept: the
/// moved one gets `-2`, `-3`, .. before its extension.
fn move_into(
    dir: &Path,
    name: &OsStr,
    dest: &Path,
    sidecar: Option<&str>,
) -> std::io::Result<PathBuf> {
    use std::io::Write as _;
    std::fs::create_dir_all(dest)?;
    let target = free_name(dest, name);
    if let Some(text) = sidecar {
        let mut side_name = target.as_os_str().to_owned();
        side_name.push(Sidecar::SUFFIX);
        // Written under a temporary name and renamed, so whoever reads failed/ or
        // done/ never sees a sidecar that is still empty or half-written.
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(Path::new(&side_name).file_name().unwrap_or_default());
        tmp_name.push(".tmp");
        let tmp = dest.join(tmp_name);
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &side_name)?;
    }
    std::fs::rename(dir.join(name), &target)?;
    std::fs::File::open(dest)?.sync_all()?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(target)
}

fn free_name(dest: &Path, name: &OsStr) -> PathBuf {
    let taken = |p: &Path| {
        let mut side = p.as_os_str().to_owned();
        side.push(Sidecar::SUFFIX);
        p.exists() || Path::new(&side).exists()
    };
    let first = dest.join(name);
    if !taken(&first) {
        return first;
    }
    let path = Path::new(name);
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    (2u64..)
        .map(|n| dest.join(format!("{stem}-{n}{ext}")))
        .find(|p| !taken(p))
        .unwrap_or(first)
}

fn lookup(lab: &Lab, print: &str) -> Result<Option<ImportRecord>, StoreError> {
    let key = record_key(print);
    match lab.store().trees().imports.get(&key)? {
        Some(raw) => Ok(Some(decode(&key, &raw)?)),
        None => Ok(None),
    }
}

/// Writes one event and waits for the barrier.
async fn commit_event(lab: &Lab, event: &ImportEvent) -> Result<(), StoreError> {
    lab.store()
        .trees()
        .imports
        .insert(event_key(event), encode(event))?;
    lab.store().durable().await
}

/// Writes the import's record, event and results, and stages its review candidates
/// (with any release by policy), in one lab transaction, unless the fingerprint was
/// recorded meanwhile (false); then waits for the barrier (see `crate::review::stage`).
async fn commit_import(
    lab: &Arc<Lab>,
    record: &ImportRecord,
    event: &ImportEvent,
    results: &[ImportedResult],
    mut candidates: Vec<crate::review::Candidate>,
) -> Result<bool, LabError> {
    let record_key = record_key(&record.fingerprint);
    let mut writes = vec![
        (record_key.clone(), encode(record)),
        (event_key(event), encode(event)),
    ];
    writes.extend(results.iter().map(|r| (result_key(r), encode(r))));
    for candidate in &mut candidates {
        candidate.tested_at_ms = record.imported_at.as_millis();
    }
    let actor = Actor {
        user: format!("folder:{}", record.folder),
        reason: None,
    };
    let staged = crate::review::stage(lab, actor, candidates, writes, Some(record_key)).await?;
    Ok(staged.is_some())
}

// ----- plate maps -----

async fn import_plate_map(
    lab: &Arc<Lab>,
    config: &FolderConfig,
    bytes: &[u8],
) -> Result<Imported, ImportError> {
    let maps = read_plate_maps(bytes, config.plate_format)?;
    let maps: Vec<MappedPlate> = maps
        .into_iter()
        .map(|m| MappedPlate {
            id: m.plate,
            format: m.format,
            placements: m.placements,
        })
        .collect();
    let actor = Actor {
        user: format!("folder:{}", config.name),
        reason: Some("plate map from the instrument's export folder".to_owned()),
    };
    let outcomes = lab
        .apply_plate_maps(actor, config.kit.clone(), maps)
        .await?;
    let mut parts = Vec::new();
    let mut tubes = 0;
    for o in &outcomes {
        tubes += o.placed.len() as u32;
        let verb = if o.created { "created" } else { "filled" };
        let mut part = format!("{verb} plate {} with {} tube(s)", o.plate, o.placed.len());
        if o.already_placed > 0 {
            part.push_str(&format!(" ({} already in place)", o.already_placed));
        }
        parts.push(part);
    }
    Ok(Imported {
        summary: parts.join("; "),
        plates: outcomes.iter().map(|o| o.plate.to_string()).collect(),
        tubes,
        ..Imported::default()
    })
}

// ----- results -----

/// One plate's judged results, before they are matched to tubes.
struct Judged {
    plate: PlateRecord,
    judgement: PlateJudgement,
    /// Sample name per well, as the file gives it.
    samples: BTreeMap<Well, String>,
    /// Wells the file has but no call could be made for (omitted, curve not
    /// analysable), with the reason.
    unjudged: Vec<(Well, String, String)>,
}

fn file_stem(file: &str) -> String {
    Path::new(file)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The plate a file (or RDML run) is for: see the module documentation.
fn resolve_plate(lab: &Lab, candidates: &[(&str, String)]) -> Result<PlateRecord, ImportError> {
    let mut found: Option<(&str, PlateRecord)> = None;
    for (what, id) in candidates {
        let id = id.trim();
        if id.is_empty() {
            continue;
        }
        match lab.plate(id) {
            Ok(plate) => match &found {
                Some((first, p)) if p.id != plate.id => {
                    return Err(refused(format!(
                        "the file's {first} names plate {} and its {what} names plate {}; which one is meant is not guessed",
                        p.id, plate.id
                    )));
                }
                Some(_) => {}
                None => found = Some((what, plate)),
            },
            Err(LabError::Store(e)) => return Err(ImportError::Store(e)),
            Err(_) => {}
        }
    }
    found.map(|(_, p)| p).ok_or_else(|| {
        let tried: Vec<String> = candidates
            .iter()
            .filter(|(_, id)| !id.trim().is_empty())
            .map(|(what, id)| format!("{what} {:?}", id.trim()))
            .collect();
        refused(format!(
            "no plate in pcrd for this file (tried {}); create or map the plate first",
            if tried.is_empty() {
                "nothing: the file names no plate".to_owned()
            } else {
                tried.join(", ")
            }
        ))
    })
}

/// The kit a plate was set up with, checked against the folder's.
fn plate_kit<'k>(
    lab: &'k Lab,
    config: &FolderConfig,
    plate: &PlateRecord,
) -> Result<&'k KitDefinition, ImportError> {
    let folder_kit = lab.kits().find(&config.kit).map_err(refused)?;
    if folder_kit.id != plate.kit_id {
        return Err(refused(format!(
            "plate {} was set up for kit {}@{}, but folder {:?} reports kit {}",
            plate.id,
            plate.kit_id,
            plate.kit_version,
            config.name,
            folder_kit.key()
        )));
    }
    lab.kits()
        .find(&format!("{}@{}", plate.kit_id, plate.kit_version))
        .map_err(refused)
}

fn check_format(plate: &PlateRecord, format: PlateFormat) -> Result<(), ImportError> {
    if plate.format != format {
        return Err(refused(format!(
            "the file is for a {format}-well plate, but plate {} has {} wells",
            plate.id, plate.format
        )));
    }
    Ok(())
}

fn results_format(config: &FolderConfig, file: &str) -> Result<ResultsFormat, ImportError> {
    match config.format {
        ResultsFormat::Auto => {
            let ext = Path::new(file)
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase())
                .unwrap_or_default();
            match ext.as_str() {
                "rdml" | "rdm" | "xml" => Ok(ResultsFormat::Rdml),
                "csv" | "txt" => Ok(ResultsFormat::QuantStudioCsv),
                _ => Err(refused(format!(
                    "cannot tell the format from the extension {ext:?}: expected .rdml, .rdm or .xml (RDML) or .csv or .txt (QuantStudio results); or set format in the folder's config"
                ))),
            }
        }
        fixed => Ok(fixed),
    }
}

fn import_results(
    lab: &Lab,
    config: &FolderConfig,
    file: &str,
    print: &str,
    bytes: &[u8],
) -> Result<Imported, ImportError> {
    let format = results_format(config, file)?;
    let (judged, format_name) = match format {
        ResultsFormat::Rdml => (judge_rdml(lab, config, file, bytes)?, "rdml"),
        _ => (
            vec![judge_quantstudio(lab, config, file, &read_results(bytes)?)?],
            "quantstudio_csv",
        ),
    };
    let source = ResultSource {
        folder: config.name.clone(),
        file: file.to_owned(),
        fingerprint: print.to_owned(),
        format: format_name.to_owned(),
        imported_at: String::new(),
    };
    let mut imported = Imported::default();
    let mut problems = Vec::new();
    let mut parts = Vec::new();
    let provenance = crate::review::Provenance {
        run: format!("import-{}", print.get(..12).unwrap_or(print)),
        instrument: config.name.clone(),
        source: crate::review::CandidateSource {
            kind: "file_import".to_owned(),
            id: print.to_owned(),
            detail: format!("{}/{file}", config.name),
        },
        tested_at_ms: 0,
    };
    for judged in judged {
        let plate = &judged.plate;
        let id = plate.id.to_string();
        let validity = &judged.judgement.validity;
        let mut on_tubes = 0;
        let mut with_result = std::collections::BTreeSet::new();
        for (well, call) in &judged.judgement.samples {
            let sample = judged.samples.get(well).cloned().unwrap_or_default();
            match plate.layout.get(*well) {
                Some(WellContent::Sample { barcode }) => {
                    if !sample.is_empty() && sample != barcode.as_str() && lab.tube(&sample).is_ok()
                    {
                        problems.push(format!(
                            "well {well} of plate {id} holds tube {barcode}, but the file names tube {sample} there"
                        ));
                        continue;
                    }
                    with_result.insert(*well);
                    on_tubes += 1;
                    imported.candidates.push(crate::review::candidate_for_well(
                        lab,
                        plate,
                        *well,
                        barcode,
                        call,
                        validity,
                        &provenance,
                    )?);
                    imported.results.push(ImportedResult {
                        tube: barcode.to_string(),
                        plate: id.clone(),
                        well: well.to_string(),
                        kit: call.kit.to_string(),
                        call: call.call.to_string(),
                        action: call.action.clone(),
                        reason: call.reason.clone(),
                        plate_valid: validity.is_valid(),
                        qc_holds: call
                            .qc_holds
                            .iter()
                            .map(|h| format!("{}: {}", h.target, snake(&h.flag)))
                            .collect(),
                        targets: call
                            .targets
                            .iter()
                            .map(|t| ImportedTarget {
                                target: t.target.clone(),
                                channel: t.channel.clone(),
                                ct: t.ct.value(),
                                state: snake(&t.state),
                            })
                            .collect(),
                        source: source.clone(),
                    });
                }
                Some(WellContent::Control { control }) => {
                    imported.unmatched.push(UnmatchedWell {
                        plate: id.clone(),
                        well: well.to_string(),
                        sample,
                        call: Some(call.call.to_string()),
                        reason: format!("a {control} well on the plate"),
                    });
                }
                None => imported.unmatched.push(UnmatchedWell {
                    plate: id.clone(),
                    well: well.to_string(),
                    sample,
                    call: Some(call.call.to_string()),
                    reason: format!("no tube in well {well} of plate {id}"),
                }),
            }
        }
        for (well, sample, reason) in &judged.unjudged {
            imported.unmatched.push(UnmatchedWell {
                plate: id.clone(),
                well: well.to_string(),
                sample: sample.clone(),
                call: None,
                reason: reason.clone(),
            });
            with_result.insert(*well);
        }
        for (well, barcode) in plate.layout.samples() {
            if !with_result.contains(&well) {
                imported.missing.push(format!("{barcode} ({well})"));
            }
        }
        imported.tubes += on_tubes;
        parts.push(format!(
            "{on_tubes} result(s) on the tubes of plate {id} (kit {}, run controls {})",
            judged.judgement.kit,
            if validity.is_valid() {
                "passed".to_owned()
            } else {
                format!("failed: {}", validity.reason().unwrap_or_default())
            }
        ));
        imported.plates.push(id);
    }
    if !problems.is_empty() {
        return Err(refused(format!(
            "{} well(s) disagree with the plate; nothing was imported: {}",
            problems.len(),
            problems.join("; ")
        )));
    }
    let mut summary = parts.join("; ");
    if !imported.unmatched.is_empty() {
        summary.push_str(&format!(
            "; {} well(s) not on a tube (listed as unmatched)",
            imported.unmatched.len()
        ));
    }
    imported.summary = summary;
    Ok(imported)
}

/// A serde enum's snake_case name.
fn snake<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn judge_quantstudio(
    lab: &Lab,
    config: &FolderConfig,
    file: &str,
    results: &ResultsFile,
) -> Result<Judged, ImportError> {
    let meta = |key: &str| {
        results
            .metadata
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let plate = resolve_plate(
        lab,
        &[
            ("Experiment Barcode", meta("Experiment Barcode")),
            ("Experiment Name", meta("Experiment Name")),
            ("file name", file_stem(file)),
        ],
    )?;
    let kit = plate_kit(lab, config, &plate)?;
    check_format(&plate, results.format)?;
    let mut wells: BTreeMap<Well, BTreeMap<String, Reading>> = BTreeMap::new();
    let mut samples = BTreeMap::new();
    let mut omitted = BTreeMap::new();
    let mut problems = Vec::new();
    for row in &results.rows {
        samples.insert(row.well, row.sample.clone());
        if row.omitted == Some(true) {
            omitted.insert(row.well, row.sample.clone());
            continue;
        }
        let Some(target) = kit_target(kit, &row.target, &row.reporter) else {
            problems.push(format!(
                "well {}: target {:?} (reporter {}) is not a target of kit {} (its targets: {})",
                row.well,
                row.target,
                row.reporter,
                kit.key(),
                kit.targets()
                    .iter()
                    .map(|t| format!("{} ({})", t.name, t.channel))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            continue;
        };
        let readings = wells.entry(row.well).or_default();
        if readings
            .insert(target.name.clone(), Reading::from(row.ct))
            .is_some()
        {
            problems.push(format!(
                "well {}: two rows read kit target {}",
                row.well, target.name
            ));
        }
    }
    if !problems.is_empty() {
        return Err(refused(format!(
            "{} problem(s); nothing was imported: {}",
            problems.len(),
            problems.join("; ")
        )));
    }
    for well in omitted.keys() {
        wells.remove(well);
    }
    let judgement = kit
        .judge_plate(plate.format, &wells)
        .map_err(|e| refused(format!("plate {}: {e}", plate.id)))?;
    let unjudged = omitted
        .into_iter()
        .map(|(well, sample)| {
            (
                well,
                sample,
                "omitted in the instrument's software".to_owned(),
            )
        })
        .collect();
    Ok(Judged {
        plate,
        judgement,
        samples,
        unjudged,
    })
}

fn judge_rdml(
    lab: &Lab,
    config: &FolderConfig,
    file: &str,
    bytes: &[u8],
) -> Result<Vec<Judged>, ImportError> {
    let doc = rdml::read(bytes).map_err(|e| refused(format!("not a readable RDML file: {e}")))?;
    let mut out: Vec<Judged> = Vec::new();
    for experiment in &doc.experiments {
        for run in &experiment.runs {
            let plate = resolve_plate(
                lab,
                &[
                    ("run id", run.id.clone()),
                    ("experiment id", experiment.id.clone()),
                    ("file name", file_stem(file)),
                ],
            )?;
            if out.iter().any(|j| j.plate.id == plate.id) {
                return Err(refused(format!(
                    "two runs of the file are for plate {}; import one run per plate",
                    plate.id
                )));
            }
            let kit = plate_kit(lab, config, &plate)?;
            let format = match (run.format.rows, run.format.columns) {
                (8, 12) => PlateFormat::Wells96,
                (16, 24) => PlateFormat::Wells384,
                (rows, columns) => {
                    return Err(refused(format!(
                        "run {:?}: a {rows} x {columns} plate is neither 96 nor 384 wells",
                        run.id
                    )));
                }
            };
            check_format(&plate, format)?;
            let settings = RunSettings::default().with_kit(kit, &doc);
            let records = analyze_run(&doc, run, &settings);
            let mut foreign: Vec<String> = records
                .iter()
                .filter(|r| kit_target(kit, &r.target, &r.dye).is_none())
                .map(|r| format!("{} ({})", r.target, r.dye))
                .collect();
            foreign.sort();
            foreign.dedup();
            if !foreign.is_empty() {
                return Err(refused(format!(
                    "run {:?}: target(s) {} are not targets of kit {}",
                    run.id,
                    foreign.join(", "),
                    kit.key()
                )));
            }
            let judged = judge_run(kit, run, &records).map_err(|e| refused(e.to_string()))?;
            let mut samples = BTreeMap::new();
            for record in &records {
                if let Ok(well) = Well::parse_in(&record.well, format) {
                    samples.insert(well, record.sample.clone());
                }
            }
            let unjudged = judged
                .unjudged
                .iter()
                .filter_map(|u| {
                    Well::parse_in(&u.well, format)
                        .ok()
                        .map(|w| (w, u.sample.clone(), u.reason.clone()))
                })
                .collect();
            out.push(Judged {
                plate,
                judgement: judged.plate,
                samples,
                unjudged,
            });
        }
    }
    if out.is_empty() {
        return Err(refused("the RDML file has no run"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names_are_skipped() {
        for name in [
            ".hidden.csv",
            "~lock.csv",
            "a.tmp",
            "a.CSV.part",
            "x.csv.error.txt",
        ] {
            assert!(is_temporary(name), "{name}");
        }
        for name in ["plate.csv", "run.rdml", "tmp.csv"] {
            assert!(!is_temporary(name), "{name}");
        }
    }

    #[test]
    fn every_config_problem_is_reported_at_once() {
        let raw: Vec<RawFolder> = toml::from_str::<HashMap<String, Vec<RawFolder>>>(
            r#"
            [[folders]]
            name = ""
            path = "a"
            kind = "plates"
            format = "xls"
            poll_ms = 1
            done = "../x"
            [[folders]]
            name = "qs"
            path = "a"
            kind = "plate_map"
            kit = "k"
            format = "rdml"
            done = "same"
            failed = "same"
            "#,
        )
        .unwrap()
        .remove("folders")
        .unwrap();
        let mut problems = Vec::new();
        let out = parse_folders(raw, Path::new("/x"), &mut problems);
        assert!(out.is_empty());
        let all = problems.join("\n");
        for needle in [
            "name must not be empty",
            "kind \"plates\"",
            "needs kit",
            "format \"xls\"",
            "poll_ms 1",
            "done \"../x\"",
            "watched by another folder",
            "format applies to results folders",
            "done and failed must be different",
        ] {
            assert!(all.contains(needle), "{needle} missing from:\n{all}");
        }
    }

    #[test]
    fn moves_keep_an_existing_file_and_write_the_sidecar() {
        let dir = tempfile::tempdir().unwrap();
        let done = dir.path().join("done");
        std::fs::create_dir_all(&done).unwrap();
        std::fs::write(done.join("a.csv"), "old").unwrap();
        std::fs::write(dir.path().join("a.csv"), "new").unwrap();
        let to = move_into(dir.path(), OsStr::new("a.csv"), &done, Some("why")).unwrap();
        assert_eq!(to, done.join("a-2.csv"));
        assert_eq!(std::fs::read_to_string(done.join("a.csv")).unwrap(), "old");
        assert_eq!(std::fs::read_to_string(&to).unwrap(), "new");
        assert_eq!(
            std::fs::read_to_string(done.join("a-2.csv.error.txt")).unwrap(),
            "why"
        );
        assert!(!dir.path().join("a.csv").exists());
    }

    #[test]
    fn records_round_trip_and_stay_small() {
        let event = ImportEvent {
            folder: "qs".into(),
            file: "f.csv".into(),
            fingerprint: "ab".repeat(32),
            at: Timestamp::from_millis(1),
            outcome: Outcome::Imported,
            detail: "x".repeat(MAX_DETAIL),
            plates: vec!["P".into()],
            tubes: 384,
            unmatched: (0..MAX_LISTED)
                .map(|i| UnmatchedWell {
                    plate: "PLATE-000000001".into(),
                    well: "P24".into(),
                    sample: format!("SAMPLE-NAME-{i:020}"),
                    call: Some("not_detected".into()),
                    reason: "no tube in well P24 of plate PLATE-000000001".into(),
                })
                .collect(),
            missing: (0..MAX_LISTED)
                .map(|i| format!("COV-2026-{i:012} (P24)"))
                .collect(),
        };
        let bytes = encode(&event);
        assert!(bytes.len() < 64 * 1024, "{}", bytes.len());
        assert_eq!(decode::<ImportEvent>(b"k", &bytes).unwrap(), event);
    }

    fn open_lab(dir: &Path) -> Arc<Lab> {
        let store = crate::store::Store::open(&crate::store::StoreOptions {
            path: dir.join("store"),
            cache_bytes: 1024 * 1024,
        })
        .unwrap();
        Lab::open(store, KitRegistry::load(None).unwrap(), "LAB".into()).unwrap()
    }

    fn tech() -> Actor {
        Actor {
            user: "t".into(),
            reason: None,
        }
    }

    fn folder_config(kind: FolderKind, kit: &str) -> FolderConfig {
        FolderConfig {
            name: "f".into(),
            path: PathBuf::from("/nonexistent"),
            kind,
            kit: kit.into(),
            format: ResultsFormat::Auto,
            plate_format: None,
            poll: Duration::from_millis(50),
            settle: Duration::ZERO,
            done: "done".into(),
            failed: "failed".into(),
            hold_before_move: Duration::ZERO,
        }
    }

    #[tokio::test]
    async fn a_map_applied_twice_changes_nothing_the_second_time() {
        let dir = tempfile::tempdir().unwrap();
        let lab = open_lab(dir.path());
        let tubes = ["TWO-0001", "TWO-0002"].map(|b| crate::lab::TubeIntake {
            barcode: b.into(),
            pool_size: None,
            priority: None,
            due: None,
        });
        lab.receive_tubes(tech(), tubes.to_vec()).await.unwrap();
        let config = folder_config(FolderKind::PlateMap, "sarscov2-orf1ab-n-ic");
        let map = b"Plate,Well,Tube\nEXT-TWO,A1,TWO-0001\nEXT-TWO,B1,TWO-0002\n";
        let first = import_plate_map(&lab, &config, map).await.unwrap();
        assert_eq!(first.tubes, 2);
        assert!(
            first.summary.starts_with("created plate EXT-TWO"),
            "{}",
            first.summary
        );
        let entries = lab.verify_audit().unwrap().entries;
        // As after a crash between the lab's commit and the import record.
        let second = import_plate_map(&lab, &config, map).await.unwrap();
        assert_eq!(second.tubes, 0);
        assert!(
            second.summary.contains("2 already in place"),
            "{}",
            second.summary
        );
        assert_eq!(lab.verify_audit().unwrap().entries, entries, "no change");
    }

    #[tokio::test]
    async fn results_for_a_plate_of_another_kit_or_with_omitted_wells() {
        let dir = tempfile::tempdir().unwrap();
        let lab = open_lab(dir.path());
        lab.receive_tubes(
            tech(),
            vec![crate::lab::TubeIntake {
                barcode: "OMIT-0001".into(),
                pool_size: None,
                priority: None,
                due: None,
            }],
        )
        .await
        .unwrap();
        lab.create_plate(
            tech(),
            "sarscov2-orf1ab-n-ic".into(),
            None,
            Some("PCR-OMIT".into()),
        )
        .await
        .unwrap();
        lab.assign(
            tech(),
            "PCR-OMIT".into(),
            Vec::new(),
            vec![("A1".into(), "OMIT-0001".into())],
        )
        .await
        .unwrap();
        let mut csv = String::from(
            "* Experiment Barcode = PCR-OMIT\n[Results]\nWell Position,Omit,Sample Name,Target Name,Reporter,CT\n",
        );
        for (well, omit, ct) in [
            ("A1", "true", "25.0"),
            ("G12", "false", "Undetermined"),
            ("H12", "false", "28.0"),
        ] {
            for (target, dye) in [("ORF1ab", "FAM"), ("N", "VIC"), ("IC", "CY5")] {
                csv.push_str(&format!("{well},{omit},S,{target},{dye},{ct}\n"));
            }
        }
        let config = folder_config(FolderKind::Results, "sarscov2-orf1ab-n-ic");
        let imported = import_results(&lab, &config, "x.csv", "fp", csv.as_bytes()).unwrap();
        assert!(imported.results.is_empty(), "an omitted well gets no call");
        assert_eq!(imported.unmatched.len(), 1);
        assert_eq!(imported.unmatched[0].well, "A1");
        assert!(imported.unmatched[0].reason.contains("omitted"));

        let other = folder_config(FolderKind::Results, "cdc-n1-n2-rp");
        let err = import_results(&lab, &other, "x.csv", "fp", csv.as_bytes()).unwrap_err();
        assert!(
            err.to_string()
                .contains("was set up for kit sarscov2-orf1ab-n-ic"),
            "{err}"
        );
        let err = import_results(&lab, &config, "x.xlsx", "fp", csv.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("extension \"xlsx\""), "{err}");
    }
}
