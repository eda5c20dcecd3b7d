//! The PostgreSQL table-exchange sink: the central system reads released results
//! from a table in its own database.
//!
//! Each batch is one transaction, and only its COMMIT counts as delivery (field notes
//! §3: "delivery done only on the system of record's word"):
//! - the fast path: binary `COPY` straight into the exchange table, then `COMMIT`;
//! - a batch sent again after a crash (the commit landed, the outbox cursor had not
//!   moved) meets the table's primary key `(result_id, version)`, the record's
//!   idempotency key: the COPY fails with a unique violation, the transaction rolls
//!   back, and the batch is written again through a session-local staging table:
//!   `COPY` into it, `INSERT INTO <table> SELECT ... ON CONFLICT (result_id, version)
//!   DO NOTHING`, `COMMIT`, which adds only the rows the table lacks. Later batches
//!   take that path too until one inserts every row again (a backlog of re-sent
//!   batches pays no refused COPY each). A correction is a new version and so a new
//!   row.
//!
//! The fast path is taken only where it is as safe as the INSERT: a plain table (COPY
//! ignores rules and cannot write into a view) whose unique index on exactly
//! `(result_id, version)` refuses a row sent again, and whose columns have exactly
//! pcrd's types (binary COPY does not convert; the INSERT from staging does, with
//! PostgreSQL's assignment casts). Any other table takes the staging path for every
//! batch, as before the fast path existed.
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
//! The table may lack the `record` column (the operator dropped it: every field has
//! its own column); pcrd then does not send the whole record, a row of ~0.6 KB instead
//! of ~1.4 KB.
//!
//! What goes over the wire is binary `COPY` of the 21 typed columns: pcrd takes every
//! column from the record itself (integers as integers, timestamps as microseconds
//! since 2000, the targets and the whole record as JSON text), so the server parses no
//! text into values except the validation of the two JSON values. Measured on the
//! loopback server (BENCHMARKS.md §8): decomposing ~1 KB of JSON per result into JSONB
//! was the largest cost pcrd could avoid (a `jsonb` table takes results at about 0.7×
//! the rate of a `json` one), and copying straight into the table instead of through
//! staging and an INSERT the next one. The JSON values are sent in the exchange
//! table's own column type, read at connect, so a table created with `jsonb` columns
//! (an earlier DDL, or an operator who wants GIN indexes) keeps working, at the
//! server's JSONB parsing cost.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use futures_util::SinkExt;
use pcrd_protocol::upstream::{KitRef, ResultRecord, TargetResult};
use serde::Deserialize;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, Transaction};

use super::{DeadReason, ItemOutcome, OutboxItem, all_retry};

/// The exchange table's name when the config names none.
pub const DEFAULT_TABLE: &str = "pcrd_results";

/// Results per delivery when the sink's config gives no `batch_size` (the other sinks
/// take 500): each batch costs a transaction, a COMMIT's fsync and round trips, so
/// larger batches take more results per second; 5,000 rows are ~7 MB of COPY data.
/// Measured in BENCHMARKS.md §8 ("Fast-path COPY").
pub const DEFAULT_BATCH_SIZE: u64 = 5_000;

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

/// The columns pcrd writes, in `COPY` order, each with the type (as
/// `information_schema.columns.data_type` names it) whose binary form
/// [`encode_binary_row`] writes; `targets` and `record` follow the table's [`Layout`].
/// The table may have more columns (with defaults).
const COLUMNS: [(&str, &str); 21] = [
    ("result_id", "text"),
    ("version", "integer"),
    ("idempotency_key", "text"),
    ("schema_version", "integer"),
    ("tube", "text"),
    ("pool_size", "smallint"),
    ("plate", "text"),
    ("well", "text"),
    ("run", "text"),
    ("instrument", "text"),
    ("kit_id", "text"),
    ("kit_version", "text"),
    ("interpretation", "text"),
    ("status", "text"),
    ("correction_reason", "text"),
    ("tested_at", "timestamp with time zone"),
    ("released_at", "timestamp with time zone"),
    ("released_by", "text"),
    ("lab_id", "text"),
    ("targets", "json"),
    ("record", "json"),
];

/// The staging table's name (session-local, emptied at every commit), created at
/// connect with one column per entry of [`COLUMNS`] of pcrd's type for it, except the
/// JSON columns, which take the exchange table's type: the rows [`encode_batch`] writes
/// for the table fit the staging table unchanged.
const STAGING_TABLE: &str = "pg_temp.pcrd_staging";

