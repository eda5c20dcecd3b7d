#![allow(clippy::unwrap_used)]
//! The driver over a damaged RTU line: replies with a bad CRC, a corrupted
//! byte under the old CRC, line noise instead of a reply, a pulled cable and a
//! port that goes away and comes back under the same name. The simulator's
//! replies pass through a relay that corrupts them on the wire
//! (`pcrd_drivers::sim::line`). Each test checks the same two things: a
//! corrupted reply is never returned as data (the read fails and the link is
//! dropped and rebuilt), and the driver carries on afterwards.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use pcrd_drivers::modbus::{
    BusConfig, BusHandle, EventKind, ExtractorEvent, ExtractorHandle, LinkConfig, ModbusError,
    SerialConfig, spawn_bus,
};
use pcrd_drivers::sim::extractor::{SimConfig, Simulator};
use pcrd_drivers::sim::line::{LineFault, RtuLine};
use pcrd_protocol::extractor::{ExtractorCommand, Profile, Table};
use tokio::sync::broadcast;

const PROFILE: &str = include_str!("../../profiles/sim-extractor.toml");
/// Upper bound for anything a test waits for; never a synchronisation sleep.
const PATIENCE: Duration = Duration::from_secs(20);

fn profile() -> Arc<Profile> {
    let mut p = Profile::from_toml_str(PROFILE).unwrap();
    p.poll_interval = Duration::from_millis(40);
    Arc::new(p)
}

fn simulator(run_time: Duration) -> Simulator {
    Simulator::new(
        profile(),
        &[1],
        SimConfig {
            run_time,
            ..SimConfig::default()
        },
    )
}

fn bus(path: &str) -> BusHandle {
    let mut serial = SerialConfig::new(path, 115_200);
    // The test keeps the pty's slave open too (see `line`).
    serial.exclusive = false;
    let mut c = BusConfig::new("test-line", LinkConfig::Rtu(serial));
    c.timeout = Duration::from_millis(400);
    c.settle = Duration::from_millis(100);
    c.backoff_min = Duration::from_millis(50);
    c.backoff_max = Duration::from_millis(200);
    spawn_bus(c)
}

/// A pty whose master end the simulator serves through a faulty line. The
/// returned slave handle stays open (unread) so the pty lives while the
/// driver reopens it by path.
fn line(sim: &Simulator) -> (RtuLine, String, tokio_serial::SerialStream) {
    use tokio_serial::SerialPort;
    let (master, slave) = tokio_serial::SerialStream::pair().unwrap();
    let path = slave.name().unwrap();
    (sim.serve_rtu_line(master).unwrap(), path, slave)
}

/// The identification registers as the simulator holds them.
fn identity() -> Vec<u16> {
    profile().encode_identity("PCRD-SIM-X96", 1.23)
}

async fn read_identity(bus: &BusHandle) -> Result<Vec<u16>, ModbusError> {
    bus.read(1, Table::Holding, 0, 9).await
}

/// Injects `fault` for one reply and checks the read fails as a link
/// failure (never data), the link is dropped, and the next read is right.
async fn one_bad_reply_is_refused(fault: LineFault) {
    let sim = simulator(Duration::from_secs(1));
    let (line, path, _keep) = line(&sim);
    let bus = bus(&path);
    assert_eq!(read_identity(&bus).await.unwrap(), identity());
    let drops = bus.stats().link_drops.load(Ordering::Relaxed);

    line.inject(fault.clone());
    let bad = read_identity(&bus).await;
    assert_eq!(line.corrupted(), 1, "the fault was not applied");
    let err = bad.expect_err("a corrupted reply was returned as data");
    assert!(err.is_link_failure(), "{fault:?}: {err:?}");
    assert!(
        bus.stats().link_drops.load(Ordering::Relaxed) > drops,
        "the link was not dropped after {err}"
    );
    // The link is rebuilt and the next answers are the device's.
    for _ in 0..3 {
        assert_eq!(read_identity(&bus).await.unwrap(), identity());
    }
    assert!(bus.stats().reconnects.load(Ordering::Relaxed) >= 1);
}

#[tokio::test]
async fn a_reply_with_a_bad_crc_is_never_data() {
    one_bad_reply_is_refused(LineFault::BadCrc { count: 1 }).await;
}

#[tokio::test]
async fn a_reply_with_a_corrupted_byte_under_its_old_crc_is_never_data() {
    one_bad_reply_is_refused(LineFault::CorruptByte { count: 1 }).await;
}

#[tokio::test]
async fn line_noise_instead_of_a_reply_is_never_data() {
    // Starts like a reply from unit 1 to FC03 with 18 bytes, but is not one.
    let noise = vec![
        0x01, 0x03, 0x12, 0xFF, 0x00, 0x55, 0xAA, 0x13, 0x37, 0x00, 0x00, 0xFF, 0xFE, 0x01,
    ];
    one_bad_reply_is_refused(LineFault::Garbage {
        bytes: noise,
        count: 1,
    })
    .await;
}

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

