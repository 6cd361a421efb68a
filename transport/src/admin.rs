//! The operator admin endpoint: QUIC (quinn, not libp2p) with mutual ed25519 authentication.
//!
//! Both sides present a self-signed X.509 certificate whose key IS their ed25519 identity
//! key. The node accepts only operator keys on a fixed allowlist; the CLI checks the node's
//! key when it was told which key to expect. Certificates are deliberately not checked for
//! validity dates, names or issuers: the key is the identity, and possession of the private
//! key is proven by the TLS 1.3 CertificateVerify signature, which is always checked.
//!
//! After the TLS handshake the node sends one short "admitted" message on a unidirectional
//! stream. In TLS 1.3 the client finishes its side of the handshake before the server has
//! judged the client certificate, so without this message `AdminClient::connect` would
//! report success to an operator the node is about to refuse. Waiting for the admission
//! turns a refusal into a clear connect error.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, TransportErrorCode, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{AlertDescription, CertificateError, DigitallySignedStruct, DistinguishedName};
use rustls::{SignatureScheme, SignatureScheme::ED25519};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Semaphore};
use tracing::{debug, info, warn};
use x509_parser::oid_registry::OID_SIG_ED25519;

use crate::id::{PublicKey, SecretKey, PUBLIC_KEY_BYTES};

/// The ALPN protocol id of the admin endpoint, checked on both sides.
pub const ADMIN_ALPN: &[u8] = b"mesh-admin/1";

/// How long the CLI waits for one address to complete the handshake and admission; a
/// few round trips fit easily, and an operator should not stare at a hung command.
pub const CONNECT_MS_MAX: u64 = 5_000;
/// How long the node gives one incoming handshake, so a stalled or hostile client holds a
/// handshake slot only briefly.
pub const HANDSHAKE_MS_MAX: u64 = 5_000;
/// A connection silent for this long is dead (a laptop that went to sleep, a lost route).
pub const IDLE_MS_MAX: u32 = 30_000;
/// Keep-alive period, well under the idle timeout, so an attached CLI waiting on a long
/// command or a log tail is not dropped for silence.
pub const KEEP_ALIVE_MS: u64 = 5_000;
/// Bidirectional streams an operator may have open at once on one connection: the CLI runs
/// one command per stream, and this bounds the state one connection can pin on a node.
pub const STREAMS_CONCURRENT_MAX: u32 = 16;
/// Handshakes in progress at once; they are unauthenticated work, so strangers may not
/// make the node do more than this.
pub const HANDSHAKES_CONCURRENT_MAX: usize = 32;
/// Authenticated connections waiting for `AdminServer::accept`; beyond this the node
/// stops admitting until the caller catches up.
pub const PENDING_CONNECTIONS_MAX: usize = 16;
/// How long `AdminClient::close` waits for the node to acknowledge the close.
pub const CLOSE_MS_MAX: u64 = 2_000;
/// The admission message is one small struct; anything longer is not one.
pub const ADMITTED_BYTES_MAX: usize = 256;
/// A host name may resolve to many addresses; trying more than a few only delays the error.
pub const RESOLVED_ADDRS_TRIED_MAX: usize = 4;

/// The TLS server name the CLI sends. It is never checked: the key is the identity.
const SERVER_NAME: &str = "mesh";
/// Application close codes on an admin connection.
const CLOSE_DONE: VarInt = VarInt::from_u32(0);
const CLOSE_BAD_ALPN: VarInt = VarInt::from_u32(1);
const CLOSE_NOT_OPERATOR: VarInt = VarInt::from_u32(2);
const CLOSE_NO_ADMISSION: VarInt = VarInt::from_u32(3);
const CLOSE_SHUTDOWN: VarInt = VarInt::from_u32(4);

/// The TLS alert the node's verifier sends for a key not on the operator list. rustls turns
/// `CertificateError::Other` (which carries the key into the node's log) into this alert,
/// and the node's verifier uses `Other` for nothing else, so the CLI can recognise it.
const REFUSED_ALERT: AlertDescription = AlertDescription::CertificateUnknown;