/// How a JSON value (`targets`, `record`) is stored in the exchange table: the type
/// of its column, read at connect. Binary `COPY` sends each in its own form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum JsonType {
    /// Validated and stored as sent (pcrd's DDL).
    Json,
    /// Decomposed by the server (an earlier DDL, or an operator's GIN index).
    Jsonb,
    Text,
}

impl JsonType {
    /// The type as `information_schema.columns.data_type` names it.
    fn from_sql(name: &str) -> Option<JsonType> {
        match name {
            "json" => Some(JsonType::Json),
            "jsonb" => Some(JsonType::Jsonb),
            "text" => Some(JsonType::Text),
            _ => None,
        }
    }

    fn sql(self) -> &'static str {
        match self {
            JsonType::Json => "json",
            JsonType::Jsonb => "jsonb",
            JsonType::Text => "text",
        }
    }
}

/// What pcrd knows of the exchange table, read at connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    /// The JSON columns' types, which decide their binary form.
    targets: JsonType,
    /// `None`: the table has no `record` column (the operator dropped it: every field
    /// of the record has its own column), so pcrd does not send the whole record.
    record: Option<JsonType>,
    /// Batches may be copied straight into the table: every other column has exactly
    /// pcrd's type, and a unique index on exactly (result_id, version) refuses a row
    /// sent again, so the batch can fall back to staging and ON CONFLICT DO NOTHING.
    fast_path: bool,
}

impl Default for Layout {
    fn default() -> Layout {
        Layout {
            targets: JsonType::Json,
            record: Some(JsonType::Json),
            fast_path: false,
        }
    }
}

impl Layout {
    fn json_types(self) -> (JsonType, Option<JsonType>) {
        (self.targets, self.record)
    }

    /// The columns pcrd writes into this table, in `COPY` order.
    fn columns(self) -> Vec<&'static str> {
        COLUMNS
            .iter()
            .map(|(name, _)| *name)
            .filter(|name| *name != "record" || self.record.is_some())
            .collect()
    }

    /// The session's staging table: pcrd's types, the JSON columns as the exchange table's.
    fn staging_ddl(self) -> String {
        format!(
            "CREATE TEMP TABLE IF NOT EXISTS pcrd_staging (\
             result_id text, version integer, idempotency_key text, schema_version integer, \
             tube text, pool_size smallint, plate text, well text, run text, instrument text, \
             kit_id text, kit_version text, interpretation text, status text, \
             correction_reason text, tested_at timestamptz, released_at timestamptz, \
             released_by text, lab_id text, targets {}, record {}) ON COMMIT DELETE ROWS",
            self.targets.sql(),
            self.record.unwrap_or(JsonType::Json).sql()
        )
    }
}

/// The exchange table's DDL (`pcrd sink schema postgres`): the table, an index by tube
/// and a view with one row per target. Idempotent (`IF NOT EXISTS` / `OR REPLACE`).
///
/// Per-target rows are a view over the `targets` JSON column rather than a child
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
-- pcrd copies each batch in (COPY); a batch sent again after a crash goes in with
-- INSERT ... ON CONFLICT (result_id, version) DO NOTHING: keep the primary key.
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
    -- json, not jsonb: validated and kept as sent; the server need not decompose ~1 KB
    -- per result (BENCHMARKS.md §8). ALTER them to jsonb for GIN indexes: pcrd casts.
    targets           json        NOT NULL,  -- [{{name, dye, loinc, ct, call}}, ...]
    record            json        NOT NULL,  -- the whole result record as sent
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
FROM {t} r CROSS JOIN LATERAL json_array_elements(r.targets::json) WITH ORDINALITY AS t(value, ordinality);
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
/// work.
#[derive(Debug)]
pub struct PostgresSink {
    shared: Shared,
    lanes: Vec<Lane>,
}

/// What every lane reads.
#[derive(Debug)]
struct Shared {
    config: PostgresConfig,
}

/// The statements writing a batch into one table of one [`Layout`].
#[derive(Debug)]
struct Statements {
    /// The fast path: COPY straight into the exchange table.
    copy_into_table: String,
    /// The path for batches holding rows the table already has, and for tables the
    /// fast path cannot guard (see [`Layout::fast_path`]): COPY into the session's
    /// staging table, then INSERT ... ON CONFLICT DO NOTHING.
    copy_into_staging: String,
    insert_from_staging: String,
}

