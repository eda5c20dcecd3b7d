#![allow(clippy::unwrap_used)]
//! The ASTM host against the simulated analyser, over TCP and over a pty: a results
//! message is stored once and its last frame is ACKed only after the store returned;
//! every line fault ends in a NAK and a resend that still stores the message exactly
//! once, or in a quarantine with the raw bytes, never in a corrupt result; a peer not
//! on the list is refused; orders reach the analyser.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pcrd_drivers::astm::{
    HostEvent, HostHandle, InboundMessage, MessageStore, QuarantineReason, Quarantined, SendError,
    SerialHostConfig, StoreError, TcpHostConfig, spawn_serial_host, spawn_tcp_host,
};
use pcrd_drivers::sim::analyser::{Analyser, AnalyserConfig, Fault, Scenario, SimSendError};
use pcrd_protocol::astm::ENQ;
use pcrd_protocol::astm::link::{AbortReason, LinkConfig, SendFailure};
use pcrd_protocol::astm::record::{HeaderSpec, Message, OrderSpec, TestId};
use tokio::io::AsyncReadExt;
use tokio::sync::{Notify, Semaphore, mpsc};

/// Upper bound for anything a test waits for; never a synchronisation sleep.
const PATIENCE: Duration = Duration::from_secs(20);

/// A store that records what it gets; `gated` blocks `store` until the test adds a
/// permit; `fail` makes `store` fail.
struct TestStore {
    stored: Mutex<Vec<InboundMessage>>,
    quarantined: Mutex<Vec<Quarantined>>,
    gate: Semaphore,
    entered: Notify,
    fail: AtomicBool,
    fail_quarantine: AtomicBool,
}

impl TestStore {
    fn new() -> Arc<TestStore> {
        Arc::new(TestStore {
            stored: Mutex::default(),
            quarantined: Mutex::default(),
            gate: Semaphore::new(Semaphore::MAX_PERMITS),
            entered: Notify::new(),
            fail: AtomicBool::new(false),
            fail_quarantine: AtomicBool::new(false),
        })
    }

    fn gated() -> Arc<TestStore> {
        Arc::new(TestStore {
            gate: Semaphore::new(0),
            ..Arc::into_inner(TestStore::new()).unwrap()
        })
    }

    fn stored(&self) -> Vec<InboundMessage> {
        self.stored.lock().unwrap().clone()
    }

    fn quarantined(&self) -> Vec<Quarantined> {
        self.quarantined.lock().unwrap().clone()
    }
}

impl MessageStore for TestStore {
    async fn store(&self, message: &InboundMessage) -> Result<(), StoreError> {
        self.entered.notify_one();
        self.gate.acquire().await.unwrap().forget();
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError("disk full".into()));
        }
        self.stored.lock().unwrap().push(message.clone());
        Ok(())
    }

    async fn quarantine(&self, item: &Quarantined) -> Result<(), StoreError> {
        if self.fail_quarantine.load(Ordering::SeqCst) {
            return Err(StoreError("disk full".into()));
        }
        self.quarantined.lock().unwrap().push(item.clone());
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum Transport {
    Tcp,
    Pty,
}

struct Rig {
    host: HostHandle,
    events: mpsc::UnboundedReceiver<HostEvent>,
    sim: Arc<Analyser>,
    _keep: Option<tokio_serial::SerialStream>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.host.shutdown();
    }
}

impl Rig {
    /// The next event that `pick` accepts (others are skipped).
    async fn wait_for<T>(&mut self, mut pick: impl FnMut(&HostEvent) -> Option<T>) -> T {
        tokio::time::timeout(PATIENCE, async {
            loop {
                let event = self.events.recv().await.expect("host stopped");
                if let Some(found) = pick(&event) {
                    return found;
                }
            }
        })
        .await
        .expect("event did not come")
    }

    async fn wait_stored(&mut self) {
        self.wait_for(|e| matches!(e, HostEvent::MessageStored { .. }).then_some(()))
            .await;
    }

