#![allow(clippy::unwrap_used)]
//! The Modbus extractor driver against the simulator, over TCP on 127.0.0.1
//! and over RTU on a pseudo-terminal pair: whole extractions, late replies,
//! lost command replies, exceptions, device errors and a dropped link.

use std::sync::Arc;
use std::time::Duration;

use pcrd_drivers::modbus::bus::Op;
use pcrd_drivers::modbus::{
    BusConfig, BusHandle, CommandOutcome, EventKind, ExtractorEvent, ExtractorHandle, LinkConfig,
    ModbusError, SerialConfig, spawn_bus,
};
use pcrd_drivers::sim::extractor::{Fault, SimConfig, Simulator};
use pcrd_protocol::extractor::{Anomaly, ExtractorCommand, ExtractorState, Profile, Table};
use tokio::sync::broadcast;
use tokio_serial::SerialPort;

const PROFILE: &str = include_str!("../../profiles/sim-extractor.toml");
/// Upper bound for anything a test waits for; never a synchronisation sleep.
const PATIENCE: Duration = Duration::from_secs(20);

fn profile() -> Arc<Profile> {
    let mut p = Profile::from_toml_str(PROFILE).unwrap();
    // Fast polling so runs of a second or two are followed closely.
    p.poll_interval = Duration::from_millis(40);
    Arc::new(p)
}

fn sim_config(run_time_ms: u64) -> SimConfig {
    SimConfig {
        run_time: Duration::from_millis(run_time_ms),
        ..SimConfig::default()
    }
}

fn bus_config(link: LinkConfig) -> BusConfig {
    let mut c = BusConfig::new("test-bus", link);
    // Generous: two cores running the whole workspace's tests at once.
    c.timeout = Duration::from_secs(1);
    c.settle = Duration::from_millis(300);
    c.backoff_min = Duration::from_millis(50);
    c.backoff_max = Duration::from_millis(200);
    c
}

/// A pseudo-terminal pair: the simulator serves the master end; the driver
/// opens the slave by path, as it would a real port. The original slave
/// handle stays open (unread) so the pty lives while the driver reopens it.
fn pty() -> (
    tokio_serial::SerialStream,
    String,
    tokio_serial::SerialStream,
) {
    let (master, slave) = tokio_serial::SerialStream::pair().unwrap();
    let path = slave.name().unwrap();
    (master, path, slave)
}

fn rtu_link(path: &str) -> LinkConfig {
    let mut serial = SerialConfig::new(path, 115_200);
    serial.exclusive = false;
    LinkConfig::Rtu(serial)
}

/// Collects events until one satisfies `done`; panics with what was seen
/// after [`PATIENCE`].
async fn wait_for(
    rx: &mut broadcast::Receiver<ExtractorEvent>,
    seen: &mut Vec<EventKind>,
    done: impl Fn(&EventKind) -> bool,
) -> EventKind {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(event)) => {
                seen.push(event.kind.clone());
                if done(&event.kind) {
                    return event.kind;
                }
            }
            Ok(Err(e)) => panic!("event channel: {e}; seen {seen:#?}"),
            Err(_) => panic!("timed out; events seen: {seen:#?}"),
        }
    }
}

async fn whole_extraction(extractor: &ExtractorHandle, barcode: &str) -> Vec<EventKind> {
    let mut rx = extractor.subscribe();
    let _monitor = extractor.monitor();
    let mut seen = Vec::new();
    wait_for(&mut rx, &mut seen, |k| {
        matches!(k, EventKind::Online { .. })
    })
    .await;
    assert_eq!(
        extractor.load_protocol(3).await.unwrap(),
        CommandOutcome::Acknowledged
    );
    assert_eq!(
        extractor.start(barcode).await.unwrap(),
        CommandOutcome::Acknowledged
    );
    let done = wait_for(&mut rx, &mut seen, |k| {
        matches!(k, EventKind::Completed { .. })
    })
    .await;
    assert_eq!(
        done,
        EventKind::Completed {
            barcode: barcode.into(),
            protocol: 3
        }
    );
    let progress: Vec<f64> = seen
        .iter()
        .filter_map(|k| match k {
            EventKind::Progress { progress, .. } => Some(*progress),
            _ => None,
        })
        .collect();
    assert!(progress.len() >= 3, "progress reported: {seen:#?}");
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
    assert!(seen.iter().any(|k| matches!(
        k,
        EventKind::StatusChanged {
            to: ExtractorState::Running,
            ..
        }
    )));
    let status = extractor.status().await.unwrap();
    assert!(status.completed(), "{status:?}");
    assert_eq!(status.barcode, barcode);
    seen
}

