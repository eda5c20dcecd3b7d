//! The PostgreSQL table-exchange sink: the central system reads released results
//! from a table in its own database.
//!
//! Each batch is one transaction: `COPY` (text format) into a session-local staging
//! table, then `INSERT INTO <table> SELECT ... FROM staging ON CONFLICT (result_id,
//! version) DO NOTHING`, then `COMMIT`. Only the commit counts as delivery (field notes
//! §3: "delivery done only on the system of record's word"). Re-sending a batch after
//! a crash adds nothing, because the exchange table's primary key is the record's
//! idempotency key; a correction is a new version and so a new row.
//!
//! Failures:
//! - the connection or the server is gone, a timeout, a serialization failure or
//!   deadlock: every item is retried, on a new connection;
//! - a value the table refuses (a data exception or a constraint of class 22/23): the
//!   batch is written again one item per transaction, so only the item the table
//!   refuses is dead-lettered;
//! - the table is missing or lacks columns (and `create_table` is off), or pcrd may not
//!   write it: every item is retried with a message naming the problem, so results
//!   wait, none is dead-lettered, until the operator fixes the table.
//!
//! What goes over the wire is text `COPY` of two columns, the idempotency key and the
//! record as JSON; the INSERT takes every other column from that JSON. Measured on the
//! loopback server (BENCHMARKS.md §8, field-notes-style psql runs of 100,000 rows):
//! PostgreSQL spends most of a batch parsing JSONB and timestamps, and sending the
//! targets as a second JSONB column beside the record parsed them twice (COPY of the
//! 21 typed columns into staging took 3.2 s, of key + record 1.1 s, the INSERT about
//! 1.5 s either way). Binary `COPY` would not help: JSONB's binary input is its text
//! form, parsed the same way.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use futures_util::SinkExt;
use pcrd_protocol::upstream::ResultRecord;
use serde::Deserialize;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

use super::{DeadReason, ItemOutcome, OutboxItem, all_retry};

/// The exchange table's name when the config names none.
pub const DEFAULT_TABLE: &str = "pcrd_results";

/// `[sinks.postgres]` as written in the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPostgresConfig {
    /// Host name, IP address, or a directory holding the server's Unix socket.
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub dbname: Option<String>,
    /// The environment variable holding the password (none: no password).
    pub password_env: Option<String>,
    /// The exchange table, optionally schema-qualified (`schema.table`).
    pub table: Option<String>,
    /// e.g. "10s".
    pub connect_timeout: Option<String>,
    /// Longest a statement may run on the server, e.g. "30s".
    pub statement_timeout: Option<String>,
    /// Create the exchange table (and its view) at first connect if it is missing.
    #[serde(default)]
    pub create_table: bool,
    /// Sessions writing parts of a large batch concurrently (1..=8, default 2).
    pub connections: Option<usize>,
}

/// A validated `[sinks.postgres]`.
#[derive(Clone)]
pub struct PostgresConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub dbname: String,
    password: Option<String>,
    pub table: TableName,
    pub connect_timeout: Duration,
    pub statement_timeout: Duration,
    pub create_table: bool,
    pub connections: usize,
}

impl std::fmt::Debug for PostgresConfig {
    // The password stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("dbname", &self.dbname)
            .field("password", &self.password.as_ref().map(|_| "<set>"))
            .field("table", &self.table.display())
            .field("connect_timeout", &self.connect_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("create_table", &self.create_table)
            .field("connections", &self.connections)
            .finish()
    }
}

