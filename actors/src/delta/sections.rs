//! The bsdiff-class codec: bsdiff's matches (found by the `qbsdiff` crate), re-laid into
//! blocks that apply front to back, each section compressed with whichever of zstd and
//! bzip2 does better on it.
//!
//! bsdiff 4 describes the new image as a list of controls `(add, copy, seek)`: take `add`
//! bytes of the old image at the current position and add a diff byte to each (most diff
//! bytes are zero, because the old and new code around a change differ only in shifted
//! addresses), then copy `copy` extra bytes verbatim, then move the old position by
//! `seek`. Its file format keeps controls, diff bytes and extra bytes in three bzip2
//! streams one after the other, so applying it needs the whole patch at hand. Here the
//! same three sections are cut into blocks, one block after the other:
//!
//! ```text
//! body    := block* 0
//! block   := count (LEB128, 1..=BLOCK_CONTROLS_MAX) controls diff extra
//! section := method (u8) stored_len (LEB128) stored bytes
//! ```
//!
//! The controls section holds `count` x (add, copy, zigzag seek) as LEB128; the diff
//! section the block's diff bytes (the sum of its adds, at most [`BLOCK_DIFF_BYTES_MAX`]);
//! the extra section its extra bytes (the sum of its copies, at most
//! [`BLOCK_EXTRA_BYTES_MAX`]). A section's method names its compressor (zstd or bzip2) and
//! for diff bytes optionally a sparse transform (each non-zero byte preceded by the run of
//! zeros before it), since bzip2's block sorting beats zstd on some diff streams and loses
//! on others: the creator tries each and keeps the smallest. Keeping like with like
//! compresses as well as bsdiff's three streams do, while the applier holds one block.

use super::frame::{self, FrameReader, FrameTuning, Sink};
use super::{ApplyError, CreateError};
use std::io::{BufRead, BufReader, Read, Write};

/// Diff bytes one block may carry: the applier holds them (and up to twice as many in
/// their sparse form) while it applies the block, so this is part of the memory bound.
pub const BLOCK_DIFF_BYTES_MAX: u64 = 1024 * 1024;
/// Extra bytes one block may carry, held by the applier like the diff bytes.
pub const BLOCK_EXTRA_BYTES_MAX: u64 = 1024 * 1024;
/// Controls one block may carry: at most 30 bytes each encoded, 24 decoded.
pub const BLOCK_CONTROLS_MAX: u64 = 16 * 1024;
/// Window of a zstd section, as a power of two: every section is at most 2 MiB, so a
/// larger window buys nothing, and the decoder refuses frames asking for more.
pub const SECTION_WINDOW_LOG: u32 = 21;
/// Bytes the applier reads from the old image at a time.
pub const COPY_BUFFER_BYTES: usize = 64 * 1024;
/// Longest LEB128 number we read: ten bytes hold any u64.
const VARINT_BYTES_MAX: usize = 10;
/// Most bytes one control takes in the controls section (three ten-byte numbers).
const CONTROL_BYTES_MAX: u64 = 30;
/// Slack a compressor may add to incompressible input (zstd adds under 1%, bzip2 about
/// 1% plus 600 bytes); stored sections longer than their raw bound plus this are refused.
const SECTION_SLACK_BYTES: u64 = 64 * 1024;

/// A section's compressor: the low four bits of its method byte.
const METHOD_ZSTD: u8 = 1;
const METHOD_BZIP2: u8 = 2;
/// A diff section stored sparse, pairs interleaved: the high four bits of its method.
const METHOD_SPARSE: u8 = 0x10;
/// A diff section stored sparse, all runs first and then all values (bzip2 and zstd each
/// win on one of the two layouts on some images).
const METHOD_SPLIT: u8 = 0x20;

/// zstd settings for sections.
fn section_tuning() -> FrameTuning {
    FrameTuning {
        level: 19,
        window_log: SECTION_WINDOW_LOG,
        long_distance: false,
        target_length: 0,
    }
}

