//! One delivery task per sink.
//!
//! The loop: read the next batch (at most `batch_size` entries) from the sink's cursor
//! straight from sled, hand it to the sink, apply the outcomes in order (delivered and
//! dead advance the cursor; the first retry stops the batch, so a sink sees its results
//! in release order), write cursor, counters and dead letters in one atomic batch,
//! wait for the store's durability barrier, then remove outbox entries every sink has
//! passed. A retry waits with exponential backoff and full jitter (1 s base, 5 min cap,
//! never giving up), or longer when the receiver asked (Retry-After). Idle workers
//! sleep on the release signal rather than polling.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pcrd_protocol::upstream::ResultRecord;
use tracing::Instrument;

use super::{
    CursorState, DeadLetter, OutboxEntry, SinkRuntime, StoredResult, cursor_key, dead_key,
    load_cursor, now_ms, outbox_key, result_key, truncate_detail,
};
use crate::lab::Lab;
use crate::sinks::{ItemOutcome, OutboxItem, Sink, SinkConfig};
use crate::store::{Store, StoreError, decode, encode};

/// First retry delay ceiling.
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Longest wait between attempts: an overnight outage is retried every few minutes and
/// drains on its own when the receiver returns.
pub const BACKOFF_CAP: Duration = Duration::from_secs(300);
/// Shortest wait, so a full-jitter draw of ~0 does not spin.
const BACKOFF_FLOOR: Duration = Duration::from_millis(50);

/// Something that delivers batches: the real sinks, and scripted receivers in tests.
pub trait Deliver: Send {
    fn deliver(
        &mut self,
        items: &[OutboxItem],
    ) -> impl std::future::Future<Output = Vec<ItemOutcome>> + Send;
}

impl Deliver for Sink {
    async fn deliver(&mut self, items: &[OutboxItem]) -> Vec<ItemOutcome> {
        Sink::deliver(self, items).await
    }
}

/// Starts one worker per configured sink. Fails, naming the sink, if one cannot be
/// built (a configuration problem: `pcrd serve` then refuses to start) or its cursor
/// cannot be read.
pub async fn start(
    lab: &Arc<Lab>,
    sinks: &[SinkConfig],
) -> Result<Vec<tokio::task::JoinHandle<()>>, String> {
    let mut built = Vec::new();
    for config in sinks {
        let sink = Sink::new(config).map_err(|e| format!("sink {}: {e}", config.name))?;
        built.push((config, sink));
    }
    let mut handles = Vec::new();
    for (config, sink) in built {
        let runtime = prepare(lab, &config.name, config.kind.label(), config.batch_size)
            .await
            .map_err(|e| format!("sink {}: {e}", config.name))?;
        let span = tracing::info_span!("sink", sink = %config.name, kind = config.kind.label());
        handles.push(tokio::spawn(
            run(Arc::clone(lab), runtime, sink).instrument(span),
        ));
    }
    Ok(handles)
}

/// Loads (or creates, at the oldest entry still in the outbox) the sink's cursor and
/// registers the sink with the outbox.
pub async fn prepare(
    lab: &Arc<Lab>,
    name: &str,
    kind: &'static str,
    batch_size: usize,
) -> Result<Arc<SinkRuntime>, StoreError> {
    let store = lab.store();
    let cursor = match load_cursor(store, name)? {
        Some(mut cursor) if cursor.next_attempt_ms.is_some() => {
            // A restart tries at once rather than sitting out a backoff chosen by the
            // previous process (an operator often restarts after fixing the cause);
            // the attempt count is kept, so the next failure still backs off long.
            cursor.next_attempt_ms = None;
            store
                .trees()
                .sink_state
                .insert(cursor_key(name), encode(&cursor))?;
            cursor
        }
        Some(cursor) => cursor,
        None => {
            // A new sink starts at the oldest entry still in the outbox: entries
            // already cleaned up were delivered to every sink configured back then.
            let first = match store.trees().outbox.first()? {
                Some((key, _)) => key.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(1),
                None => lab.outbox().next_seq(),
            };
            let cursor = CursorState {
                next_seq: first,
                ..CursorState::default()
            };
            store
                .trees()
                .sink_state
                .insert(cursor_key(name), encode(&cursor))?;
            store.durable().await?;
            tracing::info!(
                sink = name,
                from_seq = first,
                "New sink: starting at the oldest entry in the outbox."
            );
            cursor
        }
    };
    let runtime = Arc::new(SinkRuntime::new(
        name.to_string(),
        kind,
        batch_size,
        cursor.next_seq,
    ));
    *runtime
        .status
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) =
        (cursor.last_error.clone(), cursor.next_attempt_ms);
    lab.outbox().register(Arc::clone(&runtime));
    Ok(runtime)
}

