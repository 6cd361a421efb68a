//! Identities: ed25519 keys (nodes, operators, release signers) and BLAKE3 content ids.
//!
//! One ed25519 key type serves every role so that a node id, an operator id and a
//! release signer id print and parse the same way (lowercase hex of the 32-byte public key).

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{Signer, Verifier};
use serde::{Deserialize, Serialize};

/// Length of an ed25519 public key in bytes.
pub const PUBLIC_KEY_BYTES: usize = 32;
/// Length of an ed25519 signature in bytes.
pub const SIGNATURE_BYTES: usize = 64;
/// A key file is a short PEM document; anything larger is not one of ours.
pub const KEY_FILE_BYTES_MAX: u64 = 4096;

/// Errors from parsing or loading keys and ids.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("writing key file {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("key file {path} is larger than {KEY_FILE_BYTES_MAX} bytes")]
    TooLarge { path: String },
    #[error("parsing key file {path}: not an ed25519 PKCS#8 PEM key")]
    Pem { path: String },
    #[error("parsing hex {what}: expected {expected} hex digits")]
    Hex { what: &'static str, expected: usize },
    #[error("parsing public key: not a valid ed25519 point")]
    InvalidPoint,
}

/// An ed25519 public key: the identity of a node, an operator or a release signer.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PublicKey(#[serde(with = "hex32")] pub [u8; PUBLIC_KEY_BYTES]);

impl PublicKey {
    /// Checks `signature` over `domain || message`.
    ///
    /// Every signed payload is prefixed with a domain string so that a signature made
    /// for one purpose (a release, a TLS handshake) can never be replayed as another.
    pub fn verify(&self, domain: &[u8], message: &[u8], signature: &Signature) -> bool {
        let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(&self.0) else {
            return false;
        };
        let sig = ed25519_dalek::Signature::from_bytes(&signature.0);
        key.verify(&domain_message(domain, message), &sig).is_ok()
    }

    /// The libp2p peer id of the node that owns this key.
    pub fn peer_id(&self) -> Result<libp2p::PeerId, KeyError> {
        let key = libp2p::identity::ed25519::PublicKey::try_from_bytes(&self.0)
            .map_err(|_| KeyError::InvalidPoint)?;
        Ok(libp2p::identity::PublicKey::from(key).to_peer_id())
    }

    /// Recovers the ed25519 key behind a libp2p peer id, when the id embeds one
    /// (ed25519 peer ids are identity multihashes of the protobuf-encoded key).
    pub fn from_peer_id(peer: &libp2p::PeerId) -> Option<PublicKey> {
        let mh = libp2p::multihash::Multihash::<64>::from_bytes(&peer.to_bytes()).ok()?;
        if mh.code() != 0 {
            return None;
        }
        let key = libp2p::identity::PublicKey::try_decode_protobuf(mh.digest()).ok()?;
        let ed = key.try_into_ed25519().ok()?;
        Some(PublicKey(ed.to_bytes()))
    }

    /// A short prefix for logs and tables.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.short())
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = parse_hex32(s.trim(), "public key")?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::InvalidPoint)?;
        Ok(PublicKey(bytes))
    }
}

/// An ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature(#[serde(with = "hex64")] pub [u8; SIGNATURE_BYTES]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({}..)", hex::encode(&self.0[..6]))
    }
}

/// An ed25519 secret key. Never printed, never serialized except to its key file.
pub struct SecretKey(ed25519_dalek::SigningKey);

impl SecretKey {
    /// A fresh key from the operating system's randomness.
    pub fn generate() -> SecretKey {
        let mut seed = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
        SecretKey::from_seed(seed)
    }

