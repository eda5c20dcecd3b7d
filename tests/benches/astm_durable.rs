//! What durability costs an analyser (issue 8): one 94-specimen results message
//! (H, 94 × (P, O, 4 R: the call, ORF1ab, N, IC), L: 566 records) through pcrd's ASTM
//! host over TCP loopback, measured side by side in the same run
//!
//! - with an in-memory store (the naive path: nothing written, the last frame
//!   acknowledged at once), and
//! - with the daemon's `DurableMessages` on a real store in a temporary directory:
//!   raw bytes, text and parsed records written in one transaction and made durable
//!   (flush + fdatasync) before the last frame's ACK; after EOT the message is
//!   applied (94 reported results with the kit's calls, on 94 received tubes) in a
//!   second transaction and barrier.
//!
//! Figures: the analyser's time per message (ENQ to EOT) on each path, the durable
//! path's overhead, and the time from ENQ to the 94 results being durable on their
//! tubes. Run: `cargo bench -p pcrd-tests --bench astm_durable`
//! (`PCRD_BENCH_MESSAGES=N` for N timed messages per path, default 30).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use pcrd::analysers::AnalyserMetrics;
use pcrd::analysers::store::{DurableMessages, counts};
use pcrd::lab::{Actor, Lab, TubeIntake};
use pcrd_drivers::astm::{
    HostEvent, InboundMessage, MessageStore, Quarantined, StoreError, TcpHostConfig, spawn_tcp_host,
};
use pcrd_drivers::sim::analyser::{Analyser, AnalyserConfig, Scenario, Specimen, Target};
use pcrd_protocol::astm::link::LinkConfig;
use pcrd_tests::bench::{bench, goal, median};
use tokio::sync::mpsc;

const SPECIMENS: usize = 94;
const WARM_UP: usize = 3;

#[derive(Default)]
struct MemoryStore {
    stored: AtomicUsize,
}

impl MessageStore for MemoryStore {
    async fn store(&self, _message: &InboundMessage) -> Result<(), StoreError> {
        self.stored.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn quarantine(&self, item: &Quarantined) -> Result<(), StoreError> {
        Err(StoreError(format!(
            "unexpected quarantine: {}",
            item.reason
        )))
    }
}

fn barcode(i: usize) -> String {
    format!("BENCH-{i:04}")
}

/// 94 specimens, alternately positive and negative, on tubes BENCH-0000…
fn scenario() -> Scenario {
    let target = |name: &str, ct| Target {
        name: name.to_owned(),
        ct,
    };
    Scenario {
        sender: "SIM-AN01".into(),
        test: "SARS2".into(),
        timestamp: "20260115103012".into(),
        specimens: (0..SPECIMENS)
            .map(|i| {
                let positive = i % 2 == 0;
                let ct = |v: f64| positive.then_some(v + (i % 9) as f64 * 0.37);
                Specimen {
                    id: barcode(i),
                    call: if positive { "POS" } else { "NEG" }.into(),
                    targets: vec![target("ORF1ab", ct(22.0)), target("N", ct(23.5))],
                    internal_control: target("IC", Some(27.0 + (i % 7) as f64 * 0.21)),
                }
            })
            .collect(),
    }
}

fn host_config() -> Result<TcpHostConfig> {
    Ok(TcpHostConfig {
        listen: "127.0.0.1:0".parse()?,
        peers: vec![("an-1".into(), IpAddr::V4(Ipv4Addr::LOCALHOST))],
        link: LinkConfig::computer(),
    })
}

async fn link_up(events: &mut mpsc::UnboundedReceiver<HostEvent>) -> Result<()> {
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(event) = events.recv().await {
            if matches!(event, HostEvent::LinkUp { .. }) {
                return;
            }
        }
    })
    .await
    .context("the line did not come up")
}

async fn memory_runs(text: &[u8], messages: usize) -> Result<Vec<f64>> {
    let store = Arc::new(MemoryStore::default());
    let (host, mut events) = spawn_tcp_host(host_config()?, store.clone()).await?;
    let sim = Analyser::connect_tcp(
        host.local_addr().context("addr")?,
        AnalyserConfig::default(),
    )
    .await?;
    link_up(&mut events).await?;
    let mut runs = Vec::new();
    for i in 0..messages + WARM_UP {
        let started = Instant::now();
        let report = sim
            .send_text(text.to_vec(), Vec::new())
            .await
            .map_err(|e| anyhow::anyhow!("analyser: {e}"))?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        ensure!(report.naks == 0);
        ensure!(store.stored.load(Ordering::SeqCst) == i + 1, "not stored");
        if i >= WARM_UP {
            runs.push(ms);
        }
    }
    host.shutdown();
    Ok(runs)
}

