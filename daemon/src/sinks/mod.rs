//! Sinks: where released results go.
//!
//! The outbox (`crate::outbox`) owns cursors, retries, backoff and dead letters; a
//! sink owns its connection, its wire format and its timeouts. The outbox hands a
//! sink a batch of items in release order and the sink says, per item, what became
//! of it. A sink knows nothing about instruments, and nothing about the store.
//!
//! Dispatch is an enum rather than a trait object: four kinds, known at compile time,
//! and async methods without boxing.

pub mod files;
pub mod hl7;
pub mod http;
pub mod postgres;

use std::time::Duration;

use pcrd_protocol::upstream::ResultRecord;

/// One result version waiting for delivery to one sink.
#[derive(Clone, Debug)]
pub struct OutboxItem {
    /// Position in the outbox (release order); unique, never reused.
    pub seq: u64,
    pub record: ResultRecord,
    /// Earlier attempts to deliver this item to this sink (0 on the first).
    pub attempt: u32,
}

/// What became of one item of a batch.
#[derive(Clone, Debug, PartialEq)]
pub enum ItemOutcome {
    /// The receiver acknowledged it (2xx, commit, HL7 AA).
    Delivered,
    /// Not delivered this time (receiver down, timeout, 5xx, 429, AE, or not tried
    /// because an earlier item of the batch failed); try again, not before `after`
    /// when the receiver said so (Retry-After).
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    /// The receiver refused it for good (a 4xx other than 408/429, HL7 AR), or it
    /// cannot be expressed in the sink's format: it goes to the dead letters.
    Dead { reason: DeadReason, detail: String },
}

/// Why an item was dead-lettered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadReason {
    /// The receiver refused it permanently.
    Rejected,
    /// The record cannot be written in the sink's format.
    Unencodable,
}

/// One configured sink (`[[sinks]]` in the config).
#[derive(Clone, Debug)]
pub struct SinkConfig {
    /// Unique among sinks; names the cursor in the store, so renaming a sink starts
    /// it from the beginning of the outbox.
    pub name: String,
    /// Largest number of items handed to `deliver` at once.
    pub batch_size: usize,
    pub kind: SinkKind,
}

#[derive(Clone, Debug)]
pub enum SinkKind {
    Http(http::HttpConfig),
    Postgres(postgres::PostgresConfig),
    Files(files::FilesConfig),
    Hl7(hl7::Hl7Config),
}

impl SinkKind {
    pub fn label(&self) -> &'static str {
        match self {
            SinkKind::Http(_) => "http",
            SinkKind::Postgres(_) => "postgres",
            SinkKind::Files(_) => "files",
            SinkKind::Hl7(_) => "hl7",
        }
    }
}

/// A sink ready to deliver.
#[derive(Debug)]
pub enum Sink {
    Http(http::HttpSink),
    Postgres(postgres::PostgresSink),
    Files(files::FilesSink),
    Hl7(hl7::Hl7Sink),
}

impl Sink {
    /// Builds the sink from its config. Does not connect: a receiver that is down at
    /// start-up is a retry at the first delivery, not a failure to start.
    pub fn new(config: &SinkConfig) -> Result<Sink, String> {
        Ok(match &config.kind {
            SinkKind::Http(c) => Sink::Http(http::HttpSink::new(c)?),
            SinkKind::Postgres(c) => Sink::Postgres(postgres::PostgresSink::new(c)?),
            SinkKind::Files(c) => Sink::Files(files::FilesSink::new(c)?),
            SinkKind::Hl7(c) => Sink::Hl7(hl7::Hl7Sink::new(c)?),
        })
    }

    /// Delivers `items` (in order) and returns one outcome per item, in the same order.
    /// Never panics and never returns fewer outcomes than items.
    pub async fn deliver(&mut self, items: &[OutboxItem]) -> Vec<ItemOutcome> {
        match self {
            Sink::Http(s) => s.deliver(items).await,
            Sink::Postgres(s) => s.deliver(items).await,
            Sink::Files(s) => s.deliver(items).await,
            Sink::Hl7(s) => s.deliver(items).await,
        }
    }
}

/// The outcome for every item of a batch that failed as a whole.
pub fn all_retry(items: &[OutboxItem], reason: &str, after: Option<Duration>) -> Vec<ItemOutcome> {
    items
        .iter()
        .map(|_| ItemOutcome::Retry {
            reason: reason.to_owned(),
            after,
        })
        .collect()
}
