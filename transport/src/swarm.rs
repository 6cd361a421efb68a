//! The libp2p swarm of a node: QUIC transport, gossipsub, identify, kad, ping, and two
//! request-response protocols (blob ranges and opaque rpc), driven by one task.
//!
//! The driver owns the `libp2p::Swarm`. Everything else talks to it through a
//! [`SwarmHandle`] (a bounded command queue) and receives [`NetEvent`]s from a bounded
//! event queue. Inbound requests carry a [`Responder`]; the node answers through it and
//! the driver sends the answer on the right stream. When the event queue is full an
//! inbound request is answered `Busy` at once rather than queued without bound.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, FutureExt, StreamExt};
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{
    connection_limits, gossipsub, identify, kad, ping, Multiaddr, PeerId, StreamProtocol,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::bans::{self, SharedBans};
use crate::blobnet::BlobNet;
use crate::gossip;
use crate::redial::{Redial, RedialPolicy};
use crate::rediscover::Rediscover;
use crate::{wire, ContentId, SecretKey};

/// Commands waiting for the driver; callers wait (async) when it is full.
pub const COMMANDS_QUEUE_MAX: usize = 1024;
/// Events waiting for the node; the driver drops gossip and refuses requests when full.
pub const EVENTS_QUEUE_MAX: usize = 4096;
/// A gossip message carries at most a manifest or a node report, both far smaller.
pub const GOSSIP_BYTES_MAX: usize = 256 * 1024;
/// One response carries at most 1 MiB of blob data plus its proof (parent hashes), so
/// one response never holds much memory.
pub const BLOB_RESPONSE_BYTES_MAX: usize = 1024 * 1024 + 128 * 1024;
/// Runs of held ranges listed in one have-answer; a peer holding a more fragmented
/// blob lists its first runs.
pub const HAVE_RUNS_MAX: usize = 1024;
/// Rpc requests and responses carry release lists and small queries.
pub const RPC_BYTES_MAX: usize = 1024 * 1024;
/// A request the node has not answered by then is answered `Busy`.
pub const RESPONDER_MS_MAX: u64 = 10_000;
/// Inbound requests being answered at once, over all peers.
pub const INBOUND_PENDING_MAX: usize = 256;
/// Concurrent request streams per connection and protocol.
pub const STREAMS_PER_CONNECTION_MAX: usize = 64;

/// How long a closing node waits for its connections to close, so its peers hear of it
/// at once instead of after their idle timeout; a dead link costs no more than this.
pub const CLOSE_WAIT_MS_MAX: u64 = 500;
/// Peers connected to this node at their initiative, at once: a node keeps a gossip mesh
/// of a dozen peers and a kad routing table of a few dozen, so this leaves a large fleet
/// room while a flood of dialers cannot exhaust the node's memory or sockets.
pub const SWARM_CONNECTIONS_IN_MAX: u32 = 256;
/// Inbound handshakes in progress at once; a handshake costs a signature check.
pub const SWARM_PENDING_IN_MAX: u32 = 64;
/// Connections with one peer at once: both ends dialing together make two, and a peer
/// that restarted has its new connection beside the old one until that times out.
pub const SWARM_CONNECTIONS_PER_PEER_MAX: u32 = 4;

const BLOB_PROTOCOL: &str = "/mesh/blob/1";
const RPC_PROTOCOL: &str = "/mesh/rpc/1";
const KAD_PROTOCOL: &str = "/mesh/kad/1";
const IDENTIFY_PROTOCOL: &str = "/mesh/id/1";

/// How a node's swarm is set up.
#[derive(Clone, Debug)]
pub struct SwarmConfig {
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    /// Sent in identify so peers can show what software a node runs.
    pub agent_version: String,
    /// How often each peer's round-trip time is measured (shown by `mesh peers`). Liveness
    /// does not depend on it: QUIC keep-alives and `idle_timeout` notice a dead peer.
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    /// A QUIC connection with no traffic for this long is declared dead. QUIC keep-alives
    /// keep live connections busy, so this is how fast a kill -9 is noticed.
    pub idle_timeout: Duration,
    pub request_timeout: Duration,
    pub topics: Vec<String>,
    pub redial: RedialPolicy,
    /// The UDP port of the blob data endpoint (see [`crate::blobnet`]), on the address
    /// of the first listen address; 0 picks a free one. Peers learn it through identify.
    pub blob_port: u16,
    /// Peers that may be connected to this node at their initiative at once; further
    /// dialers are refused until one leaves.
    pub connections_in_max: u32,
}

impl Default for SwarmConfig {
    fn default() -> Self {
        SwarmConfig {
            listen: vec!["/ip4/0.0.0.0/udp/7400/quic-v1"
                .parse()
                .expect("static address")],
            bootstrap: Vec::new(),
            agent_version: format!("mesh/{}", env!("CARGO_PKG_VERSION")),
            // Every ping is a round trip with each peer; at 2 s, 32 idle nodes spent a
            // sixth of a core on pings alone.
            ping_interval: Duration::from_secs(15),
            ping_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(6),
            request_timeout: Duration::from_secs(20),
            topics: Vec::new(),
            redial: RedialPolicy::default(),
            blob_port: 0,
            connections_in_max: SWARM_CONNECTIONS_IN_MAX,
        }
    }
}

/// A request about one blob. The transport carries these; what a "group" is and how
/// the answer is verified is decided by the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobRequest {
    /// Chunk groups `start..end` of blob `id`, encoded with their proof.
    Groups { id: ContentId, start: u64, end: u64 },
    /// Which groups of `id` the peer holds.
    Have { id: ContentId },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobResponse {
    /// Bulk data: a byte string on the wire, so it decodes in one copy.
    Encoded(#[serde(with = "crate::wire::bytes")] Vec<u8>),
    /// The blob's size and the runs of groups held (`start..end`).
    Have {
        size: u64,
        ranges: Vec<(u64, u64)>,
    },
    NotFound,
    /// The server is at its limit; ask again later or elsewhere.
    Busy,
    Invalid(String),
    /// The server sent most of these groups to other peers moments ago, which now
    /// serve them; these runs of groups (`start..end`) are what it would send instead.
    Elsewhere {
        fresh: Vec<(u64, u64)>,
    },
}

/// Things the driver tells the node.
#[derive(Debug)]
pub enum NetEvent {
    Listening {
        addr: Multiaddr,
    },
    PeerConnected {
        peer: PeerId,
        addr: Multiaddr,
    },
    PeerDisconnected {
        peer: PeerId,
    },
    PeerRtt {
        peer: PeerId,
        rtt: Duration,
    },
    PeerIdentified {
        peer: PeerId,
        agent: String,
        listen_addrs: Vec<Multiaddr>,
    },
    Gossip {
        /// The peer that relayed the message to us.
        via: PeerId,
        /// The node that wrote and signed it (see [`crate::gossip`]).
        author: PeerId,
        topic: String,
        data: Vec<u8>,
    },
    /// A peer relayed a gossip message whose envelope did not check out. Every node
    /// checks before it relays, so the peer either forged it or relays unchecked.
    GossipRefused {
        via: PeerId,
        topic: String,
        reason: String,
    },
    BlobRequested {
        peer: PeerId,
        request: BlobRequest,
        reply: Responder<BlobResponse>,
    },
    RpcRequested {
        peer: PeerId,
        request: Vec<u8>,
        reply: Responder<Vec<u8>>,
    },
}

/// The way to answer one inbound request. Dropping it unanswered answers `Busy` (for
/// ranges) or an empty response (for rpc), so a peer never waits for a timeout.
#[derive(Debug)]
pub struct Responder<T>(pub(crate) oneshot::Sender<Reply<T>>);

/// An answer as the transport receives it, with whoever waits to learn its fate.
#[derive(Debug)]
pub(crate) struct Reply<T> {
    pub(crate) value: T,
    pub(crate) delivered: Option<oneshot::Sender<bool>>,
}

impl<T> Responder<T> {
    pub fn send(self, value: T) {
        let _ = self.0.send(Reply {
            value,
            delivered: None,
        });
    }

    /// Answers with `value` and says what became of it: `Ok(true)` once the peer has
    /// acknowledged every byte of it, `Ok(false)` if it could not be delivered (the peer
    /// went away or gave up on the request). Where acknowledgements cannot be seen (the
    /// swarm's request-response path) the sender is dropped as soon as the transport
    /// takes the answer, before it is sent, and the receiver sees `Err`: the fate is
    /// unknown.
    pub fn send_tracked(self, value: T) -> oneshot::Receiver<bool> {
        let (tx, rx) = oneshot::channel();
        let _ = self.0.send(Reply {
            value,
            delivered: Some(tx),
        });
        rx
    }
}

/// What a node's swarm looks like right now.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SwarmInfo {
    pub peer_id: String,
    pub listen_addrs: Vec<String>,
    pub connected: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SwarmStartError {
    #[error("starting the swarm: {0}")]
    Build(String),
    #[error("listening on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    #[error("starting the swarm: {0}")]
    Blobs(#[from] crate::blobnet::BlobNetBindError),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum RequestError {
    #[error("the swarm has stopped")]
    Stopped,
    #[error("request to {peer} failed: {reason}")]
    Failed { peer: PeerId, reason: String },
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    #[error("the swarm has stopped")]
    Stopped,
    #[error("publishing to topic {topic}: {reason}")]
    Gossip { topic: String, reason: String },
}

enum Command {
    Dial(Multiaddr),
    /// Publishes bytes as they are, without an envelope: how a test plays a forger.
    #[cfg(test)]
    PublishRaw {
        topic: String,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<(), PublishError>>,
    },
    Publish {
        topic: String,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<(), PublishError>>,
    },
    Blob {
        peer: PeerId,
        request: BlobRequest,
        reply: oneshot::Sender<Result<BlobResponse, RequestError>>,
    },
    Penalize {
        peer: PeerId,
        ban: Duration,
        reason: String,
    },
    Rpc {
        peer: PeerId,
        request: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>, RequestError>>,
    },
    Info(oneshot::Sender<SwarmInfo>),
    Close(oneshot::Sender<()>),
}

/// A cheap, cloneable handle to the driver.
#[derive(Clone)]
pub struct SwarmHandle {
    commands: mpsc::Sender<Command>,
    local_peer: PeerId,
    blobs: BlobNet,
}

impl SwarmHandle {
    pub fn local_peer(&self) -> PeerId {
        self.local_peer
    }

    pub async fn dial(&self, addr: Multiaddr) {
        let _ = self.commands.send(Command::Dial(addr)).await;
    }

    /// Closes every connection and stops the driver, waiting at most
    /// [`CLOSE_WAIT_MS_MAX`]. A peer that hears the close drops the connection at once;
    /// one that does not keeps it until its idle timeout, and a restarted node with the
    /// same identity would then be a second connection (see `Run`).
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Close(tx)).await.is_ok() {
            let wait = Duration::from_millis(CLOSE_WAIT_MS_MAX + 250);
            let _ = tokio::time::timeout(wait, rx).await;
        }
    }

    pub async fn publish(&self, topic: &str, data: Vec<u8>) -> Result<(), PublishError> {
        self.send_publish(|reply| Command::Publish {
            topic: topic.to_string(),
            data,
            reply,
        })
        .await
    }

    /// Publishes `data` without sealing it; see [`Command::PublishRaw`].
    #[cfg(test)]
    async fn publish_raw(&self, topic: &str, data: Vec<u8>) -> Result<(), PublishError> {
        self.send_publish(|reply| Command::PublishRaw {
            topic: topic.to_string(),
            data,
            reply,
        })
        .await
    }

    async fn send_publish(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<(), PublishError>>) -> Command,
    ) -> Result<(), PublishError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(command(tx))
            .await
            .map_err(|_| PublishError::Stopped)?;
        rx.await.map_err(|_| PublishError::Stopped)?
    }

    /// Disconnects a peer that misbehaved (sent data that failed verification) and
    /// refuses it for `ban`; gossipsub stops relaying its messages too.
    pub async fn penalize(&self, peer: PeerId, ban: Duration, reason: String) {
        self.blobs.forget(&peer);
        let _ = self
            .commands
            .send(Command::Penalize { peer, ban, reason })
            .await;
    }

    /// Asks `peer` about a blob: over its data endpoint when one is known and
    /// reachable, else through the swarm's blob protocol.
    pub async fn request_blob(
        &self,
        peer: PeerId,
        request: BlobRequest,
    ) -> Result<BlobResponse, RequestError> {
        if let Some(result) = self.blobs.request(peer, &request).await {
            return result;
        }
        let (tx, rx) = oneshot::channel();
        let cmd = Command::Blob {
            peer,
            request,
            reply: tx,
        };
        self.commands
            .send(cmd)
            .await
            .map_err(|_| RequestError::Stopped)?;
        rx.await.map_err(|_| RequestError::Stopped)?
    }

    pub async fn rpc(&self, peer: PeerId, request: Vec<u8>) -> Result<Vec<u8>, RequestError> {
        let (tx, rx) = oneshot::channel();
        let cmd = Command::Rpc {
            peer,
            request,
            reply: tx,
        };
        self.commands
            .send(cmd)
            .await
            .map_err(|_| RequestError::Stopped)?;
        rx.await.map_err(|_| RequestError::Stopped)?
    }

    pub async fn info(&self) -> Option<SwarmInfo> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Info(tx)).await.ok()?;
        rx.await.ok()
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    limits: connection_limits::Behaviour,
    gossipsub: gossipsub::Behaviour,
    identify: identify::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    ping: ping::Behaviour,
    blob: request_response::Behaviour<FrameCodec<BlobRequest, BlobResponse>>,
    rpc: request_response::Behaviour<FrameCodec<Vec<u8>, Vec<u8>>>,
}

