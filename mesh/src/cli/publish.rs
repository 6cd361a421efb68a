//! `mesh publish module|data|firmware FILE --name NAME --version N`: sign a release and
//! upload it. Firmware may carry patches from earlier images (`--delta-from OLD`): each
//! is made with the codec that gives the smallest patch, uploaded as a blob of its own
//! (`Request::PutBlob`) before the release, and listed in the manifest, so a node that
//! runs one of those images fetches only its patch.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use mesh_actors::manifest::{DeltaRef, Manifest, ReleaseKind, SignedManifest};
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
    /// A firmware image for the A/B slots of the target named --name (`agent` is the
    /// agent's own binary under `mesh launcher`).
    Firmware(FirmwareArgs),
}

#[derive(Args, Debug)]
struct FirmwareArgs {
    #[command(flatten)]
    release: ReleaseArgs,
    /// An earlier image nodes may run; a patch from it to this one is published with
    /// the release. Repeatable.
    #[arg(long = "delta-from")]
    delta_from: Vec<PathBuf>,
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
    let (kind, r, delta_from) = match &args.what {
        PublishWhat::Module(r) => (ReleaseKind::Module, r, &[][..]),
        PublishWhat::Data(r) => (ReleaseKind::Data, r, &[][..]),
        PublishWhat::Firmware(f) => (ReleaseKind::Firmware, &f.release, &f.delta_from[..]),
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
    let mut manifest = release_manifest(kind, &r.name, r.version, &bytes, r.expires_in);
    let patches = make_patches(&bytes, delta_from, cli.json).await?;
    manifest.deltas = patches.iter().map(|(d, _)| d.clone()).collect();
    let signed = sign_manifest(manifest, &keys)?;
    let session = Session::attach(cli).await?;
    for (delta, patch) in &patches {
        put_blob(&session, patch)
            .await
            .with_context(|| format!("uploading the {} patch {}", delta.codec, delta.patch))?;
    }
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
    sign_manifest(
        release_manifest(kind, name, version, bytes, expires_in),
        keys,
    )
}

/// A release manifest for `bytes`, unsigned and without deltas.
pub fn release_manifest(
    kind: ReleaseKind,
    name: &str,
    version: u64,
    bytes: &[u8],
    expires_in: Option<u64>,
) -> Manifest {
    let now = mesh_actors::unix_ms() / 1000;
    Manifest {
        kind,
        name: name.to_string(),
        version,
        content: ContentId::of(bytes),
        size: bytes.len() as u64,
        created_unix: now,
        expires_unix: expires_in.map(|s| now + s),
        quotas: Default::default(),
        deltas: Vec::new(),
    }
}

/// Checks a manifest's shape and signs it with each of `keys`.
pub fn sign_manifest(manifest: Manifest, keys: &[SecretKey]) -> anyhow::Result<SignedManifest> {
    manifest.check_shape().with_context(|| {
        format!(
            "building the manifest for {} v{}",
            manifest.name, manifest.version
        )
    })?;
    let refs: Vec<&SecretKey> = keys.iter().collect();
    Ok(SignedManifest::sign(manifest, &refs))
}

/// A patch from each of `bases` to `image`, made with whichever codec gives the smallest
/// (`delta::create_best`, on a blocking thread), with the manifest entry naming it. A
/// base equal to the image needs no patch, and a patch no smaller than the image saves
/// nothing; both are left out.
pub async fn make_patches(
    image: &[u8],
    bases: &[PathBuf],
    quiet: bool,
) -> anyhow::Result<Vec<(DeltaRef, Vec<u8>)>> {
    let target = ContentId::of(image);
    let image: std::sync::Arc<[u8]> = image.into();
    let mut out: Vec<(DeltaRef, Vec<u8>)> = Vec::new();
    for path in bases {
        let old = read_file(path)?;
        let base = ContentId::of(&old);
        if base == target || out.iter().any(|(d, _)| d.base == base) {
            continue;
        }
        let new = image.clone();
        let (codec, patch) =
            tokio::task::spawn_blocking(move || mesh_actors::delta::create_best(&old, &new))
                .await?
                .with_context(|| format!("making a patch from {}", path.display()))?;
        if patch.len() >= image.len() {
            if !quiet {
                eprintln!(
                    "no patch from {}: the smallest ({} bytes) is no smaller than the image",
                    path.display(),
                    patch.len()
                );
            }
            continue;
        }
        if !quiet {
            eprintln!(
                "patch from {} ({}): {} bytes with {codec}, {:.1}% of the image",
                path.display(),
                base.short(),
                patch.len(),
                100.0 * patch.len() as f64 / image.len().max(1) as f64
            );
        }
        let delta = DeltaRef {
            base,
            patch: ContentId::of(&patch),
            patch_size: patch.len() as u64,
            codec: codec.name().to_string(),
        };
        out.push((delta, patch));
    }
    Ok(out)
}

/// Stores `bytes` as a blob on the attached node (verified there against its hash).
pub async fn put_blob(session: &Session, bytes: &[u8]) -> anyhow::Result<ContentId> {
    let id = ContentId::of(bytes);
    let req = Request::PutBlob {
        id,
        size: bytes.len() as u64,
    };
    match session.request_with_body(&req, bytes).await? {
        Response::Stored { .. } => Ok(id),
        _ => bail!("unexpected response to a blob upload"),
    }
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