/// Per message: (ENQ to EOT, ENQ to the results durable on their tubes).
async fn durable_runs(text: &[u8], messages: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let dir = tempfile::tempdir()?;
    let store = pcrd::store::Store::open(&pcrd::store::StoreOptions {
        path: dir.path().join("store"),
        cache_bytes: 64 << 20,
    })?;
    let kits = pcrd::kits::KitRegistry::load(None).map_err(|p| anyhow::anyhow!("{p:?}"))?;
    let lab = Lab::open(store, kits, "LAB-BENCH".into())?;
    lab.receive_tubes(
        Actor {
            user: "bench".into(),
            reason: None,
        },
        (0..SPECIMENS)
            .map(|i| TubeIntake {
                barcode: barcode(i),
                pool_size: None,
                priority: None,
                due: None,
            })
            .collect(),
    )
    .await?;
    let profile = Arc::new(pcrd_protocol::astm::mapping::MappingProfile::from_toml_str(
        include_str!("../../analysers/sim-an01.toml"),
    )?);
    let (outgoing, _answers) = mpsc::unbounded_channel();
    let messages_store = Arc::new(DurableMessages::new(
        "an-1".into(),
        profile,
        Arc::clone(&lab),
        Arc::new(AnalyserMetrics::default()),
        outgoing,
    ));
    let (host, mut events) = spawn_tcp_host(host_config()?, messages_store).await?;
    let sim = Analyser::connect_tcp(
        host.local_addr().context("addr")?,
        AnalyserConfig::default(),
    )
    .await?;
    link_up(&mut events).await?;
    let (mut acked, mut applied) = (Vec::new(), Vec::new());
    for i in 0..messages + WARM_UP {
        let started = Instant::now();
        let report = sim
            .send_text(text.to_vec(), Vec::new())
            .await
            .map_err(|e| anyhow::anyhow!("analyser: {e}"))?;
        let acked_ms = started.elapsed().as_secs_f64() * 1e3;
        ensure!(report.naks == 0);
        let want = ((i + 1) * SPECIMENS) as u64;
        let deadline = Instant::now() + Duration::from_secs(20);
        while counts(lab.store(), "an-1")?.reported < want {
            ensure!(Instant::now() < deadline, "results did not land");
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let applied_ms = started.elapsed().as_secs_f64() * 1e3;
        if i >= WARM_UP {
            acked.push(acked_ms);
            applied.push(applied_ms);
        }
    }
    let c = counts(lab.store(), "an-1")?;
    ensure!(c.unmatched == 0 && c.quarantined == 0, "{c:?}");
    println!(
        "# durable store: {} messages, {} reported results, store at {}",
        c.messages,
        c.reported,
        dir.path().display()
    );
    host.shutdown();
    Ok((acked, applied))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        println!(
            "astm_durable: skipped: this is a benchmark, not a test; run \
             `cargo bench -p pcrd-tests --bench astm_durable`"
        );
        return Ok(());
    }
    let messages: usize = match std::env::var("PCRD_BENCH_MESSAGES") {
        Ok(v) => v.parse().context("PCRD_BENCH_MESSAGES")?,
        Err(_) => 30,
    };
    let text = scenario().text();
    println!(
        "# message: {SPECIMENS} specimens, {} bytes of text",
        text.len()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let memory = runtime.block_on(memory_runs(&text, messages))?;
    let (acked, applied) = runtime.block_on(durable_runs(&text, messages))?;
    let overhead = median(&acked) - median(&memory);
    let lines = [
        bench(
            "astm_durable.memory_store_message_ms",
            median(&memory),
            "ms",
            &memory,
        ),
        bench(
            "astm_durable.durable_store_message_ms",
            median(&acked),
            "ms",
            &acked,
        ),
        format!("BENCH astm_durable.durability_overhead_ms {overhead:.3} ms"),
        bench(
            "astm_durable.enq_to_results_durable_ms",
            median(&applied),
            "ms",
            &applied,
        ),
        // Our own threshold (the issue gives none): durability adds less than 1 % of
        // the message's 20.7 s wire time at 9,600 Bd.
        goal("astm_durable.durability_overhead_ms", overhead, "<", 207.0),
    ];
    println!("\n# summary");
    for line in lines {
        println!("{line}");
    }
    Ok(())
}