/// One bsdiff control.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Control {
    add: u64,
    copy: u64,
    seek: i64,
}

/// The controls, diff bytes and extra bytes bsdiff found, decoded from qbsdiff's
/// BSDIFF40 output (which is the only interface the crate offers).
struct Matches {
    controls: Vec<Control>,
    diff: Vec<u8>,
    extra: Vec<u8>,
}

fn find_matches(old: &[u8], new: &[u8]) -> Result<Matches, CreateError> {
    let mut patch = Vec::new();
    qbsdiff::Bsdiff::new(old, new)
        // The bzip2 layer is thrown away right below, so spend the least time on it.
        .compression_level(1)
        // One search over the whole target: parallel chunks cost a little patch size.
        .parallel_scheme(qbsdiff::ParallelScheme::Never)
        // Exact matches this short are left to the diff bytes; 8 rather than the crate's
        // 12 gave smaller patches on the benchmark's executables.
        .small_match(8)
        .compare(std::io::Cursor::new(&mut patch))
        .map_err(CreateError::Bsdiff)?;
    let bad = |why: &str| {
        CreateError::Bsdiff(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unexpected qbsdiff output: {why}"),
        ))
    };
    if patch.len() < 32 || &patch[..8] != b"BSDIFF40" {
        return Err(bad("no BSDIFF40 header"));
    }
    let field = |at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&patch[at..at + 8]);
        decode_bsdiff_int(u64::from_le_bytes(w))
    };
    let (csize, dsize) = (field(8), field(16));
    let csize = usize::try_from(csize).map_err(|_| bad("control size"))?;
    let dsize = usize::try_from(dsize).map_err(|_| bad("diff size"))?;
    let body = &patch[32..];
    if csize.checked_add(dsize).is_none_or(|n| n > body.len()) {
        return Err(bad("stream sizes"));
    }
    let unbz = |bytes: &[u8]| -> Result<Vec<u8>, CreateError> {
        let mut out = Vec::new();
        bzip2::read::BzDecoder::new(bytes)
            .read_to_end(&mut out)
            .map_err(CreateError::Bsdiff)?;
        Ok(out)
    };
    let raw_controls = unbz(&body[..csize])?;
    let diff = unbz(&body[csize..csize + dsize])?;
    let extra = unbz(&body[csize + dsize..])?;
    if raw_controls.len() % 24 != 0 {
        return Err(bad("control stream length"));
    }
    let controls = raw_controls
        .chunks_exact(24)
        .map(|c| {
            let word = |i: usize| {
                let mut w = [0u8; 8];
                w.copy_from_slice(&c[i * 8..i * 8 + 8]);
                decode_bsdiff_int(u64::from_le_bytes(w))
            };
            Ok(Control {
                add: u64::try_from(word(0)).map_err(|_| bad("negative add"))?,
                copy: u64::try_from(word(1)).map_err(|_| bad("negative copy"))?,
                seek: word(2),
            })
        })
        .collect::<Result<Vec<_>, CreateError>>()?;
    Ok(Matches {
        controls,
        diff,
        extra,
    })
}

/// bsdiff's integers are sign and magnitude, not two's complement.
fn decode_bsdiff_int(x: u64) -> i64 {
    let magnitude = (x & (u64::MAX >> 1)) as i64;
    if x >> 63 == 1 {
        magnitude.wrapping_neg()
    } else {
        magnitude
    }
}

