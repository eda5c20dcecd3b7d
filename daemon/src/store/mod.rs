//! The store: sled 0.34 behind a small API.
//!
//! - Named trees, one per kind of record ([`Trees`]).
//! - Every value starts with a format-version byte followed by postcard bytes
//!   ([`encode`] / [`decode`]); keys are big-endian so that sled's byte order is the
//!   numeric order.
//! - Each state change is one sled transaction across the trees it touches; callers then
//!   wait on [`Store::durable`], the durability barrier, before acknowledging anything.
//! - Opening never panics: a locked, corrupt or unwritable store is a [`StoreError`] with
//!   a message an operator can act on.

mod barrier;
mod mark;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use barrier::Barrier;
pub use barrier::{BarrierError, BarrierStats};

/// The layout of the store as a whole; bumped when trees or keys change meaning.
const SCHEMA_VERSION: u32 = 1;
const META_SCHEMA_VERSION: &[u8] = b"schema_version";

/// Why the store could not be opened or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another process (usually another `pcrd serve`) holds the store's lock.
    #[error(
        "the store at {path} is in use by another process (is another pcrd running on it?): {detail}"
    )]
    Locked { path: PathBuf, detail: String },
    /// sled found a checksum mismatch or an impossible structure while reading its log.
    #[error(
        "the store at {path} is corrupt ({detail}). pcrd will not start on it: move the directory aside \
         (keep it for diagnosis), start with an empty store and re-import from instrument exports \
         and the central system"
    )]
    Corrupt { path: PathBuf, detail: String },
    /// The directory cannot be created, opened or written.
    #[error("cannot open the store at {path}: {source}")]
    Unavailable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The store was written by a newer pcrd with a layout this version does not know.
    #[error(
        "the store at {path} has layout version {found}; this pcrd understands up to {SCHEMA_VERSION}: upgrade pcrd"
    )]
    NewerSchema { path: PathBuf, found: u32 },
    /// A stored value could not be decoded.
    #[error("corrupt record in tree {tree} at key {key}: {detail}")]
    BadRecord {
        tree: &'static str,
        key: String,
        detail: String,
    },
    /// sled reported an error while reading or writing.
    #[error("store I/O error: {0}")]
    Sled(#[from] sled::Error),
    /// The durability barrier failed.
    #[error(transparent)]
    Barrier(#[from] BarrierError),
}

impl StoreError {
    /// Whether the error shows damaged data (as opposed to a busy or missing store, or
    /// a failed write): the store must not be trusted further.
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            StoreError::Corrupt { .. }
                | StoreError::BadRecord { .. }
                | StoreError::Sled(sled::Error::Corruption { .. })
        )
    }
}

/// The named trees. Key layouts are documented on each field.
#[derive(Clone, Debug)]
pub struct Trees {
    /// barcode (ASCII) -> `TubeRecord`
    pub tubes: sled::Tree,
    /// priority rank (1 byte, urgent = 0) ++ due at (i64 BE, offset, none = max)
    /// ++ received at (i64 BE, offset) ++ barcode -> empty. Tubes received and not yet
    /// on a plate, in plating order.
    pub waiting: sled::Tree,
    /// plate id (ASCII) -> `PlateRecord`
    pub plates: sled::Tree,
    /// sequence (u64 BE) -> `AuditEntry`
    pub audit: sled::Tree,
    /// plate id ++ 0x00 ++ sequence (u64 BE) -> empty
    pub audit_by_plate: sled::Tree,
    /// name -> value (schema version, counters, the audit chain's head)
    pub meta: sled::Tree,
    /// Released result versions: result id ++ 0x00 ++ version (u32 BE) ->
    /// `outbox::StoredResult` (the record's JSON and its outbox seq). Kept after
    /// delivery. Details in `crate::outbox`.
    pub results: sled::Tree,
    /// Results waiting for delivery, in release order: seq (u64 BE) ->
    /// `outbox::OutboxEntry` (result id, version, release time, optional single sink).
    /// Removed once every configured sink has durably passed it.
    pub outbox: sled::Tree,
    /// Per sink: `cursor` 0x00 sink -> `outbox::CursorState`; `dead` 0x00 sink 0x00
    /// seq (u64 BE) -> `outbox::DeadLetter`; `redo` 0x00 sink 0x00 results key -> seq
    /// (u64 BE) of a re-queued dead letter.
    pub sink_state: sled::Tree,
    /// PCR runs on cyclers; key layout in `crate::cyclers`.
    /// Extraction runs share it (`RunRecord::is_extraction`, `crate::instruments`).
    pub runs: sled::Tree,
    /// Per-cycle fluorescence as it arrived; key layout in `crate::cyclers`.
    /// A finished run's analysis too (`b'a'`/`b'p'` after the run id; `crate::runs`).
    pub cycles: sled::Tree,
    /// Messages received from analysers (raw bytes kept); key layout in `crate::analysers`.
    pub messages: sled::Tree,
    /// Files imported from watched folders, by fingerprint; key layout in `crate::folders`:
    /// `f` ++ sha256 hex -> `ImportRecord` (the once-only index);
    /// `l` ++ folder ++ 0x00 ++ time (ms, ordered i64 BE) ++ sha256 hex -> `ImportEvent`
    /// (every outcome, per folder in time order);
    /// `r` ++ tube barcode ++ 0x00 ++ sha256 hex -> `ImportedResult` (results per tube).
    pub imports: sled::Tree,
    /// Review (`crate::review`): `c` ++ result id -> `Candidate` (a tube's computed
    /// result awaiting or past a decision); `r` ++ entry id -> `RerunEntry` (the rerun
    /// and pooled follow-up list).
    pub review: sled::Tree,
    /// Results analysers reported for tubes, listed per tube; key layout in
    /// `crate::analysers::store`.
    pub reported: sled::Tree,
}