    async fn wait_quarantined(&mut self) -> QuarantineReason {
        self.wait_for(|e| match e {
            HostEvent::Quarantined { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .await
    }
}

fn host_link() -> LinkConfig {
    LinkConfig::computer()
}

async fn rig(
    transport: Transport,
    store: Arc<TestStore>,
    link: LinkConfig,
    sim_config: AnalyserConfig,
) -> Rig {
    let (host, events, sim, keep) = match transport {
        Transport::Tcp => {
            let config = TcpHostConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                peers: vec![("AN01".into(), IpAddr::V4(Ipv4Addr::LOCALHOST))],
                link,
            };
            let (host, events) = spawn_tcp_host(config, store).await.unwrap();
            let sim = Analyser::connect_tcp(host.local_addr().unwrap(), sim_config)
                .await
                .unwrap();
            (host, events, sim, None)
        }
        Transport::Pty => {
            use tokio_serial::SerialPort;
            let (master, slave) = tokio_serial::SerialStream::pair().unwrap();
            let config = SerialHostConfig {
                instrument: "AN01".into(),
                path: slave.name().unwrap(),
                baud_rate: 115_200,
                link,
                exclusive: false,
                backoff_min: Duration::from_millis(50),
                backoff_max: Duration::from_millis(200),
            };
            let (host, events) = spawn_serial_host(config, store);
            let sim = Analyser::on_stream(master, sim_config);
            (host, events, sim, Some(slave))
        }
    };
    let mut rig = Rig {
        host,
        events,
        sim: Arc::new(sim),
        _keep: keep,
    };
    rig.wait_for(|e| matches!(e, HostEvent::LinkUp { .. }).then_some(()))
        .await;
    rig
}

/// The stored message is the scenario's, record for record.
fn assert_is_example(m: &InboundMessage) {
    assert_eq!(m.text, Scenario::example().text());
    assert_eq!(m.raw.first(), Some(&ENQ));
    let orders = m.records.orders();
    assert_eq!(orders.len(), 2);
    assert_eq!(orders[0].0.specimen_id(), "SPC0042");
    let values: Vec<_> = orders[0].1.iter().map(|r| r.value()).collect();
    assert_eq!(values, ["POS", "24.61", "26.02", "28.40"]);
    assert_eq!(orders[1].1[1].value(), "");
}

async fn final_ack_only_after_store(transport: Transport) {
    let store = TestStore::gated();
    let mut rig = rig(
        transport,
        store.clone(),
        host_link(),
        AnalyserConfig::default(),
    )
    .await;
    let sim = rig.sim.clone();
    let sending =
        tokio::spawn(async move { sim.send_results(&Scenario::example(), Vec::new()).await });
    tokio::time::timeout(PATIENCE, store.entered.notified())
        .await
        .unwrap();
    // The store is blocked: every frame but the last is ACKed, and the last stays
    // unacknowledged however long the store takes.
    let p = rig.sim.progress();
    assert!(p.frames > 2);
    assert_eq!(p.acked, p.frames - 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rig.sim.progress().acked, p.frames - 1);
    assert!(!sending.is_finished());
    assert!(store.stored().is_empty());

    store.gate.add_permits(1);
    let report = tokio::time::timeout(PATIENCE, sending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(report.naks, 0);
    assert_eq!(rig.sim.progress().acked, p.frames);
    rig.wait_stored().await;
    let stored = store.stored();
    assert_eq!(stored.len(), 1);
    assert_is_example(&stored[0]);
    assert!(store.quarantined().is_empty());
}

#[tokio::test]
async fn tcp_final_ack_only_after_store() {
    final_ack_only_after_store(Transport::Tcp).await;
}

#[tokio::test]
async fn pty_final_ack_only_after_store() {
    final_ack_only_after_store(Transport::Pty).await;
}

/// Each fault that spoils a frame ends in a NAK and a resend; the message is stored
/// exactly once, intact, and nothing is quarantined.
async fn frame_faults_store_once(transport: Transport) {
    let store = TestStore::new();
    let mut rig = rig(
        transport,
        store.clone(),
        host_link(),
        AnalyserConfig::default(),
    )
    .await;
    let faults = [
        (Fault::BadChecksum { frame: 2 }, 1),
        (Fault::WrongFrameNumber { frame: 3 }, 1),
        (
            Fault::OversizedFrame {
                frame: 1,
                len: 70_000,
            },
            1,
        ),
        (Fault::GarbageBefore { frame: 4 }, 0),
        (Fault::RepeatFrame { frame: 2 }, 0),
        (Fault::RepeatFrame { frame: 9 }, 0),
    ];
    for (n, (fault, naks)) in faults.into_iter().enumerate() {
        let report = rig
            .sim
            .send_results(&Scenario::example(), vec![fault.clone()])
            .await
            .unwrap();
        assert_eq!(report.naks, naks, "{fault:?}");
        rig.wait_stored().await;
        let stored = store.stored();
        assert_eq!(stored.len(), n + 1, "{fault:?}");
        assert_is_example(&stored[n]);
    }
    // Several faults in one message.
    let all = vec![
        Fault::BadChecksum { frame: 0 },
        Fault::WrongFrameNumber { frame: 5 },
        Fault::GarbageBefore { frame: 5 },
    ];
    let report = rig
        .sim
        .send_results(&Scenario::example(), all)
        .await
        .unwrap();
    assert_eq!(report.naks, 2);
    rig.wait_stored().await;
    assert_eq!(store.stored().len(), 7);
    assert!(store.quarantined().is_empty());
}

#[tokio::test]
async fn tcp_frame_faults_store_once() {
    frame_faults_store_once(Transport::Tcp).await;
}

#[tokio::test]
async fn pty_frame_faults_store_once() {
    frame_faults_store_once(Transport::Pty).await;
}

/// No EOT after a stored message: the receive timer runs out and the message is
/// quarantined (under its key, with its raw bytes) for the daemon to withdraw.
async fn missing_eot_is_quarantined(transport: Transport) {
    let store = TestStore::new();
    let mut link = host_link();
    link.receive_timeout = Duration::from_millis(300);
    let mut rig = rig(transport, store.clone(), link, AnalyserConfig::default()).await;
    rig.sim
        .send_results(&Scenario::example(), vec![Fault::MissingEot])
        .await
        .unwrap();
    rig.wait_stored().await;
    let reason = rig.wait_quarantined().await;
    assert_eq!(reason, QuarantineReason::Unconfirmed(AbortReason::Timeout));
    let stored = store.stored();
    let quarantined = store.quarantined();
    assert_eq!(stored.len(), 1);
    assert_eq!(quarantined.len(), 1);
    assert_eq!(quarantined[0].key.as_ref(), Some(&stored[0].key));
    assert_eq!(quarantined[0].raw, stored[0].raw);
}

#[tokio::test]
async fn tcp_missing_eot_is_quarantined() {
    missing_eot_is_quarantined(Transport::Tcp).await;
}

#[tokio::test]
async fn pty_missing_eot_is_quarantined() {
    missing_eot_is_quarantined(Transport::Pty).await;
}

#[tokio::test]
async fn records_out_of_hierarchy_are_quarantined_not_stored() {
    let store = TestStore::new();
    let mut rig = rig(
        Transport::Tcp,
        store.clone(),
        host_link(),
        AnalyserConfig::default(),
    )
    .await;
    let text = b"H|\\^&|||SIM\rR|1|^^^SARS2^E^Ct|24.61|||||F\rL|1|N\r".to_vec();
    rig.sim.send_text(text, Vec::new()).await.unwrap();
    let reason = rig.wait_quarantined().await;
    assert!(matches!(reason, QuarantineReason::Records(_)), "{reason:?}");
    assert!(store.stored().is_empty());
    let q = store.quarantined();
    assert_eq!(q.len(), 1);
    let raw = String::from_utf8_lossy(&q[0].raw);
    assert!(raw.contains("R|1|^^^SARS2^E^Ct|24.61"), "{raw}");
}

/// The store fails: the last frame is not ACKed, the analyser gives up and keeps the
/// message, and the bytes go to quarantine (not to results).
#[tokio::test]
async fn a_failing_store_leaves_the_last_frame_unacknowledged() {
    let store = TestStore::new();
    store.fail.store(true, Ordering::SeqCst);
    let mut sim_config = AnalyserConfig::default();
    sim_config.link.reply_timeout = Duration::from_millis(300);
    let mut rig = rig(Transport::Tcp, store.clone(), host_link(), sim_config).await;
    let outcome = rig.sim.send_results(&Scenario::example(), Vec::new()).await;
    let frames = rig.sim.progress().frames;
    assert_eq!(outcome, Err(SimSendError::NoReply(frames - 1)));
    rig.wait_for(|e| matches!(e, HostEvent::StoreFailed { .. }).then_some(()))
        .await;
    let reason = rig.wait_quarantined().await;
    assert_eq!(reason, QuarantineReason::Aborted(AbortReason::EotBeforeAck));
    assert!(store.stored().is_empty());
    // The whole message, under its key, from ENQ to the last frame's LF.
    let q = store.quarantined();
    let message = q.iter().find(|q| q.key.is_some()).unwrap();
    assert_eq!(message.key.as_ref().unwrap().seq, 0);
    assert_eq!(message.raw.first(), Some(&ENQ));
    assert!(message.raw.ends_with(b"\r\n"));
    let text = String::from_utf8_lossy(&message.raw);
    assert!(text.contains("SPC0043") && text.contains("L|1|N"), "{text}");
    // The lone EOT after it is not quarantined on its own.
    assert_eq!(q.len(), 1, "{q:?}");
}

#[tokio::test]
async fn a_peer_not_on_the_list_is_refused() {
    let config = TcpHostConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        peers: vec![("AN01".into(), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)))],
        link: host_link(),
    };
    let (host, mut events) = spawn_tcp_host(config, TestStore::new()).await.unwrap();
    let mut stream = tokio::net::TcpStream::connect(host.local_addr().unwrap())
        .await
        .unwrap();
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "the host closes the connection");
    let event = tokio::time::timeout(PATIENCE, events.recv())
        .await
        .unwrap()
        .unwrap();
    match event {
        HostEvent::PeerRefused { peer } => assert_eq!(peer.ip(), Ipv4Addr::LOCALHOST),
        other => panic!("unexpected {other:?}"),
    }
    assert!(!host.is_connected("AN01"));
    host.shutdown();
}

