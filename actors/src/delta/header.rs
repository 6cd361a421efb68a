//! The fixed-size header every patch starts with.
//!
//! Layout (little-endian, [`HEADER_BYTES`] in all):
//!
//! | offset | bytes | field |
//! | --- | --- | --- |
//! | 0 | 4 | magic `MDLT` |
//! | 4 | 1 | format version ([`FORMAT_VERSION`]) |
//! | 5 | 1 | codec id ([`Codec::id`]) |
//! | 6 | 2 | reserved, zero |
//! | 8 | 32 | BLAKE3 of the base (old) image |
//! | 40 | 8 | size of the base image in bytes |
//! | 48 | 32 | BLAKE3 of the target (new) image |
//! | 80 | 8 | size of the target image in bytes |
//!
//! The header names both ends of the patch so that it can never be applied to the wrong
//! base, and so that the applier knows, before it writes a byte, how long the result may
//! grow and what it must hash to.

use super::{Codec, HeaderError, IMAGE_BYTES_MAX};
use mesh_transport::ContentId;

/// The four bytes every patch starts with.
pub const MAGIC: [u8; 4] = *b"MDLT";
/// The header layout and body formats this build writes and reads.
pub const FORMAT_VERSION: u8 = 1;
/// Size of the fixed header in bytes.
pub const HEADER_BYTES: usize = 88;

/// What a patch says about itself: its codec and the two images it connects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PatchHeader {
    pub codec: Codec,
    /// BLAKE3 of the image the patch applies to.
    pub base: ContentId,
    pub base_bytes: u64,
    /// BLAKE3 of the image the patch produces.
    pub target: ContentId,
    pub target_bytes: u64,
}

impl PatchHeader {
    /// The header's bytes, as written at the start of a patch.
    pub fn to_bytes(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = FORMAT_VERSION;
        b[5] = self.codec.id();
        b[8..40].copy_from_slice(&self.base.0);
        b[40..48].copy_from_slice(&self.base_bytes.to_le_bytes());
        b[48..80].copy_from_slice(&self.target.0);
        b[80..88].copy_from_slice(&self.target_bytes.to_le_bytes());
        b
    }

    /// Parses the header at the start of `patch` (only its first [`HEADER_BYTES`] are
    /// looked at), refusing unknown versions and codecs and sizes over
    /// [`IMAGE_BYTES_MAX`].
    pub fn parse(patch: &[u8]) -> Result<PatchHeader, HeaderError> {
        let b: &[u8; HEADER_BYTES] = patch
            .get(..HEADER_BYTES)
            .and_then(|s| s.try_into().ok())
            .ok_or(HeaderError::Truncated(patch.len()))?;
        if b[0..4] != MAGIC {
            return Err(HeaderError::BadMagic);
        }
        if b[4] != FORMAT_VERSION {
            return Err(HeaderError::Version(b[4]));
        }
        let codec = Codec::from_id(b[5]).ok_or(HeaderError::UnknownCodec(b[5]))?;
        if b[6..8] != [0, 0] {
            return Err(HeaderError::Reserved);
        }
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(w)
        };
        let hash = |at: usize| {
            let mut h = [0u8; 32];
            h.copy_from_slice(&b[at..at + 32]);
            ContentId(h)
        };
        let base_bytes = word(40);
        let target_bytes = word(80);
        for (what, bytes) in [("base", base_bytes), ("target", target_bytes)] {
            if bytes > IMAGE_BYTES_MAX {
                return Err(HeaderError::TooLarge { what, bytes });
            }
        }
        Ok(PatchHeader {
            codec,
            base: hash(8),
            base_bytes,
            target: hash(48),
            target_bytes,
        })
    }
}