impl PostgresConfig {
    /// Validates the raw config; relative paths resolve against `base`, `env` reads
    /// environment variables (secrets). Returns every problem at once.
    pub fn from_raw(
        raw: RawPostgresConfig,
        base: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<PostgresConfig, Vec<String>> {
        let _ = base;
        let mut problems = Vec::new();
        let table = match TableName::parse(raw.table.as_deref().unwrap_or(DEFAULT_TABLE)) {
            Ok(t) => Some(t),
            Err(e) => {
                problems.push(format!("sinks.postgres.table: {e}"));
                None
            }
        };
        let password = match &raw.password_env {
            None => None,
            Some(var) => match env(var) {
                Some(value) => Some(value),
                None => {
                    problems.push(format!(
                        "sinks.postgres.password_env: the environment variable {var} is not set"
                    ));
                    None
                }
            },
        };
        let mut duration = |field: &str, value: &Option<String>, default: Duration| match value {
            None => default,
            Some(text) => match humantime::parse_duration(text) {
                Ok(d) if !d.is_zero() => d,
                Ok(_) => {
                    problems.push(format!("sinks.postgres.{field}: must be more than 0"));
                    default
                }
                Err(e) => {
                    problems.push(format!(
                        "sinks.postgres.{field}: {text:?} is not a duration like \"10s\": {e}"
                    ));
                    default
                }
            },
        };
        let connect_timeout = duration(
            "connect_timeout",
            &raw.connect_timeout,
            Duration::from_secs(10),
        );
        let statement_timeout = duration(
            "statement_timeout",
            &raw.statement_timeout,
            Duration::from_secs(30),
        );
        let user = raw.user.unwrap_or_else(|| "pcrd".to_owned());
        if user.is_empty() {
            problems.push("sinks.postgres.user: must not be empty".to_owned());
        }
        let dbname = raw.dbname.unwrap_or_else(|| user.clone());
        let connections = raw.connections.unwrap_or(2);
        if !(1..=8).contains(&connections) {
            problems.push(format!(
                "sinks.postgres.connections: {connections} is not between 1 and 8"
            ));
        }
        match (problems.is_empty(), table) {
            (true, Some(table)) => Ok(PostgresConfig {
                host: raw.host.unwrap_or_else(|| "127.0.0.1".to_owned()),
                port: raw.port.unwrap_or(5432),
                user,
                dbname,
                password,
                table,
                connect_timeout,
                statement_timeout,
                create_table: raw.create_table,
                connections,
            }),
            _ => Err(problems),
        }
    }
}

/// A table name, optionally schema-qualified, checked to be a plain SQL identifier so
/// it can be quoted into statements safely.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableName {
    schema: Option<String>,
    name: String,
}

impl TableName {
    /// `name` or `schema.name`; each part starts with a letter or `_`, holds only ASCII
    /// letters, digits and `_`, and is at most 63 bytes (PostgreSQL's limit).
    pub fn parse(text: &str) -> Result<TableName, String> {
        let valid = |part: &str| {
            !part.is_empty()
                && part.len() <= 63
                && part
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        };
        let (schema, name) = match text.split_once('.') {
            Some((schema, name)) => (Some(schema), name),
            None => (None, text),
        };
        if !valid(name) || schema.is_some_and(|s| !valid(s)) {
            return Err(format!(
                "{text:?} is not a table name (letters, digits and _, optionally schema.table, \
                 at most 63 characters each)"
            ));
        }
        // The view's name appends "_targets" and must stay within 63 bytes too.
        if name.len() > 63 - "_targets".len() {
            return Err(format!("{text:?} is too long (at most 55 characters)"));
        }
        Ok(TableName {
            schema: schema.map(str::to_owned),
            name: name.to_owned(),
        })
    }

    /// As written in the config.
    pub fn display(&self) -> String {
        match &self.schema {
            Some(s) => format!("{s}.{}", self.name),
            None => self.name.clone(),
        }
    }

    /// Quoted for SQL, with `suffix` appended to the table's own name.
    fn quoted_with(&self, suffix: &str) -> String {
        match &self.schema {
            Some(s) => format!("\"{s}\".\"{}{suffix}\"", self.name),
            None => format!("\"{}{suffix}\"", self.name),
        }
    }

    fn quoted(&self) -> String {
        self.quoted_with("")
    }
}

/// The columns pcrd writes, in `COPY` order. The table may have more (with defaults).
const COLUMNS: [&str; 21] = [
    "result_id",
    "version",
    "idempotency_key",
    "schema_version",
    "tube",
    "pool_size",
    "plate",
    "well",
    "run",
    "instrument",
    "kit_id",
    "kit_version",
    "interpretation",
    "status",
    "correction_reason",
    "tested_at",
    "released_at",
    "released_by",
    "lab_id",
    "targets",
    "record",
];

