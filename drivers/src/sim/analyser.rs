//! A simulated sample-to-answer analyser: the instrument end of an ASTM E1381 /
//! E1394 line, as a TCP client of pcrd's host or on a serial port (one end of
//! `SerialStream::pair()` in tests).
//!
//! It sends results messages built from a [`Scenario`] (H; per specimen P, O, one R
//! with the call, one R per target with its Ct and one for the internal control; L)
//! and receives orders. Sending is hand-rolled rather than done by the protocol's
//! `Link`, so that it can break the rules on purpose ([`Fault`]); receiving uses the
//! `Link` in the instrument role, with an optional NAK storm in front of it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use pcrd_protocol::astm::frame::{self, Frame};
use pcrd_protocol::astm::link::{Link, LinkConfig, LinkEvent};
use pcrd_protocol::astm::record::{Field, Message, Record, RecordType};
use pcrd_protocol::astm::{ACK, ENQ, EOT, ETX, Millis, NAK, STX};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::debug;

/// One target of an assay with its Ct (`None`: not detected, sent empty).
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// The analyte code (e.g. `ORF1ab`, `N`, `IC`).
    pub name: String,
    /// The Ct.
    pub ct: Option<f64>,
}

/// One specimen's results.
#[derive(Debug, Clone, PartialEq)]
pub struct Specimen {
    /// The specimen id (the tube barcode).
    pub id: String,
    /// The analyser's call (`POS`, `NEG`, `INV`).
    pub call: String,
    /// The viral targets.
    pub targets: Vec<Target>,
    /// The internal control.
    pub internal_control: Target,
}

/// What the analyser reports in one message.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    /// H.5 sender name.
    pub sender: String,
    /// The manufacturer's test code (O.5, R.3 component 4).
    pub test: String,
    /// H.14 message time.
    pub timestamp: String,
    /// The specimens, one P/O group each.
    pub specimens: Vec<Specimen>,
}

impl Scenario {
    /// Two specimens: a positive and a negative, of a SARS-CoV-2 ORF1ab/N assay with
    /// an internal control (`analysers/sim-an01.toml` maps it onto the kit
    /// `sarscov2-orf1ab-n-ic`).
    pub fn example() -> Scenario {
        let target = |name: &str, ct| Target {
            name: name.to_owned(),
            ct,
        };
        Scenario {
            sender: "SIM-AN01".into(),
            test: "SARS2".into(),
            timestamp: "20260115103012".into(),
            specimens: vec![
                Specimen {
                    id: "SPC0042".into(),
                    call: "POS".into(),
                    targets: vec![target("ORF1ab", Some(24.61)), target("N", Some(26.02))],
                    internal_control: target("IC", Some(28.4)),
                },
                Specimen {
                    id: "SPC0043".into(),
                    call: "NEG".into(),
                    targets: vec![target("ORF1ab", None), target("N", None)],
                    internal_control: target("IC", Some(27.9)),
                },
            ],
        }
    }