/// Starts the swarm and its driver task. Returns once the listeners are bound.
pub async fn spawn(
    key: &SecretKey,
    config: SwarmConfig,
) -> Result<(SwarmHandle, mpsc::Receiver<NetEvent>), SwarmStartError> {
    let keypair = key.to_libp2p();
    let local_peer = keypair.public().to_peer_id();
    let idle_ms = u32::try_from(config.idle_timeout.as_millis()).unwrap_or(u32::MAX);
    let cfg = config.clone();
    let boot: u64 = rand::random();
    let (ev_tx, ev_rx) = mpsc::channel(EVENTS_QUEUE_MAX);
    let banned = SharedBans::default();
    let blobs = BlobNet::bind(
        blob_bind_addr(&config.listen, config.blob_port),
        key,
        config.idle_timeout,
        config.request_timeout,
        ev_tx.clone(),
        banned.clone(),
    )?;
    let blob_port = blobs.local_addr().map_or(0, |a| a.port());
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_quic_config(move |mut q| {
            q.max_idle_timeout = idle_ms;
            q.keep_alive_interval = Duration::from_millis(u64::from(idle_ms / 3).max(100));
            q
        })
        .with_behaviour(|key| build_behaviour(key, &cfg, boot, blob_port))
        .map_err(|e| SwarmStartError::Build(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
        .build();

    for topic in &config.topics {
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&gossipsub::IdentTopic::new(topic))
            .map_err(|e| SwarmStartError::Build(format!("subscribing to {topic}: {e}")))?;
    }
    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| SwarmStartError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
    }
    // Wait for the listeners so callers can print and share real addresses.
    let mut listening = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while listening.len() < config.listen.len() {
        let event = tokio::time::timeout_at(deadline, swarm.select_next_some())
            .await
            .map_err(|_| SwarmStartError::Listen {
                addr: config.listen[listening.len()].clone(),
                reason: "no listen address within 10 s".into(),
            })?;
        match event {
            SwarmEvent::NewListenAddr { address, .. } => listening.push(address),
            SwarmEvent::ListenerError { error, .. }
            | SwarmEvent::ListenerClosed {
                reason: Err(error), ..
            } => {
                return Err(SwarmStartError::Listen {
                    addr: config.listen[listening.len()].clone(),
                    reason: error.to_string(),
                })
            }
            _ => {}
        }
    }

    let (cmd_tx, cmd_rx) = mpsc::channel(COMMANDS_QUEUE_MAX);
    for addr in listening {
        let _ = ev_tx.try_send(NetEvent::Listening { addr });
    }
    let mut redial = Redial::new(config.redial.clone());
    let now = Instant::now();
    for addr in &config.bootstrap {
        redial.add_bootstrap(addr.clone(), now);
    }
    let driver = Driver {
        swarm,
        commands: cmd_rx,
        events: ev_tx,
        redial,
        pending_blobs: HashMap::new(),
        banned,
        runs: HashMap::new(),
        closing: None,
        pending_rpcs: HashMap::new(),
        inbound: FuturesUnordered::new(),
        kad_bootstrapped: false,
        rediscover: Rediscover::default(),
        signer: key.duplicate(),
        gossip_seq: rand::random(),
        blobs: blobs.clone(),
    };
    tokio::spawn(driver.run());
    Ok((
        SwarmHandle {
            commands: cmd_tx,
            local_peer,
            blobs,
        },
        ev_rx,
    ))
}

