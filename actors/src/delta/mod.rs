//! Binary deltas between two images (firmware, agent binaries, modules): create a patch
//! from an old and a new image, and apply it to the old image to get the new one back.
//!
//! A patch is a [`PatchHeader`] (magic, format version, codec, BLAKE3 and size of both
//! the base and the target) followed by a codec-specific body. Applying checks the base
//! before it writes anything and the result's size and BLAKE3 at the end, so a patch can
//! never be applied to the wrong base and a wrong result is never reported as success.
//!
//! Codecs (a release can carry whichever is smallest for its pair; [`create_best`] picks):
//!
//! - [`Codec::Zstd`]: zstd with the old image as a reference prefix (what `zstd
//!   --patch-from` does), with long-distance matching and a window covering both images.
//! - [`Codec::Bsdiff`]: bsdiff's matches (the `qbsdiff` crate), laid out in blocks of
//!   controls, diff bytes and extra bytes, each section compressed with whichever of
//!   zstd and bzip2 (and for diff bytes, which sparse layout) is smallest (see
//!   `sections.rs`). It applies front to back with memory that does not grow with the
//!   images, and on executables it is the smaller of the two (about 7% smaller than
//!   Debian's `bsdiff`, see docs/performance.md).
//!
//! # Apply memory
//!
//! Applying reads the patch from a reader and writes the result to a writer as it goes;
//! it never holds the patch or the result. What it holds, besides the old image:
//!
//! - [`Codec::Bsdiff`]: one block: [`BLOCK_CONTROLS_MAX`] controls (384 KiB decoded, 480
//!   KiB encoded), [`BLOCK_DIFF_BYTES_MAX`] (1 MiB) of diff bytes plus up to twice that
//!   in sparse form, [`BLOCK_EXTRA_BYTES_MAX`] (1 MiB) of extra bytes; one section
//!   decoder at a time (bzip2's fixed 3.6 MB, or zstd's context and a history of at most
//!   `2^SECTION_WINDOW_LOG`, 2 MiB); and 128 KiB of buffers. Under 9 MiB whatever the
//!   image size (7.5 MB measured on an 11.7 MB image). The old image is only read by
//!   position: [`apply_file`] reads it from its file in 64 KiB pieces and keeps none of
//!   it in memory ([`apply`] uses the caller's slice).
//! - [`Codec::Zstd`]: the whole old image in memory (zstd refers into it; [`apply_file`]
//!   reads it in), plus zstd history of `min(target size, 2^window_log)` where
//!   `window_log` is the smallest power of two covering old plus target size (at most
//!   2^31), plus about 300 KiB. That is about old + target size: the price of this codec.
//!
//! Every length read from a patch is checked against a named limit before anything is
//! allocated for it, the zstd decoder is told the largest window it may use, and the
//! result may not grow past the size in the header.

mod frame;
mod header;
mod sections;

pub use header::{PatchHeader, FORMAT_VERSION, HEADER_BYTES, MAGIC};
pub use sections::{
    BLOCK_CONTROLS_MAX, BLOCK_DIFF_BYTES_MAX, BLOCK_EXTRA_BYTES_MAX, SECTION_WINDOW_LOG,
};

use frame::{FrameReader, FrameTuning, Sink};
use mesh_transport::ContentId;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::Path;

/// Largest old or new image a patch may describe: bsdiff's suffix array indexes with
/// 32-bit signed positions and zstd's largest window is 2^31, so 1 GiB keeps both with
/// room to spare (and is far beyond any firmware we target).
pub const IMAGE_BYTES_MAX: u64 = 1 << 30;
/// Largest zstd window log (zstd's own maximum on 64-bit builds).
const ZSTD_WINDOW_LOG_MAX: u32 = 31;
/// Smallest zstd window log (zstd's own minimum).
const ZSTD_WINDOW_LOG_MIN: u32 = 10;
/// zstd level for the reference-prefix codec: the strongest regular level.
const ZSTD_LEVEL: i32 = 19;
/// Bytes hashed at a time when checking an old image read from a file.
const HASH_BUFFER_BYTES: usize = 64 * 1024;

/// How a patch body is encoded. The id is what the header stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// zstd with the old image as reference prefix (`zstd --patch-from`).
    Zstd,
    /// bsdiff matches in a streamable block layout, compressed with zstd.
    Bsdiff,
}

impl Codec {
    /// Every codec, in the order [`create_best`] tries them.
    pub const ALL: [Codec; 2] = [Codec::Zstd, Codec::Bsdiff];

    pub fn id(self) -> u8 {
        match self {
            Codec::Zstd => 1,
            Codec::Bsdiff => 2,
        }
    }

    pub fn from_id(id: u8) -> Option<Codec> {
        Codec::ALL.into_iter().find(|c| c.id() == id)
    }