    /// The results message.
    pub fn message(&self) -> Message {
        let mut h = Record::new(RecordType::Header);
        h.set(2, Field::text("\\^&"))
            .set(5, Field::text(self.sender.clone()))
            .set(12, Field::text("P"))
            .set(13, Field::text("LIS2-A2"))
            .set(14, Field::text(self.timestamp.clone()));
        let mut records = vec![h];
        let test_id = |extra: &[&str]| {
            let mut parts = vec!["", "", "", self.test.as_str()];
            parts.extend_from_slice(extra);
            Field::components(parts)
        };
        for (i, s) in self.specimens.iter().enumerate() {
            let mut p = Record::new(RecordType::Patient);
            p.set(2, Field::text((i + 1).to_string()));
            let mut o = Record::new(RecordType::Order);
            o.set(2, Field::text("1"))
                .set(3, Field::text(s.id.clone()))
                .set(5, test_id(&[]))
                .set(6, Field::text("R"))
                .set(26, Field::text("F"));
            records.extend([p, o]);
            let mut call = Record::new(RecordType::Result);
            let flag = if s.call == "POS" { "A" } else { "" };
            call.set(2, Field::text("1"))
                .set(3, test_id(&[]))
                .set(4, Field::text(s.call.clone()))
                .set(7, Field::text(flag))
                .set(9, Field::text("F"));
            records.push(call);
            for (n, t) in s.targets.iter().chain([&s.internal_control]).enumerate() {
                let mut r = Record::new(RecordType::Result);
                r.set(2, Field::text((n + 2).to_string()))
                    .set(3, test_id(&[&t.name, "Ct"]))
                    .set(
                        4,
                        Field::text(t.ct.map(|c| format!("{c:.2}")).unwrap_or_default()),
                    )
                    .set(9, Field::text("F"));
                records.push(r);
            }
        }
        let mut l = Record::new(RecordType::Terminator);
        l.set(2, Field::text("1")).set(3, Field::text("N"));
        records.push(l);
        Message {
            delimiters: Default::default(),
            records,
        }
    }

    /// The results message's text (records separated by CR).
    pub fn text(&self) -> Vec<u8> {
        // Built from plain values with the default delimiters: encoding cannot fail.
        self.message().encode().unwrap_or_default()
    }
}

/// A rule the analyser breaks while sending, applied to the first attempt of frame
/// `frame` (0-based) of the next message sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The frame's checksum is off by one.
    BadChecksum {
        /// Which frame.
        frame: usize,
    },
    /// The frame carries a number two ahead of the right one (neither the next nor a
    /// repeat), with a correct checksum.
    WrongFrameNumber {
        /// Which frame.
        frame: usize,
    },
    /// Line noise (NUL, text, 0xFF) is sent before the frame.
    GarbageBefore {
        /// Which frame.
        frame: usize,
    },
    /// A frame of `len` text bytes (over the host's limit) is sent instead of the real
    /// one, which follows the host's NAK.
    OversizedFrame {
        /// Which frame.
        frame: usize,
        /// Text length of the oversized frame.
        len: usize,
    },
    /// No EOT after the last frame: the analyser just stops.
    MissingEot,
    /// Frame `frame` is sent a second time after its ACK, as when the ACK was lost on
    /// the way: the host must ACK and discard the repeat.
    RepeatFrame {
        /// Which frame.
        frame: usize,
    },
    /// The line is cut (the analyser closes its end and stops) once frame `frame` is
    /// acknowledged.
    Disconnect {
        /// Which frame.
        frame: usize,
    },
}

/// How the analyser's sending went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendReport {
    /// Frames in the message.
    pub frames: usize,
    /// NAKs received.
    pub naks: u32,
}

/// Why the analyser could not send.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SimSendError {
    /// The host answered ENQ with NAK or not at all, 6 times.
    #[error("host did not accept the line")]
    LineRefused,
    /// A frame was NAKed 6 times.
    #[error("frame {0} refused 6 times")]
    TooManyNaks(usize),
    /// No reply to frame `n` within the reply timeout (EOT was sent).
    #[error("no reply to frame {0}")]
    NoReply(usize),
    /// The line failed.
    #[error("line failed: {0}")]
    Io(String),
}

/// How the simulated analyser behaves.
#[derive(Debug, Clone)]
pub struct AnalyserConfig {
    /// The receiving link (timers; text per frame when sending).
    pub link: LinkConfig,
    /// Answer each order message received with a results message for its specimens
    /// (call `NEG`, no Ct for `ORF1ab` and `N`, internal control at 28.00), as an analyser
    /// does once it has run the ordered tests.
    pub answer_orders: bool,
}

impl Default for AnalyserConfig {
    fn default() -> Self {
        AnalyserConfig {
            link: LinkConfig::instrument(),
            answer_orders: false,
        }
    }
}

