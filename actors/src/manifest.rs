//! Release manifests: what a release is, who signed it, and its byte encoding.
//!
//! A manifest names one immutable piece of content (a wasm module or a firmware image)
//! by its BLAKE3 hash and size, and carries a strictly increasing version per name.
//! Signers sign the bincode encoding of the manifest under [`SIGNING_DOMAIN`], so a
//! signature over a release can never be replayed as a signature over anything else.
//! Whether a signed manifest is acceptable is decided in [`crate::trust`]; this module
//! only guarantees that a decoded manifest is well formed.

use std::fmt;
use std::str::FromStr;

use mesh_transport::wire::{self, WireError};
use mesh_transport::{ContentId, PublicKey, SecretKey, Signature};
use serde::Serialize;

/// Manifests are small; anything larger is hostile.
pub const MANIFEST_BYTES_MAX: usize = 64 * 1024;
/// Names appear in paths, logs and tables, so they are short and of a safe charset.
pub const NAME_BYTES_MAX: usize = 64; // names: [a-z0-9][a-z0-9._-]*
/// A threshold needs a handful of signers; more than this is padding meant to waste
/// verification time.
pub const SIGNATURES_MAX: usize = 16;
/// The domain every release signature is made under (see `PublicKey::verify`).
pub const SIGNING_DOMAIN: &[u8] = b"mesh/release/v1";

/// What a release contains, which decides how a node installs it and its size limit.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum ReleaseKind {
    /// A wasm module that runs in a sandbox.
    Module,
    /// A firmware image written to the inactive A/B slot.
    Firmware,
    /// Content nodes fetch, keep and serve without running it (models, configuration
    /// bundles, assets that modules read).
    Data,
}

impl ReleaseKind {
    /// The lowercase name used in logs, keys and on the command line.
    pub fn as_str(&self) -> &'static str {
        match self {
            ReleaseKind::Module => "module",
            ReleaseKind::Firmware => "firmware",
            ReleaseKind::Data => "data",
        }
    }
}

impl fmt::Display for ReleaseKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error from parsing a release kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("parsing release kind: expected \"module\" or \"firmware\", got {0:?}")]
pub struct ReleaseKindParseError(pub String);

impl FromStr for ReleaseKind {
    type Err = ReleaseKindParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "module" => Ok(ReleaseKind::Module),
            "firmware" => Ok(ReleaseKind::Firmware),
            "data" => Ok(ReleaseKind::Data),
            other => Err(ReleaseKindParseError(other.to_string())),
        }
    }
}

/// One release: the content it names and when it stops being installable.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub kind: ReleaseKind,
    pub name: String,
    /// Strictly increasing per (kind, name); a node never installs a version it has passed.
    pub version: u64,
    /// BLAKE3 of the whole content.
    pub content: ContentId,
    /// Size of the content in bytes.
    pub size: u64,
    pub created_unix: u64,
    /// After this instant the release is refused, so that an attacker who holds back
    /// newer releases cannot keep a fleet on an old one forever (a freeze attack).
    pub expires_unix: Option<u64>,
    /// What the module asks of the node's resources; each figure is capped by the
    /// node's own policy. Empty for firmware.
    pub quotas: Quotas,
    /// Binary patches that turn an earlier image into this one, so a node that runs a
    /// listed base fetches only the patch.
    pub deltas: Vec<DeltaRef>,
}

/// Per-module resource quotas a release declares. `None` takes the node's default.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Quotas {
    /// Linear memory of one instance.
    pub memory_bytes: Option<u64>,
    /// CPU time one call (init, on_tick, on_message) may take.
    pub call_ms: Option<u64>,
    /// Share of one core over time, in thousandths.
    pub cpu_share_permille: Option<u32>,
    /// Messages the module may publish per second.
    pub messages_per_s: Option<u32>,
    /// Log bytes per second.
    pub log_bytes_per_s: Option<u64>,
    /// Published bytes per second.
    pub publish_bytes_per_s: Option<u64>,
    /// Persistent key-value state.
    pub state_bytes: Option<u64>,
}

/// Deltas listed in one manifest; one per base image a fleet may still run.
pub const DELTAS_MAX: usize = 16;
/// Codec names are short identifiers such as "bsdiff" or "zstd".
pub const CODEC_BYTES_MAX: usize = 32;

