//! Gossip envelopes: who wrote a gossip message, checked once per message a node hears.
//!
//! gossipsub can sign messages itself, but it checks those signatures in its decoder, on
//! every copy a node receives and before duplicates are dropped. A node hears each
//! message from most of its mesh peers, so in a fleet of 32 nodes the ed25519 checks of
//! repeated copies took a tenth of all CPU while a blob spread. So gossipsub runs
//! anonymously and each message carries this envelope instead: the author's key, a
//! sequence number, and the author's signature over the topic, the sequence number and
//! the payload. The swarm driver opens it after gossipsub has dropped duplicates, and
//! gossipsub relays only what opened (its manual validation mode), so a forgery stops at
//! the first honest node.

use serde::{Deserialize, Serialize};

use crate::id::{PublicKey, SecretKey, Signature};
use crate::wire::{self, WireError};

/// The signature domain of gossip envelopes; see [`PublicKey::verify`].
pub const GOSSIP_DOMAIN: &[u8] = b"mesh/gossip/1";
/// Bytes an envelope adds to its payload: a key, a sequence number, a signature, and
/// bincode's length prefixes.
pub const ENVELOPE_OVERHEAD_BYTES_MAX: usize = 32 + 10 + 64 + 10 + 10;
/// Bytes of a gossip message id: enough that ids of distinct messages never collide in
/// a duplicate cache of a few thousand entries, short enough to keep IHAVEs small.
pub const MESSAGE_ID_BYTES: usize = 20;

#[derive(Serialize, Deserialize)]
struct Envelope {
    author: PublicKey,
    seq: u64,
    #[serde(with = "wire::bytes")]
    data: Vec<u8>,
    signature: Signature,
}

/// A message whose envelope checked out.
#[derive(Debug, PartialEq, Eq)]
pub struct Opened {
    pub author: PublicKey,
    pub seq: u64,
    pub data: Vec<u8>,
}

/// Why a gossip message was refused.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("decoding a gossip envelope: {0}")]
    Decode(#[from] WireError),
    #[error(
        "checking a gossip envelope: the signature of {author:?} does not match topic {topic}"
    )]
    Signature { author: PublicKey, topic: String },
    #[error("checking a gossip envelope: not in its one canonical encoding")]
    NotCanonical,
}

/// Wraps `data` for `topic` in an envelope signed by `key`. `seq` must differ between
/// messages of one author with the same payload (a restart included), or receivers take
/// the second for a duplicate of the first.
pub fn seal(key: &SecretKey, topic: &str, seq: u64, data: Vec<u8>) -> Result<Vec<u8>, WireError> {
    let signature = key.sign(GOSSIP_DOMAIN, &signed_bytes(topic, seq, &data));
    wire::encode(&Envelope {
        author: key.public(),
        seq,
        data,
        signature,
    })
}

/// Decodes an envelope of at most `bytes_max` bytes heard on `topic` and checks its
/// signature.
pub fn open(topic: &str, bytes: &[u8], bytes_max: usize) -> Result<Opened, OpenError> {
    let env: Envelope = wire::decode(bytes, bytes_max)?;
    // bincode's decoder also takes over-long length prefixes. Ids are hashes of the
    // bytes, so a relay that re-encoded a message that way could pass it off as a new
    // one, many times over; only the encoding `seal` writes is taken.
    if wire::encode(&env)? != bytes {
        return Err(OpenError::NotCanonical);
    }
    if !env.author.verify(
        GOSSIP_DOMAIN,
        &signed_bytes(topic, env.seq, &env.data),
        &env.signature,
    ) {
        return Err(OpenError::Signature {
            author: env.author,
            topic: topic.to_string(),
        });
    }
    Ok(Opened {
        author: env.author,
        seq: env.seq,
        data: env.data,
    })
}

/// The id gossipsub deduplicates by: a hash of the topic and the whole envelope, so two
/// messages differ whenever their author, sequence number or payload does.
pub fn message_id(topic: &str, envelope: &[u8]) -> Vec<u8> {
    let mut h = blake3::Hasher::new();
    h.update(&(topic.len() as u64).to_le_bytes());
    h.update(topic.as_bytes());
    h.update(envelope);
    h.finalize().as_bytes()[..MESSAGE_ID_BYTES].to_vec()
}

