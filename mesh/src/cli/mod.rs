//! The command line: one file per subcommand, this one for the shared flags.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use mesh_transport::PublicKey;

mod agent;
mod blob;
pub mod client;
mod demo;
mod fetch;
mod firmware;
mod keygen;
mod launcher;
mod logs;
mod modules;
mod peers;
mod progress;
pub mod publish;
mod status;
mod transfers;

/// A runtime for fleets of edge devices: signed WASM modules spread peer to peer and run
/// under supervision.
#[derive(Parser, Debug)]
#[command(name = "mesh", version, about)]
pub struct Cli {
    /// The node to attach to (its admin endpoint), as HOST:PORT.
    #[arg(
        long,
        global = true,
        env = "MESH_NODE",
        default_value = "127.0.0.1:7401"
    )]
    pub node: String,
    /// The node's public key (hex); when given, the CLI refuses any other node.
    #[arg(long, global = true, env = "MESH_NODE_KEY")]
    pub node_key: Option<PublicKey>,
    /// The operator key file (PKCS#8 PEM) the node must trust.
    #[arg(long, global = true, env = "MESH_KEY")]
    pub key: Option<PathBuf>,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a node.
    Agent(agent::AgentArgs),
    /// Create an ed25519 key file (operator, release signer or node).
    Keygen(keygen::KeygenArgs),
    /// Show the attached node: id, addresses, labels, uptime, version.
    Status,
    /// Show the mesh as the attached node sees it.
    Peers,
    /// Show the modules running on the attached node (or, with --all, across the mesh).
    Modules(modules::ModulesArgs),
    /// Sign a release and publish it through the attached node.
    Publish(publish::PublishArgs),
    /// Show recent log lines of the modules on the attached node.
    Logs(logs::LogsArgs),
    /// Show downloads in progress on the attached node.
    Transfers(transfers::TransfersArgs),
    /// Have the attached node fetch a blob by hash from its peers.
    Fetch(fetch::FetchArgs),
    /// Show whether the attached node holds a blob.
    Blob(blob::BlobArgs),
    /// Start a local mesh of three nodes and publish an example module to it.
    Demo(demo::DemoArgs),
    /// Show firmware slots on the attached node (or, with --all, on every connected node).
    Firmware(firmware::FirmwareArgs),
    /// Run the agent from the active slot of its own firmware target, with boot counting
    /// and fallback to the confirmed binary.
    Launcher(launcher::LauncherArgs),
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Agent(args) => agent::run(args).await,
        Command::Keygen(args) => keygen::run(&cli, args),
        Command::Status => status::run(&cli).await,
        Command::Peers => peers::run(&cli).await,
        Command::Modules(args) => modules::run(&cli, args).await,
        Command::Publish(args) => publish::run(&cli, args).await,
        Command::Logs(args) => logs::run(&cli, args).await,
        Command::Transfers(args) => transfers::run(&cli, args).await,
        Command::Fetch(args) => fetch::run(&cli, args).await,
        Command::Blob(args) => blob::run(&cli, args).await,
        Command::Demo(args) => demo::run(&cli, args).await,
        Command::Firmware(args) => firmware::run(&cli, args).await,
        Command::Launcher(args) => launcher::run(args).await,
    }
}

/// Where the operator key lives when `--key` is not given.
pub fn default_key_path() -> Option<PathBuf> {
    dirs::config_dir().map(|d| d.join("mesh").join("operator.key"))
}

/// Prints a value as pretty JSON.
pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Formats milliseconds as a short human duration.
pub fn human_ms(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0 => format!("{ms}ms"),
        1..=119 => format!("{s}s"),
        120..=7199 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(super::human_ms(250), "250ms");
        assert_eq!(super::human_ms(61_000), "61s");
        assert_eq!(super::human_ms(3_600_000), "60m0s");
        assert_eq!(super::human_ms(7_300_000), "2h1m");
    }
}
