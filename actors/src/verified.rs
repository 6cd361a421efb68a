//! Verified streaming of blobs: BLAKE3 trees (bao) over 16 KiB chunk groups.
//!
//! A blob's id stays its plain BLAKE3 hash. Beside each blob the store keeps its bao
//! outboard (the tree's parent hashes, pre-order), so any run of chunk groups can be
//! sent with the proof that ties it to the id, and checked group by group on arrival.
//!
//! [`PartialBlob`] is a download in progress: a sparse data file, the outboard filled in
//! as proofs arrive, and a bitmap of the groups verified so far. It is checkpointed so a
//! download resumes after a kill -9, and it never counts as a complete blob: it lives in
//! `partial/` and becomes a blob only by a rename once every group is verified.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use bao_tree::io::outboard::{PreOrderMemOutboard, PreOrderOutboard};
use bao_tree::io::sync::{encode_ranges_validated, CreateOutboard, DecodeResponseIter};
use bao_tree::io::{BaoContentItem, Leaf};
use bao_tree::{BaoTree, BlockSize, ChunkNum, ChunkRanges};
use mesh_transport::{fsutil, wire, ContentId};
use serde::{Deserialize, Serialize};

/// Chunk groups of 2^4 BLAKE3 chunks (16 KiB): small enough that a bad group costs
/// little to fetch again, large enough that the outboard is 1/256 of the blob.
pub const GROUP_CHUNK_LOG: u8 = 4;
pub const GROUP_BYTES: u64 = 1024 << GROUP_CHUNK_LOG;
/// Chunk groups one request may ask for: 1 MiB of data per response.
pub const GROUPS_PER_REQUEST_MAX: u64 = 64;
/// An encoded response holds the groups plus their proof (parent hashes); this bounds
/// the proof for any blob the store accepts.
pub const ENCODED_BYTES_MAX: usize = (GROUPS_PER_REQUEST_MAX * GROUP_BYTES) as usize + 64 * 1024;
/// Metadata of a partial download (size and bitmap): 1 GiB blobs need 8 KiB of bitmap.
pub const PARTIAL_META_BYTES_MAX: usize = 64 * 1024;

pub fn block_size() -> BlockSize {
    BlockSize::from_chunk_log(GROUP_CHUNK_LOG)
}

/// Number of chunk groups in a blob of `size` bytes.
pub fn groups_of(size: u64) -> u64 {
    size.div_ceil(GROUP_BYTES)
}

pub fn tree_of(size: u64) -> BaoTree {
    BaoTree::new(size, block_size())
}

fn root_of(id: &ContentId) -> blake3::Hash {
    blake3::Hash::from_bytes(id.0)
}

/// Chunk ranges covering groups `start..end`.
pub fn chunk_ranges(start: u64, end: u64) -> ChunkRanges {
    let per = 1u64 << GROUP_CHUNK_LOG;
    ChunkRanges::from(ChunkNum(start * per)..ChunkNum(end * per))
}

#[derive(Debug, thiserror::Error)]
pub enum VerifiedError {
    #[error("{action}: {source}")]
    Io { action: String, source: io::Error },
    #[error("encoding groups {start}..{end} of {id}: {reason}")]
    Encode {
        id: ContentId,
        start: u64,
        end: u64,
        reason: String,
    },
    #[error("groups {start}..{end} are outside a blob of {groups} groups")]
    OutOfRange { start: u64, end: u64, groups: u64 },
    #[error("the outboard of {id} does not match its content")]
    BadOutboard { id: ContentId },
    #[error("reading partial download metadata of {id}: {reason}")]
    Meta { id: ContentId, reason: String },
}

fn io_err(action: impl Into<String>) -> impl FnOnce(io::Error) -> VerifiedError {
    let action = action.into();
    move |source| VerifiedError::Io { action, source }
}