fn build_behaviour(
    key: &libp2p::identity::Keypair,
    config: &SwarmConfig,
    boot: u64,
    blob_port: u16,
) -> Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
    let peer = key.public().to_peer_id();
    // Authorship is our envelope's (see `gossip`), checked once per message after
    // duplicates are dropped; gossipsub relays a message only once the driver has.
    // The heartbeat is libp2p's default, and a publisher sends to its mesh only, not
    // to every subscribed peer as well: in a fleet where every node is connected to
    // every other, both multiplied the control traffic of an idle node by its peers.
    let gossip_cfg = gossipsub::ConfigBuilder::default()
        .heartbeat_interval(Duration::from_millis(1000))
        .flood_publish(false)
        .validation_mode(gossipsub::ValidationMode::Anonymous)
        .validate_messages()
        .message_id_fn(|m: &gossipsub::Message| {
            gossipsub::MessageId::new(&gossip::message_id(m.topic.as_str(), &m.data))
        })
        .max_transmit_size(GOSSIP_BYTES_MAX)
        .build()?;
    let gossipsub =
        gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Anonymous, gossip_cfg)?;
    let identify = identify::Behaviour::new(
        identify::Config::new(identify_version(boot, blob_port), key.public())
            .with_agent_version(config.agent_version.clone()),
    );
    let mut kad_cfg = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
    kad_cfg.set_query_timeout(Duration::from_secs(30));
    // The driver decides when kad looks for nodes again (see `rediscover`): often while
    // the mesh changes, rarely once it has settled; kad's fixed period is off.
    kad_cfg.set_periodic_bootstrap_interval(None);
    let mut kad = kad::Behaviour::with_config(peer, kad::store::MemoryStore::new(peer), kad_cfg);
    // Edge nodes often see only private or loopback addresses, which never become
    // "confirmed external", so kad would stay a client; every node serves the DHT.
    kad.set_mode(Some(kad::Mode::Server));
    let ping = ping::Behaviour::new(
        ping::Config::new()
            .with_interval(config.ping_interval)
            .with_timeout(config.ping_timeout),
    );
    let rr_cfg = request_response::Config::default()
        .with_request_timeout(config.request_timeout)
        .with_max_concurrent_streams(STREAMS_PER_CONNECTION_MAX);
    let blob = request_response::Behaviour::with_codec(
        FrameCodec::new(1024, BLOB_RESPONSE_BYTES_MAX),
        [(StreamProtocol::new(BLOB_PROTOCOL), ProtocolSupport::Full)],
        rr_cfg.clone(),
    );
    let rpc = request_response::Behaviour::with_codec(
        FrameCodec::new(RPC_BYTES_MAX, RPC_BYTES_MAX),
        [(StreamProtocol::new(RPC_PROTOCOL), ProtocolSupport::Full)],
        rr_cfg,
    );
    let limits = connection_limits::Behaviour::new(
        connection_limits::ConnectionLimits::default()
            .with_max_established_incoming(Some(config.connections_in_max))
            .with_max_pending_incoming(Some(SWARM_PENDING_IN_MAX))
            .with_max_established_per_peer(Some(SWARM_CONNECTIONS_PER_PEER_MAX)),
    );
    Ok(Behaviour {
        limits,
        gossipsub,
        identify,
        kad,
        ping,
        blob,
        rpc,
    })
}

