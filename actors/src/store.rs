//! The content store: immutable blobs named by their BLAKE3 hash, and the release records
//! that say which manifest is current (and which came before it) for each name.
//!
//! Layout under the store directory:
//! - `blobs/<first 2 hex>/<64 hex>`: complete blobs, one file each, written atomically;
//! - `partial/`: blobs being streamed in, renamed into `blobs/` once their hash checks out;
//! - `meta.redb`: the release records (a redb database).
//!
//! The file system is the source of truth for blobs: a blob exists exactly when its file
//! does, so no crash can leave a database row pointing at a missing file. An in-memory
//! index, rebuilt by a directory scan at open, answers `has`, `size_of` and the totals
//! without system calls. Every read re-hashes the file, so disk corruption is reported
//! instead of served to peers or installed.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use mesh_transport::fsutil;
use mesh_transport::ContentId;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::manifest::{ManifestDecodeError, ReleaseKind, SignedManifest};

/// The largest blob this store accepts in one piece.
pub const BLOB_BYTES_MAX: u64 = 1 << 30;
/// One range read answers one request from a peer; 1 MiB bounds the memory a request can
/// pin while letting a slow link make steady progress in pieces.
pub const RANGE_BYTES_MAX: u64 = 1 << 20;
/// Blobs are public release content, not secrets, so other local tools may read them.
const BLOB_FILE_MODE: u32 = 0o644;
/// The prefix `fsutil::temp_path` gives temp files; any left at open are from a crash.
const TEMP_PREFIX: &str = ".tmp-";
/// Damaged blob files kept in `quarantine/` for a person to look at; older ones are
/// deleted, so repeated damage cannot fill the disk.
pub const QUARANTINE_KEPT_MAX: usize = 8;
/// Bytes of quarantined files kept at most: they sit outside the store's size cap, so
/// the newest are kept for inspection only while they fit in this.
pub const QUARANTINE_BYTES_MAX: u64 = 256 * 1024 * 1024;
/// Quarantined blobs waiting to be fetched again; past this the oldest are dropped
/// (the scrub finds them missing from nowhere, but their releases still name them and
/// a later fetch brings them back).
pub const DAMAGED_QUEUE_MAX: usize = 256;

/// Release records: key `"<kind>/<name>"`, value `SignedManifest::encode()` bytes.
const CURRENT: TableDefinition<&str, &[u8]> = TableDefinition::new("releases_current");
/// The record each current one replaced, kept so a failing release can be rolled back.
const PREVIOUS: TableDefinition<&str, &[u8]> = TableDefinition::new("releases_previous");
/// Releases that failed on this node for good (their restart budget ran out), by key
/// `"<kind>/<name>"`: the failed version and why. Such a version is not run again here.
const FAILED: TableDefinition<&str, (u64, &str)> = TableDefinition::new("releases_failed");
/// Failure reports of releases (this node's own and those gossiped by peers), by arrival
/// number, oldest first: who reported it and the encoded report. Kept so that a node that
/// restarts still knows which releases failed elsewhere.
const FAILURE_REPORTS: TableDefinition<u64, (&str, &[u8])> =
    TableDefinition::new("failure_reports");
/// Failure reports kept in the database; the oldest go first. Reports are a few hundred
/// bytes, and a few hundred cover a fleet's recent bad releases many times over.
pub const FAILURE_REPORTS_KEPT_MAX: usize = 256;
/// A stored failure report larger than this is refused: the gossiped ones are limited
/// when they are decoded, so anything larger (with room for the reporter's name) is not
/// a report.
pub const FAILURE_REPORT_STORED_BYTES_MAX: usize =
    2 * crate::sandbox_supervisor::FAILURE_REPORT_BYTES_MAX;

/// Errors from opening a content store.
#[derive(Debug, thiserror::Error)]
pub enum StoreOpenError {
    #[error("opening content store: creating directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("opening content store: removing leftover file {path}: {source}")]
    Cleanup { path: PathBuf, source: io::Error },
    #[error("opening content store: scanning {path}: {source}")]
    Scan { path: PathBuf, source: io::Error },
    #[error("opening content store: release database {path}: {source}")]
    Database { path: PathBuf, source: redb::Error },
}

/// Errors from storing a blob, whole or streamed.
#[derive(Debug, thiserror::Error)]
pub enum PutError {
    #[error("storing blob {expected}: the content hashes to {actual} instead")]
    HashMismatch {
        expected: ContentId,
        actual: ContentId,
    },
    #[error("storing blob {id}: more than the declared {size} bytes arrived")]
    SizeExceeded { id: ContentId, size: u64 },
    #[error("storing blob {id}: {actual} bytes arrived but {expected} were declared")]
    SizeMismatch {
        id: ContentId,
        expected: u64,
        actual: u64,
    },
    #[error("storing blob {id}: {size} bytes is over the limit of {BLOB_BYTES_MAX} bytes")]
    TooLarge { id: ContentId, size: u64 },
    #[error("storing blob {id}: this writer already failed and its partial file is gone")]
    Abandoned { id: ContentId },
    #[error("storing blob {id}: {source}")]
    Io { id: ContentId, source: io::Error },
    #[error(
        "storing blob {id}: the store is full ({stored} of {max} bytes used, {size} more needed); \
         raise store_bytes_max or remove old releases"
    )]
    StoreFull {
        id: ContentId,
        size: u64,
        stored: u64,
        max: u64,
    },
}

/// Errors from reading or removing blobs and reading release records.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("reading blob {0}: it is not in the store")]
    NotFound(ContentId),
    #[error("reading {what}: it is corrupt: {detail}")]
    Corrupt { what: String, detail: String },
    #[error("reading blob {id}: {len} bytes at offset {offset} run past its end at {size} bytes")]
    OutOfRange {
        id: ContentId,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("{action}: {source}")]
    Io { action: String, source: io::Error },
    #[error("reading release records: {0}")]
    Database(#[from] redb::Error),
}

