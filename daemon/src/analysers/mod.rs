//! Analysers that report their own results over ASTM (issue 8): pcrd is their
//! laboratory host.
//!
//! One host per `[[analysers]]` entry (TCP listener with a peer list, or a serial
//! port), driven by `pcrd_drivers::astm`. This module is the daemon's side:
//!
//! - **Durable messages** ([`store::DurableMessages`], the driver's `MessageStore`):
//!   each complete message (analyser, connection, received at, raw bytes, text,
//!   parsed records) is written in one transaction and made durable before the host
//!   acknowledges its last frame. Bytes and records are split into 60 KiB chunks
//!   (the link accepts messages up to `max_message_bytes`, 4 MiB by default; sled
//!   values must stay below 64 KiB). Quarantined transmissions are kept with their
//!   bytes and reason. A stored message the host later reports as unconfirmed (the
//!   transmission broke off before EOT) is **withdrawn**: marked, kept, never
//!   turned into results.
//! - **Results on tubes**: when the instrument confirms a message with EOT, the
//!   analyser's mapping profile (`analysers/*.toml`, `pcrd_protocol::astm::mapping`)
//!   turns each order into kit-target Cts; the specimen id must be a received tube;
//!   the kit interprets the Cts unless the profile keeps the instrument's call. The
//!   outcome is a [`store::ReportedResult`] in the `reported` tree (what review,
//!   release and the outbox will consume). Anything that does not map (unknown
//!   specimen, unknown test code or analyte, a value that is not a Ct, an
//!   uninterpretable set of readings) is an unmatched item listed for the
//!   technician, never dropped. Messages stored but not applied when the daemon
//!   stopped are applied at the next start.
//! - **Queries and orders**: a message with Q records is answered, once confirmed,
//!   with an order (O record) per queried specimen id that is a received tube (none:
//!   a message ending "I"); worklists are sent on request to analysers configured
//!   with `accepts_orders`.
//!
//! Key layout of the `messages` and `reported` trees: see [`store`].
//!
//! What this module does NOT do: review, release or deliver results (the outbox
//! issue consumes `ReportedResult`), or resend a worklist the analyser did not
//! acknowledge (the technician decides).

pub mod config;
mod stage;
pub mod store;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use pcrd_drivers::astm::{
    HostEvent, HostHandle, SendError, SerialHostConfig, TcpHostConfig, spawn_serial_host,
    spawn_tcp_host,
};
use pcrd_protocol::astm::record::{HeaderSpec, Message, OrderSpec, TestId};
use pcrd_protocol::domain::Priority;
use tokio::sync::mpsc;
use tracing::{Instrument, info, warn};

pub use config::{AnalyserConfig, RawAnalyser, Transport, parse_analysers};
use store::{DurableMessages, Outgoing};

use crate::lab::{Lab, LabError};
use crate::metrics::Histogram;

/// Counters for /metrics, shared by every analyser.
#[derive(Debug, Default)]
pub struct AnalyserMetrics {
    /// From the complete message to durable (the wait before the last ACK).
    store_duration: Histogram,
    stored: Mutex<HashMap<String, u64>>,
    quarantined: Mutex<HashMap<String, u64>>,
}

impl AnalyserMetrics {
    fn observe_store(&self, analyser: &str, took: Duration) {
        self.store_duration.observe(took);
        *self
            .stored
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(analyser.to_owned())
            .or_default() += 1;
    }

    fn quarantined(&self, analyser: &str) {
        *self
            .quarantined
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(analyser.to_owned())
            .or_default() += 1;
    }
}

/// The line's state as the host reported it.
#[derive(Clone, Debug)]
pub struct LinkState {
    pub up: bool,
    pub since: SystemTime,
    pub reason: Option<String>,
    pub connections: u64,
    pub peers_refused: u64,
}

/// One configured analyser at run time.
#[derive(Debug)]
pub struct Analyser {
    pub config: AnalyserConfig,
    host: HostHandle,
    link: Mutex<LinkState>,
    sent_orders: AtomicU64,
}

