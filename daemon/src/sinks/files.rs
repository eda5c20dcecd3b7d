//! The batch-file sink: each batch becomes files in an export folder that the central
//! system collects.
//!
//! Per batch, named after its seq range `pcrd-<first>-<last>` (20-digit, zero-padded,
//! so names sort in release order):
//! - `<name>.csv`: one row per tube × target (long format, see docs/outbox.md);
//! - `<name>.ndjson` when `ndjson = true`: one [`ResultRecord`] JSON per line;
//! - `<name>.manifest.json`: the count, the idempotency keys, and each data file's
//!   size and SHA-256, written last: a batch is complete when its manifest exists.
//!
//! Each file is written atomically: a temporary file (`.` prefix, `.tmp` suffix,
//! which collectors ignore), fsync, rename, fsync of the directory. A crash before the
//! cursor is durable re-delivers the batch; with the same range it has the same name
//! and replaces the files with the same bytes; after more releases the range can be
//! longer, and a collector sees some results twice, always with the same idempotency
//! key.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use pcrd_protocol::upstream::ResultRecord;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{ItemOutcome, OutboxItem, all_retry};

/// `[sinks.files]` as written in the config file.
#[derive(Debug, Default, Deserialize)]
pub struct RawFilesConfig {
    /// The export folder; relative to the config file's directory.
    pub dir: Option<PathBuf>,
    /// Also write an NDJSON file per batch.
    #[serde(default)]
    pub ndjson: bool,
}

/// A validated `[sinks.files]`.
#[derive(Clone, Debug)]
pub struct FilesConfig {
    pub dir: PathBuf,
    pub ndjson: bool,
}

impl FilesConfig {
    /// Validates the raw config; relative paths resolve against `base`, `env` reads
    /// environment variables (secrets). Returns every problem at once.
    pub fn from_raw(
        raw: RawFilesConfig,
        base: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<FilesConfig, Vec<String>> {
        let _ = env;
        match raw.dir {
            Some(dir) if !dir.as_os_str().is_empty() => Ok(FilesConfig {
                dir: base.join(dir),
                ndjson: raw.ndjson,
            }),
            _ => Err(vec!["files.dir is required (the export folder)".into()]),
        }
    }
}

/// The CSV header; one row per tube × target.
pub const CSV_HEADER: &str = "idempotency_key,result_id,version,status,correction_reason,tube,pool_size,plate,well,run,instrument,kit_id,kit_version,interpretation,tested_at,released_at,released_by,lab_id,target,dye,loinc,ct,call";

#[derive(Debug)]
pub struct FilesSink {
    config: FilesConfig,
}

impl FilesSink {
    pub fn new(config: &FilesConfig) -> Result<FilesSink, String> {
        Ok(FilesSink {
            config: config.clone(),
        })
    }

    pub async fn deliver(&mut self, items: &[OutboxItem]) -> Vec<ItemOutcome> {
        if items.is_empty() {
            return Vec::new();
        }
        let config = self.config.clone();
        let records: Vec<(u64, ResultRecord)> =
            items.iter().map(|i| (i.seq, i.record.clone())).collect();
        let outcome = tokio::task::spawn_blocking(move || write_batch(&config, &records)).await;
        match outcome {
            Ok(Ok(_)) => vec![ItemOutcome::Delivered; items.len()],
            Ok(Err(e)) => all_retry(items, &e, None),
            Err(e) => all_retry(items, &format!("writer task failed: {e}"), None),
        }
    }
}

/// The base name of a batch's files.
pub fn batch_name(first_seq: u64, last_seq: u64) -> String {
    format!("pcrd-{first_seq:020}-{last_seq:020}")
}

/// Writes one batch's files into the export folder; returns the manifest's path.
pub fn write_batch(
    config: &FilesConfig,
    records: &[(u64, ResultRecord)],
) -> Result<PathBuf, String> {
    let (Some((first, _)), Some((last, _))) = (records.first(), records.last()) else {
        return Err("empty batch".into());
    };
    let dir = &config.dir;
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create the export folder {}: {e}", dir.display()))?;
    let name = batch_name(*first, *last);
    let mut files = Vec::new();
    let csv = csv_rows(records.iter().map(|(_, r)| r));
    files.push(write_atomically(
        dir,
        &format!("{name}.csv"),
        csv.as_bytes(),
    )?);
    if config.ndjson {
        let mut ndjson = String::new();
        for (_, record) in records {
            let line = serde_json::to_string(record).map_err(|e| format!("JSON: {e}"))?;
            ndjson.push_str(&line);
            ndjson.push('\n');
        }
        files.push(write_atomically(
            dir,
            &format!("{name}.ndjson"),
            ndjson.as_bytes(),
        )?);
    }
    let manifest = serde_json::json!({
        "batch": name,
        "first_seq": first,
        "last_seq": last,
        "count": records.len(),
        "idempotency_keys": records.iter().map(|(_, r)| r.idempotency_key()).collect::<Vec<_>>(),
        "files": files.iter().map(|(file, bytes, sha)| serde_json::json!({
            "name": file, "bytes": bytes, "sha256": sha,
        })).collect::<Vec<_>>(),
    });
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| format!("JSON: {e}"))?;
    write_atomically(dir, &format!("{name}.manifest.json"), text.as_bytes())?;
    Ok(dir.join(format!("{name}.manifest.json")))
}