#[tokio::test]
async fn tcp_whole_extraction_identify_load_start_progress_completed() {
    let sim = Simulator::new(profile(), &[1], sim_config(800));
    let server = sim.serve_tcp().await.unwrap();
    let bus = spawn_bus(bus_config(LinkConfig::Tcp { addr: server.addr }));
    let extractor = ExtractorHandle::new("ext-tcp", 1, profile(), bus);
    let id = extractor.identify().await.unwrap();
    assert_eq!(id.model, "PCRD-SIM-X96");
    assert!((id.firmware - 1.23).abs() < 1e-9);
    whole_extraction(&extractor, "EXT-0001").await;
    assert_eq!(
        sim.commands(1),
        vec![
            ExtractorCommand::LoadProtocol(3),
            ExtractorCommand::Start {
                barcode: "EXT-0001".into()
            }
        ]
    );
}

#[tokio::test]
async fn rtu_one_bus_task_serves_two_units_through_whole_extractions() {
    let (master, path, _keep) = pty();
    let sim = Simulator::new(profile(), &[1, 2], sim_config(800));
    let _server = sim.serve_rtu(master);
    let bus = spawn_bus(bus_config(rtu_link(&path)));
    let a = ExtractorHandle::new("ext-a", 1, profile(), bus.clone());
    let b = ExtractorHandle::new("ext-b", 2, profile(), bus.clone());
    assert_eq!(a.identify().await.unwrap().model, "PCRD-SIM-X96");
    let (ra, rb) = tokio::join!(
        whole_extraction(&a, "PLATE-A"),
        whole_extraction(&b, "PLATE-B")
    );
    assert!(!ra.is_empty() && !rb.is_empty());
    assert_eq!(sim.status(1).barcode, "PLATE-A");
    assert_eq!(sim.status(2).barcode, "PLATE-B");
    // A unit that is not on the bus stays silent: a timeout, and the bus
    // still serves the others afterwards.
    let ghost = ExtractorHandle::new("ghost", 9, profile(), bus);
    assert!(matches!(ghost.status().await, Err(ModbusError::Timeout(_))));
    assert!(a.status().await.unwrap().completed());
}

/// The identification block (9 registers at 0) and the first 9 status
/// registers (at 10) as the device holds them now.
fn expected_blocks(sim: &Simulator, profile: &Profile) -> (Vec<u16>, Vec<u16>) {
    let identity = profile.encode_identity("PCRD-SIM-X96", 1.23);
    let status = profile.encode_status(&sim.status(1))[..9].to_vec();
    assert_ne!(identity, status);
    (identity, status)
}

/// A bus whose timeout is shorter than the late reply the test injects
/// ([`LATE`]), and whose settle time outlasts it.
fn late_bus(link: LinkConfig) -> BusHandle {
    let mut c = bus_config(link);
    c.timeout = Duration::from_millis(300);
    c.settle = LATE + Duration::from_millis(200);
    spawn_bus(c)
}

const LATE: Duration = Duration::from_millis(900);

async fn late_reply_is_dropped(bus: &BusHandle, sim: &Simulator) {
    let p = profile();
    let (identity, status) = expected_blocks(sim, &p);
    // Warm the link so the late request is not the connect.
    assert_eq!(bus.read(1, Table::Holding, 0, 9).await.unwrap(), identity);
    sim.inject(
        1,
        Fault::Late {
            delay: LATE,
            count: 1,
        },
    );
    let late = bus.read(1, Table::Holding, 0, 9).await;
    assert!(matches!(late, Err(ModbusError::Timeout(_))), "{late:?}");
    // Same function, same length, another address: a reused context would
    // return the identity registers here.
    let next = bus
        .call(
            1,
            Op::Read {
                table: Table::Holding,
                address: 10,
                count: 9,
            },
        )
        .await
        .unwrap();
    assert_eq!(next, status, "the late reply was taken as the next answer");
    assert_eq!(bus.read(1, Table::Holding, 0, 9).await.unwrap(), identity);
}

#[tokio::test]
async fn tcp_late_reply_is_never_taken_as_the_next_answer() {
    let sim = Simulator::new(profile(), &[1], sim_config(800));
    let server = sim.serve_tcp().await.unwrap();
    let bus = late_bus(LinkConfig::Tcp { addr: server.addr });
    late_reply_is_dropped(&bus, &sim).await;
}

#[tokio::test]
async fn rtu_late_reply_is_never_taken_as_the_next_answer() {
    let (master, path, _keep) = pty();
    let sim = Simulator::new(profile(), &[1], sim_config(800));
    let _server = sim.serve_rtu(master);
    let bus = late_bus(rtu_link(&path));
    late_reply_is_dropped(&bus, &sim).await;
}

