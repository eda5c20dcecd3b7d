//! Indexes of the result candidates in the `review` tree, so that the review list
//! (candidates in one state) and a tube's candidates are read without decoding every
//! candidate ever staged: a lab stages 100,000 a day, and the reviewer's list is read
//! every few seconds.
//!
//! Keys (values empty), written in the same transaction as the candidate:
//! - `s` ++ state byte ++ result id: the candidates in each state;
//! - `t` ++ tube barcode ++ 0x00 ++ result id: each tube's candidates.
//!
//! A candidate's state key for every other state is removed when it is written, so
//! no read of the previous record is needed. Stores written before these indexes are
//! indexed once at start ([`ensure`]), recorded by the key [`BUILT`].

use crate::lab::{Lab, ReviewTx};
use crate::store::{StoreError, decode, encode};

use super::{Candidate, CandidateState, candidate_key};

/// Present once every candidate of the store is indexed.
pub const BUILT: &[u8] = b"xindex-v1";

fn state_byte(state: CandidateState) -> u8 {
    match state {
        CandidateState::AwaitingReview => b'a',
        CandidateState::Released => b'r',
        CandidateState::RerunRequested => b'q',
        CandidateState::Rejected => b'x',
        CandidateState::Preliminary => b'p',
    }
}

fn state_key(state: CandidateState, result_id: &str) -> Vec<u8> {
    let mut key = vec![b's', state_byte(state)];
    key.extend_from_slice(result_id.as_bytes());
    key
}

fn tube_prefix(tube: &str) -> Vec<u8> {
    let mut key = vec![b't'];
    key.extend_from_slice(tube.as_bytes());
    key.push(0);
    key
}

/// The index keys of `c`: `(keys to put, keys to remove)`.
fn keys(c: &Candidate) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let mut tube = tube_prefix(&c.tube);
    tube.extend_from_slice(c.result_id.as_bytes());
    let stale = CandidateState::ALL
        .into_iter()
        .filter(|s| *s != c.state)
        .map(|s| state_key(s, &c.result_id))
        .collect();
    (vec![state_key(c.state, &c.result_id), tube], stale)
}

/// Writes a candidate and its index keys in the transaction `tx`.
pub fn put(tx: &mut ReviewTx<'_>, c: &Candidate) {
    tx.put_review(candidate_key(&c.result_id), encode(c));
    let (put, remove) = keys(c);
    for key in remove {
        tx.remove_review(key);
    }
    for key in put {
        tx.put_review(key, Vec::new());
    }
}

fn load_ids(lab: &Lab, prefix: &[u8]) -> Result<Vec<Candidate>, StoreError> {
    let tree = &lab.store().trees().review;
    let mut out = Vec::new();
    for item in tree.scan_prefix(prefix) {
        let (key, _) = item?;
        let id = &key[prefix.len()..];
        let mut ckey = vec![b'c'];
        ckey.extend_from_slice(id);
        if let Some(raw) = tree.get(&ckey)? {
            out.push(decode(&ckey, &raw)?);
        }
    }
    Ok(out)
}

/// The candidates in `state`.
pub fn in_state(lab: &Lab, state: CandidateState) -> Result<Vec<Candidate>, StoreError> {
    load_ids(lab, &[b's', state_byte(state)])
}

/// The candidates of one tube.
pub fn of_tube(lab: &Lab, tube: &str) -> Result<Vec<Candidate>, StoreError> {
    load_ids(lab, &tube_prefix(tube))
}

/// Indexes a store written before the indexes existed, once; returns how many
/// candidates were indexed (0 when already done).
pub async fn ensure(lab: &Lab) -> Result<usize, StoreError> {
    let tree = &lab.store().trees().review;
    if tree.contains_key(BUILT)? {
        return Ok(0);
    }
    let mut batch = sled::Batch::default();
    let mut count = 0;
    for item in tree.scan_prefix(b"c") {
        let (key, raw) = item?;
        let c: Candidate = decode(&key, &raw)?;
        let (put, remove) = keys(&c);
        for key in remove {
            batch.remove(key);
        }
        for key in put {
            batch.insert(key, Vec::new());
        }
        count += 1;
    }
    batch.insert(BUILT, Vec::new());
    tree.apply_batch(batch)?;
    lab.store().durable().await?;
    Ok(count)
}
