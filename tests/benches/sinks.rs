//! PostgreSQL and HTTP sink throughput on loopback (issue 6, "Speed"), each beside the
//! naive path measured in the same run on the same server.
//!
//! Figures (results per second, median of `PCRD_BENCH_RUNS` runs):
//! - `sinks.postgres_batches`: `PostgresSink::deliver` with outbox batches of
//!   `PCRD_BENCH_BATCH` (1,000) into a throwaway PostgreSQL server on 127.0.0.1
//!   (tests/src/postgres.rs; `fsync` and `synchronous_commit` on, checked), the
//!   exchange table emptied before each run: binary COPY straight into the table +
//!   COMMIT per batch (the fast path);
//! - `sinks.postgres_replay`: the same results delivered again (all duplicates, what a
//!   crash before the cursor moved costs: a refused COPY, then staging + INSERT ... ON
//!   CONFLICT DO NOTHING);
//! - `sinks.postgres_variant_*`: one session; `staging_path`, the same table behind a
//!   view, so every batch takes the staging path (the sink's design before the fast
//!   path; `sinks.postgres_fast_over_staging` is the ratio within each run); a `jsonb`
//!   table; a table without the tube index; one without the `record` column (every
//!   field has its own column; the operator may drop it); one without either;
//!   batches of 500 (the daemon's default
//!   `batch_size` for the other sinks) and of the PostgreSQL sink's default
//!   (`DEFAULT_BATCH_SIZE`, 5,000: `sinks.postgres_default_batch`, the figure the goal
//!   is checked on, with its ratio to psql's `\copy` within each run); each with the
//!   server's CPU per result;
//! - `sinks.postgres_psql_copy`: an independent peer for the ceiling: psql's `\copy`
//!   of the same results as 21 typed columns straight into an empty table of the same
//!   shape (one transaction, no staging, no conflict check), timed around the psql
//!   process; `sinks.postgres_share_of_copy` is the sink's rate over it (the median of
//!   the ratios within each run);
//! - `sinks.postgres_row_inserts`: the naive path, one `INSERT` of one row per
//!   transaction (a prepared statement, autocommit) with tokio-postgres into a table of
//!   the same shape on the same server;
//! - `sinks.http_batches`: `HttpSink::deliver` with batches of `PCRD_BENCH_BATCH` to an
//!   axum receiver on 127.0.0.1 in this process that parses every record
//!   (`ResultRecord`) and keeps its key in a set;
//! - `sinks.http_one_per_result`: the same sink and receiver, one result per request
//!   (keep-alive connection).
//!
//! Run with `cargo bench -p pcrd-tests --bench sinks` (needs the PostgreSQL server
//! binaries, which `scripts/test.sh` installs). Knobs: `PCRD_BENCH_RUNS` (3),
//! `PCRD_BENCH_RESULTS` (results per batched run, 100,000), `PCRD_BENCH_BATCH` (1,000),
//! `PCRD_BENCH_NAIVE` (results per naive run, 5,000).

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context as _, Result, ensure};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use pcrd::sinks::http::{HttpConfig, HttpSink, RawHttpConfig};
use pcrd::sinks::postgres::{
    DEFAULT_BATCH_SIZE, PostgresConfig, PostgresSink, RawPostgresConfig, TableName, schema_sql,
};
use pcrd::sinks::{ItemOutcome, OutboxItem};
use pcrd_protocol::upstream::{
    Interpretation, KitRef, RESULT_SCHEMA_VERSION, ResultRecord, ResultStatus, TargetCall,
    TargetResult,
};
use pcrd_tests::bench::{bench, goal, median};
use pcrd_tests::postgres::PgServer;

fn knob(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(v) => v.parse().with_context(|| format!("{name}={v:?}")),
        Err(_) => Ok(default),
    }
}

