//! `mesh agent`: run a node.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use mesh_transport::PublicKey;

use crate::config::{AgentFlags, NodeConfig};

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// A TOML config file; flags override its values.
    #[arg(long)]
    config: Option<PathBuf>,
    /// State directory (identity, content store, database). Default: the user's data dir.
    #[arg(long)]
    state: Option<PathBuf>,
    /// The node key file; default STATE/node.key, created on first start.
    #[arg(long = "node-key-file")]
    key: Option<PathBuf>,
    /// Mesh (QUIC) listen address, HOST:PORT or a multiaddr; repeatable. Default 0.0.0.0:7400.
    #[arg(long)]
    listen: Vec<String>,
    /// Admin endpoint address for the operator's CLI. Default 0.0.0.0:7401.
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// UDP port of the blob data endpoint (chunk transfers between nodes), on the host of
    /// the first listen address. Default: any free port; peers learn it when they connect.
    #[arg(long)]
    blob_port: Option<u16>,
    /// A peer to join through, HOST:PORT or a multiaddr; repeatable.
    #[arg(long)]
    bootstrap: Vec<String>,
    /// A label describing this node, KEY=VALUE; repeatable.
    #[arg(long)]
    label: Vec<String>,
    /// A public key trusted to sign releases (hex); repeatable.
    #[arg(long)]
    release_key: Vec<PublicKey>,
    /// How many distinct trusted keys must sign a release.
    #[arg(long)]
    threshold: Option<usize>,
    /// An operator public key allowed to attach (hex); repeatable.
    #[arg(long)]
    operator: Vec<PublicKey>,
    /// Cap on the bytes of blobs this node stores.
    #[arg(long)]
    store_bytes_max: Option<u64>,
    /// Upload cap when serving peers, bytes per second.
    #[arg(long)]
    upload_bytes_per_s: Option<u64>,
    /// Download cap when fetching from peers, bytes per second.
    #[arg(long)]
    download_bytes_per_s: Option<u64>,
}

pub async fn run(args: &AgentArgs) -> anyhow::Result<()> {
    init_logging();
    let flags = AgentFlags {
        config: args.config.clone(),
        state: args.state.clone(),
        key: args.key.clone(),
        listen: args.listen.clone(),
        admin: args.admin,
        blob_port: args.blob_port,
        bootstrap: args.bootstrap.clone(),
        labels: args.label.clone(),
        release_keys: args.release_key.clone(),
        threshold: args.threshold,
        operators: args.operator.clone(),
        store_bytes_max: args.store_bytes_max,
        upload_bytes_per_s: args.upload_bytes_per_s,
        download_bytes_per_s: args.download_bytes_per_s,
    };
    let config = NodeConfig::resolve(&flags).context("resolving the node configuration")?;
    if config.policy.release_keys.is_empty() {
        tracing::warn!("no release keys configured: this node will refuse every release");
    }
    if config.operators.is_empty() {
        tracing::warn!("no operator keys configured: no CLI can attach to this node");
    }
    match crate::node::run(config, shutdown_signal()).await? {
        crate::node::Exit::Shutdown => Ok(()),
        crate::node::Exit::Restart(why) => {
            // The launcher starts the active slot again when it sees this code.
            tracing::warn!("exiting for the launcher to restart the agent: {why}");
            std::process::exit(mesh_actors::firmware::RESTART_EXIT_CODE)
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

pub(crate) fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        // The transport and runtime crates are chatty at info; a node's own log is what
        // an operator reads.
        tracing_subscriber::EnvFilter::new(
            "info,libp2p=warn,libp2p_gossipsub=error,quinn=warn,wasmtime=warn,cranelift=warn,ractor=warn",
        )
    });
    // Colour only on a terminal: logs that go to files or journals stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