/// How each of [`COLUMNS`] is read from a staging row `(idempotency_key, r)`, where
/// `r` is the record as JSONB: the record is parsed once, on its way into staging, and
/// every column is taken from it (PostgreSQL spends most of a batch parsing JSON, and
/// sending the fields and the targets beside the record would parse them twice).
const SELECT_FROM_STAGING: [&str; 21] = [
    "r ->> 'result_id'",
    "(r ->> 'version')::integer",
    "idempotency_key",
    "(r ->> 'schema_version')::integer",
    "r ->> 'tube'",
    "(r ->> 'pool_size')::smallint",
    "r ->> 'plate'",
    "r ->> 'well'",
    "r ->> 'run'",
    "r ->> 'instrument'",
    "r -> 'kit' ->> 'id'",
    "r -> 'kit' ->> 'version'",
    "r ->> 'interpretation'",
    "r ->> 'status'",
    "r ->> 'correction_reason'",
    "(r ->> 'tested_at')::timestamptz",
    "(r ->> 'released_at')::timestamptz",
    "r ->> 'released_by'",
    "r ->> 'lab_id'",
    "r -> 'targets'",
    "r",
];

/// The exchange table's DDL (`pcrd sink schema postgres`): the table, an index by tube
/// and a view with one row per target. Idempotent (`IF NOT EXISTS` / `OR REPLACE`).
///
/// Per-target rows are a view over the `targets` JSONB column rather than a child
/// table: a child table would multiply the rows written per result by the kit's
/// target count (4 for the CDC kit) for data the central system can read flat from the
/// view, and it could not be out of step with its parent.
pub fn schema_sql(table: &TableName) -> String {
    let t = table.quoted();
    let tube_index = format!("\"{}_tube\"", table.name);
    let view = table.quoted_with("_targets");
    format!(
        "-- pcrd result exchange table (result record schema v1). One row per result
-- version: a correction is a new row with a higher version, nothing is updated.
-- pcrd writes with INSERT ... ON CONFLICT (result_id, version) DO NOTHING.
CREATE TABLE IF NOT EXISTS {t} (
    result_id         text        NOT NULL,
    version           integer     NOT NULL CHECK (version >= 1),
    idempotency_key   text        NOT NULL,  -- result_id || ':' || version
    schema_version    integer     NOT NULL,
    tube              text        NOT NULL,  -- the tube's barcode; no personal data
    pool_size         smallint    NOT NULL,
    plate             text        NOT NULL,
    well              text        NOT NULL,
    run               text        NOT NULL,
    instrument        text        NOT NULL,
    kit_id            text        NOT NULL,
    kit_version       text        NOT NULL,
    interpretation    text        NOT NULL,  -- positive | negative | inconclusive | invalid
    status            text        NOT NULL,  -- preliminary | final | corrected
    correction_reason text,
    tested_at         timestamptz NOT NULL,
    released_at       timestamptz NOT NULL,
    released_by       text        NOT NULL,
    lab_id            text        NOT NULL,
    targets           jsonb       NOT NULL,  -- [{{name, dye, loinc, ct, call}}, ...]
    record            jsonb       NOT NULL,  -- the whole result record as sent
    received_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (result_id, version)
);
CREATE INDEX IF NOT EXISTS {tube_index} ON {t} (tube);
-- One row per target of each result version.
CREATE OR REPLACE VIEW {view} AS
SELECT r.result_id, r.version, r.tube, t.ordinality AS target_index,
       t.value ->> 'name' AS name, t.value ->> 'dye' AS dye,
       t.value ->> 'loinc' AS loinc, (t.value ->> 'ct')::double precision AS ct,
       t.value ->> 'call' AS call
FROM {t} r CROSS JOIN LATERAL jsonb_array_elements(r.targets) WITH ORDINALITY AS t(value, ordinality);
"
    )
}