/// Identify's protocol version: ours, with the random id of this process's run and the
/// port of its blob data endpoint.
fn identify_version(boot: u64, blob_port: u16) -> String {
    format!("{IDENTIFY_PROTOCOL} boot={boot:016x} blob={blob_port}")
}

/// The value of `key` in a peer's identify protocol version, if it is ours and has one.
fn version_field<'a>(version: &'a str, key: &str) -> Option<&'a str> {
    version
        .strip_prefix(IDENTIFY_PROTOCOL)?
        .split(' ')
        .find_map(|field| field.strip_prefix(key)?.strip_prefix('='))
}

/// The run id in a peer's identify protocol version, if it sent one.
fn boot_of(version: &str) -> Option<u64> {
    u64::from_str_radix(version_field(version, "boot")?, 16).ok()
}

/// The port of a peer's blob data endpoint, if it sent one (0 means none).
fn blob_port_of(version: &str) -> Option<u16> {
    version_field(version, "blob")?
        .parse()
        .ok()
        .filter(|p| *p != 0)
}

/// Where the blob data endpoint binds: the host of the first IP listen address (any
/// address when there is none), at `port`.
fn blob_bind_addr(listen: &[Multiaddr], port: u16) -> SocketAddr {
    let ip = listen
        .iter()
        .find_map(ip_of)
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    SocketAddr::new(ip, port)
}

/// The IP address in a multiaddr, if it has one.
fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        libp2p::multiaddr::Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

/// One peer's run of connections, from its first connection until its last closes.
///
/// Gossipsub tells a peer our subscriptions only on the first connection of a run. A
/// node restarted with the same identity while we still hold its old process's
/// connection joins the old run, so it never learns them and cannot publish to us. The
/// run therefore remembers which process its first connection reached (identify carries
/// a random id per process); a connection from another process ends the run, and the
/// redial starts a fresh one.
struct Run {
    first: ConnectionId,
    /// The process behind `first`, once identify said.
    boot: Option<u64>,
    /// The peer's address as `first` reached it: where its blob data endpoint is too.
    ip: Option<IpAddr>,
}

type InboundReply = (Option<InboundAnswer>, InboundChannel);

enum InboundAnswer {
    Blob(BlobResponse),
    Rpc(Vec<u8>),
}

enum InboundChannel {
    Blob(ResponseChannel<BlobResponse>),
    Rpc(ResponseChannel<Vec<u8>>),
}

struct Driver {
    swarm: libp2p::Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<NetEvent>,
    redial: Redial,
    pending_blobs: HashMap<OutboundRequestId, oneshot::Sender<Result<BlobResponse, RequestError>>>,
    /// Shared with the data endpoint, which refuses the same peers.
    banned: SharedBans,
    /// Each connected peer's current run of connections; removed when the last closes.
    runs: HashMap<PeerId, Run>,
    /// Set once the node asked to close: whom to tell, and when to stop waiting.
    closing: Option<(oneshot::Sender<()>, Instant)>,
    pending_rpcs: HashMap<OutboundRequestId, oneshot::Sender<Result<Vec<u8>, RequestError>>>,
    inbound: FuturesUnordered<BoxFuture<'static, InboundReply>>,
    kad_bootstrapped: bool,
    rediscover: Rediscover,
    /// Signs this node's gossip envelopes.
    signer: SecretKey,
    /// The last sequence number sealed; it starts at random so that a restarted node's
    /// messages never repeat an id its peers still hold as seen.
    gossip_seq: u64,
    blobs: BlobNet,
}