/// A patch from `base` (BLAKE3 of the old image) to the manifest's content.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeltaRef {
    pub base: ContentId,
    /// BLAKE3 of the patch blob.
    pub patch: ContentId,
    pub patch_size: u64,
    /// Which codec made the patch; the patch blob records it too.
    pub codec: String,
}

/// One signer's signature over [`Manifest::signing_payload`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ManifestSignature {
    pub signer: PublicKey,
    pub signature: Signature,
}

impl ManifestSignature {
    /// Whether this signature verifies over `payload` (a manifest's signing payload).
    pub fn verifies(&self, payload: &[u8]) -> bool {
        self.signer.verify(SIGNING_DOMAIN, payload, &self.signature)
    }
}

/// A manifest with the signatures collected for it so far.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SignedManifest {
    pub manifest: Manifest,
    pub signatures: Vec<ManifestSignature>,
}

/// Why a manifest is malformed, independent of who signed it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    #[error("checking manifest name: the name is empty")]
    NameEmpty,
    #[error("checking manifest name: {len} bytes is over the limit of {NAME_BYTES_MAX} bytes")]
    NameTooLong { len: usize },
    #[error(
        "checking manifest name {name:?}: character {ch:?} at byte {at} is not allowed \
         (names are [a-z0-9][a-z0-9._-]*)"
    )]
    NameChar { name: String, ch: char, at: usize },
    #[error("checking manifest {name}: version must be at least 1")]
    VersionZero { name: String },
    #[error("checking manifest {name} v{version}: size must be at least 1 byte")]
    SizeZero { name: String, version: u64 },
    #[error(
        "checking manifest {name} v{version}: {count} deltas is over the limit of {DELTAS_MAX}"
    )]
    TooManyDeltas {
        name: String,
        version: u64,
        count: usize,
    },
    #[error("checking manifest {name} v{version}: delta codec name {codec:?} is empty, too long or not [a-z0-9-]")]
    Codec {
        name: String,
        version: u64,
        codec: String,
    },
}