fn order(specimen: &str) -> Message {
    let header = HeaderSpec {
        sender: "pcrd".into(),
        timestamp: "20260115110000".into(),
        ..HeaderSpec::default()
    };
    let order = OrderSpec {
        specimen_id: specimen.into(),
        tests: vec![TestId::new("SARS2", &[])],
        ..OrderSpec::default()
    };
    Message::orders_message(&header, &[order])
}

async fn orders_arrive(transport: Transport) {
    let store = TestStore::new();
    let rig = rig(transport, store, host_link(), AnalyserConfig::default()).await;
    rig.host.send("AN01", order("SPC0100")).await.unwrap();
    // A NAK storm shorter than the attempt limit: the frames go again and arrive once.
    rig.sim.nak_storm(3);
    rig.host.send("AN01", order("SPC0101")).await.unwrap();
    assert_eq!(rig.sim.naks_sent(), 3);
    let orders = rig.sim.orders();
    let ids: Vec<_> = orders
        .iter()
        .map(|m| m.orders()[0].0.specimen_id().to_owned())
        .collect();
    assert_eq!(ids, ["SPC0100", "SPC0101"]);
    // A storm of six NAKs on one frame: the host gives up and says so.
    rig.sim.nak_storm(6);
    let outcome = rig.host.send("AN01", order("SPC0102")).await;
    assert_eq!(outcome, Err(SendError::Failed(SendFailure::TooManyNaks)));
    assert_eq!(rig.sim.orders().len(), 2);
    assert_eq!(
        rig.host.send("AN02", order("SPC0103")).await,
        Err(SendError::NotConnected("AN02".into()))
    );
}