impl Driver {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    // Every handle is gone: the node is shutting down.
                    None => break,
                },
                Some((answer, channel)) = self.inbound.next(), if !self.inbound.is_empty() => {
                    self.answer(answer, channel);
                }
                _ = tick.tick() => self.on_tick(),
            }
            if let Some((_, until)) = &self.closing {
                if self.swarm.connected_peers().next().is_none() || Instant::now() >= *until {
                    if let Some((reply, _)) = self.closing.take() {
                        let _ = reply.send(());
                    }
                    break;
                }
            }
        }
        // The data endpoint's connections would otherwise outlive the swarm: their
        // keep-alives hold them open, and their tasks hold the endpoint.
        self.blobs.close();
        tracing::debug!("swarm driver stopped");
    }

    /// Lets gossipsub relay a peer's messages again once its ban is lifted.
    fn unblacklist(&mut self, peer: PeerId) {
        self.swarm
            .behaviour_mut()
            .gossipsub
            .remove_blacklisted_peer(&peer);
    }

    fn is_banned(&self, peer: &PeerId) -> bool {
        bans::lock(&self.banned).is_banned(peer, Instant::now())
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        let expired = bans::lock(&self.banned).lift_expired(now);
        for p in expired {
            tracing::info!(%p, "ban lifted");
            self.unblacklist(p);
        }
        if self.closing.is_some() {
            return;
        }
        for addr in self.redial.poll_due(now) {
            tracing::debug!(%addr, "dialing");
            if let Err(e) = self.swarm.dial(addr.clone()) {
                tracing::debug!(%addr, error = %e, "dial refused");
            }
        }
        if self.rediscover.poll_due(now) {
            // Fails only with an empty routing table, which the next connection fills.
            let _ = self.swarm.behaviour_mut().kad.bootstrap();
        }
    }

    /// Opens a message gossipsub has not seen before, tells gossipsub whether to relay
    /// it, and hands what opened to the node.
    fn on_gossip(&mut self, via: PeerId, id: gossipsub::MessageId, message: gossipsub::Message) {
        let topic = message.topic.into_string();
        let opened = gossip::open(&topic, &message.data, GOSSIP_BYTES_MAX)
            .map_err(|e| e.to_string())
            .and_then(|o| match o.author.peer_id() {
                Ok(author) => Ok((author, o.data)),
                Err(e) => Err(format!("reading the author of a gossip envelope: {e}")),
            });
        let verdict = match opened {
            Ok((author, data)) => {
                self.emit(NetEvent::Gossip {
                    via,
                    author,
                    topic,
                    data,
                });
                gossipsub::MessageAcceptance::Accept
            }
            Err(reason) => {
                tracing::debug!(%via, %topic, "refused a gossip message: {reason}");
                self.emit(NetEvent::GossipRefused { via, topic, reason });
                gossipsub::MessageAcceptance::Reject
            }
        };
        // False only when the message already left the cache, which is nothing to act on.
        let _ = self
            .swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(&id, &via, verdict);
    }

    fn emit(&mut self, event: NetEvent) {
        if let Err(mpsc::error::TrySendError::Full(e)) = self.events.try_send(event) {
            tracing::warn!(event = ?std::mem::discriminant(&e), "node event queue full, dropping event");
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Dial(addr) => {
                self.redial.add_bootstrap(addr, Instant::now());
                self.on_tick();
            }
            Command::Publish { topic, data, reply } => {
                self.gossip_seq = self.gossip_seq.wrapping_add(1);
                let result = gossip::seal(&self.signer, &topic, self.gossip_seq, data)
                    .map_err(|e| e.to_string())
                    .and_then(|sealed| {
                        self.swarm
                            .behaviour_mut()
                            .gossipsub
                            .publish(gossipsub::IdentTopic::new(&topic), sealed)
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                    })
                    .map_err(|reason| PublishError::Gossip { topic, reason });
                let _ = reply.send(result);
            }
            #[cfg(test)]
            Command::PublishRaw { topic, data, reply } => {
                let result = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(gossipsub::IdentTopic::new(&topic), data)
                    .map(|_| ())
                    .map_err(|e| PublishError::Gossip {
                        topic,
                        reason: e.to_string(),
                    });
                let _ = reply.send(result);
            }
            Command::Blob {
                peer,
                request,
                reply,
            } => {
                let id = self.swarm.behaviour_mut().blob.send_request(&peer, request);
                self.pending_blobs.insert(id, reply);
            }
            Command::Penalize { peer, ban, reason } => {
                tracing::warn!(%peer, ?ban, "penalizing peer: {reason}");
                let lifted = bans::lock(&self.banned).insert(peer, Instant::now() + ban);
                if let Some(oldest) = lifted {
                    self.unblacklist(oldest);
                }
                self.swarm.behaviour_mut().gossipsub.blacklist_peer(&peer);
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            Command::Rpc {
                peer,
                request,
                reply,
            } => {
                let id = self.swarm.behaviour_mut().rpc.send_request(&peer, request);
                self.pending_rpcs.insert(id, reply);
            }
            Command::Close(reply) => {
                let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
                for p in peers {
                    let _ = self.swarm.disconnect_peer_id(p);
                }
                let until = Instant::now() + Duration::from_millis(CLOSE_WAIT_MS_MAX);
                self.closing = Some((reply, until));
            }
            Command::Info(reply) => {
                let info = SwarmInfo {
                    peer_id: self.swarm.local_peer_id().to_string(),
                    listen_addrs: self.swarm.listeners().map(|a| a.to_string()).collect(),
                    connected: self
                        .swarm
                        .connected_peers()
                        .map(|p| p.to_string())
                        .collect(),
                };
                let _ = reply.send(info);
            }
        }
    }

    fn answer(&mut self, answer: Option<InboundAnswer>, channel: InboundChannel) {
        // A failed send means the peer has gone or timed out; nothing more to do.
        match (answer, channel) {
            (Some(InboundAnswer::Blob(r)), InboundChannel::Blob(ch)) => {
                let _ = self.swarm.behaviour_mut().blob.send_response(ch, r);
            }
            (None, InboundChannel::Blob(ch)) => {
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .blob
                    .send_response(ch, BlobResponse::Busy);
            }
            (Some(InboundAnswer::Rpc(r)), InboundChannel::Rpc(ch)) => {
                let _ = self.swarm.behaviour_mut().rpc.send_response(ch, r);
            }
            (None, InboundChannel::Rpc(ch)) => {
                let _ = self.swarm.behaviour_mut().rpc.send_response(ch, Vec::new());
            }
            _ => unreachable!("answers are paired with channels of their own protocol"),
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        let now = Instant::now();
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                self.emit(NetEvent::Listening { addr: address })
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                let addr = endpoint.get_remote_address().clone();
                if self.is_banned(&peer_id) {
                    tracing::debug!(peer = %peer_id, "refusing a banned peer");
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                if self.closing.is_some() {
                    self.swarm.close_connection(connection_id);
                    return;
                }
                self.runs.entry(peer_id).or_insert(Run {
                    first: connection_id,
                    boot: None,
                    ip: ip_of(&addr),
                });
                self.redial.on_connected(peer_id, &addr, now);
                if endpoint.is_dialer() {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer_id, addr.clone());
                }
                if num_established.get() == 1 {
                    self.emit(NetEvent::PeerConnected {
                        peer: peer_id,
                        addr,
                    });
                }
                if num_established.get() == 1 {
                    self.rediscover.on_connected(now);
                }
                if !self.kad_bootstrapped {
                    // The first connection gives kad someone to ask for the rest of the mesh.
                    self.kad_bootstrapped = self.swarm.behaviour_mut().kad.bootstrap().is_ok();
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                cause,
                ..
            } => {
                self.redial.on_disconnected(peer_id, num_established, now);
                if num_established == 0 {
                    self.runs.remove(&peer_id);
                    self.blobs.forget(&peer_id);
                    tracing::debug!(peer = %peer_id, cause = ?cause, "peer disconnected");
                    self.emit(NetEvent::PeerDisconnected { peer: peer_id });
                }
            }
            SwarmEvent::Behaviour(ev) => self.on_behaviour_event(ev, now),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent, now: Instant) {
        match event {
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => self.on_gossip(propagation_source, message_id, message),
            BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                connection_id,
                info,
            }) => {
                if self.restarted(peer_id, connection_id, boot_of(&info.protocol_version)) {
                    tracing::info!(peer = %peer_id, "peer restarted while its old connection lingered; connecting afresh");
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                let ip = self.runs.get(&peer_id).and_then(|r| r.ip);
                if let (Some(ip), Some(port)) = (ip, blob_port_of(&info.protocol_version)) {
                    self.blobs.learn(peer_id, SocketAddr::new(ip, port));
                }
                // Only routable-looking addresses are kept; a peer cannot make us dial
                // more than DIAL_TARGETS_MAX addresses (the redial table is bounded).
                let addrs: Vec<Multiaddr> = info
                    .listen_addrs
                    .iter()
                    .filter(|a| is_quic(a))
                    .take(8)
                    .cloned()
                    .collect();
                for a in &addrs {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer_id, a.clone());
                }
                self.redial.learn(peer_id, &addrs, now);
                self.emit(NetEvent::PeerIdentified {
                    peer: peer_id,
                    agent: info.agent_version,
                    listen_addrs: addrs,
                });
            }
            BehaviourEvent::Kad(kad::Event::RoutingUpdated {
                peer, addresses, ..
            }) => {
                // Discovery: dial what kad learns so the gossip mesh covers the fleet.
                let addrs: Vec<Multiaddr> = addresses
                    .iter()
                    .filter(|a| is_quic(a))
                    .take(8)
                    .cloned()
                    .collect();
                self.redial.learn(peer, &addrs, now);
                if !self.swarm.is_connected(&peer) {
                    for a in addrs {
                        let _ = self.swarm.dial(a);
                    }
                }
            }
            BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            }) => self.emit(NetEvent::PeerRtt { peer, rtt }),
            BehaviourEvent::Blob(ev) => self.on_blob_event(ev),
            BehaviourEvent::Rpc(ev) => self.on_rpc_event(ev),
            _ => {}
        }
    }

    /// Whether `connection` reached another process of `peer` than the first connection
    /// of the run did (see [`Run`]). Without both ids there is nothing to compare; a
    /// second connection of the same process (both sides dialing at once) is no restart.
    fn restarted(&mut self, peer: PeerId, connection: ConnectionId, boot: Option<u64>) -> bool {
        let Some(run) = self.runs.get_mut(&peer) else {
            return false;
        };
        if run.first == connection {
            run.boot = boot;
            return false;
        }
        matches!((run.boot, boot), (Some(a), Some(b)) if a != b)
    }

    fn on_blob_event(&mut self, ev: request_response::Event<BlobRequest, BlobResponse>) {
        let Some((peer, request, channel)) = split_event(ev, &mut self.pending_blobs) else {
            return;
        };
        let (tx, rx) = oneshot::channel();
        let admitted = !self.is_banned(&peer)
            && self.admit_inbound()
            && self
                .events
                .try_send(NetEvent::BlobRequested {
                    peer,
                    request,
                    reply: Responder(tx),
                })
                .is_ok();
        if !admitted {
            let _ = self
                .swarm
                .behaviour_mut()
                .blob
                .send_response(channel, BlobResponse::Busy);
            return;
        }
        self.inbound.push(wait_answer(
            rx,
            InboundAnswer::Blob,
            InboundChannel::Blob(channel),
        ));
    }

    fn on_rpc_event(&mut self, ev: request_response::Event<Vec<u8>, Vec<u8>>) {
        let Some((peer, request, channel)) = split_event(ev, &mut self.pending_rpcs) else {
            return;
        };
        let (tx, rx) = oneshot::channel();
        let admitted = self.admit_inbound()
            && self
                .events
                .try_send(NetEvent::RpcRequested {
                    peer,
                    request,
                    reply: Responder(tx),
                })
                .is_ok();
        if !admitted {
            let _ = self
                .swarm
                .behaviour_mut()
                .rpc
                .send_response(channel, Vec::new());
            return;
        }
        self.inbound.push(wait_answer(
            rx,
            InboundAnswer::Rpc,
            InboundChannel::Rpc(channel),
        ));
    }

    fn admit_inbound(&self) -> bool {
        self.inbound.len() < INBOUND_PENDING_MAX
    }
}

