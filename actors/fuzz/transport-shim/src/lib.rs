//! The `ContentId` of mesh-transport, for building the delta codec on its own (fuzzing).

use std::fmt;

/// A content id: the BLAKE3 hash of a blob.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentId(pub [u8; 32]);

impl ContentId {
    pub fn of(bytes: &[u8]) -> ContentId {
        ContentId(*blake3::hash(bytes).as_bytes())
    }
}

impl From<blake3::Hash> for ContentId {
    fn from(h: blake3::Hash) -> Self {
        ContentId(*h.as_bytes())
    }
}

impl fmt::Display for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentId({})", hex::encode(&self.0[..6]))
    }
}
