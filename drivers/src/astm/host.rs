//! The tasks: a TCP listener with one session task per accepted instrument, one task
//! per serial port, and the session loop that drives the sans-IO link.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use pcrd_protocol::astm::Millis;
use pcrd_protocol::astm::link::{Link, LinkConfig, LinkEvent, MessageId};
use pcrd_protocol::astm::record::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::{Instrument, debug, error, info, warn};

use super::{
    HostEvent, InboundMessage, MessageKey, MessageStore, QuarantineReason, Quarantined, SendError,
};

/// pcrd listening for instruments over TCP.
#[derive(Debug, Clone)]
pub struct TcpHostConfig {
    /// Where to listen (`127.0.0.1:0` in tests).
    pub listen: SocketAddr,
    /// The instruments allowed to connect: name and peer IP address. Connections from
    /// any other address are closed at once and logged.
    pub peers: Vec<(String, IpAddr)>,
    /// Link timers and limits ([`LinkConfig::computer`] for the standard's).
    pub link: LinkConfig,
}

/// pcrd on one serial port, one instrument.
#[derive(Debug, Clone)]
pub struct SerialHostConfig {
    /// The instrument's name.
    pub instrument: String,
    /// The port (`/dev/ttyUSB0`, a `/dev/serial/by-id/…` link, a pty).
    pub path: String,
    /// Baud rate (8 data bits, no parity, 1 stop bit: the E1381 default).
    pub baud_rate: u32,
    /// Link timers and limits.
    pub link: LinkConfig,
    /// Lock the port against other openers (TIOCEXCL). Tests on a pseudo-terminal
    /// whose other end keeps the slave open turn it off.
    pub exclusive: bool,
    /// Reopen backoff: doubles from `backoff_min` up to `backoff_max`.
    pub backoff_min: Duration,
    /// See `backoff_min`.
    pub backoff_max: Duration,
}

struct SendRequest {
    message: Message,
    reply: oneshot::Sender<Result<(), SendError>>,
}

#[derive(Default)]
struct Shared {
    lines: Mutex<HashMap<String, mpsc::Sender<SendRequest>>>,
    tasks: Mutex<Vec<AbortHandle>>,
    connections: AtomicU64,
    local_addr: Option<SocketAddr>,
}

impl Shared {
    fn lines(&self) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::Sender<SendRequest>>> {
        self.lines.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn track(&self, handle: AbortHandle) {
        let mut tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        tasks.retain(|t| !t.is_finished());
        tasks.push(handle);
    }
}

/// A cheap, cloneable handle on a host (TCP listener or serial port).
#[derive(Clone)]
pub struct HostHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for HostHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostHandle")
            .field("local_addr", &self.shared.local_addr)
            .finish_non_exhaustive()
    }
}

impl HostHandle {
    /// The TCP address the host listens on (`None` for a serial host).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.shared.local_addr
    }

    /// Is a line to `instrument` up?
    pub fn is_connected(&self, instrument: &str) -> bool {
        self.shared.lines().contains_key(instrument)
    }

    /// Sends one message (for example [`Message::orders_message`]) to `instrument`
    /// and waits for the outcome: `Ok` once the instrument acknowledged the last
    /// frame. Not resent on failure: the caller decides.
    pub async fn send(&self, instrument: &str, message: Message) -> Result<(), SendError> {
        let line = self.shared.lines().get(instrument).cloned();
        let line = line.ok_or_else(|| SendError::NotConnected(instrument.to_owned()))?;
        let (reply, outcome) = oneshot::channel();
        line.send(SendRequest { message, reply })
            .await
            .map_err(|_| SendError::LinkDown)?;
        outcome.await.unwrap_or(Err(SendError::LinkDown))
    }

    /// Stops the listener or port task and every session.
    pub fn shutdown(&self) {
        let tasks = self
            .shared
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for task in tasks.iter() {
            task.abort();
        }
    }
}