/// Why writing a batch failed, sorted by what to do about it.
#[derive(Debug)]
enum WriteError {
    /// The table refused a value: find the item and dead-letter it.
    Data(String),
    /// Try again later; `reconnect` when the connection is unusable.
    Transient { reason: String, reconnect: bool },
}

fn classify(context: &str, error: &tokio_postgres::Error) -> WriteError {
    let text = match error.as_db_error() {
        Some(db) => format!("{context}: {} ({})", db.message(), db.code().code()),
        None => format!("{context}: {error}"),
    };
    let Some(code) = error.code() else {
        // No SQLSTATE: an I/O error or the connection closed.
        return WriteError::Transient {
            reason: text,
            reconnect: true,
        };
    };
    let class = &code.code()[..2];
    match class {
        // Data exception, integrity constraint violation: this data, not this moment.
        "22" | "23" => WriteError::Data(text),
        // Transaction rollback (serialization, deadlock) and statement timeout: the
        // connection is fine.
        "40" => WriteError::Transient {
            reason: text,
            reconnect: false,
        },
        _ if *code == SqlState::QUERY_CANCELED => WriteError::Transient {
            reason: text,
            reconnect: false,
        },
        // Undefined table/column, permissions, no unique constraint for ON CONFLICT:
        // the operator must fix the table. Reconnect so the columns are checked again.
        _ => WriteError::Transient {
            reason: text,
            reconnect: true,
        },
    }
}

/// The PostgreSQL sink: `connections` sessions ("lanes"), each opened at the first
/// delivery that needs it and again after it breaks. A large batch is cut into one
/// part per lane, written concurrently, each part in its own transaction: PostgreSQL
/// runs one backend per session, so a second session puts the server's second core to
/// work parsing JSON (where a batch spends most of its time).
#[derive(Debug)]
pub struct PostgresSink {
    shared: Shared,
    lanes: Vec<Lane>,
}

/// What every lane reads.
#[derive(Debug)]
struct Shared {
    config: PostgresConfig,
    copy_sql: String,
    insert_sql: String,
}

#[derive(Debug, Default)]
struct Lane {
    connection: Option<Connection>,
}

#[derive(Debug)]
struct Connection {
    client: Client,
}

/// A batch is cut into parts for several lanes only when each part gets this many.
const MIN_ITEMS_PER_LANE: usize = 250;

impl PostgresSink {
    pub fn new(config: &PostgresConfig) -> Result<PostgresSink, String> {
        Ok(PostgresSink {
            shared: Shared {
                config: config.clone(),
                copy_sql: "COPY pg_temp.pcrd_staging (idempotency_key, r) FROM STDIN".to_owned(),
                insert_sql: format!(
                    "INSERT INTO {} ({}) SELECT {} FROM pg_temp.pcrd_staging \
                     ON CONFLICT (result_id, version) DO NOTHING",
                    config.table.quoted(),
                    COLUMNS.join(", "),
                    SELECT_FROM_STAGING.join(", ")
                ),
            },
            lanes: (0..config.connections.max(1))
                .map(|_| Lane::default())
                .collect(),
        })
    }

    /// Delivers `items`; see the module documentation. Outcomes keep the outbox's
    /// order: once an item must be retried, every later item is reported for retry
    /// too, even one another lane committed (sending it again adds nothing).
    pub async fn deliver(&mut self, items: &[OutboxItem]) -> Vec<ItemOutcome> {
        if items.is_empty() {
            return Vec::new();
        }
        let lanes = (items.len() / MIN_ITEMS_PER_LANE).clamp(1, self.lanes.len());
        // Connect the lanes one after the other: concurrent CREATE TABLE IF NOT EXISTS
        // can collide in PostgreSQL's catalog.
        for lane in &mut self.lanes[..lanes] {
            if let Err(e) = lane.ensure_connected(&self.shared).await {
                let reason = match e {
                    WriteError::Data(reason) | WriteError::Transient { reason, .. } => reason,
                };
                return all_retry(items, &reason, None);
            }
        }
        let part = items.len().div_ceil(lanes);
        let shared = &self.shared;
        let writes = self.lanes[..lanes]
            .iter_mut()
            .zip(items.chunks(part))
            .map(|(lane, part)| lane.deliver(shared, part));
        let mut outcomes: Vec<ItemOutcome> = futures_util::future::join_all(writes)
            .await
            .into_iter()
            .flatten()
            .collect();
        if let Some(first) = outcomes
            .iter()
            .position(|o| matches!(o, ItemOutcome::Retry { .. }))
        {
            let retry = outcomes[first].clone();
            for later in &mut outcomes[first..] {
                if *later == ItemOutcome::Delivered {
                    *later = retry.clone();
                }
            }
        }
        outcomes
    }
}