/// Completes outbound requests of one request-response protocol and returns an inbound
/// request, if the event is one, for the caller to admit or refuse.
fn split_event<Req, Resp>(
    ev: request_response::Event<Req, Resp>,
    pending: &mut HashMap<OutboundRequestId, oneshot::Sender<Result<Resp, RequestError>>>,
) -> Option<(PeerId, Req, ResponseChannel<Resp>)> {
    match ev {
        request_response::Event::Message { peer, message, .. } => match message {
            request_response::Message::Request {
                request, channel, ..
            } => Some((peer, request, channel)),
            request_response::Message::Response {
                request_id,
                response,
            } => {
                if let Some(tx) = pending.remove(&request_id) {
                    let _ = tx.send(Ok(response));
                }
                None
            }
        },
        request_response::Event::OutboundFailure {
            peer,
            request_id,
            error,
            ..
        } => {
            if let Some(tx) = pending.remove(&request_id) {
                let _ = tx.send(Err(RequestError::Failed {
                    peer,
                    reason: error.to_string(),
                }));
            }
            None
        }
        _ => None,
    }
}

fn wait_answer<T: Send + 'static>(
    rx: oneshot::Receiver<Reply<T>>,
    wrap: fn(T) -> InboundAnswer,
    channel: InboundChannel,
) -> BoxFuture<'static, InboundReply> {
    async move {
        // libp2p's request-response does not say when the peer acknowledged a response,
        // so a tracked answer's fate stays unknown here (see `Responder::send_tracked`).
        let answer = tokio::time::timeout(Duration::from_millis(RESPONDER_MS_MAX), rx)
            .await
            .ok()
            .and_then(|r| r.ok())
            .map(|reply| wrap(reply.value));
        (answer, channel)
    }
    .boxed()
}