/// Errors from decoding a signed manifest received from a peer or read from disk.
#[derive(Debug, thiserror::Error)]
pub enum ManifestDecodeError {
    #[error("decoding signed manifest: {0}")]
    Wire(#[from] WireError),
    #[error("decoding signed manifest: {count} signatures is over the limit of {SIGNATURES_MAX}")]
    TooManySignatures { count: usize },
    #[error("decoding signed manifest: {0}")]
    Shape(#[from] ShapeError),
}

/// Checks a release name against `[a-z0-9][a-z0-9._-]*` and [`NAME_BYTES_MAX`].
pub fn check_name(name: &str) -> Result<(), ShapeError> {
    if name.is_empty() {
        return Err(ShapeError::NameEmpty);
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(ShapeError::NameTooLong { len: name.len() });
    }
    for (at, ch) in name.char_indices() {
        let allowed = ch.is_ascii_lowercase()
            || ch.is_ascii_digit()
            || (at > 0 && matches!(ch, '.' | '_' | '-'));
        if !allowed {
            return Err(ShapeError::NameChar {
                name: name.to_string(),
                ch,
                at,
            });
        }
    }
    Ok(())
}

impl Manifest {
    /// The bytes every signer signs: the bincode encoding of the manifest. The domain
    /// is applied by `SecretKey::sign` / `PublicKey::verify`.
    pub fn signing_payload(&self) -> Vec<u8> {
        encode_owned(self)
    }

    /// Checks what can be checked without keys: the name's charset and length, and
    /// that version and size are at least 1.
    pub fn check_shape(&self) -> Result<(), ShapeError> {
        check_name(&self.name)?;
        if self.version == 0 {
            return Err(ShapeError::VersionZero {
                name: self.name.clone(),
            });
        }
        if self.size == 0 {
            return Err(ShapeError::SizeZero {
                name: self.name.clone(),
                version: self.version,
            });
        }
        if self.deltas.len() > DELTAS_MAX {
            return Err(ShapeError::TooManyDeltas {
                name: self.name.clone(),
                version: self.version,
                count: self.deltas.len(),
            });
        }
        for d in &self.deltas {
            let ok = !d.codec.is_empty()
                && d.codec.len() <= CODEC_BYTES_MAX
                && d.codec
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !ok {
                return Err(ShapeError::Codec {
                    name: self.name.clone(),
                    version: self.version,
                    codec: d.codec.clone(),
                });
            }
        }
        Ok(())
    }
}

impl SignedManifest {
    /// Signs `manifest` with each of `keys`, in order.
    pub fn sign(manifest: Manifest, keys: &[&SecretKey]) -> SignedManifest {
        let mut signed = SignedManifest {
            manifest,
            signatures: Vec::with_capacity(keys.len()),
        };
        for key in keys {
            signed.add_signature(key);
        }
        signed
    }

    /// Adds `key`'s signature, for threshold signing by several holders who pass the
    /// manifest along. Signing twice with the same key replaces the earlier signature,
    /// so the list never holds duplicates that would only waste verification.
    pub fn add_signature(&mut self, key: &SecretKey) {
        let payload = self.manifest.signing_payload();
        let entry = ManifestSignature {
            signer: key.public(),
            signature: key.sign(SIGNING_DOMAIN, &payload),
        };
        match self
            .signatures
            .iter_mut()
            .find(|s| s.signer == entry.signer)
        {
            Some(existing) => *existing = entry,
            None => self.signatures.push(entry),
        }
    }

    /// The wire and storage form.
    pub fn encode(&self) -> Vec<u8> {
        encode_owned(self)
    }

    /// Decodes untrusted bytes: at most [`MANIFEST_BYTES_MAX`], exactly one value, at
    /// most [`SIGNATURES_MAX`] signatures and a well-formed manifest. Signatures are not
    /// verified here; that is the trust policy's job.
    pub fn decode(bytes: &[u8]) -> Result<SignedManifest, ManifestDecodeError> {
        let signed: SignedManifest = wire::decode(bytes, MANIFEST_BYTES_MAX)?;
        if signed.signatures.len() > SIGNATURES_MAX {
            return Err(ManifestDecodeError::TooManySignatures {
                count: signed.signatures.len(),
            });
        }
        signed.manifest.check_shape()?;
        Ok(signed)
    }

    /// BLAKE3 of [`SignedManifest::encode`], used to drop gossip duplicates.
    pub fn id(&self) -> ContentId {
        ContentId::of(&self.encode())
    }
}

/// Encodes a value of ours. bincode only fails to encode types it cannot represent
/// (such as sequences of unknown length), which these plain structs never contain, so a
/// failure here is a programming error rather than bad input.
fn encode_owned<T: Serialize>(value: &T) -> Vec<u8> {
    wire::encode(value).expect("manifest types always encode with bincode")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            kind: ReleaseKind::Module,
            name: "temp-sensor.v2_x".into(),
            version: 3,
            content: ContentId::of(b"wasm bytes"),
            size: 10,
            created_unix: 1_700_000_000,
            expires_unix: Some(1_800_000_000),
            quotas: Default::default(),
            deltas: Vec::new(),
        }
    }

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed([n; 32])
    }

    fn all_verify(s: &SignedManifest) -> bool {
        let payload = s.manifest.signing_payload();
        s.signatures.iter().all(|sig| sig.verifies(&payload))
    }

    #[test]
    fn round_trip() {
        let (a, b) = (key(1), key(2));
        let s = SignedManifest::sign(manifest(), &[&a, &b]);
        let bytes = s.encode();
        let back = SignedManifest::decode(&bytes).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.id(), s.id());
        assert_eq!(s.id(), ContentId::of(&bytes));
    }

    #[test]
    fn signatures_verify_and_add_signature_dedups() {
        let (a, b) = (key(1), key(2));
        let mut s = SignedManifest::sign(manifest(), &[&a]);
        assert!(all_verify(&s));
        s.add_signature(&b);
        s.add_signature(&a);
        assert_eq!(s.signatures.len(), 2);
        assert_eq!(s.signatures[0].signer, a.public());
        assert_eq!(s.signatures[1].signer, b.public());
        assert!(all_verify(&s));
        // A signature over the same payload under another domain does not verify.
        let payload = s.manifest.signing_payload();
        let wrong = ManifestSignature {
            signer: a.public(),
            signature: a.sign(b"mesh/other/v1", &payload),
        };
        assert!(!wrong.verifies(&payload));
    }

    #[test]
    fn tampering_with_any_field_invalidates() {
        let s = SignedManifest::sign(manifest(), &[&key(1)]);
        let tampers: [fn(&mut Manifest); 8] = [
            |m| m.kind = ReleaseKind::Firmware,
            |m| m.name.push('x'),
            |m| m.version += 1,
            |m| m.content = ContentId::of(b"evil"),
            |m| m.size += 1,
            |m| m.created_unix += 1,
            |m| m.expires_unix = None,
            |m| m.expires_unix = Some(u64::MAX),
        ];
        for (i, tamper) in tampers.iter().enumerate() {
            let mut t = s.clone();
            tamper(&mut t.manifest);
            assert_ne!(t.manifest, s.manifest, "tamper {i} changed nothing");
            assert!(!all_verify(&t), "tamper {i} kept the signature valid");
        }
        // Swapping in another signer's key under the same signature fails too.
        let mut t = s.clone();
        t.signatures[0].signer = key(2).public();
        assert!(!all_verify(&t));
    }

    #[test]
    fn decode_rejects_oversize_and_trailing_bytes() {
        let s = SignedManifest::sign(manifest(), &[&key(1)]);
        let mut bytes = s.encode();
        bytes.push(0);
        assert!(matches!(
            SignedManifest::decode(&bytes),
            Err(ManifestDecodeError::Wire(WireError::Trailing(1)))
        ));
        let big = vec![0u8; MANIFEST_BYTES_MAX + 1];
        assert!(matches!(
            SignedManifest::decode(&big),
            Err(ManifestDecodeError::Wire(WireError::TooLarge { .. }))
        ));
        // A name long enough to push the encoding over the limit is refused by size,
        // before any shape check.
        let mut m = manifest();
        m.name = "a".repeat(MANIFEST_BYTES_MAX);
        let huge = SignedManifest {
            manifest: m,
            signatures: vec![],
        };
        assert!(matches!(
            SignedManifest::decode(&huge.encode()),
            Err(ManifestDecodeError::Wire(WireError::TooLarge { .. }))
        ));
        let bytes = s.encode();
        assert!(SignedManifest::decode(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn decode_rejects_too_many_signatures() {
        let keys: Vec<SecretKey> = (0..=SIGNATURES_MAX as u8).map(key).collect();
        let refs: Vec<&SecretKey> = keys.iter().collect();
        let s = SignedManifest::sign(manifest(), &refs[..SIGNATURES_MAX]);
        assert!(SignedManifest::decode(&s.encode()).is_ok());
        let s = SignedManifest::sign(manifest(), &refs);
        assert!(matches!(
            SignedManifest::decode(&s.encode()),
            Err(ManifestDecodeError::TooManySignatures { count }) if count == SIGNATURES_MAX + 1
        ));
    }

    #[test]
    fn decode_rejects_bad_names_and_zero_fields() {
        let bad = [
            "",
            "Upper",
            "-lead",
            ".lead",
            "_lead",
            "has space",
            "slash/name",
            "dots/../up",
            "ünicode",
        ];
        for name in bad {
            let mut m = manifest();
            m.name = name.to_string();
            let s = SignedManifest::sign(m, &[&key(1)]);
            assert!(
                matches!(
                    SignedManifest::decode(&s.encode()),
                    Err(ManifestDecodeError::Shape(_))
                ),
                "name {name:?} was accepted"
            );
        }
        let mut m = manifest();
        m.name = "a".repeat(NAME_BYTES_MAX + 1);
        assert_eq!(
            m.check_shape(),
            Err(ShapeError::NameTooLong {
                len: NAME_BYTES_MAX + 1
            })
        );
        m.name = "a".repeat(NAME_BYTES_MAX);
        assert_eq!(m.check_shape(), Ok(()));
        for good in ["a", "0", "a.b-c_d", "fw9"] {
            assert_eq!(check_name(good), Ok(()), "name {good:?} was refused");
        }
        let mut m = manifest();
        m.version = 0;
        assert!(matches!(
            m.check_shape(),
            Err(ShapeError::VersionZero { .. })
        ));
        let mut m = manifest();
        m.size = 0;
        assert!(matches!(m.check_shape(), Err(ShapeError::SizeZero { .. })));
    }

    #[test]
    fn kind_display_and_parse() {
        for kind in [ReleaseKind::Module, ReleaseKind::Firmware] {
            assert_eq!(kind.to_string().parse::<ReleaseKind>(), Ok(kind));
        }
        assert_eq!(ReleaseKind::Module.to_string(), "module");
        assert_eq!(ReleaseKind::Firmware.to_string(), "firmware");
        assert!("Module".parse::<ReleaseKind>().is_err());
    }
}