/// Computes the pre-order outboard of the file at `path` (streaming, no whole-file
/// buffer) and checks that its root is `id`.
pub fn outboard_of_file(id: &ContentId, path: &Path, size: u64) -> Result<Vec<u8>, VerifiedError> {
    let (root, ob) = hash_file(path, size)?;
    if root != *id {
        return Err(VerifiedError::BadOutboard { id: *id });
    }
    Ok(ob)
}

/// The BLAKE3 hash of the first `size` bytes of the file at `path` and their pre-order
/// outboard, in one streaming pass.
pub fn hash_file(path: &Path, size: u64) -> Result<(ContentId, Vec<u8>), VerifiedError> {
    let file = File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
    let reader = io::BufReader::with_capacity(256 * 1024, file);
    let ob = PreOrderOutboard::<Vec<u8>>::create_sized(reader, size, block_size())
        .map_err(io_err(format!("hashing {}", path.display())))?;
    Ok((ContentId::from(ob.root), ob.data))
}

/// Encodes groups `start..end` of a complete blob file with their proof.
pub fn encode_complete(
    id: &ContentId,
    data: &File,
    size: u64,
    outboard: &File,
    start: u64,
    end: u64,
) -> Result<Vec<u8>, VerifiedError> {
    check_range(size, start, end)?;
    let ob = PreOrderOutboard {
        root: root_of(id),
        tree: tree_of(size),
        data: outboard,
    };
    encode(id, data, ob, start, end)
}

fn encode<O: bao_tree::io::sync::Outboard>(
    id: &ContentId,
    data: &File,
    ob: O,
    start: u64,
    end: u64,
) -> Result<Vec<u8>, VerifiedError> {
    let mut out = Vec::with_capacity(((end - start) * GROUP_BYTES) as usize + 4096);
    // Validated encoding re-hashes what it reads, so a blob corrupted on disk is
    // refused here instead of being sent (and blamed on us by the receiver).
    encode_ranges_validated(data, ob, &chunk_ranges(start, end), &mut out).map_err(|e| {
        VerifiedError::Encode {
            id: *id,
            start,
            end,
            reason: e.to_string(),
        }
    })?;
    Ok(out)
}

/// Whether `start..end` is a range of groups a request may ask for: inside the blob,
/// not empty, and no longer than [`GROUPS_PER_REQUEST_MAX`].
pub fn is_valid_range(size: u64, start: u64, end: u64) -> bool {
    check_range(size, start, end).is_ok()
}

fn check_range(size: u64, start: u64, end: u64) -> Result<(), VerifiedError> {
    let groups = groups_of(size);
    if start >= end || end > groups || end - start > GROUPS_PER_REQUEST_MAX {
        return Err(VerifiedError::OutOfRange { start, end, groups });
    }
    Ok(())
}

/// What a receiver learned from one encoded response.
#[derive(Debug, Default)]
pub struct Received {
    /// Groups verified and written, in order.
    pub groups: Vec<u64>,
    /// Why the rest of the response was refused, if it was: the sender lied or the data
    /// was damaged in transit. Groups before the bad one are kept.
    pub bad: Option<String>,
    /// Why the rest could not be stored here (a full disk, an IO error): our fault, not
    /// the sender's, so it must never be held against the peer.
    pub local: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct PartialMeta {
    size: u64,
    have: Vec<u64>,
}

/// A download in progress.
pub struct PartialBlob {
    id: ContentId,
    size: u64,
    groups: u64,
    data: File,
    data_path: PathBuf,
    outboard: PreOrderMemOutboard,
    have: Vec<u64>,
    have_count: u64,
    dir: PathBuf,
    dirty: bool,
}

impl std::fmt::Debug for PartialBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PartialBlob({}, {}/{} groups)",
            self.id.short(),
            self.have_count,
            self.groups
        )
    }
}

impl PartialBlob {
    fn paths(dir: &Path, id: &ContentId) -> (PathBuf, PathBuf, PathBuf) {
        (
            dir.join(format!("{id}.data")),
            dir.join(format!("{id}.obao")),
            dir.join(format!("{id}.meta")),
        )
    }