impl Statements {
    fn new(table: &TableName, layout: Layout) -> Statements {
        let columns = layout.columns().join(", ");
        let table = table.quoted();
        Statements {
            copy_into_table: format!("COPY {table} ({columns}) FROM STDIN (FORMAT binary)"),
            copy_into_staging: format!(
                "COPY {STAGING_TABLE} ({columns}) FROM STDIN (FORMAT binary)"
            ),
            insert_from_staging: format!(
                "INSERT INTO {table} ({columns}) SELECT {columns} FROM {STAGING_TABLE} \
                 ON CONFLICT (result_id, version) DO NOTHING"
            ),
        }
    }
}

#[derive(Debug, Default)]
struct Lane {
    connection: Option<Connection>,
}

#[derive(Debug)]
struct Connection {
    client: Client,
    /// Read at connect from the exchange table.
    layout: Layout,
    statements: Statements,
    /// The last batch met rows the table already has (a batch sent again after a
    /// restart): later batches go through staging until one inserts every row again,
    /// so a backlog of re-sent batches does not pay a refused COPY each.
    replaying: bool,
}

/// Binary COPY rows for a [`Layout`].
struct Encoded {
    layout: Layout,
    rows: Bytes,
}

/// A batch is cut into parts for several lanes only when each part gets this many.
const MIN_ITEMS_PER_LANE: usize = 250;