/// Folds controls that produce nothing (qbsdiff emits a seek-only control at its start
/// and between parallel chunks) into their neighbour, so that the applier can refuse
/// such controls everywhere but at the very start: each control then costs at least one
/// byte of output, which bounds the work a patch can ask for.
fn normalize(controls: Vec<Control>) -> Vec<Control> {
    let mut out: Vec<Control> = Vec::with_capacity(controls.len());
    for c in controls {
        match out.last_mut() {
            Some(prev) if c.add == 0 && c.copy == 0 => prev.seek = prev.seek.wrapping_add(c.seek),
            _ => out.push(c),
        }
    }
    out
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Cuts the controls into blocks within the limits, splitting a control whose add or
/// copy does not fit.
fn blocks(controls: Vec<Control>) -> Vec<Vec<Control>> {
    let mut out = Vec::new();
    let mut block: Vec<Control> = Vec::new();
    let (mut adds, mut copies) = (0u64, 0u64);
    for mut c in normalize(controls) {
        loop {
            let add_room = BLOCK_DIFF_BYTES_MAX - adds;
            let copy_room = BLOCK_EXTRA_BYTES_MAX - copies;
            if block.len() as u64 == BLOCK_CONTROLS_MAX || (add_room == 0 && c.add > 0) {
                out.push(std::mem::take(&mut block));
                (adds, copies) = (0, 0);
                continue;
            }
            if c.add > add_room {
                // The first part moves on with no extra bytes and no seek.
                block.push(Control {
                    add: add_room,
                    copy: 0,
                    seek: 0,
                });
                c.add -= add_room;
                adds += add_room;
                continue;
            }
            if c.copy > copy_room {
                if copy_room == 0 {
                    out.push(std::mem::take(&mut block));
                    (adds, copies) = (0, 0);
                    continue;
                }
                // The add and part of the copy here, the rest of the copy (and the seek)
                // in the next block. Neither part is empty.
                block.push(Control {
                    add: c.add,
                    copy: copy_room,
                    seek: 0,
                });
                c = Control {
                    add: 0,
                    copy: c.copy - copy_room,
                    seek: c.seek,
                };
                out.push(std::mem::take(&mut block));
                (adds, copies) = (0, 0);
                continue;
            }
            adds += c.add;
            copies += c.copy;
            block.push(c);
            break;
        }
    }
    if !block.is_empty() {
        out.push(block);
    }
    out
}

/// The non-zero bytes of `diff`, each with the run of zeros before it.
fn nonzero_runs(diff: &[u8]) -> impl Iterator<Item = (u64, u8)> + '_ {
    let mut run = 0u64;
    diff.iter().filter_map(move |&b| {
        if b == 0 {
            run += 1;
            return None;
        }
        let pair = (run, b);
        run = 0;
        Some(pair)
    })
}

/// Diff bytes in split sparse form: the number of non-zero bytes, the run of zeros
/// before each, then the non-zero bytes themselves.
fn split(diff: &[u8]) -> Vec<u8> {
    let mut runs = Vec::new();
    let mut values = Vec::new();
    for (run, b) in nonzero_runs(diff) {
        put_varint(&mut runs, run);
        values.push(b);
    }
    let mut out = Vec::with_capacity(runs.len() + values.len() + VARINT_BYTES_MAX);
    put_varint(&mut out, values.len() as u64);
    out.extend_from_slice(&runs);
    out.extend_from_slice(&values);
    out
}

/// Diff bytes in sparse form: each non-zero byte preceded by the number of zeros before
/// it; the zeros after the last one are implied by the block's length.
fn sparse(diff: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (run, b) in nonzero_runs(diff) {
        put_varint(&mut out, run);
        out.push(b);
    }
    out
}

fn compress_bzip2(raw: &[u8], level: u32) -> Result<Vec<u8>, CreateError> {
    let err = |e: std::io::Error| CreateError::Compress {
        what: "bzip2 section",
        message: e.to_string(),
    };
    let mut enc = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::new(level));
    enc.write_all(raw).map_err(err)?;
    enc.finish().map_err(err)
}

