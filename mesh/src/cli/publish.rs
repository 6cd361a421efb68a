//! `mesh publish module FILE --name NAME --version N`: sign a release and upload it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use mesh_actors::manifest::{Manifest, ReleaseKind, SignedManifest};
use mesh_transport::{ContentId, SecretKey};

use super::client::Session;
use super::Cli;
use crate::proto::{PublishInfo, Request, Response};

/// Uploads smaller than this finish too fast for a progress display to help.
const PROGRESS_BYTES_MIN: usize = 1024 * 1024;

/// Files are read whole into memory to hash and sign; the node enforces its own per-kind limit.
pub const PUBLISH_FILE_BYTES_MAX: u64 = 512 * 1024 * 1024;

#[derive(Args, Debug)]
pub struct PublishArgs {
    #[command(subcommand)]
    what: PublishWhat,
}

#[derive(Subcommand, Debug)]
enum PublishWhat {
    /// A WASM module (binary .wasm or WAT text).
    Module(ReleaseArgs),
    /// A data blob that nodes fetch, keep and serve (a model, a configuration bundle).
    Data(ReleaseArgs),
}

#[derive(Args, Debug)]
struct ReleaseArgs {
    /// The file to publish.
    file: PathBuf,
    /// The release name (lowercase letters, digits, '.', '_', '-').
    #[arg(long)]
    name: String,
    /// The release version; must be greater than every earlier version of this name.
    #[arg(long)]
    version: u64,
    /// A release key file to sign with; repeat for threshold signing. Default: the operator key.
    #[arg(long = "release-key")]
    release_keys: Vec<PathBuf>,
    /// Seconds until nodes refuse this manifest (a freeze guard); default: never.
    #[arg(long)]
    expires_in: Option<u64>,
}

pub async fn run(cli: &Cli, args: &PublishArgs) -> anyhow::Result<()> {
    let (kind, r) = match &args.what {
        PublishWhat::Module(r) => (ReleaseKind::Module, r),
        PublishWhat::Data(r) => (ReleaseKind::Data, r),
    };
    let bytes = read_file(&r.file)?;
    let key_paths = if r.release_keys.is_empty() {
        vec![cli
            .key
            .clone()
            .or_else(super::default_key_path)
            .context("no release key: pass --release-key FILE")?]
    } else {
        r.release_keys.clone()
    };
    let keys = key_paths
        .iter()
        .map(|p| SecretKey::load(p).with_context(|| format!("loading release key {}", p.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let signed = sign_release(kind, &r.name, r.version, &bytes, &keys, r.expires_in)?;
    let session = Session::attach(cli).await?;
    let mut progress = (!cli.json && bytes.len() >= PROGRESS_BYTES_MIN).then(|| {
        super::progress::Progress::new(&format!("uploading {}", r.name), bytes.len() as u64)
    });
    let total = bytes.len() as u64;
    let req = Request::Publish {
        manifest: signed.encode(),
    };
    let response = session
        .request_with_progress(&req, &bytes, |done| {
            if let Some(p) = progress.as_mut() {
                p.update(done, total, None, None);
            }
        })
        .await
        .with_context(|| format!("publishing {} v{}", r.name, r.version))?;
    if let Some(p) = progress {
        p.finish();
    }
    let Response::Published(info) = response else {
        bail!("publishing {} v{}: unexpected response", r.name, r.version);
    };
    session.close().await;
    if cli.json {
        return super::print_json(&info);
    }
    println!(
        "published {} v{} ({} bytes, blake3 {}) to {}; announced to {} peer(s)",
        info.name, info.version, info.size, info.content, cli.node, info.peers
    );
    Ok(())
}

fn read_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if meta.len() > PUBLISH_FILE_BYTES_MAX {
        bail!(
            "reading {}: {} bytes is over the limit of {PUBLISH_FILE_BYTES_MAX}",
            path.display(),
            meta.len()
        );
    }
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Builds and signs a release manifest for `bytes`.
pub fn sign_release(
    kind: ReleaseKind,
    name: &str,
    version: u64,
    bytes: &[u8],
    keys: &[SecretKey],
    expires_in: Option<u64>,
) -> anyhow::Result<SignedManifest> {
    let now = mesh_actors::unix_ms() / 1000;
    let manifest = Manifest {
        kind,
        name: name.to_string(),
        version,
        content: ContentId::of(bytes),
        size: bytes.len() as u64,
        created_unix: now,
        expires_unix: expires_in.map(|s| now + s),
        quotas: Default::default(),
        deltas: Vec::new(),
    };
    manifest
        .check_shape()
        .with_context(|| format!("building the manifest for {name} v{version}"))?;
    let refs: Vec<&SecretKey> = keys.iter().collect();
    Ok(SignedManifest::sign(manifest, &refs))
}

/// Uploads a signed release and its content through an attached session.
pub async fn upload(
    session: &Session,
    signed: &SignedManifest,
    bytes: &[u8],
) -> anyhow::Result<PublishInfo> {
    let req = Request::Publish {
        manifest: signed.encode(),
    };
    match session.request_with_body(&req, bytes).await? {
        Response::Published(info) => Ok(info),
        _ => bail!("unexpected response to a publish"),
    }
}
