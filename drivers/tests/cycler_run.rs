#![allow(clippy::unwrap_used)]
//! The cycler driver against the simulated cycler, over a real pseudo-terminal
//! and over TCP on 127.0.0.1: whole runs whose curves give back the scenario's
//! Cts, a missed line refetched, a pulled cable mid-run, a lid opened mid-run,
//! garbage on the line, a start whose reply is lost, a sink that fails once.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pcrd_drivers::cycler::{
    CommandOutcome, CycleSink, CyclerConfig, CyclerEvent, CyclerHandle, CyclerLink, EventKind,
    SinkError, spawn_cycler,
};
use pcrd_drivers::sim::cycler::{
    CyclerFault, CyclerSim, CyclerSimConfig, PlateScenario, REFERENCE_THRESHOLD,
};
use pcrd_protocol::analysis::{AnalysisSettings, Ct, analyze_curve};
use pcrd_protocol::cycler::{
    Command, CycleData, FaultKind, Operation, Outcome, PlateMap, Response, RunState,
    ThermalProtocol,
};
use pcrd_protocol::domain::PlateFormat;
use tokio::sync::broadcast;

/// Upper bound for anything a test waits for; never a synchronisation sleep.
const PATIENCE: Duration = Duration::from_secs(30);
/// Data cycles of the test protocol.
const CYCLES: u32 = 40;
const CHANNELS: usize = 3;

fn protocol() -> ThermalProtocol {
    let line = format!("PROT:LOAD SHORT FAM,HEX,CY5 1x95@120 {CYCLES}x95@3/60@30R");
    match Command::parse(&line, &pcrd_protocol::cycler::Dialect::reference()).unwrap() {
        Command::LoadProtocol(p) => p,
        other => panic!("{other:?}"),
    }
}

fn plate() -> PlateMap {
    let wells = PlateFormat::Wells96
        .wells_column_major()
        .enumerate()
        .map(|(i, well)| {
            let label = match i {
                0 => "PC".to_owned(),
                1 => "NTC".to_owned(),
                _ => format!("SPC{i:04}"),
            };
            (well, label)
        })
        .collect();
    PlateMap {
        plate_id: "P0001".into(),
        format: PlateFormat::Wells96,
        wells,
    }
}

/// A cycle as the sink got it: its number and one line per channel.
type StoredCycle = (u32, Vec<CycleData>);

/// An in-memory sink that records every cycle in arrival order and can fail
/// once at a given cycle.
#[derive(Clone, Default)]
struct MemorySink {
    stored: Arc<Mutex<Vec<StoredCycle>>>,
    fail_once_at: Arc<Mutex<Option<u32>>>,
}

impl CycleSink for MemorySink {
    async fn store_cycle(&self, cycle: u32, readings: &[CycleData]) -> Result<(), SinkError> {
        let mut fail = self.fail_once_at.lock().unwrap();
        if *fail == Some(cycle) {
            *fail = None;
            return Err(SinkError("disk full (simulated)".into()));
        }
        self.stored.lock().unwrap().push((cycle, readings.to_vec()));
        Ok(())
    }
}

impl MemorySink {
    fn stored(&self) -> Vec<StoredCycle> {
        self.stored.lock().unwrap().clone()
    }
}

fn sim() -> CyclerSim {
    CyclerSim::new(CyclerSimConfig {
        cycle_time: Duration::from_millis(15),
        ..CyclerSimConfig::default()
    })
}

fn config(link: CyclerLink) -> CyclerConfig {
    let mut c = CyclerConfig::new("cycler-1", link);
    // Generous: two cores running the whole workspace's tests at once.
    c.timeout_cap = Some(Duration::from_secs(1));
    c.settle = Duration::from_millis(200);
    c.backoff_min = Duration::from_millis(50);
    c.backoff_max = Duration::from_millis(200);
    c
}