/// Store tuning from the config file.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub path: PathBuf,
    /// sled's page cache, in bytes. sled's default (1 GiB) would let the cache grow
    /// far past what an instrument PC should give a daemon.
    pub cache_bytes: u64,
}

/// An open store.
#[derive(Clone, Debug)]
pub struct Store {
    db: sled::Db,
    trees: Trees,
    barrier: Barrier,
    path: PathBuf,
    /// The high-water mark found at open (see `mark.rs`).
    opened_mark: Option<mark::Mark>,
    /// Whether the previous process closed the store cleanly (or it is new).
    clean_start: bool,
    /// Set while a full check is owed (after an unclean stop, until a check passes):
    /// closing then does not mark the store clean, so the next start checks again.
    check_pending: Arc<std::sync::atomic::AtomicBool>,
    /// For the final, clean mark written by `close`.
    mark_file: Arc<File>,
}

impl Store {
    /// Opens (creating if needed) the store. Never panics, whatever is on disk.
    pub fn open(options: &StoreOptions) -> Result<Store, StoreError> {
        let path = options.path.clone();
        let unavailable = |source| StoreError::Unavailable {
            path: path.clone(),
            source,
        };
        let existed = path.join("db").exists();
        std::fs::create_dir_all(&path).map_err(unavailable)?;
        let config = sled::Config::new()
            .path(&path)
            .cache_capacity(options.cache_bytes)
            .mode(sled::Mode::LowSpace);
        let db = open_without_panicking(&config, &path)?;
        let trees = Trees {
            tubes: db.open_tree("tubes")?,
            waiting: db.open_tree("waiting")?,
            plates: db.open_tree("plates")?,
            audit: db.open_tree("audit")?,
            audit_by_plate: db.open_tree("audit_by_plate")?,
            meta: db.open_tree("meta")?,
            results: db.open_tree("results")?,
            outbox: db.open_tree("outbox")?,
            sink_state: db.open_tree("sink_state")?,
            runs: db.open_tree("runs")?,
            cycles: db.open_tree("cycles")?,
            messages: db.open_tree("messages")?,
            imports: db.open_tree("imports")?,
            review: db.open_tree("review")?,
            reported: db.open_tree("reported")?,
        };
        match trees.meta.get(META_SCHEMA_VERSION)? {
            Some(raw) => {
                let found = raw
                    .as_ref()
                    .try_into()
                    .map(u32::from_be_bytes)
                    .map_err(|_| StoreError::Corrupt {
                        path: path.clone(),
                        detail: "unreadable schema version".into(),
                    })?;
                if found > SCHEMA_VERSION {
                    return Err(StoreError::NewerSchema { path, found });
                }
            }
            None => {
                trees
                    .meta
                    .insert(META_SCHEMA_VERSION, &SCHEMA_VERSION.to_be_bytes())?;
            }
        }
        let db_file = File::open(path.join("db")).map_err(unavailable)?;
        let opened_mark = mark::read(&path);
        let clean_start = !existed || opened_mark.as_ref().is_some_and(|m| m.clean);
        let mark_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path.join(mark::FILE_NAME))
            .map_err(unavailable)?;
        // From here until `close`, a crash must leave the mark saying so.
        let open_mark = mark::Mark {
            clean: false,
            head: opened_mark
                .as_ref()
                .map(|m| m.head.clone())
                .unwrap_or_default(),
        };
        mark::write_synced(&mark_file, &open_mark).map_err(unavailable)?;
        let mark_file = Arc::new(mark_file);
        let barrier = Barrier::start(db.clone(), db_file, Arc::clone(&mark_file), open_mark.head)
            .map_err(unavailable)?;
        let store = Store {
            db,
            trees,
            barrier,
            path: path.clone(),
            opened_mark,
            clean_start,
            check_pending: Arc::new(std::sync::atomic::AtomicBool::new(!clean_start)),
            mark_file,
        };
        if !existed {
            // A new store: its files' directory entries must survive a power cut too.
            store.barrier_blocking_first()?;
            File::open(&path)
                .and_then(|dir| dir.sync_all())
                .map_err(unavailable)?;
        }
        Ok(store)
    }

    fn barrier_blocking_first(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        File::open(self.path.join("db"))
            .and_then(|f| f.sync_all())
            .map_err(|source| StoreError::Unavailable {
                path: self.path.clone(),
                source,
            })
    }

    pub fn trees(&self) -> &Trees {
        &self.trees
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The durability barrier: returns once everything committed before the call is on
    /// stable storage. Concurrent callers share one flush + fdatasync.
    pub async fn durable(&self) -> Result<(), StoreError> {
        Ok(self.barrier.wait().await?)
    }

    /// The high-water mark found when the store was opened: the newest state the last
    /// run knew to be durable, as set with [`Store::set_mark`]. `None` for a new store
    /// or an unreadable mark.
    pub fn opened_mark(&self) -> Option<&[u8]> {
        self.opened_mark
            .as_ref()
            .map(|m| m.head.as_slice())
            .filter(|head| !head.is_empty())
    }

    /// Whether the previous process closed this store cleanly (true for a new store).
    /// After a crash, callers should read every record before trusting it.
    pub fn clean_start(&self) -> bool {
        self.clean_start
    }

    /// Records that a full check of the store passed (see `clean_start`).
    pub fn checked(&self) {
        self.check_pending
            .store(false, std::sync::atomic::Ordering::Release);
    }

    /// Records what the next durability barrier makes durable (at most 64 bytes). Call
    /// after the transaction it describes has committed.
    pub fn set_mark(&self, payload: &[u8]) {
        self.barrier.set_mark(payload);
    }

    /// Stops the store acknowledging writes, e.g. after finding damage.
    pub fn fail(&self, why: String) {
        self.barrier.fail(why);
    }

    /// Resolves once the store has stopped acknowledging writes, with why.
    pub async fn failed(&self) -> String {
        self.barrier.failed().await
    }

    /// Why the store stopped acknowledging writes, if it has (see [`BarrierError`]).
    pub fn failure(&self) -> Option<String> {
        self.barrier.failure()
    }

    pub fn barrier_stats(&self) -> &BarrierStats {
        self.barrier.stats()
    }

    /// Stops the sync thread, flushes, and marks the store closed cleanly (unless a
    /// full check is still owed). Called on orderly shutdown.
    pub fn close(&self) -> Result<(), StoreError> {
        let head = self.barrier.stop();
        self.db.flush()?;
        let io = |source| StoreError::Unavailable {
            path: self.path.clone(),
            source,
        };
        File::open(self.path.join("db"))
            .and_then(|f| f.sync_data())
            .map_err(io)?;
        let clean = !self
            .check_pending
            .load(std::sync::atomic::Ordering::Acquire);
        mark::write_synced(&self.mark_file, &mark::Mark { clean, head }).map_err(io)
    }
}