    /// Turns a complete blob file that failed verification into a download to resume:
    /// a copy of its data, its outboard (computed when the blob was whole), and a
    /// checkpoint claiming every group. [`PartialBlob::open`] re-verifies each claimed
    /// group against the outboard, so only the damaged groups are fetched again.
    pub fn salvage(
        dir: &Path,
        id: ContentId,
        size: u64,
        damaged: &Path,
        outboard: &[u8],
    ) -> Result<(), VerifiedError> {
        let (data_path, ob_path, meta_path) = Self::paths(dir, &id);
        if outboard.len() as u64 != tree_of(size).outboard_size() {
            return Err(VerifiedError::Meta {
                id,
                reason: "the outboard does not fit the blob's size".into(),
            });
        }
        let groups = groups_of(size);
        let mut have = vec![u64::MAX; groups.div_ceil(64) as usize];
        if groups % 64 != 0 {
            if let Some(last) = have.last_mut() {
                *last = (1u64 << (groups % 64)) - 1;
            }
        }
        let meta = wire::encode(&PartialMeta { size, have }).map_err(|e| VerifiedError::Meta {
            id,
            reason: e.to_string(),
        })?;
        // Data first, then the outboard, then the claim, as a checkpoint is written.
        fs::copy(damaged, &data_path)
            .map_err(io_err(format!("copying {} for salvage", damaged.display())))?;
        fsutil::write_atomic(&ob_path, outboard, 0o644)
            .map_err(io_err(format!("writing {}", ob_path.display())))?;
        fsutil::write_atomic(&meta_path, &meta, 0o644)
            .map_err(io_err(format!("writing {}", meta_path.display())))?;
        Ok(())
    }