#[tokio::test]
async fn tcp_orders_arrive() {
    orders_arrive(Transport::Tcp).await;
}

#[tokio::test]
async fn pty_orders_arrive() {
    orders_arrive(Transport::Pty).await;
}

/// Both ends bid at once: the instrument wins contention, the host waits for it and
/// then sends; the results are stored once and the order arrives.
async fn contention(transport: Transport) {
    let store = TestStore::new();
    let mut rig = rig(
        transport,
        store.clone(),
        host_link(),
        AnalyserConfig::default(),
    )
    .await;
    let scenario = Scenario::example();
    let (results, order) = tokio::join!(
        rig.sim.send_results(&scenario, Vec::new()),
        rig.host.send("AN01", order("SPC0200")),
    );
    results.unwrap();
    order.unwrap();
    rig.wait_stored().await;
    assert_eq!(store.stored().len(), 1);
    assert_is_example(&store.stored()[0]);
    assert_eq!(rig.sim.orders().len(), 1);
    assert!(store.quarantined().is_empty());
}

#[tokio::test]
async fn tcp_contention() {
    contention(Transport::Tcp).await;
}

#[tokio::test]
async fn pty_contention() {
    contention(Transport::Pty).await;
}

/// The analyser goes away: the host reports the line down, and orders fail with
/// `NotConnected` instead of waiting.
#[tokio::test]
async fn tcp_link_down_is_reported() {
    let store = TestStore::new();
    let mut rig = rig(
        Transport::Tcp,
        store,
        host_link(),
        AnalyserConfig::default(),
    )
    .await;
    assert!(rig.host.is_connected("AN01"));
    rig.sim = Arc::new(
        Analyser::connect_tcp(rig.host.local_addr().unwrap(), AnalyserConfig::default())
            .await
            .unwrap(),
    );
    // The first analyser is dropped (its connection closed); the second one is up,
    // and the first one's end does not unregister it.
    let (mut down, mut up) = (false, false);
    while !(down && up) {
        match rig.wait_for(|e| Some(e.clone())).await {
            HostEvent::LinkDown { connection: 0, .. } => down = true,
            HostEvent::LinkUp { connection: 1, .. } => up = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(rig.host.is_connected("AN01"));
    rig.host.send("AN01", order("SPC0300")).await.unwrap();
    assert_eq!(rig.sim.orders().len(), 1);
    let sim = std::mem::replace(
        &mut rig.sim,
        Arc::new(Analyser::on_stream(
            tokio::io::duplex(64).0,
            AnalyserConfig::default(),
        )),
    );
    drop(sim);
    rig.wait_for(|e| matches!(e, HostEvent::LinkDown { connection: 1, .. }).then_some(()))
        .await;
    assert!(!rig.host.is_connected("AN01"));
    assert_eq!(
        rig.host.send("AN01", order("SPC0301")).await,
        Err(SendError::NotConnected("AN01".into()))
    );
}

/// The line is cut in the middle of a message: the part received is quarantined with
/// its bytes when the host sees the line go down; nothing is stored.
async fn line_cut_mid_message(transport: Transport) {
    let store = TestStore::new();
    let mut rig = rig(
        transport,
        store.clone(),
        host_link(),
        AnalyserConfig::default(),
    )
    .await;
    let outcome = rig
        .sim
        .send_results(&Scenario::example(), vec![Fault::Disconnect { frame: 3 }])
        .await;
    assert!(matches!(outcome, Err(SimSendError::Io(_))), "{outcome:?}");
    let reason = rig.wait_quarantined().await;
    assert_eq!(reason, QuarantineReason::Aborted(AbortReason::Timeout));
    rig.wait_for(|e| matches!(e, HostEvent::LinkDown { .. }).then_some(()))
        .await;
    assert!(store.stored().is_empty());
    let q = store.quarantined();
    assert_eq!(q.len(), 1);
    let raw = String::from_utf8_lossy(&q[0].raw);
    // ENQ and frames 1-4 (H, P, O, the call), nothing after.
    assert!(raw.starts_with('\u{5}'), "{raw}");
    assert!(
        raw.contains("O|1|SPC0042") && raw.contains("|POS|"),
        "{raw}"
    );
    assert!(!raw.contains("24.61"), "{raw}");
}

#[tokio::test]
async fn tcp_line_cut_mid_message() {
    line_cut_mid_message(Transport::Tcp).await;
}

#[tokio::test]
async fn pty_line_cut_mid_message() {
    line_cut_mid_message(Transport::Pty).await;
}

/// Both directions on one line: pcrd sends an order, the analyser runs it and sends
/// the results back, which are stored.
#[tokio::test]
async fn tcp_an_answered_order_comes_back_as_results() {
    let store = TestStore::new();
    let sim_config = AnalyserConfig {
        answer_orders: true,
        ..AnalyserConfig::default()
    };
    let mut rig = rig(Transport::Tcp, store.clone(), host_link(), sim_config).await;
    rig.host.send("AN01", order("SPC0400")).await.unwrap();
    rig.wait_stored().await;
    let stored = store.stored();
    assert_eq!(stored.len(), 1);
    let orders = stored[0].records.orders();
    assert_eq!(orders[0].0.specimen_id(), "SPC0400");
    let values: Vec<_> = orders[0].1.iter().map(|r| r.value()).collect();
    assert_eq!(values, ["NEG", "", "", "28.00"]);
}

/// A broken message is ACKed only once its bytes are quarantined: when the quarantine
/// fails, the last frame is left unacknowledged and the analyser keeps the message.
#[tokio::test]
async fn a_broken_message_is_not_acknowledged_when_quarantine_fails() {
    let store = TestStore::new();
    store.fail_quarantine.store(true, Ordering::SeqCst);
    let mut sim_config = AnalyserConfig::default();
    sim_config.link.reply_timeout = Duration::from_millis(300);
    let rig = rig(Transport::Tcp, store.clone(), host_link(), sim_config).await;
    let text = b"H|\\^&|||SIM\rR|1|^^^SARS2^E^Ct|24.61|||||F\rL|1|N\r".to_vec();
    let outcome = rig.sim.send_text(text, Vec::new()).await;
    let p = rig.sim.progress();
    assert_eq!(outcome, Err(SimSendError::NoReply(p.frames - 1)));
    assert_eq!(p.acked, p.frames - 1);
    assert!(store.stored().is_empty());
}