    /// A key from its 32-byte seed (tests and key derivation).
    pub fn from_seed(seed: [u8; 32]) -> SecretKey {
        SecretKey(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }

    /// A second handle on the same key, for a task that signs on its own. Deliberately
    /// not `Clone`, so copies of a secret are made only where one is needed.
    pub(crate) fn duplicate(&self) -> SecretKey {
        SecretKey(self.0.clone())
    }

    /// Signs `domain || message`; see [`PublicKey::verify`].
    pub fn sign(&self, domain: &[u8], message: &[u8]) -> Signature {
        Signature(self.0.sign(&domain_message(domain, message)).to_bytes())
    }

    /// The same key as a libp2p identity, so the node's peer id is its public key.
    pub fn to_libp2p(&self) -> libp2p::identity::Keypair {
        libp2p::identity::Keypair::ed25519_from_bytes(self.0.to_bytes())
            .expect("a 32-byte ed25519 seed is always a valid libp2p key")
    }

    /// The key as PKCS#8 DER, the form rustls and rcgen take.
    pub fn to_pkcs8_der(&self) -> Vec<u8> {
        self.0
            .to_pkcs8_der()
            .expect("encoding an ed25519 key as pkcs8 cannot fail")
            .as_bytes()
            .to_vec()
    }

    /// Reads a PKCS#8 PEM key file, the format `openssl genpkey -algorithm ed25519` writes.
    pub fn load(path: &Path) -> Result<SecretKey, KeyError> {
        let shown = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|source| KeyError::Read {
            path: shown.clone(),
            source,
        })?;
        if meta.len() > KEY_FILE_BYTES_MAX {
            return Err(KeyError::TooLarge { path: shown });
        }
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: shown.clone(),
            source,
        })?;
        let key = ed25519_dalek::SigningKey::from_pkcs8_pem(&text)
            .map_err(|_| KeyError::Pem { path: shown })?;
        Ok(SecretKey(key))
    }

    /// Writes the key as PKCS#8 PEM, readable only by its owner, atomically.
    pub fn save(&self, path: &Path) -> Result<(), KeyError> {
        let pem = self
            .0
            .to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
            .expect("encoding an ed25519 key as pem cannot fail");
        crate::fsutil::write_atomic(path, pem.as_bytes(), 0o600).map_err(|source| KeyError::Write {
            path: path.display().to_string(),
            source,
        })
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(public={})", self.public().short())
    }
}

/// A content id: the BLAKE3 hash of a blob, printed as the same hex `b3sum` prints.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ContentId(#[serde(with = "hex32")] pub [u8; 32]);

impl ContentId {
    pub fn of(bytes: &[u8]) -> ContentId {
        ContentId(*blake3::hash(bytes).as_bytes())
    }

    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
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
        write!(f, "ContentId({})", self.short())
    }
}

impl FromStr for ContentId {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(ContentId(parse_hex32(s.trim(), "content id")?))
    }
}

fn domain_message(domain: &[u8], message: &[u8]) -> Vec<u8> {
    // The domain is length-prefixed so that no (domain, message) pair can collide
    // with another pair whose concatenation is the same.
    let mut out = Vec::with_capacity(8 + domain.len() + message.len());
    out.extend_from_slice(&(domain.len() as u64).to_le_bytes());
    out.extend_from_slice(domain);
    out.extend_from_slice(message);
    out
}

fn parse_hex32(s: &str, what: &'static str) -> Result<[u8; 32], KeyError> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).map_err(|_| KeyError::Hex { what, expected: 64 })?;
    Ok(out)
}

/// Fixed-size byte arrays as hex strings in human formats (JSON, TOML) and as plain
/// bytes in bincode, so that the wire stays compact.
macro_rules! hex_array {
    ($name:ident, $n:expr) => {
        mod $name {
            use serde::de::Error;
            use serde::{Deserializer, Serializer};

            pub fn serialize<S: Serializer>(v: &[u8; $n], s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.serialize_str(&hex::encode(v))
                } else {
                    serde::Serialize::serialize(&super::serde_bytes_like::BytesRef(v), s)
                }
            }

            pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; $n], D::Error> {
                if d.is_human_readable() {
                    let s: String = serde::Deserialize::deserialize(d)?;
                    let mut out = [0u8; $n];
                    hex::decode_to_slice(&s, &mut out).map_err(D::Error::custom)?;
                    Ok(out)
                } else {
                    let v: super::serde_bytes_like::Bytes = serde::Deserialize::deserialize(d)?;
                    v.0.try_into()
                        .map_err(|_| D::Error::custom(concat!("expected ", $n, " bytes")))
                }
            }
        }
    };
}