/// A batch as read from the store.
struct Batch {
    /// Entries in seq order: `Some(item)` to deliver, `None` for one meant for another
    /// sink only (passed over).
    entries: Vec<(u64, i64, Option<OutboxItem>)>,
}

fn read_batch(
    store: &Store,
    sink: &str,
    cursor: &CursorState,
    size: usize,
) -> Result<Batch, StoreError> {
    let mut entries = Vec::new();
    let mut items = 0;
    for entry in store.trees().outbox.range(outbox_key(cursor.next_seq)..) {
        let (key, raw) = entry?;
        let seq = key.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
        let entry: OutboxEntry = decode(&key, &raw)?;
        if entry.only_sink.as_deref().is_some_and(|only| only != sink) {
            entries.push((seq, entry.released_ms, None));
            continue;
        }
        let rkey = result_key(&entry.result_id, entry.version);
        let stored: StoredResult = match store.trees().results.get(&rkey)? {
            Some(raw) => decode(&rkey, &raw)?,
            None => {
                return Err(StoreError::BadRecord {
                    tree: "outbox",
                    key: seq.to_string(),
                    detail: format!(
                        "points at result {}:{} which the results tree does not have",
                        entry.result_id, entry.version
                    ),
                });
            }
        };
        let record: ResultRecord = stored.record(&rkey)?;
        let attempt = if cursor.attempt_seq == seq {
            cursor.attempt
        } else {
            0
        };
        entries.push((
            seq,
            entry.released_ms,
            Some(OutboxItem {
                seq,
                record,
                attempt,
            }),
        ));
        items += 1;
        if items >= size {
            break;
        }
    }
    Ok(Batch { entries })
}

