//! The outbox against a real store, with scripted receivers standing in for sinks:
//! release validation, per-sink independence, retry then success, dead letters and
//! their re-queueing, cleanup, backoff bounds.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pcrd_protocol::upstream::{
    Interpretation, KitRef, RESULT_SCHEMA_VERSION, ResultRecord, ResultStatus, TargetCall,
    TargetResult,
};

use super::worker::{self, Deliver, Jitter, backoff};
use super::*;
use crate::kits::KitRegistry;
use crate::lab::{Actor, Lab, LabError};
use crate::sinks::{DeadReason, ItemOutcome, OutboxItem};
use crate::store::StoreOptions;

const LAB: &str = "LAB-UNIT";

fn record(n: u32, version: u32) -> ResultRecord {
    ResultRecord {
        schema_version: RESULT_SCHEMA_VERSION,
        result_id: format!("{LAB}-R1-T{n:06}"),
        version,
        tube: format!("T{n:06}"),
        pool_size: 1,
        plate: "P0001".into(),
        well: "A1".into(),
        run: "R1".into(),
        instrument: "cycler-1".into(),
        kit: KitRef {
            id: "kit".into(),
            version: "1".into(),
        },
        targets: vec![TargetResult {
            name: "N1".into(),
            dye: "FAM".into(),
            loinc: Some("94759-8".into()),
            ct: None,
            call: TargetCall::NotDetected,
        }],
        interpretation: Interpretation::Negative,
        status: if version == 1 {
            ResultStatus::Final
        } else {
            ResultStatus::Corrected
        },
        correction_reason: (version > 1).then(|| "re-read".to_string()),
        tested_at: "2026-11-27T06:00:00.000Z".into(),
        released_at: "2026-11-27T06:10:00.000Z".into(),
        released_by: "rob".into(),
        lab_id: LAB.into(),
    }
}

fn actor() -> Actor {
    Actor {
        user: "rob".into(),
        reason: None,
    }
}

fn open(dir: &std::path::Path) -> Arc<Lab> {
    let store = Store::open(&StoreOptions {
        path: dir.join("store"),
        cache_bytes: 4 * 1024 * 1024,
    })
    .unwrap();
    Lab::open(store, KitRegistry::load(None).unwrap(), LAB.into()).unwrap()
}

fn problems(e: LabError) -> (bool, Vec<String>) {
    match e {
        LabError::Invalid { problems, .. } => (false, problems),
        LabError::Conflict { problems, .. } => (true, problems),
        other => panic!("unexpected {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_are_validated_and_nothing_is_half_written() {
    let dir = tempfile::tempdir().unwrap();
    let lab = open(dir.path());
    let released = lab
        .release_results(actor(), vec![record(1, 1), record(2, 1), record(2, 2)])
        .await
        .unwrap();
    assert_eq!(
        released,
        vec![
            (format!("{LAB}-R1-T000001:1"), 1),
            (format!("{LAB}-R1-T000002:1"), 2),
            (format!("{LAB}-R1-T000002:2"), 3)
        ]
    );
    assert_eq!(lab.store().trees().outbox.len(), 3);
    assert_eq!(lab.store().trees().results.len(), 3);

    // A duplicate names itself; a good record beside it is not released either.
    let err = lab
        .release_results(actor(), vec![record(3, 1), record(1, 1)])
        .await
        .unwrap_err();
    let (conflict, list) = problems(err);
    assert!(conflict, "{list:?}");
    assert!(
        list[0].contains("T000001:1") && list[0].contains("already released"),
        "{list:?}"
    );
    assert_eq!(
        latest_version(lab.store(), &record(3, 1).result_id).unwrap(),
        None
    );

    // A gap, a correction without reason, a correction as version 1, a schema version
    // from the future, another lab: each named.
    let mut gap = record(1, 3);
    gap.correction_reason = Some("x".into());
    let mut no_reason = record(1, 2);
    no_reason.correction_reason = None;
    let mut corrected_first = record(4, 1);
    corrected_first.status = ResultStatus::Corrected;
    corrected_first.correction_reason = Some("x".into());
    let mut future = record(5, 1);
    future.schema_version = 2;
    let mut other_lab = record(6, 1);
    other_lab.lab_id = "ELSEWHERE".into();
    let mut reason_on_final = record(7, 1);
    reason_on_final.correction_reason = Some("why".into());
    let err = lab
        .release_results(
            actor(),
            vec![
                gap,
                no_reason,
                corrected_first,
                future,
                other_lab,
                reason_on_final,
            ],
        )
        .await
        .unwrap_err();
    let (conflict, list) = problems(err);
    assert!(!conflict);
    let joined = list.join("\n");
    for needle in [
        "needs a correction_reason",
        "at least 2",
        "schema_version 2",
        "ELSEWHERE",
        "only for status corrected",
        "must be version 2",
    ] {
        assert!(joined.contains(needle), "{needle}: {joined}");
    }
    assert_eq!(lab.store().trees().outbox.len(), 3, "nothing written");
    assert_eq!(stored_next_seq(lab.store()).unwrap(), 4);

    // One audit entry per released version.
    let audit = lab
        .audit(&crate::lab::AuditQuery {
            limit: 100,
            ..Default::default()
        })
        .unwrap();
    let actions: Vec<&str> = audit.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        ["result.released", "result.released", "result.corrected"]
    );
    assert!(audit[2].detail.contains("re-read"), "{:?}", audit[2].detail);

    // The seq survives a restart even with the outbox emptied.
    lab.store().trees().outbox.clear().unwrap();
    lab.store().close().unwrap();
    drop(lab);
    let lab = open(dir.path());
    let released = lab
        .release_results(actor(), vec![record(9, 1)])
        .await
        .unwrap();
    assert_eq!(released[0].1, 4, "seqs are never reused");
    lab.store().close().unwrap();
}

/// How a scripted receiver answers.
#[derive(Clone, Debug)]
enum Mode {
    Accept,
    /// Retry every item (a receiver that is down).
    Down,
    /// Refuse these keys for good, accept the rest.
    Refuse(HashSet<String>),
}

#[derive(Clone)]
struct Scripted {
    mode: Arc<Mutex<Mode>>,
    /// Keys as delivered, in order, with the attempt the outbox reported.
    log: Arc<Mutex<Vec<(String, u32)>>>,
}

impl Scripted {
    fn new(mode: Mode) -> Scripted {
        Scripted {
            mode: Arc::new(Mutex::new(mode)),
            log: Arc::new(Mutex::new(Vec::new())),
        }
    }
    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }
    fn delivered(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .map(|(k, _)| k.clone())
            .collect()
    }
}