impl PostgresSink {
    pub fn new(config: &PostgresConfig) -> Result<PostgresSink, String> {
        Ok(PostgresSink {
            shared: Shared {
                config: config.clone(),
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

    /// The layout of the table as this lane last saw it.
    fn layout(&self) -> Layout {
        self.connection
            .as_ref()
            .map_or_else(Layout::default, |c| c.layout)
    }

    /// `items` in one transaction; when the table refuses a value, item by item.
    async fn deliver(&mut self, shared: &Shared, items: &[OutboxItem]) -> Vec<ItemOutcome> {
        // A batch holding an item PostgreSQL cannot take is written item by item, so
        // that item is dead before anything of it is sent and the rest still go.
        let layout = self.layout();
        let Ok(rows) = encode_batch(items, layout) else {
            return self.deliver_one_by_one(shared, items).await;
        };
        let encoded = Encoded {
            layout,
            rows: Bytes::from(rows),
        };
        match self.write(shared, items, encoded).await {
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
            let layout = self.layout();
            let one = std::slice::from_ref(item);
            let rows = match encode_batch(one, layout) {
                Ok(rows) => rows,
                Err(detail) => {
                    outcomes.push(ItemOutcome::Dead {
                        reason: DeadReason::Unencodable,
                        detail,
                    });
                    continue;
                }
            };
            let encoded = Encoded {
                layout,
                rows: Bytes::from(rows),
            };
            match self.write(shared, one, encoded).await {
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

    /// Writes `items` (already encoded) in one transaction, connecting first when
    /// needed. The whole attempt is bounded: a server that stops answering is a retry,
    /// not a hang.
    async fn write(
        &mut self,
        shared: &Shared,
        items: &[OutboxItem],
        encoded: Encoded,
    ) -> Result<(), WriteError> {
        let limit = shared.config.connect_timeout + shared.config.statement_timeout * 3;
        let attempt = self.write_unbounded(shared, items, encoded);
        let result = match tokio::time::timeout(limit, attempt).await {
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
        encoded: Encoded,
    ) -> Result<(), WriteError> {
        self.ensure_connected(shared).await?;
        let Some(connection) = self.connection.as_mut() else {
            return Err(WriteError::Transient {
                reason: "not connected".to_owned(),
                reconnect: true,
            });
        };
        // A reconnect may have found the table's JSON columns changed since encoding.
        let rows = if encoded.layout.json_types() == connection.layout.json_types() {
            encoded.rows
        } else {
            Bytes::from(encode_batch(items, connection.layout).map_err(WriteError::Data)?)
        };
        write_batch(connection, rows, items.len()).await
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
        }
        let layout = self.table_layout(&client).await?;
        // The staging table lives as long as the session; ON COMMIT DELETE ROWS empties
        // it at every commit, and a rolled-back batch leaves nothing in it either.
        client
            .batch_execute(&layout.staging_ddl())
            .await
            .map_err(setup)?;
        if !layout.fast_path {
            tracing::info!(sink = "postgres", table = %c.table.display(),
                "the exchange table is not exactly as pcrd's DDL makes it (column types, \
                 unique key on result_id, version, rules, or a view): every batch goes \
                 through staging and INSERT ... ON CONFLICT");
        }
        tracing::info!(sink = "postgres", host = %c.host, port = c.port,
            table = %c.table.display(), fast_path = layout.fast_path, "connected to PostgreSQL");
        Ok(Connection {
            client,
            layout,
            statements: Statements::new(&c.table, layout),
            replaying: false,
        })
    }

    /// Reads what pcrd must know of the exchange table: its JSON column types, and
    /// whether batches may be copied straight into it. Fails (retry, with what to do)
    /// when the table is missing, lacks a column, or holds the JSON in a type pcrd
    /// cannot write.
    async fn table_layout(&self, client: &Client) -> Result<Layout, WriteError> {
        let table = &self.config.table;
        let checking = |e: tokio_postgres::Error| WriteError::Transient {
            reason: format!("checking the exchange table {}: {e}", table.display()),
            reconnect: true,
        };
        let rows = client
            .query(
                "SELECT column_name::text, data_type::text FROM information_schema.columns \
                 WHERE table_schema = coalesce($1, current_schema()) AND table_name = $2",
                &[&table.schema, &table.name],
            )
            .await
            .map_err(checking)?;
        let present: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
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
        let type_of = |column: &str| {
            present
                .iter()
                .find(|(name, _)| name == column)
                .map(|(_, t)| t.as_str())
        };
        // `record` may be dropped: every field of the record has its own column.
        let missing: Vec<&str> = COLUMNS
            .iter()
            .map(|(name, _)| *name)
            .filter(|name| *name != "record" && type_of(name).is_none())
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
        let json_type = |column: &str| {
            let data_type = type_of(column).unwrap_or("json");
            JsonType::from_sql(data_type).ok_or_else(|| WriteError::Transient {
                reason: format!(
                    "the column {column} of {} is {data_type}; pcrd writes json, jsonb or \
                     text there: {hint}",
                    table.display()
                ),
                reconnect: true,
            })
        };
        let targets = json_type("targets")?;
        let record = match type_of("record") {
            Some(_) => Some(json_type("record")?),
            None => None,
        };
        // Binary COPY sends each value in the form of pcrd's type for it: straight into
        // the table only when the table's type is that very type (an INSERT from
        // staging converts, e.g. to bigint or varchar, as PostgreSQL's assignment casts
        // do).
        let exact_types = COLUMNS.iter().all(|(name, data_type)| {
            *name == "targets" || *name == "record" || type_of(name) == Some(*data_type)
        });
        // COPY skips rules, does not write into views, and would let duplicates in
        // where no unique index on exactly (result_id, version) stops them: only a
        // plain table with that key may take the fast path.
        let guard = client
            .query_one(
                "SELECT coalesce(( \
                   SELECT c.relkind IN ('r', 'p') AND NOT c.relhasrules AND EXISTS ( \
                     SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisunique \
                       AND i.indisvalid AND i.indimmediate AND i.indpred IS NULL \
                       AND i.indexprs IS NULL AND i.indnatts = 2 \
                       AND (SELECT array_agg(a.attname::text ORDER BY a.attname) \
                            FROM pg_attribute a \
                            WHERE a.attrelid = c.oid AND a.attnum = ANY (i.indkey::int2[])) \
                           = ARRAY['result_id', 'version']) \
                   FROM pg_class c WHERE c.oid = to_regclass($1)), false)",
                &[&table.quoted()],
            )
            .await
            .map_err(checking)?;
        let guarded: bool = guard.get(0);
        Ok(Layout {
            targets,
            record,
            fast_path: exact_types && guarded,
        })
    }
}

/// Writes one encoded batch of `count` rows in one transaction. The fast path copies
/// it straight into the table; when that meets a row the table already has (a unique
/// violation: the batch, or part of it, committed before and sent again after a
/// restart) the transaction is rolled back and the batch written through staging with
/// `ON CONFLICT (result_id, version) DO NOTHING`, which adds only the rows missing.
/// Either way the batch is delivered only when COMMIT returns.
async fn write_batch(
    connection: &mut Connection,
    rows: Bytes,
    count: usize,
) -> Result<(), WriteError> {
    let statements = &connection.statements;
    if connection.layout.fast_path && !connection.replaying {
        match copy_into_table(
            &mut connection.client,
            &statements.copy_into_table,
            rows.clone(),
        )
        .await
        {
            Ok(()) => return Ok(()),
            Err((_, e)) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                tracing::info!(
                    sink = "postgres",
                    rows = count,
                    "the batch holds results the table already has (sent again after a \
                     restart); writing it through staging, skipping those"
                );
                connection.replaying = true;
            }
            Err((context, e)) => return Err(classify(context, &e)),
        }
    }
    let inserted = copy_through_staging(&mut connection.client, statements, rows).await?;
    if inserted == count as u64 {
        connection.replaying = false;
    }
    Ok(())
}

/// BEGIN, COPY into the exchange table, COMMIT; on failure the dropped transaction
/// rolls back.
async fn copy_into_table(
    client: &mut Client,
    copy_sql: &str,
    rows: Bytes,
) -> Result<(), (&'static str, tokio_postgres::Error)> {
    let transaction = client.transaction().await.map_err(|e| ("BEGIN", e))?;
    copy_in(&transaction, copy_sql, rows)
        .await
        .map_err(|e| ("COPY into the exchange table", e))?;
    transaction.commit().await.map_err(|e| ("COMMIT", e))
}

/// BEGIN, COPY into staging, INSERT ... ON CONFLICT DO NOTHING, COMMIT. Returns the
/// rows inserted.
async fn copy_through_staging(
    client: &mut Client,
    statements: &Statements,
    rows: Bytes,
) -> Result<u64, WriteError> {
    let transaction = client
        .transaction()
        .await
        .map_err(|e| classify("BEGIN", &e))?;
    copy_in(&transaction, &statements.copy_into_staging, rows)
        .await
        .map_err(|e| classify("COPY into the staging table", &e))?;
    let inserted = transaction
        .execute(&statements.insert_from_staging, &[])
        .await
        .map_err(|e| classify("INSERT into the exchange table", &e))?;
    transaction
        .commit()
        .await
        .map_err(|e| classify("COMMIT", &e))?;
    Ok(inserted)
}

async fn copy_in(
    transaction: &Transaction<'_>,
    copy_sql: &str,
    rows: Bytes,
) -> Result<u64, tokio_postgres::Error> {
    let copy = transaction.copy_in::<_, Bytes>(copy_sql).await?;
    futures_util::pin_mut!(copy);
    copy.send(rows).await?;
    copy.as_mut().finish().await
}

/// The whole binary `COPY` stream for `items` (header, rows, trailer), or why one of
/// them cannot be written to PostgreSQL at all, naming it.
fn encode_batch(items: &[OutboxItem], layout: Layout) -> Result<Vec<u8>, String> {
    let mut rows = Vec::with_capacity(COPY_HEADER.len() + 2 + items.len() * 1400);
    rows.extend_from_slice(COPY_HEADER);
    let mut scratch = Vec::with_capacity(2048);
    for item in items {
        encode_binary_row(&item.record, layout, &mut scratch, &mut rows)
            .map_err(|e| format!("{}: {e}", item.record.idempotency_key()))?;
    }
    rows.extend_from_slice(&(-1i16).to_be_bytes());
    Ok(rows)
}

/// The first byte of `jsonb`'s binary form (then the JSON text); `json` and `text`
/// are the text alone.
const JSONB_VERSION: u8 = 1;

/// The binary COPY header: signature, flags, header extension length.
const COPY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// Appends one row in binary `COPY` format, the fields in [`COLUMNS`] order: a field
/// count, then per field its length and its bytes in PostgreSQL's binary
/// representation (text and json: UTF-8; jsonb: a version byte, then UTF-8; integer,
/// smallint: big-endian; timestamptz: microseconds since 2000-01-01 UTC; NULL: length
/// -1). Refuses a record holding a
/// NUL character (PostgreSQL text cannot store it) or a timestamp that is not RFC 3339
/// (the table would refuse it too).
fn encode_binary_row(
    r: &ResultRecord,
    layout: Layout,
    scratch: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    fn field(out: &mut Vec<u8>, bytes: &[u8]) -> Result<(), String> {
        let len = i32::try_from(bytes.len()).map_err(|_| "a value over 2 GiB".to_owned())?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(bytes);
        Ok(())
    }
    let version = i32::try_from(r.version).map_err(|_| format!("version {}", r.version))?;
    let schema_version =
        i32::try_from(r.schema_version).map_err(|_| format!("schema {}", r.schema_version))?;
    let tested_at = pg_timestamp_micros(&r.tested_at).map_err(|e| format!("tested_at: {e}"))?;
    let released_at =
        pg_timestamp_micros(&r.released_at).map_err(|e| format!("released_at: {e}"))?;
    if let Some(name) = nul_field(r) {
        return Err(format!(
            "{name} holds a NUL character, which PostgreSQL text cannot store"
        ));
    }
    let fields: i16 = if layout.record.is_some() { 21 } else { 20 };
    out.extend_from_slice(&fields.to_be_bytes());
    field(out, r.result_id.as_bytes())?;
    field(out, &version.to_be_bytes())?;
    field(out, r.idempotency_key().as_bytes())?;
    field(out, &schema_version.to_be_bytes())?;
    field(out, r.tube.as_bytes())?;
    field(out, &i16::from(r.pool_size).to_be_bytes())?;
    field(out, r.plate.as_bytes())?;
    field(out, r.well.as_bytes())?;
    field(out, r.run.as_bytes())?;
    field(out, r.instrument.as_bytes())?;
    field(out, r.kit.id.as_bytes())?;
    field(out, r.kit.version.as_bytes())?;
    field(out, r.interpretation.as_str().as_bytes())?;
    field(out, r.status.as_str().as_bytes())?;
    match &r.correction_reason {
        Some(reason) => field(out, reason.as_bytes())?,
        None => out.extend_from_slice(&(-1i32).to_be_bytes()),
    }
    field(out, &tested_at.to_be_bytes())?;
    field(out, &released_at.to_be_bytes())?;
    field(out, r.released_by.as_bytes())?;
    field(out, r.lab_id.as_bytes())?;
    // Serialising a struct of strings and numbers does not fail (a non-finite Ct is
    // written as null).
    let mut targets = Vec::with_capacity(512);
    if layout.targets == JsonType::Jsonb {
        targets.push(JSONB_VERSION);
    }
    let _ = serde_json::to_writer(&mut targets, &r.targets);
    field(out, &targets)?;
    if let Some(record) = layout.record {
        scratch.clear();
        if record == JsonType::Jsonb {
            scratch.push(JSONB_VERSION);
        }
        let _ = serde_json::to_writer(&mut *scratch, r);
        field(out, scratch)?;
    }
    Ok(())
}

/// The first field of `r` holding a NUL character, if any. Destructured so that a
/// field added to the record cannot be missed here.
fn nul_field(r: &ResultRecord) -> Option<&'static str> {
    let ResultRecord {
        schema_version: _,
        result_id,
        version: _,
        tube,
        pool_size: _,
        plate,
        well,
        run,
        instrument,
        kit: KitRef { id, version },
        targets,
        // Fixed words.
        interpretation: _,
        status: _,
        correction_reason,
        tested_at,
        released_at,
        released_by,
        lab_id,
    } = r;
    let nul = |s: &str| s.contains('\0');
    let target_nul = targets.iter().any(
        |TargetResult {
             name,
             dye,
             loinc,
             ct: _,
             call: _,
         }| nul(name) || nul(dye) || loinc.as_deref().is_some_and(nul),
    );
    [
        ("result_id", nul(result_id)),
        ("tube", nul(tube)),
        ("plate", nul(plate)),
        ("well", nul(well)),
        ("run", nul(run)),
        ("instrument", nul(instrument)),
        ("kit.id", nul(id)),
        ("kit.version", nul(version)),
        ("targets", target_nul),
        (
            "correction_reason",
            correction_reason.as_deref().is_some_and(nul),
        ),
        ("tested_at", nul(tested_at)),
        ("released_at", nul(released_at)),
        ("released_by", nul(released_by)),
        ("lab_id", nul(lab_id)),
    ]
    .into_iter()
    .find(|(_, has_nul)| *has_nul)
    .map(|(name, _)| name)
}

/// Days from 1970-01-01 to the given civil date (proleptic Gregorian).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// An RFC 3339 timestamp (`2026-11-27T06:10:00.123Z`, `...+01:00`; `t`/space and `z`
/// accepted as PostgreSQL does) as PostgreSQL's binary timestamptz: microseconds since
/// 2000-01-01 00:00:00 UTC, fractions beyond microseconds rounded to the nearest
/// (pcrd writes milliseconds; an exact half may differ from the server's rounding).
fn pg_timestamp_micros(text: &str) -> Result<i64, String> {
    let bad = || format!("{text:?} is not an RFC 3339 timestamp like 2026-11-27T06:10:00Z");
    let b = text.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Result<i64, String> {
        let part = b.get(range).ok_or_else(bad)?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return Err(bad());
        }
        Ok(part.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0')))
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err(bad());
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        _ => return Err(bad()),
    };
    if day < 1 || day > days_in_month || hour > 23 || minute > 59 || second > 59 {
        return Err(bad());
    }
    let mut at = 19;
    let mut micros = 0i64;
    if b[at] == b'.' {
        let digits_end = at
            + 1
            + b[at + 1..]
                .iter()
                .take_while(|c| c.is_ascii_digit())
                .count();
        let digits = &b[at + 1..digits_end];
        if digits.is_empty() {
            return Err(bad());
        }
        for i in 0..6 {
            micros = micros * 10 + digits.get(i).map_or(0, |d| i64::from(d - b'0'));
        }
        if digits.get(6).is_some_and(|d| *d >= b'5') {
            micros += 1;
        }
        at = digits_end;
    }
    let offset_seconds = match b.get(at..) {
        Some(b"Z" | b"z") => 0,
        Some([sign @ (b'+' | b'-'), ..]) if b.len() == at + 6 && b[at + 3] == b':' => {
            let (h, m) = (num(at + 1..at + 3)?, num(at + 4..at + 6)?);
            if h > 23 || m > 59 {
                return Err(bad());
            }
            let seconds = h * 3600 + m * 60;
            if *sign == b'+' { seconds } else { -seconds }
        }
        _ => return Err(bad()),
    };
    // 2000-01-01 is 10,957 days after 1970-01-01.
    let days = days_from_civil(year, month, day) - 10_957;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_seconds;
    Ok(seconds * 1_000_000 + micros)
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
    fn timestamps_become_microseconds_since_2000() {
        assert_eq!(pg_timestamp_micros("2000-01-01T00:00:00Z"), Ok(0));
        assert_eq!(pg_timestamp_micros("1999-12-31T23:59:59.999999Z"), Ok(-1));
        assert_eq!(
            pg_timestamp_micros("2026-11-27T06:10:00.123Z"),
            Ok(849_075_000_123_000)
        );
        assert_eq!(
            pg_timestamp_micros("2026-11-27T07:10:00.123+01:00"),
            pg_timestamp_micros("2026-11-27T06:10:00.123Z")
        );
        assert_eq!(
            pg_timestamp_micros("2024-02-29T00:00:00.0000006Z"),
            Ok(762_480_000_000_001)
        );
        for bad in [
            "",
            "2026-11-27",
            "2026-02-30T00:00:00Z",
            "2026-11-27T24:00:00Z",
            "2026-11-27T06:10:00",
            "2026-11-27T06:10:00.Z",
            "2026-11-27T06:10:00+0100",
            "2026-11-27T06:10:00Zjunk",
            "2026-11-27T06:10:0xZ",
        ] {
            assert!(pg_timestamp_micros(bad).is_err(), "{bad:?} accepted");
        }
    }

    proptest::proptest! {
        #[test]
        fn timestamp_parsing_never_panics(text in "\\PC{0,40}") {
            let _ = pg_timestamp_micros(&text);
        }
    }

    #[test]
    fn the_postgres_sink_defaults_to_batches_of_5000() {
        let text = r#"
            [lab]
            id = "LAB-01"
            [server]
            listen = "127.0.0.1:9000"
            [store]
            path = "data"
            [[users]]
            name = "alice"
            role = "technician"
            token = "alice-token-0123456789"
            [[sinks]]
            name = "central"
            [sinks.postgres]
            [[sinks]]
            name = "small"
            batch_size = 200
            [sinks.postgres]
            [[sinks]]
            name = "export"
            [sinks.files]
            dir = "out"
        "#;
        let config = crate::config::Config::parse(text, Path::new("/etc/pcrd"), |_| None)
            .expect("valid config");
        let sizes: Vec<usize> = config.sinks.iter().map(|s| s.batch_size).collect();
        assert_eq!(
            sizes,
            vec![
                DEFAULT_BATCH_SIZE as usize,
                200,
                crate::config::DEFAULT_SINK_BATCH as usize
            ]
        );
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