/// Appends the smallest encoding of one section among the given raw forms (each with
/// its transform bits) and both compressors.
fn put_section(out: &mut Vec<u8>, forms: &[(u8, &[u8])]) -> Result<(), CreateError> {
    let mut best: Option<(u8, Vec<u8>)> = None;
    for &(transform, raw) in forms {
        let mut z = Vec::new();
        frame::compress(raw, None, section_tuning(), &mut z)?;
        for (method, stored) in [(METHOD_ZSTD, z), (METHOD_BZIP2, compress_bzip2(raw, 9)?)] {
            if best.as_ref().is_none_or(|(_, b)| stored.len() < b.len()) {
                best = Some((transform | method, stored));
            }
        }
    }
    if let Some((method, stored)) = best {
        out.push(method);
        put_varint(out, stored.len() as u64);
        out.extend_from_slice(&stored);
    }
    Ok(())
}

/// Appends the body of a bsdiff-class patch from `old` to `new`.
pub fn create_body(old: &[u8], new: &[u8], out: &mut Vec<u8>) -> Result<(), CreateError> {
    let m = find_matches(old, new)?;
    let (mut diff_at, mut extra_at) = (0usize, 0usize);
    for block in blocks(m.controls) {
        let mut controls = Vec::with_capacity(block.len() * 6);
        let (mut adds, mut copies) = (0usize, 0usize);
        for c in &block {
            put_varint(&mut controls, c.add);
            put_varint(&mut controls, c.copy);
            put_varint(&mut controls, zigzag(c.seek));
            adds += c.add as usize;
            copies += c.copy as usize;
        }
        let diff = m
            .diff
            .get(diff_at..diff_at + adds)
            .ok_or_else(|| CreateError::Bsdiff(std::io::ErrorKind::InvalidData.into()))?;
        let extra = m
            .extra
            .get(extra_at..extra_at + copies)
            .ok_or_else(|| CreateError::Bsdiff(std::io::ErrorKind::InvalidData.into()))?;
        diff_at += adds;
        extra_at += copies;
        put_varint(out, block.len() as u64);
        put_section(out, &[(0, &controls)])?;
        put_section(
            out,
            &[
                (0, diff),
                (METHOD_SPARSE, &sparse(diff)),
                (METHOD_SPLIT, &split(diff)),
            ],
        )?;
        put_section(out, &[(0, extra)])?;
    }
    put_varint(out, 0);
    Ok(())
}

/// Random access to the old image, by position: a slice in memory, or a file read
/// piece by piece so that the image never has to be in memory as a whole.
pub trait OldImage {
    fn len(&self) -> u64;
    fn read_at(&mut self, pos: u64, buf: &mut [u8]) -> std::io::Result<()>;
}

impl OldImage for &[u8] {
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }
    fn read_at(&mut self, pos: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let start = usize::try_from(pos).map_err(|_| std::io::ErrorKind::UnexpectedEof)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// An old image in a file, read with a seek only when the position jumps.
pub struct FileImage {
    file: std::fs::File,
    len: u64,
    pos: u64,
}

impl FileImage {
    pub fn new(file: std::fs::File, len: u64) -> Self {
        FileImage { file, len, pos: 0 }
    }
}

impl OldImage for FileImage {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&mut self, pos: u64, buf: &mut [u8]) -> std::io::Result<()> {
        use std::io::Seek;
        if pos != self.pos {
            self.file.seek(std::io::SeekFrom::Start(pos))?;
            self.pos = pos;
        }
        self.file.read_exact(buf)?;
        self.pos += buf.len() as u64;
        Ok(())
    }
}

/// Counts the bytes read through it, for the apply statistics.
struct Counted<R> {
    inner: R,
    bytes: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
}

fn read_byte<R: Read>(r: &mut R) -> Result<Option<u8>, ApplyError> {
    let mut b = [0u8; 1];
    loop {
        return match r.read(&mut b) {
            Ok(0) => Ok(None),
            Ok(_) => Ok(Some(b[0])),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => Err(ApplyError::ReadPatch(e)),
        };
    }
}