fn is_quic(addr: &Multiaddr) -> bool {
    addr.iter()
        .any(|p| matches!(p, libp2p::multiaddr::Protocol::QuicV1))
}

/// Length-prefixed bincode frames with separate limits for requests and responses.
struct FrameCodec<Req, Resp> {
    request_bytes_max: usize,
    response_bytes_max: usize,
    _types: std::marker::PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> FrameCodec<Req, Resp> {
    fn new(request_bytes_max: usize, response_bytes_max: usize) -> Self {
        FrameCodec {
            request_bytes_max,
            response_bytes_max,
            _types: std::marker::PhantomData,
        }
    }
}

impl<Req, Resp> Clone for FrameCodec<Req, Resp> {
    fn clone(&self) -> Self {
        FrameCodec::new(self.request_bytes_max, self.response_bytes_max)
    }
}

async fn read_limited<T, V>(io: &mut T, max: usize) -> std::io::Result<V>
where
    T: AsyncRead + Unpin + Send,
    V: DeserializeOwned,
{
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is over the limit of {max}"),
        ));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    wire::decode(&buf, max).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

async fn write_limited<T, V>(io: &mut T, value: &V, max: usize) -> std::io::Result<()>
where
    T: AsyncWrite + Unpin + Send,
    V: Serialize,
{
    let bytes =
        wire::encode(value).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    if bytes.len() > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {} bytes is over the limit of {max}", bytes.len()),
        ));
    }
    io.write_all(&(bytes.len() as u32).to_le_bytes()).await?;
    io.write_all(&bytes).await?;
    io.close().await
}