impl Analyser {
    pub fn link(&self) -> LinkState {
        self.link
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The TCP address the host listens on (port 0 resolved), if TCP.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.host.local_addr()
    }

    /// Worklist messages acknowledged by the analyser since start.
    pub fn sent_orders(&self) -> u64 {
        self.sent_orders.load(Ordering::Relaxed)
    }
}

/// Why a worklist was not sent.
#[derive(Debug, thiserror::Error)]
pub enum WorklistError {
    #[error("no analyser {0:?} in the config")]
    UnknownAnalyser(String),
    #[error("analyser {0} does not accept orders (accepts_orders = false in its config)")]
    NoOrders(String),
    #[error("{0}")]
    Tubes(LabError),
    #[error("the worklist is empty")]
    Empty,
    #[error("analyser {0} is not connected")]
    NotConnected(String),
    #[error("analyser {name} did not accept the worklist: {reason}")]
    NotAccepted { name: String, reason: String },
}

/// Every configured analyser.
#[derive(Debug, Default)]
pub struct Analysers {
    entries: Vec<Arc<Analyser>>,
    metrics: Arc<AnalyserMetrics>,
    lab: Option<Arc<Lab>>,
}

impl Analysers {
    /// Checks the mapping profiles against the kit registry, applies messages left
    /// pending by an earlier run, and starts one host per analyser. Returns every
    /// problem (an unknown kit or target, a port that cannot be bound).
    pub async fn start(
        configs: &[AnalyserConfig],
        lab: Arc<Lab>,
    ) -> Result<Analysers, Vec<String>> {
        let mut problems = Vec::new();
        for c in configs {
            if let Err(p) = c.profile.validate(|id| lab.kits().find(id).ok()) {
                problems.extend(p.into_iter().map(|p| {
                    format!(
                        "analyser {:?}: mapping profile {}: {p}",
                        c.name,
                        c.profile_path.display()
                    )
                }));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let profiles: HashMap<_, _> = configs
            .iter()
            .map(|c| (c.name.clone(), Arc::clone(&c.profile)))
            .collect();
        let pending_lab = Arc::clone(&lab);
        let applied =
            tokio::task::spawn_blocking(move || store::apply_pending(&pending_lab, &profiles))
                .await
                .map_err(|e| vec![format!("applying pending analyser messages: {e}")])?
                .map_err(|e| vec![format!("applying pending analyser messages: {e}")])?;
        if applied > 0 {
            lab.store()
                .durable()
                .await
                .map_err(|e| vec![e.to_string()])?;
            info!(
                messages = applied,
                "Applied analyser messages stored before the last stop."
            );
        }
        let staged = stage::stage_pending(&lab)
            .await
            .map_err(|e| vec![format!("staging analyser results for review: {e}")])?;
        if staged > 0 {
            info!(
                messages = staged,
                "Staged analyser results for review left unstaged before the last stop."
            );
        }
        let metrics = Arc::new(AnalyserMetrics::default());
        let mut entries = Vec::new();
        for c in configs {
            let (outgoing, answers) = mpsc::unbounded_channel();
            let messages = Arc::new(DurableMessages::new(
                c.name.clone(),
                Arc::clone(&c.profile),
                Arc::clone(&lab),
                Arc::clone(&metrics),
                outgoing,
            ));
            let (host, events) = match &c.transport {
                Transport::Tcp { listen, peers } => {
                    let config = TcpHostConfig {
                        listen: *listen,
                        peers: peers.iter().map(|ip| (c.name.clone(), *ip)).collect(),
                        link: c.link.clone(),
                    };
                    match spawn_tcp_host(config, messages).await {
                        Ok(started) => started,
                        Err(e) => {
                            problems.push(format!(
                                "analyser {:?}: cannot listen on {listen}: {e}",
                                c.name
                            ));
                            continue;
                        }
                    }
                }
                Transport::Serial {
                    path,
                    baud,
                    exclusive,
                } => spawn_serial_host(
                    SerialHostConfig {
                        instrument: c.name.clone(),
                        path: path.clone(),
                        baud_rate: *baud,
                        link: c.link.clone(),
                        exclusive: *exclusive,
                        backoff_min: Duration::from_millis(200),
                        backoff_max: Duration::from_secs(10),
                    },
                    messages,
                ),
            };
            let analyser = Arc::new(Analyser {
                config: c.clone(),
                host,
                link: Mutex::new(LinkState {
                    up: false,
                    since: SystemTime::now(),
                    reason: Some("not connected yet".into()),
                    connections: 0,
                    peers_refused: 0,
                }),
                sent_orders: AtomicU64::new(0),
            });
            let span = tracing::info_span!("analyser", instrument = %c.name);
            tokio::spawn(follow_events(Arc::clone(&analyser), events).instrument(span.clone()));
            tokio::spawn(send_answers(Arc::clone(&analyser), answers).instrument(span));
            info!(analyser = %c.name, transport = %c.transport.describe(),
                local = ?analyser.local_addr(), "Analyser host started.");
            entries.push(analyser);
        }
        if !problems.is_empty() {
            for a in &entries {
                a.host.shutdown();
            }
            return Err(problems);
        }
        Ok(Analysers {
            entries,
            metrics,
            lab: Some(lab),
        })
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<Analyser>> {
        self.entries.iter()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Analyser>> {
        self.entries.iter().find(|a| a.config.name == name)
    }

    /// Sends a worklist: one order per tube (each must have been received), and
    /// waits for the analyser to acknowledge it.
    pub async fn send_worklist(
        &self,
        name: &str,
        tubes: &[String],
    ) -> Result<usize, WorklistError> {
        let analyser = self
            .get(name)
            .ok_or_else(|| WorklistError::UnknownAnalyser(name.to_owned()))?;
        if !analyser.config.accepts_orders {
            return Err(WorklistError::NoOrders(name.to_owned()));
        }
        if tubes.is_empty() {
            return Err(WorklistError::Empty);
        }
        let lab = self
            .lab
            .as_ref()
            .ok_or_else(|| WorklistError::NotConnected(name.to_owned()))?;
        let mut orders = Vec::new();
        let mut problems = Vec::new();
        let tests: Vec<TestId> = analyser
            .config
            .profile
            .tests
            .iter()
            .map(|t| TestId::new(t.code.clone(), &[]))
            .collect();
        for barcode in tubes {
            match lab.tube(barcode) {
                Ok(tube) => orders.push(OrderSpec {
                    specimen_id: tube.barcode.as_str().to_owned(),
                    tests: tests.clone(),
                    priority: match tube.priority {
                        Priority::Urgent => "S".into(),
                        Priority::Routine => "R".into(),
                    },
                    action_code: "N".into(),
                    report_type: "O".into(),
                }),
                Err(LabError::Store(e)) => return Err(WorklistError::Tubes(LabError::Store(e))),
                Err(e) => problems.push(e.to_string()),
            }
        }
        if !problems.is_empty() {
            return Err(WorklistError::Tubes(LabError::Invalid {
                message: format!(
                    "{} of {} tubes cannot be ordered; nothing was sent",
                    problems.len(),
                    tubes.len()
                ),
                problems,
            }));
        }
        let header = HeaderSpec {
            sender: format!("pcrd {}", lab.lab_id()),
            receiver: analyser.config.profile.model.clone(),
            processing_id: "P".into(),
            timestamp: store::astm_timestamp(SystemTime::now()),
        };
        let message = Message::orders_message(&header, &orders);
        match analyser.host.send(name, message).await {
            Ok(()) => {
                analyser.sent_orders.fetch_add(1, Ordering::Relaxed);
                info!(analyser = %name, orders = orders.len(), "Worklist sent.");
                Ok(orders.len())
            }
            Err(SendError::NotConnected(_)) => Err(WorklistError::NotConnected(name.to_owned())),
            Err(e) => Err(WorklistError::NotAccepted {
                name: name.to_owned(),
                reason: e.to_string(),
            }),
        }
    }

    /// Appends the analysers' metrics in the Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let Some(lab) = &self.lab else {
            return;
        };
        let mut family =
            |name: &str,
             kind: &str,
             help: &str,
             value: &dyn Fn(&Analyser, &store::AnalyserCounts) -> String| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
                for a in &self.entries {
                    let counts = store::counts(lab.store(), &a.config.name).unwrap_or_default();
                    let _ = writeln!(
                        out,
                        "{name}{{analyser=\"{}\"}} {}",
                        a.config.name,
                        value(a, &counts)
                    );
                }
            };
        family(
            "pcrd_analyser_link_up",
            "gauge",
            "1 while the analyser's line is up.",
            &|a, _| u8::from(a.link().up).to_string(),
        );
        family(
            "pcrd_analyser_messages_stored_total",
            "counter",
            "Messages stored durably (all time, from the store).",
            &|_, c| c.messages.to_string(),
        );
        family(
            "pcrd_analyser_quarantined_total",
            "counter",
            "Transmissions quarantined with their bytes (all time).",
            &|_, c| c.quarantined.to_string(),
        );
        family(
            "pcrd_analyser_withdrawn_total",
            "counter",
            "Stored messages withdrawn as unconfirmed (all time).",
            &|_, c| c.withdrawn.to_string(),
        );
        family(
            "pcrd_analyser_reported_total",
            "counter",
            "Results reported on tubes (all time).",
            &|_, c| c.reported.to_string(),
        );
        family(
            "pcrd_analyser_unmatched",
            "gauge",
            "Unmatched items kept for the technician (unknown specimen, test code...).",
            &|_, c| c.unmatched.to_string(),
        );
        self.metrics.store_duration.render(
            out,
            "pcrd_analyser_store_duration_seconds",
            "From a complete message to durable (the last frame's ACK waits for it).",
        );
    }
}

/// Keeps the link state from the host's events.
async fn follow_events(analyser: Arc<Analyser>, mut events: mpsc::UnboundedReceiver<HostEvent>) {
    while let Some(event) = events.recv().await {
        let mut link = analyser.link.lock().unwrap_or_else(PoisonError::into_inner);
        match event {
            HostEvent::LinkUp { .. } => {
                link.up = true;
                link.since = SystemTime::now();
                link.reason = None;
                link.connections += 1;
            }
            // A newer connection may already be up (TCP reconnect).
            HostEvent::LinkDown { reason, .. }
                if !analyser.host.is_connected(&analyser.config.name) =>
            {
                link.up = false;
                link.since = SystemTime::now();
                link.reason = Some(reason);
            }
            HostEvent::PeerRefused { peer } => {
                link.peers_refused += 1;
                warn!(%peer, "Connection refused: address not on the analyser's peer list.");
            }
            _ => {}
        }
    }
}

/// Sends query answers once the instrument has released the line. A busy line is
/// retried a few times; the analyser asks again if it gets nothing.
async fn send_answers(analyser: Arc<Analyser>, mut answers: mpsc::UnboundedReceiver<Outgoing>) {
    while let Some(out) = answers.recv().await {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match analyser
                .host
                .send(&out.instrument, out.message.clone())
                .await
            {
                Ok(()) => {
                    info!(analyser = %out.instrument, orders = out.message.orders().len(), "Host query answered.");
                    break;
                }
                Err(e) if attempts < 3 => {
                    warn!(analyser = %out.instrument, error = %e, attempts, "Query answer not delivered; trying again.");
                    tokio::time::sleep(store::ANSWER_RETRY).await;
                }
                Err(e) => {
                    warn!(analyser = %out.instrument, error = %e, "Query answer not delivered; the analyser will ask again.");
                    break;
                }
            }
        }
    }
}