/// Decodes a LEB128 number from `next`, which yields `None` at the end of its input
/// (`ended` is the error for that).
fn varint(
    mut next: impl FnMut() -> Result<Option<u8>, ApplyError>,
    ended: fn() -> ApplyError,
) -> Result<u64, ApplyError> {
    let mut v = 0u64;
    for i in 0..VARINT_BYTES_MAX {
        let b = next()?.ok_or_else(ended)?;
        let bits = u64::from(b & 0x7f);
        if i == VARINT_BYTES_MAX - 1 && bits > 1 {
            return Err(ApplyError::Corrupt("number overflows 64 bits"));
        }
        v |= bits << (7 * i);
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(ApplyError::Corrupt("number longer than ten bytes"))
}

fn read_varint<R: Read>(r: &mut R) -> Result<u64, ApplyError> {
    varint(|| read_byte(r), || ApplyError::Truncated)
}

fn take_varint(s: &mut &[u8]) -> Result<u64, ApplyError> {
    varint(
        || {
            Ok(s.split_first().map(|(&b, rest)| {
                *s = rest;
                b
            }))
        },
        || ApplyError::Corrupt("section ends inside a number"),
    )
}

/// Appends what `read` yields to `out` until it yields 0, refusing more than `cap` bytes.
fn fill_capped(
    mut read: impl FnMut(&mut [u8]) -> Result<usize, ApplyError>,
    cap: u64,
    out: &mut Vec<u8>,
) -> Result<(), ApplyError> {
    loop {
        let start = out.len();
        // Room for one byte past the cap, so that an overlong section is seen.
        let want = (cap + 1 - start as u64).min(COPY_BUFFER_BYTES as u64) as usize;
        out.resize(start + want, 0);
        let n = read(&mut out[start..])?;
        out.truncate(start + n);
        if n == 0 {
            return Ok(());
        }
        if out.len() as u64 > cap {
            return Err(ApplyError::Corrupt("section longer than its block allows"));
        }
    }
}

/// Reads one section into `out`, decompressed. `raw_max` bounds its plain form and
/// `sparse_max`, when given, allows the sparse forms with that bound. Returns the
/// method's transform bits.
fn read_section<R: Read>(
    r: &mut R,
    raw_max: u64,
    sparse_max: Option<u64>,
    out: &mut Vec<u8>,
) -> Result<u8, ApplyError> {
    let method = read_byte(r)?.ok_or(ApplyError::Truncated)?;
    let cap = match (method & 0xf0, sparse_max) {
        (0, _) => raw_max,
        (METHOD_SPARSE | METHOD_SPLIT, Some(max)) => max,
        _ => return Err(ApplyError::Corrupt("unknown section method")),
    };
    let stored = read_varint(r)?;
    if stored > cap + SECTION_SLACK_BYTES {
        return Err(ApplyError::Corrupt(
            "compressed section longer than its bound",
        ));
    }
    let mut section = r.take(stored);
    out.clear();
    match method & 0x0f {
        METHOD_ZSTD => {
            let mut stream = FrameReader::new(&mut section, SECTION_WINDOW_LOG, None)?;
            fill_capped(|buf| stream.read(buf), cap, out)?;
            stream.finish()?;
        }
        METHOD_BZIP2 => {
            let mut dec = bzip2::bufread::BzDecoder::new(BufReader::with_capacity(
                COPY_BUFFER_BYTES,
                &mut section,
            ));
            fill_capped(
                |buf| loop {
                    return match dec.read(buf) {
                        Ok(n) => Ok(n),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => Err(ApplyError::Decompress(format!("bzip2: {e}"))),
                    };
                },
                cap,
                out,
            )?;
            if dec.total_in() != stored || !dec.get_mut().fill_buf().is_ok_and(|b| b.is_empty()) {
                return Err(ApplyError::Corrupt("bytes after the compressed section"));
            }
        }
        _ => return Err(ApplyError::Corrupt("unknown section method")),
    }
    Ok(method & 0xf0)
}

/// Expands split sparse diff bytes into `len` bytes.
fn unsplit(mut src: &[u8], len: u64, out: &mut Vec<u8>) -> Result<(), ApplyError> {
    let count = take_varint(&mut src)?;
    // Find where the values start (after `count` runs), checking the runs on the way.
    let mut runs = src;
    let mut at = 0u64;
    for _ in 0..count {
        at = at
            .checked_add(take_varint(&mut runs)?)
            .filter(|&a| a < len)
            .ok_or(ApplyError::Corrupt("sparse diff runs past its block"))?
            + 1;
    }
    if runs.len() as u64 != count {
        return Err(ApplyError::Corrupt(
            "split diff has the wrong number of values",
        ));
    }
    let values = runs;
    out.clear();
    // `len` is at most BLOCK_DIFF_BYTES_MAX, checked by the caller.
    out.resize(len as usize, 0);
    let mut at = 0u64;
    for &value in values {
        // The runs were checked above, so these reads and positions are in range.
        at += take_varint(&mut src)?;
        out[at as usize] = value;
        at += 1;
    }
    Ok(())
}

/// Expands sparse diff bytes into `len` bytes.
fn unsparse(mut src: &[u8], len: u64, out: &mut Vec<u8>) -> Result<(), ApplyError> {
    out.clear();
    // `len` is at most BLOCK_DIFF_BYTES_MAX, checked by the caller.
    out.resize(len as usize, 0);
    let mut at = 0u64;
    while !src.is_empty() {
        at = at
            .checked_add(take_varint(&mut src)?)
            .filter(|&a| a < len)
            .ok_or(ApplyError::Corrupt("sparse diff runs past its block"))?;
        let (&b, rest) = src
            .split_first()
            .ok_or(ApplyError::Corrupt("sparse diff ends inside a pair"))?;
        out[at as usize] = b;
        src = rest;
        at += 1;
    }
    Ok(())
}

/// Applies a bsdiff-class body read from `body` to `old`, into `sink`, and returns how
/// many bytes of body it read. Memory: one block's controls, diff bytes (twice, for the
/// sparse form) and extra bytes, one section decoder (zstd with a `2^SECTION_WINDOW_LOG`
/// window, or bzip2's fixed 3.6 MB), and the copy buffer; none of it grows with the
/// images.
pub fn apply_body<R: Read, W: Write, O: OldImage>(
    mut old: O,
    body: R,
    sink: &mut Sink<W>,
) -> Result<u64, ApplyError> {
    let mut patch = Counted {
        inner: body,
        bytes: 0,
    };
    let old_len = old.len();
    let mut controls: Vec<Control> = Vec::new();
    let (mut section, mut diff, mut extra) = (Vec::new(), Vec::new(), Vec::new());
    let mut buf = vec![0u8; COPY_BUFFER_BYTES];
    let mut pos: i64 = 0;
    let mut first = true;
    loop {
        let count = read_varint(&mut patch)?;
        if count == 0 {
            break;
        }
        if count > BLOCK_CONTROLS_MAX {
            return Err(ApplyError::Corrupt("block has too many controls"));
        }
        read_section(&mut patch, count * CONTROL_BYTES_MAX, None, &mut section)?;
        let mut raw = &section[..];
        controls.clear();
        let (mut adds, mut copies) = (0u64, 0u64);
        for _ in 0..count {
            let c = Control {
                add: take_varint(&mut raw)?,
                copy: take_varint(&mut raw)?,
                seek: unzigzag(take_varint(&mut raw)?),
            };
            if c.add == 0 && c.copy == 0 && !first {
                return Err(ApplyError::Corrupt("control produces nothing"));
            }
            first = false;
            adds = adds.saturating_add(c.add);
            copies = copies.saturating_add(c.copy);
            if adds > BLOCK_DIFF_BYTES_MAX {
                return Err(ApplyError::Corrupt("block has too many diff bytes"));
            }
            if copies > BLOCK_EXTRA_BYTES_MAX {
                return Err(ApplyError::Corrupt("block has too many extra bytes"));
            }
            if adds + copies > sink.room() {
                return Err(ApplyError::Corrupt(
                    "controls produce more than the target size",
                ));
            }
            controls.push(c);
        }
        if !raw.is_empty() {
            return Err(ApplyError::Corrupt("controls section has bytes left over"));
        }
        let sparse_max = 2 * adds + VARINT_BYTES_MAX as u64;
        match read_section(&mut patch, adds, Some(sparse_max), &mut section)? {
            METHOD_SPARSE => unsparse(&section, adds, &mut diff)?,
            METHOD_SPLIT => unsplit(&section, adds, &mut diff)?,
            _ => std::mem::swap(&mut diff, &mut section),
        }
        read_section(&mut patch, copies, None, &mut extra)?;
        if diff.len() as u64 != adds || extra.len() as u64 != copies {
            return Err(ApplyError::Corrupt(
                "section shorter than its controls need",
            ));
        }
        let (mut diff_at, mut extra_at) = (0usize, 0usize);
        for c in &controls {
            let start = u64::try_from(pos)
                .ok()
                .filter(|p| c.add == 0 || p.checked_add(c.add).is_some_and(|end| end <= old_len))
                .ok_or(ApplyError::Corrupt("control reads outside the old image"))?;
            let mut done = 0u64;
            while done < c.add {
                let k = (c.add - done).min(buf.len() as u64) as usize;
                old.read_at(start + done, &mut buf[..k])
                    .map_err(ApplyError::ReadOld)?;
                for (b, d) in buf[..k].iter_mut().zip(&diff[diff_at..diff_at + k]) {
                    *b = b.wrapping_add(*d);
                }
                sink.put(&buf[..k])?;
                diff_at += k;
                done += k as u64;
            }
            // Copies sum to `extra.len()`, checked above.
            sink.put(&extra[extra_at..extra_at + c.copy as usize])?;
            extra_at += c.copy as usize;
            // An add is at most BLOCK_DIFF_BYTES_MAX; a seek that would overflow is a
            // corrupt patch, not a wrap.
            pos = pos
                .checked_add(c.add as i64)
                .and_then(|p| p.checked_add(c.seek))
                .ok_or(ApplyError::Corrupt("seek overflows"))?;
        }
    }
    if read_byte(&mut patch)?.is_some() {
        return Err(ApplyError::Corrupt("bytes after the end of the body"));
    }
    Ok(patch.bytes)
}

/// Turns a fuzz input laid out like a body but with plain sections (method byte, LEB128
/// length, plain bytes) into a real body, compressing each section with the compressor
/// its method names (fast settings). Whatever does not parse is appended as it is.
/// This lets a fuzzer choose what the section decoders yield, which random compressed
/// bytes would almost never reach.
pub fn fuzz_pack(mut plain: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let varint_at = |plain: &mut &[u8], out: &mut Vec<u8>| -> Option<u64> {
        let mut rest = *plain;
        let v = take_varint(&mut rest).ok()?;
        out.extend_from_slice(&plain[..plain.len() - rest.len()]);
        *plain = rest;
        Some(v)
    };
    'blocks: while let Some(count) = varint_at(&mut plain, &mut out) {
        if count == 0 {
            break;
        }
        for _ in 0..3 {
            let Some((&method, rest)) = plain.split_first() else {
                break 'blocks;
            };
            let mut rest_mut = rest;
            let Ok(len) = take_varint(&mut rest_mut) else {
                break 'blocks;
            };
            let len = (len as usize).min(rest_mut.len());
            let (raw, rest) = rest_mut.split_at(len);
            let stored = if method & 0x0f == METHOD_BZIP2 {
                compress_bzip2(raw, 1).unwrap_or_default()
            } else {
                let mut z = Vec::new();
                let fast = FrameTuning {
                    level: 1,
                    ..section_tuning()
                };
                let _ = frame::compress(raw, None, fast, &mut z);
                z
            };
            out.push(method);
            put_varint(&mut out, stored.len() as u64);
            out.extend_from_slice(&stored);
            plain = rest;
        }
    }
    out.extend_from_slice(plain);
    out
}