/// Errors from building the TLS and QUIC configuration of either side.
#[derive(Debug, thiserror::Error)]
pub enum AdminTlsError {
    #[error("building the self-signed certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("configuring tls: {0}")]
    Tls(#[from] rustls::Error),
    #[error("configuring quic: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// Errors from [`AdminServer::bind`].
#[derive(Debug, thiserror::Error)]
pub enum AdminBindError {
    #[error("binding the admin endpoint at {addr}: must be called inside a tokio runtime")]
    NoRuntime { addr: SocketAddr },
    #[error("binding the admin endpoint at {addr}: {source}")]
    Tls {
        addr: SocketAddr,
        source: AdminTlsError,
    },
    #[error("binding the admin endpoint at {addr}: {source}")]
    Socket {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Errors from [`AdminClient::connect`] and [`AdminClient::open_stream`].
#[derive(Debug, thiserror::Error)]
pub enum AdminConnectError {
    #[error("connecting to node {addr}: resolving the address: {source}")]
    Resolve {
        addr: String,
        source: std::io::Error,
    },
    #[error("connecting to node {addr}: the name resolved to no address")]
    NoAddress { addr: String },
    #[error("connecting to node {addr}: {source}")]
    Tls { addr: String, source: AdminTlsError },
    #[error("connecting to node {addr}: binding a local udp socket: {source}")]
    Socket {
        addr: String,
        source: std::io::Error,
    },
    #[error("connecting to node {addr}: no answer within {ms} ms")]
    Timeout { addr: String, ms: u64 },
    #[error("connecting to node {addr}: the node refused this operator key {operator} (not on its operator list)")]
    OperatorRefused { addr: String, operator: PublicKey },
    #[error("connecting to node {addr}: the node presented key {presented}, expected {expected}")]
    NodeKeyMismatch {
        addr: String,
        presented: PublicKey,
        expected: PublicKey,
    },
    #[error("connecting to node {addr}: {source}")]
    Endpoint {
        addr: String,
        source: quinn::ConnectError,
    },
    #[error("connecting to node {addr}: {source}")]
    Connection {
        addr: String,
        source: ConnectionError,
    },
    #[error("connecting to node {addr}: {what}")]
    Protocol { addr: String, what: String },
    #[error("opening a stream to node {addr}: {source}")]
    Stream {
        addr: String,
        source: ConnectionError,
    },
}

impl AdminConnectError {
    /// Errors that another address of the same host would not cure.
    fn is_final(&self) -> bool {
        matches!(
            self,
            AdminConnectError::OperatorRefused { .. }
                | AdminConnectError::NodeKeyMismatch { .. }
                | AdminConnectError::Protocol { .. }
                | AdminConnectError::Tls { .. }
        )
    }
}

/// What the node sends on its first unidirectional stream once it has admitted an
/// operator. It echoes the key it authenticated so the CLI can check both sides agree.
#[derive(Debug, Serialize, Deserialize)]
struct Admitted {
    operator: PublicKey,
}

/// Who may attach: a fixed allowlist of operator keys.
///
/// Dropping the server closes its endpoint and with it every admin connection.
#[derive(Debug)]
pub struct AdminServer {
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    admitted: tokio::sync::Mutex<mpsc::Receiver<AdminConnection>>,
    accept_task: tokio::task::JoinHandle<()>,
}

impl AdminServer {
    /// Binds a UDP socket at `addr` (port 0 allowed) and serves the admin ALPN with the node's key.
    pub fn bind(
        addr: SocketAddr,
        node_key: &SecretKey,
        operators: Vec<PublicKey>,
    ) -> Result<AdminServer, AdminBindError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| AdminBindError::NoRuntime { addr })?;
        let operators: Arc<HashSet<PublicKey>> = Arc::new(operators.into_iter().collect());
        if operators.is_empty() {
            warn!(%addr, "the admin endpoint has no operator keys: nobody can attach");
        }
        let config = server_config(node_key, operators.clone())
            .map_err(|source| AdminBindError::Tls { addr, source })?;
        let endpoint = {
            // quinn finds its runtime through the ambient tokio handle.
            let _guard = runtime.enter();
            quinn::Endpoint::server(config, addr)
                .map_err(|source| AdminBindError::Socket { addr, source })?
        };
        let local_addr = endpoint
            .local_addr()
            .map_err(|source| AdminBindError::Socket { addr, source })?;
        let (tx, rx) = mpsc::channel(PENDING_CONNECTIONS_MAX);
        let accept_task = runtime.spawn(accept_loop(endpoint.clone(), operators, tx));
        info!(%local_addr, node = %node_key.public(), "admin endpoint listening");
        Ok(AdminServer {
            endpoint,
            local_addr,
            admitted: tokio::sync::Mutex::new(rx),
            accept_task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Waits for the next connection that completes the handshake with an allowed operator key.
    /// Handshake failures (unknown key, bad ALPN) are logged with tracing::warn (naming the offered key when known) and skipped, not returned.
    /// Returns None when the endpoint is closed.
    pub async fn accept(&self) -> Option<AdminConnection> {
        let mut admitted = self.admitted.lock().await;
        loop {
            let connection = admitted.recv().await?;
            // A connection may have closed while it waited in the queue; handing it out
            // would only make the caller fail on its first stream.
            if connection.connection.close_reason().is_none() {
                return Some(connection);
            }
            debug!(operator = %connection.operator, "skipping an admin connection that closed while queued");
        }
    }

    pub fn close(&self) {
        self.endpoint.close(CLOSE_SHUTDOWN, b"node shutting down");
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.close();
    }
}

/// An authenticated operator connection.
#[derive(Debug, Clone)]
pub struct AdminConnection {
    connection: quinn::Connection,
    operator: PublicKey,
}

impl AdminConnection {
    /// The authenticated operator key.
    pub fn operator(&self) -> PublicKey {
        self.operator
    }

    pub fn remote_addr(&self) -> SocketAddr {
        self.connection.remote_address()
    }

    /// Next bidirectional stream the client opened; None when the connection is closed.
    pub async fn accept_stream(&self) -> Option<(quinn::SendStream, quinn::RecvStream)> {
        match self.connection.accept_bi().await {
            Ok(streams) => Some(streams),
            Err(e) => {
                debug!(operator = %self.operator, error = %e, "admin connection ended");
                None
            }
        }
    }

    /// Closes the connection; `reason` is shown to the operator.
    pub fn close(&self, reason: &str) {
        self.connection.close(CLOSE_DONE, reason.as_bytes());
    }
}

/// A CLI's connection to one node's admin endpoint.
#[derive(Debug)]
pub struct AdminClient {
    addr: String,
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    node_key: PublicKey,
}

impl AdminClient {
    /// Connects to a node's admin endpoint. `addr` is "host:port" (resolve with tokio::net::lookup_host). `expected_node`: when Some, the node must present exactly that key.
    pub async fn connect(
        addr: &str,
        operator_key: &SecretKey,
        expected_node: Option<PublicKey>,
    ) -> Result<AdminClient, AdminConnectError> {
        connect_with_alpn(addr, operator_key, expected_node, ADMIN_ALPN).await
    }

    /// The key the node presented.
    pub fn node_key(&self) -> PublicKey {
        self.node_key
    }

    pub async fn open_stream(
        &self,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), AdminConnectError> {
        self.connection
            .open_bi()
            .await
            .map_err(|source| AdminConnectError::Stream {
                addr: self.addr.clone(),
                source,
            })
    }

    /// Closes gracefully and waits (at most [`CLOSE_MS_MAX`]) for the node to acknowledge.
    pub async fn close(&self) {
        self.connection.close(CLOSE_DONE, b"operator done");
        if tokio::time::timeout(
            Duration::from_millis(CLOSE_MS_MAX),
            self.endpoint.wait_idle(),
        )
        .await
        .is_err()
        {
            debug!(addr = %self.addr, "the node did not acknowledge the close in time");
        }
    }
}

async fn connect_with_alpn(
    addr: &str,
    operator_key: &SecretKey,
    expected_node: Option<PublicKey>,
    alpn: &[u8],
) -> Result<AdminClient, AdminConnectError> {
    let connect_ms = Duration::from_millis(CONNECT_MS_MAX);
    let resolved: Vec<SocketAddr> =
        match tokio::time::timeout(connect_ms, tokio::net::lookup_host(addr)).await {
            Err(_) => {
                return Err(AdminConnectError::Timeout {
                    addr: addr.to_string(),
                    ms: CONNECT_MS_MAX,
                })
            }
            Ok(Err(source)) => {
                return Err(AdminConnectError::Resolve {
                    addr: addr.to_string(),
                    source,
                })
            }
            Ok(Ok(found)) => found.take(RESOLVED_ADDRS_TRIED_MAX).collect(),
        };
    let identity = Identity::new(operator_key).map_err(|source| AdminConnectError::Tls {
        addr: addr.to_string(),
        source,
    })?;
    let mut last_error = AdminConnectError::NoAddress {
        addr: addr.to_string(),
    };
    for remote in resolved {
        match connect_one(addr, remote, &identity, expected_node, alpn).await {
            Ok(client) => return Ok(client),
            Err(e) if e.is_final() => return Err(e),
            Err(e) => {
                debug!(%remote, error = %e, "admin connect attempt failed");
                last_error = e;
            }
        }
    }
    Err(last_error)
}

/// Failures of one connect attempt, before they are given the node's address.
enum AttemptError {
    Connect(quinn::ConnectError),
    Connection(ConnectionError),
    Protocol(String),
}

async fn connect_one(
    addr: &str,
    remote: SocketAddr,
    identity: &Identity,
    expected_node: Option<PublicKey>,
    alpn: &[u8],
) -> Result<AdminClient, AdminConnectError> {
    let presented = Arc::new(Mutex::new(None));
    let config =
        client_config(identity, expected_node, presented.clone(), alpn).map_err(|source| {
            AdminConnectError::Tls {
                addr: addr.to_string(),
                source,
            }
        })?;
    let local: SocketAddr = if remote.is_ipv6() {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = quinn::Endpoint::client(local).map_err(|source| AdminConnectError::Socket {
        addr: addr.to_string(),
        source,
    })?;
    let attempt = tokio::time::timeout(
        Duration::from_millis(CONNECT_MS_MAX),
        handshake(&endpoint, config, remote, identity.public, alpn),
    )
    .await;
    let error = match attempt {
        Ok(Ok((connection, node_key))) => {
            info!(%remote, node = %node_key, "attached to node");
            return Ok(AdminClient {
                addr: addr.to_string(),
                endpoint,
                connection,
                node_key,
            });
        }
        Err(_) => AdminConnectError::Timeout {
            addr: addr.to_string(),
            ms: CONNECT_MS_MAX,
        },
        Ok(Err(AttemptError::Connect(source))) => AdminConnectError::Endpoint {
            addr: addr.to_string(),
            source,
        },
        Ok(Err(AttemptError::Protocol(what))) => AdminConnectError::Protocol {
            addr: addr.to_string(),
            what,
        },
        Ok(Err(AttemptError::Connection(source))) => {
            let presented = *presented.lock().unwrap_or_else(|e| e.into_inner());
            classify(addr, identity.public, expected_node, presented, source)
        }
    };
    endpoint.close(CLOSE_DONE, b"");
    Err(error)
}

/// Turns a failed handshake into the error the operator needs to read.
fn classify(
    addr: &str,
    operator: PublicKey,
    expected_node: Option<PublicKey>,
    presented: Option<PublicKey>,
    source: ConnectionError,
) -> AdminConnectError {
    if let (Some(expected), Some(presented)) = (expected_node, presented) {
        if expected != presented {
            return AdminConnectError::NodeKeyMismatch {
                addr: addr.to_string(),
                presented,
                expected,
            };
        }
    }
    let refused = match &source {
        ConnectionError::ConnectionClosed(close) => {
            close.error_code == TransportErrorCode::crypto(u8::from(REFUSED_ALERT))
        }
        ConnectionError::ApplicationClosed(close) => close.error_code == CLOSE_NOT_OPERATOR,
        _ => false,
    };
    if refused {
        return AdminConnectError::OperatorRefused {
            addr: addr.to_string(),
            operator,
        };
    }
    AdminConnectError::Connection {
        addr: addr.to_string(),
        source,
    }
}

/// The TLS handshake, then the node's admission message.
async fn handshake(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    remote: SocketAddr,
    operator: PublicKey,
    alpn: &[u8],
) -> Result<(quinn::Connection, PublicKey), AttemptError> {
    let connection = endpoint
        .connect_with(config, remote, SERVER_NAME)
        .map_err(AttemptError::Connect)?
        .await
        .map_err(AttemptError::Connection)?;
    if negotiated_alpn(&connection).as_deref() != Some(alpn) {
        connection.close(CLOSE_BAD_ALPN, b"wrong application protocol");
        return Err(AttemptError::Protocol(format!(
            "the node did not agree on the {} protocol",
            String::from_utf8_lossy(alpn)
        )));
    }
    let Some(node_key) = peer_key(&connection) else {
        return Err(AttemptError::Protocol(
            "the node presented no ed25519 certificate".into(),
        ));
    };
    let mut admission = connection
        .accept_uni()
        .await
        .map_err(AttemptError::Connection)?;
    let bytes = admission
        .read_to_end(ADMITTED_BYTES_MAX)
        .await
        .map_err(|e| match e {
            quinn::ReadToEndError::Read(quinn::ReadError::ConnectionLost(lost)) => {
                AttemptError::Connection(lost)
            }
            other => AttemptError::Protocol(format!("reading the admission message: {other}")),
        })?;
    let admitted: Admitted = crate::wire::decode(&bytes, ADMITTED_BYTES_MAX)
        .map_err(|e| AttemptError::Protocol(format!("reading the admission message: {e}")))?;
    if admitted.operator != operator {
        connection.close(CLOSE_NO_ADMISSION, b"admitted the wrong key");
        return Err(AttemptError::Protocol(format!(
            "the node admitted key {} instead of this operator key {operator}",
            admitted.operator
        )));
    }
    Ok((connection, node_key))
}

/// Accepts incoming connections until the endpoint closes, running each handshake in its
/// own task so one slow client cannot hold up the others.
async fn accept_loop(
    endpoint: quinn::Endpoint,
    operators: Arc<HashSet<PublicKey>>,
    admitted: mpsc::Sender<AdminConnection>,
) {
    let handshakes = Arc::new(Semaphore::new(HANDSHAKES_CONCURRENT_MAX));
    while let Some(incoming) = endpoint.accept().await {
        let remote = incoming.remote_address();
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            warn!(%remote, "refused an admin connection: {HANDSHAKES_CONCURRENT_MAX} handshakes already in progress");
            incoming.refuse();
            continue;
        };
        let operators = operators.clone();
        let admitted = admitted.clone();
        tokio::spawn(async move {
            // The permit is held until the connection is queued, so a caller that stops
            // accepting also stops the node from admitting more.
            let _permit = permit;
            if let Some(connection) = admit(incoming, remote, &operators).await {
                if admitted.send(connection).await.is_err() {
                    debug!(%remote, "admin server dropped while a connection was queued");
                }
            }
        });
    }
    debug!("admin endpoint closed");
}

/// Runs one incoming handshake to completion and sends the admission message.
async fn admit(
    incoming: quinn::Incoming,
    remote: SocketAddr,
    operators: &HashSet<PublicKey>,
) -> Option<AdminConnection> {
    let connecting = match incoming.accept() {
        Ok(connecting) => connecting,
        Err(e) => {
            warn!(%remote, error = %e, "refused an admin connection");
            return None;
        }
    };
    let connection = match tokio::time::timeout(Duration::from_millis(HANDSHAKE_MS_MAX), connecting)
        .await
    {
        Err(_) => {
            warn!(%remote, "refused an admin connection: no handshake within {HANDSHAKE_MS_MAX} ms");
            return None;
        }
        Ok(Err(e)) => {
            // An unknown operator key shows here: the verifier's error names the key.
            warn!(%remote, error = %e, "refused an admin connection");
            return None;
        }
        Ok(Ok(connection)) => connection,
    };
    let Some(operator) = peer_key(&connection) else {
        warn!(%remote, "refused an admin connection: no ed25519 client certificate");
        connection.close(CLOSE_NOT_OPERATOR, b"no operator certificate");
        return None;
    };
    // rustls lets a client that offers no ALPN at all through, so check what was agreed.
    if negotiated_alpn(&connection).as_deref() != Some(ADMIN_ALPN) {
        warn!(%remote, %operator, "refused an admin connection: the client did not speak mesh-admin/1");
        connection.close(CLOSE_BAD_ALPN, b"wrong application protocol");
        return None;
    }
    // The verifier already refused unknown keys; checking again where connections are
    // handed out keeps the guarantee visible in one place.
    if !operators.contains(&operator) {
        warn!(%remote, %operator, "refused an admin connection: key not on the operator list");
        connection.close(CLOSE_NOT_OPERATOR, b"not an operator");
        return None;
    }
    let admission = async {
        let mut stream = connection.open_uni().await.map_err(|e| e.to_string())?;
        let bytes = crate::wire::encode(&Admitted { operator }).map_err(|e| e.to_string())?;
        stream.write_all(&bytes).await.map_err(|e| e.to_string())?;
        stream.finish().map_err(|e| e.to_string())
    };
    match tokio::time::timeout(Duration::from_millis(HANDSHAKE_MS_MAX), admission).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            warn!(%remote, %operator, error = %e, "sending the admission message failed");
            connection.close(CLOSE_NO_ADMISSION, b"admission failed");
            return None;
        }
        Err(_) => {
            warn!(%remote, %operator, "sending the admission message timed out");
            connection.close(CLOSE_NO_ADMISSION, b"admission timed out");
            return None;
        }
    }
    info!(%remote, %operator, "operator attached");
    Some(AdminConnection {
        connection,
        operator,
    })
}

pub(crate) fn negotiated_alpn(connection: &quinn::Connection) -> Option<Vec<u8>> {
    connection
        .handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// The ed25519 key in the certificate the peer presented during the handshake.
pub(crate) fn peer_key(connection: &quinn::Connection) -> Option<PublicKey> {
    let chain = connection
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    ed25519_key_of(chain.first()?).ok()
}

/// A key and its self-signed certificate, in the forms rustls takes.
pub(crate) struct Identity {
    public: PublicKey,
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl Identity {
    pub(crate) fn new(secret: &SecretKey) -> Result<Identity, AdminTlsError> {
        let key = PrivatePkcs8KeyDer::from(secret.to_pkcs8_der());
        let pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&key, &rcgen::PKCS_ED25519)?;
        // rcgen's default validity is 1975 to 4096; nobody checks it anyway.
        let cert = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])?
            .self_signed(&pair)?
            .der()
            .clone();
        Ok(Identity {
            public: secret.public(),
            cert,
            key,
        })
    }

    fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

/// An explicit provider: both ring and aws-lc-rs are compiled into this workspace, so the
/// process default would be ambiguous.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport(server: bool) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(VarInt::from_u32(IDLE_MS_MAX).into()))
        .keep_alive_interval(Some(Duration::from_millis(KEEP_ALIVE_MS)));
    if server {
        // The CLI opens bidirectional command streams; it never opens unidirectional ones.
        transport
            .max_concurrent_bidi_streams(VarInt::from_u32(STREAMS_CONCURRENT_MAX))
            .max_concurrent_uni_streams(VarInt::from_u32(0));
    } else {
        // The node opens only the one admission stream and never a bidirectional one.
        transport
            .max_concurrent_bidi_streams(VarInt::from_u32(0))
            .max_concurrent_uni_streams(VarInt::from_u32(1));
    }
    transport
}

fn server_config(
    node_key: &SecretKey,
    operators: Arc<HashSet<PublicKey>>,
) -> Result<quinn::ServerConfig, AdminTlsError> {
    let tls = server_tls(node_key, Some(operators), ADMIN_ALPN)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    config.transport_config(Arc::new(transport(true)));
    Ok(config)
}

/// TLS for a node's side of a QUIC endpoint: its ed25519 certificate, and client
/// certificates checked against `allowed` (any ed25519 key when None, for peers that
/// authenticate but need no allowlist).
pub(crate) fn server_tls(
    node_key: &SecretKey,
    allowed: Option<Arc<HashSet<PublicKey>>>,
    alpn: &[u8],
) -> Result<rustls::ServerConfig, AdminTlsError> {
    let identity = Identity::new(node_key)?;
    let provider = provider();
    let verifier = Arc::new(ClientKeyVerifier {
        allowed,
        algorithms: provider.signature_verification_algorithms,
    });
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![identity.cert.clone()], identity.key_der())?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    // No session tickets: every connection runs the full handshake, so every connection
    // has its client certificate checked.
    tls.send_tls13_tickets = 0;
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.max_early_data_size = 0;
    Ok(tls)
}

fn client_config(
    identity: &Identity,
    expected_node: Option<PublicKey>,
    presented: Arc<Mutex<Option<PublicKey>>>,
    alpn: &[u8],
) -> Result<quinn::ClientConfig, AdminTlsError> {
    let tls = client_tls(identity, expected_node, presented, alpn)?;
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    config.transport_config(Arc::new(transport(false)));
    Ok(config)
}

/// TLS for the connecting side: `identity`'s certificate, and the server's checked to be
/// `expected_node` when given. The key the server presented is recorded in `presented`.
pub(crate) fn client_tls(
    identity: &Identity,
    expected_node: Option<PublicKey>,
    presented: Arc<Mutex<Option<PublicKey>>>,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, AdminTlsError> {
    let provider = provider();
    let verifier = Arc::new(NodeVerifier {
        expected: expected_node,
        presented,
        algorithms: provider.signature_verification_algorithms,
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![identity.cert.clone()], identity.key_der())?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.resumption = rustls::client::Resumption::disabled();
    Ok(tls)
}

/// Why a peer's certificate was refused. Debug prints the same text as Display because
/// rustls formats the wrapped error with Debug in the message that reaches the logs.
#[derive(thiserror::Error)]
enum PeerCertError {
    #[error("operator key {0} is not on this node's operator list")]
    NotAnOperator(PublicKey),
    #[error("the node presented key {presented}, expected {expected}")]
    WrongNode {
        presented: PublicKey,
        expected: PublicKey,
    },
}

impl std::fmt::Debug for PeerCertError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

fn refuse(e: PeerCertError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
}

/// Extracts the ed25519 key from a DER X.509 certificate; anything else (another key
/// type, trailing bytes, malformed DER) is refused as a bad encoding.
fn ed25519_key_of(cert: &CertificateDer<'_>) -> Result<PublicKey, rustls::Error> {
    let bad = || rustls::Error::InvalidCertificate(CertificateError::BadEncoding);
    let (rest, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|_| bad())?;
    if !rest.is_empty() {
        return Err(bad());
    }
    let spki = parsed.public_key();
    // RFC 8410: the ed25519 algorithm identifier has no parameters.
    if spki.algorithm.algorithm != OID_SIG_ED25519 || spki.algorithm.parameters.is_some() {
        return Err(bad());
    }
    if spki.subject_public_key.unused_bits != 0 {
        return Err(bad());
    }
    let bytes: [u8; PUBLIC_KEY_BYTES] = spki
        .subject_public_key
        .data
        .as_ref()
        .try_into()
        .map_err(|_| bad())?;
    Ok(PublicKey(bytes))
}

/// Checks the handshake signature made with the certificate's key. Only ed25519 is offered,
/// so only ed25519 is accepted, whatever else the provider could verify.
fn verify_handshake_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
    algorithms: &WebPkiSupportedAlgorithms,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    if dss.scheme != ED25519 {
        return Err(rustls::Error::PeerMisbehaved(
            rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme,
        ));
    }
    rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
}

fn tls12_refused() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls12NotOffered,
    ))
}