    pub fn name(self) -> &'static str {
        match self {
            Codec::Zstd => "zstd",
            Codec::Bsdiff => "bsdiff",
        }
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Codec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Codec::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| format!("unknown codec {s:?} (known: zstd, bsdiff)"))
    }
}

/// Why a patch header was refused.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("reading patch header: only {0} bytes, the header takes {HEADER_BYTES}")]
    Truncated(usize),
    #[error("reading patch header: bad magic, not a mesh delta")]
    BadMagic,
    #[error("reading patch header: format version {0} is not supported (this build reads {FORMAT_VERSION})")]
    Version(u8),
    #[error("reading patch header: unknown codec id {0}")]
    UnknownCodec(u8),
    #[error("reading patch header: reserved bytes are not zero")]
    Reserved,
    #[error(
        "reading patch header: {what} size of {bytes} bytes is over the limit of {IMAGE_BYTES_MAX}"
    )]
    TooLarge { what: &'static str, bytes: u64 },
}

/// Why a patch could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error(
        "creating patch: the {what} image has {bytes} bytes, over the limit of {IMAGE_BYTES_MAX}"
    )]
    TooLarge { what: &'static str, bytes: u64 },
    #[error("creating patch: finding bsdiff matches: {0}")]
    Bsdiff(std::io::Error),
    #[error("creating patch: {what}: {message}")]
    Compress { what: &'static str, message: String },
    #[error("creating patch: a worker thread panicked")]
    Worker,
}

/// Why a patch could not be applied. After any of these, whatever was written to the
/// output is garbage and must be discarded.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("applying patch: {0}")]
    Header(#[from] HeaderError),
    #[error("applying patch: the patch produces {header}, not the expected {expected}")]
    WrongTarget {
        header: ContentId,
        expected: ContentId,
    },
    #[error("applying patch: the old image is {actual} ({actual_bytes} bytes), the patch needs {expected} ({expected_bytes} bytes)")]
    WrongBase {
        actual: ContentId,
        actual_bytes: u64,
        expected: ContentId,
        expected_bytes: u64,
    },
    #[error("applying patch: reading the patch: {0}")]
    ReadPatch(std::io::Error),
    #[error("applying patch: reading the old image: {0}")]
    ReadOld(std::io::Error),
    #[error("applying patch: writing the result: {0}")]
    Write(std::io::Error),
    #[error("applying patch: the patch ends inside its compressed body")]
    Truncated,
    #[error("applying patch: decompressing the body: {0}")]
    Decompress(String),
    #[error("applying patch: corrupt body: {0}")]
    Corrupt(&'static str),
    #[error("applying patch: the result grows past the {expected_bytes} bytes the header gives")]
    TooLong { expected_bytes: u64 },
    #[error(
        "applying patch: the result has {actual_bytes} bytes, the header gives {expected_bytes}"
    )]
    WrongSize {
        actual_bytes: u64,
        expected_bytes: u64,
    },
    #[error("applying patch: the result hashes to {actual}, expected {expected}")]
    WrongHash {
        actual: ContentId,
        expected: ContentId,
    },
}

/// What an apply did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApplyStats {
    pub codec: Codec,
    /// Bytes of patch read, header included.
    pub patch_bytes: u64,
    /// Bytes of result written (equal to the header's target size).
    pub target_bytes: u64,
}

/// The header of a patch, checked (magic, version, codec, sizes within limits).
pub fn read_header(patch: &[u8]) -> Result<PatchHeader, HeaderError> {
    PatchHeader::parse(patch)
}

/// The zstd window log that covers `bytes` (old plus new), within zstd's limits. The
/// encoder and the decoder's limit both derive it from the header's sizes.
fn zstd_window_log(bytes: u64) -> u32 {
    let bits = 64 - bytes.saturating_sub(1).leading_zeros();
    bits.clamp(ZSTD_WINDOW_LOG_MIN, ZSTD_WINDOW_LOG_MAX)
}

fn zstd_tuning(old_bytes: u64, new_bytes: u64) -> FrameTuning {
    FrameTuning {
        level: ZSTD_LEVEL,
        window_log: zstd_window_log(old_bytes + new_bytes),
        long_distance: true,
        target_length: 0,
    }
}

/// A patch that turns `old` into `new`, with the given codec.
pub fn create(codec: Codec, old: &[u8], new: &[u8]) -> Result<Vec<u8>, CreateError> {
    for (what, image) in [("old", old), ("new", new)] {
        if image.len() as u64 > IMAGE_BYTES_MAX {
            return Err(CreateError::TooLarge {
                what,
                bytes: image.len() as u64,
            });
        }
    }
    let header = PatchHeader {
        codec,
        base: ContentId::of(old),
        base_bytes: old.len() as u64,
        target: ContentId::of(new),
        target_bytes: new.len() as u64,
    };
    let mut patch = header.to_bytes().to_vec();
    match codec {
        Codec::Zstd => frame::compress(
            new,
            Some(old),
            zstd_tuning(old.len() as u64, new.len() as u64),
            &mut patch,
        )?,
        Codec::Bsdiff => sections::create_body(old, new, &mut patch)?,
    }
    Ok(patch)
}