/// The hazard the driver guards against, shown with tokio-modbus alone: a
/// context reused after a timeout on RTU returns the late reply to the
/// previous request as the answer to the next one (protocols.md §4.1). If
/// this stops failing, the simulator no longer produces the fault and the
/// test above proves nothing.
#[tokio::test]
async fn rtu_reused_context_takes_the_late_reply_which_is_why_the_driver_drops_it() {
    use tokio_modbus::prelude::*;
    let (master, path, _keep) = pty();
    let sim = Simulator::new(profile(), &[1], sim_config(800));
    let _server = sim.serve_rtu(master);
    let p = profile();
    let (identity, status) = expected_blocks(&sim, &p);
    let mut port = tokio_serial::new(&path, 115_200);
    port = port.timeout(Duration::from_millis(100));
    let mut serial = tokio_serial::SerialStream::open(&port).unwrap();
    serial.set_exclusive(false).unwrap();
    let mut ctx = rtu::attach_slave(serial, Slave(1));
    sim.inject(
        1,
        Fault::Late {
            delay: Duration::from_millis(250),
            count: 1,
        },
    );
    let first =
        tokio::time::timeout(Duration::from_millis(100), ctx.read_holding_registers(0, 9)).await;
    assert!(first.is_err(), "expected a timeout");
    // The next request goes out at once. The device answers in order, so
    // the first thing on the line is the late reply to the first request:
    // same unit, same function, same length, and the context takes it.
    let second = ctx.read_holding_registers(10, 9).await.unwrap().unwrap();
    assert_eq!(second, identity, "reused context got: {second:?}");
    assert_ne!(second, status);
}

async fn loaded_tcp() -> (
    Simulator,
    pcrd_drivers::sim::extractor::TcpSim,
    ExtractorHandle,
) {
    let sim = Simulator::new(profile(), &[1], sim_config(60_000));
    let server = sim.serve_tcp().await.unwrap();
    let bus = spawn_bus(bus_config(LinkConfig::Tcp { addr: server.addr }));
    let extractor = ExtractorHandle::new("ext", 1, profile(), bus);
    extractor.load_protocol(5).await.unwrap();
    (sim, server, extractor)
}

#[tokio::test]
async fn start_reply_lost_state_read_back_confirms_and_start_is_not_resent() {
    let (sim, _server, extractor) = loaded_tcp().await;
    sim.inject(1, Fault::NoAnswerToCommand { apply: true });
    let outcome = extractor.start("EXT-0042").await.unwrap();
    let CommandOutcome::ConfirmedByReadBack(status) = outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(status.state, ExtractorState::Running);
    assert_eq!(status.barcode, "EXT-0042");
    // load + exactly one start reached the command register.
    assert_eq!(sim.command_writes(1), 2);
}