/// The node's check of a client certificate: an ed25519 key, on the allowlist when there
/// is one (operators on the admin endpoint). Dates, names and issuers are not checked on
/// purpose; the key is the identity.
#[derive(Debug)]
struct ClientKeyVerifier {
    allowed: Option<Arc<HashSet<PublicKey>>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for ClientKeyVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if !intermediates.is_empty() {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::BadEncoding,
            ));
        }
        let key = ed25519_key_of(end_entity)?;
        if let Some(allowed) = &self.allowed {
            if !allowed.contains(&key) {
                return Err(refuse(PeerCertError::NotAnOperator(key)));
            }
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_handshake_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![ED25519]
    }
}

/// The CLI's check of a node certificate: an ed25519 key, equal to the expected one when
/// the operator named it. Dates and names are not checked on purpose; the key is the
/// identity. The presented key is recorded so a mismatch can be reported with both keys.
#[derive(Debug)]
struct NodeVerifier {
    expected: Option<PublicKey>,
    presented: Arc<Mutex<Option<PublicKey>>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for NodeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if !intermediates.is_empty() {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::BadEncoding,
            ));
        }
        let key = ed25519_key_of(end_entity)?;
        *self.presented.lock().unwrap_or_else(|e| e.into_inner()) = Some(key);
        match self.expected {
            Some(expected) if expected != key => Err(refuse(PeerCertError::WrongNode {
                presented: key,
                expected,
            })),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_handshake_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![ED25519]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{read_frame, write_frame};

    const LOCALHOST: &str = "127.0.0.1:0";

    /// How long a test waits to be sure something does not happen.
    const QUIET_MS: u64 = 300;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Ping {
        n: u32,
        text: String,
    }

    fn server(node: &SecretKey, operators: Vec<PublicKey>) -> AdminServer {
        AdminServer::bind(LOCALHOST.parse().unwrap(), node, operators).unwrap()
    }

    #[tokio::test]
    async fn allowed_operator_exchanges_frames() {
        let node = SecretKey::generate();
        let operator = SecretKey::generate();
        let srv = server(&node, vec![operator.public()]);
        let addr = srv.local_addr().to_string();

        let client = AdminClient::connect(&addr, &operator, None).await.unwrap();
        assert_eq!(client.node_key(), node.public());
        let conn = srv.accept().await.unwrap();
        assert_eq!(conn.operator(), operator.public());
        assert_eq!(conn.remote_addr().ip(), srv.local_addr().ip());

        let (mut send, mut recv) = client.open_stream().await.unwrap();
        // quinn announces a stream to the peer only once data is sent on it.
        write_frame(
            &mut send,
            &Ping {
                n: 1,
                text: "status".into(),
            },
        )
        .await
        .unwrap();
        let (mut ssend, mut srecv) = conn.accept_stream().await.unwrap();
        let got: Ping = read_frame(&mut srecv, 1024).await.unwrap();
        assert_eq!(
            got,
            Ping {
                n: 1,
                text: "status".into()
            }
        );
        write_frame(
            &mut ssend,
            &Ping {
                n: 2,
                text: "ok".into(),
            },
        )
        .await
        .unwrap();
        ssend.finish().unwrap();
        let reply: Ping = read_frame(&mut recv, 1024).await.unwrap();
        assert_eq!(
            reply,
            Ping {
                n: 2,
                text: "ok".into()
            }
        );
        assert!(matches!(
            read_frame::<_, Ping>(&mut recv, 1024).await,
            Err(crate::wire::WireError::Closed)
        ));

        client.close().await;
        // Once the client has gone, the node sees no further streams.
        assert!(conn.accept_stream().await.is_none());
        srv.close();
        assert!(srv.accept().await.is_none());
    }

    #[tokio::test]
    async fn unknown_operator_is_refused_and_not_accepted() {
        let node = SecretKey::generate();
        let operator = SecretKey::generate();
        let stranger = SecretKey::generate();
        let srv = server(&node, vec![operator.public()]);
        let addr = srv.local_addr().to_string();

        let err = AdminClient::connect(&addr, &stranger, Some(node.public()))
            .await
            .unwrap_err();
        match &err {
            AdminConnectError::OperatorRefused { operator, .. } => {
                assert_eq!(*operator, stranger.public())
            }
            other => panic!("expected OperatorRefused, got {other:?}"),
        }
        let text = err.to_string();
        assert!(text.contains(&stranger.public().to_string()), "{text}");
        assert!(text.contains("not on its operator list"), "{text}");
        assert!(
            text.starts_with(&format!("connecting to node {addr}: ")),
            "{text}"
        );

        // The refused connection is never handed out...
        assert!(
            tokio::time::timeout(Duration::from_millis(QUIET_MS), srv.accept())
                .await
                .is_err()
        );
        // ...and the next one in line is the allowed operator's.
        let client = AdminClient::connect(&addr, &operator, None).await.unwrap();
        let conn = srv.accept().await.unwrap();
        assert_eq!(conn.operator(), operator.public());
        client.close().await;
    }

    #[tokio::test]
    async fn expected_node_key_is_enforced() {
        let node = SecretKey::generate();
        let impostor = SecretKey::generate();
        let operator = SecretKey::generate();
        let srv = server(&node, vec![operator.public()]);
        let addr = srv.local_addr().to_string();

        let err = AdminClient::connect(&addr, &operator, Some(impostor.public()))
            .await
            .unwrap_err();
        match &err {
            AdminConnectError::NodeKeyMismatch {
                presented,
                expected,
                ..
            } => {
                assert_eq!(*presented, node.public());
                assert_eq!(*expected, impostor.public());
            }
            other => panic!("expected NodeKeyMismatch, got {other:?}"),
        }
        assert_eq!(
            err.to_string(),
            format!(
                "connecting to node {addr}: the node presented key {}, expected {}",
                node.public(),
                impostor.public()
            )
        );
        // The client aborted the handshake, so the node admits nobody.
        assert!(
            tokio::time::timeout(Duration::from_millis(QUIET_MS), srv.accept())
                .await
                .is_err()
        );

        let client = AdminClient::connect(&addr, &operator, Some(node.public()))
            .await
            .unwrap();
        assert_eq!(client.node_key(), node.public());
        let conn = srv.accept().await.unwrap();
        assert_eq!(conn.operator(), operator.public());
        client.close().await;
    }

    #[tokio::test]
    async fn wrong_alpn_is_refused() {
        let node = SecretKey::generate();
        let operator = SecretKey::generate();
        let srv = server(&node, vec![operator.public()]);
        let addr = srv.local_addr().to_string();

        let err = connect_with_alpn(&addr, &operator, None, b"mesh-admin/0")
            .await
            .unwrap_err();
        assert!(
            matches!(err, AdminConnectError::Connection { .. }),
            "{err:?}"
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(QUIET_MS), srv.accept())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn nothing_listening_times_out() {
        // Bind a plain UDP socket that never answers, so the port is certainly silent.
        let silent = std::net::UdpSocket::bind(LOCALHOST).unwrap();
        let addr = silent.local_addr().unwrap().to_string();
        let started = std::time::Instant::now();
        let err = AdminClient::connect(&addr, &SecretKey::generate(), None)
            .await
            .unwrap_err();
        assert!(matches!(err, AdminConnectError::Timeout { .. }), "{err:?}");
        assert!(started.elapsed() >= Duration::from_millis(CONNECT_MS_MAX));
    }

    #[test]
    fn certificate_carries_the_ed25519_key() {
        let key = SecretKey::from_seed([9; 32]);
        let identity = Identity::new(&key).unwrap();
        assert_eq!(ed25519_key_of(&identity.cert).unwrap(), key.public());
        assert!(ed25519_key_of(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])).is_err());
        // A certificate with a P-256 key is refused even though it is well formed.
        let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let other = rcgen::CertificateParams::new(vec!["mesh".to_string()])
            .unwrap()
            .self_signed(&p256)
            .unwrap();
        assert!(ed25519_key_of(other.der()).is_err());
    }
}