/// How far the message being sent has got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Frames in the message being (or last) sent.
    pub frames: usize,
    /// Of those, frames the host has ACKed.
    pub acked: usize,
    /// Transmissions finished (EOT sent, or left out by [`Fault::MissingEot`]).
    pub transmissions: u64,
}

#[derive(Debug, Default)]
struct State {
    progress: Progress,
    orders: Vec<Message>,
    nak_storm: u32,
    naks_sent: u32,
}

type Reply = oneshot::Sender<Result<SendReport, SimSendError>>;
type SendJob = (Vec<u8>, Vec<Fault>, Reply);

/// A running simulated analyser.
#[derive(Debug)]
pub struct Analyser {
    jobs: mpsc::Sender<SendJob>,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl Drop for Analyser {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Analyser {
    /// Connects to a host listening on `addr`.
    pub async fn connect_tcp(
        addr: SocketAddr,
        config: AnalyserConfig,
    ) -> std::io::Result<Analyser> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Analyser::on_stream(stream, config))
    }

    /// Runs on any byte stream (a serial port, a pty end, a socket).
    pub fn on_stream<T>(io: T, config: AnalyserConfig) -> Analyser
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let state = Arc::new(Mutex::new(State::default()));
        let (jobs, rx) = mpsc::channel(4);
        let task = tokio::spawn(run(io, config, rx, state.clone()));
        Analyser { jobs, state, task }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends the scenario's results message with `faults`, and waits for the outcome.
    pub async fn send_results(
        &self,
        scenario: &Scenario,
        faults: Vec<Fault>,
    ) -> Result<SendReport, SimSendError> {
        self.send_text(scenario.text(), faults).await
    }

    /// Sends any message text (records separated by CR), e.g. one out of hierarchy.
    pub async fn send_text(
        &self,
        text: Vec<u8>,
        faults: Vec<Fault>,
    ) -> Result<SendReport, SimSendError> {
        let (tx, rx) = oneshot::channel();
        let stopped = || SimSendError::Io("analyser stopped".into());
        self.jobs
            .send((text, faults, tx))
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// How far the current (or last) message has got.
    pub fn progress(&self) -> Progress {
        self.state().progress
    }

    /// Order messages received so far.
    pub fn orders(&self) -> Vec<Message> {
        self.state().orders.clone()
    }

    /// Answers the next `naks` frames received with NAK instead of ACK.
    pub fn nak_storm(&self, naks: u32) {
        self.state().nak_storm = naks;
    }

    /// NAKs sent by the storm so far.
    pub fn naks_sent(&self) -> u32 {
        self.state().naks_sent
    }
}

async fn run<T>(
    mut io: T,
    config: AnalyserConfig,
    mut jobs: mpsc::Receiver<SendJob>,
    state: Arc<Mutex<State>>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send,
{
    let lock = || state.lock().unwrap_or_else(PoisonError::into_inner);
    let epoch = Instant::now();
    let now = || Millis(u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX));
    let text_per_frame = config.link.text_per_frame;
    let reply_timeout = config.link.reply_timeout;
    let mut link = Link::new(config.link);
    let mut buf = vec![0u8; 4096];
    let mut pending = Vec::new();
    let mut frame_in_input = false;
    // Messages waiting for the line: the caller's, and answers to orders.
    let mut queue: VecDeque<(Vec<u8>, Vec<Fault>, Option<Reply>)> = VecDeque::new();
    loop {
        loop {
            while let Some(mut bytes) = link.poll_transmit() {
                // A NAK storm replaces ACKs to frames (not to ENQ) with NAK; the link
                // then ACKs the host's repeat of the frame as a duplicate.
                if bytes == [ACK] && frame_in_input {
                    let mut s = lock();
                    if s.nak_storm > 0 {
                        s.nak_storm -= 1;
                        s.naks_sent += 1;
                        bytes = vec![NAK];
                    }
                }
                if io.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            match link.poll_event() {
                Some(LinkEvent::MessageComplete(m)) => {
                    if let Ok(message) = m.records {
                        if config.answer_orders {
                            queue.push_back((answer(&message).text(), Vec::new(), None));
                        }
                        lock().orders.push(message);
                    }
                    let _ = link.ack_last_frame(now());
                }
                Some(other) => debug!(event = ?other, "Simulated analyser link event."),
                None => break,
            }
        }
        if link.is_idle()
            && let Some((text, faults, reply)) = queue.pop_front()
        {
            let mut sender = Sender {
                io: &mut io,
                pending: &mut pending,
                reply_timeout,
                state: &state,
            };
            let outcome = sender.send(&text, text_per_frame, &faults).await;
            let failed = matches!(outcome, Err(SimSendError::Io(_)));
            if let Some(reply) = reply {
                let _ = reply.send(outcome);
            }
            if failed {
                return;
            }
            // Bytes that arrived after the transmission belong to the link.
            if !pending.is_empty() {
                frame_in_input = pending.contains(&STX);
                link.handle_bytes(now(), &std::mem::take(&mut pending));
            }
            continue;
        }
        let deadline = link
            .next_deadline()
            .map(|d| epoch + Duration::from_millis(d.0));
        tokio::select! {
            read = io.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    frame_in_input = buf[..n].contains(&STX);
                    link.handle_bytes(now(), &buf[..n]);
                }
            },
            Some((text, faults, reply)) = jobs.recv() => queue.push_back((text, faults, Some(reply))),
            () = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => link.handle_timeout(now()),
        }
    }
}