/// Creates a patch with every codec (in parallel) and keeps the smallest.
pub fn create_best(old: &[u8], new: &[u8]) -> Result<(Codec, Vec<u8>), CreateError> {
    let results: Vec<Result<Vec<u8>, CreateError>> = std::thread::scope(|s| {
        let handles: Vec<_> = Codec::ALL
            .into_iter()
            .map(|codec| s.spawn(move || create(codec, old, new)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Err(CreateError::Worker)))
            .collect()
    });
    let mut best: Option<(Codec, Vec<u8>)> = None;
    for (codec, result) in Codec::ALL.into_iter().zip(results) {
        let patch = result?;
        if best.as_ref().is_none_or(|(_, b)| patch.len() < b.len()) {
            best = Some((codec, patch));
        }
    }
    best.ok_or(CreateError::Worker)
}

/// Applies `patch` to the old image `old`, writing the result to `out` as it goes, and
/// checks that the result is `expected` (the target hash from the manifest, which the
/// patch header must also name). Memory: see the module documentation.
pub fn apply<R: Read, W: Write>(
    old: &[u8],
    patch: R,
    out: W,
    expected: ContentId,
) -> Result<ApplyStats, ApplyError> {
    apply_from(Old::Bytes(old), patch, out, expected)
}

/// Like [`apply`], with the old image read from a file: a [`Codec::Bsdiff`] patch reads it
/// piece by piece, a [`Codec::Zstd`] patch reads it into memory.
pub fn apply_file<R: Read, W: Write>(
    old: &Path,
    patch: R,
    out: W,
    expected: ContentId,
) -> Result<ApplyStats, ApplyError> {
    let file = std::fs::File::open(old).map_err(ApplyError::ReadOld)?;
    apply_from(Old::File(file), patch, out, expected)
}

enum Old<'a> {
    Bytes(&'a [u8]),
    File(std::fs::File),
}

fn read_patch_header<R: Read>(patch: &mut R) -> Result<PatchHeader, ApplyError> {
    let mut bytes = [0u8; HEADER_BYTES];
    let mut got = 0;
    while got < HEADER_BYTES {
        match patch.read(&mut bytes[got..]) {
            Ok(0) => return Err(HeaderError::Truncated(got).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ApplyError::ReadPatch(e)),
        }
    }
    Ok(PatchHeader::parse(&bytes)?)
}

fn check_base(
    header: &PatchHeader,
    actual: ContentId,
    actual_bytes: u64,
) -> Result<(), ApplyError> {
    if actual != header.base || actual_bytes != header.base_bytes {
        return Err(ApplyError::WrongBase {
            actual,
            actual_bytes,
            expected: header.base,
            expected_bytes: header.base_bytes,
        });
    }
    Ok(())
}

/// Hashes a file from the start, in pieces, and rewinds it.
fn hash_file(file: &mut std::fs::File) -> std::io::Result<(ContentId, u64)> {
    use std::io::Seek;
    file.seek(std::io::SeekFrom::Start(0))?;
    let hashed = hash_reader(&mut *file)?;
    file.seek(std::io::SeekFrom::Start(0))?;
    Ok(hashed)
}

/// BLAKE3 and length of everything a reader yields, read in pieces (shared with the
/// firmware slots, which hash whole slot images the same way).
pub(crate) fn hash_reader(mut r: impl Read) -> std::io::Result<(ContentId, u64)> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; HASH_BUFFER_BYTES];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hasher.finalize().into(), total))
}

fn apply_from<R: Read, W: Write>(
    old: Old<'_>,
    mut patch: R,
    out: W,
    expected: ContentId,
) -> Result<ApplyStats, ApplyError> {
    let header = read_patch_header(&mut patch)?;
    if header.target != expected {
        return Err(ApplyError::WrongTarget {
            header: header.target,
            expected,
        });
    }
    let mut sink = Sink::new(out, header.target_bytes);
    let body_bytes = match (header.codec, old) {
        (Codec::Bsdiff, Old::Bytes(old)) => {
            check_base(&header, ContentId::of(old), old.len() as u64)?;
            sections::apply_body(old, patch, &mut sink)?
        }
        (Codec::Bsdiff, Old::File(mut file)) => {
            let (id, len) = hash_file(&mut file).map_err(ApplyError::ReadOld)?;
            check_base(&header, id, len)?;
            sections::apply_body(sections::FileImage::new(file, len), patch, &mut sink)?
        }
        (Codec::Zstd, Old::Bytes(old)) => {
            check_base(&header, ContentId::of(old), old.len() as u64)?;
            apply_zstd_body(&header, old, patch, &mut sink)?
        }
        (Codec::Zstd, Old::File(mut file)) => {
            let (id, len) = hash_file(&mut file).map_err(ApplyError::ReadOld)?;
            check_base(&header, id, len)?;
            // The size was just checked against the header, whose sizes are capped, so
            // this allocation is bounded.
            let mut bytes = Vec::with_capacity(len as usize);
            file.take(len)
                .read_to_end(&mut bytes)
                .map_err(ApplyError::ReadOld)?;
            apply_zstd_body(&header, &bytes, patch, &mut sink)?
        }
    };
    let target_bytes = sink.finish(&expected)?;
    Ok(ApplyStats {
        codec: header.codec,
        patch_bytes: HEADER_BYTES as u64 + body_bytes,
        target_bytes,
    })
}