/// Binds `config.listen` and accepts instruments in a background task.
pub async fn spawn_tcp_host<S: MessageStore>(
    config: TcpHostConfig,
    store: Arc<S>,
) -> std::io::Result<(HostHandle, mpsc::UnboundedReceiver<HostEvent>)> {
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let shared = Arc::new(Shared {
        local_addr: Some(listener.local_addr()?),
        ..Shared::default()
    });
    let (events, rx) = mpsc::unbounded_channel();
    let task_shared = shared.clone();
    let task = tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "Accepting an instrument connection failed.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some((name, _)) = config.peers.iter().find(|(_, ip)| *ip == peer.ip()) else {
                warn!(%peer, "Refused a connection from an address not on the instrument list.");
                drop(stream);
                let _ = events.send(HostEvent::PeerRefused { peer });
                continue;
            };
            let _ = stream.set_nodelay(true);
            let line = Line::new(name.clone(), &task_shared, store.clone(), events.clone());
            info!(instrument = %name, %peer, connection = line.connection, "Instrument connected.");
            let link = config.link.clone();
            let span = tracing::info_span!("astm", instrument = %name, %peer, connection = line.connection);
            let session = tokio::spawn(line.run(stream, link).instrument(span));
            task_shared.track(session.abort_handle());
        }
    });
    shared.track(task.abort_handle());
    Ok((HostHandle { shared }, rx))
}