/// sled 0.34 can panic while recovering a damaged log (spacejam/sled#1387). Turn that
/// into an error, keeping the default panic message off the operator's terminal.
fn open_without_panicking(config: &sled::Config, path: &Path) -> Result<sled::Db, StoreError> {
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open()));
    std::panic::set_hook(previous_hook);
    let path = path.to_path_buf();
    match outcome {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(sled::Error::Io(e))) if e.to_string().contains("could not acquire lock") => {
            Err(StoreError::Locked {
                path,
                detail: e.to_string(),
            })
        }
        Ok(Err(sled::Error::Io(source))) => Err(StoreError::Unavailable { path, source }),
        Ok(Err(sled::Error::Corruption { at, .. })) => Err(StoreError::Corrupt {
            path,
            detail: match at {
                Some(at) => format!("checksum or structure mismatch at {at:?}"),
                None => "checksum or structure mismatch".into(),
            },
        }),
        Ok(Err(other)) => Err(StoreError::Corrupt {
            path,
            detail: other.to_string(),
        }),
        Err(panic) => {
            let detail = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .unwrap_or_else(|| "sled panicked while recovering its log".into());
            Err(StoreError::Corrupt { path, detail })
        }
    }
}

/// A record kind with its current format version. When a later change needs to
/// read older versions, it adds their decoding here; until then any other
/// version byte is an error.
pub trait Versioned: Serialize + DeserializeOwned {
    /// The tree this record lives in (for error messages).
    const TREE: &'static str;
    /// Written as the first byte of every value.
    const VERSION: u8;
}