/// Runs a sink's delivery loop until the runtime shuts down.
pub async fn run<D: Deliver>(lab: Arc<Lab>, sink: Arc<SinkRuntime>, mut deliverer: D) {
    let mut released = lab.outbox().subscribe();
    let mut rng = Jitter::seeded(&sink.name);
    loop {
        // Mark the current release as seen before reading the outbox: a release that
        // commits while this step runs then still wakes the idle wait below.
        released.borrow_and_update();
        match step(&lab, &sink, &mut deliverer, &mut rng).await {
            Ok(Step::Idle) => {
                tokio::select! {
                    _ = released.changed() => {}
                    () = sink.wake.notified() => {}
                }
            }
            Ok(Step::Progress) => {}
            Ok(Step::Wait(until)) => {
                tokio::select! {
                    () = tokio::time::sleep(until) => {}
                    () = sink.wake.notified() => {}
                }
            }
            Err(e) => {
                tracing::error!(sink = %sink.name, error = %e, "Outbox worker: store error; retrying in 1 s.");
                if lab.store().failure().is_some() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

enum Step {
    /// Nothing to deliver.
    Idle,
    /// Delivered something; look again at once.
    Progress,
    /// A retry is due after this long.
    Wait(Duration),
}

async fn step<D: Deliver>(
    lab: &Arc<Lab>,
    sink: &Arc<SinkRuntime>,
    deliverer: &mut D,
    rng: &mut Jitter,
) -> Result<Step, StoreError> {
    let store = lab.store().clone();
    let name = sink.name.clone();
    let mut cursor = load_cursor(&store, &name)?.unwrap_or_default();
    if let Some(at) = cursor.next_attempt_ms {
        let now = now_ms();
        if at > now {
            return Ok(Step::Wait(Duration::from_millis((at - now) as u64)));
        }
    }
    let size = sink.batch_size;
    let read_store = store.clone();
    let read_name = name.clone();
    let read_cursor = cursor.clone();
    let batch = tokio::task::spawn_blocking(move || {
        read_batch(&read_store, &read_name, &read_cursor, size)
    })
    .await
    .map_err(|e| StoreError::BadRecord {
        tree: "outbox",
        key: String::new(),
        detail: format!("reader task failed: {e}"),
    })??;
    if batch.entries.is_empty() {
        return Ok(Step::Idle);
    }
    let items: Vec<OutboxItem> = batch
        .entries
        .iter()
        .filter_map(|(_, _, item)| item.clone())
        .collect();
    let outcomes = if items.is_empty() {
        Vec::new()
    } else {
        let first = items[0].seq;
        let last = items[items.len() - 1].seq;
        *sink
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((first, last));
        let started = Instant::now();
        let outcomes = deliverer.deliver(&items).await;
        sink.latency.observe(started.elapsed());
        outcomes
    };

    // Apply the outcomes in order; the first retry stops the batch.
    let mut writes = sled::Batch::default();
    let mut outcomes = outcomes.into_iter();
    let mut retry: Option<(String, Option<Duration>, u64)> = None;
    let mut delivered_now = Vec::new();
    let mut dead_now = 0u64;
    let now = now_ms();
    for (seq, released_ms, item) in &batch.entries {
        let Some(item) = item else {
            cursor.next_seq = seq + 1;
            continue;
        };
        let outcome = outcomes.next().unwrap_or(ItemOutcome::Retry {
            reason: "the sink returned no outcome for this item".into(),
            after: None,
        });
        match outcome {
            ItemOutcome::Delivered => {
                cursor.next_seq = seq + 1;
                cursor.delivered += 1;
                delivered_now.push(*released_ms);
            }
            ItemOutcome::Dead { reason, detail } => {
                let letter = DeadLetter {
                    sink: name.clone(),
                    seq: *seq,
                    idempotency_key: item.record.idempotency_key(),
                    reason,
                    detail: truncate_detail(&detail),
                    at_ms: now,
                    record_json: serde_json::to_string(&item.record).unwrap_or_default(),
                };
                tracing::warn!(sink = %name, seq, key = %letter.idempotency_key, ?reason, detail = %letter.detail, "Dead letter.");
                writes.insert(dead_key(&name, *seq), encode(&letter));
                cursor.next_seq = seq + 1;
                cursor.dead += 1;
                dead_now += 1;
            }
            ItemOutcome::Retry { reason, after } => {
                retry = Some((reason, after, *seq));
                break;
            }
        }
    }
    match &retry {
        Some((reason, after, seq)) => {
            if cursor.attempt_seq == *seq {
                cursor.attempt = cursor.attempt.saturating_add(1);
            } else {
                cursor.attempt_seq = *seq;
                cursor.attempt = 1;
            }
            let delay = backoff(cursor.attempt, *after, rng);
            cursor.last_error = Some(truncate_detail(reason));
            cursor.next_attempt_ms = Some(now + delay.as_millis() as i64);
            sink.retried.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(sink = %name, seq, attempt = cursor.attempt, delay_ms = delay.as_millis() as u64, error = %reason, "Delivery will be retried.");
        }
        None => {
            cursor.attempt = 0;
            cursor.next_attempt_ms = None;
            cursor.last_error = None;
        }
    }
    writes.insert(cursor_key(&name), encode(&cursor));
    let apply_store = store.clone();
    tokio::task::spawn_blocking(move || apply_store.trees().sink_state.apply_batch(writes))
        .await
        .map_err(|e| StoreError::BadRecord {
            tree: "sink_state",
            key: name.clone(),
            detail: format!("writer task failed: {e}"),
        })??;
    // Nothing counts as settled, and nothing is cleaned up, before this returns.
    store.durable().await?;
    sink.durable_cursor
        .store(cursor.next_seq, Ordering::Release);
    *sink
        .in_flight
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    *sink
        .status
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) =
        (cursor.last_error.clone(), cursor.next_attempt_ms);
    let acked = now_ms();
    for released_ms in &delivered_now {
        sink.turnaround
            .observe(Duration::from_millis((acked - released_ms).max(0) as u64));
    }
    sink.delivered
        .fetch_add(delivered_now.len() as u64, Ordering::Relaxed);
    sink.dead.fetch_add(dead_now, Ordering::Relaxed);
    let outbox_lab = Arc::clone(lab);
    let cleanup =
        tokio::task::spawn_blocking(move || outbox_lab.outbox().clean_up(outbox_lab.store())).await;
    if let Ok(Err(e)) = cleanup {
        // Cleaning up is idempotent: the next batch tries again.
        tracing::warn!(sink = %sink.name, error = %e, "Outbox cleanup failed.");
    }
    Ok(match retry {
        Some(_) => Step::Wait(Duration::from_millis(
            cursor
                .next_attempt_ms
                .map_or(0, |t| (t - now_ms()).max(0) as u64),
        )),
        None => Step::Progress,
    })
}

/// The wait before attempt `attempt + 1`: full jitter over an exponential ceiling
/// (base · 2^(attempt-1), capped), never shorter than the receiver's Retry-After.
pub fn backoff(attempt: u32, retry_after: Option<Duration>, rng: &mut Jitter) -> Duration {
    let exp = attempt.saturating_sub(1).min(20);
    let ceiling = BACKOFF_BASE.saturating_mul(1u32 << exp).min(BACKOFF_CAP);
    let drawn = ceiling.mul_f64(rng.unit()).max(BACKOFF_FLOOR);
    match retry_after {
        Some(after) => drawn.max(after.min(BACKOFF_CAP * 4)),
        None => drawn,
    }
}

/// A small xorshift generator for jitter; randomness quality does not matter here,
/// only that sinks and restarts do not retry in lockstep.
#[derive(Debug)]
pub struct Jitter(u64);

impl Jitter {
    pub fn seeded(salt: &str) -> Jitter {
        let mut seed = now_ms() as u64 ^ 0x9E37_79B9_7F4A_7C15;
        for b in salt.bytes() {
            seed = seed.rotate_left(5) ^ u64::from(b);
        }
        Jitter(seed | 1)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}
