//! Faults on the RTU wire itself: what tokio-modbus's server cannot produce
//! because it only ever sends well-formed frames.
//!
//! [`Simulator::serve_rtu_line`] puts a relay between the simulator and the
//! port the driver talks to:
//!
//! ```text
//! driver ── pty (the port under test) ── relay ── pty pair ── tokio-modbus server
//! ```
//!
//! The relay passes requests through and cuts the server's replies into
//! frames by their length (Modbus over Serial Line v1.02 §2.5.1: unit,
//! function, data, CRC), so it can corrupt one reply at a time: a flipped CRC,
//! a changed data byte under the old CRC, line noise instead of the reply. It
//! can also stop passing anything (a pulled cable) and close the port (an
//! unplugged USB adapter).

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tracing::{Instrument, debug};

use super::extractor::Simulator;

/// A fault on the line. Reply faults apply to the next `count` replies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LineFault {
    /// The reply goes out with its CRC inverted.
    BadCrc { count: u32 },
    /// One data byte of the reply is changed and the CRC left as it was: what
    /// a burst of noise on RS-485 does to a frame.
    CorruptByte { count: u32 },
    /// These bytes go out instead of the reply.
    Garbage { bytes: Vec<u8>, count: u32 },
    /// Nothing passes either way (requests are lost) until
    /// [`RtuLine::plug_in`].
    Unplugged,
}

#[derive(Debug, Default)]
struct LineState {
    faults: Vec<LineFault>,
    /// Replies relayed untouched, and replies corrupted or replaced.
    relayed: u64,
    corrupted: u64,
}

impl LineState {
    fn unplugged(&self) -> bool {
        self.faults.contains(&LineFault::Unplugged)
    }

    /// What goes on the wire for one reply frame from the server.
    fn reply(&mut self, mut frame: Vec<u8>) -> Option<Vec<u8>> {
        if self.unplugged() {
            return None;
        }
        let mut corrupted = false;
        for fault in &mut self.faults {
            match fault {
                LineFault::BadCrc { count } if *count > 0 => {
                    *count -= 1;
                    let n = frame.len();
                    for b in &mut frame[n.saturating_sub(2)..] {
                        *b = !*b;
                    }
                    corrupted = true;
                    break;
                }
                LineFault::CorruptByte { count } if *count > 0 => {
                    *count -= 1;
                    // The last data byte (before the two CRC bytes): a register
                    // value for a read, the value echoed for a write.
                    let at = frame.len().saturating_sub(3);
                    if let Some(b) = frame.get_mut(at) {
                        *b ^= 0x5A;
                    }
                    corrupted = true;
                    break;
                }
                LineFault::Garbage { bytes, count } if *count > 0 => {
                    *count -= 1;
                    frame = bytes.clone();
                    corrupted = true;
                    break;
                }
                _ => {}
            }
        }
        self.faults.retain(|f| match f {
            LineFault::BadCrc { count }
            | LineFault::CorruptByte { count }
            | LineFault::Garbage { count, .. } => *count > 0,
            LineFault::Unplugged => true,
        });
        if corrupted {
            self.corrupted += 1;
        } else {
            self.relayed += 1;
        }
        Some(frame)
    }
}

/// The length of the reply frame at the start of `buf`, once enough of it
/// has arrived to tell (Modbus Application Protocol v1.1b3 §6.3, §6.6, §6.12,
/// §7: exception replies are unit, function | 0x80, code, CRC).
fn reply_len(buf: &[u8]) -> Option<usize> {
    let function = *buf.get(1)?;
    let len = match function {
        f if f & 0x80 != 0 => 5,
        0x03 | 0x04 => 5 + usize::from(*buf.get(2)?),
        0x06 | 0x10 => 8,
        // Not a reply this simulator sends: pass what there is.
        _ => buf.len(),
    };
    (buf.len() >= len).then_some(len)
}

/// A running relay: the line between the driver's port and the simulator.
#[derive(Debug)]
pub struct RtuLine {
    state: Arc<Mutex<LineState>>,
    relay: JoinHandle<()>,
    server: JoinHandle<std::io::Result<()>>,
}