/// A result as the CDC kit gives it: four targets.
fn record(n: usize) -> ResultRecord {
    let target = |name: &str, dye: &str, loinc: Option<&str>, ct: Option<f64>| TargetResult {
        name: name.into(),
        dye: dye.into(),
        loinc: loinc.map(Into::into),
        ct,
        call: if ct.is_some() {
            TargetCall::Detected
        } else {
            TargetCall::NotDetected
        },
    };
    ResultRecord {
        schema_version: RESULT_SCHEMA_VERSION,
        result_id: format!("LAB1-R{:05}-{n:08}", n / 384),
        version: 1,
        tube: format!("T{n:09}"),
        pool_size: 5,
        plate: format!("P{:06}", n / 96),
        well: "H12".into(),
        run: format!("R{:05}", n / 384),
        instrument: "cycler-07".into(),
        kit: KitRef {
            id: "cdc-n1-n2-rp".into(),
            version: "1".into(),
        },
        targets: vec![
            target(
                "N1",
                "FAM",
                Some("94759-8"),
                n.is_multiple_of(10).then_some(27.41),
            ),
            target(
                "N2",
                "HEX",
                Some("94760-6"),
                n.is_multiple_of(10).then_some(28.02),
            ),
            target("RP", "CY5", None, Some(24.9)),
            target("IC", "ROX", None, Some(30.12)),
        ],
        interpretation: if n.is_multiple_of(10) {
            Interpretation::Positive
        } else {
            Interpretation::Negative
        },
        status: ResultStatus::Final,
        correction_reason: None,
        tested_at: "2026-11-27T06:00:00.000Z".into(),
        released_at: "2026-11-27T06:10:00.123Z".into(),
        released_by: "auto".into(),
        lab_id: "LAB1".into(),
    }
}

fn items(count: usize) -> Vec<OutboxItem> {
    (0..count)
        .map(|n| OutboxItem {
            seq: n as u64,
            record: record(n),
            attempt: 0,
        })
        .collect()
}

async fn deliver_all(
    deliver: &mut impl AsyncFnMut(&[OutboxItem]) -> Vec<ItemOutcome>,
    all: &[OutboxItem],
    batch: usize,
) -> Result<f64> {
    let started = Instant::now();
    for chunk in all.chunks(batch) {
        let outcomes = deliver(chunk).await;
        ensure!(
            outcomes.iter().all(|o| *o == ItemOutcome::Delivered),
            "not delivered: {:?}",
            outcomes.iter().find(|o| **o != ItemOutcome::Delivered)
        );
    }
    Ok(all.len() as f64 / started.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        println!(
            "sinks: skipped: this is a benchmark, not a test; run \
             `cargo bench -p pcrd-tests --bench sinks`"
        );
        return Ok(());
    }
    let runs = knob("PCRD_BENCH_RUNS", 3)?.max(1);
    let count = knob("PCRD_BENCH_RESULTS", 100_000)?;
    let batch = knob("PCRD_BENCH_BATCH", 1_000)?.max(1);
    let naive = knob("PCRD_BENCH_NAIVE", 5_000)?;
    let all = items(count);
    let few = &all[..naive.min(all.len())];
    println!("sinks: {runs} runs, {count} results in batches of {batch}, naive {naive}");

    postgres(runs, &all, few, batch).await?;
    http(runs, &all, few, batch).await?;
    Ok(())
}