impl Deliver for Scripted {
    async fn deliver(&mut self, items: &[OutboxItem]) -> Vec<ItemOutcome> {
        let mode = self.mode.lock().unwrap().clone();
        items
            .iter()
            .map(|item| {
                let key = item.record.idempotency_key();
                match &mode {
                    Mode::Down => ItemOutcome::Retry {
                        reason: "connection refused".into(),
                        after: None,
                    },
                    Mode::Refuse(keys) if keys.contains(&key) => ItemOutcome::Dead {
                        reason: DeadReason::Rejected,
                        detail: "400: unknown tube".into(),
                    },
                    _ => {
                        self.log.lock().unwrap().push((key, item.attempt));
                        ItemOutcome::Delivered
                    }
                }
            })
            .collect()
    }
}

async fn start(lab: &Arc<Lab>, name: &str, batch: usize, sink: Scripted) -> Arc<SinkRuntime> {
    let runtime = worker::prepare(lab, name, "scripted", batch).await.unwrap();
    tokio::spawn(worker::run(Arc::clone(lab), Arc::clone(&runtime), sink));
    runtime
}

async fn until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn keys(range: std::ops::RangeInclusive<u32>) -> Vec<String> {
    range.map(|n| format!("{LAB}-R1-T{n:06}:1")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sink_down_does_not_delay_another_and_drains_in_order_when_back() {
    let dir = tempfile::tempdir().unwrap();
    let lab = open(dir.path());
    let down = Scripted::new(Mode::Down);
    let up = Scripted::new(Mode::Accept);
    let down_rt = start(&lab, "down", 7, down.clone()).await;
    let up_rt = start(&lab, "up", 7, up.clone()).await;
    for chunk in (1..=60).collect::<Vec<u32>>().chunks(20) {
        lab.release_results(actor(), chunk.iter().map(|n| record(*n, 1)).collect())
            .await
            .unwrap();
    }
    until("the healthy sink", Duration::from_secs(10), || {
        up.delivered().len() == 60 && up_rt.durable_cursor.load(Ordering::Acquire) == 61
    })
    .await;
    assert_eq!(up.delivered(), keys(1..=60), "release order");
    assert!(down.delivered().is_empty());
    let status = lab.outbox().status(lab.store()).unwrap();
    let down_status = status.iter().find(|s| s.sink == "down").unwrap();
    assert_eq!(down_status.pending + down_status.in_flight, 60);
    assert_eq!(
        down_status.last_error.as_deref(),
        Some("connection refused")
    );
    assert!(down_status.attempt >= 1);
    let up_status = status.iter().find(|s| s.sink == "up").unwrap();
    assert_eq!((up_status.pending, up_status.delivered), (0, 60));
    // Nothing is cleaned up while one sink still needs it.
    assert_eq!(lab.store().trees().outbox.len(), 60);
    let key1 = record(1, 1);
    let states = lab
        .outbox()
        .delivery_state(lab.store(), &key1.result_id, 1)
        .unwrap()
        .unwrap();
    assert!(
        states.contains(&("up".to_string(), DeliveryState::Delivered)),
        "{states:?}"
    );
    assert!(
        states
            .iter()
            .any(|(s, st)| s == "down"
                && matches!(st, DeliveryState::Pending | DeliveryState::InFlight)),
        "{states:?}"
    );

    // Back up: the backlog drains on its own (first retries come within ~2 s).
    down.set(Mode::Accept);
    until("the recovered sink", Duration::from_secs(15), || {
        down.delivered().len() == 60
    })
    .await;
    assert_eq!(down.delivered(), keys(1..=60), "order kept across retries");
    // The head item was offered with its attempt count; later ones fresh.
    let first_attempt = down.log.lock().unwrap()[0].1;
    assert!(first_attempt >= 1, "attempt {first_attempt}");
    until("cleanup", Duration::from_secs(5), || {
        lab.store().trees().outbox.is_empty()
    })
    .await;
    assert_eq!(lab.store().trees().results.len(), 60, "results stay");
    assert_eq!(down_rt.durable_cursor.load(Ordering::Acquire), 61);
    assert_eq!(up_rt.durable_cursor.load(Ordering::Acquire), 61);
    let mut metrics = String::new();
    lab.outbox().render_metrics(lab.store(), &mut metrics);
    assert!(
        metrics.contains("pcrd_outbox_depth{sink=\"down\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pcrd_outbox_delivered_total{sink=\"up\"} 60"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pcrd_outbox_turnaround_seconds_count{sink=\"down\"} 60"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_keeps_a_copy_and_can_be_requeued_for_its_sink_only() {
    let dir = tempfile::tempdir().unwrap();
    let lab = open(dir.path());
    let bad = format!("{LAB}-R1-T000003:1");
    let picky = Scripted::new(Mode::Refuse([bad.clone()].into()));
    let other = Scripted::new(Mode::Accept);
    start(&lab, "picky", 100, picky.clone()).await;
    start(&lab, "other", 100, other.clone()).await;
    lab.release_results(actor(), (1..=5).map(|n| record(n, 1)).collect())
        .await
        .unwrap();
    until("delivery", Duration::from_secs(10), || {
        picky.delivered().len() == 4
            && other.delivered().len() == 5
            && lab
                .outbox()
                .sinks()
                .iter()
                .all(|s| s.durable_cursor.load(Ordering::Acquire) == 6)
    })
    .await;
    let letters = dead_letters(lab.store(), None).unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].sink, "picky");
    assert_eq!(letters[0].idempotency_key, bad);
    assert_eq!(letters[0].reason, DeadReason::Rejected);
    assert!(letters[0].detail.contains("unknown tube"));
    let copy: ResultRecord = serde_json::from_str(&letters[0].record_json).unwrap();
    assert_eq!(copy, record(3, 1));
    let state = |lab: &Arc<Lab>| {
        lab.outbox()
            .delivery_state(lab.store(), &record(3, 1).result_id, 1)
            .unwrap()
            .unwrap()
    };
    assert!(state(&lab).contains(&("picky".to_string(), DeliveryState::Dead)));
    assert!(state(&lab).contains(&("other".to_string(), DeliveryState::Delivered)));

    // An unknown key is refused by name and nothing changes.
    let err = lab
        .requeue_dead(actor(), None, RetrySelection::Keys(vec!["NOPE:1".into()]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("NOPE:1"), "{err}");
    let err = lab
        .requeue_dead(actor(), Some("ghost".into()), RetrySelection::All)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("ghost"), "{err}");

    picky.set(Mode::Accept);
    let requeued = lab
        .requeue_dead(actor(), None, RetrySelection::Keys(vec![bad.clone()]))
        .await
        .unwrap();
    assert_eq!(requeued.len(), 1);
    assert_eq!(requeued[0].sink, "picky");
    until("the re-queued letter", Duration::from_secs(10), || {
        picky.delivered().len() == 5
    })
    .await;
    assert_eq!(picky.delivered().last(), Some(&bad));
    assert!(dead_letters(lab.store(), None).unwrap().is_empty());
    // Delivered once the cursor past the re-queued entry is durable.
    until("the durable mark", Duration::from_secs(5), || {
        state(&lab).contains(&("picky".to_string(), DeliveryState::Delivered))
    })
    .await;
    // The other sink was not sent it again.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(other.delivered().len(), 5);
}

#[test]
fn backoff_is_jittered_capped_and_honours_retry_after() {
    let mut rng = Jitter::seeded("t");
    for attempt in 1..40 {
        let ceiling = (1u64 << (attempt - 1).min(20)).min(300);
        for _ in 0..50 {
            let d = backoff(attempt, None, &mut rng);
            assert!(d <= Duration::from_secs(ceiling), "{attempt}: {d:?}");
            assert!(d >= Duration::from_millis(50));
        }
    }
    let spread: HashSet<u128> = (0..50)
        .map(|_| backoff(10, None, &mut rng).as_millis())
        .collect();
    assert!(spread.len() > 40, "full jitter spreads retries");
    assert!(backoff(1, Some(Duration::from_secs(30)), &mut rng) >= Duration::from_secs(30));
}

#[test]
fn keys_sort_in_seq_order_and_split_back() {
    assert!(outbox_key(255) < outbox_key(256));
    assert!(dead_key("s", 9) < dead_key("s", 10));
    assert!(result_key("A", 2) < result_key("A", 10));
    assert_eq!(split_key("LAB:R1:T1:12"), Some(("LAB:R1:T1", 12)));
    assert_eq!(split_key("nokey"), None);
}

/// Runs `names` as accepting sinks on a fresh `Lab` over the store in `dir`.
async fn run_sinks(
    dir: &std::path::Path,
    names: &[&str],
) -> (Arc<Lab>, Vec<Scripted>, Vec<tokio::task::JoinHandle<()>>) {
    let lab = open(dir);
    let mut sinks = Vec::new();
    let mut handles = Vec::new();
    for name in names {
        let sink = Scripted::new(Mode::Accept);
        let runtime = worker::prepare(&lab, name, "scripted", 100).await.unwrap();
        handles.push(tokio::spawn(worker::run(
            Arc::clone(&lab),
            runtime,
            sink.clone(),
        )));
        sinks.push(sink);
    }
    (lab, sinks, handles)
}

async fn stop(lab: Arc<Lab>, handles: Vec<tokio::task::JoinHandle<()>>) {
    for handle in handles {
        handle.abort();
        let _ = handle.await;
    }
    lab.store().close().unwrap();
}

async fn drained(lab: &Arc<Lab>) {
    let next = lab.outbox().next_seq();
    until("drained and cleaned up", Duration::from_secs(10), || {
        lab.outbox()
            .sinks()
            .iter()
            .all(|s| s.durable_cursor.load(Ordering::Acquire) == next)
            && lab.store().trees().outbox.is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_sinks_start_at_the_oldest_entry_left_and_removed_ones_stop_holding_cleanup() {
    let dir = tempfile::tempdir().unwrap();
    // Releases before any sink exists wait in the outbox for the first one.
    let lab = open(dir.path());
    lab.release_results(actor(), (1..=3).map(|n| record(n, 1)).collect())
        .await
        .unwrap();
    lab.store().close().unwrap();
    drop(lab);

    let (lab, sinks, handles) = run_sinks(dir.path(), &["a"]).await;
    lab.release_results(actor(), (4..=10).map(|n| record(n, 1)).collect())
        .await
        .unwrap();
    drained(&lab).await;
    assert_eq!(
        sinks[0].delivered(),
        keys(1..=10),
        "the first sink gets everything"
    );
    stop(lab, handles).await;

    // "b" is added and "a" removed: b starts at the oldest entry left (none: after
    // the last release), and a no longer holds back cleanup.
    let (lab, sinks, handles) = run_sinks(dir.path(), &["b"]).await;
    lab.release_results(actor(), (11..=15).map(|n| record(n, 1)).collect())
        .await
        .unwrap();
    drained(&lab).await;
    assert_eq!(
        sinks[0].delivered(),
        keys(11..=15),
        "no replay of cleaned-up entries"
    );
    stop(lab, handles).await;

    // "a" comes back: it resumes after the entries cleaned up while it was away
    // (documented gap) and gets what is released from now on; its status does not
    // count the cleaned-up entries as pending.
    let (lab, sinks, handles) = run_sinks(dir.path(), &["a", "b"]).await;
    let status = lab.outbox().status(lab.store()).unwrap();
    assert!(status.iter().all(|s| s.pending == 0), "{status:?}");
    lab.release_results(actor(), (16..=17).map(|n| record(n, 1)).collect())
        .await
        .unwrap();
    drained(&lab).await;
    assert_eq!(sinks[0].delivered(), keys(16..=17));
    assert_eq!(sinks[1].delivered(), keys(16..=17));
    let delivered: Vec<u64> = lab
        .outbox()
        .status(lab.store())
        .unwrap()
        .iter()
        .map(|s| s.delivered)
        .collect();
    assert_eq!(
        delivered,
        [12, 7],
        "durable counts per sink across restarts"
    );
    stop(lab, handles).await;
}