#[tokio::test]
async fn start_lost_on_the_way_is_reported_not_confirmed_and_never_resent() {
    let (sim, _server, extractor) = loaded_tcp().await;
    sim.inject(1, Fault::NoAnswerToCommand { apply: false });
    let err = extractor.start("EXT-0043").await.unwrap_err();
    let ModbusError::NotConfirmed { command, observed } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(*command, "start");
    assert_eq!(observed.state, ExtractorState::Loaded);
    assert_eq!(sim.command_writes(1), 2, "start was resent");
    assert_eq!(sim.commands(1), vec![ExtractorCommand::LoadProtocol(5)]);
    // Abort has the same policy.
    extractor.start("EXT-0043").await.unwrap();
    sim.inject(1, Fault::NoAnswerToCommand { apply: false });
    let err = extractor.abort().await.unwrap_err();
    assert!(
        matches!(
            err,
            ModbusError::NotConfirmed {
                command: "abort",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(sim.command_writes(1), 4);
    assert_eq!(sim.status(1).state, ExtractorState::Running);
}

#[tokio::test]
async fn pause_reply_lost_is_resent_after_read_back_because_it_is_idempotent() {
    let (sim, _server, extractor) = loaded_tcp().await;
    extractor.start("EXT-0044").await.unwrap();
    sim.inject(1, Fault::NoAnswerToCommand { apply: false });
    assert_eq!(extractor.pause().await.unwrap(), CommandOutcome::Resent);
    assert_eq!(sim.status(1).state, ExtractorState::Paused);
    assert_eq!(
        extractor.resume().await.unwrap(),
        CommandOutcome::Acknowledged
    );
    assert_eq!(sim.status(1).state, ExtractorState::Running);
}

#[tokio::test]
async fn a_lost_reply_whose_state_cannot_be_read_back_is_outcome_unknown_not_resent() {
    let (sim, _server, extractor) = loaded_tcp().await;
    extractor.start("EXT-0045").await.unwrap();
    let writes = sim.command_writes(1);
    // The pause is applied but its reply is lost, and so is the read-back.
    sim.inject(
        1,
        Fault::NoAnswer {
            count: 2,
            apply_writes: true,
        },
    );
    let err = extractor.pause().await.unwrap_err();
    assert!(
        matches!(
            err,
            ModbusError::OutcomeUnknown {
                command: "pause",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(sim.command_writes(1), writes + 1);
    assert_eq!(sim.status(1).state, ExtractorState::Paused);
}

#[tokio::test]
async fn exceptions_are_device_answers_not_link_failures() {
    let (sim, _server, extractor) = loaded_tcp().await;
    sim.inject(1, Fault::Exception { code: 4, count: 1 });
    let err = extractor.status().await.unwrap_err();
    assert!(
        matches!(err, ModbusError::Exception { code: 4, .. }),
        "{err:?}"
    );
    assert!(!err.is_link_failure());
    // Busy (06) is retried a bounded number of times on reads...
    sim.inject(1, Fault::Exception { code: 6, count: 2 });
    assert_eq!(extractor.status().await.unwrap().protocol, 5);
    // ...and then reported.
    sim.inject(1, Fault::Exception { code: 6, count: 10 });
    let err = extractor.status().await.unwrap_err();
    assert!(
        matches!(err, ModbusError::Exception { code: 6, .. }),
        "{err:?}"
    );
    sim.clear_faults(1);
    // A command the state does not allow: the device rejects it (03).
    let err = extractor.resume().await.unwrap_err();
    assert!(
        matches!(err, ModbusError::Exception { code: 3, .. }),
        "{err:?}"
    );
    assert_eq!(extractor.status().await.unwrap().protocol, 5);
}

#[tokio::test]
async fn an_unanswered_read_times_out_and_the_rebuilt_link_answers_the_next() {
    let (sim, _server, extractor) = loaded_tcp().await;
    sim.inject(
        1,
        Fault::NoAnswer {
            count: 1,
            apply_writes: false,
        },
    );
    let err = extractor.status().await.unwrap_err();
    assert!(matches!(err, ModbusError::Timeout(_)), "{err:?}");
    assert!(err.is_link_failure());
    assert_eq!(extractor.status().await.unwrap().protocol, 5);
}

#[tokio::test]
async fn device_error_mid_run_is_reported_with_its_reason_and_acknowledged() {
    let sim = Simulator::new(profile(), &[1], sim_config(600));
    sim.inject(
        1,
        Fault::ErrorAt {
            at_percent: 40.0,
            code: 102,
        },
    );
    let server = sim.serve_tcp().await.unwrap();
    let bus = spawn_bus(bus_config(LinkConfig::Tcp { addr: server.addr }));
    let extractor = ExtractorHandle::new("ext", 1, profile(), bus);
    let mut rx = extractor.subscribe();
    let _monitor = extractor.monitor();
    extractor.load_protocol(1).await.unwrap();
    extractor.start("EXT-ERR").await.unwrap();
    let mut seen = Vec::new();
    let event = wait_for(&mut rx, &mut seen, |k| {
        matches!(k, EventKind::DeviceError(_))
    })
    .await;
    let EventKind::DeviceError(e) = event else {
        unreachable!()
    };
    assert_eq!(e.code, 102);
    assert_eq!(e.reason.as_deref(), Some("Magnetic rod head blocked"));
    assert!(
        !seen
            .iter()
            .any(|k| matches!(k, EventKind::Completed { .. }))
    );
    extractor.acknowledge_error().await.unwrap();
    let status = extractor.status().await.unwrap();
    assert_eq!(status.error, None);
    assert_eq!(status.state, ExtractorState::Aborted);
}

#[tokio::test]
async fn out_of_range_progress_is_flagged_and_never_a_completion() {
    let sim = Simulator::new(profile(), &[1], sim_config(400));
    let server = sim.serve_tcp().await.unwrap();
    let bus = spawn_bus(bus_config(LinkConfig::Tcp { addr: server.addr }));
    let extractor = ExtractorHandle::new("ext", 1, profile(), bus);
    let mut rx = extractor.subscribe();
    let _monitor = extractor.monitor();
    extractor.load_protocol(1).await.unwrap();
    extractor.start("EXT-BAD").await.unwrap();
    // 140.0 %: the device's register holds per mille.
    sim.inject(1, Fault::RawProgress { raw: 1400 });
    let mut seen = Vec::new();
    wait_for(&mut rx, &mut seen, |k| {
        matches!(
            k,
            EventKind::StatusChanged {
                to: ExtractorState::Completed,
                ..
            }
        )
    })
    .await;
    assert!(seen.iter().any(|k| matches!(
        k,
        EventKind::Anomalies(a) if matches!(a[..], [Anomaly::OutOfRange { field: "progress", .. }])
    )), "{seen:#?}");
    assert!(
        !seen
            .iter()
            .any(|k| matches!(k, EventKind::Completed { .. })),
        "{seen:#?}"
    );
}

#[tokio::test]
async fn stuck_progress_is_reported_as_stalled_and_the_run_stays_open() {
    let sim = Simulator::new(profile(), &[1], sim_config(300));
    sim.inject(1, Fault::StuckAt { at_percent: 30.0 });
    let server = sim.serve_tcp().await.unwrap();
    let bus = spawn_bus(bus_config(LinkConfig::Tcp { addr: server.addr }));
    let extractor =
        ExtractorHandle::new("ext", 1, profile(), bus).with_stall_after(Duration::from_millis(400));
    let mut rx = extractor.subscribe();
    let _monitor = extractor.monitor();
    extractor.load_protocol(1).await.unwrap();
    extractor.start("EXT-STUCK").await.unwrap();
    let mut seen = Vec::new();
    let stalled = wait_for(&mut rx, &mut seen, |k| {
        matches!(k, EventKind::Stalled { .. })
    })
    .await;
    let EventKind::Stalled { progress, for_s } = stalled else {
        unreachable!()
    };
    assert!((progress - 30.0).abs() < 1e-6, "{progress}");
    assert!(for_s >= 0.4);
    let status = extractor.status().await.unwrap();
    assert_eq!(status.state, ExtractorState::Running);
    assert!(
        !seen
            .iter()
            .any(|k| matches!(k, EventKind::Completed { .. }))
    );
}

#[tokio::test]
async fn disconnect_goes_offline_reconnects_and_resynchronises_the_run() {
    let sim = Simulator::new(profile(), &[1], sim_config(1500));
    let server = sim.serve_tcp().await.unwrap();
    let bus = spawn_bus(bus_config(LinkConfig::Tcp { addr: server.addr }));
    let extractor = ExtractorHandle::new("ext-net", 1, profile(), bus);
    let mut rx = extractor.subscribe();
    let _monitor = extractor.monitor();
    let mut seen = Vec::new();
    extractor.load_protocol(2).await.unwrap();
    extractor.start("EXT-NET").await.unwrap();
    wait_for(&mut rx, &mut seen, |k| {
        matches!(k, EventKind::Progress { .. })
    })
    .await;
    server.disconnect_for(Duration::from_millis(500)).await;
    let offline = wait_for(&mut rx, &mut seen, |k| {
        matches!(k, EventKind::Offline { .. })
    })
    .await;
    let EventKind::Offline { reason } = offline else {
        unreachable!()
    };
    assert!(!reason.is_empty());
    let online = wait_for(&mut rx, &mut seen, |k| {
        matches!(k, EventKind::Online { .. })
    })
    .await;
    let EventKind::Online {
        status,
        resynchronised,
    } = online
    else {
        unreachable!()
    };
    assert!(resynchronised, "{seen:#?}");
    assert_eq!(status.barcode, "EXT-NET");
    wait_for(&mut rx, &mut seen, |k| {
        matches!(k, EventKind::Completed { .. })
    })
    .await;
    // The run was followed, not restarted: one load, one start.
    assert_eq!(sim.command_writes(1), 2);
}

#[tokio::test]
async fn a_missing_serial_port_is_offline_with_the_reason() {
    let mut config = bus_config(rtu_link("/dev/pcrd-no-such-port"));
    config.backoff_min = Duration::from_secs(30);
    let bus = spawn_bus(config);
    let extractor = ExtractorHandle::new("ext-gone", 1, profile(), bus);
    let err = extractor.status().await.unwrap_err();
    let ModbusError::Offline { reason } = &err else {
        panic!("{err:?}");
    };
    assert!(reason.contains("/dev/pcrd-no-such-port"), "{reason}");
    // Within the backoff the bus answers at once with the same reason instead of
    // reopening the port for every caller.
    let started = std::time::Instant::now();
    let again = extractor.status().await.unwrap_err();
    assert!(matches!(again, ModbusError::Offline { .. }));
    assert!(started.elapsed() < Duration::from_millis(500));
}