/// Errors from recording a release.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("recording release {name} v{version}: not newer than the current v{current}")]
    NotNewer {
        name: String,
        version: u64,
        current: u64,
    },
    #[error("recording release: the manifest would not decode again: {0}")]
    Invalid(#[from] ManifestDecodeError),
    #[error("recording release {key}: the stored current record is corrupt: {detail}")]
    Corrupt { key: String, detail: String },
    #[error("recording release: {0}")]
    Database(#[from] redb::Error),
}

/// Errors from keeping a failure report.
#[derive(Debug, thiserror::Error)]
pub enum FailureReportRecordError {
    #[error("keeping a failure report: {len} bytes, more than {max}")]
    TooLarge { len: usize, max: usize },
    #[error("keeping a failure report: {0}")]
    Database(#[from] redb::Error),
}

/// Any redb error as the umbrella `redb::Error`, so `?` can lift it into our enums.
fn redb_err<E: Into<redb::Error>>(e: E) -> redb::Error {
    e.into()
}

fn release_key(kind: ReleaseKind, name: &str) -> String {
    format!("{kind}/{name}")
}

/// Decodes a stored release record, checking that it is the record its key says it is.
fn decode_record(key: &str, bytes: &[u8]) -> Result<SignedManifest, String> {
    let signed = SignedManifest::decode(bytes).map_err(|e| e.to_string())?;
    let expected = release_key(signed.manifest.kind, &signed.manifest.name);
    if expected != key {
        return Err(format!("the record holds the manifest of {expected}"));
    }
    Ok(signed)
}

/// The blob half of the store, shared with streaming writers so that a writer does not
/// keep the release database open.
struct Blobs {
    blobs_dir: PathBuf,
    partial_dir: PathBuf,
    /// Bao outboards of complete blobs, by id (`outboards/<hex>`).
    outboards_dir: PathBuf,
    /// Resumable downloads (`verified::PartialBlob`), kept across restarts.
    downloads_dir: PathBuf,
    /// Blob files that failed verification, moved out of `blobs/`.
    quarantine_dir: PathBuf,
    /// Quarantined blobs (id, size) that the node has not fetched again yet.
    damaged: Mutex<Vec<(ContentId, u64)>>,
    /// Total bytes of complete blobs and downloads the store may hold.
    bytes_max: AtomicU64,
    /// Size of every complete blob, by id.
    index: Mutex<HashMap<ContentId, u64>>,
    /// Blobs being moved to quarantine and salvaged: still "held", so no download of
    /// them starts (and opens the same partial files) until the salvage is done.
    quarantining: Mutex<HashSet<ContentId>>,
}

impl Blobs {
    /// Queues a damaged blob to be fetched again, once; past [`DAMAGED_QUEUE_MAX`] the
    /// oldest entry goes.
    fn enqueue_damaged(&self, id: ContentId, size: u64) {
        let mut queue = self.damaged.lock().unwrap_or_else(|e| e.into_inner());
        if queue.iter().any(|(d, _)| *d == id) {
            return;
        }
        if queue.len() >= DAMAGED_QUEUE_MAX {
            queue.remove(0);
        }
        queue.push((id, size));
    }

    fn index(&self) -> MutexGuard<'_, HashMap<ContentId, u64>> {
        // Every critical section is a single map operation, so the map is consistent even
        // if a holder panicked.
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn shard_dir(&self, id: &ContentId) -> PathBuf {
        self.blobs_dir.join(hex::encode(&id.0[..1]))
    }

    fn blob_path(&self, id: &ContentId) -> PathBuf {
        self.shard_dir(id).join(id.to_string())
    }

    /// Where the bao outboard of blob `id` is kept.
    fn outboard_path(&self, id: &ContentId) -> PathBuf {
        self.outboards_dir.join(id.to_string())
    }

    /// Creates the shard directory of `id` if needed, durably: a new directory entry in
    /// `blobs/` must survive a crash along with the blob renamed into it.
    fn ensure_shard(&self, id: &ContentId) -> io::Result<PathBuf> {
        let shard = self.shard_dir(id);
        if !shard.is_dir() {
            match fs::create_dir(&shard) {
                Ok(()) => fsutil::sync_dir(&self.blobs_dir)?,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Ok(shard)
    }
}

/// Blobs as files and release records in redb. `Send + Sync`; the node shares it in an `Arc`.
pub struct ContentStore {
    blobs: Arc<Blobs>,
    db: Database,
}

impl ContentStore {
    /// Opens the store in `dir`, creating it if needed. Removes temp files and partial
    /// blobs left by a crash, indexes the complete blobs and opens (or creates) the
    /// release database.
    pub fn open(dir: &Path) -> Result<ContentStore, StoreOpenError> {
        let blobs_dir = dir.join("blobs");
        let partial_dir = dir.join("partial");
        let outboards_dir = dir.join("outboards");
        let downloads_dir = dir.join("downloads");
        let quarantine_dir = dir.join("quarantine");
        for path in [
            dir,
            &blobs_dir,
            &partial_dir,
            &outboards_dir,
            &downloads_dir,
            &quarantine_dir,
        ] {
            fs::create_dir_all(path).map_err(|source| StoreOpenError::CreateDir {
                path: path.to_path_buf(),
                source,
            })?;
        }

        // Nothing in partial/ can be resumed: the hasher state died with the process.
        let mut removed = 0usize;
        for entry in read_dir(&partial_dir)? {
            remove_leftover(&entry.path())?;
            removed += 1;
        }
        for entry in read_dir(dir)? {
            if is_temp(&entry.path()) {
                remove_leftover(&entry.path())?;
                removed += 1;
            }
        }

        let mut index = HashMap::new();
        for entry in read_dir(&blobs_dir)? {
            let shard = entry.path();
            if is_temp(&shard) {
                remove_leftover(&shard)?;
                removed += 1;
                continue;
            }
            let shard_name = entry.file_name().to_string_lossy().into_owned();
            if !shard.is_dir() || shard_name.len() != 2 {
                tracing::warn!(path = %shard.display(), "ignoring unexpected entry in the blob directory");
                continue;
            }
            for file in read_dir(&shard)? {
                let path = file.path();
                if is_temp(&path) {
                    remove_leftover(&path)?;
                    removed += 1;
                    continue;
                }
                let name = file.file_name().to_string_lossy().into_owned();
                let id = match name.parse::<ContentId>() {
                    Ok(id) if name.len() == 64 && name.starts_with(&shard_name) => id,
                    _ => {
                        tracing::warn!(path = %path.display(), "ignoring a file that is not named by its blob id");
                        continue;
                    }
                };
                let meta = file.metadata().map_err(|source| StoreOpenError::Scan {
                    path: path.clone(),
                    source,
                })?;
                if meta.is_file() {
                    index.insert(id, meta.len());
                }
            }
        }
        if removed > 0 {
            tracing::info!(removed, dir = %dir.display(), "removed leftovers of interrupted writes");
        }

        let db_path = dir.join("meta.redb");
        let db_err = |source: redb::Error| StoreOpenError::Database {
            path: db_path.clone(),
            source,
        };
        // The database is small, so checking every page at open is cheap, and it turns a
        // file damaged on disk into an error here instead of a panic on some later read.
        let db = Database::builder()
            .set_check_integrity_on_open(true)
            .create(&db_path)
            .map_err(|e| db_err(redb_err(e)))?;
        // Creating the tables up front means readers never meet a missing table.
        let txn = db.begin_write().map_err(|e| db_err(redb_err(e)))?;
        txn.open_table(CURRENT).map_err(|e| db_err(redb_err(e)))?;
        txn.open_table(PREVIOUS).map_err(|e| db_err(redb_err(e)))?;
        txn.open_table(FAILED).map_err(|e| db_err(redb_err(e)))?;
        txn.open_table(FAILURE_REPORTS)
            .map_err(|e| db_err(redb_err(e)))?;
        txn.commit().map_err(|e| db_err(redb_err(e)))?;

        tracing::debug!(blobs = index.len(), dir = %dir.display(), "content store open");
        let store = ContentStore {
            blobs: Arc::new(Blobs {
                blobs_dir,
                partial_dir,
                outboards_dir,
                downloads_dir,
                quarantine_dir,
                damaged: Mutex::new(Vec::new()),
                bytes_max: AtomicU64::new(u64::MAX),
                index: Mutex::new(index),
                quarantining: Mutex::new(HashSet::new()),
            }),
            db,
        };
        store.requeue_quarantined();
        Ok(store)
    }

    /// Queues for repair again the quarantined blobs that a current or previous release
    /// still names and that are not held. The repair queue lives in memory, but the
    /// quarantine is on disk: without this, a node restarted before a repair finished
    /// would run on without the blob until a newer release named it.
    fn requeue_quarantined(&self) {
        let Ok(entries) = fs::read_dir(&self.blobs.quarantine_dir) else {
            return;
        };
        let missing: Vec<ContentId> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_string_lossy().parse::<ContentId>().ok())
            .filter(|id| !self.has(id))
            .collect();
        if missing.is_empty() {
            return;
        }
        let current = match self.current_releases() {
            Ok(list) => list,
            Err(e) => {
                tracing::warn!("finding the releases that name quarantined blobs: {e}");
                return;
            }
        };
        let mut named: HashMap<ContentId, u64> = HashMap::new();
        for signed in current {
            let m = &signed.manifest;
            if let Ok(Some(previous)) = self.previous_release(m.kind, &m.name) {
                named.insert(previous.manifest.content, previous.manifest.size);
            }
            named.insert(m.content, m.size);
        }
        for id in missing {
            let Some(size) = named.get(&id) else { continue };
            tracing::info!(blob = %id, "a quarantined blob that a release names is to be fetched again");
            self.blobs.enqueue_damaged(id, *size);
        }
    }

    pub fn has(&self, id: &ContentId) -> bool {
        // One lock at a time (quarantine takes them in the other order).
        let indexed = self.blobs.index().contains_key(id);
        indexed || self.quarantining().contains(id)
    }

    fn quarantining(&self) -> MutexGuard<'_, HashSet<ContentId>> {
        self.blobs
            .quarantining
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Caps the bytes of complete blobs plus downloads in progress.
    pub fn set_bytes_max(&self, max: u64) {
        self.blobs.bytes_max.store(max, Ordering::Relaxed);
    }

    /// Refuses a new blob of `size` bytes when the store would go over its cap.
    /// `reserved` is what downloads in progress will still add.
    pub fn check_room(&self, id: &ContentId, size: u64, reserved: u64) -> Result<(), PutError> {
        let max = self.blobs.bytes_max.load(Ordering::Relaxed);
        let stored = self.bytes_stored().saturating_add(reserved);
        if stored.saturating_add(size) > max {
            return Err(PutError::StoreFull {
                id: *id,
                size,
                stored,
                max,
            });
        }
        Ok(())
    }

    /// Where resumable downloads keep their files.
    pub fn downloads_dir(&self) -> &Path {
        &self.blobs.downloads_dir
    }

    /// The file of a complete blob.
    pub fn blob_path(&self, id: &ContentId) -> PathBuf {
        self.blobs.blob_path(id)
    }

    /// The bao outboard of a complete blob, computed (and checked against the id) the
    /// first time it is needed.
    pub fn outboard_path(&self, id: &ContentId) -> Result<PathBuf, ReadError> {
        let path = self.blobs.outboard_path(id);
        if path.exists() {
            return Ok(path);
        }
        let size = self.size_of(id).ok_or(ReadError::NotFound(*id))?;
        let ob = crate::verified::outboard_of_file(id, &self.blobs.blob_path(id), size).map_err(
            |e| match e {
                // Content that does not hash to its id, or a file shorter than its
                // size, is damage; anything else (a file removed meanwhile, too many
                // open files, an IO error) says nothing about the blob and must not
                // take a healthy one out of service.
                crate::verified::VerifiedError::BadOutboard { .. } => {
                    self.corrupt(id, e.to_string())
                }
                crate::verified::VerifiedError::Io { ref source, .. }
                    if source.kind() == std::io::ErrorKind::UnexpectedEof =>
                {
                    self.corrupt(id, e.to_string())
                }
                crate::verified::VerifiedError::Io { action, source } => ReadError::Io {
                    action: format!("computing the outboard of {id}: {action}"),
                    source,
                },
                other => ReadError::Io {
                    action: format!("computing the outboard of {id}"),
                    source: std::io::Error::other(other.to_string()),
                },
            },
        )?;
        fsutil::write_atomic(&path, &ob, BLOB_FILE_MODE).map_err(|source| ReadError::Io {
            action: format!("writing the outboard of {id}"),
            source,
        })?;
        Ok(path)
    }

    /// Takes over a finished, fully verified download: its outboard and its data file,
    /// renamed into place.
    pub fn adopt(
        &self,
        id: &ContentId,
        data: &Path,
        size: u64,
        outboard: &[u8],
    ) -> Result<(), PutError> {
        let io_err = |source| PutError::Io { id: *id, source };
        let ob_path = self.blobs.outboard_path(id);
        fsutil::write_atomic(&ob_path, outboard, BLOB_FILE_MODE).map_err(io_err)?;
        let shard = self.blobs.ensure_shard(id).map_err(io_err)?;
        fs::rename(data, self.blobs.blob_path(id)).map_err(io_err)?;
        fsutil::sync_dir(&shard).map_err(io_err)?;
        self.blobs.index().insert(*id, size);
        Ok(())
    }

    pub fn size_of(&self, id: &ContentId) -> Option<u64> {
        self.blobs.index().get(id).copied()
    }

    /// Stores `bytes` as blob `id`, atomically. Nothing is written when the bytes do not
    /// hash to `id`. Storing a blob that is already present is a no-op.
    pub fn put(&self, id: &ContentId, bytes: &[u8]) -> Result<(), PutError> {
        let size = bytes.len() as u64;
        if size > BLOB_BYTES_MAX {
            return Err(PutError::TooLarge { id: *id, size });
        }
        let actual = ContentId::of(bytes);
        if actual != *id {
            return Err(PutError::HashMismatch {
                expected: *id,
                actual,
            });
        }
        if self.has(id) {
            return Ok(());
        }
        self.check_room(id, size, 0)?;
        let io_err = |source| PutError::Io { id: *id, source };
        self.blobs.ensure_shard(id).map_err(io_err)?;
        fsutil::write_atomic(&self.blobs.blob_path(id), bytes, BLOB_FILE_MODE).map_err(io_err)?;
        self.blobs.index().insert(*id, size);
        Ok(())
    }

    /// Starts a streaming put of blob `id`, `size` bytes long, for data arriving in chunks.
    pub fn writer(&self, id: ContentId, size: u64) -> Result<BlobWriter, PutError> {
        if size > BLOB_BYTES_MAX {
            return Err(PutError::TooLarge { id, size });
        }
        self.check_room(&id, size, 0)?;
        // Unique per process and writer, so concurrent downloads of one blob never share
        // a partial file.
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let partial = self
            .blobs
            .partial_dir
            .join(format!("{id}-{}-{n}", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(BLOB_FILE_MODE)
            .open(&partial)
            .map_err(|source| PutError::Io { id, source })?;
        Ok(BlobWriter {
            blobs: self.blobs.clone(),
            id,
            size,
            written: 0,
            file: Some(file),
            partial,
            partial_exists: true,
        })
    }

    /// Reads a whole blob, re-hashing it: a file that no longer matches its id (disk
    /// corruption) is reported as [`ReadError::Corrupt`], never returned.
    pub fn read(&self, id: &ContentId) -> Result<Vec<u8>, ReadError> {
        let mut file = self.open_blob(id)?;
        let io_err = |source| ReadError::Io {
            action: format!("reading blob {id}"),
            source,
        };
        let size = file.metadata().map_err(io_err)?.len();
        if size > BLOB_BYTES_MAX {
            return Err(self.corrupt(id, format!("the file has grown to {size} bytes")));
        }
        // The capacity is bounded by BLOB_BYTES_MAX just above.
        let mut bytes = Vec::with_capacity(size as usize);
        file.read_to_end(&mut bytes).map_err(io_err)?;
        let actual = ContentId::of(&bytes);
        if actual != *id {
            return Err(self.corrupt(id, format!("the file now hashes to {actual}")));
        }
        Ok(bytes)
    }

    /// Reads `len` bytes at `offset`, with `len` capped at [`RANGE_BYTES_MAX`] (the
    /// caller asks again for the rest). A range running past the end of the blob is
    /// [`ReadError::OutOfRange`]. The range is not verified against the id; the receiver
    /// verifies the whole blob when its [`BlobWriter`] finishes.
    pub fn read_range(&self, id: &ContentId, offset: u64, len: u64) -> Result<Vec<u8>, ReadError> {
        let len = len.min(RANGE_BYTES_MAX);
        let file = self.open_blob(id)?;
        let io_err = |source| ReadError::Io {
            action: format!("reading {len} bytes of blob {id} at offset {offset}"),
            source,
        };
        let size = file.metadata().map_err(io_err)?.len();
        match offset.checked_add(len) {
            Some(end) if end <= size => {}
            _ => {
                return Err(ReadError::OutOfRange {
                    id: *id,
                    offset,
                    len,
                    size,
                })
            }
        }
        // len is at most RANGE_BYTES_MAX, so this allocation is bounded.
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, offset).map_err(io_err)?;
        Ok(buf)
    }

    /// Deletes a blob. Release records that name it are left alone; the caller decides
    /// what may be garbage collected.
    pub fn remove(&self, id: &ContentId) -> Result<(), ReadError> {
        let _ = fs::remove_file(self.blobs.outboard_path(id));
        let path = self.blobs.blob_path(id);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.blobs.index().remove(id);
                return Err(ReadError::NotFound(*id));
            }
            Err(source) => {
                return Err(ReadError::Io {
                    action: format!("removing blob {id}"),
                    source,
                })
            }
        }
        self.blobs.index().remove(id);
        fsutil::sync_dir(&self.blobs.shard_dir(id)).map_err(|source| ReadError::Io {
            action: format!("removing blob {id}"),
            source,
        })
    }

    /// Records `signed` as the current release of its (kind, name), moving the old
    /// current record to "previous". Refuses a version not newer than the current one.
    /// Both records change in one redb write transaction, so a crash leaves either the
    /// old pair or the new pair.
    pub fn record_release(&self, signed: &SignedManifest) -> Result<(), RecordError> {
        let m = &signed.manifest;
        let bytes = signed.encode();
        // Refuse anything `current_release` would later refuse to read back.
        SignedManifest::decode(&bytes)?;
        let key = release_key(m.kind, &m.name);
        let txn = self.db.begin_write().map_err(redb_err)?;
        {
            let mut current = txn.open_table(CURRENT).map_err(redb_err)?;
            let old = current
                .get(key.as_str())
                .map_err(redb_err)?
                .map(|g| g.value().to_vec());
            if let Some(old) = &old {
                let old_signed =
                    decode_record(&key, old).map_err(|detail| RecordError::Corrupt {
                        key: key.clone(),
                        detail,
                    })?;
                if m.version <= old_signed.manifest.version {
                    return Err(RecordError::NotNewer {
                        name: m.name.clone(),
                        version: m.version,
                        current: old_signed.manifest.version,
                    });
                }
                let mut previous = txn.open_table(PREVIOUS).map_err(redb_err)?;
                previous
                    .insert(key.as_str(), old.as_slice())
                    .map_err(redb_err)?;
            }
            current
                .insert(key.as_str(), bytes.as_slice())
                .map_err(redb_err)?;
        }
        txn.commit().map_err(redb_err)?;
        tracing::info!(kind = %m.kind, name = %m.name, version = m.version, "recorded release");
        Ok(())
    }

    pub fn current_release(
        &self,
        kind: ReleaseKind,
        name: &str,
    ) -> Result<Option<SignedManifest>, ReadError> {
        self.get_record(CURRENT, "current", &release_key(kind, name))
    }

    pub fn previous_release(
        &self,
        kind: ReleaseKind,
        name: &str,
    ) -> Result<Option<SignedManifest>, ReadError> {
        self.get_record(PREVIOUS, "previous", &release_key(kind, name))
    }

    /// Records that `version` of (kind, name) failed on this node, so it is not run again
    /// (the sandbox supervisor calls this when it gives up on a version or rolls it back).
    pub fn record_failure(
        &self,
        kind: ReleaseKind,
        name: &str,
        version: u64,
        reason: &str,
    ) -> Result<(), ReadError> {
        let key = release_key(kind, name);
        let txn = self.db.begin_write().map_err(redb_err)?;
        {
            let mut failed = txn.open_table(FAILED).map_err(redb_err)?;
            failed
                .insert(key.as_str(), (version, reason))
                .map_err(redb_err)?;
        }
        txn.commit().map_err(redb_err)?;
        tracing::info!(%kind, name, version, "recorded a failed release");
        Ok(())
    }

    /// The newest version of (kind, name) that failed on this node, if any.
    pub fn failed_version(&self, kind: ReleaseKind, name: &str) -> Result<Option<u64>, ReadError> {
        let txn = self.db.begin_read().map_err(redb_err)?;
        let table = txn.open_table(FAILED).map_err(redb_err)?;
        let version = table
            .get(release_key(kind, name).as_str())
            .map_err(redb_err)?
            .map(|g| g.value().0);
        Ok(version)
    }

    /// Keeps a failure report (`report` is its encoded form, as gossiped) from
    /// `reporter`, dropping the oldest ones beyond [`FAILURE_REPORTS_KEPT_MAX`].
    pub fn record_failure_report(
        &self,
        reporter: &str,
        report: &[u8],
    ) -> Result<(), FailureReportRecordError> {
        let len = reporter.len() + report.len();
        if len > FAILURE_REPORT_STORED_BYTES_MAX {
            return Err(FailureReportRecordError::TooLarge {
                len,
                max: FAILURE_REPORT_STORED_BYTES_MAX,
            });
        }
        let txn = self.db.begin_write().map_err(redb_err)?;
        {
            let mut table = txn.open_table(FAILURE_REPORTS).map_err(redb_err)?;
            let next = match table.last().map_err(redb_err)? {
                Some((key, _)) => key.value().saturating_add(1),
                None => 0,
            };
            table.insert(next, (reporter, report)).map_err(redb_err)?;
            while table.len().map_err(redb_err)? > FAILURE_REPORTS_KEPT_MAX as u64 {
                table.pop_first().map_err(redb_err)?;
            }
        }
        txn.commit().map_err(redb_err)?;
        Ok(())
    }

    /// The failure reports kept, oldest first, as (reporter, encoded report). The caller
    /// decodes them with its own size limit: the bytes came from peers.
    pub fn failure_reports(&self) -> Result<Vec<(String, Vec<u8>)>, ReadError> {
        let txn = self.db.begin_read().map_err(redb_err)?;
        let table = txn.open_table(FAILURE_REPORTS).map_err(redb_err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(redb_err)? {
            let (_, value) = row.map_err(redb_err)?;
            let (reporter, report) = value.value();
            out.push((reporter.to_string(), report.to_vec()));
        }
        Ok(out)
    }

    /// Every current release, of all kinds and names, sorted by (kind, name).
    pub fn current_releases(&self) -> Result<Vec<SignedManifest>, ReadError> {
        let txn = self.db.begin_read().map_err(redb_err)?;
        let table = txn.open_table(CURRENT).map_err(redb_err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(redb_err)? {
            let (key, value) = row.map_err(redb_err)?;
            let key = key.value();
            let signed =
                decode_record(key, value.value()).map_err(|detail| ReadError::Corrupt {
                    what: format!("current release record {key}"),
                    detail,
                })?;
            out.push(signed);
        }
        out.sort_by(|a, b| {
            (a.manifest.kind, &a.manifest.name).cmp(&(b.manifest.kind, &b.manifest.name))
        });
        Ok(out)
    }

    pub fn blob_count(&self) -> usize {
        self.blobs.index().len()
    }

    pub fn bytes_stored(&self) -> u64 {
        self.blobs.index().values().sum()
    }

    fn get_record(
        &self,
        table: TableDefinition<&str, &[u8]>,
        which: &str,
        key: &str,
    ) -> Result<Option<SignedManifest>, ReadError> {
        let txn = self.db.begin_read().map_err(redb_err)?;
        let table = txn.open_table(table).map_err(redb_err)?;
        let Some(value) = table.get(key).map_err(redb_err)? else {
            return Ok(None);
        };
        decode_record(key, value.value())
            .map(Some)
            .map_err(|detail| ReadError::Corrupt {
                what: format!("{which} release record {key}"),
                detail,
            })
    }

    fn open_blob(&self, id: &ContentId) -> Result<File, ReadError> {
        match File::open(self.blobs.blob_path(id)) {
            Ok(f) => Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // The file is the truth; forget an index entry that outlived it.
                self.blobs.index().remove(id);
                Err(ReadError::NotFound(*id))
            }
            Err(source) => Err(ReadError::Io {
                action: format!("opening blob {id}"),
                source,
            }),
        }
    }

    fn corrupt(&self, id: &ContentId, detail: String) -> ReadError {
        self.quarantine(id, &detail);
        ReadError::Corrupt {
            what: format!("blob {id}"),
            detail,
        }
    }

    /// Re-hashes a complete blob file, streaming. A file that no longer matches its id
    /// is quarantined (see [`ContentStore::quarantine`]) and reported as
    /// [`ReadError::Corrupt`].
    pub fn verify(&self, id: &ContentId) -> Result<(), ReadError> {
        let file = self.open_blob(id)?;
        let (actual, _) = crate::delta::hash_reader(file).map_err(|source| ReadError::Io {
            action: format!("verifying blob {id}"),
            source,
        })?;
        if actual != *id {
            return Err(self.corrupt(id, format!("the file now hashes to {actual}")));
        }
        Ok(())
    }

    /// Takes a blob that failed verification out of service: its file moves to
    /// `quarantine/` (never served, installed or run again), its outboard goes, and it
    /// joins the queue of blobs to fetch again, keeping its verified groups when it had
    /// an outboard to check them with. Returns whether the blob was in the store.
    pub fn quarantine(&self, id: &ContentId, why: &str) -> bool {
        // The blob leaves the index at once (a reader finding its file gone would
        // remove it anyway) but counts as held until its verified groups are salvaged,
        // so no download of it can start (and open the same partial files) meanwhile,
        // and a second quarantine of it finds nothing to do.
        let size = {
            let mut quarantining = self.quarantining();
            let Some(size) = self.blobs.index().remove(id) else {
                return false;
            };
            quarantining.insert(*id);
            size
        };
        let path = self.blobs.blob_path(id);
        let ob_path = self.blobs.outboard_path(id);
        let outboard = fs::read(&ob_path).ok();
        let _ = fs::remove_file(&ob_path);
        let kept = self.blobs.quarantine_dir.join(id.to_string());
        let moved = fs::rename(&path, &kept)
            .and_then(|_| fsutil::sync_dir(&self.blobs.shard_dir(id)))
            .and_then(|_| fsutil::sync_dir(&self.blobs.quarantine_dir));
        // A rename keeps the blob's old time, which would make it the first pruned;
        // the quarantine is ordered by when blobs entered it.
        if moved.is_ok() {
            let stamped = fs::File::options()
                .write(true)
                .open(&kept)
                .and_then(|f| f.set_modified(std::time::SystemTime::now()));
            if let Err(e) = stamped {
                tracing::warn!(blob = %id, "dating a quarantined blob: {e}");
            }
        }
        if let Err(e) = &moved {
            // The file must not stay where it would be served: remove it instead.
            tracing::warn!(blob = %id, "moving a damaged blob to quarantine: {e}; removing it");
            let _ = fs::remove_file(&path);
        }
        let salvaged = match (&moved, outboard) {
            (Ok(()), Some(ob)) => crate::verified::PartialBlob::salvage(
                &self.blobs.downloads_dir,
                *id,
                size,
                &kept,
                &ob,
            )
            .map_err(|e| tracing::warn!(blob = %id, "salvaging the verified parts of a damaged blob: {e}"))
            .is_ok(),
            _ => false,
        };
        self.quarantining().remove(id);
        tracing::error!(blob = %id, size, %why, salvaged, "blob failed verification: quarantined, to be fetched again");
        self.prune_quarantine();
        self.blobs.enqueue_damaged(*id, size);
        true
    }

    /// Forgets a blob's outboard (it failed to prove a blob that itself verifies); the
    /// next request computes it again.
    pub fn drop_outboard(&self, id: &ContentId) {
        let _ = fs::remove_file(self.blobs.outboard_path(id));
    }

    /// The quarantined blobs not yet handed out for fetching again (id, size).
    pub fn take_damaged(&self) -> Vec<(ContentId, u64)> {
        std::mem::take(&mut *self.blobs.damaged.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The complete blob after `after` in id order (the first one when `after` is
    /// `None` or the last), with its size: the scrub's walk over the store.
    pub fn next_blob(&self, after: Option<&ContentId>) -> Option<(ContentId, u64)> {
        let index = self.blobs.index();
        let next = index
            .iter()
            .filter(|(id, _)| after.is_none_or(|a| id.0 > a.0))
            .min_by_key(|(id, _)| id.0);
        match next {
            Some((id, size)) => Some((*id, *size)),
            None => index
                .iter()
                .min_by_key(|(id, _)| id.0)
                .map(|(id, s)| (*id, *s)),
        }
    }

    /// Keeps the newest quarantined files, at most [`QUARANTINE_KEPT_MAX`] of them and
    /// [`QUARANTINE_BYTES_MAX`] in all.
    fn prune_quarantine(&self) {
        let Ok(entries) = fs::read_dir(&self.blobs.quarantine_dir) else {
            return;
        };
        let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
            .flatten()
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                Some((m.modified().ok()?, m.len(), e.path()))
            })
            .collect();
        // Newest first: keep while both the count and the bytes fit.
        files.sort_by_key(|f| std::cmp::Reverse(f.0));
        let mut bytes = 0u64;
        for (i, (_, len, path)) in files.iter().enumerate() {
            bytes = bytes.saturating_add(*len);
            if i >= QUARANTINE_KEPT_MAX || bytes > QUARANTINE_BYTES_MAX {
                let _ = fs::remove_file(path);
            }
        }
    }
}

fn is_temp(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with(TEMP_PREFIX))
}

fn read_dir(dir: &Path) -> Result<Vec<fs::DirEntry>, StoreOpenError> {
    let scan_err = |source| StoreOpenError::Scan {
        path: dir.to_path_buf(),
        source,
    };
    fs::read_dir(dir)
        .map_err(scan_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(scan_err)
}

fn remove_leftover(path: &Path) -> Result<(), StoreOpenError> {
    let result = if path.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StoreOpenError::Cleanup {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// A streaming put: bytes arrive in chunks and become a blob only when
/// [`BlobWriter::finish`] finds the declared size and hash. Dropping the writer without
/// finishing removes its partial file.
pub struct BlobWriter {
    blobs: Arc<Blobs>,
    id: ContentId,
    size: u64,
    written: u64,
    /// `None` once the writer failed or finished.
    file: Option<File>,
    partial: PathBuf,
    partial_exists: bool,
}

impl BlobWriter {
    /// Appends a chunk. More bytes than the declared size is [`PutError::SizeExceeded`],
    /// after which the writer is abandoned and its partial file removed.
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), PutError> {
        let Some(file) = self.file.as_mut() else {
            return Err(PutError::Abandoned { id: self.id });
        };
        let len = chunk.len() as u64;
        if self.written.saturating_add(len) > self.size {
            self.discard();
            return Err(PutError::SizeExceeded {
                id: self.id,
                size: self.size,
            });
        }
        if let Err(source) = file.write_all(chunk) {
            self.discard();
            return Err(PutError::Io {
                id: self.id,
                source,
            });
        }
        self.written += len;
        Ok(())
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Checks the size and hash, makes the data durable and renames it into `blobs/`,
    /// with its outboard beside it. On a mismatch the partial file is removed and nothing
    /// is stored.
    ///
    /// The hash is taken with the outboard in one pass over the written file, so the
    /// blob can be served at once: computed at the first request instead, the outboard
    /// of a 64 MiB blob held up the first responses by about 60 ms.
    pub fn finish(mut self) -> Result<(), PutError> {
        let id = self.id;
        let Some(file) = self.file.take() else {
            return Err(PutError::Abandoned { id });
        };
        if self.written != self.size {
            drop(file);
            self.discard();
            return Err(PutError::SizeMismatch {
                id,
                expected: self.size,
                actual: self.written,
            });
        }
        let io_err = |source| PutError::Io { id, source };
        let (actual, outboard) = match crate::verified::hash_file(&self.partial, self.size) {
            Ok(hashed) => hashed,
            Err(e) => {
                drop(file);
                self.discard();
                return Err(io_err(match e {
                    crate::verified::VerifiedError::Io { source, .. } => source,
                    other => std::io::Error::other(other.to_string()),
                }));
            }
        };
        if actual != id {
            drop(file);
            self.discard();
            return Err(PutError::HashMismatch {
                expected: id,
                actual,
            });
        }
        file.sync_all().map_err(io_err)?;
        drop(file);
        let shard = self.blobs.ensure_shard(&id).map_err(io_err)?;
        fs::rename(&self.partial, self.blobs.blob_path(&id)).map_err(io_err)?;
        self.partial_exists = false;
        fsutil::sync_dir(&shard).map_err(io_err)?;
        fsutil::sync_dir(&self.blobs.partial_dir).map_err(io_err)?;
        // A crash before this leaves the blob without an outboard; the first request
        // for it computes one, as it does for blobs stored whole.
        let ob_path = self.blobs.outboard_path(&id);
        fsutil::write_atomic(&ob_path, &outboard, BLOB_FILE_MODE).map_err(io_err)?;
        self.blobs.index().insert(id, self.size);
        Ok(())
    }

    /// Abandons the writer: closes and removes the partial file.
    fn discard(&mut self) {
        self.file = None;
        if self.partial_exists {
            if let Err(e) = fs::remove_file(&self.partial) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %self.partial.display(), error = %e, "removing a partial blob");
                }
            }
            self.partial_exists = false;
        }
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        self.discard();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Manifest;
    use mesh_transport::SecretKey;

    fn files_under(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p);
                }
            }
        }
        out.sort();
        out
    }

    /// Blob data files and partial files, without the database and the outboards.
    fn blob_files(dir: &Path) -> Vec<PathBuf> {
        files_under(dir)
            .into_iter()
            .filter(|p| p.file_name().unwrap() != "meta.redb")
            .filter(|p| !p.starts_with(dir.join("outboards")))
            .collect()
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    fn signed(kind: ReleaseKind, name: &str, version: u64) -> SignedManifest {
        let m = Manifest {
            kind,
            name: name.into(),
            version,
            content: ContentId::of(name.as_bytes()),
            size: 5,
            created_unix: 1,
            expires_unix: None,
            quotas: Default::default(),
            deltas: Vec::new(),
        };
        SignedManifest::sign(m, &[&SecretKey::from_seed([4; 32])])
    }

    #[test]
    fn store_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<ContentStore>();
        check::<BlobWriter>();
    }

    #[test]
    fn put_and_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let bytes = data(5000);
        let id = ContentId::of(&bytes);
        assert!(!store.has(&id));
        assert!(matches!(store.read(&id), Err(ReadError::NotFound(x)) if x == id));
        store.put(&id, &bytes).unwrap();
        assert!(store.has(&id));
        assert_eq!(store.size_of(&id), Some(5000));
        assert_eq!(store.read(&id).unwrap(), bytes);
        let hex = id.to_string();
        let path = dir.path().join("blobs").join(&hex[..2]).join(&hex);
        assert_eq!(fs::read(&path).unwrap(), bytes);
        // A second put of the same blob is a no-op.
        store.put(&id, &bytes).unwrap();
        let other = data(7);
        store.put(&ContentId::of(&other), &other).unwrap();
        assert_eq!(store.blob_count(), 2);
        assert_eq!(store.bytes_stored(), 5007);
        assert_eq!(blob_files(dir.path()).len(), 2);
    }

    #[test]
    fn hash_mismatch_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let claimed = ContentId::of(b"the real thing");
        match store.put(&claimed, b"an impostor") {
            Err(PutError::HashMismatch { expected, actual }) => {
                assert_eq!(expected, claimed);
                assert_eq!(actual, ContentId::of(b"an impostor"));
            }
            other => panic!("expected a hash mismatch, got {other:?}"),
        }
        assert!(!store.has(&claimed));
        assert_eq!(store.blob_count(), 0);
        assert!(blob_files(dir.path()).is_empty());
    }

    #[test]
    fn writer_in_chunks_equals_put() {
        let bytes = data(100_003);
        let id = ContentId::of(&bytes);
        let a = tempfile::tempdir().unwrap();
        let streamed = ContentStore::open(a.path()).unwrap();
        let mut w = streamed.writer(id, bytes.len() as u64).unwrap();
        for chunk in bytes.chunks(4093) {
            w.write(chunk).unwrap();
        }
        w.write(&[]).unwrap();
        assert_eq!(w.written(), bytes.len() as u64);
        w.finish().unwrap();
        assert!(streamed.has(&id));
        assert_eq!(streamed.size_of(&id), Some(bytes.len() as u64));
        assert_eq!(streamed.read(&id).unwrap(), bytes);
        // The outboard was written with the blob, so serving it needs no hashing pass.
        let ob_path = a.path().join("outboards").join(id.to_string());
        let written = std::fs::read(&ob_path).expect("outboard written by finish");
        let blob_path = streamed.blobs.blob_path(&id);
        let computed =
            crate::verified::outboard_of_file(&id, &blob_path, bytes.len() as u64).unwrap();
        assert_eq!(written, computed);

        let b = tempfile::tempdir().unwrap();
        let whole = ContentStore::open(b.path()).unwrap();
        whole.put(&id, &bytes).unwrap();
        let files_a = blob_files(a.path());
        let files_b = blob_files(b.path());
        assert_eq!(files_a.len(), 1);
        assert_eq!(
            files_a[0].strip_prefix(a.path()).unwrap(),
            files_b[0].strip_prefix(b.path()).unwrap()
        );
        assert_eq!(
            fs::read(&files_a[0]).unwrap(),
            fs::read(&files_b[0]).unwrap()
        );
    }

    #[test]
    fn writer_rejects_overflow_and_leaves_no_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let bytes = data(100);
        let id = ContentId::of(&bytes);
        let mut w = store.writer(id, 100).unwrap();
        w.write(&bytes[..60]).unwrap();
        assert_eq!(blob_files(dir.path()).len(), 1, "the partial file exists");
        assert!(matches!(
            w.write(&bytes[..41]),
            Err(PutError::SizeExceeded { size: 100, .. })
        ));
        assert!(blob_files(dir.path()).is_empty());
        assert!(matches!(w.write(b"x"), Err(PutError::Abandoned { .. })));
        assert!(matches!(w.finish(), Err(PutError::Abandoned { .. })));
        assert!(!store.has(&id));
        assert!(!store.blob_path(&id).exists());
        assert!(matches!(
            store.writer(id, BLOB_BYTES_MAX + 1),
            Err(PutError::TooLarge { .. })
        ));
    }

    #[test]
    fn writer_rejects_wrong_hash_and_short_data_and_leaves_no_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let bytes = data(100);
        let id = ContentId::of(&bytes);

        let mut w = store.writer(id, 100).unwrap();
        let mut wrong = bytes.clone();
        wrong[50] ^= 1;
        w.write(&wrong).unwrap();
        assert!(matches!(
            w.finish(),
            Err(PutError::HashMismatch { expected, actual })
                if expected == id && actual == ContentId::of(&wrong)
        ));
        assert!(blob_files(dir.path()).is_empty());

        let mut w = store.writer(id, 100).unwrap();
        w.write(&bytes[..99]).unwrap();
        assert!(matches!(
            w.finish(),
            Err(PutError::SizeMismatch {
                expected: 100,
                actual: 99,
                ..
            })
        ));
        assert!(blob_files(dir.path()).is_empty());

        // Dropping an unfinished writer removes its partial file.
        let mut w = store.writer(id, 100).unwrap();
        w.write(&bytes[..10]).unwrap();
        assert_eq!(blob_files(dir.path()).len(), 1);
        drop(w);
        assert!(blob_files(dir.path()).is_empty());
        assert!(!store.has(&id));
    }

    #[test]
    fn read_detects_a_corrupted_blob_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let bytes = data(1000);
        let id = ContentId::of(&bytes);
        store.put(&id, &bytes).unwrap();
        let path = blob_files(dir.path()).pop().unwrap();
        let mut on_disk = fs::read(&path).unwrap();
        on_disk[500] ^= 0x40;
        fs::write(&path, &on_disk).unwrap();
        match store.read(&id) {
            Err(ReadError::Corrupt { what, .. }) => assert!(what.contains(&id.to_string())),
            other => panic!("expected corruption, got {other:?}"),
        }
        // Quarantined: out of the store, kept aside, queued to be fetched again.
        assert!(!store.has(&id));
        assert!(!store.blob_path(&id).exists());
        assert_eq!(
            fs::read(dir.path().join("quarantine").join(id.to_string())).unwrap(),
            on_disk
        );
        assert_eq!(store.take_damaged(), vec![(id, 1000)]);
        assert!(store.take_damaged().is_empty());
    }

    #[test]
    fn a_restarted_store_queues_again_the_quarantined_blobs_releases_name() {
        let dir = tempfile::tempdir().unwrap();
        // `signed` names the blob holding the release name's bytes (5 of them).
        let named = signed(ReleaseKind::Data, "model", 1);
        let id = named.manifest.content;
        let stray = b"nobody names these bytes";
        let stray_id = ContentId::of(stray);
        {
            let store = ContentStore::open(dir.path()).unwrap();
            store.put(&id, b"model").unwrap();
            store.put(&stray_id, stray).unwrap();
            store.record_release(&named).unwrap();
            for id in [id, stray_id] {
                let path = store.blob_path(&id);
                let mut on_disk = fs::read(&path).unwrap();
                on_disk[1] ^= 0x40;
                fs::write(&path, &on_disk).unwrap();
                assert!(matches!(store.verify(&id), Err(ReadError::Corrupt { .. })));
            }
            assert_eq!(store.take_damaged().len(), 2);
            // The node stops before the repair.
        }
        let store = ContentStore::open(dir.path()).unwrap();
        assert_eq!(store.take_damaged(), vec![(id, 5)]);
        // Once repaired, a restart leaves it alone.
        store.put(&id, b"model").unwrap();
        drop(store);
        let store = ContentStore::open(dir.path()).unwrap();
        assert!(store.take_damaged().is_empty());
    }

    #[test]
    fn a_damaged_blob_keeps_its_verified_groups_for_the_repair() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let size = 10 * crate::verified::GROUP_BYTES + 123;
        let bytes = data(size as usize);
        let id = ContentId::of(&bytes);
        store.put(&id, &bytes).unwrap();
        // Serving computes the outboard; the damage comes later, in group 3.
        store.outboard_path(&id).unwrap();
        store.verify(&id).unwrap();
        let path = store.blob_path(&id);
        let mut on_disk = fs::read(&path).unwrap();
        on_disk[(3 * crate::verified::GROUP_BYTES + 7) as usize] ^= 1;
        fs::write(&path, &on_disk).unwrap();
        assert!(matches!(store.verify(&id), Err(ReadError::Corrupt { .. })));
        assert!(!store.has(&id));
        assert_eq!(store.take_damaged(), vec![(id, size)]);
        let partial = crate::verified::PartialBlob::open(store.downloads_dir(), id, size).unwrap();
        let groups = crate::verified::groups_of(size);
        assert_eq!(partial.have_groups(), groups - 1);
        assert!(!partial.has_group(3));
        assert!(partial.has_group(2) && partial.has_group(groups - 1));
    }

    #[test]
    fn quarantine_keeps_only_the_newest_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        for i in 0..QUARANTINE_KEPT_MAX + 3 {
            let bytes = data(100 + i);
            let id = ContentId::of(&bytes);
            store.put(&id, &bytes).unwrap();
            assert!(store.quarantine(&id, "test"));
            assert!(!store.quarantine(&id, "twice"));
        }
        let kept = fs::read_dir(dir.path().join("quarantine")).unwrap().count();
        assert_eq!(kept, QUARANTINE_KEPT_MAX);
        assert_eq!(store.take_damaged().len(), QUARANTINE_KEPT_MAX + 3);
    }

    #[test]
    fn next_blob_walks_every_blob_in_order_and_wraps() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        assert_eq!(store.next_blob(None), None);
        let mut ids: Vec<ContentId> = (0..5)
            .map(|i| {
                let b = data(10 + i);
                let id = ContentId::of(&b);
                store.put(&id, &b).unwrap();
                id
            })
            .collect();
        ids.sort_by_key(|i| i.0);
        let mut cursor = None;
        let mut seen = Vec::new();
        for _ in 0..6 {
            let (id, _) = store.next_blob(cursor.as_ref()).unwrap();
            seen.push(id);
            cursor = Some(id);
        }
        assert_eq!(&seen[..5], &ids[..]);
        assert_eq!(seen[5], ids[0]);
    }

    #[test]
    fn leftover_temp_files_are_cleaned_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = data(10);
        let id = ContentId::of(&bytes);
        {
            let store = ContentStore::open(dir.path()).unwrap();
            store.put(&id, &bytes).unwrap();
            // A writer that never finishes, as after kill -9: forget it so Drop cannot clean.
            let mut w = store.writer(ContentId::of(b"other"), 5).unwrap();
            w.write(b"oth").unwrap();
            std::mem::forget(w);
        }
        let shard = blob_files(dir.path())
            .into_iter()
            .find(|p| p.starts_with(dir.path().join("blobs")))
            .unwrap()
            .parent()
            .unwrap()
            .to_path_buf();
        let temp = shard.join(format!(".tmp-1-2-{id}"));
        fs::write(&temp, b"half").unwrap();
        fs::write(dir.path().join("partial/stray"), b"x").unwrap();
        assert_eq!(blob_files(dir.path()).len(), 4);

        let store = ContentStore::open(dir.path()).unwrap();
        let left = blob_files(dir.path());
        assert_eq!(left.len(), 1, "left: {left:?}");
        assert_eq!(store.blob_count(), 1);
        assert_eq!(store.read(&id).unwrap(), bytes);
    }

    #[test]
    fn record_release_keeps_current_and_previous_and_refuses_older() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let k = ReleaseKind::Module;
        assert_eq!(store.current_release(k, "app").unwrap(), None);
        assert_eq!(store.previous_release(k, "app").unwrap(), None);

        let v1 = signed(k, "app", 1);
        store.record_release(&v1).unwrap();
        assert_eq!(store.current_release(k, "app").unwrap(), Some(v1.clone()));
        assert_eq!(store.previous_release(k, "app").unwrap(), None);

        let v2 = signed(k, "app", 2);
        store.record_release(&v2).unwrap();
        assert_eq!(store.current_release(k, "app").unwrap(), Some(v2.clone()));
        assert_eq!(store.previous_release(k, "app").unwrap(), Some(v1.clone()));

        for stale in [1, 2] {
            assert!(matches!(
                store.record_release(&signed(k, "app", stale)),
                Err(RecordError::NotNewer { version, current: 2, .. }) if version == stale
            ));
        }
        // A refused record changes nothing.
        assert_eq!(store.current_release(k, "app").unwrap(), Some(v2.clone()));
        assert_eq!(store.previous_release(k, "app").unwrap(), Some(v1));

        let v5 = signed(k, "app", 5);
        store.record_release(&v5).unwrap();
        assert_eq!(store.previous_release(k, "app").unwrap(), Some(v2));

        // Kinds and names are independent.
        assert_eq!(
            store.current_release(ReleaseKind::Firmware, "app").unwrap(),
            None
        );
        let fw = signed(ReleaseKind::Firmware, "app", 1);
        let other = signed(k, "aardvark", 1);
        store.record_release(&fw).unwrap();
        store.record_release(&other).unwrap();
        let all = store.current_releases().unwrap();
        assert_eq!(all, vec![other, v5, fw]);

        // Malformed manifests are refused before they reach the database.
        let mut bad = signed(k, "app", 9);
        bad.manifest.name = "Not/A/Name".into();
        assert!(matches!(
            store.record_release(&bad),
            Err(RecordError::Invalid(_))
        ));
    }

    #[test]
    fn reopen_after_drop_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = data(3000);
        let id = ContentId::of(&bytes);
        let (v1, v2) = (
            signed(ReleaseKind::Firmware, "gw", 1),
            signed(ReleaseKind::Firmware, "gw", 2),
        );
        {
            let store = ContentStore::open(dir.path()).unwrap();
            store.put(&id, &bytes).unwrap();
            let streamed = data(77);
            let sid = ContentId::of(&streamed);
            let mut w = store.writer(sid, 77).unwrap();
            w.write(&streamed).unwrap();
            w.finish().unwrap();
            store.record_release(&v1).unwrap();
            store.record_release(&v2).unwrap();
        }
        let store = ContentStore::open(dir.path()).unwrap();
        assert_eq!(store.blob_count(), 2);
        assert_eq!(store.bytes_stored(), 3077);
        assert_eq!(store.size_of(&id), Some(3000));
        assert_eq!(store.read(&id).unwrap(), bytes);
        assert_eq!(store.read(&ContentId::of(&data(77))).unwrap(), data(77));
        let k = ReleaseKind::Firmware;
        assert_eq!(store.current_release(k, "gw").unwrap(), Some(v2));
        assert_eq!(store.previous_release(k, "gw").unwrap(), Some(v1));
        assert!(matches!(
            store.record_release(&signed(k, "gw", 2)),
            Err(RecordError::NotNewer { .. })
        ));
    }

    #[test]
    fn read_range_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let bytes = data(RANGE_BYTES_MAX as usize + 1000);
        let id = ContentId::of(&bytes);
        store.put(&id, &bytes).unwrap();
        let size = bytes.len() as u64;

        assert_eq!(store.read_range(&id, 10, 20).unwrap(), &bytes[10..30]);
        assert_eq!(
            store.read_range(&id, size - 5, 5).unwrap(),
            &bytes[bytes.len() - 5..]
        );
        assert!(store.read_range(&id, size, 0).unwrap().is_empty());
        // Over-long requests are capped, not refused.
        let capped = store.read_range(&id, 0, u64::MAX).unwrap();
        assert_eq!(capped.len() as u64, RANGE_BYTES_MAX);
        assert_eq!(capped, &bytes[..RANGE_BYTES_MAX as usize]);
        for (offset, len) in [(size - 5, 6), (size + 1, 0), (u64::MAX, 1)] {
            assert!(
                matches!(
                    store.read_range(&id, offset, len),
                    Err(ReadError::OutOfRange { .. })
                ),
                "({offset}, {len}) was not refused"
            );
        }
        let absent = ContentId::of(b"absent");
        assert!(matches!(
            store.read_range(&absent, 0, 1),
            Err(ReadError::NotFound(_))
        ));
    }

    #[test]
    fn remove_deletes_the_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let bytes = data(64);
        let id = ContentId::of(&bytes);
        store.put(&id, &bytes).unwrap();
        store.remove(&id).unwrap();
        assert!(!store.has(&id));
        assert_eq!(store.blob_count(), 0);
        assert!(blob_files(dir.path()).is_empty());
        assert!(matches!(store.remove(&id), Err(ReadError::NotFound(_))));
        assert!(matches!(store.read(&id), Err(ReadError::NotFound(_))));
    }

    #[test]
    fn corrupt_release_records_are_reported_with_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let good = signed(ReleaseKind::Module, "real", 1);
        {
            let store = ContentStore::open(dir.path()).unwrap();
            store.record_release(&good).unwrap();
        }
        {
            // Write rows that the store would never write: garbage, and a valid record
            // filed under the wrong key.
            let db = Database::create(dir.path().join("meta.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(CURRENT).unwrap();
                t.insert("module/junk", b"not a manifest".as_slice())
                    .unwrap();
                let enc = good.encode();
                t.insert("module/moved", enc.as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        let store = ContentStore::open(dir.path()).unwrap();
        match store.current_release(ReleaseKind::Module, "junk") {
            Err(ReadError::Corrupt { what, .. }) => assert!(what.contains("module/junk"), "{what}"),
            other => panic!("expected corruption, got {other:?}"),
        }
        match store.current_release(ReleaseKind::Module, "moved") {
            Err(ReadError::Corrupt { what, detail }) => {
                assert!(what.contains("module/moved"), "{what}");
                assert!(detail.contains("module/real"), "{detail}");
            }
            other => panic!("expected corruption, got {other:?}"),
        }
        assert!(matches!(
            store.current_releases(),
            Err(ReadError::Corrupt { .. })
        ));
        assert_eq!(
            store.current_release(ReleaseKind::Module, "real").unwrap(),
            Some(good)
        );
        assert!(matches!(
            store.record_release(&signed(ReleaseKind::Module, "junk", 2)),
            Err(RecordError::Corrupt { key, .. }) if key == "module/junk"
        ));
    }

    #[test]
    fn failure_reports_survive_a_reopen_and_only_the_newest_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let extra = 5;
        {
            let store = ContentStore::open(dir.path()).unwrap();
            assert!(store.failure_reports().unwrap().is_empty());
            for i in 0..FAILURE_REPORTS_KEPT_MAX + extra {
                let report = format!("report {i}");
                store
                    .record_failure_report(&format!("node{}", i % 3), report.as_bytes())
                    .unwrap();
            }
            let too_big = vec![0u8; FAILURE_REPORT_STORED_BYTES_MAX + 1];
            assert!(matches!(
                store.record_failure_report("node0", &too_big),
                Err(FailureReportRecordError::TooLarge { .. })
            ));
        }
        let store = ContentStore::open(dir.path()).unwrap();
        let kept = store.failure_reports().unwrap();
        assert_eq!(kept.len(), FAILURE_REPORTS_KEPT_MAX);
        // Oldest first, and the oldest `extra` are gone.
        for (n, (reporter, report)) in kept.iter().enumerate() {
            let i = n + extra;
            assert_eq!(reporter, &format!("node{}", i % 3));
            assert_eq!(report, format!("report {i}").as_bytes());
        }
        // Numbering goes on after the reopen: a new report is the newest.
        store.record_failure_report("late", b"last").unwrap();
        let kept = store.failure_reports().unwrap();
        assert_eq!(kept.len(), FAILURE_REPORTS_KEPT_MAX);
        assert_eq!(kept.last().unwrap().1, b"last");
        assert_eq!(kept[0].1, format!("report {}", extra + 1).as_bytes());
    }
}
