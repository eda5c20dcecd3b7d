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

/// Reads the mark of the store at `dir`: `None` when absent or unreadable.
pub(crate) fn read(dir: &Path) -> Option<Vec<u8>> {
    let bytes = std::fs::read(dir.join(FILE_NAME)).ok()?;
    let mark = decode(&bytes);
    if mark.is_none() {
        tracing::warn!(path = %dir.display(), "The store's high-water mark is unreadable; it is ignored and rewritten.");
    }
    mark
}

/// Writes a mark in place (see the module doc for why without fsync).
pub(crate) fn write(file: &File, payload: &[u8]) -> std::io::Result<()> {
    debug_assert!(payload.len() <= MAX_PAYLOAD);
    file.write_all_at(&encode(payload), 0)
}

#[cfg(test)]
mod tests {
    use super::*;

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