impl Lane {
    async fn ensure_connected(&mut self, shared: &Shared) -> Result<(), WriteError> {
        if self
            .connection
            .as_ref()
            .is_none_or(|c| c.client.is_closed())
        {
            self.connection = None;
            let limit = shared.config.connect_timeout + shared.config.statement_timeout;
            match tokio::time::timeout(limit, shared.connect()).await {
                Ok(connection) => self.connection = Some(connection?),
                Err(_) => return Err(shared.no_answer(limit)),
            }
        }
        Ok(())
    }

    /// `items` in one transaction; when the table refuses a value, item by item.
    async fn deliver(&mut self, shared: &Shared, items: &[OutboxItem]) -> Vec<ItemOutcome> {
        // Items PostgreSQL text cannot hold are dead before anything is sent.
        if items.iter().any(|i| unencodable(&i.record).is_some()) {
            return self.deliver_one_by_one(shared, items).await;
        }
        match self.write(shared, items).await {
            Ok(()) => vec![ItemOutcome::Delivered; items.len()],
            Err(WriteError::Transient { reason, .. }) => all_retry(items, &reason, None),
            Err(WriteError::Data(reason)) => {
                tracing::warn!(sink = "postgres", %reason, items = items.len(),
                    "the exchange table refused a value; writing the batch item by item");
                self.deliver_one_by_one(shared, items).await
            }
        }
    }

    /// One transaction per item, to find the ones the table refuses. Stops at the
    /// first transient failure: the rest are retried.
    async fn deliver_one_by_one(
        &mut self,
        shared: &Shared,
        items: &[OutboxItem],
    ) -> Vec<ItemOutcome> {
        let mut outcomes = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            if let Some(detail) = unencodable(&item.record) {
                outcomes.push(ItemOutcome::Dead {
                    reason: DeadReason::Unencodable,
                    detail,
                });
                continue;
            }
            match self.write(shared, std::slice::from_ref(item)).await {
                Ok(()) => outcomes.push(ItemOutcome::Delivered),
                Err(WriteError::Data(detail)) => {
                    tracing::warn!(sink = "postgres", key = %item.record.idempotency_key(),
                        %detail, "the exchange table refused the result");
                    outcomes.push(ItemOutcome::Dead {
                        reason: DeadReason::Rejected,
                        detail,
                    });
                }
                Err(WriteError::Transient { reason, .. }) => {
                    outcomes.extend(all_retry(&items[index..], &reason, None));
                    break;
                }
            }
        }
        outcomes
    }

    /// Writes `items` in one transaction, connecting first when needed. The whole
    /// attempt is bounded: a server that stops answering is a retry, not a hang.
    async fn write(&mut self, shared: &Shared, items: &[OutboxItem]) -> Result<(), WriteError> {
        let limit = shared.config.connect_timeout + shared.config.statement_timeout * 3;
        let result = match tokio::time::timeout(limit, self.write_unbounded(shared, items)).await {
            Ok(result) => result,
            Err(_) => Err(shared.no_answer(limit)),
        };
        if let Err(WriteError::Transient {
            reconnect: true, ..
        }) = &result
        {
            self.connection = None;
        }
        result
    }

    async fn write_unbounded(
        &mut self,
        shared: &Shared,
        items: &[OutboxItem],
    ) -> Result<(), WriteError> {
        self.ensure_connected(shared).await?;
        let mut rows = Vec::with_capacity(items.len() * 1200);
        let mut scratch = Vec::with_capacity(2048);
        for item in items {
            encode_row(&item.record, &mut scratch, &mut rows);
        }
        let Some(connection) = self.connection.as_mut() else {
            return Err(WriteError::Transient {
                reason: "not connected".to_owned(),
                reconnect: true,
            });
        };
        write_batch(
            &mut connection.client,
            &shared.copy_sql,
            &shared.insert_sql,
            rows,
        )
        .await
    }
}

