//! The release trust check: a pure function of the policy, the signed manifest, the
//! current time and the installed version. No IO and no clock reads happen here, so every
//! outcome is reproducible in a test and the trust actor only feeds it and logs the result.

use std::collections::BTreeSet;

use mesh_transport::PublicKey;

use crate::manifest::{ReleaseKind, SignedManifest, SIGNATURES_MAX};

/// A wasm module is code plus small tables; 16 MiB is generous for a device with 256 MiB
/// of RAM, which must compile and run it next to other modules.
pub const DEFAULT_MODULE_BYTES_MAX: u64 = 16 * 1024 * 1024;
/// A firmware image must fit one A/B slot; 512 MiB covers a full Linux root filesystem
/// for the devices we target while stopping a release from filling the disk.
pub const DEFAULT_FIRMWARE_BYTES_MAX: u64 = 512 * 1024 * 1024;
/// One trusted signature by default; fleets raise it to require several key holders.
pub const DEFAULT_THRESHOLD: usize = 1;

/// Which release keys a node trusts and what it accepts from them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct TrustPolicy {
    /// Keys whose signatures count toward the threshold.
    pub release_keys: BTreeSet<PublicKey>,
    /// How many distinct trusted keys must sign a release; 0 is treated as 1.
    pub threshold: usize,
    pub module_bytes_max: u64,
    pub firmware_bytes_max: u64,
}

impl Default for TrustPolicy {
    fn default() -> Self {
        TrustPolicy {
            release_keys: BTreeSet::new(),
            threshold: DEFAULT_THRESHOLD,
            module_bytes_max: DEFAULT_MODULE_BYTES_MAX,
            firmware_bytes_max: DEFAULT_FIRMWARE_BYTES_MAX,
        }
    }
}

/// Why a release was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("refusing release: this node trusts no release keys, so it can accept none")]
    NoTrustedKeys,
    #[error(
        "refusing release: the signature by trusted key {signer} does not verify, \
         so the manifest was altered after signing"
    )]
    BadSignature { signer: PublicKey },
    #[error(
        "refusing release: {valid} distinct trusted signer(s), {needed} needed \
         ({untrusted} signature(s) by untrusted keys ignored)"
    )]
    TooFewSigners {
        valid: usize,
        needed: usize,
        untrusted: usize,
    },
    #[error(
        "refusing release {name} v{version}: not newer than the installed v{current} \
         (a rollback)"
    )]
    NotNewer {
        name: String,
        version: u64,
        current: u64,
    },
    #[error(
        "refusing release {name} v{version}: it expired at unix time {expires_unix} \
         and it is now {now_unix} (a freeze guard)"
    )]
    Expired {
        name: String,
        version: u64,
        expires_unix: u64,
        now_unix: u64,
    },
    #[error("refusing release {name}: {size} bytes is over the limit of {max} bytes")]
    TooLarge { name: String, size: u64, max: u64 },
    #[error("refusing release: malformed manifest: {0}")]
    Shape(String),
}

impl TrustPolicy {
    /// The largest content this policy accepts for `kind`.
    pub fn bytes_max(&self, kind: ReleaseKind) -> u64 {
        match kind {
            ReleaseKind::Module => self.module_bytes_max,
            ReleaseKind::Firmware | ReleaseKind::Data => self.firmware_bytes_max,
        }
    }