async fn postgres(runs: usize, all: &[OutboxItem], few: &[OutboxItem], batch: usize) -> Result<()> {
    let server = PgServer::start();
    let db = server.create_database("exchange");
    let config = |table: &str, connections: usize| {
        PostgresConfig::from_raw(
            RawPostgresConfig {
                host: Some(server.host().into()),
                port: Some(server.port()),
                user: Some(server.user().into()),
                dbname: Some(db.clone()),
                table: Some(table.into()),
                connections: Some(connections),
                ..Default::default()
            },
            Path::new("."),
            &|_| None,
        )
        .map_err(|e| anyhow::anyhow!("{e:?}"))
    };
    // The goal is durable delivery: refuse to measure a server that does not fsync
    // its commits.
    for setting in ["fsync", "synchronous_commit"] {
        let value = server.psql(&db, &format!("SHOW {setting}"));
        ensure!(value.trim() == "on", "{setting} is {value:?}, not on");
    }
    // The sink's table, the naive peer's (the same shape, its own name), one with
    // targets and record as jsonb (the DDL before json, or an operator's choice), one
    // without the tube index, one without the record column, one without either.
    for table in [
        "pcrd_results",
        "naive_results",
        "jsonb_results",
        "unindexed_results",
        "recordless_results",
        "bare_results",
    ] {
        let table = TableName::parse(table).map_err(anyhow::Error::msg)?;
        server.psql(&db, &schema_sql(&table));
    }
    server.psql(
        &db,
        "DROP VIEW jsonb_results_targets; \
         ALTER TABLE jsonb_results ALTER targets TYPE jsonb, ALTER record TYPE jsonb; \
         DROP INDEX unindexed_results_tube; \
         ALTER TABLE recordless_results DROP COLUMN record; \
         ALTER TABLE bare_results DROP COLUMN record; DROP INDEX bare_results_tube",
    );
    // A view over the sink's table: the sink cannot COPY into a view, so every batch
    // takes the staging path (COPY into the temp table, INSERT ... ON CONFLICT DO
    // NOTHING), the sink's design before the fast path, side by side in the same run.
    server.psql(
        &db,
        "CREATE VIEW staged_results AS SELECT * FROM pcrd_results",
    );
    // (name, table written, table stored in, sessions, batch size)
    let variants = [
        ("two sessions", "pcrd_results", "pcrd_results", 2, batch),
        ("one session", "pcrd_results", "pcrd_results", 1, batch),
        ("staging path", "staged_results", "pcrd_results", 2, batch),
        ("jsonb table", "jsonb_results", "jsonb_results", 2, batch),
        (
            "no tube index",
            "unindexed_results",
            "unindexed_results",
            2,
            batch,
        ),
        (
            "no record column",
            "recordless_results",
            "recordless_results",
            2,
            batch,
        ),
        (
            "no record column nor tube index",
            "bare_results",
            "bare_results",
            2,
            batch,
        ),
        ("batch 500", "pcrd_results", "pcrd_results", 2, 500),
        (
            "default batch",
            "pcrd_results",
            "pcrd_results",
            2,
            DEFAULT_BATCH_SIZE as usize,
        ),
    ];
    let mut variant_rates: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut variant_server_cpu: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let (client, connection) =
        tokio_postgres::connect(&server.conninfo(&db), tokio_postgres::NoTls)
            .await
            .context("connect the naive client")?;
    tokio::spawn(connection);
    let backend: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await?
        .get(0);
    let postmaster = proc_stat(u32::try_from(backend)?)
        .context("read the backend's /proc stat")?
        .ppid;
    let tick = clock_tick_seconds();
    // CPU seconds per result of the server (postmaster, backends, WAL writer,
    // checkpointer) and of this process (the sink's encoding; psql as a reaped child).
    let cpu = || {
        (
            server_cpu_ticks(postmaster),
            proc_stat(std::process::id()).map_or(0, |s| s.all),
        )
    };
    let (mut server_cpu, mut client_cpu, mut previous_server_cpu, mut previous_client_cpu) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let insert = client
        .prepare(
            "INSERT INTO naive_results (result_id, version, idempotency_key, schema_version, \
             tube, pool_size, plate, well, run, instrument, kit_id, kit_version, \
             interpretation, status, correction_reason, tested_at, released_at, released_by, \
             lab_id, targets, record) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, \
             $12, $13, $14, $15, $16::text::timestamptz, $17::text::timestamptz, $18, $19, \
             $20::text::json, $21::text::json) ON CONFLICT (result_id, version) DO NOTHING",
        )
        .await?;

    // psql's \copy of the same results, as 21 typed columns, straight into an empty
    // table (no staging, no conflict check): PostgreSQL's own bulk path, the ceiling.
    let tsv_dir = tempfile::tempdir()?;
    let tsv = tsv_dir.path().join("results.tsv");
    std::fs::write(&tsv, copy_text(all)?)?;
    std::fs::set_permissions(
        tsv_dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    std::fs::set_permissions(&tsv, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    let psql_copy = format!(
        "\\copy naive_results ({COLUMN_LIST}) FROM '{}'",
        tsv.display()
    );
    // The sink's previous design, replayed by one psql session: per batch, text COPY of
    // key + record into a JSONB staging table and an INSERT taking every column from
    // the JSONB, ON CONFLICT DO NOTHING, COMMIT (commit 4296fb8).
    let mut previous_script = String::from(
        "CREATE TEMP TABLE previous_staging (idempotency_key text NOT NULL, r jsonb NOT NULL) \
         ON COMMIT DELETE ROWS;\n",
    );
    for (index, chunk) in all.chunks(batch).enumerate() {
        let path = tsv_dir.path().join(format!("previous-{index:05}.tsv"));
        let mut rows = String::new();
        for item in chunk {
            let json = serde_json::to_string(&item.record)?.replace('\\', "\\\\");
            rows.push_str(&format!("{}\t{json}\n", item.record.idempotency_key()));
        }
        std::fs::write(&path, rows)?;
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        previous_script.push_str(&format!(
            "BEGIN;\n\\copy previous_staging FROM '{}'\n{PREVIOUS_INSERT}\nCOMMIT;\n",
            path.display()
        ));
    }
    let previous_file = tsv_dir.path().join("previous.sql");
    std::fs::write(&previous_file, &previous_script)?;
    std::fs::set_permissions(
        &previous_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )?;
    let mut previous = Vec::new();

    let (mut batched, mut replay, mut rows, mut ceiling) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let mut rate = 0.0;
        let mut again = 0.0;
        let mut line = String::new();
        for (v, (name, table, stored_in, sessions, size)) in variants.iter().enumerate() {
            server.psql(&db, &format!("TRUNCATE {stored_in}; CHECKPOINT"));
            let mut sink =
                PostgresSink::new(&config(table, *sessions)?).map_err(anyhow::Error::msg)?;
            let mut deliver = async |items: &[OutboxItem]| sink.deliver(items).await;
            let (server_before, client_before) = cpu();
            let variant_rate = deliver_all(&mut deliver, all, *size).await?;
            let (server_after, client_after) = cpu();
            let per = tick / all.len() as f64 * 1e6;
            variant_server_cpu[v].push((server_after - server_before) as f64 * per);
            if v == 0 {
                server_cpu.push((server_after - server_before) as f64 * per);
                client_cpu.push((client_after - client_before) as f64 * per);
                rate = variant_rate;
                again = deliver_all(&mut deliver, all, *size).await?;
            }
            let stored: usize = server
                .psql(&db, &format!("SELECT count(*) FROM {stored_in}"))
                .trim()
                .parse()?;
            ensure!(
                stored == all.len(),
                "{name}: {stored} rows stored, {} sent",
                all.len()
            );
            variant_rates[v].push(variant_rate);
            line.push_str(&format!("{name} {variant_rate:.0}/s, "));
        }

        server.psql(&db, "TRUNCATE jsonb_results; CHECKPOINT");
        let (server_before, client_before) = cpu();
        let started = Instant::now();
        server.psql(&db, &format!("\\i {}", previous_file.display()));
        let previous_rate = all.len() as f64 / started.elapsed().as_secs_f64();
        // The psql session's backend has exited; the postmaster reaped it.
        std::thread::sleep(std::time::Duration::from_millis(200));
        let (server_after, client_after) = cpu();
        let per = tick / all.len() as f64 * 1e6;
        previous_server_cpu.push((server_after - server_before) as f64 * per);
        previous_client_cpu.push((client_after - client_before) as f64 * per);
        let stored: usize = server
            .psql(&db, "SELECT count(*) FROM jsonb_results")
            .trim()
            .parse()?;
        ensure!(stored == all.len(), "previous design: {stored} rows stored");
        previous.push(previous_rate);

        server.psql(&db, "TRUNCATE naive_results; CHECKPOINT");
        let started = Instant::now();
        server.psql(&db, &psql_copy);
        let copy_rate = all.len() as f64 / started.elapsed().as_secs_f64();
        server.psql(&db, "TRUNCATE naive_results");

        let started = Instant::now();
        for item in few {
            let r = &item.record;
            let version = i32::try_from(r.version)?;
            let schema = i32::try_from(r.schema_version)?;
            let pool = i16::from(r.pool_size);
            let targets = serde_json::to_string(&r.targets)?;
            let whole = serde_json::to_string(r)?;
            let key = r.idempotency_key();
            client
                .execute(
                    &insert,
                    &[
                        &r.result_id,
                        &version,
                        &key,
                        &schema,
                        &r.tube,
                        &pool,
                        &r.plate,
                        &r.well,
                        &r.run,
                        &r.instrument,
                        &r.kit.id,
                        &r.kit.version,
                        &r.interpretation.as_str(),
                        &r.status.as_str(),
                        &r.correction_reason,
                        &r.tested_at,
                        &r.released_at,
                        &r.released_by,
                        &r.lab_id,
                        &targets,
                        &whole,
                    ],
                )
                .await?;
        }
        let row_rate = few.len() as f64 / started.elapsed().as_secs_f64();
        println!(
            "  run {run} (load average {}): {line}replay {again:.0}/s, previous design \
             {previous_rate:.0}/s, psql \\copy {copy_rate:.0}/s, row inserts {row_rate:.0}/s",
            load.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        );
        ceiling.push(copy_rate);
        batched.push(rate);
        replay.push(again);
        rows.push(row_rate);
    }
    let (b, r) = (median(&batched), median(&rows));
    let c = median(&ceiling);
    println!(
        "{}",
        bench("sinks.postgres_psql_copy", c, "results/s", &ceiling)
    );
    // Ratios within each run (the same load on both sides), then their median.
    let share: Vec<f64> = batched.iter().zip(&ceiling).map(|(s, c)| s / c).collect();
    println!(
        "{}",
        bench("sinks.postgres_share_of_copy", median(&share), "x", &share)
    );
    println!(
        "{}",
        bench("sinks.postgres_batches", b, "results/s", &batched)
    );
    println!(
        "{}",
        bench(
            "sinks.postgres_replay",
            median(&replay),
            "results/s",
            &replay
        )
    );
    println!(
        "{}",
        bench("sinks.postgres_row_inserts", r, "results/s", &rows)
    );
    println!("{}", bench("sinks.postgres_ratio", b / r, "x", &[b / r]));
    for (id, values) in [
        ("sinks.postgres_server_cpu_us_per_result", &server_cpu),
        ("sinks.postgres_client_cpu_us_per_result", &client_cpu),
        (
            "sinks.postgres_previous_server_cpu_us_per_result",
            &previous_server_cpu,
        ),
        (
            "sinks.postgres_previous_psql_cpu_us_per_result",
            &previous_client_cpu,
        ),
    ] {
        println!("{}", bench(id, median(values), "us", values));
    }
    // On an idle machine with two cores: the server's and the sink's CPU per result
    // spread over both cores (two sessions) bounds the rate from above.
    let both = median(&server_cpu) + median(&client_cpu);
    println!(
        "{}",
        bench(
            "sinks.postgres_two_core_bound",
            2.0 / both * 1e6,
            "results/s",
            &[2.0 / both * 1e6]
        )
    );
    let p = median(&previous);
    println!(
        "{}",
        bench("sinks.postgres_previous_design", p, "results/s", &previous)
    );
    println!(
        "{}",
        bench("sinks.postgres_over_previous", b / p, "x", &[b / p])
    );
    for (((name, ..), rates), cpu) in variants
        .iter()
        .zip(&variant_rates)
        .zip(&variant_server_cpu)
        .skip(1)
    {
        let id = format!("sinks.postgres_variant_{}", name.replace(' ', "_"));
        println!("{}", bench(&id, median(rates), "results/s", rates));
        println!(
            "{}",
            bench(
                &format!("{id}_server_cpu_us_per_result"),
                median(cpu),
                "us",
                cpu
            )
        );
    }
    let over_staging: Vec<f64> = batched
        .iter()
        .zip(&variant_rates[2])
        .map(|(fast, staged)| fast / staged)
        .collect();
    println!(
        "{}",
        bench(
            "sinks.postgres_fast_over_staging",
            median(&over_staging),
            "x",
            &over_staging
        )
    );
    // The goal is for the sink as configured by default: batches of DEFAULT_BATCH_SIZE.
    let default_batch = &variant_rates[variants.len() - 1];
    let default_share: Vec<f64> = default_batch
        .iter()
        .zip(&ceiling)
        .map(|(s, c)| s / c)
        .collect();
    let d = median(default_batch);
    println!(
        "{}",
        bench(
            "sinks.postgres_default_batch",
            d,
            "results/s",
            default_batch
        )
    );
    println!(
        "{}",
        bench(
            "sinks.postgres_default_batch_share_of_copy",
            median(&default_share),
            "x",
            &default_share
        )
    );
    println!(
        "{}",
        goal("sinks.postgres_default_batch", d, ">", 100_000.0)
    );
    Ok(())
}

/// The previous design's INSERT: every column read from the staged JSONB record.
const PREVIOUS_INSERT: &str = "INSERT INTO jsonb_results (result_id, version, \
    idempotency_key, schema_version, tube, pool_size, plate, well, run, instrument, kit_id, \
    kit_version, interpretation, status, correction_reason, tested_at, released_at, \
    released_by, lab_id, targets, record) SELECT r ->> 'result_id', \
    (r ->> 'version')::integer, idempotency_key, (r ->> 'schema_version')::integer, \
    r ->> 'tube', (r ->> 'pool_size')::smallint, r ->> 'plate', r ->> 'well', r ->> 'run', \
    r ->> 'instrument', r -> 'kit' ->> 'id', r -> 'kit' ->> 'version', \
    r ->> 'interpretation', r ->> 'status', r ->> 'correction_reason', \
    (r ->> 'tested_at')::timestamptz, (r ->> 'released_at')::timestamptz, \
    r ->> 'released_by', r ->> 'lab_id', r -> 'targets', r FROM previous_staging \
    ON CONFLICT (result_id, version) DO NOTHING;";

/// What the benchmark reads from `/proc/<pid>/stat`.
struct ProcStat {
    ppid: u32,
    /// User + system time of the process and of its reaped children, in clock ticks.
    all: u64,
    /// User + system time of the process alone.
    own: u64,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after it do not.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    let own = field(14)? + field(15)?;
    Some(ProcStat {
        ppid: u32::try_from(field(4)?).ok()?,
        all: own + field(16)? + field(17)?,
        own,
    })
}

/// The postmaster's time with its reaped children, plus every live child's own.
fn server_cpu_ticks(postmaster: u32) -> u64 {
    let mut ticks = proc_stat(postmaster).map_or(0, |s| s.all);
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            if let Some(stat) = proc_stat(pid).filter(|s| s.ppid == postmaster) {
                ticks += stat.own;
            }
        }
    }
    ticks
}

