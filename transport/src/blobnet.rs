//! The blob data plane: a quinn endpoint beside the libp2p swarm that carries blob
//! requests and their responses on QUIC streams of its own.
//!
//! Through libp2p, every blob request negotiates a new stream, passes through the swarm's
//! one driver task at both ends, and every arriving packet wakes the connection's task,
//! which polls the handlers of every protocol on it; libp2p-tls also puts
//! ChaCha20-Poly1305 first where the hardware has AES. Here one request is one
//! bidirectional quinn stream: the request and a finish, then the response and a finish.
//! Both ends authenticate with the node's ed25519 identity key (the certificates of the
//! admin endpoint), so the peer id of a data connection is the peer id on the swarm.
//!
//! The swarm learns where a peer's data endpoint is: identify carries its port, and the
//! peer's swarm connection gives its address. A peer whose data endpoint cannot be
//! reached (a firewall that passes only the swarm's port, say) is asked over the swarm's
//! blob protocol instead. Only the first handshake with a peer holds up requests; after
//! it failed, the endpoint is tried again in the background, ever less often (from
//! [`DATA_RETRY_MS_MIN`] to [`DATA_RETRY_MS_MAX`]), while requests keep going over the
//! swarm, so a firewalled fleet is not stalled by a handshake every retry. Inbound
//! requests reach the node as the same [`NetEvent::BlobRequested`] the swarm emits, so
//! serving has one path.
//!
//! A response is a head of five bytes (a kind and a length) and a body. Encoded groups
//! are the body as they are, handed to quinn without a copy and read back with one;
//! every other response is a bincode message. Framed as one bincode message, a
//! megabyte of groups was copied into the message and again into quinn at the sender,
//! and zeroed, copied and copied again at the receiver: about a sixth of a transfer's
//! CPU on loopback.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::VarInt;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::{debug, warn};

use crate::admin::{self, AdminTlsError, Identity};
use crate::bans::{self, SharedBans};
use crate::swarm::{
    BlobRequest, BlobResponse, NetEvent, Reply, RequestError, Responder, BLOB_RESPONSE_BYTES_MAX,
    INBOUND_PENDING_MAX, RESPONDER_MS_MAX,
};
use crate::{wire, PublicKey, SecretKey};

/// The ALPN protocol id of the data plane, checked on both sides. A node of another
/// version fails the handshake and is asked over the swarm instead.
pub const BLOB_ALPN: &[u8] = b"mesh-blob/2";
/// Peers served at once, one connection each; more are refused until one closes.
pub const DATA_CONNECTIONS_MAX: usize = 256;
/// Requests open at once on one connection: a download keeps at most a few in flight per
/// peer, plus its have-queries.
pub const DATA_STREAMS_MAX: u32 = 16;
/// A request names a blob and a range of groups: a few dozen bytes.
pub const DATA_REQUEST_BYTES_MAX: usize = 1024;
/// Peers whose data endpoint is remembered; the swarm forgets a peer when its last
/// connection closes, so this is reached only by a fleet larger than the limit.
pub const DATA_PEERS_MAX: usize = 4096;
/// How long a connection handshake may take before the peer counts as unreachable.
pub const DATA_CONNECT_MS_MAX: u64 = 5_000;
/// After a first failed connection the swarm's path is used to that peer for this long
/// before the data endpoint is tried again; each failure after that doubles the wait.
pub const DATA_RETRY_MS_MIN: u64 = 30_000;
/// The longest wait between tries of an unreachable data endpoint: a firewall seldom
/// opens by itself, and a peer that restarts is learned afresh anyway.
pub const DATA_RETRY_MS_MAX: u64 = 15 * 60_000;
/// How long a served peer may take to send its request once it opened the stream.
pub const DATA_REQUEST_READ_MS_MAX: u64 = 5_000;
/// A stream's receive window holds one whole response, so a server never stops
/// mid-response to wait for a window update.
const STREAM_WINDOW_BYTES: u32 = 2 * 1024 * 1024;
/// A connection's receive window holds the responses of a full pipeline of requests
/// with room to spare, as the stream windows above do one each.
const CONNECTION_WINDOW_BYTES: u32 = 16 * 1024 * 1024;

const CLOSE_REFUSED: VarInt = VarInt::from_u32(1);
const CLOSE_SHUTDOWN: VarInt = VarInt::from_u32(2);
const CLOSE_GONE: VarInt = VarInt::from_u32(3);
/// The name both sides put in and expect from the handshake; keys are what is checked.
const SERVER_NAME: &str = "mesh";
/// A response head: its kind (one of the two below) and its body's length (u32, LE).
const RESPONSE_HEAD_BYTES: usize = 5;
/// The body is a bincode [`BlobResponse`].
const RESPONSE_MESSAGE: u8 = 0;
/// The body is the bytes of a [`BlobResponse::Encoded`].
const RESPONSE_ENCODED: u8 = 1;