impl RtuLine {
    fn state(&self) -> std::sync::MutexGuard<'_, LineState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn inject(&self, fault: LineFault) {
        self.state().faults.push(fault);
    }

    /// Ends [`LineFault::Unplugged`].
    pub fn plug_in(&self) {
        self.state().faults.retain(|f| *f != LineFault::Unplugged);
    }

    /// Replies passed untouched.
    pub fn relayed(&self) -> u64 {
        self.state().relayed
    }

    /// Replies corrupted or replaced by a fault.
    pub fn corrupted(&self) -> u64 {
        self.state().corrupted
    }

    /// Closes the port (the pty master the line was served on): the driver's
    /// end sees the line hang up. Returns when it is closed.
    pub async fn close(&mut self) {
        self.relay.abort();
        let _ = (&mut self.relay).await;
        self.server.abort();
    }
}

impl Drop for RtuLine {
    fn drop(&mut self) {
        self.relay.abort();
        self.server.abort();
    }
}

impl Simulator {
    /// Serves Modbus RTU on `port` through a relay that can corrupt replies
    /// and cut the line ([`LineFault`]).
    pub fn serve_rtu_line(&self, port: tokio_serial::SerialStream) -> std::io::Result<RtuLine> {
        let (inner_master, inner_slave) = tokio_serial::SerialStream::pair()?;
        let server = self.serve_rtu(inner_master);
        let state = Arc::new(Mutex::new(LineState::default()));
        let span = tracing::info_span!("sim_rtu_line");
        let relay = tokio::spawn(relay(port, inner_slave, Arc::clone(&state)).instrument(span));
        Ok(RtuLine {
            state,
            relay,
            server,
        })
    }
}

async fn relay(
    mut outer: tokio_serial::SerialStream,
    mut inner: tokio_serial::SerialStream,
    state: Arc<Mutex<LineState>>,
) {
    let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
    let mut from_driver = [0u8; 512];
    let mut from_server = [0u8; 512];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        tokio::select! {
            read = outer.read(&mut from_driver) => {
                let n = match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if lock().unplugged() {
                    continue;
                }
                if let Err(e) = inner.write_all(&from_driver[..n]).await {
                    debug!(error = %e, "Relay to the simulator failed.");
                    return;
                }
            }
            read = inner.read(&mut from_server) => {
                let n = match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                pending.extend_from_slice(&from_server[..n]);
                while let Some(len) = reply_len(&pending) {
                    let frame: Vec<u8> = pending.drain(..len).collect();
                    let out = lock().reply(frame);
                    if let Some(bytes) = out
                        && let Err(e) = outer.write_all(&bytes).await
                    {
                        debug!(error = %e, "Relay to the driver failed.");
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_cut_by_their_length() {
        assert_eq!(reply_len(&[1]), None);
        assert_eq!(reply_len(&[1, 0x83, 2, 0xC0, 0xF1]), Some(5));
        assert_eq!(reply_len(&[1, 3, 4, 0, 1, 0, 2]), None);
        assert_eq!(reply_len(&[1, 3, 4, 0, 1, 0, 2, 0xAA, 0xBB, 9]), Some(9));
        assert_eq!(reply_len(&[1, 6, 0, 40, 0, 1, 0xAA, 0xBB]), Some(8));
    }

    #[test]
    fn a_fault_corrupts_only_as_many_replies_as_it_says() {
        let mut line = LineState::default();
        line.faults.push(LineFault::BadCrc { count: 1 });
        let frame = vec![1, 3, 2, 0, 7, 0x10, 0x20];
        assert_eq!(
            line.reply(frame.clone()),
            Some(vec![1, 3, 2, 0, 7, 0xEF, 0xDF])
        );
        assert_eq!(line.reply(frame.clone()), Some(frame.clone()));
        line.faults.push(LineFault::CorruptByte { count: 1 });
        assert_eq!(
            line.reply(frame.clone()),
            Some(vec![1, 3, 2, 0, 7 ^ 0x5A, 0x10, 0x20])
        );
        line.faults.push(LineFault::Unplugged);
        assert_eq!(line.reply(frame), None);
        assert_eq!((line.relayed, line.corrupted), (1, 2));
    }
}