fn clock_tick_seconds() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(0.01, |hz| 1.0 / hz)
}

const COLUMN_LIST: &str = "result_id, version, idempotency_key, schema_version, tube, \
    pool_size, plate, well, run, instrument, kit_id, kit_version, interpretation, status, \
    correction_reason, tested_at, released_at, released_by, lab_id, targets, record";

/// The results as `COPY` text rows of [`COLUMN_LIST`].
fn copy_text(items: &[OutboxItem]) -> Result<Vec<u8>> {
    fn field(out: &mut String, value: Option<&str>, last: bool) {
        match value {
            None => out.push_str("\\N"),
            Some(v) => {
                for c in v.chars() {
                    match c {
                        '\\' => out.push_str("\\\\"),
                        '\t' => out.push_str("\\t"),
                        '\n' => out.push_str("\\n"),
                        '\r' => out.push_str("\\r"),
                        c => out.push(c),
                    }
                }
            }
        }
        out.push(if last { '\n' } else { '\t' });
    }
    let mut out = String::new();
    for item in items {
        let r = &item.record;
        let targets = serde_json::to_string(&r.targets)?;
        let whole = serde_json::to_string(r)?;
        let fields: [Option<&str>; 21] = [
            Some(&r.result_id),
            Some(&r.version.to_string()),
            Some(&r.idempotency_key()),
            Some(&r.schema_version.to_string()),
            Some(&r.tube),
            Some(&r.pool_size.to_string()),
            Some(&r.plate),
            Some(&r.well),
            Some(&r.run),
            Some(&r.instrument),
            Some(&r.kit.id),
            Some(&r.kit.version),
            Some(r.interpretation.as_str()),
            Some(r.status.as_str()),
            r.correction_reason.as_deref(),
            Some(&r.tested_at),
            Some(&r.released_at),
            Some(&r.released_by),
            Some(&r.lab_id),
            Some(&targets),
            Some(&whole),
        ];
        for (i, value) in fields.iter().enumerate() {
            field(&mut out, *value, i == 20);
        }
    }
    Ok(out.into_bytes())
}

