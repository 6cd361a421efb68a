//! The zstd plumbing both codecs share: one-shot compression on the creating side, and on
//! the applying side a reader that decodes exactly one zstd frame from a patch stream
//! with a capped window, plus a sink that caps, hashes and writes the result.

use super::{ApplyError, CreateError};
use mesh_transport::ContentId;
use std::io::{Read, Write};
use zstd::zstd_safe::{self, CCtx, CParameter, DCtx, DParameter, InBuffer, OutBuffer};

/// Bytes of compressed patch read from the caller's reader at a time: zstd's own
/// recommended streaming input size (one full block plus its header).
pub const PATCH_READ_BUFFER_BYTES: usize = 128 * 1024 + 512;

/// Compression settings for one frame.
#[derive(Clone, Copy, Debug)]
pub struct FrameTuning {
    pub level: i32,
    pub window_log: u32,
    pub long_distance: bool,
    /// zstd's `targetLength` for the optimal parsers (0 keeps the level's default).
    pub target_length: u32,
}

/// Compresses `src` into one zstd frame (content size recorded, no checksum: the
/// result is checked against its BLAKE3 instead), optionally with `prefix` as a
/// reference the decoder must supply again.
pub fn compress(
    src: &[u8],
    prefix: Option<&[u8]>,
    tuning: FrameTuning,
    out: &mut Vec<u8>,
) -> Result<(), CreateError> {
    let zerr = |what: &'static str| {
        move |code: usize| CreateError::Compress {
            what,
            message: zstd_safe::get_error_name(code).to_owned(),
        }
    };
    let mut cctx = CCtx::try_create().ok_or(CreateError::Compress {
        what: "creating a zstd context",
        message: "out of memory".into(),
    })?;
    let params = [
        CParameter::CompressionLevel(tuning.level),
        CParameter::WindowLog(tuning.window_log),
        CParameter::EnableLongDistanceMatching(tuning.long_distance),
        CParameter::ContentSizeFlag(true),
        CParameter::ChecksumFlag(false),
    ];
    for p in params {
        cctx.set_parameter(p)
            .map_err(zerr("setting a zstd parameter"))?;
    }
    if tuning.target_length > 0 {
        cctx.set_parameter(CParameter::TargetLength(tuning.target_length))
            .map_err(zerr("setting the zstd target length"))?;
    }
    if let Some(prefix) = prefix {
        cctx.ref_prefix(prefix)
            .map_err(zerr("referencing the old image in zstd"))?;
    }
    let mut frame = Vec::with_capacity(zstd_safe::compress_bound(src.len()));
    cctx.compress2(&mut frame, src)
        .map_err(zerr("zstd compression"))?;
    out.extend_from_slice(&frame);
    Ok(())
}

/// Decodes exactly one zstd frame from a patch stream. It refuses frames whose window is
/// over the caller's limit (so a hostile frame cannot make it allocate more), input that
/// ends inside the frame, and any byte after it.
pub struct FrameReader<'p, R: Read> {
    dctx: DCtx<'p>,
    src: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    src_done: bool,
    frame_done: bool,
    /// Bytes taken from `src` so far.
    pub read_bytes: u64,
}

impl<'p, R: Read> FrameReader<'p, R> {
    /// A reader whose frame may use a window of at most `2^window_log_max` bytes and may
    /// refer to `prefix` (which must be what the encoder referred to).
    pub fn new(src: R, window_log_max: u32, prefix: Option<&'p [u8]>) -> Result<Self, ApplyError> {
        let zerr = |code: usize| ApplyError::Decompress(zstd_safe::get_error_name(code).into());
        let mut dctx = DCtx::try_create()
            .ok_or_else(|| ApplyError::Decompress("out of memory creating a context".into()))?;
        dctx.set_parameter(DParameter::WindowLogMax(window_log_max))
            .map_err(zerr)?;
        if let Some(prefix) = prefix {
            dctx.ref_prefix(prefix).map_err(zerr)?;
        }
        Ok(FrameReader {
            dctx,
            src,
            buf: vec![0; PATCH_READ_BUFFER_BYTES],
            start: 0,
            end: 0,
            src_done: false,
            frame_done: false,
            read_bytes: 0,
        })
    }

    fn fill(&mut self) -> Result<(), ApplyError> {
        loop {
            match self.src.read(&mut self.buf) {
                Ok(0) => self.src_done = true,
                Ok(n) => {
                    self.start = 0;
                    self.end = n;
                    self.read_bytes += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ApplyError::ReadPatch(e)),
            }
            return Ok(());
        }
    }

    /// Decodes into `out`; returns 0 only at the end of the frame.
    pub fn read(&mut self, out: &mut [u8]) -> Result<usize, ApplyError> {
        if self.frame_done || out.is_empty() {
            return Ok(0);
        }
        loop {
            if self.start == self.end && !self.src_done {
                self.fill()?;
            }
            let mut input = InBuffer::around(&self.buf[self.start..self.end]);
            let mut output = OutBuffer::around(&mut *out);
            let hint = self
                .dctx
                .decompress_stream(&mut output, &mut input)
                .map_err(|code| ApplyError::Decompress(zstd_safe::get_error_name(code).into()))?;
            self.start += input.pos();
            let produced = output.pos();
            if hint == 0 {
                self.frame_done = true;
                return Ok(produced);
            }
            if produced > 0 {
                return Ok(produced);
            }
            if self.start == self.end && self.src_done {
                return Err(ApplyError::Truncated);
            }
        }
    }

    /// Checks that the frame is over and that nothing follows it in the patch.
    pub fn finish(mut self) -> Result<u64, ApplyError> {
        let mut probe = [0u8; 1];
        if self.read(&mut probe)? != 0 {
            return Err(ApplyError::Corrupt("data after the end of the body"));
        }
        if self.start == self.end && !self.src_done {
            self.fill()?;
        }
        if self.start != self.end {
            return Err(ApplyError::Corrupt("bytes after the compressed stream"));
        }
        Ok(self.read_bytes)
    }
}

/// Where the result goes: refuses to grow past the size the header promised, hashes
/// everything it passes on, and at the end checks size and hash.
pub struct Sink<W: Write> {
    out: W,
    hasher: blake3::Hasher,
    written: u64,
    expected_bytes: u64,
}

impl<W: Write> Sink<W> {
    pub fn new(out: W, expected_bytes: u64) -> Self {
        Sink {
            out,
            hasher: blake3::Hasher::new(),
            written: 0,
            expected_bytes,
        }
    }

    /// Bytes the result may still grow by.
    pub fn room(&self) -> u64 {
        self.expected_bytes - self.written
    }

    pub fn put(&mut self, bytes: &[u8]) -> Result<(), ApplyError> {
        if bytes.len() as u64 > self.room() {
            return Err(ApplyError::TooLong {
                expected_bytes: self.expected_bytes,
            });
        }
        self.hasher.update(bytes);
        self.out.write_all(bytes).map_err(ApplyError::Write)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Flushes and checks the result against the expected size and hash.
    pub fn finish(mut self, expected: &ContentId) -> Result<u64, ApplyError> {
        self.out.flush().map_err(ApplyError::Write)?;
        if self.written != self.expected_bytes {
            return Err(ApplyError::WrongSize {
                actual_bytes: self.written,
                expected_bytes: self.expected_bytes,
            });
        }
        let actual = ContentId::from(self.hasher.finalize());
        if actual != *expected {
            return Err(ApplyError::WrongHash {
                actual,
                expected: *expected,
            });
        }
        Ok(self.written)
    }
}