/// Minimal byte-string (de)serialization helpers so arrays longer than 32 need no extra crate.
mod serde_bytes_like {
    use serde::de::{SeqAccess, Visitor};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub struct BytesRef<'a>(pub &'a [u8]);
    impl Serialize for BytesRef<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }

    pub struct Bytes(pub Vec<u8>);
    impl<'de> Deserialize<'de> for Bytes {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Bytes;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a byte string")
                }
                fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
                    Ok(Bytes(v.to_vec()))
                }
                fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
                    Ok(Bytes(v))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
                    // Bounded: the callers only accept 32 or 64 bytes, so stop well past that.
                    let mut out = Vec::new();
                    while let Some(b) = seq.next_element::<u8>()? {
                        if out.len() > 64 {
                            return Err(serde::de::Error::custom("byte array too long"));
                        }
                        out.push(b);
                    }
                    Ok(Bytes(out))
                }
            }
            d.deserialize_bytes(V)
        }
    }
}

hex_array!(hex32, 32);
hex_array!(hex64, 64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_domain_separation() {
        let k = SecretKey::from_seed([7; 32]);
        let sig = k.sign(b"release", b"payload");
        assert!(k.public().verify(b"release", b"payload", &sig));
        assert!(!k.public().verify(b"admin", b"payload", &sig));
        assert!(!k.public().verify(b"release", b"payloaD", &sig));
        // Moving a byte between domain and message must not keep the signature valid.
        assert!(!k.public().verify(b"releasep", b"ayload", &sig));
    }

    #[test]
    fn hex_round_trips() {
        let k = SecretKey::from_seed([1; 32]).public();
        assert_eq!(k.to_string().parse::<PublicKey>().unwrap(), k);
        let c = ContentId::of(b"hello");
        assert_eq!(c.to_string(), blake3::hash(b"hello").to_hex().to_string());
        assert_eq!(c.to_string().parse::<ContentId>().unwrap(), c);
        assert!("zz".parse::<ContentId>().is_err());
    }

    #[test]
    fn peer_id_round_trip() {
        let k = SecretKey::from_seed([3; 32]);
        let peer = k.public().peer_id().unwrap();
        assert_eq!(peer, k.to_libp2p().public().to_peer_id());
        assert_eq!(PublicKey::from_peer_id(&peer), Some(k.public()));
    }

    #[test]
    fn key_file_round_trip_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        let k = SecretKey::generate();
        k.save(&path).unwrap();
        let back = SecretKey::load(&path).unwrap();
        assert_eq!(back.public(), k.public());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::write(&path, "not a key").unwrap();
        assert!(matches!(SecretKey::load(&path), Err(KeyError::Pem { .. })));
    }

    #[test]
    fn serde_forms() {
        let c = ContentId::of(b"x");
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(json, format!("\"{c}\""));
        assert_eq!(serde_json::from_str::<ContentId>(&json).unwrap(), c);
        let bin = crate::wire::encode(&c).unwrap();
        assert!(bin.len() <= 34);
        let back: ContentId = crate::wire::decode(&bin, 64).unwrap();
        assert_eq!(back, c);
        let sig = SecretKey::from_seed([2; 32]).sign(b"d", b"m");
        let bin = crate::wire::encode(&sig).unwrap();
        let back: Signature = crate::wire::decode(&bin, 128).unwrap();
        assert_eq!(back, sig);
    }
}