/// What the author signs: the topic (length-prefixed, so no topic is a prefix of
/// another's signed bytes), the sequence number and the payload.
fn signed_bytes(topic: &str, seq: u64, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + topic.len() + 8 + data.len());
    out.extend_from_slice(&(topic.len() as u64).to_le_bytes());
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 4096;

    fn key(seed: u8) -> SecretKey {
        SecretKey::from_seed([seed; 32])
    }

    #[test]
    fn a_sealed_message_opens_with_its_author_and_payload() {
        let k = key(1);
        let sealed = seal(&k, "mesh/have/1", 7, b"ranges".to_vec()).unwrap();
        assert!(sealed.len() <= b"ranges".len() + ENVELOPE_OVERHEAD_BYTES_MAX);
        let opened = open("mesh/have/1", &sealed, MAX).unwrap();
        assert_eq!(
            opened,
            Opened {
                author: k.public(),
                seq: 7,
                data: b"ranges".to_vec()
            }
        );
    }

    #[test]
    fn a_message_moved_to_another_topic_or_altered_does_not_open() {
        let sealed = seal(&key(1), "mesh/have/1", 7, b"ranges".to_vec()).unwrap();
        assert!(matches!(
            open("mesh/releases/1", &sealed, MAX),
            Err(OpenError::Signature { .. })
        ));
        // Flipping any byte either breaks the encoding or the signature; never does a
        // changed message open.
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(open("mesh/have/1", &bad, MAX).is_err(), "byte {i} flipped");
        }
    }

    #[test]
    fn another_author_cannot_sign_in_someones_name() {
        // The envelope of key 2, with key 1's public key put in as the author.
        let mut forged = seal(&key(2), "t", 1, b"x".to_vec()).unwrap();
        let theirs = key(2).public().0;
        let pos = forged
            .windows(32)
            .position(|w| w == theirs)
            .expect("the author's key is in the envelope");
        forged[pos..pos + 32].copy_from_slice(&key(1).public().0);
        assert!(matches!(
            open("t", &forged, MAX),
            Err(OpenError::Signature { .. })
        ));
    }

    #[test]
    fn oversized_truncated_and_garbage_envelopes_are_refused() {
        let sealed = seal(&key(1), "t", 1, vec![0u8; 100]).unwrap();
        assert!(matches!(
            open("t", &sealed, 50),
            Err(OpenError::Decode(WireError::TooLarge { .. }))
        ));
        assert!(open("t", &sealed[..sealed.len() - 1], MAX).is_err());
        assert!(open("t", &[], MAX).is_err());
        assert!(open("t", &[0xff; 64], MAX).is_err());
    }

    #[test]
    fn a_re_encoded_message_is_not_taken_for_a_new_one() {
        let sealed = seal(&key(1), "t", 1, b"x".to_vec()).unwrap();
        // The author's key is a 32-byte string: its length prefix is the byte 32 just
        // before it. bincode's varint decoder also reads 32 as 251 followed by a u16,
        // so this is the same envelope, signature and all, in other bytes.
        let author = key(1).public().0;
        let pos = sealed.windows(32).position(|w| w == author).unwrap();
        assert_eq!(sealed[pos - 1], 32);
        let mut widened = sealed[..pos - 1].to_vec();
        widened.extend_from_slice(&[251, 32, 0]);
        widened.extend_from_slice(&sealed[pos..]);
        let decoded: Result<Envelope, _> = wire::decode(&widened, MAX);
        assert!(decoded.is_ok(), "the decoder takes the long form");
        assert_ne!(message_id("t", &widened), message_id("t", &sealed));
        assert!(matches!(
            open("t", &widened, MAX),
            Err(OpenError::NotCanonical)
        ));
        assert!(open("t", &sealed, MAX).is_ok());
    }

    #[test]
    fn ids_differ_with_topic_sequence_number_or_payload() {
        let k = key(1);
        let a = seal(&k, "t", 1, b"x".to_vec()).unwrap();
        let b = seal(&k, "t", 2, b"x".to_vec()).unwrap();
        let c = seal(&k, "t", 1, b"y".to_vec()).unwrap();
        let ids = [
            message_id("t", &a),
            message_id("t", &b),
            message_id("t", &c),
            message_id("u", &a),
        ];
        for i in 0..ids.len() {
            assert_eq!(ids[i].len(), MESSAGE_ID_BYTES);
            for j in i + 1..ids.len() {
                assert_ne!(ids[i], ids[j], "ids {i} and {j}");
            }
        }
        assert_eq!(message_id("t", &a), message_id("t", &a));
    }
}
