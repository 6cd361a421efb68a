//! The operator side of the admin protocol.

use anyhow::{bail, Context};
use mesh_transport::admin::AdminClient;
use mesh_transport::{wire, SecretKey};

use super::Cli;
use crate::proto::{Request, Response, RESPONSE_BYTES_MAX};

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
        let (mut send, mut recv) = self
            .client
            .open_stream()
            .await
            .context("opening a request stream")?;
        wire::write_frame(&mut send, req)
            .await
            .context("sending the request")?;
        if !body.is_empty() {
            send.write_all(body).await.context("sending the content")?;
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