fn progress(seen: &[EventKind]) -> Vec<f64> {
    seen.iter()
        .filter_map(|k| match k {
            EventKind::Progress { progress, .. } => Some(*progress),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_run_is_followed_to_completion_through_corrupted_replies() {
    let sim = simulator(Duration::from_secs(3));
    let (line, path, _keep) = line(&sim);
    let extractor = ExtractorHandle::new("ext-noisy", 1, profile(), bus(&path));
    let mut rx = extractor.subscribe();
    let _monitor = extractor.monitor();
    let mut seen = Vec::new();
    wait_for(&mut rx, &mut seen, |k| {
        matches!(k, EventKind::Online { .. })
    })
    .await;
    sim.operate(1, ExtractorCommand::LoadProtocol(2)).unwrap();
    sim.operate(
        1,
        ExtractorCommand::Start {
            barcode: "EXT-NOISY".into(),
        },
    )
    .unwrap();
    wait_for(&mut rx, &mut seen, |k| {
        matches!(k, EventKind::Progress { .. })
    })
    .await;
    // Every kind of damage, several times, during the run.
    for _ in 0..2 {
        line.inject(LineFault::CorruptByte { count: 1 });
        line.inject(LineFault::BadCrc { count: 1 });
        line.inject(LineFault::Garbage {
            bytes: vec![0x01, 0x03, 0x12, 0x00, 0x02],
            count: 1,
        });
    }
    wait_for(&mut rx, &mut seen, |k| {
        matches!(k, EventKind::Completed { .. })
    })
    .await;
    assert!(
        line.corrupted() >= 6,
        "faults applied: {}",
        line.corrupted()
    );
    // No corrupted value got through: progress only ever went up, nothing was
    // flagged as implausible, and the barcode is the one started.
    let p = progress(&seen);
    assert!(p.windows(2).all(|w| w[0] <= w[1]), "{p:?}");
    assert!(
        !seen
            .iter()
            .any(|k| matches!(k, EventKind::Anomalies(_) | EventKind::DeviceError(_))),
        "{seen:#?}"
    );
    let status = extractor.status().await.unwrap();
    assert_eq!(status.barcode, "EXT-NOISY");
    assert!(status.completed(), "{status:?}");
}

#[tokio::test]
async fn a_pulled_cable_is_offline_and_the_run_is_resynchronised_when_it_is_back() {
    let sim = simulator(Duration::from_secs(3));
    let (line, path, _keep) = line(&sim);
    let extractor = ExtractorHandle::new("ext-cable", 1, profile(), bus(&path));
    let mut rx = extractor.subscribe();
    let _monitor = extractor.monitor();
    let mut seen = Vec::new();
    wait_for(&mut rx, &mut seen, |k| {
        matches!(k, EventKind::Online { .. })
    })
    .await;
    sim.operate(1, ExtractorCommand::LoadProtocol(2)).unwrap();
    sim.operate(
        1,
        ExtractorCommand::Start {
            barcode: "EXT-CABLE".into(),
        },
    )
    .unwrap();
    wait_for(&mut rx, &mut seen, |k| {
        matches!(k, EventKind::Progress { .. })
    })
    .await;

    line.inject(LineFault::Unplugged);
    let offline = wait_for(&mut rx, &mut seen, |k| {
        matches!(k, EventKind::Offline { .. })
    })
    .await;
    let EventKind::Offline { reason } = offline else {
        unreachable!()
    };
    assert!(reason.contains("no reply"), "{reason}");

    line.plug_in();
    let online = wait_for(&mut rx, &mut seen, |k| {
        matches!(k, EventKind::Online { .. })
    })
    .await;
    assert!(
        matches!(
            online,
            EventKind::Online {
                resynchronised: true,
                ..
            }
        ),
        "{online:?}"
    );
    wait_for(&mut rx, &mut seen, |k| {
        matches!(k, EventKind::Completed { .. })
    })
    .await;
    // Followed, not restarted.
    assert_eq!(sim.commands(1).len(), 2);
}

/// A USB–serial adapter unplugged and plugged back: the port closes under the
/// driver, and comes back as another device node behind the same stable name
/// (udev's /dev/serial/by-id/... symlink, here a symlink in a temp dir).
#[tokio::test]
async fn a_closed_port_is_offline_and_reopened_when_it_comes_back() {
    let sim = simulator(Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let by_id = dir.path().join("usb-FTDI_extractor-if00-port0");
    let (mut first, first_path, keep_first) = line(&sim);
    std::os::unix::fs::symlink(&first_path, &by_id).unwrap();
    let extractor = ExtractorHandle::new("ext-usb", 1, profile(), bus(by_id.to_str().unwrap()));
    let mut rx = extractor.subscribe();
    let _monitor = extractor.monitor();
    let mut seen = Vec::new();
    wait_for(&mut rx, &mut seen, |k| {
        matches!(k, EventKind::Online { .. })
    })
    .await;

    // Unplugged: the port's other end closes; the old node is gone.
    first.close().await;
    drop(keep_first);
    let offline = wait_for(&mut rx, &mut seen, |k| {
        matches!(k, EventKind::Offline { .. })
    })
    .await;
    let EventKind::Offline { reason } = offline else {
        unreachable!()
    };
    assert!(!reason.is_empty());

    // Plugged back: a new node, the same stable name.
    let (_second, second_path, _keep_second) = line(&sim);
    std::fs::remove_file(&by_id).unwrap();
    std::os::unix::fs::symlink(&second_path, &by_id).unwrap();
    wait_for(&mut rx, &mut seen, |k| {
        matches!(k, EventKind::Online { .. })
    })
    .await;
    assert!(extractor.status().await.is_ok());
    assert!(extractor.bus().stats().reconnects.load(Ordering::Relaxed) >= 1);
}
