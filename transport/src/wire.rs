//! The wire format: bincode 2 (standard config, varint integers) with an explicit size
//! limit on every decode, and length-prefixed frames on byte streams.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest frame any protocol of ours sends in one piece; bulk data goes in
/// several frames or as a raw byte stream of declared length.
pub const FRAME_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Errors from encoding or decoding a value.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("encoding a message: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("decoding a message: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("decoding a message: {0} trailing bytes after the value")]
    Trailing(usize),
    #[error("frame of {len} bytes is over the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("reading or writing a frame: {0}")]
    Io(#[from] std::io::Error),
    #[error("the stream ended before a frame was read")]
    Closed,
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes a value with the wire config.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, WireError> {
    Ok(bincode::serde::encode_to_vec(value, config())?)
}

/// Decodes a value from untrusted bytes that must be at most `max` long and hold exactly
/// one value. The limit also caps every allocation the decoder makes, so a length field
/// that claims gigabytes fails instead of allocating.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], max: usize) -> Result<T, WireError> {
    if bytes.len() > max {
        return Err(WireError::TooLarge {
            len: bytes.len(),
            max,
        });
    }
    // bincode's limit is a const generic, so the runtime limit is enforced above and a
    // generous const limit guards the allocations inside.
    let cfg = config().with_limit::<FRAME_BYTES_MAX>();
    let (value, used) = bincode::serde::decode_from_slice(bytes, cfg)?;
    if used != bytes.len() {
        return Err(WireError::Trailing(bytes.len() - used));
    }
    Ok(value)
}

/// Writes `value` as one frame: a u32 little-endian length, then the bincode bytes.
pub async fn write_frame<W, T>(w: &mut W, value: &T) -> Result<(), WireError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let bytes = encode(value)?;
    if bytes.len() > FRAME_BYTES_MAX {
        return Err(WireError::TooLarge {
            len: bytes.len(),
            max: FRAME_BYTES_MAX,
        });
    }
    w.write_all(&(bytes.len() as u32).to_le_bytes()).await?;
    w.write_all(&bytes).await?;
    Ok(())
}

/// Reads one frame of at most `max` bytes and decodes it. The length is checked before
/// any buffer is allocated.
pub async fn read_frame<R, T>(r: &mut R, max: usize) -> Result<T, WireError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(WireError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len) as usize;
    let max = max.min(FRAME_BYTES_MAX);
    if len > max {
        return Err(WireError::TooLarge { len, max });
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    decode(&buf, max)
}

/// Serde helpers for a `Vec<u8>` field that carries bulk data. Serde treats a plain
/// `Vec<u8>` as a sequence and bincode then decodes it one element at a time; as a byte
/// string it is one length and one copy. The two encodings are the same bytes on the
/// wire, so a field can switch without a protocol change. Use with
/// `#[serde(with = "mesh_transport::wire::bytes")]`.
pub mod bytes {
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            // Self-describing formats (JSON) hand bytes over as a sequence; the decoder's
            // own size limit bounds how long it can be.
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_byte_buf(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Msg {
        name: String,
        data: Vec<u8>,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Bulk {
        #[serde(with = "super::bytes")]
        data: Vec<u8>,
    }

    #[test]
    fn bulk_bytes_are_the_same_on_the_wire_as_a_plain_vec() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let plain = encode(&Msg {
            name: String::new(),
            data: data.clone(),
        })
        .unwrap();
        let bulk = encode(&Bulk { data: data.clone() }).unwrap();
        // Msg has an empty string (one length byte) in front of the same field.
        assert_eq!(&plain[1..], &bulk[..]);
        let back: Bulk = decode(&plain[1..], FRAME_BYTES_MAX).unwrap();
        assert_eq!(back.data, data);
        let json = serde_json::to_string(&Bulk { data: vec![1, 2] }).unwrap();
        assert_eq!(
            serde_json::from_str::<Bulk>(&json).unwrap().data,
            vec![1, 2]
        );
    }

    #[test]
    fn round_trip_and_limits() {
        let m = Msg {
            name: "a".into(),
            data: vec![1, 2, 3],
        };
        let b = encode(&m).unwrap();
        assert_eq!(decode::<Msg>(&b, 1024).unwrap(), m);
        assert!(matches!(
            decode::<Msg>(&b, 2),
            Err(WireError::TooLarge { .. })
        ));
        let mut t = b.clone();
        t.push(0);
        assert!(matches!(
            decode::<Msg>(&t, 1024),
            Err(WireError::Trailing(1))
        ));
        assert!(decode::<Msg>(&b[..b.len() - 1], 1024).is_err());
    }

    #[test]
    fn hostile_length_does_not_allocate() {
        // A Vec<u8> whose varint length claims 2^40 elements, followed by nothing.
        let mut hostile = vec![1u8, b'a'];
        hostile.push(253);
        hostile.extend_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(decode::<Msg>(&hostile, 1024).is_err());
    }

    #[tokio::test]
    async fn frames() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let m = Msg {
            name: "x".into(),
            data: vec![9; 100],
        };
        write_frame(&mut a, &m).await.unwrap();
        assert_eq!(read_frame::<_, Msg>(&mut b, 1024).await.unwrap(), m);
        write_frame(&mut a, &m).await.unwrap();
        assert!(matches!(
            read_frame::<_, Msg>(&mut b, 16).await,
            Err(WireError::TooLarge { .. })
        ));
        drop(a);
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).await.unwrap();
        let (_a2, mut b2) = tokio::io::duplex(16);
        drop(_a2);
        assert!(matches!(
            read_frame::<_, Msg>(&mut b2, 16).await,
            Err(WireError::Closed)
        ));
    }
}