/// The plain layout [`fuzz_pack`] takes, from a valid body: seeds for fuzzing.
#[cfg(test)]
pub fn fuzz_unpack(mut body: &[u8]) -> Result<Vec<u8>, ApplyError> {
    let mut out = Vec::new();
    let mut section = Vec::new();
    loop {
        let count = read_varint(&mut body)?;
        put_varint(&mut out, count);
        if count == 0 {
            return Ok(out);
        }
        for sparse_ok in [false, true, false] {
            let method = body.first().copied().ok_or(ApplyError::Truncated)?;
            let max = BLOCK_DIFF_BYTES_MAX * 2;
            read_section(&mut body, max, sparse_ok.then_some(max), &mut section)?;
            out.push(method);
            put_varint(&mut out, section.len() as u64);
            out.extend_from_slice(&section);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_zigzag_round_trip() {
        for v in [0i64, 1, -1, 63, -64, 1 << 40, i64::MAX, i64::MIN] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
        for v in [0u64, 127, 128, 1 << 35, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            let mut s = &out[..];
            assert_eq!(take_varint(&mut s).unwrap(), v);
            assert!(s.is_empty());
        }
    }

    #[test]
    fn bsdiff_ints_are_sign_and_magnitude() {
        assert_eq!(decode_bsdiff_int(5), 5);
        assert_eq!(decode_bsdiff_int((1 << 63) | 5), -5);
    }

    #[test]
    fn seek_only_controls_fold_into_their_neighbour() {
        let c = |add, copy, seek| Control { add, copy, seek };
        let folded = normalize(vec![
            c(0, 0, 7),
            c(0, 0, 1),
            c(3, 1, 2),
            c(0, 0, -4),
            c(1, 0, 0),
        ]);
        assert_eq!(folded, vec![c(0, 0, 8), c(3, 1, -2), c(1, 0, 0)]);
    }

    #[test]
    fn blocks_respect_their_limits_and_keep_every_byte() {
        let c = |add, copy, seek| Control { add, copy, seek };
        let mb = BLOCK_DIFF_BYTES_MAX;
        let controls = vec![
            c(0, 0, 5),
            c(3 * mb + 7, 2, -1),
            c(1, 5 * mb / 2, 9),
            c(10, 0, 0),
        ];
        let blocks = blocks(controls.clone());
        let sum = |f: fn(&Control) -> u64, cs: &[Control]| cs.iter().map(f).sum::<u64>();
        for b in &blocks {
            assert!(sum(|c| c.add, b) <= BLOCK_DIFF_BYTES_MAX);
            assert!(sum(|c| c.copy, b) <= BLOCK_EXTRA_BYTES_MAX);
            assert!(b.iter().skip(1).all(|c| c.add + c.copy > 0));
        }
        let flat: Vec<Control> = blocks.concat();
        assert_eq!(sum(|c| c.add, &flat), sum(|c| c.add, &controls));
        assert_eq!(sum(|c| c.copy, &flat), sum(|c| c.copy, &controls));
        assert_eq!(flat.iter().map(|c| c.seek).sum::<i64>(), 13);
    }

    #[test]
    fn sparse_diff_round_trips() {
        let diff = [0u8, 0, 3, 0, 0, 0, 0xff, 1, 0, 0];
        let mut out = Vec::new();
        unsparse(&sparse(&diff), diff.len() as u64, &mut out).unwrap();
        assert_eq!(out, diff);
        assert!(unsparse(&sparse(&diff), 7, &mut out).is_err());
        unsplit(&split(&diff), diff.len() as u64, &mut out).unwrap();
        assert_eq!(out, diff);
        assert!(unsplit(&split(&diff), 7, &mut out).is_err());
        let mut short = split(&diff);
        short.pop();
        assert!(unsplit(&short, diff.len() as u64, &mut out).is_err());
    }
}