/// The hand-rolled sender (instrument side).
struct Sender<'a, T> {
    io: &'a mut T,
    pending: &'a mut Vec<u8>,
    reply_timeout: Duration,
    state: &'a Arc<Mutex<State>>,
}

const ATTEMPTS: u32 = 6;

impl<T: AsyncRead + AsyncWrite + Unpin> Sender<'_, T> {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), SimSendError> {
        self.io
            .write_all(bytes)
            .await
            .map_err(|e| SimSendError::Io(e.to_string()))
    }

    /// The next ACK, NAK, EOT or ENQ, or `None` after the reply timeout.
    async fn reply(&mut self) -> Result<Option<u8>, SimSendError> {
        let deadline = Instant::now() + self.reply_timeout;
        loop {
            if let Some(p) = self
                .pending
                .iter()
                .position(|b| matches!(*b, ACK | NAK | EOT | ENQ))
            {
                let b = self.pending[p];
                self.pending.drain(..=p);
                return Ok(Some(b));
            }
            self.pending.clear();
            let mut buf = [0u8; 256];
            match tokio::time::timeout_at(deadline, self.io.read(&mut buf)).await {
                Err(_) => return Ok(None),
                Ok(Ok(0)) => return Err(SimSendError::Io("closed".into())),
                Ok(Ok(n)) => self.pending.extend_from_slice(&buf[..n]),
                Ok(Err(e)) => return Err(SimSendError::Io(e.to_string())),
            }
        }
    }

    async fn send(
        &mut self,
        text: &[u8],
        text_per_frame: usize,
        faults: &[Fault],
    ) -> Result<SendReport, SimSendError> {
        let frames = frame::split_message(text, text_per_frame, 1);
        {
            let mut s = self.lock();
            s.progress.frames = frames.len();
            s.progress.acked = 0;
        }
        let mut report = SendReport {
            frames: frames.len(),
            naks: 0,
        };
        // Establishment: the instrument wins contention, so an ENQ from the host only
        // means "bid again shortly".
        let mut bids = 0;
        loop {
            self.write(&[ENQ]).await?;
            match self.reply().await? {
                Some(ACK) => break,
                Some(ENQ) => tokio::time::sleep(Duration::from_secs(1)).await,
                _ => {
                    bids += 1;
                    if bids >= ATTEMPTS {
                        self.write(&[EOT]).await?;
                        return Err(SimSendError::LineRefused);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        for (i, f) in frames.iter().enumerate() {
            let good = encode(f)?;
            let mut attempt = 1;
            loop {
                if attempt == 1 {
                    let bad = faulty(f, i, faults)?;
                    self.write(&bad).await?;
                } else {
                    self.write(&good).await?;
                }
                match self.reply().await? {
                    Some(ACK) => {
                        self.lock().progress.acked += 1;
                        if faults.contains(&Fault::Disconnect { frame: i }) {
                            return Err(SimSendError::Io("line cut (fault)".into()));
                        }
                        if faults.contains(&Fault::RepeatFrame { frame: i }) {
                            self.write(&good).await?;
                            if self.reply().await? != Some(ACK) {
                                self.write(&[EOT]).await?;
                                return Err(SimSendError::TooManyNaks(i));
                            }
                        }
                        break;
                    }
                    Some(EOT) => {
                        // Receiver interrupt: stop here.
                        self.write(&[EOT]).await?;
                        return Err(SimSendError::TooManyNaks(i));
                    }
                    None => {
                        self.write(&[EOT]).await?;
                        self.lock().progress.transmissions += 1;
                        return Err(SimSendError::NoReply(i));
                    }
                    Some(_) => {
                        report.naks += 1;
                        attempt += 1;
                        if attempt > ATTEMPTS {
                            self.write(&[EOT]).await?;
                            self.lock().progress.transmissions += 1;
                            return Err(SimSendError::TooManyNaks(i));
                        }
                    }
                }
            }
        }
        if !faults.contains(&Fault::MissingEot) {
            self.write(&[EOT]).await?;
        }
        self.lock().progress.transmissions += 1;
        Ok(report)
    }
}

fn encode(f: &Frame) -> Result<Vec<u8>, SimSendError> {
    f.encode().map_err(|e| SimSendError::Io(e.to_string()))
}

/// Frame `f` (index `i`) as sent on its first attempt, faults applied.
fn faulty(f: &Frame, i: usize, faults: &[Fault]) -> Result<Vec<u8>, SimSendError> {
    let mut out = Vec::new();
    let mut frame = f.clone();
    let mut bad_checksum = false;
    for fault in faults {
        match *fault {
            Fault::GarbageBefore { frame: n } if n == i => {
                out.extend_from_slice(b"\x00garbage\xff\r\n");
            }
            Fault::OversizedFrame { frame: n, len } if n == i => {
                out.push(STX);
                out.push(b'0' + f.number);
                out.extend(std::iter::repeat_n(b'X', len));
                out.push(ETX);
                out.extend_from_slice(b"00\r\n");
                // Only the oversized frame: the host NAKs it and the real one goes next.
                return Ok(out);
            }
            Fault::WrongFrameNumber { frame: n } if n == i => frame.number = (f.number + 2) % 8,
            Fault::BadChecksum { frame: n } if n == i => bad_checksum = true,
            _ => {}
        }
    }
    let mut bytes = encode(&frame)?;
    if bad_checksum {
        let at = bytes.len() - 4;
        let sum = frame::checksum(&bytes[1..at]).wrapping_add(1);
        bytes[at..at + 2].copy_from_slice(format!("{sum:02X}").as_bytes());
    }
    out.extend(bytes);
    Ok(out)
}

/// The results an analyser configured with `answer_orders` sends for an order message.
fn answer(orders: &Message) -> Scenario {
    let target = |name: &str, ct| Target {
        name: name.to_owned(),
        ct,
    };
    let test = orders
        .orders()
        .first()
        .and_then(|(o, _)| o.tests().first().map(|t| t.code.clone()))
        .unwrap_or_else(|| "SARS2".into());
    Scenario {
        sender: "SIM-AN01".into(),
        test,
        timestamp: "20260115120000".into(),
        specimens: orders
            .orders()
            .iter()
            .map(|(o, _)| Specimen {
                id: o.specimen_id().to_owned(),
                call: "NEG".into(),
                targets: vec![target("ORF1ab", None), target("N", None)],
                internal_control: target("IC", Some(28.0)),
            })
            .collect(),
    }
}
