//! The high-water mark: a small file beside sled's log naming the newest state known
//! to be durable.
//!
//! sled recovers a damaged log by treating the damage as the end of the log: a store
//! with garbage in its middle opens without an error and silently lacks everything
//! written after it (found by `tests/tests/store_errors.rs`). The mark is written
//! outside sled after every barrier, so at open the store can tell that sled came back
//! with less than it had acknowledged.
//!
//! The mark is rewritten in place without its own fsync: it costs a `pwrite`, not a
//! second flush per barrier. After a power cut it may therefore be older than sled's
//! state, which only weakens the check (an old mark is always satisfied); it can never
//! be newer than what was durable, because it is written after the barrier completed.
//! A torn or missing mark is ignored with a warning.
//!
//! The mark also says whether the last process closed the store cleanly (a final
//! barrier, then `Store::close`). It is set to "open" as soon as a process opens the
//! store, so a crash at any later point leaves it saying so; the daemon then reads
//! every record before trusting the store again (see `Lab::scrub`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use sha2::Digest;

pub(crate) const FILE_NAME: &str = "pcrd.mark";
const MAGIC: &[u8; 4] = b"PCM1";
const MAX_PAYLOAD: usize = 64;

/// Frames a payload: magic, length, payload, then the first 4 bytes of its SHA-256.
fn encode(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + 1 + payload.len() + 4);
    out.extend_from_slice(MAGIC);
    out.push(payload.len() as u8);
    out.extend_from_slice(payload);
    let digest = sha2::Sha256::digest(&out);
    out.extend_from_slice(&digest[..4]);
    out
}

fn decode(bytes: &[u8]) -> Option<Vec<u8>> {
    let rest = bytes.strip_prefix(MAGIC)?;
    let (&len, rest) = rest.split_first()?;
    let len = usize::from(len);
    if len > MAX_PAYLOAD || rest.len() < len + 4 {
        return None;
    }
    let framed_len = 4 + 1 + len;
    let digest = sha2::Sha256::digest(&bytes[..framed_len]);
    (bytes[framed_len..framed_len + 4] == digest[..4]).then(|| rest[..len].to_vec())
}

/// What the mark file says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Mark {
    /// Whether the process that wrote it had closed the store cleanly.
    pub(crate) clean: bool,
    /// The user's description of the newest durable state (empty: none yet).
    pub(crate) head: Vec<u8>,
}

impl Mark {
    fn to_payload(&self) -> Vec<u8> {
        let mut payload = vec![u8::from(self.clean)];
        payload.extend_from_slice(&self.head);
        payload
    }

    fn from_payload(payload: &[u8]) -> Option<Mark> {
        let (&clean, head) = payload.split_first()?;
        Some(Mark {
            clean: clean == 1,
            head: head.to_vec(),
        })
    }
}

/// Reads the mark of the store at `dir`: `None` when absent or unreadable.
pub(crate) fn read(dir: &Path) -> Option<Mark> {
    let bytes = std::fs::read(dir.join(FILE_NAME)).ok()?;
    let mark = decode(&bytes).as_deref().and_then(Mark::from_payload);
    if mark.is_none() && !bytes.is_empty() {
        tracing::warn!(path = %dir.display(), "The store's high-water mark is unreadable; it is ignored and rewritten.");
    }
    mark
}

/// Writes a mark in place (see the module doc for why without fsync).
pub(crate) fn write(file: &File, mark: &Mark) -> std::io::Result<()> {
    let payload = mark.to_payload();
    debug_assert!(payload.len() <= MAX_PAYLOAD);
    file.write_all_at(&encode(&payload), 0)
}

/// Writes a mark and waits for it to reach the disk: for the open/closed transitions,
/// which happen once per run.
pub(crate) fn write_synced(file: &File, mark: &Mark) -> std::io::Result<()> {
    write(file, mark)?;
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clean_flag_and_head_round_trip() {
        for clean in [false, true] {
            let mark = Mark {
                clean,
                head: b"head".to_vec(),
            };
            assert_eq!(Mark::from_payload(&mark.to_payload()), Some(mark));
        }
    }

    #[test]
    fn a_mark_round_trips_and_damage_is_detected() {
        let payload = b"sequence and hash";
        let framed = encode(payload);
        assert_eq!(decode(&framed).as_deref(), Some(&payload[..]));
        for i in 0..framed.len() {
            let mut damaged = framed.clone();
            damaged[i] ^= 0x40;
            assert_eq!(decode(&damaged), None, "flipped byte {i} went unnoticed");
        }
        assert_eq!(decode(&framed[..framed.len() - 1]), None);
        assert_eq!(decode(b""), None);
    }

    proptest::proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..128)) {
            let _ = decode(&bytes);
        }
    }
}
