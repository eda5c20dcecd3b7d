#![allow(clippy::unwrap_used)]
//! The host against an independent ASTM implementation: the analyser simulator of the
//! PyPI package `labmcp-astm-lis` 0.1.3 (Python ≥ 3.10; works on 3.11), which sends two
//! messages over E1381 and corrupts one frame on its first transmission.
//!
//! `scripts/test.sh` installs the package into `.peers/astm` (or `$PCRD_PEERS/astm`);
//! without it the test fails, saying how to install it.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pcrd_drivers::astm::{
    HostEvent, InboundMessage, MessageStore, Quarantined, StoreError, TcpHostConfig, spawn_tcp_host,
};
use pcrd_protocol::astm::link::LinkConfig;

const PATIENCE: Duration = Duration::from_secs(30);

const SCRIPT: &str = r#"
import socket, sys, time
from labmcp_astm_lis.simulator import ASTMAnalyzerSimulator
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
sim = ASTMAnalyzerSimulator(gap_s=0.2)
sim.attach(lambda b: s.sendall(b))
s.settimeout(0.2)
deadline = time.time() + 25
while time.time() < deadline and not (sim.done and sim.messages_sent == 2):
    try:
        data = s.recv(4096)
    except socket.timeout:
        continue
    if not data:
        break
    out = sim.handle_bytes(data)
    if out:
        s.sendall(out)
print(f"sent={sim.messages_sent} naks={sim.naks_received}")
sim.stop()
s.close()
sys.exit(0 if sim.messages_sent == 2 else 1)
"#;

#[derive(Default)]
struct Store {
    stored: Mutex<Vec<InboundMessage>>,
    quarantined: Mutex<Vec<Quarantined>>,
}

impl MessageStore for Store {
    async fn store(&self, message: &InboundMessage) -> Result<(), StoreError> {
        self.stored.lock().unwrap().push(message.clone());
        Ok(())
    }

    async fn quarantine(&self, item: &Quarantined) -> Result<(), StoreError> {
        self.quarantined.lock().unwrap().push(item.clone());
        Ok(())
    }
}

#[tokio::test]
async fn python_analyser_results_are_stored_once() {
    let peers = std::env::var_os("PCRD_PEERS").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.peers"),
        std::path::PathBuf::from,
    );
    let pythonpath = peers.join("astm");
    assert!(
        pythonpath.join("labmcp_astm_lis").is_dir(),
        "labmcp-astm-lis is not installed at {}: run scripts/test.sh (it installs the test peers)",
        pythonpath.display()
    );
    let store = Arc::new(Store::default());
    let config = TcpHostConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        peers: vec![("SIM".into(), IpAddr::V4(Ipv4Addr::LOCALHOST))],
        link: LinkConfig::computer(),
    };
    let (host, mut events) = spawn_tcp_host(config, store.clone()).await.unwrap();
    let port = host.local_addr().unwrap().port().to_string();
    let child = tokio::process::Command::new("python3")
        .args(["-c", SCRIPT, &port])
        .env("PYTHONPATH", pythonpath)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(PATIENCE, child)
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // One frame was corrupted once: NAKed, resent, and the message stored once.
    assert!(stdout.contains("sent=2 naks=1"), "{stdout}");
    let mut stored = 0;
    while stored < 2 {
        match tokio::time::timeout(PATIENCE, events.recv()).await.unwrap() {
            Some(HostEvent::MessageStored { .. }) => stored += 1,
            Some(_) => {}
            None => panic!("host stopped"),
        }
    }
    let messages = store.stored.lock().unwrap().clone();
    assert_eq!(messages.len(), 2);
    let specimens: Vec<_> = messages
        .iter()
        .map(|m| m.records.orders()[0].0.specimen_id().to_owned())
        .collect();
    assert_eq!(specimens, ["S26-000123", "S26-000124"]);
    assert!(store.quarantined.lock().unwrap().is_empty());
    host.shutdown();
}