fn apply_zstd_body<R: Read, W: Write>(
    header: &PatchHeader,
    old: &[u8],
    body: R,
    sink: &mut Sink<W>,
) -> Result<u64, ApplyError> {
    let window_log = zstd_tuning(header.base_bytes, header.target_bytes).window_log;
    let mut stream = FrameReader::new(body, window_log, Some(old))?;
    let mut buf = vec![0u8; sections::COPY_BUFFER_BYTES];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        sink.put(&buf[..n])?;
    }
    stream.finish()
}

/// Bytes of the fixed old image the fuzz body applies patches to.
const FUZZ_OLD_BYTES: usize = 4096;
/// Largest target size a fuzz input may declare, so that one input costs little time.
const FUZZ_TARGET_BYTES_MAX: u64 = 1 << 16;

/// The old image every fuzz input is applied to: fixed pseudo-random bytes, so that
/// seeds made from it (see the mutation test) stay valid across runs.
#[doc(hidden)]
pub fn fuzz_old() -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..FUZZ_OLD_BYTES)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// The body of the fuzz target (`actors/fuzz`, `cargo fuzz run apply`), shared with the
/// mutation test so that both exercise the same thing. The first byte picks what the
/// rest is:
///
/// - even: a whole patch, applied to [`fuzz_old`] and checked against the target its
///   own header names (so that a well-formed header lets the body be reached);
/// - `1 mod 4`: a [`Codec::Bsdiff`] body with plain sections, compressed here (see
///   `sections::fuzz_pack`) behind a valid header (two bytes give the target size), so
///   that the fuzzer chooses what the block parser sees, which random compressed bytes
///   would almost never reach;
/// - `3 mod 4`: a [`Codec::Zstd`] body behind a valid header.
///
/// Whatever the input, applying must return (never panic), must never write past the
/// header's target size, and may succeed only with exactly the target.
#[doc(hidden)]
pub fn fuzz_apply(data: &[u8]) {
    let old = fuzz_old();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (patch, expected) = if mode % 2 == 0 {
        let expected = match PatchHeader::parse(rest) {
            // A large declared target is legitimate but makes a slow input; the header
            // checks still run on everything else.
            Ok(h) if h.target_bytes > FUZZ_TARGET_BYTES_MAX => return,
            Ok(h) => h.target,
            Err(_) => ContentId([0; 32]),
        };
        (rest.to_vec(), expected)
    } else {
        let Some((size, body)) = rest.split_first_chunk::<2>() else {
            return;
        };
        let target_bytes = u64::from(u16::from_le_bytes(*size)).min(FUZZ_TARGET_BYTES_MAX);
        let codec = if mode % 4 == 1 {
            Codec::Bsdiff
        } else {
            Codec::Zstd
        };
        let header = PatchHeader {
            codec,
            base: ContentId::of(&old),
            base_bytes: old.len() as u64,
            target: ContentId::of(body),
            target_bytes,
        };
        let mut patch = header.to_bytes().to_vec();
        if codec == Codec::Bsdiff {
            patch.extend_from_slice(&sections::fuzz_pack(body));
        } else {
            patch.extend_from_slice(body);
        }
        (patch, header.target)
    };
    let declared = PatchHeader::parse(&patch).map(|h| h.target_bytes).ok();
    let mut out = HashingCounter::default();
    let result = apply(&old, &patch[..], &mut out, expected);
    if let Some(declared) = declared {
        assert!(out.bytes <= declared, "wrote past the declared size");
    }
    if result.is_ok() {
        assert_eq!(
            ContentId::from(out.hasher.finalize()),
            expected,
            "accepted a wrong result"
        );
    }
}

/// A writer that keeps only the hash and length of what it is given.
#[derive(Default)]
struct HashingCounter {
    hasher: blake3::Hasher,
    bytes: u64,
}

impl Write for HashingCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.hasher.update(buf);
        self.bytes += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