    /// Opens the partial download of `id` in `dir`, resuming what a checkpoint recorded
    /// (after re-verifying it against the outboard), or starting empty.
    pub fn open(dir: &Path, id: ContentId, size: u64) -> Result<PartialBlob, VerifiedError> {
        let (data_path, ob_path, meta_path) = Self::paths(dir, &id);
        let tree = tree_of(size);
        let groups = groups_of(size);
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&data_path)
            .map_err(io_err(format!("opening {}", data_path.display())))?;
        let words = groups.div_ceil(64) as usize;
        let mut blob = PartialBlob {
            id,
            size,
            groups,
            data,
            data_path,
            outboard: PreOrderMemOutboard {
                root: root_of(&id),
                tree,
                data: vec![0u8; tree.outboard_size() as usize],
            },
            have: vec![0; words],
            have_count: 0,
            dir: dir.to_path_buf(),
            dirty: false,
        };
        if let Some(claimed) = Self::read_meta(&meta_path, &id, size, words)? {
            if let Ok(ob) = fs::read(&ob_path) {
                if ob.len() == blob.outboard.data.len() {
                    blob.outboard.data = ob;
                    blob.revalidate(&claimed)?;
                }
            }
        }
        Ok(blob)
    }

    fn read_meta(
        path: &Path,
        id: &ContentId,
        size: u64,
        words: usize,
    ) -> Result<Option<Vec<u64>>, VerifiedError> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
        };
        let meta: PartialMeta = match wire::decode(&bytes, PARTIAL_META_BYTES_MAX) {
            Ok(m) => m,
            Err(e) => {
                // A damaged checkpoint only costs the download so far.
                tracing::warn!(id = %id.short(), "ignoring a damaged partial checkpoint: {e}");
                return Ok(None);
            }
        };
        if meta.size != size || meta.have.len() != words {
            return Err(VerifiedError::Meta {
                id: *id,
                reason: format!(
                    "checkpoint is for {} bytes, the release says {size}",
                    meta.size
                ),
            });
        }
        Ok(Some(meta.have))
    }

    /// Keeps only the claimed groups whose data still hashes to the tree: a checkpoint
    /// is written after its data is synced, but the disk may have lost or damaged it.
    fn revalidate(&mut self, claimed: &[u64]) -> Result<(), VerifiedError> {
        for g in 0..self.groups {
            if claimed[(g / 64) as usize] & (1 << (g % 64)) == 0 {
                continue;
            }
            // Validated encoding re-hashes the group's data against the outboard.
            if encode(&self.id, &self.data, &self.outboard, g, g + 1).is_ok() {
                self.mark(g);
            }
        }
        Ok(())
    }

    fn mark(&mut self, g: u64) {
        let (w, b) = ((g / 64) as usize, g % 64);
        if self.have[w] & (1 << b) == 0 {
            self.have[w] |= 1 << b;
            self.have_count += 1;
        }
    }

    pub fn has_group(&self, g: u64) -> bool {
        g < self.groups && self.have[(g / 64) as usize] & (1 << (g % 64)) != 0
    }

    pub fn id(&self) -> ContentId {
        self.id
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn groups(&self) -> u64 {
        self.groups
    }

    pub fn have_groups(&self) -> u64 {
        self.have_count
    }

    /// Bytes verified so far.
    pub fn have_bytes(&self) -> u64 {
        let mut bytes = self.have_count * GROUP_BYTES;
        if self.groups > 0 && self.has_group(self.groups - 1) {
            bytes -= self.groups * GROUP_BYTES - self.size;
        }
        bytes
    }

    pub fn is_complete(&self) -> bool {
        self.have_count == self.groups
    }

    /// The groups held, as runs `start..end`.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        runs(self.groups, |g| self.has_group(g))
    }

    /// Verifies an encoded response for groups `start..end` and writes every group that
    /// verifies. Nothing that fails verification is written.
    pub fn receive(&mut self, start: u64, end: u64, encoded: &[u8]) -> Received {
        let mut out = Received::default();
        if let Err(e) = check_range(self.size, start, end) {
            out.bad = Some(e.to_string());
            return out;
        }
        let ranges = chunk_ranges(start, end);
        let iter =
            DecodeResponseIter::new(self.outboard.root, self.outboard.tree, encoded, &ranges);
        for item in iter {
            match item {
                Ok(BaoContentItem::Parent(p)) => {
                    if let Err(e) =
                        bao_tree::io::sync::OutboardMut::save(&mut self.outboard, p.node, &p.pair)
                    {
                        out.local = Some(format!("saving a proof: {e}"));
                        return out;
                    }
                }
                Ok(BaoContentItem::Leaf(Leaf { offset, data })) => {
                    if offset % GROUP_BYTES != 0 {
                        out.bad = Some(format!("leaf at offset {offset} is not group-aligned"));
                        return out;
                    }
                    let g = offset / GROUP_BYTES;
                    if let Err(e) = self.data.write_all_at(&data, offset) {
                        out.local = Some(format!("writing group {g}: {e}"));
                        return out;
                    }
                    self.mark(g);
                    self.dirty = true;
                    out.groups.push(g);
                }
                Err(e) => {
                    out.bad = Some(e.to_string());
                    return out;
                }
            }
        }
        if out.groups.len() as u64 != end - start && out.bad.is_none() && out.local.is_none() {
            out.bad = Some(format!(
                "response ended after {} of {} groups",
                out.groups.len(),
                end - start
            ));
        }
        out
    }

    /// Encodes groups this partial download already holds, so peers fetch from us
    /// before we have the whole blob.
    pub fn encode(&self, start: u64, end: u64) -> Result<Vec<u8>, VerifiedError> {
        check_range(self.size, start, end)?;
        if !(start..end).all(|g| self.has_group(g)) {
            return Err(VerifiedError::OutOfRange {
                start,
                end,
                groups: self.groups,
            });
        }
        encode(&self.id, &self.data, &self.outboard, start, end)
    }

    /// Makes what was received durable: data first, then the outboard, then the bitmap,
    /// each atomically, so a checkpoint never claims a group whose data is not on disk.
    pub fn checkpoint(&mut self) -> Result<(), VerifiedError> {
        match self.begin_checkpoint()? {
            // Failed, the groups it covered are still to be made durable next time.
            Some(c) => c.write().inspect_err(|_| self.mark_dirty()),
            None => Ok(()),
        }
    }

    /// Takes what a checkpoint must write, cheaply, so the slow part (syncing the data
    /// file, which may hold a second's worth of received groups) runs in
    /// [`Checkpoint::write`] without holding the download's lock. Groups received after
    /// this call are left for the next checkpoint. `None` when nothing changed.
    pub fn begin_checkpoint(&mut self) -> Result<Option<Checkpoint>, VerifiedError> {
        if !self.dirty {
            return Ok(None);
        }
        let (_, outboard_path, meta_path) = Self::paths(&self.dir, &self.id);
        let data = self
            .data
            .try_clone()
            .map_err(io_err(format!("opening {}", self.data_path.display())))?;
        let meta = PartialMeta {
            size: self.size,
            have: self.have.clone(),
        };
        let meta = wire::encode(&meta).map_err(|e| VerifiedError::Meta {
            id: self.id,
            reason: e.to_string(),
        })?;
        self.dirty = false;
        Ok(Some(Checkpoint {
            data,
            data_path: self.data_path.clone(),
            outboard: self.outboard.data.clone(),
            outboard_path,
            meta,
            meta_path,
        }))
    }

    /// Marks the download as changed since its last checkpoint, so a checkpoint that
    /// failed to write is tried again.
    pub fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    /// Hands over the complete download: syncs the data and returns the data file's
    /// path and the outboard, for the store to rename into place. The checkpoint files
    /// are removed by [`PartialBlob::remove`] once the store has adopted the blob.
    pub fn finish(&mut self) -> Result<(PathBuf, Vec<u8>), VerifiedError> {
        self.data
            .sync_all()
            .map_err(io_err(format!("syncing {}", self.data_path.display())))?;
        Ok((self.data_path.clone(), self.outboard.data.clone()))
    }

    /// Removes every file of a partial download (abandoned, or adopted by the store).
    pub fn remove(dir: &Path, id: &ContentId) {
        let (a, b, c) = Self::paths(dir, id);
        for p in [c, b, a] {
            if let Err(e) = fs::remove_file(&p) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %p.display(), "removing a partial download: {e}");
                }
            }
        }
    }
}

