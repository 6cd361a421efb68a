//! mesh-transport moves authenticated bytes between mesh nodes and operators.
//!
//! It owns identities (ed25519 keys, BLAKE3 content ids), the wire format with its size
//! limits, the libp2p swarm (QUIC, gossipsub, identify, kad, ping, the blob and rpc
//! protocols) and the quinn endpoint that the operator's CLI attaches to. It decides no
//! policy: which releases to trust, what to fetch and whom to penalise are decided above.

pub mod admin;
pub mod bans;
pub mod blobnet;
pub mod fsutil;
pub mod gossip;
pub mod id;
pub mod redial;
pub mod rediscover;
pub mod swarm;
pub mod wire;

pub use id::{ContentId, KeyError, PublicKey, SecretKey, Signature};

/// Re-exported so the crates above name peers and addresses without depending on
/// libp2p themselves.
pub use libp2p;
/// Re-exported for the admin endpoint's stream types.
pub use quinn;