impl Shared {
    fn no_answer(&self, limit: Duration) -> WriteError {
        WriteError::Transient {
            reason: format!(
                "no answer from PostgreSQL at {}:{} within {}",
                self.config.host,
                self.config.port,
                humantime::format_duration(limit)
            ),
            reconnect: true,
        }
    }

    /// Connects, sets the session up (timeouts, staging table) and checks or creates
    /// the exchange table.
    async fn connect(&self) -> Result<Connection, WriteError> {
        let c = &self.config;
        let mut pg = tokio_postgres::Config::new();
        pg.host(&c.host)
            .port(c.port)
            .user(&c.user)
            .dbname(&c.dbname)
            .application_name("pcrd")
            .connect_timeout(c.connect_timeout)
            .keepalives(true)
            .options(format!(
                "-c statement_timeout={}",
                c.statement_timeout.as_millis()
            ));
        if let Some(password) = &c.password {
            pg.password(password);
        }
        let (client, connection) = pg.connect(NoTls).await.map_err(|e| WriteError::Transient {
            reason: format!(
                "cannot connect to PostgreSQL at {}:{} as {} to {}: {e}",
                c.host, c.port, c.user, c.dbname
            ),
            reconnect: true,
        })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(sink = "postgres", error = %e, "the PostgreSQL connection ended");
            }
        });
        let setup = |e: tokio_postgres::Error| match classify("setting up the session", &e) {
            WriteError::Data(reason) => WriteError::Transient {
                reason,
                reconnect: true,
            },
            other => other,
        };
        if c.create_table {
            client
                .batch_execute(&schema_sql(&c.table))
                .await
                .map_err(setup)?;
        } else {
            self.check_columns(&client).await?;
        }
        // The staging table lives as long as the session; ON COMMIT DELETE ROWS empties
        // it at every commit, and a rolled-back batch leaves nothing in it either.
        client
            .batch_execute(
                "CREATE TEMP TABLE IF NOT EXISTS pcrd_staging \
                 (idempotency_key text NOT NULL, r jsonb NOT NULL) ON COMMIT DELETE ROWS",
            )
            .await
            .map_err(setup)?;
        tracing::info!(sink = "postgres", host = %c.host, port = c.port,
            table = %c.table.display(), "connected to PostgreSQL");
        Ok(Connection { client })
    }

    /// Fails (retry, with what to do) when the table is missing or lacks a column.
    async fn check_columns(&self, client: &Client) -> Result<(), WriteError> {
        let table = &self.config.table;
        let rows = client
            .query(
                "SELECT column_name::text FROM information_schema.columns \
                 WHERE table_schema = coalesce($1, current_schema()) AND table_name = $2",
                &[&table.schema, &table.name],
            )
            .await
            .map_err(|e| WriteError::Transient {
                reason: format!("checking the columns of {}: {e}", table.display()),
                reconnect: true,
            })?;
        let present: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        let hint = format!(
            "create it with `pcrd sink schema postgres --table {}`, or set create_table = true",
            table.display()
        );
        if present.is_empty() {
            return Err(WriteError::Transient {
                reason: format!(
                    "the exchange table {} does not exist in database {}: {hint}",
                    table.display(),
                    self.config.dbname
                ),
                reconnect: true,
            });
        }
        let missing: Vec<&str> = COLUMNS
            .iter()
            .copied()
            .filter(|c| !present.iter().any(|p| p == c))
            .collect();
        if !missing.is_empty() {
            return Err(WriteError::Transient {
                reason: format!(
                    "the exchange table {} lacks the columns {}: {hint}",
                    table.display(),
                    missing.join(", ")
                ),
                reconnect: true,
            });
        }
        Ok(())
    }
}