/// Errors from [`BlobNet::bind`].
#[derive(Debug, thiserror::Error)]
pub enum BlobNetBindError {
    #[error("binding the blob endpoint at {addr}: {source}")]
    Tls {
        addr: SocketAddr,
        source: AdminTlsError,
    },
    #[error("binding the blob endpoint at {addr}: {source}")]
    Socket {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Why a connection to a peer's data endpoint could not be made.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("building the tls configuration: {0}")]
    Tls(#[from] AdminTlsError),
    #[error("the peer id {0} embeds no ed25519 key")]
    NotEd25519(PeerId),
    #[error("{0}")]
    Endpoint(#[from] quinn::ConnectError),
    #[error("{0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("no handshake within {DATA_CONNECT_MS_MAX} ms")]
    Timeout,
    #[error("the peer did not agree on the blob protocol")]
    Protocol,
}

/// A cheap, cloneable handle to the node's data endpoint.
#[derive(Clone)]
pub struct BlobNet {
    inner: Arc<Inner>,
}

struct Inner {
    endpoint: quinn::Endpoint,
    identity: Identity,
    transport: Arc<quinn::TransportConfig>,
    request_timeout: Duration,
    peers: Mutex<HashMap<PeerId, Peer>>,
    /// The swarm driver's list: it bans and lifts, this endpoint refuses.
    banned: SharedBans,
    events: mpsc::Sender<NetEvent>,
    /// Inbound requests waiting for the node's answer, over all peers.
    inbound: Semaphore,
}

/// What is known of one peer's data endpoint.
struct Peer {
    addr: SocketAddr,
    /// Set after a failed connection: until then the swarm's path is used.
    unreachable_until: Option<Instant>,
    /// Failed connections in a row.
    failures: u32,
    /// A background try of the endpoint is under way.
    probing: bool,
    /// The connection, made by the first request that needs it.
    connection: Slot,
}

/// A peer's data connection, once made; the lock makes requests that start together
/// share one handshake.
type Slot = Arc<tokio::sync::Mutex<Option<quinn::Connection>>>;

impl BlobNet {
    /// Binds the data endpoint at `addr` (port 0 allowed) and serves requests from any
    /// authenticated peer that is not banned, handing them to the node through `events`.
    /// Must be called inside a tokio runtime.
    pub fn bind(
        addr: SocketAddr,
        key: &SecretKey,
        idle_timeout: Duration,
        request_timeout: Duration,
        events: mpsc::Sender<NetEvent>,
        banned: SharedBans,
    ) -> Result<BlobNet, BlobNetBindError> {
        let tls_error = |source| BlobNetBindError::Tls { addr, source };
        let identity = Identity::new(key).map_err(tls_error)?;
        let transport = Arc::new(transport_config(idle_timeout.max(request_timeout)));
        let server = server_config(key, transport.clone()).map_err(tls_error)?;
        let endpoint = quinn::Endpoint::server(server, addr)
            .map_err(|source| BlobNetBindError::Socket { addr, source })?;
        let inner = Arc::new(Inner {
            endpoint,
            identity,
            transport,
            request_timeout,
            peers: Mutex::new(HashMap::new()),
            banned,
            events,
            inbound: Semaphore::new(INBOUND_PENDING_MAX),
        });
        tokio::spawn(accept_loop(Arc::downgrade(&inner), inner.endpoint.clone()));
        Ok(BlobNet { inner })
    }

    /// The address the endpoint is bound to.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.inner.endpoint.local_addr().ok()
    }

    /// Where `peer`'s data endpoint is believed to be.
    #[cfg(test)]
    pub(crate) fn endpoint_of(&self, peer: &PeerId) -> Option<SocketAddr> {
        lock(&self.inner.peers).get(peer).map(|p| p.addr)
    }

    /// Records where `peer`'s data endpoint is. A new address replaces the old one and
    /// drops its connection (the peer restarted on another port).
    pub fn learn(&self, peer: PeerId, addr: SocketAddr) {
        let mut peers = lock(&self.inner.peers);
        if peers.get(&peer).is_some_and(|p| p.addr == addr) {
            return;
        }
        if !peers.contains_key(&peer) && peers.len() >= DATA_PEERS_MAX {
            debug!(%peer, "not remembering another data endpoint: {DATA_PEERS_MAX} known");
            return;
        }
        let old = peers.insert(
            peer,
            Peer {
                addr,
                unreachable_until: None,
                failures: 0,
                probing: false,
                connection: Arc::default(),
            },
        );
        drop(peers);
        if let Some(old) = old {
            close_later(old.connection, CLOSE_GONE, b"peer moved");
        }
    }

    /// Forgets `peer` and closes its connection, failing its requests at once: the swarm
    /// lost the peer (its data connection is likely dead too), or banned it.
    pub fn forget(&self, peer: &PeerId) {
        if let Some(old) = lock(&self.inner.peers).remove(peer) {
            close_later(old.connection, CLOSE_GONE, b"peer gone");
        }
    }

    /// Closes the endpoint and with it every data connection.
    pub fn close(&self) {
        self.inner
            .endpoint
            .close(CLOSE_SHUTDOWN, b"node shutting down");
    }

    /// Sends `request` to `peer` over its data endpoint. None when the data plane has no
    /// way to the peer (its endpoint is unknown, or failed to connect and has not been
    /// reached since); the caller then uses the swarm.
    pub async fn request(
        &self,
        peer: PeerId,
        request: &BlobRequest,
    ) -> Option<Result<BlobResponse, RequestError>> {
        let (addr, slot) = match self.inner.route(&peer) {
            Route::Data(addr, slot) => (addr, slot),
            Route::Swarm => return None,
            Route::Probe(addr, slot) => {
                tokio::spawn(probe(self.inner.clone(), peer, addr, slot));
                return None;
            }
        };
        let connection = {
            let mut held = slot.lock().await;
            match held.as_ref().filter(|c| c.close_reason().is_none()) {
                Some(c) => c.clone(),
                // Requests that waited for a connection that failed go to the swarm
                // too, rather than each waiting for a handshake of its own.
                None if !self.inner.is_open(&peer) => return None,
                None => self.inner.connect_into(&mut held, peer, addr).await?,
            }
        };
        let failed = |what: &str, e: &dyn std::fmt::Display| RequestError::Failed {
            peer,
            reason: format!("{what}: {e}"),
        };
        let exchange = async {
            let (mut send, mut recv) = connection
                .open_bi()
                .await
                .map_err(|e| failed("opening a blob stream", &e))?;
            let bytes = wire::encode(request).map_err(|e| failed("encoding the request", &e))?;
            send.write_all(&bytes)
                .await
                .map_err(|e| failed("sending the request", &e))?;
            send.finish()
                .map_err(|e| failed("finishing the request", &e))?;
            read_response(&mut recv)
                .await
                .map_err(|e| failed("reading the response", &e))
        };
        Some(
            match tokio::time::timeout(self.inner.request_timeout, exchange).await {
                Ok(result) => result,
                Err(_) => Err(RequestError::Failed {
                    peer,
                    reason: format!(
                        "no response within {} ms",
                        self.inner.request_timeout.as_millis()
                    ),
                }),
            },
        )
    }
}

/// Which way a request to a peer goes.
enum Route {
    /// Over its data endpoint, through this connection slot.
    Data(SocketAddr, Slot),
    /// Over the swarm: the endpoint is unknown, or failed and is not due to be tried.
    Swarm,
    /// Over the swarm, and the endpoint is due to be tried again in the background.
    Probe(SocketAddr, Slot),
}

/// How long the swarm's path is used after `failures` failed connections in a row
/// before the data endpoint is tried again.
fn retry_after(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    Duration::from_millis(
        DATA_RETRY_MS_MIN
            .saturating_mul(1 << doublings)
            .min(DATA_RETRY_MS_MAX),
    )
}

/// Tries `peer`'s data endpoint again without holding up any request, and leaves the
/// connection for the requests that follow.
async fn probe(inner: Arc<Inner>, peer: PeerId, addr: SocketAddr, slot: Slot) {
    let mut held = slot.lock().await;
    inner.connect_into(&mut held, peer, addr).await;
}

impl Inner {
    /// Which way a request to `peer` goes now; claims the background retry when one is
    /// due, so only one runs at a time.
    fn route(&self, peer: &PeerId) -> Route {
        let mut peers = lock(&self.peers);
        let Some(known) = peers.get_mut(peer) else {
            return Route::Swarm;
        };
        match known.unreachable_until {
            None => Route::Data(known.addr, known.connection.clone()),
            Some(until) if known.probing || Instant::now() < until => Route::Swarm,
            Some(_) => {
                known.probing = true;
                Route::Probe(known.addr, known.connection.clone())
            }
        }
    }

    /// Whether requests to `peer` may use its data endpoint now (it is known and did not
    /// fail since it was last reached). Unlike [`Inner::route`] it claims nothing.
    fn is_open(&self, peer: &PeerId) -> bool {
        lock(&self.peers)
            .get(peer)
            .is_some_and(|k| k.unreachable_until.is_none())
    }

    /// Records how a connection to `peer`'s endpoint at `addr` went: a success opens the
    /// data path, a failure closes it until the next retry is due.
    fn connected(&self, peer: &PeerId, addr: SocketAddr, ok: bool) {
        let mut peers = lock(&self.peers);
        // The peer may have been forgotten or moved meanwhile: that is a new start.
        let Some(known) = peers.get_mut(peer).filter(|k| k.addr == addr) else {
            return;
        };
        known.probing = false;
        if ok {
            known.failures = 0;
            known.unreachable_until = None;
        } else {
            known.failures = known.failures.saturating_add(1);
            known.unreachable_until = Some(Instant::now() + retry_after(known.failures));
        }
    }

    /// Connects to `peer`'s endpoint at `addr`, keeps the connection in `held` for the
    /// requests that follow, and records how it went. None when it failed.
    async fn connect_into(
        &self,
        held: &mut Option<quinn::Connection>,
        peer: PeerId,
        addr: SocketAddr,
    ) -> Option<quinn::Connection> {
        let result = self.connect(peer, addr).await;
        self.connected(&peer, addr, result.is_ok());
        match result {
            Ok(c) => {
                debug!(%peer, %addr, "data connection open");
                *held = Some(c.clone());
                Some(c)
            }
            Err(e) => {
                debug!(%peer, %addr, error = %e, "data endpoint unreachable; using the swarm");
                None
            }
        }
    }

    async fn connect(
        &self,
        peer: PeerId,
        addr: SocketAddr,
    ) -> Result<quinn::Connection, ConnectError> {
        let expected = PublicKey::from_peer_id(&peer).ok_or(ConnectError::NotEd25519(peer))?;
        let tls = admin::client_tls(&self.identity, Some(expected), Arc::default(), BLOB_ALPN)?;
        let crypto = QuicClientConfig::try_from(tls).map_err(AdminTlsError::from)?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(self.transport.clone());
        let connecting = self.endpoint.connect_with(config, addr, SERVER_NAME)?;
        let connection =
            tokio::time::timeout(Duration::from_millis(DATA_CONNECT_MS_MAX), connecting)
                .await
                .map_err(|_| ConnectError::Timeout)??;
        if admin::negotiated_alpn(&connection).as_deref() != Some(BLOB_ALPN) {
            connection.close(CLOSE_REFUSED, b"wrong application protocol");
            return Err(ConnectError::Protocol);
        }
        Ok(connection)
    }

    fn is_banned(&self, peer: &PeerId) -> bool {
        bans::lock(&self.banned).is_banned(peer, Instant::now())
    }

    /// Hands one request to the node and waits for its answer (and whoever waits to
    /// learn whether it was delivered); `Busy` when the node has too many waiting, its
    /// queue is full, or it does not answer in time.
    async fn answer(&self, peer: PeerId, request: BlobRequest) -> Reply<BlobResponse> {
        let busy = Reply {
            value: BlobResponse::Busy,
            delivered: None,
        };
        let Ok(_permit) = self.inbound.try_acquire() else {
            return busy;
        };
        let (tx, rx) = oneshot::channel();
        let event = NetEvent::BlobRequested {
            peer,
            request,
            reply: Responder(tx),
        };
        if self.events.try_send(event).is_err() {
            return busy;
        }
        match tokio::time::timeout(Duration::from_millis(RESPONDER_MS_MAX), rx).await {
            Ok(Ok(reply)) => reply,
            _ => busy,
        }
    }
}

/// The server side of the data plane: the node's certificate, the protocol's ALPN and
/// `transport`.
fn server_config(
    key: &SecretKey,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ServerConfig, AdminTlsError> {
    let tls = admin::server_tls(key, None, BLOB_ALPN)?;
    let crypto = QuicServerConfig::try_from(tls).map_err(AdminTlsError::from)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(transport);
    Ok(server)
}

/// A data connection carries no keep-alives: the swarm's connection to the same peer is
/// what notices a dead peer (and then closes this one, see [`BlobNet::forget`]), so a
/// data connection left idle simply closes after `idle_timeout` and the next request
/// opens another. Kept alive, every pair of nodes exchanged packets every two seconds
/// for nothing, which at 64 nodes was a large part of an idle fleet's CPU. Callers pass
/// an idle timeout no shorter than the request timeout, so a request never loses its
/// connection to idleness before it would have timed out anyway.
fn transport_config(idle_timeout: Duration) -> quinn::TransportConfig {
    let idle_ms = u32::try_from(idle_timeout.as_millis()).unwrap_or(u32::MAX);
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(VarInt::from_u32(idle_ms).into()))
        .keep_alive_interval(None)
        .max_concurrent_bidi_streams(VarInt::from_u32(DATA_STREAMS_MAX))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW_BYTES))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW_BYTES))
        .send_window(u64::from(CONNECTION_WINDOW_BYTES))
        // Responses go out one after another, in the order they were written, instead
        // of interleaved: the first one is complete (and verified by the requester,
        // which then asks again) while the next is still on the wire. Interleaved, all
        // of a peer's responses finished together and each end idled while the other
        // worked.
        .send_fairness(false);
    t
}