/// Encodes a record as its version byte followed by postcard bytes.
pub fn encode<T: Versioned>(value: &T) -> Vec<u8> {
    let out = vec![T::VERSION];
    // postcard only fails on types it cannot represent (e.g. untagged enums), which is a
    // programming error caught by the round-trip tests of every record.
    match postcard::to_extend(value, out) {
        Ok(bytes) => bytes,
        Err(e) => panic!("record for tree {} cannot be encoded: {e}", T::TREE),
    }
}

/// Decodes a value written by [`encode`].
pub fn decode<T: Versioned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    let bad = |detail: String| StoreError::BadRecord {
        tree: T::TREE,
        key: String::from_utf8_lossy(key).into_owned(),
        detail,
    };
    match bytes.split_first() {
        Some((&version, body)) if version == T::VERSION => {
            postcard::from_bytes(body).map_err(|e| bad(e.to_string()))
        }
        Some((&version, _)) => Err(bad(format!(
            "format version {version}, expected {}",
            T::VERSION
        ))),
        None => Err(bad("empty value".into())),
    }
}

/// Maps an i64 to a u64 whose big-endian bytes sort like the signed value.
pub fn ordered_i64(value: i64) -> [u8; 8] {
    ((value as u64) ^ (1 << 63)).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &Path) -> Store {
        Store::open(&StoreOptions {
            path: path.to_path_buf(),
            cache_bytes: 1024 * 1024,
        })
        .unwrap()
    }

    /// What a crash leaves behind: the mark as a running process keeps it.
    fn simulate_crash(path: &Path) {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path.join(mark::FILE_NAME))
            .unwrap();
        let head = mark::read(path).unwrap().head;
        mark::write_synced(&file, &mark::Mark { clean: false, head }).unwrap();
    }

    #[test]
    fn a_check_is_owed_after_a_crash_until_one_passes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let store = open(&path);
        assert!(store.clean_start(), "a new store needs no check");
        store.set_mark(b"head-1");
        store.close().unwrap();
        drop(store);
        let store = open(&path);
        assert!(store.clean_start());
        assert_eq!(store.opened_mark(), Some(&b"head-1"[..]));
        store.close().unwrap();
        drop(store);

        simulate_crash(&path);
        let store = open(&path);
        assert!(!store.clean_start(), "a crash must be noticed");
        // Stopped before the check finished: the next start still owes it.
        store.close().unwrap();
        drop(store);
        let store = open(&path);
        assert!(!store.clean_start(), "an unfinished check is owed again");
        store.checked();
        store.close().unwrap();
        drop(store);
        let store = open(&path);
        assert!(store.clean_start(), "a passed check settles it");
        assert_eq!(store.opened_mark(), Some(&b"head-1"[..]));
        store.close().unwrap();
        drop(store);
    }
}