/// Writes `bytes` to `dir/name` via a temporary file, fsync, rename and a directory
/// fsync; returns (name, length, SHA-256 hex).
fn write_atomically(
    dir: &Path,
    name: &str,
    bytes: &[u8],
) -> Result<(String, usize, String), String> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let target = dir.join(name);
    let fail = |what: &str, e: std::io::Error| format!("{what} {}: {e}", tmp.display());
    let mut file = File::create(&tmp).map_err(|e| fail("cannot create", e))?;
    file.write_all(bytes).map_err(|e| fail("cannot write", e))?;
    file.sync_all().map_err(|e| fail("cannot fsync", e))?;
    drop(file);
    std::fs::rename(&tmp, &target).map_err(|e| fail("cannot rename", e))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("cannot fsync the export folder {}: {e}", dir.display()))?;
    Ok((
        name.to_string(),
        bytes.len(),
        hex::encode(Sha256::digest(bytes)),
    ))
}

/// The CSV text (header included) for `records`: one row per tube × target, a tube
/// without targets as one row with the target columns empty. RFC 4180 quoting.
pub fn csv_rows<'a>(records: impl Iterator<Item = &'a ResultRecord>) -> String {
    let mut out = String::with_capacity(4096);
    out.push_str(CSV_HEADER);
    out.push_str("\r\n");
    for r in records {
        let common = [
            r.idempotency_key(),
            r.result_id.clone(),
            r.version.to_string(),
            r.status.as_str().to_string(),
            r.correction_reason.clone().unwrap_or_default(),
            r.tube.clone(),
            r.pool_size.to_string(),
            r.plate.clone(),
            r.well.clone(),
            r.run.clone(),
            r.instrument.clone(),
            r.kit.id.clone(),
            r.kit.version.clone(),
            r.interpretation.as_str().to_string(),
            r.tested_at.clone(),
            r.released_at.clone(),
            r.released_by.clone(),
            r.lab_id.clone(),
        ];
        let mut row = |target: [String; 5]| {
            for (i, field) in common.iter().chain(target.iter()).enumerate() {
                if i > 0 {
                    out.push(',');
                }
                push_field(&mut out, field);
            }
            out.push_str("\r\n");
        };
        if r.targets.is_empty() {
            row(Default::default());
        }
        for t in &r.targets {
            row([
                t.name.clone(),
                t.dye.clone(),
                t.loinc.clone().unwrap_or_default(),
                t.ct.map(|ct| format!("{ct:.2}")).unwrap_or_default(),
                serde_json::to_value(t.call)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
            ]);
        }
    }
    out
}

/// RFC 4180: a field with a separator, a quote or a line break is quoted, quotes
/// doubled.
fn push_field(out: &mut String, field: &str) {
    if field.contains([',', '"', '\r', '\n']) {
        out.push('"');
        out.push_str(&field.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(field);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcrd_protocol::upstream::{Interpretation, KitRef, ResultStatus, TargetCall, TargetResult};

    fn record() -> ResultRecord {
        ResultRecord {
            schema_version: 1,
            result_id: "LAB-R1-A1-T1".into(),
            version: 2,
            tube: "T0001".into(),
            pool_size: 5,
            plate: "P1".into(),
            well: "A1".into(),
            run: "R1".into(),
            instrument: "c1".into(),
            kit: KitRef {
                id: "k".into(),
                version: "1".into(),
            },
            targets: vec![
                TargetResult {
                    name: "N1".into(),
                    dye: "FAM".into(),
                    loinc: Some("94759-8".into()),
                    ct: Some(24.3),
                    call: TargetCall::Detected,
                },
                TargetResult {
                    name: "RP".into(),
                    dye: "Cy5".into(),
                    loinc: None,
                    ct: None,
                    call: TargetCall::NotDetected,
                },
            ],
            interpretation: Interpretation::Positive,
            status: ResultStatus::Corrected,
            correction_reason: Some("well swap, \"A1\"\nfixed".into()),
            tested_at: "2026-11-27T06:00:00.000Z".into(),
            released_at: "2026-11-27T06:10:00.000Z".into(),
            released_by: "rob".into(),
            lab_id: "LAB".into(),
        }
    }

    #[test]
    fn csv_has_a_row_per_target_and_quotes_what_needs_it() {
        let text = csv_rows([record()].iter());
        let mut reader = csv::ReaderBuilder::new().from_reader(text.as_bytes());
        let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
        assert_eq!(header.join(","), CSV_HEADER);
        let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
        assert_eq!(rows.len(), 2);
        assert_eq!(&rows[0][0], "LAB-R1-A1-T1:2");
        assert_eq!(&rows[0][4], "well swap, \"A1\"\nfixed");
        assert_eq!(
            (&rows[0][18], &rows[0][21], &rows[0][22]),
            ("N1", "24.30", "detected")
        );
        assert_eq!(
            (&rows[1][18], &rows[1][21], &rows[1][22]),
            ("RP", "", "not_detected")
        );
    }

    #[test]
    fn a_batch_is_data_files_then_a_manifest_with_their_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let config = FilesConfig {
            dir: dir.path().join("export"),
            ndjson: true,
        };
        let manifest = write_batch(&config, &[(7, record()), (9, record())]).unwrap();
        assert!(manifest.ends_with("pcrd-00000000000000000007-00000000000000000009.manifest.json"));
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
        assert_eq!(m["count"], 2);
        for file in m["files"].as_array().unwrap() {
            let bytes = std::fs::read(config.dir.join(file["name"].as_str().unwrap())).unwrap();
            assert_eq!(file["sha256"], hex::encode(Sha256::digest(&bytes)));
        }
        assert_eq!(m["files"].as_array().unwrap().len(), 2);
        let names: Vec<String> = std::fs::read_dir(&config.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
        assert!(
            FilesConfig::from_raw(RawFilesConfig::default(), Path::new("/"), &|_| None)
                .unwrap_err()[0]
                .contains("dir")
        );
    }
}