/// Opens a serial port in a background task, reopening it with backoff when it fails.
pub fn spawn_serial_host<S: MessageStore>(
    config: SerialHostConfig,
    store: Arc<S>,
) -> (HostHandle, mpsc::UnboundedReceiver<HostEvent>) {
    use tokio_serial::SerialPortBuilderExt;

    let shared = Arc::new(Shared::default());
    let (events, rx) = mpsc::unbounded_channel();
    let task_shared = shared.clone();
    let span = tracing::info_span!("astm", instrument = %config.instrument, path = %config.path);
    let task = tokio::spawn(
        async move {
            let mut backoff = config.backoff_min;
            loop {
                let opened = tokio_serial::new(&config.path, config.baud_rate)
                    .data_bits(tokio_serial::DataBits::Eight)
                    .parity(tokio_serial::Parity::None)
                    .stop_bits(tokio_serial::StopBits::One)
                    .open_native_async()
                    .and_then(|mut port| {
                        if !config.exclusive {
                            port.set_exclusive(false)?;
                        }
                        Ok(port)
                    });
                match opened {
                    Ok(port) => {
                        backoff = config.backoff_min;
                        let line = Line::new(
                            config.instrument.clone(),
                            &task_shared,
                            store.clone(),
                            events.clone(),
                        );
                        line.run(port, config.link.clone()).await;
                    }
                    Err(e) => {
                        warn!(instrument = %config.instrument, path = %config.path, error = %e,
                        backoff_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
                        "Serial port did not open.");
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(config.backoff_max);
            }
        }
        .instrument(span),
    );
    shared.track(task.abort_handle());
    (HostHandle { shared }, rx)
}

/// One line's session state.
struct Line<S> {
    instrument: String,
    connection: u64,
    shared: Arc<Shared>,
    store: Arc<S>,
    events: mpsc::UnboundedSender<HostEvent>,
    epoch: Instant,
    pending: HashMap<MessageId, oneshot::Sender<Result<(), SendError>>>,
    /// Raw bytes of messages handed to the store (or refused by it) and not yet
    /// confirmed by EOT: quarantined if the transmission breaks off.
    /// The flag says whether the store accepted the message.
    unconfirmed: HashMap<u64, (Vec<u8>, bool)>,
}

impl<S: MessageStore> Line<S> {
    fn new(
        instrument: String,
        shared: &Arc<Shared>,
        store: Arc<S>,
        events: mpsc::UnboundedSender<HostEvent>,
    ) -> Line<S> {
        Line {
            instrument,
            connection: shared.connections.fetch_add(1, Ordering::Relaxed),
            shared: shared.clone(),
            store,
            events,
            epoch: Instant::now(),
            pending: HashMap::new(),
            unconfirmed: HashMap::new(),
        }
    }

    fn now(&self) -> Millis {
        Millis(u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    fn emit(&self, event: HostEvent) {
        let _ = self.events.send(event);
    }

    async fn run<T: AsyncRead + AsyncWrite + Unpin>(mut self, mut io: T, config: LinkConfig) {
        let (tx, mut orders) = mpsc::channel(16);
        self.shared
            .lines()
            .insert(self.instrument.clone(), tx.clone());
        self.emit(HostEvent::LinkUp {
            instrument: self.instrument.clone(),
            connection: self.connection,
        });
        let mut link = Link::new(config);
        let reason = self.drive(&mut io, &mut link, &mut orders).await;
        // The line is gone: act on what the link still holds, then expire every timer
        // so a transmission cut off mid-message is reported (and quarantined) as an
        // abort with its bytes. Nothing more can be written.
        while let Some(event) = link.poll_event() {
            self.on_event(&mut link, event).await;
        }
        link.handle_timeout(Millis(u64::MAX));
        while let Some(event) = link.poll_event() {
            self.on_event(&mut link, event).await;
        }
        {
            let mut lines = self.shared.lines();
            if lines
                .get(&self.instrument)
                .is_some_and(|l| l.same_channel(&tx))
            {
                lines.remove(&self.instrument);
            }
        }
        for (_, reply) in self.pending.drain() {
            let _ = reply.send(Err(SendError::LinkDown));
        }
        while let Ok(request) = orders.try_recv() {
            let _ = request.reply.send(Err(SendError::LinkDown));
        }
        // A message whose store failed is still waiting for its ACK in the link (no
        // timer runs then): quarantine its bytes here.
        if !self.unconfirmed.is_empty() {
            let reason = pcrd_protocol::astm::link::AbortReason::Timeout;
            self.quarantine_unconfirmed(reason, self.unconfirmed.keys().copied().collect())
                .await;
        }
        warn!(instrument = %self.instrument, connection = self.connection, %reason, "Instrument line down.");
        self.emit(HostEvent::LinkDown {
            instrument: self.instrument.clone(),
            connection: self.connection,
            reason,
        });
    }

    /// Runs until the line fails; returns why.
    async fn drive<T: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut T,
        link: &mut Link,
        orders: &mut mpsc::Receiver<SendRequest>,
    ) -> String {
        let mut buf = vec![0u8; 4096];
        loop {
            // Write what the link wants sent and act on its events until both are empty
            // (acting on an event, e.g. acknowledging after the store, makes more).
            loop {
                while let Some(bytes) = link.poll_transmit() {
                    if let Err(e) = io.write_all(&bytes).await {
                        return format!("write failed: {e}");
                    }
                }
                let Some(event) = link.poll_event() else {
                    break;
                };
                self.on_event(link, event).await;
            }
            if let Err(e) = io.flush().await {
                return format!("flush failed: {e}");
            }
            let deadline = link
                .next_deadline()
                .map(|d| self.epoch + Duration::from_millis(d.0));
            tokio::select! {
                read = io.read(&mut buf) => match read {
                    Ok(0) => return "closed by the instrument".to_owned(),
                    Ok(n) => link.handle_bytes(self.now(), &buf[..n]),
                    Err(e) => return format!("read failed: {e}"),
                },
                Some(request) = orders.recv() => {
                    match request.message.encode() {
                        Ok(text) => match link.send_message(self.now(), &text) {
                            Ok(id) => {
                                self.pending.insert(id, request.reply);
                            }
                            Err(e) => {
                                let _ = request.reply.send(Err(SendError::Invalid(e.to_string())));
                            }
                        },
                        Err(e) => {
                            let _ = request.reply.send(Err(SendError::Invalid(e.to_string())));
                        }
                    }
                }
                () = sleep_until(deadline) => link.handle_timeout(self.now()),
            }
        }
    }

    fn key(&self, seq: u64) -> MessageKey {
        MessageKey {
            instrument: self.instrument.clone(),
            connection: self.connection,
            seq,
        }
    }

    async fn on_event(&mut self, link: &mut Link, event: LinkEvent) {
        match event {
            LinkEvent::MessageComplete(received) => {
                let key = self.key(received.seq);
                match received.records {
                    Ok(records) => {
                        let message = InboundMessage {
                            key: key.clone(),
                            text: received.text,
                            raw: received.raw,
                            records,
                        };
                        let stored = self.store.store(&message).await;
                        self.unconfirmed
                            .insert(received.seq, (message.raw, stored.is_ok()));
                        match stored {
                            Ok(()) => {
                                // The durability barrier: ACK only now.
                                let _ = link.ack_last_frame(self.now());
                                debug!(instrument = %self.instrument, seq = key.seq, "Message stored and acknowledged.");
                                self.emit(HostEvent::MessageStored { key });
                            }
                            Err(error) => {
                                error!(instrument = %self.instrument, seq = key.seq, %error,
                                    "Message not stored; last frame left unacknowledged so the instrument keeps it.");
                                self.emit(HostEvent::StoreFailed { key, error });
                            }
                        }
                    }
                    Err(e) => {
                        let item = Quarantined {
                            instrument: self.instrument.clone(),
                            connection: self.connection,
                            key: Some(key),
                            reason: QuarantineReason::Records(e),
                            raw: received.raw,
                        };
                        if self.quarantine(item).await {
                            let _ = link.ack_last_frame(self.now());
                        }
                    }
                }
            }
            LinkEvent::TransmissionEnded { messages } => {
                let mut confirmed = Vec::with_capacity(messages.len());
                for seq in messages {
                    // Only messages the store accepted are confirmed to it.
                    if let Some((_, true)) = self.unconfirmed.remove(&seq) {
                        confirmed.push(self.key(seq));
                    }
                }
                if !confirmed.is_empty() {
                    self.store.confirmed(&confirmed).await;
                }
            }
            LinkEvent::MessageAborted {
                reason,
                raw,
                unconfirmed,
            } => {
                warn!(instrument = %self.instrument, %reason, bytes = raw.len(), "Transmission aborted.");
                // Bytes with no frame in them (the EOT itself, noise) are not worth
                // an operator's time; a partial message is.
                if raw.contains(&pcrd_protocol::astm::STX) {
                    let item = Quarantined {
                        instrument: self.instrument.clone(),
                        connection: self.connection,
                        key: None,
                        reason: QuarantineReason::Aborted(reason),
                        raw,
                    };
                    self.quarantine(item).await;
                }
                self.quarantine_unconfirmed(reason, unconfirmed).await;
            }
            LinkEvent::FrameRejected { reason } => {
                warn!(instrument = %self.instrument, %reason, "Frame refused with NAK.");
            }
            LinkEvent::MessageSent { id } => {
                if let Some(reply) = self.pending.remove(&id) {
                    let _ = reply.send(Ok(()));
                }
            }
            LinkEvent::SendFailed { id, reason } => {
                warn!(instrument = %self.instrument, %reason, "Message to the instrument failed.");
                if let Some(reply) = self.pending.remove(&id) {
                    let _ = reply.send(Err(SendError::Failed(reason)));
                }
            }
            other => debug!(instrument = %self.instrument, event = ?other, "Link event."),
        }
    }

    async fn quarantine_unconfirmed(
        &mut self,
        reason: pcrd_protocol::astm::link::AbortReason,
        seqs: Vec<u64>,
    ) {
        for seq in seqs {
            if let Some((raw, stored)) = self.unconfirmed.remove(&seq) {
                let item = Quarantined {
                    instrument: self.instrument.clone(),
                    connection: self.connection,
                    key: Some(self.key(seq)),
                    reason: if stored {
                        QuarantineReason::Unconfirmed(reason)
                    } else {
                        QuarantineReason::Aborted(reason)
                    },
                    raw,
                };
                self.quarantine(item).await;
            }
        }
    }

    /// Quarantines `item`; `false` if the store failed (logged: data at risk).
    async fn quarantine(&self, item: Quarantined) -> bool {
        match self.store.quarantine(&item).await {
            Ok(()) => {
                warn!(instrument = %self.instrument, reason = %item.reason, bytes = item.raw.len(), "Bytes quarantined.");
                self.emit(HostEvent::Quarantined {
                    instrument: item.instrument,
                    key: item.key,
                    reason: item.reason,
                });
                true
            }
            Err(e) => {
                error!(instrument = %self.instrument, reason = %item.reason, error = %e,
                    bytes = item.raw.len(), "Quarantine failed; the bytes are lost.");
                false
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