/// Closes a peer's connection without waiting for requests that are using its lock.
fn close_later(slot: Slot, code: VarInt, reason: &'static [u8]) {
    if let Ok(held) = slot.try_lock() {
        if let Some(c) = held.as_ref() {
            c.close(code, reason);
        }
        return;
    }
    // A request holds the lock while it connects; close what it makes once it is done.
    tokio::spawn(async move {
        if let Some(c) = slot.lock().await.as_ref() {
            c.close(code, reason);
        }
    });
}

/// Accepts connections until the endpoint closes or the handle is dropped.
async fn accept_loop(inner: std::sync::Weak<Inner>, endpoint: quinn::Endpoint) {
    let connections = Arc::new(Semaphore::new(DATA_CONNECTIONS_MAX));
    while let Some(incoming) = endpoint.accept().await {
        let Some(inner) = inner.upgrade() else {
            break;
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            warn!(remote = %incoming.remote_address(), "refused a data connection: {DATA_CONNECTIONS_MAX} already open");
            incoming.refuse();
            continue;
        };
        tokio::spawn(async move {
            let _permit = permit;
            serve_connection(inner, incoming).await;
        });
    }
    debug!("blob endpoint closed");
}

/// Authenticates one peer and serves its requests, each stream in a task of its own (at
/// most [`DATA_STREAMS_MAX`] at once, as the transport configuration allows).
async fn serve_connection(inner: Arc<Inner>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            debug!(%remote, error = %e, "refused a data connection");
            return;
        }
    };
    let connection =
        match tokio::time::timeout(Duration::from_millis(DATA_CONNECT_MS_MAX), connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                debug!(%remote, error = %e, "data connection handshake failed");
                return;
            }
            Err(_) => {
                debug!(%remote, "data connection handshake timed out");
                return;
            }
        };
    if admin::negotiated_alpn(&connection).as_deref() != Some(BLOB_ALPN) {
        connection.close(CLOSE_REFUSED, b"wrong application protocol");
        return;
    }
    let Some(peer) = admin::peer_key(&connection).and_then(|k| k.peer_id().ok()) else {
        connection.close(CLOSE_REFUSED, b"no ed25519 certificate");
        return;
    };
    if inner.is_banned(&peer) {
        debug!(%peer, "refusing a banned peer's data connection");
        connection.close(CLOSE_REFUSED, b"banned");
        return;
    }
    loop {
        let (send, recv) = match connection.accept_bi().await {
            Ok(streams) => streams,
            Err(e) => {
                debug!(%peer, error = %e, "data connection closed");
                return;
            }
        };
        // A ban made while the connection was open ends it at its next request.
        if inner.is_banned(&peer) {
            debug!(%peer, "closing a banned peer's data connection");
            connection.close(CLOSE_REFUSED, b"banned");
            return;
        }
        tokio::spawn(serve_stream(inner.clone(), peer, send, recv));
    }
}

