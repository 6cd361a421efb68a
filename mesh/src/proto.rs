//! The admin protocol between the operator's CLI and a node: one request and one
//! response per bidirectional QUIC stream, as length-prefixed bincode frames. A publish
//! request is followed on the same stream by exactly `manifest.size` raw content bytes.

use std::collections::BTreeMap;

use mesh_actors::firmware::{FirmwareFailure, TargetStatus};
use mesh_actors::manifest::SignedManifest;
use mesh_actors::peers::PeerView;
use mesh_actors::sandbox::LogLine;
use mesh_actors::sandbox_supervisor::ModuleStatus;
use mesh_transport::{ContentId, PublicKey};
use serde::{Deserialize, Serialize};

/// Requests are small; a publish carries its content after the frame, not in it.
pub const REQUEST_BYTES_MAX: usize = 128 * 1024;
/// Responses list peers, modules or log lines, all bounded well below this.
pub const RESPONSE_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Log lines one request may ask for; the node keeps at most this many.
pub const LOG_LINES_MAX: usize = 1024;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Request {
    Status,
    Peers,
    Modules {
        all: bool,
    },
    Releases,
    /// The encoded [`SignedManifest`]; its content bytes follow the frame.
    Publish {
        manifest: Vec<u8>,
    },
    Logs {
        module: Option<String>,
        limit: u32,
    },
    /// Downloads in progress on the node.
    Transfers,
    /// Fetch a blob by hash from whichever peers have it (size learned from them).
    Fetch {
        id: ContentId,
    },
    /// Whether the node holds a blob, completely or in part.
    Blob {
        id: ContentId,
    },
    /// Store a blob the operator uploads (a firmware patch a release will name); its
    /// `size` bytes follow the frame and must hash to `id`.
    PutBlob {
        id: ContentId,
        size: u64,
    },
    /// The node's firmware targets (and, with `all`, those of its connected peers).
    Firmware {
        all: bool,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Response {
    Status(StatusInfo),
    Peers(Vec<PeerView>),
    Modules(ModulesInfo),
    Releases(Vec<ReleaseInfo>),
    Published(PublishInfo),
    Logs(Vec<LogLine>),
    Transfers(Vec<mesh_actors::fetch::TransferInfo>),
    /// A fetch started (or the blob was already here).
    Fetching {
        id: ContentId,
        size: u64,
        complete: bool,
    },
    Blob(BlobState),
    /// A blob was stored (or was already there).
    Stored {
        id: ContentId,
        size: u64,
    },
    Firmware(FirmwareInfo),
    /// The request failed; the text says what was being attempted and why.
    Error(String),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusInfo {
    pub node: PublicKey,
    pub peer_id: String,
    pub listen: Vec<String>,
    pub admin: String,
    pub labels: BTreeMap<String, String>,
    pub uptime_ms: u64,
    pub version: String,
    pub peers_alive: usize,
    pub peers_known: usize,
    pub modules_running: usize,
    pub releases: usize,
    pub blobs: usize,
    pub blob_bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeModules {
    pub node: Option<PublicKey>,
    pub labels: BTreeMap<String, String>,
    pub alive: bool,
    pub modules: Vec<ModuleStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModulesInfo {
    /// This node's modules, straight from its sandbox supervisor.
    pub local: NodeModules,
    /// Other nodes' modules as their last gossiped reports say (only with `--all`).
    pub mesh: Vec<NodeModules>,
    /// Releases that failed for good on this node or on peers that reported it, oldest
    /// first.
    pub failures: Vec<FailureInfo>,
}

/// A failed release and who reported it (a short node id).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FailureInfo {
    pub reporter: String,
    pub report: mesh_actors::sandbox_supervisor::FailureReport,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReleaseInfo {
    pub kind: String,
    pub name: String,
    pub version: u64,
    pub content: ContentId,
    pub size: u64,
    pub signers: Vec<PublicKey>,
}

impl From<&SignedManifest> for ReleaseInfo {
    fn from(s: &SignedManifest) -> Self {
        ReleaseInfo {
            kind: s.manifest.kind.to_string(),
            name: s.manifest.name.clone(),
            version: s.manifest.version,
            content: s.manifest.content,
            size: s.manifest.size,
            signers: s.signatures.iter().map(|x| x.signer).collect(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PublishInfo {
    pub name: String,
    pub version: u64,
    pub content: ContentId,
    pub size: u64,
    /// Peers connected to the node when it announced the release.
    pub peers: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BlobState {
    pub id: ContentId,
    pub complete: bool,
    pub size: Option<u64>,
    pub have_bytes: u64,
}

/// One node's firmware targets.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeFirmware {
    pub node: Option<PublicKey>,
    pub labels: BTreeMap<String, String>,
    /// `None` when the node did not answer (down, or too old to know the request).
    pub targets: Option<Vec<TargetStatus>>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FirmwareInfo {
    pub local: NodeFirmware,
    /// Connected peers, asked directly (only with `--all`).
    pub mesh: Vec<NodeFirmware>,
    /// Firmware failures reported by peers over gossip, oldest first (this node's own
    /// are in its targets' records).
    pub failures: Vec<FirmwareFailureInfo>,
}

/// A firmware failure and who reported it (a short node id).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FirmwareFailureInfo {
    pub reporter: String,
    pub report: FirmwareFailure,
}

/// Messages exchanged between nodes over the swarm's rpc protocol.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum PeerRequest {
    /// "Which releases do you have?", asked on every new connection so a node that was
    /// down or partitioned catches up on what it missed.
    Releases,
    /// "What do your firmware slots hold?", for `mesh firmware --all`.
    Firmware,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum PeerResponse {
    /// Encoded signed manifests; each is checked like a gossiped one.
    Releases(Vec<Vec<u8>>),
    Firmware(Vec<TargetStatus>),
}

/// Releases sent in one answer; more than this are found through gossip.
pub const PEER_RELEASES_MAX: usize = 256;