/// A snapshot of a partial download's state, taken by [`PartialBlob::begin_checkpoint`].
/// Every group it claims was written before the snapshot, so syncing the data file
/// afterwards makes all of them durable before the bitmap that claims them is written.
pub struct Checkpoint {
    data: File,
    data_path: PathBuf,
    outboard: Vec<u8>,
    outboard_path: PathBuf,
    meta: Vec<u8>,
    meta_path: PathBuf,
}

impl Checkpoint {
    /// Writes the snapshot: data first, then the outboard, then the bitmap.
    pub fn write(self) -> Result<(), VerifiedError> {
        self.data
            .sync_data()
            .map_err(io_err(format!("syncing {}", self.data_path.display())))?;
        fsutil::write_atomic(&self.outboard_path, &self.outboard, 0o644)
            .map_err(io_err(format!("writing {}", self.outboard_path.display())))?;
        fsutil::write_atomic(&self.meta_path, &self.meta, 0o644)
            .map_err(io_err(format!("writing {}", self.meta_path.display())))?;
        Ok(())
    }
}

/// Runs of consecutive groups for which `has` holds.
pub fn runs(groups: u64, has: impl Fn(u64) -> bool) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut start = None;
    for g in 0..groups {
        match (has(g), start) {
            (true, None) => start = Some(g),
            (false, Some(s)) => {
                out.push((s, g));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push((s, groups));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    fn complete(dir: &Path, bytes: &[u8]) -> (ContentId, File, File) {
        let id = ContentId::of(bytes);
        let path = dir.join("blob");
        fs::write(&path, bytes).unwrap();
        let ob = outboard_of_file(&id, &path, bytes.len() as u64).unwrap();
        let ob_path = dir.join("blob.obao");
        fs::write(&ob_path, ob).unwrap();
        (id, File::open(path).unwrap(), File::open(ob_path).unwrap())
    }

    #[test]
    fn groups_stream_verified_from_complete_to_partial_and_on() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = blob(1_000_000);
        let size = bytes.len() as u64;
        let (id, data, ob) = complete(dir.path(), &bytes);
        let groups = groups_of(size);
        assert_eq!(groups, 62);

        let pdir = dir.path().join("p");
        fs::create_dir(&pdir).unwrap();
        let mut p = PartialBlob::open(&pdir, id, size).unwrap();
        // Out of order: the tail first, then the head.
        let tail = encode_complete(&id, &data, size, &ob, 40, groups).unwrap();
        let r = p.receive(40, groups, &tail);
        assert!(r.bad.is_none(), "{:?}", r.bad);
        assert_eq!(r.groups.len() as u64, groups - 40);
        assert_eq!(p.ranges(), vec![(40, groups)]);

        // A partial download serves what it holds to the next node.
        let relayed = p.encode(40, 50).unwrap();
        let qdir = dir.path().join("q");
        fs::create_dir(&qdir).unwrap();
        let mut q = PartialBlob::open(&qdir, id, size).unwrap();
        assert_eq!(q.receive(40, 50, &relayed).groups.len(), 10);
        assert!(p.encode(0, 10).is_err(), "served groups it does not hold");

        let head = encode_complete(&id, &data, size, &ob, 0, 40).unwrap();
        assert_eq!(p.receive(0, 40, &head).groups.len(), 40);
        assert!(p.is_complete());
        assert_eq!(p.have_bytes(), size);
        let (path, outboard) = p.finish().unwrap();
        assert_eq!(fs::read(path).unwrap(), bytes);
        assert_eq!(outboard, fs::read(dir.path().join("blob.obao")).unwrap());
    }

    #[test]
    fn a_corrupted_group_is_never_written_and_earlier_ones_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = blob(300_000);
        let size = bytes.len() as u64;
        let (id, data, ob) = complete(dir.path(), &bytes);
        let mut encoded = encode_complete(&id, &data, size, &ob, 0, 10).unwrap();
        // Flip a byte near the end: inside the data of a late group.
        let n = encoded.len();
        encoded[n - 100] ^= 0xff;
        let pdir = dir.path().join("p");
        fs::create_dir(&pdir).unwrap();
        let mut p = PartialBlob::open(&pdir, id, size).unwrap();
        let r = p.receive(0, 10, &encoded);
        assert!(r.bad.is_some());
        assert_eq!(r.groups, (0..9).collect::<Vec<_>>());
        assert!(!p.has_group(9));
        // The bad group's bytes were never written to the data file.
        let on_disk = fs::read(pdir.join(format!("{id}.data"))).unwrap();
        assert!(on_disk.len() as u64 <= 9 * GROUP_BYTES);
        // Garbage from a liar is refused outright.
        let r = p.receive(10, 12, b"nonsense");
        assert!(r.bad.is_some() && r.groups.is_empty());
    }

    /// A complete blob of `n` bytes (to encode from) and an empty directory `p` beside
    /// it for the partial download.
    fn partial_fixture(n: usize) -> (tempfile::TempDir, ContentId, u64, File, File) {
        let dir = tempfile::tempdir().unwrap();
        let bytes = blob(n);
        let (id, data, ob) = complete(dir.path(), &bytes);
        fs::create_dir(dir.path().join("p")).unwrap();
        (dir, id, n as u64, data, ob)
    }

    #[test]
    fn checkpoint_resumes_and_revalidates() {
        let (dir, id, size, data, ob) = partial_fixture(500_000);
        let pdir = dir.path().join("p");
        {
            let mut p = PartialBlob::open(&pdir, id, size).unwrap();
            let e = encode_complete(&id, &data, size, &ob, 0, 20).unwrap();
            assert_eq!(p.receive(0, 20, &e).groups.len(), 20);
            p.checkpoint().unwrap();
            // Received after the checkpoint and never checkpointed: lost on a crash.
            let e = encode_complete(&id, &data, size, &ob, 20, 25).unwrap();
            p.receive(20, 25, &e);
        }
        let p = PartialBlob::open(&pdir, id, size).unwrap();
        assert_eq!(p.ranges(), vec![(0, 20)]);

        // Damage a checkpointed group on disk: resume drops it rather than trusting it.
        let f = OpenOptions::new()
            .write(true)
            .open(pdir.join(format!("{id}.data")))
            .unwrap();
        f.write_all_at(b"XXXX", 5 * GROUP_BYTES + 7).unwrap();
        drop(f);
        let p = PartialBlob::open(&pdir, id, size).unwrap();
        assert!(!p.has_group(5));
        assert!(p.has_group(4) && p.has_group(6));
        PartialBlob::remove(&pdir, &id);
        assert_eq!(fs::read_dir(&pdir).unwrap().count(), 0);
    }

    #[test]
    fn a_checkpoint_written_later_claims_only_its_snapshot() {
        let (dir, id, size, data, ob) = partial_fixture(500_000);
        let pdir = dir.path().join("p");
        {
            let mut p = PartialBlob::open(&pdir, id, size).unwrap();
            let e = encode_complete(&id, &data, size, &ob, 0, 10).unwrap();
            assert_eq!(p.receive(0, 10, &e).groups.len(), 10);
            let snapshot = p.begin_checkpoint().unwrap().expect("something to write");
            assert!(p.begin_checkpoint().unwrap().is_none(), "nothing new yet");
            // Received while the snapshot is being written: left for the next one.
            let e = encode_complete(&id, &data, size, &ob, 10, 15).unwrap();
            p.receive(10, 15, &e);
            snapshot.write().unwrap();
        }
        let mut p = PartialBlob::open(&pdir, id, size).unwrap();
        assert_eq!(p.ranges(), vec![(0, 10)]);
        let e = encode_complete(&id, &data, size, &ob, 10, 15).unwrap();
        p.receive(10, 15, &e);
        p.checkpoint().unwrap();
        let p = PartialBlob::open(&pdir, id, size).unwrap();
        assert_eq!(p.ranges(), vec![(0, 15)]);
    }

    #[test]
    fn tiny_and_exact_sizes() {
        for n in [1usize, 1023, 1024, 16 * 1024, 16 * 1024 + 1] {
            let dir = tempfile::tempdir().unwrap();
            let bytes = blob(n);
            let size = n as u64;
            let (id, data, ob) = complete(dir.path(), &bytes);
            let pdir = dir.path().join("p");
            fs::create_dir(&pdir).unwrap();
            let mut p = PartialBlob::open(&pdir, id, size).unwrap();
            let g = groups_of(size);
            let e = encode_complete(&id, &data, size, &ob, 0, g).unwrap();
            let r = p.receive(0, g, &e);
            assert!(r.bad.is_none(), "size {n}: {:?}", r.bad);
            assert!(p.is_complete());
            assert_eq!(p.have_bytes(), size);
            let (path, _) = p.finish().unwrap();
            assert_eq!(fs::read(path).unwrap(), bytes, "size {n}");
        }
    }

    #[test]
    fn runs_of_groups() {
        let have = [true, true, false, true, false, false, true];
        assert_eq!(runs(7, |g| have[g as usize]), vec![(0, 2), (3, 4), (6, 7)]);
        assert!(runs(0, |_| true).is_empty());
    }
}
