//! `mesh keygen`: create an ed25519 key file.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use mesh_transport::SecretKey;

use super::Cli;

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Where to write the key (mode 0600). Default: the operator key path.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Replace an existing key file.
    #[arg(long)]
    force: bool,
}

pub fn run(cli: &Cli, args: &KeygenArgs) -> anyhow::Result<()> {
    let path = args
        .out
        .clone()
        .or_else(|| cli.key.clone())
        .or_else(super::default_key_path)
        .context("no path for the key: pass --out FILE")?;
    if path.exists() && !args.force {
        bail!(
            "creating a key: {} exists already (pass --force to replace it)",
            path.display()
        );
    }
    let key = SecretKey::generate();
    key.save(&path)
        .with_context(|| format!("creating a key at {}", path.display()))?;
    let public = key.public();
    let pub_path = path.with_extension("pub");
    std::fs::write(&pub_path, format!("{public}\n"))
        .with_context(|| format!("writing the public key to {}", pub_path.display()))?;
    if cli.json {
        super::print_json(&serde_json::json!({
            "key_file": path,
            "public_key_file": pub_path,
            "public_key": public,
        }))
    } else {
        println!(
            "wrote {} (public key in {})",
            path.display(),
            pub_path.display()
        );
        println!("{public}");
        Ok(())
    }
}
