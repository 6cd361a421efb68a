//! The operator side of the admin protocol.

use anyhow::{bail, Context};
use mesh_transport::admin::AdminClient;
use mesh_transport::{wire, SecretKey};

use super::Cli;
use crate::proto::{Request, Response, RESPONSE_BYTES_MAX};

/// Content is sent in pieces of this size so progress can be shown.
const UPLOAD_PIECE_BYTES: usize = 256 * 1024;

/// An attached CLI session.
pub struct Session {
    client: AdminClient,
}

impl Session {
    /// Attaches to the node named on the command line with the operator's key.
    pub async fn attach(cli: &Cli) -> anyhow::Result<Session> {
        let key_path = cli
            .key
            .clone()
            .or_else(super::default_key_path)
            .context("no operator key: pass --key FILE or set MESH_KEY")?;
        let key = SecretKey::load(&key_path).with_context(|| {
            format!(
                "loading the operator key (create one with `mesh keygen --out {}`)",
                key_path.display()
            )
        })?;
        Self::attach_with(&cli.node, &key, cli.node_key).await
    }

    pub async fn attach_with(
        node: &str,
        key: &SecretKey,
        node_key: Option<mesh_transport::PublicKey>,
    ) -> anyhow::Result<Session> {
        let client = AdminClient::connect(node, key, node_key)
            .await
            .with_context(|| format!("attaching to node {node}"))?;
        Ok(Session { client })
    }

    /// Sends one request and returns the response, turning a node-side error into an
    /// error here.
    pub async fn request(&self, req: &Request) -> anyhow::Result<Response> {
        self.request_with_body(req, &[]).await
    }

    /// Sends one request followed by raw body bytes (a publish's content).
    pub async fn request_with_body(&self, req: &Request, body: &[u8]) -> anyhow::Result<Response> {
        self.request_with_progress(req, body, |_| {}).await
    }

    /// Like [`Session::request_with_body`], reporting the bytes sent as they go.
    pub async fn request_with_progress(
        &self,
        req: &Request,
        body: &[u8],
        mut sent: impl FnMut(u64),
    ) -> anyhow::Result<Response> {
        let (mut send, mut recv) = self
            .client
            .open_stream()
            .await
            .context("opening a request stream")?;
        if let Err(e) = wire::write_frame(&mut send, req).await {
            // A node that refuses a request (an oversized frame) answers and stops
            // reading; its answer is the better error.
            if let Ok(Response::Error(reason)) =
                wire::read_frame::<_, Response>(&mut recv, RESPONSE_BYTES_MAX).await
            {
                bail!("{reason}");
            }
            return Err(e).context("sending the request");
        }
        let mut done = 0u64;
        for piece in body.chunks(UPLOAD_PIECE_BYTES) {
            if let Err(e) = send.write_all(piece).await {
                // The node stops reading when it refuses a request early (a full store,
                // an untrusted signer); its answer says why, so read it before
                // reporting the broken upload.
                if let Ok(Response::Error(reason)) =
                    wire::read_frame::<_, Response>(&mut recv, RESPONSE_BYTES_MAX).await
                {
                    bail!("{reason}");
                }
                return Err(e).context("sending the content");
            }
            done += piece.len() as u64;
            sent(done);
        }
        send.finish().context("finishing the request")?;
        let response: Response = wire::read_frame(&mut recv, RESPONSE_BYTES_MAX)
            .await
            .context("reading the node's response")?;
        if let Response::Error(e) = response {
            bail!("{e}");
        }
        Ok(response)
    }

    pub async fn close(self) {
        self.client.close().await;
    }
}