    /// Decides whether `signed` may be installed at `now_unix` over `current_version`.
    ///
    /// Authenticity is checked before the policy checks, so that a forged manifest is
    /// reported as forged rather than as, say, expired.
    pub fn check(
        &self,
        signed: &SignedManifest,
        now_unix: u64,
        current_version: Option<u64>,
    ) -> Result<(), Rejection> {
        let m = &signed.manifest;
        m.check_shape()
            .map_err(|e| Rejection::Shape(e.to_string()))?;
        // A manifest built locally has not been through decode, so bound the
        // verification work here as well.
        if signed.signatures.len() > SIGNATURES_MAX {
            return Err(Rejection::Shape(format!(
                "{} signatures is over the limit of {SIGNATURES_MAX}",
                signed.signatures.len()
            )));
        }
        if self.release_keys.is_empty() {
            return Err(Rejection::NoTrustedKeys);
        }

        let payload = m.signing_payload();
        let mut valid: BTreeSet<PublicKey> = BTreeSet::new();
        let mut untrusted: BTreeSet<PublicKey> = BTreeSet::new();
        for sig in &signed.signatures {
            if !self.release_keys.contains(&sig.signer) {
                // Someone else's signature proves nothing to us, but is not an attack.
                untrusted.insert(sig.signer);
                continue;
            }
            if !sig.verifies(&payload) {
                // A trusted key never signs something that fails to verify, so the
                // manifest or the signature was changed on the way.
                return Err(Rejection::BadSignature { signer: sig.signer });
            }
            valid.insert(sig.signer);
        }
        let needed = self.threshold.max(1);
        if valid.len() < needed {
            return Err(Rejection::TooFewSigners {
                valid: valid.len(),
                needed,
                untrusted: untrusted.len(),
            });
        }

        if let Some(current) = current_version {
            if m.version <= current {
                return Err(Rejection::NotNewer {
                    name: m.name.clone(),
                    version: m.version,
                    current,
                });
            }
        }
        if let Some(expires_unix) = m.expires_unix {
            if expires_unix <= now_unix {
                return Err(Rejection::Expired {
                    name: m.name.clone(),
                    version: m.version,
                    expires_unix,
                    now_unix,
                });
            }
        }
        let max = self.bytes_max(m.kind);
        if m.size > max {
            return Err(Rejection::TooLarge {
                name: m.name.clone(),
                size: m.size,
                max,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Manifest, ManifestSignature};
    use mesh_transport::{ContentId, SecretKey};

    const NOW: u64 = 1_700_000_000;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed([n; 32])
    }

    fn manifest(kind: ReleaseKind, version: u64, size: u64) -> Manifest {
        Manifest {
            kind,
            name: "app".into(),
            version,
            content: ContentId::of(b"content"),
            size,
            created_unix: NOW - 10,
            expires_unix: Some(NOW + 3600),
            quotas: Default::default(),
            deltas: Vec::new(),
        }
    }

    fn policy(keys: &[&SecretKey], threshold: usize) -> TrustPolicy {
        TrustPolicy {
            release_keys: keys.iter().map(|k| k.public()).collect(),
            threshold,
            ..TrustPolicy::default()
        }
    }

    #[test]
    fn accepts_a_good_release() {
        let a = key(1);
        let s = SignedManifest::sign(manifest(ReleaseKind::Module, 2, 100), &[&a]);
        assert_eq!(policy(&[&a], 1).check(&s, NOW, Some(1)), Ok(()));
        assert_eq!(policy(&[&a], 1).check(&s, NOW, None), Ok(()));
    }

    #[test]
    fn no_trusted_keys() {
        let a = key(1);
        let s = SignedManifest::sign(manifest(ReleaseKind::Module, 1, 1), &[&a]);
        assert_eq!(
            policy(&[], 1).check(&s, NOW, None),
            Err(Rejection::NoTrustedKeys)
        );
    }

    #[test]
    fn bad_signature_by_trusted_key() {
        let (a, b) = (key(1), key(2));
        let mut s = SignedManifest::sign(manifest(ReleaseKind::Module, 1, 1), &[&a, &b]);
        // b's signature is replaced by one over different bytes.
        s.signatures[1].signature = b.sign(crate::manifest::SIGNING_DOMAIN, b"other");
        assert_eq!(
            policy(&[&a, &b], 1).check(&s, NOW, None),
            Err(Rejection::BadSignature { signer: b.public() })
        );
        // Tampering with the manifest breaks every signature; the first trusted one is named.
        let mut s = SignedManifest::sign(manifest(ReleaseKind::Module, 1, 1), &[&a]);
        s.manifest.version = 9;
        assert_eq!(
            policy(&[&a], 1).check(&s, NOW, None),
            Err(Rejection::BadSignature { signer: a.public() })
        );
    }

    #[test]
    fn untrusted_signers_are_ignored_but_counted() {
        let (a, x, y) = (key(1), key(8), key(9));
        let mut s = SignedManifest::sign(manifest(ReleaseKind::Module, 1, 1), &[&x, &y]);
        // An untrusted signature that does not even verify is ignored, not fatal.
        s.signatures[1].signature = y.sign(b"junk", b"junk");
        assert_eq!(
            policy(&[&a], 1).check(&s, NOW, None),
            Err(Rejection::TooFewSigners {
                valid: 0,
                needed: 1,
                untrusted: 2
            })
        );
        s.add_signature(&a);
        assert_eq!(policy(&[&a], 1).check(&s, NOW, None), Ok(()));
    }

    #[test]
    fn threshold_two_of_three() {
        let (a, b, c) = (key(1), key(2), key(3));
        let p = policy(&[&a, &b, &c], 2);
        let m = manifest(ReleaseKind::Firmware, 5, 1000);
        let one = SignedManifest::sign(m.clone(), &[&b]);
        assert_eq!(
            p.check(&one, NOW, Some(4)),
            Err(Rejection::TooFewSigners {
                valid: 1,
                needed: 2,
                untrusted: 0
            })
        );
        for pair in [[&a, &b], [&a, &c], [&b, &c]] {
            let s = SignedManifest::sign(m.clone(), &pair);
            assert_eq!(p.check(&s, NOW, Some(4)), Ok(()));
        }
        let all = SignedManifest::sign(m, &[&a, &b, &c]);
        assert_eq!(p.check(&all, NOW, Some(4)), Ok(()));
    }

    #[test]
    fn a_key_listed_twice_counts_once() {
        let (a, b) = (key(1), key(2));
        let mut s = SignedManifest::sign(manifest(ReleaseKind::Module, 1, 1), &[&a]);
        // add_signature refuses duplicates, so forge the list by hand as a peer could.
        let dup: ManifestSignature = s.signatures[0].clone();
        s.signatures.push(dup);
        assert_eq!(
            policy(&[&a, &b], 2).check(&s, NOW, None),
            Err(Rejection::TooFewSigners {
                valid: 1,
                needed: 2,
                untrusted: 0
            })
        );
    }

    #[test]
    fn threshold_zero_is_one() {
        let (a, x) = (key(1), key(9));
        let s = SignedManifest::sign(manifest(ReleaseKind::Module, 1, 1), &[&x]);
        assert_eq!(
            policy(&[&a], 0).check(&s, NOW, None),
            Err(Rejection::TooFewSigners {
                valid: 0,
                needed: 1,
                untrusted: 1
            })
        );
        let unsigned = SignedManifest {
            manifest: manifest(ReleaseKind::Module, 1, 1),
            signatures: vec![],
        };
        assert!(matches!(
            policy(&[&a], 0).check(&unsigned, NOW, None),
            Err(Rejection::TooFewSigners { needed: 1, .. })
        ));
    }

    #[test]
    fn not_newer() {
        let a = key(1);
        let p = policy(&[&a], 1);
        let s = SignedManifest::sign(manifest(ReleaseKind::Module, 3, 1), &[&a]);
        for current in [3, 4] {
            let err = p.check(&s, NOW, Some(current)).unwrap_err();
            assert_eq!(
                err,
                Rejection::NotNewer {
                    name: "app".into(),
                    version: 3,
                    current
                }
            );
            assert!(err.to_string().contains("app v3"), "{err}");
        }
        assert_eq!(p.check(&s, NOW, Some(2)), Ok(()));
    }

    #[test]
    fn expired() {
        let a = key(1);
        let p = policy(&[&a], 1);
        let mut m = manifest(ReleaseKind::Module, 1, 1);
        m.expires_unix = Some(NOW);
        let s = SignedManifest::sign(m.clone(), &[&a]);
        assert_eq!(
            p.check(&s, NOW, None),
            Err(Rejection::Expired {
                name: "app".into(),
                version: 1,
                expires_unix: NOW,
                now_unix: NOW
            })
        );
        assert_eq!(p.check(&s, NOW - 1, None), Ok(()));
        m.expires_unix = None;
        let s = SignedManifest::sign(m, &[&a]);
        assert_eq!(p.check(&s, u64::MAX, None), Ok(()));
    }

    #[test]
    fn too_large_per_kind() {
        let a = key(1);
        let p = policy(&[&a], 1);
        let over = DEFAULT_MODULE_BYTES_MAX + 1;
        let s = SignedManifest::sign(manifest(ReleaseKind::Module, 1, over), &[&a]);
        assert_eq!(
            p.check(&s, NOW, None),
            Err(Rejection::TooLarge {
                name: "app".into(),
                size: over,
                max: DEFAULT_MODULE_BYTES_MAX
            })
        );
        // The same size is fine for firmware, whose limit is larger.
        let s = SignedManifest::sign(manifest(ReleaseKind::Firmware, 1, over), &[&a]);
        assert_eq!(p.check(&s, NOW, None), Ok(()));
        let over = DEFAULT_FIRMWARE_BYTES_MAX + 1;
        let s = SignedManifest::sign(manifest(ReleaseKind::Firmware, 1, over), &[&a]);
        assert!(matches!(
            p.check(&s, NOW, None),
            Err(Rejection::TooLarge {
                max: DEFAULT_FIRMWARE_BYTES_MAX,
                ..
            })
        ));
    }

    #[test]
    fn shape() {
        let a = key(1);
        let p = policy(&[&a], 1);
        let mut m = manifest(ReleaseKind::Module, 1, 1);
        m.name = "Bad Name".into();
        let s = SignedManifest::sign(m, &[&a]);
        assert!(matches!(p.check(&s, NOW, None), Err(Rejection::Shape(_))));
        let keys: Vec<SecretKey> = (0..=SIGNATURES_MAX as u8).map(key).collect();
        let refs: Vec<&SecretKey> = keys.iter().collect();
        let s = SignedManifest::sign(manifest(ReleaseKind::Module, 1, 1), &refs);
        assert!(matches!(p.check(&s, NOW, None), Err(Rejection::Shape(_))));
    }

    #[test]
    fn default_policy_and_serde() {
        let p = TrustPolicy::default();
        assert_eq!(p.threshold, 1);
        assert_eq!(p.module_bytes_max, 16 << 20);
        assert_eq!(p.firmware_bytes_max, 512 << 20);
        let with_key = policy(&[&key(1)], 2);
        let bytes = mesh_transport::wire::encode(&with_key).unwrap();
        let back: TrustPolicy = mesh_transport::wire::decode(&bytes, 4096).unwrap();
        assert_eq!(back, with_key);
    }
}