type Keys = Arc<Mutex<HashSet<String>>>;

/// The receiver: parse every record, remember its key.
async fn receive(State(keys): State<Keys>, body: Bytes) -> StatusCode {
    #[derive(serde::Deserialize)]
    struct Batch {
        results: Vec<ResultRecord>,
    }
    let Ok(batch) = serde_json::from_slice::<Batch>(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    let mut keys = keys.lock().unwrap_or_else(|p| p.into_inner());
    for r in batch.results {
        keys.insert(r.idempotency_key());
    }
    StatusCode::NO_CONTENT
}

async fn http(runs: usize, all: &[OutboxItem], few: &[OutboxItem], batch: usize) -> Result<()> {
    let keys = Keys::default();
    let app = Router::new()
        .route("/results", post(receive))
        .with_state(keys.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let config = |batch_size: usize| {
        HttpConfig::from_raw(
            RawHttpConfig {
                url: Some(format!("http://{addr}/results")),
                batch_size: Some(batch_size),
                ..Default::default()
            },
            Path::new("."),
            &|_| None,
        )
        .map_err(|e| anyhow::anyhow!("{e:?}"))
    };
    let (mut batched, mut single) = (Vec::new(), Vec::new());
    for run in 0..runs {
        keys.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let mut sink = HttpSink::new(&config(batch)?).map_err(anyhow::Error::msg)?;
        let mut deliver = async |items: &[OutboxItem]| sink.deliver(items).await;
        let rate = deliver_all(&mut deliver, all, batch).await?;
        let received = keys.lock().unwrap_or_else(|p| p.into_inner()).len();
        ensure!(
            received == all.len(),
            "{received} received, {} sent",
            all.len()
        );

        let mut one = HttpSink::new(&config(1)?).map_err(anyhow::Error::msg)?;
        let mut deliver_one = async |items: &[OutboxItem]| one.deliver(items).await;
        let one_rate = deliver_all(&mut deliver_one, few, 1).await?;
        println!("  run {run}: batches {rate:.0}/s, one per request {one_rate:.0}/s");
        batched.push(rate);
        single.push(one_rate);
    }
    server.abort();
    let (b, s) = (median(&batched), median(&single));
    println!("{}", bench("sinks.http_batches", b, "results/s", &batched));
    println!(
        "{}",
        bench("sinks.http_one_per_result", s, "results/s", &single)
    );
    println!("{}", bench("sinks.http_ratio", b / s, "x", &[b / s]));
    println!("{}", goal("sinks.http_batches", b, ">", 50_000.0));
    Ok(())
}