async fn tcp(
    sim: &CyclerSim,
    sink: MemorySink,
) -> (CyclerHandle, broadcast::Receiver<CyclerEvent>) {
    let addr = sim.serve_tcp().await.unwrap();
    let (handle, events, _task) = spawn_cycler(config(CyclerLink::Tcp(addr.to_string())), sink);
    (handle, events)
}

/// Waits for the first event matching `pred`, returning every event seen.
async fn wait_for(
    events: &mut broadcast::Receiver<CyclerEvent>,
    seen: &mut Vec<EventKind>,
    pred: impl Fn(&EventKind) -> bool,
) -> EventKind {
    tokio::time::timeout(PATIENCE, async {
        loop {
            let event = events.recv().await.unwrap();
            seen.push(event.kind.clone());
            if pred(&event.kind) {
                return event.kind;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out; events so far: {seen:#?}"))
}

async fn load_and_start(handle: &CyclerHandle) -> CommandOutcome {
    let id = handle.identify().await.unwrap();
    assert_eq!(id.model, "SIM-96");
    handle.load_plate(plate()).await.unwrap();
    handle.load_protocol(protocol()).await.unwrap();
    handle.start().await.unwrap()
}

async fn run_to_end(
    events: &mut broadcast::Receiver<CyclerEvent>,
    seen: &mut Vec<EventKind>,
) -> EventKind {
    wait_for(events, seen, |k| matches!(k, EventKind::RunFinished { .. })).await
}

/// Every cycle 1..=CYCLES stored once, in order, every channel with 96 readings;
/// and the curves' Cts at the scenario's threshold land near the true Cts.
fn check_curves(sink: &MemorySink, scenario: &PlateScenario) {
    let stored = sink.stored();
    let cycles: Vec<u32> = stored.iter().map(|(c, _)| *c).collect();
    assert_eq!(cycles, (1..=CYCLES).collect::<Vec<_>>());
    let names = ["FAM", "HEX", "CY5"];
    // curves[channel][well]
    let mut curves = vec![vec![Vec::new(); 96]; CHANNELS];
    for (_, lines) in &stored {
        assert_eq!(lines.len(), CHANNELS);
        let by_channel: BTreeMap<&str, &CycleData> =
            lines.iter().map(|l| (l.channel.as_str(), l)).collect();
        for (ch, name) in names.iter().enumerate() {
            let line = by_channel[name];
            assert_eq!(line.values.len(), 96);
            for (well, v) in line.values.iter().enumerate() {
                curves[ch][well].push(*v);
            }
        }
    }
    let settings = AnalysisSettings {
        fixed_threshold: Some(REFERENCE_THRESHOLD),
        ..AnalysisSettings::default()
    };
    let (mut positives, mut negatives) = (0, 0);
    for (ch, wells) in curves.iter().enumerate() {
        for (well, readings) in wells.iter().enumerate() {
            let result = analyze_curve(readings, &settings).unwrap();
            match (scenario.curves[well][ch].ct, result.ct) {
                (Some(truth), Ct::Determined(ct)) => {
                    positives += 1;
                    assert!(
                        (ct - truth).abs() < 1.0,
                        "well {well} channel {ch}: Ct {ct:.2}, true {truth:.2}"
                    );
                }
                (None, Ct::Undetermined) => negatives += 1,
                (truth, got) => panic!("well {well} channel {ch}: true {truth:?}, got {got:?}"),
            }
        }
    }
    // Internal control in every sample and the PC, targets in a third.
    assert!(positives > 96 && negatives > 96, "{positives} {negatives}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_run_over_a_pty() {
    let sim = sim();
    let (master, slave) = tokio_serial::SerialStream::pair().unwrap();
    let path = tokio_serial::SerialPort::name(&slave).unwrap();
    sim.serve(master);
    let sink = MemorySink::default();
    let (handle, mut events, _task) = spawn_cycler(
        config(CyclerLink::Serial {
            path,
            baud: 115_200,
        }),
        sink.clone(),
    );
    let mut seen = Vec::new();
    let started = load_and_start(&handle).await;
    assert_eq!(started, CommandOutcome::Replied(Response::Ack));
    let end = run_to_end(&mut events, &mut seen).await;
    assert_eq!(
        end,
        EventKind::RunFinished {
            outcome: Outcome::Completed,
            cycles: CYCLES
        }
    );
    assert!(seen.contains(&EventKind::RunStarted {
        protocol: "SHORT".into()
    }));
    assert_eq!(handle.status().await.unwrap().state, RunState::Completed);
    check_curves(&sink, &sim.scenario(PlateFormat::Wells96, CHANNELS));
    drop(slave);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_run_over_tcp() {
    let sim = sim();
    let sink = MemorySink::default();
    let (handle, mut events) = tcp(&sim, sink.clone()).await;
    let mut seen = Vec::new();
    load_and_start(&handle).await;
    run_to_end(&mut events, &mut seen).await;
    check_curves(&sink, &sim.scenario(PlateFormat::Wells96, CHANNELS));
    assert!(
        !seen.iter().any(|k| matches!(k, EventKind::Rejected { .. })),
        "{seen:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_line_is_refetched() {
    let sim = sim();
    sim.inject(CyclerFault::SkipLine {
        at_cycle: 5,
        channel: 1,
    });
    let sink = MemorySink::default();
    let (handle, mut events) = tcp(&sim, sink.clone()).await;
    let mut seen = Vec::new();
    load_and_start(&handle).await;
    let refetched = wait_for(&mut events, &mut seen, |k| {
        matches!(k, EventKind::Refetched { .. })
    })
    .await;
    let EventKind::Refetched { range } = refetched else {
        unreachable!()
    };
    assert_eq!(range.first, 5);
    assert!(seen.iter().any(|k| matches!(k, EventKind::Rejected { .. })));
    run_to_end(&mut events, &mut seen).await;
    check_curves(&sink, &sim.scenario(PlateFormat::Wells96, CHANNELS));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulled_cable_mid_run_goes_offline_and_the_run_completes() {
    let sim = sim();
    let sink = MemorySink::default();
    let (handle, mut events) = tcp(&sim, sink.clone()).await;
    let mut seen = Vec::new();
    load_and_start(&handle).await;
    wait_for(&mut events, &mut seen, |k| {
        *k == EventKind::CycleStored { cycle: 10 }
    })
    .await;
    sim.disconnect_for(Duration::from_millis(300));
    let offline = wait_for(&mut events, &mut seen, |k| {
        matches!(k, EventKind::Offline { .. })
    })
    .await;
    assert!(matches!(
        offline,
        EventKind::Offline {
            run_in_progress: true,
            ..
        }
    ));
    let online = wait_for(&mut events, &mut seen, |k| {
        matches!(k, EventKind::Online { .. })
    })
    .await;
    let EventKind::Online {
        status: Some(status),
        resynchronised: true,
    } = online
    else {
        panic!("{online:?}")
    };
    // The instrument kept running while the cable was out.
    assert!(status.cycle > 10, "{status:?}");
    wait_for(&mut events, &mut seen, |k| {
        matches!(k, EventKind::Refetched { .. })
    })
    .await;
    let end = run_to_end(&mut events, &mut seen).await;
    assert_eq!(
        end,
        EventKind::RunFinished {
            outcome: Outcome::Completed,
            cycles: CYCLES
        }
    );
    check_curves(&sink, &sim.scenario(PlateFormat::Wells96, CHANNELS));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lid_opening_mid_run_is_a_fault() {
    let sim = sim();
    sim.inject(CyclerFault::LidOpensAt { at_cycle: 12 });
    let sink = MemorySink::default();
    let (handle, mut events) = tcp(&sim, sink.clone()).await;
    let mut seen = Vec::new();
    load_and_start(&handle).await;
    let fault = wait_for(&mut events, &mut seen, |k| {
        matches!(k, EventKind::Fault { .. })
    })
    .await;
    assert!(matches!(
        fault,
        EventKind::Fault {
            kind: FaultKind::LidOpened,
            ..
        }
    ));
    let status = handle.status().await.unwrap();
    assert_eq!(status.state, RunState::Error);
    let cycles: Vec<u32> = sink.stored().iter().map(|(c, _)| *c).collect();
    assert_eq!(cycles, (1..=11).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_temperature_mid_run_is_a_fault() {
    let sim = sim();
    sim.inject(CyclerFault::OverTemperatureAt { at_cycle: 3 });
    let (handle, mut events) = tcp(&sim, MemorySink::default()).await;
    let mut seen = Vec::new();
    load_and_start(&handle).await;
    let fault = wait_for(&mut events, &mut seen, |k| {
        matches!(k, EventKind::Fault { .. })
    })
    .await;
    assert!(matches!(
        fault,
        EventKind::Fault {
            kind: FaultKind::BlockOverTemperature,
            ..
        }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_line_is_reported_and_the_run_completes() {
    let sim = sim();
    // Line noise, an unknown event, a non-numeric reading, a wrong well count,
    // a cycle going backwards (cycle 1 after cycle 2) and UTF-8.
    let backwards = format!("!CYCLE 1 FAM 96 {}", vec!["1000"; 96].join(","));
    let mut bytes = b"\x00\xff\x13noise\r\n!PAUSED\r\n!CYCLE 2 FAM 3 1,x,2\r\n".to_vec();
    bytes.extend_from_slice(b"!CYCLE 3 FAM 3 1,2,3\r\n");
    bytes.extend_from_slice(backwards.as_bytes());
    bytes.extend_from_slice(b"\r\n\xc3\xa9\r\n");
    sim.inject(CyclerFault::GarbageAt { at_cycle: 3, bytes });
    let (master, slave) = tokio_serial::SerialStream::pair().unwrap();
    let path = tokio_serial::SerialPort::name(&slave).unwrap();
    sim.serve(master);
    let sink = MemorySink::default();
    let (handle, mut events, _task) = spawn_cycler(
        config(CyclerLink::Serial { path, baud: 9_600 }),
        sink.clone(),
    );
    let mut seen = Vec::new();
    load_and_start(&handle).await;
    run_to_end(&mut events, &mut seen).await;
    let rejected: Vec<&String> = seen
        .iter()
        .filter_map(|k| match k {
            EventKind::Rejected { line, .. } => Some(line),
            _ => None,
        })
        .collect();
    assert!(rejected.len() >= 3, "{rejected:?}");
    assert!(rejected.iter().any(|l| l.contains("noise")), "{rejected:?}");
    assert!(
        rejected.iter().any(|l| l.as_str() == "!PAUSED"),
        "{rejected:?}"
    );
    assert!(
        rejected
            .iter()
            .any(|l| l.as_str() == "!CYCLE 2 FAM 3 1,x,2"),
        "{rejected:?}"
    );
    assert!(
        rejected
            .iter()
            .any(|l| l.as_str() == "!CYCLE 3 FAM 3 1,2,3"),
        "{rejected:?}"
    );
    assert!(rejected.contains(&&backwards), "{rejected:?}");
    assert!(rejected.len() >= 6, "{rejected:?}");
    check_curves(&sink, &sim.scenario(PlateFormat::Wells96, CHANNELS));
    drop(slave);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_whose_reply_is_lost_is_read_back_not_resent() {
    let sim = sim();
    sim.inject(CyclerFault::NoReplyTo(Operation::Start));
    let sink = MemorySink::default();
    let (handle, mut events) = tcp(&sim, sink.clone()).await;
    let mut seen = Vec::new();
    let outcome = load_and_start(&handle).await;
    assert!(
        matches!(&outcome, CommandOutcome::ConfirmedByReadBack(s) if matches!(s.state, RunState::Running | RunState::Completed)),
        "{outcome:?}"
    );
    run_to_end(&mut events, &mut seen).await;
    let starts = sim
        .commands()
        .iter()
        .filter(|c| **c == Command::Start)
        .count();
    assert_eq!(starts, 1);
    check_curves(&sink, &sim.scenario(PlateFormat::Wells96, CHANNELS));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cycle_the_sink_refused_is_fetched_again() {
    let sim = sim();
    let sink = MemorySink::default();
    *sink.fail_once_at.lock().unwrap() = Some(7);
    let (handle, mut events) = tcp(&sim, sink.clone()).await;
    let mut seen = Vec::new();
    load_and_start(&handle).await;
    wait_for(&mut events, &mut seen, |k| {
        matches!(k, EventKind::SinkFailed { cycle: 7, .. })
    })
    .await;
    wait_for(&mut events, &mut seen, |k| {
        *k == EventKind::CycleStored { cycle: 7 }
    })
    .await;
    run_to_end(&mut events, &mut seen).await;
    check_curves(&sink, &sim.scenario(PlateFormat::Wells96, CHANNELS));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cable_out_over_the_end_of_the_run_still_completes_it() {
    let sim = sim();
    let sink = MemorySink::default();
    let (handle, mut events) = tcp(&sim, sink.clone()).await;
    let mut seen = Vec::new();
    load_and_start(&handle).await;
    wait_for(&mut events, &mut seen, |k| {
        *k == EventKind::CycleStored { cycle: 30 }
    })
    .await;
    // 10 cycles of 15 ms are left: the run ends while the cable is out, so no
    // `!FINISHED` reaches the driver; it learns the end from `STAT?`.
    sim.disconnect_for(Duration::from_millis(600));
    let end = run_to_end(&mut events, &mut seen).await;
    assert_eq!(
        end,
        EventKind::RunFinished {
            outcome: Outcome::Completed,
            cycles: CYCLES
        }
    );
    assert!(seen.iter().any(|k| matches!(
        k,
        EventKind::Offline {
            run_in_progress: true,
            ..
        }
    )));
    check_curves(&sink, &sim.scenario(PlateFormat::Wells96, CHANNELS));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_the_missing_cycles_are_fetched() {
    let sim = sim();
    let addr = sim.serve_tcp().await.unwrap();
    let link = CyclerLink::Tcp(addr.to_string());
    let sink = MemorySink::default();
    let (handle, mut events, task) = spawn_cycler(config(link.clone()), sink.clone());
    let mut seen = Vec::new();
    load_and_start(&handle).await;
    wait_for(&mut events, &mut seen, |k| {
        *k == EventKind::CycleStored { cycle: 8 }
    })
    .await;
    // The daemon dies: its driver task with it.
    task.abort();
    let _ = task.await;
    drop(handle);
    let stored = sink.stored().len() as u32;
    assert!(stored >= 8);
    // The instrument runs on while the daemon is down.
    tokio::time::timeout(PATIENCE, async {
        while sim.cycles_read() < stored + 5 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    // The daemon comes back and tells the new driver what its store holds.
    let (handle, mut events, _task) = spawn_cycler(config(link), sink.clone());
    handle
        .resume_run(96, protocol().channels, stored)
        .await
        .unwrap();
    let mut seen = Vec::new();
    let end = run_to_end(&mut events, &mut seen).await;
    assert_eq!(
        end,
        EventKind::RunFinished {
            outcome: Outcome::Completed,
            cycles: CYCLES
        }
    );
    assert!(
        seen.iter()
            .any(|k| matches!(k, EventKind::Refetched { range } if range.first == stored + 1)),
        "{seen:#?}"
    );
    check_curves(&sink, &sim.scenario(PlateFormat::Wells96, CHANNELS));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_whose_reply_is_lost_is_asked_again() {
    let sim = sim();
    sim.inject(CyclerFault::NoReplyTo(Operation::Status));
    let (handle, _events) = tcp(&sim, MemorySink::default()).await;
    // The driver's own STAT? on connecting eats the fault or this call does;
    // either way the call gets its answer.
    let status = handle.status().await.unwrap();
    assert_eq!(status.state, RunState::Idle);
    let asked = sim
        .commands()
        .iter()
        .filter(|c| **c == Command::Status)
        .count();
    assert!(asked >= 3, "{asked}");
}