/// COPY into staging, INSERT ... ON CONFLICT DO NOTHING, COMMIT.
async fn write_batch(
    client: &mut Client,
    copy_sql: &str,
    insert_sql: &str,
    rows: Vec<u8>,
) -> Result<(), WriteError> {
    let transaction = client
        .transaction()
        .await
        .map_err(|e| classify("BEGIN", &e))?;
    let copy = transaction
        .copy_in::<_, Bytes>(copy_sql)
        .await
        .map_err(|e| classify("COPY into the staging table", &e))?;
    futures_util::pin_mut!(copy);
    copy.send(Bytes::from(rows))
        .await
        .map_err(|e| classify("COPY into the staging table", &e))?;
    copy.as_mut()
        .finish()
        .await
        .map_err(|e| classify("COPY into the staging table", &e))?;
    transaction
        .execute(insert_sql, &[])
        .await
        .map_err(|e| classify("INSERT into the exchange table", &e))?;
    transaction
        .commit()
        .await
        .map_err(|e| classify("COMMIT", &e))?;
    Ok(())
}

/// Why `record` cannot be written to PostgreSQL at all: text and JSONB refuse the NUL
/// character.
fn unencodable(record: &ResultRecord) -> Option<String> {
    let json = serde_json::to_string(record).unwrap_or_default();
    (json.contains("\\u0000") || json.is_empty()).then(|| {
        format!(
            "{} holds a NUL character, which PostgreSQL text cannot store",
            record.idempotency_key()
        )
    })
}

/// Appends one staging row in `COPY ... FROM STDIN` text format: the idempotency key,
/// a tab, the record as JSON, a newline, with COPY's backslash escapes.
fn encode_row(r: &ResultRecord, scratch: &mut Vec<u8>, out: &mut Vec<u8>) {
    let mut key = String::new();
    escape_into(&r.idempotency_key(), &mut key);
    out.extend_from_slice(key.as_bytes());
    out.push(b'\t');
    scratch.clear();
    // Serialising a struct of strings and numbers does not fail (a non-finite Ct is
    // written as null).
    let _ = serde_json::to_writer(&mut *scratch, r);
    // serde_json writes control characters as escapes, so the JSON holds no raw tab,
    // newline or carriage return; only its backslashes need doubling for COPY.
    for &byte in scratch.iter() {
        if byte == b'\\' {
            out.push(b'\\');
        }
        out.push(byte);
    }
    out.push(b'\n');
}

fn escape_into(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_identifiers() {
        assert!(TableName::parse("pcrd_results").is_ok());
        assert_eq!(
            TableName::parse("exchange.results").map(|t| t.quoted()),
            Ok("\"exchange\".\"results\"".to_owned())
        );
        for bad in ["", "1abc", "a;drop", "a\"b", "a.b.c", ".a", "a b"] {
            assert!(TableName::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn copy_text_escapes_separators() {
        let mut out = String::new();
        escape_into("a\tb\\c\nd\re", &mut out);
        assert_eq!(out, "a\\tb\\\\c\\nd\\re");
    }

    #[test]
    fn config_reports_every_problem() {
        let raw = RawPostgresConfig {
            table: Some("no good".into()),
            password_env: Some("PCRD_TEST_PG_PASSWORD".into()),
            connect_timeout: Some("soon".into()),
            ..Default::default()
        };
        let problems =
            PostgresConfig::from_raw(raw, Path::new("."), &|_| None).expect_err("three problems");
        assert_eq!(problems.len(), 3, "{problems:?}");
        let ok = PostgresConfig::from_raw(
            RawPostgresConfig {
                password_env: Some("PW".into()),
                ..Default::default()
            },
            Path::new("."),
            &|_| Some("secret".into()),
        )
        .expect("valid");
        assert!(!format!("{ok:?}").contains("secret"));
        assert_eq!(ok.table.display(), DEFAULT_TABLE);
    }
}