impl<Req, Resp> request_response::Codec for FrameCodec<Req, Resp>
where
    Req: Serialize + DeserializeOwned + Send + Sync + 'static,
    Resp: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    type Protocol = StreamProtocol;
    type Request = Req;
    type Response = Resp;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<Req>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_limited(io, self.request_bytes_max).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<Resp>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_limited(io, self.response_bytes_max).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Req,
    ) -> std::io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_limited(io, &req, self.request_bytes_max).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Resp,
    ) -> std::io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_limited(io, &res, self.response_bytes_max).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local_config(bootstrap: Vec<Multiaddr>) -> SwarmConfig {
        SwarmConfig {
            listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()],
            bootstrap,
            topics: vec!["t".into()],
            ..SwarmConfig::default()
        }
    }

    /// Publishes with `publish` until it succeeds: gossip needs the peer's subscription
    /// to have arrived, so the first tries may find nobody to send to.
    async fn publish_once_heard<F, Fut>(mut publish: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), PublishError>>,
    {
        for _ in 0..50 {
            if publish().await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("publish never found a subscribed peer");
    }

    async fn first_listen(rx: &mut mpsc::Receiver<NetEvent>) -> Multiaddr {
        loop {
            if let Some(NetEvent::Listening { addr }) = rx.recv().await {
                return addr;
            }
        }
    }

    async fn wait_for<F: FnMut(&NetEvent) -> bool>(
        rx: &mut mpsc::Receiver<NetEvent>,
        mut f: F,
    ) -> NetEvent {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                // Events the test is not waiting for are dropped; a dropped
                // responder answers its request at once, so no peer hangs.
                let ev = rx.recv().await.expect("driver alive");
                if f(&ev) {
                    return ev;
                }
            }
        })
        .await
        .expect("event within 20 s")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dialers_past_the_inbound_limit_are_refused_until_one_leaves() {
        let ka = SecretKey::from_seed([31; 32]);
        let kb = SecretKey::from_seed([32; 32]);
        let kc = SecretKey::from_seed([33; 32]);
        let config = SwarmConfig {
            connections_in_max: 1,
            ..local_config(vec![])
        };
        let (ha, mut ea) = spawn(&ka, config).await.unwrap();
        let addr_a = first_listen(&mut ea).await;
        let (hb, mut eb) = spawn(&kb, local_config(vec![addr_a.clone()]))
            .await
            .unwrap();
        wait_for(&mut eb, |e| matches!(e, NetEvent::PeerConnected { .. })).await;
        let (hc, ec) = spawn(&kc, local_config(vec![addr_a])).await.unwrap();
        let c = kc.public().peer_id().unwrap();
        // The events of C are not looked at; they are drained so its queue stays open.
        let drain = tokio::spawn(async move {
            let mut ec = ec;
            while ec.recv().await.is_some() {}
        });
        // A's one inbound place is taken: C's dials, and its redials, are refused at A
        // (C may see its side of the connection open before A closes it).
        let refused = tokio::time::timeout(Duration::from_secs(3), async {
            loop {
                match ea.recv().await {
                    Some(NetEvent::PeerConnected { peer, .. }) if peer == c => return,
                    Some(_) => {}
                    None => std::future::pending::<()>().await,
                }
            }
        })
        .await;
        assert!(refused.is_err(), "a dialer past the limit was let in");
        // B leaves; C's next redial gets its place.
        hb.close().await;
        drop(eb);
        wait_for(
            &mut ea,
            |e| matches!(e, NetEvent::PeerConnected { peer, .. } if *peer == c),
        )
        .await;
        drain.abort();
        hc.close().await;
        ha.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forged_or_unsealed_gossip_is_refused_and_blames_the_relay() {
        let ka = SecretKey::from_seed([1; 32]);
        let kb = SecretKey::from_seed([2; 32]);
        let (ha, mut ea) = spawn(&ka, local_config(vec![])).await.unwrap();
        let addr_a = first_listen(&mut ea).await;
        let (hb, _eb) = spawn(&kb, local_config(vec![addr_a])).await.unwrap();
        wait_for(&mut ea, |e| matches!(e, NetEvent::PeerConnected { .. })).await;
        let b = hb.local_peer();
        // An envelope signed by a third key for another topic, then bytes with no
        // envelope at all, then an honest message.
        let moved = gossip::seal(&SecretKey::from_seed([3; 32]), "u", 1, b"x".to_vec()).unwrap();
        publish_once_heard(|| hb.publish_raw("t", moved.clone())).await;
        hb.publish_raw("t", b"no envelope".to_vec()).await.unwrap();
        hb.publish("t", b"honest".to_vec()).await.unwrap();
        let mut refused = 0;
        loop {
            match wait_for(&mut ea, |e| {
                matches!(e, NetEvent::Gossip { .. } | NetEvent::GossipRefused { .. })
            })
            .await
            {
                NetEvent::GossipRefused { via, topic, reason } => {
                    assert_eq!((via, topic.as_str()), (b, "t"));
                    assert!(reason.contains("gossip envelope"), "{reason}");
                    refused += 1;
                }
                NetEvent::Gossip { author, data, .. } => {
                    assert_eq!((author, data.as_slice()), (b, &b"honest"[..]));
                    break;
                }
                _ => unreachable!(),
            }
        }
        assert_eq!(
            refused, 2,
            "both bad messages are refused before the honest one"
        );
        hb.close().await;
        ha.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_nodes_connect_gossip_and_serve_ranges() {
        let ka = SecretKey::from_seed([1; 32]);
        let kb = SecretKey::from_seed([2; 32]);
        let (ha, mut ea) = spawn(&ka, local_config(vec![])).await.unwrap();
        let addr_a = first_listen(&mut ea).await;
        let (hb, mut eb) = spawn(&kb, local_config(vec![addr_a])).await.unwrap();
        wait_for(&mut eb, |e| matches!(e, NetEvent::PeerConnected { .. })).await;
        wait_for(&mut ea, |e| matches!(e, NetEvent::PeerConnected { .. })).await;

        publish_once_heard(|| hb.publish("t", b"hello".to_vec())).await;
        let ev = wait_for(&mut ea, |e| matches!(e, NetEvent::Gossip { .. })).await;
        match ev {
            NetEvent::Gossip { data, author, .. } => {
                assert_eq!(data, b"hello");
                assert_eq!(author, hb.local_peer());
            }
            _ => unreachable!(),
        }

        // A blob request answered by the node layer: first over a's data endpoint,
        // which b learns through identify, then over the swarm's blob protocol.
        let peer_a = ha.local_peer();
        let id = ContentId::of(b"blob");
        let endpoint_a = ha.blobs.local_addr();
        for _ in 0..100 {
            if hb.blobs.endpoint_of(&peer_a).is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(hb.blobs.endpoint_of(&peer_a), endpoint_a);
        for path in ["data endpoint", "swarm"] {
            if path == "swarm" {
                hb.blobs.forget(&peer_a);
            }
            blob_round_trip(&hb, &mut ea, peer_a, id).await;
        }

        // Rpc round trip.
        let rpc = tokio::spawn({
            let hb = hb.clone();
            async move { hb.rpc(peer_a, b"ping".to_vec()).await }
        });
        loop {
            match ea.recv().await.unwrap() {
                NetEvent::RpcRequested { request, reply, .. } => {
                    assert_eq!(request, b"ping");
                    reply.send(b"pong".to_vec());
                    break;
                }
                _ => continue,
            }
        }
        assert_eq!(rpc.await.unwrap().unwrap(), b"pong");
        let info = hb.info().await.unwrap();
        assert_eq!(info.connected, vec![peer_a.to_string()]);

        // A penalized peer is disconnected, and its redials are refused while banned.
        hb.penalize(peer_a, Duration::from_secs(60), "test".into())
            .await;
        wait_for(&mut eb, |e| matches!(e, NetEvent::PeerDisconnected { .. })).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            hb.info().await.unwrap().connected.is_empty(),
            "banned peer reconnected"
        );
    }

    async fn blob_round_trip(
        hb: &SwarmHandle,
        ea: &mut mpsc::Receiver<NetEvent>,
        peer_a: PeerId,
        id: ContentId,
    ) {
        let req = tokio::spawn({
            let hb = hb.clone();
            async move {
                hb.request_blob(
                    peer_a,
                    BlobRequest::Groups {
                        id,
                        start: 1,
                        end: 2,
                    },
                )
                .await
            }
        });
        loop {
            match ea.recv().await.unwrap() {
                NetEvent::BlobRequested { request, reply, .. } => {
                    assert_eq!(
                        request,
                        BlobRequest::Groups {
                            id,
                            start: 1,
                            end: 2
                        }
                    );
                    reply.send(BlobResponse::Encoded(b"lo".to_vec()));
                    break;
                }
                _ => continue,
            }
        }
        let resp = req.await.unwrap().unwrap();
        assert_eq!(resp, BlobResponse::Encoded(b"lo".to_vec()));
    }

    #[test]
    fn identify_carries_the_run_and_the_data_port() {
        let v = identify_version(0xabc, 7401);
        assert_eq!(boot_of(&v), Some(0xabc));
        assert_eq!(blob_port_of(&v), Some(7401));
        // A peer without a data endpoint, or another protocol's version, gives none.
        assert_eq!(blob_port_of(&identify_version(1, 0)), None);
        assert_eq!(blob_port_of("/other/1 blob=7401"), None);
        assert_eq!(blob_port_of(&format!("{IDENTIFY_PROTOCOL} boot=1")), None);
        assert_eq!(
            blob_port_of(&format!("{IDENTIFY_PROTOCOL} blob=99999")),
            None
        );
        assert_eq!(
            blob_bind_addr(&["/ip4/10.0.0.2/udp/7400/quic-v1".parse().unwrap()], 0),
            "10.0.0.2:0".parse().unwrap()
        );
        assert_eq!(blob_bind_addr(&[], 9), "0.0.0.0:9".parse().unwrap());
    }
}