async fn serve_stream(
    inner: Arc<Inner>,
    peer: PeerId,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let read = tokio::time::timeout(
        Duration::from_millis(DATA_REQUEST_READ_MS_MAX),
        recv.read_to_end(DATA_REQUEST_BYTES_MAX),
    )
    .await;
    let request = match read {
        Ok(Ok(bytes)) => match wire::decode::<BlobRequest>(&bytes, DATA_REQUEST_BYTES_MAX) {
            Ok(request) => request,
            Err(e) => {
                debug!(%peer, error = %e, "malformed blob request");
                let _ = send.reset(CLOSE_REFUSED);
                return;
            }
        },
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "reading a blob request failed");
            let _ = send.reset(CLOSE_REFUSED);
            return;
        }
        Err(_) => {
            debug!(%peer, "a blob request did not arrive in time");
            let _ = send.reset(CLOSE_REFUSED);
            return;
        }
    };
    let Reply {
        value: response,
        delivered,
    } = inner.answer(peer, request).await;
    let (kind, body) = match response {
        BlobResponse::Encoded(bytes) => (RESPONSE_ENCODED, bytes),
        other => match wire::encode(&other) {
            Ok(bytes) => (RESPONSE_MESSAGE, bytes),
            Err(e) => {
                warn!(%peer, error = %e, "encoding a blob response failed");
                let _ = send.reset(CLOSE_REFUSED);
                return;
            }
        },
    };
    let len = match u32::try_from(body.len()) {
        Ok(len) if body.len() <= BLOB_RESPONSE_BYTES_MAX => len,
        _ => {
            warn!(%peer, bytes = body.len(), "a blob response is over the limit of {BLOB_RESPONSE_BYTES_MAX} bytes");
            let _ = send.reset(CLOSE_REFUSED);
            return;
        }
    };
    let head = response_head(kind, len);
    // quinn keeps the chunks as they are and copies each only into its packets.
    let mut chunks = [
        bytes::Bytes::copy_from_slice(&head),
        bytes::Bytes::from(body),
    ];
    // A failed send means the peer has gone or given up on the request.
    let sent = send.write_all_chunks(&mut chunks).await.is_ok() && send.finish().is_ok();
    if let Some(mut tx) = delivered {
        // `stopped` yields `None` once the peer has acknowledged all of the stream. The
        // wait ends early when nobody listens any more (the node waits a bounded time),
        // so the stream is not held for nothing.
        let acknowledged = sent
            && tokio::select! {
                stopped = send.stopped() => matches!(stopped, Ok(None)),
                _ = tx.closed() => false,
            };
        let _ = tx.send(acknowledged);
    }
}

/// The head of a response whose body is `len` bytes of `kind`.
fn response_head(kind: u8, len: u32) -> [u8; RESPONSE_HEAD_BYTES] {
    let [a, b, c, d] = len.to_le_bytes();
    [kind, a, b, c, d]
}

/// Why a response could not be read from a data stream.
#[derive(Debug, thiserror::Error)]
enum ResponseError {
    #[error("reading its head: {0}")]
    Head(#[from] quinn::ReadExactError),
    #[error("reading its body: {0}")]
    Body(#[from] quinn::ReadError),
    #[error("a body of {len} bytes is over the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("the stream ended after {got} of {len} bytes of the body")]
    Short { got: usize, len: usize },
    #[error("bytes after the body")]
    Trailing,
    #[error("unknown response kind {0}")]
    Kind(u8),
    #[error("decoding its body: {0}")]
    Decode(#[from] wire::WireError),
}

/// Reads one response (a head and a body) and the end of the stream after it. The body
/// of encoded groups is copied once, from quinn's packets into one buffer.
async fn read_response(recv: &mut quinn::RecvStream) -> Result<BlobResponse, ResponseError> {
    let mut head = [0u8; RESPONSE_HEAD_BYTES];
    recv.read_exact(&mut head).await?;
    let [kind, a, b, c, d] = head;
    let len = u32::from_le_bytes([a, b, c, d]) as usize;
    if len > BLOB_RESPONSE_BYTES_MAX {
        return Err(ResponseError::TooLarge {
            len,
            max: BLOB_RESPONSE_BYTES_MAX,
        });
    }
    if kind != RESPONSE_MESSAGE && kind != RESPONSE_ENCODED {
        return Err(ResponseError::Kind(kind));
    }
    let mut body = Vec::with_capacity(len);
    while body.len() < len {
        match recv.read_chunk(len - body.len(), true).await? {
            Some(chunk) => body.extend_from_slice(&chunk.bytes),
            None => {
                return Err(ResponseError::Short {
                    got: body.len(),
                    len,
                })
            }
        }
    }
    if recv.read_chunk(1, true).await?.is_some() {
        return Err(ResponseError::Trailing);
    }
    if kind == RESPONSE_ENCODED {
        return Ok(BlobResponse::Encoded(body));
    }
    Ok(wire::decode::<BlobResponse>(
        &body,
        BLOB_RESPONSE_BYTES_MAX,
    )?)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ContentId;

    const LOCALHOST: &str = "127.0.0.1:0";
    const TIMEOUT: Duration = Duration::from_secs(10);

    struct Node {
        net: BlobNet,
        peer: PeerId,
        events: mpsc::Receiver<NetEvent>,
    }

    fn node(seed: u8) -> Node {
        node_at(seed, LOCALHOST.parse().unwrap())
    }

    /// Node `seed` with its data endpoint bound at `addr`.
    fn node_at(seed: u8, addr: SocketAddr) -> Node {
        let key = SecretKey::from_seed([seed; 32]);
        let (tx, events) = mpsc::channel(16);
        let net = BlobNet::bind(
            addr,
            &key,
            Duration::from_secs(6),
            TIMEOUT,
            tx,
            SharedBans::default(),
        )
        .unwrap();
        Node {
            net,
            peer: key.public().peer_id().unwrap(),
            events,
        }
    }

    fn groups(start: u64, end: u64) -> BlobRequest {
        BlobRequest::Groups {
            id: ContentId::of(b"blob"),
            start,
            end,
        }
    }

    /// Answers every request with the range it asked for, as bytes, until dropped.
    fn serve(mut events: mpsc::Receiver<NetEvent>, from: PeerId) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if let NetEvent::BlobRequested {
                    peer,
                    request,
                    reply,
                } = event
                {
                    assert_eq!(peer, from, "the server names the authenticated peer");
                    match request {
                        BlobRequest::Groups { start, end, .. } => {
                            reply.send(BlobResponse::Encoded(vec![7; (end - start) as usize]))
                        }
                        BlobRequest::Have { .. } => drop(reply),
                    }
                }
            }
        })
    }

    /// Node `seed`, which knows the data endpoint of node `seed + 1`; that one serves
    /// it until the returned task is dropped.
    fn pair(seed: u8) -> Pair {
        let a = node(seed);
        let b = node(seed + 1);
        let server = serve(b.events, a.peer);
        a.net.learn(b.peer, b.net.local_addr().unwrap());
        Pair {
            a: a.net,
            a_peer: a.peer,
            b: b.net,
            b_peer: b.peer,
            _server: server,
        }
    }

    struct Pair {
        a: BlobNet,
        a_peer: PeerId,
        b: BlobNet,
        b_peer: PeerId,
        _server: tokio::task::JoinHandle<()>,
    }

    #[tokio::test]
    async fn requests_reach_the_peer_and_name_the_requester() {
        // The pair is kept whole: dropping its server side would close the endpoint.
        let p = pair(1);
        let (a, b_peer) = (&p.a, p.b_peer);
        // Several requests at once share one connection and each gets its own answer.
        let answers = futures::future::join_all((1..=8u64).map(|n| {
            let net = a.clone();
            async move { net.request(b_peer, &groups(0, n * 1000)).await }
        }))
        .await;
        for (n, answer) in (1..=8usize).zip(answers) {
            let answer = answer.expect("a known endpoint is used").unwrap();
            assert_eq!(answer, BlobResponse::Encoded(vec![7; n * 1000]));
        }
        // A request the node leaves unanswered is answered busy, not left to time out.
        let have = BlobRequest::Have {
            id: ContentId::of(b"blob"),
        };
        let answer = a.request(b_peer, &have).await.unwrap().unwrap();
        assert_eq!(answer, BlobResponse::Busy);
    }

    #[tokio::test]
    async fn a_tracked_answer_reports_whether_the_peer_acknowledged_it() {
        let a = node(31);
        let mut b = node(32);
        a.net.learn(b.peer, b.net.local_addr().unwrap());
        // Answered while the requester waits: the server hears it was acknowledged.
        let net = a.net.clone();
        let b_peer = b.peer;
        let asked = tokio::spawn(async move { net.request(b_peer, &groups(0, 100_000)).await });
        let Some(NetEvent::BlobRequested { reply, .. }) = b.events.recv().await else {
            panic!("the request reaches the server");
        };
        let fate = reply.send_tracked(BlobResponse::Encoded(vec![7; 100_000]));
        let answer = asked.await.unwrap().unwrap().unwrap();
        assert_eq!(answer, BlobResponse::Encoded(vec![7; 100_000]));
        let fate = tokio::time::timeout(Duration::from_secs(10), fate).await;
        assert_eq!(fate.unwrap(), Ok(true));
        // The requester gives up before the answer: the server hears it was not.
        let net = a.net.clone();
        let asked = tokio::spawn(async move { net.request(b_peer, &groups(0, 10)).await });
        let Some(NetEvent::BlobRequested { reply, .. }) = b.events.recv().await else {
            panic!("the request reaches the server");
        };
        asked.abort();
        let _ = asked.await;
        let fate = reply.send_tracked(BlobResponse::Encoded(vec![7; 1_000_000]));
        let fate = tokio::time::timeout(Duration::from_secs(10), fate).await;
        assert_eq!(fate.unwrap(), Ok(false));
    }

    #[tokio::test]
    async fn an_unknown_or_unreachable_endpoint_leaves_the_request_to_the_swarm() {
        let a = node(3);
        let b = node(4);
        assert!(a.net.request(b.peer, &groups(0, 1)).await.is_none());
        // Nothing listens here: the handshake times out and the peer is marked unreachable.
        let dead = {
            let socket = std::net::UdpSocket::bind(LOCALHOST).unwrap();
            socket.local_addr().unwrap()
        };
        a.net.learn(b.peer, dead);
        // Requests that start together wait for one handshake, not one each.
        let started = Instant::now();
        let request = groups(0, 1);
        let answers =
            futures::future::join_all((0..3).map(|_| a.net.request(b.peer, &request))).await;
        assert!(answers.iter().all(Option::is_none));
        assert!(started.elapsed() >= Duration::from_millis(DATA_CONNECT_MS_MAX / 2));
        assert!(started.elapsed() < Duration::from_millis(DATA_CONNECT_MS_MAX * 2));
        // Asked again at once, it does not wait for another handshake.
        let started = Instant::now();
        assert!(a.net.request(b.peer, &groups(0, 1)).await.is_none());
        assert!(started.elapsed() < Duration::from_millis(DATA_CONNECT_MS_MAX / 2));

        // The endpoint comes up at that address (its firewall opened) and the retry is
        // due: the request that finds it due goes to the swarm at once, and the retry in
        // the background opens the data path for the requests after it.
        let up = node_at(4, dead);
        let _server = serve(up.events, a.peer);
        {
            let mut peers = lock(&a.net.inner.peers);
            let known = peers.get_mut(&b.peer).unwrap();
            assert_eq!(known.failures, 1);
            known.unreachable_until = Some(Instant::now());
        }
        let started = Instant::now();
        assert!(a.net.request(b.peer, &groups(0, 1)).await.is_none());
        assert!(started.elapsed() < Duration::from_millis(DATA_CONNECT_MS_MAX / 2));
        let deadline = Instant::now() + Duration::from_millis(DATA_CONNECT_MS_MAX);
        loop {
            let started = Instant::now();
            let answer = a.net.request(b.peer, &groups(0, 3)).await;
            assert!(started.elapsed() < Duration::from_millis(DATA_CONNECT_MS_MAX / 2));
            if let Some(answer) = answer {
                assert_eq!(answer.unwrap(), BlobResponse::Encoded(vec![7; 3]));
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the retry never opened the data path"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(up.net);
    }

    #[test]
    fn retries_of_an_unreachable_endpoint_grow_to_a_limit() {
        assert_eq!(retry_after(1), Duration::from_millis(DATA_RETRY_MS_MIN));
        assert_eq!(retry_after(2), Duration::from_millis(2 * DATA_RETRY_MS_MIN));
        assert_eq!(retry_after(3), Duration::from_millis(4 * DATA_RETRY_MS_MIN));
        for failures in [6, 40, u32::MAX] {
            assert_eq!(
                retry_after(failures),
                Duration::from_millis(DATA_RETRY_MS_MAX)
            );
        }
        let waits: Vec<Duration> = (1..64).map(retry_after).collect();
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
    }

    #[tokio::test]
    async fn an_endpoint_with_another_key_is_not_trusted() {
        let a = node(5);
        let b = node(6);
        let impostor = node(7);
        let _server = serve(impostor.events, a.peer);
        // b's address is claimed by a node with another key: the handshake fails, and
        // the request is left to the swarm, which authenticates b itself.
        a.net.learn(b.peer, impostor.net.local_addr().unwrap());
        assert!(a.net.request(b.peer, &groups(0, 1)).await.is_none());
    }

    #[tokio::test]
    async fn a_banned_peer_is_refused() {
        let Pair {
            a,
            a_peer,
            b,
            b_peer,
            ..
        } = pair(8);
        assert!(a.request(b_peer, &groups(0, 1)).await.unwrap().is_ok());
        // As the swarm driver bans a peer that sent bad data.
        bans::lock(&b.inner.banned).insert(a_peer, Instant::now() + Duration::from_secs(60));
        // The ban ends the open connection at its next request, and a new connection
        // is refused.
        for _ in 0..2 {
            let answer = a.request(b_peer, &groups(0, 1)).await;
            assert!(
                !matches!(answer, Some(Ok(_))),
                "a banned peer was served: {answer:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_malformed_request_resets_its_stream_and_nothing_else() {
        let p = pair(10);
        let (a, b_peer) = (&p.a, p.b_peer);
        assert!(a.request(b_peer, &groups(0, 1)).await.unwrap().is_ok());
        let slot = lock(&a.inner.peers)[&b_peer].connection.clone();
        let connection = slot.lock().await.clone().unwrap();
        let (mut send, mut recv) = connection.open_bi().await.unwrap();
        send.write_all(&[0xff; 64]).await.unwrap();
        send.finish().unwrap();
        let read = tokio::time::timeout(TIMEOUT, recv.read_to_end(1024))
            .await
            .unwrap();
        assert!(read.is_err(), "garbage got an answer: {read:?}");
        // An oversized request is refused the same way.
        let (mut send, mut recv) = connection.open_bi().await.unwrap();
        send.write_all(&vec![0; DATA_REQUEST_BYTES_MAX + 1])
            .await
            .unwrap();
        send.finish().unwrap();
        let read = tokio::time::timeout(TIMEOUT, recv.read_to_end(1024))
            .await
            .unwrap();
        assert!(
            read.is_err(),
            "an oversized request got an answer: {read:?}"
        );
        // The connection still serves well-formed requests.
        let answer = a.request(b_peer, &groups(0, 5)).await.unwrap().unwrap();
        assert_eq!(answer, BlobResponse::Encoded(vec![7; 5]));
    }

    fn head(kind: u8, len: u32) -> Vec<u8> {
        response_head(kind, len).to_vec()
    }

    #[tokio::test]
    async fn malformed_responses_fail_their_request_and_well_formed_ones_decode() {
        // A hand-made server that speaks the protocol's handshake and answers each
        // request with the next of these byte strings.
        let busy = wire::encode(&BlobResponse::Busy).unwrap();
        let cases: Vec<(Vec<u8>, Option<BlobResponse>, &str)> = vec![
            (
                [head(1, 3), b"abc".to_vec()].concat(),
                Some(BlobResponse::Encoded(b"abc".to_vec())),
                "",
            ),
            (
                [head(0, busy.len() as u32), busy].concat(),
                Some(BlobResponse::Busy),
                "",
            ),
            (head(9, 0), None, "unknown response kind 9"),
            (
                head(1, BLOB_RESPONSE_BYTES_MAX as u32 + 1),
                None,
                "over the limit",
            ),
            (
                [head(1, 10), b"abcd".to_vec()].concat(),
                None,
                "ended after 4 of 10",
            ),
            (
                [head(1, 2), b"abc".to_vec()].concat(),
                None,
                "bytes after the body",
            ),
            (
                [head(0, 3), vec![0xff; 3]].concat(),
                None,
                "decoding its body",
            ),
            (vec![1, 0], None, "reading its head"),
        ];
        let key = SecretKey::from_seed([40; 32]);
        let transport = Arc::new(transport_config(Duration::from_secs(6)));
        let config = server_config(&key, transport).unwrap();
        let endpoint = quinn::Endpoint::server(config, LOCALHOST.parse().unwrap()).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let answers: Vec<Vec<u8>> = cases.iter().map(|c| c.0.clone()).collect();
        let server = tokio::spawn(async move {
            let connection = endpoint.accept().await.unwrap().await.unwrap();
            for answer in answers {
                let (mut send, mut recv) = connection.accept_bi().await.unwrap();
                recv.read_to_end(DATA_REQUEST_BYTES_MAX).await.unwrap();
                send.write_all(&answer).await.unwrap();
                send.finish().unwrap();
            }
            // Kept open until the client has read the last answer.
            connection.closed().await;
        });
        let a = node(41);
        let peer = key.public().peer_id().unwrap();
        a.net.learn(peer, addr);
        for (bytes, want, error) in cases {
            let got = a.net.request(peer, &groups(0, 1)).await.unwrap();
            match want {
                Some(want) => assert_eq!(got.unwrap(), want, "answer {bytes:?}"),
                None => {
                    let e = got
                        .expect_err("a malformed answer was accepted")
                        .to_string();
                    assert!(
                        e.contains("reading the response") && e.contains(error),
                        "answer {bytes:?}: {e}"
                    );
                }
            }
        }
        a.net.close();
        server.await.unwrap();
    }
}
