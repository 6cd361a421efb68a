//! The release pipeline: offers of signed manifests (from gossip, from a peer's release
//! list after a reconnect, or from the operator) are checked against the trust policy,
//! their content is fetched from peers and verified, then recorded and, for modules,
//! handed to the sandbox supervisor. Firmware is recorded at once and handed to the
//! firmware actor, which fetches the full image or only a patch, as the node needs.
//!
//! [`ReleaseBook`] decides (pure, time passed in); [`ReleaseActor`] is the "trust" actor
//! of the node's tree that carries the decisions out.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_transport::libp2p::PeerId;
use mesh_transport::swarm::SwarmHandle;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::firmware::FirmwareMsg;
use crate::mailbox::Envelope;
use crate::manifest::{ReleaseKind, SignedManifest};
use crate::node::Addr;
use crate::peers::{short_peer, PeersMsg};
use crate::sandbox_supervisor::{Deployment, SandboxMsg};
use crate::store::ContentStore;
use crate::trust::{Rejection, TrustPolicy};

/// The gossipsub topic on which releases are announced.
pub const RELEASES_TOPIC: &str = "mesh/releases/1";
/// Releases waiting for their content; more offers than this are refused until some
/// finish, so a flood of valid-looking manifests cannot grow memory.
pub const PENDING_MAX: usize = 256;
/// Blob downloads running at once; each holds one open writer and one request in flight.
pub const FETCHES_CONCURRENT_MAX: usize = 4;
/// A release whose content could not be fetched this many times is dropped; a later
/// offer (gossip or a peer's release list) starts it again.
pub const FETCH_ATTEMPTS_MAX: u32 = 12;
/// First wait before retrying a failed fetch; doubles per attempt up to the max.
pub const FETCH_BACKOFF_INITIAL: Duration = Duration::from_millis(500);
pub const FETCH_BACKOFF_MAX: Duration = Duration::from_secs(30);

type Key = (ReleaseKind, String);

#[derive(Debug)]
struct Pending {
    signed: SignedManifest,
    hint: Option<PeerId>,
    attempts: u32,
    next_at: Instant,
    fetching: bool,
}

/// What to do with an offered release.
#[derive(Debug, PartialEq, Eq)]
pub enum OfferDecision {
    /// Valid and its content is here: record and run it.
    Install,
    /// Valid; its content will be fetched (see [`ReleaseBook::poll_fetches`]).
    Fetch,
    /// Refused by the trust policy.
    Reject(Rejection),
    /// Nothing to do (already installed or already pending); the reason is for logs.
    Ignore(&'static str),
}

/// Releases on their way to being installed.
#[derive(Debug, Default)]
pub struct ReleaseBook {
    pending: BTreeMap<Key, Pending>,
}

impl ReleaseBook {
    /// Decides what to do with an offer. `current` is the installed version of that
    /// release name; `has_content` says whether its blob is already stored.
    #[allow(clippy::too_many_arguments)]
    pub fn offer(
        &mut self,
        policy: &TrustPolicy,
        signed: &SignedManifest,
        from: Option<PeerId>,
        current: Option<u64>,
        has_content: bool,
        now: Instant,
        now_unix: u64,
    ) -> OfferDecision {
        let m = &signed.manifest;
        if let Err(rejection) = policy.check(signed, now_unix, current) {
            if current == Some(m.version) && matches!(rejection, Rejection::NotNewer { .. }) {
                return OfferDecision::Ignore("already installed");
            }
            return OfferDecision::Reject(rejection);
        }
        let key = (m.kind, m.name.clone());
        if let Some(p) = self.pending.get_mut(&key) {
            if p.signed.manifest.version > m.version {
                return OfferDecision::Ignore("a newer version is pending");
            }
            if p.signed.manifest.version == m.version {
                // A second announcer is a second source: remember it if we had none.
                if p.hint.is_none() {
                    p.hint = from;
                }
                return OfferDecision::Ignore("already pending");
            }
        }
        if has_content {
            self.pending.remove(&key);
            return OfferDecision::Install;
        }
        if !self.pending.contains_key(&key) && self.pending.len() >= PENDING_MAX {
            return OfferDecision::Ignore("too many releases pending");
        }
        // A newer version replaces an older pending one; a fetch already running for
        // the older one finishes and is then found stale in `fetch_done`.
        self.pending.insert(
            key,
            Pending {
                signed: signed.clone(),
                hint: from,
                attempts: 0,
                next_at: now,
                fetching: false,
            },
        );
        OfferDecision::Fetch
    }

    /// Releases whose fetch should start now, with the peer that announced each.
    pub fn poll_fetches(&mut self, now: Instant) -> Vec<(SignedManifest, Option<PeerId>)> {
        let running = self.pending.values().filter(|p| p.fetching).count();
        let mut out = Vec::new();
        for p in self.pending.values_mut() {
            if running + out.len() >= FETCHES_CONCURRENT_MAX {
                break;
            }
            if !p.fetching && p.next_at <= now {
                p.fetching = true;
                out.push((p.signed.clone(), p.hint));
            }
        }
        out
    }

    /// Records the end of a fetch. Returns the manifest to install when the fetch that
    /// succeeded is still the one wanted.
    pub fn fetch_done(
        &mut self,
        kind: ReleaseKind,
        name: &str,
        version: u64,
        ok: bool,
        now: Instant,
    ) -> Option<SignedManifest> {
        let key = (kind, name.to_string());
        let p = self.pending.get_mut(&key)?;
        if p.signed.manifest.version != version {
            // A newer version arrived meanwhile; it is fetched on its own.
            p.fetching = false;
            return None;
        }
        if ok {
            return self.pending.remove(&key).map(|p| p.signed);
        }
        p.fetching = false;
        p.attempts += 1;
        if p.attempts >= FETCH_ATTEMPTS_MAX {
            self.pending.remove(&key);
            return None;
        }
        let backoff = FETCH_BACKOFF_INITIAL
            .saturating_mul(1u32 << p.attempts.min(16))
            .min(FETCH_BACKOFF_MAX);
        p.next_at = now + backoff;
        None
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

/// Messages to the release actor.
pub enum ReleaseMsg {
    /// A manifest heard from a peer (gossip or a release list).
    Offer {
        signed: SignedManifest,
        from: Option<PeerId>,
    },
    /// A manifest from the operator whose content is already in the store.
    Publish {
        signed: SignedManifest,
        reply: RpcReplyPort<Result<(), Rejection>>,
    },
    FetchDone {
        kind: ReleaseKind,
        name: String,
        version: u64,
        /// The peer that delivered most, if any did (the content may have been here).
        result: Result<Option<PeerId>, String>,
    },
    Tick,
    /// Hands every installed module to the sandbox supervisor again, after it restarted
    /// with none.
    Redeploy,
    /// The releases installed on this node.
    List(RpcReplyPort<Vec<SignedManifest>>),
}

#[derive(Clone)]
pub struct ReleaseArgs {
    pub policy: TrustPolicy,
    pub store: Arc<ContentStore>,
    pub swarm: SwarmHandle,
    pub fetch: crate::fetch::FetchCtx,
    pub sandbox: Addr<SandboxMsg>,
    pub peers: Addr<PeersMsg>,
    pub firmware: Addr<FirmwareMsg>,
    pub myself: Addr<ReleaseMsg>,
}

pub struct ReleaseState {
    args: ReleaseArgs,
    book: ReleaseBook,
}

/// The node's trust actor: the only place releases are accepted.
pub struct ReleaseActor;

/// How often pending fetches are looked at.
const TICK: Duration = Duration::from_millis(250);

impl Actor for ReleaseActor {
    type Msg = Envelope<ReleaseMsg>;
    type State = ReleaseState;
    type Arguments = ReleaseArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: ReleaseArgs,
    ) -> Result<ReleaseState, ActorProcessingErr> {
        args.myself.set(Some(crate::mailbox::BoundedRef::new(
            myself,
            crate::node::RELEASES_MAILBOX_MAX,
        )));
        // Run what was installed before a restart; the store only holds verified blobs
        // and releases that passed the trust check when they were recorded.
        deploy_installed(&args).await?;
        let ticker = args.myself.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(TICK).await;
                match ticker.try_send(ReleaseMsg::Tick) {
                    Ok(()) | Err(crate::mailbox::MailboxError::Full { .. }) => {}
                    Err(_) => break,
                }
            }
        });
        Ok(ReleaseState {
            args,
            book: ReleaseBook::default(),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        envelope: Self::Msg,
        state: &mut ReleaseState,
    ) -> Result<(), ActorProcessingErr> {
        match envelope.msg {
            ReleaseMsg::Offer { signed, from } => state.offer(signed, from).await?,
            ReleaseMsg::Publish { signed, reply } => {
                let result = state.publish(signed).await?;
                let _ = reply.send(result);
            }
            ReleaseMsg::FetchDone {
                kind,
                name,
                version,
                result,
            } => {
                let ok = result.is_ok();
                match &result {
                    Ok(peer) => {
                        let from = peer.as_ref().map(short_peer).unwrap_or_default();
                        tracing::info!(release = %name, version, %from, "fetched and verified")
                    }
                    Err(e) => {
                        tracing::warn!(release = %name, version, error = %e, "fetching release content")
                    }
                }
                if let Some(signed) =
                    state
                        .book
                        .fetch_done(kind, &name, version, ok, Instant::now())
                {
                    state.install(&signed, None).await?;
                }
            }
            ReleaseMsg::Tick => state.start_fetches().await,
            ReleaseMsg::Redeploy => deploy_installed(&state.args).await?,
            ReleaseMsg::List(reply) => {
                let store = state.args.store.clone();
                let list = tokio::task::spawn_blocking(move || store.current_releases()).await??;
                let _ = reply.send(list);
            }
        }
        Ok(())
    }
}

impl ReleaseState {
    async fn current(
        &self,
        kind: ReleaseKind,
        name: &str,
    ) -> Result<Option<u64>, ActorProcessingErr> {
        let store = self.args.store.clone();
        let name = name.to_string();
        let current =
            tokio::task::spawn_blocking(move || store.current_release(kind, &name)).await??;
        Ok(current.map(|s| s.manifest.version))
    }

    async fn offer(
        &mut self,
        signed: SignedManifest,
        from: Option<PeerId>,
    ) -> Result<(), ActorProcessingErr> {
        let m = &signed.manifest;
        let current = self.current(m.kind, &m.name).await?;
        // Firmware content is the firmware actor's to fetch: only it knows whether this
        // node needs the full image or only a patch against the image it runs.
        let has = m.kind == ReleaseKind::Firmware || self.args.store.has(&m.content);
        let decision = self.book.offer(
            &self.args.policy,
            &signed,
            from,
            current,
            has,
            Instant::now(),
            crate::unix_ms() / 1000,
        );
        match decision {
            OfferDecision::Install => self.install(&signed, from).await?,
            OfferDecision::Fetch => {
                tracing::info!(release = %m.name, version = m.version, content = %m.content.short(), "accepted release, fetching content");
                self.start_fetches().await;
            }
            OfferDecision::Reject(reason) => {
                let from = from
                    .map(|p| short_peer(&p))
                    .unwrap_or_else(|| "operator".into());
                tracing::warn!(release = %m.name, version = m.version, %from, "rejected release: {reason}");
            }
            OfferDecision::Ignore(why) => {
                tracing::debug!(release = %m.name, version = m.version, "ignored offer: {why}");
            }
        }
        Ok(())
    }

    async fn publish(
        &mut self,
        signed: SignedManifest,
    ) -> Result<Result<(), Rejection>, ActorProcessingErr> {
        let m = &signed.manifest;
        let current = self.current(m.kind, &m.name).await?;
        if let Err(rejection) = self
            .args
            .policy
            .check(&signed, crate::unix_ms() / 1000, current)
        {
            tracing::warn!(release = %m.name, version = m.version, "operator publish rejected: {rejection}");
            return Ok(Err(rejection));
        }
        self.install(&signed, None).await?;
        // Announce after recording, so a peer that asks back for the blob finds it.
        if let Err(e) = self
            .args
            .swarm
            .publish(RELEASES_TOPIC, signed.encode())
            .await
        {
            // No subscribed peer yet is normal for a lone node; peers that connect later
            // pull the release list.
            tracing::info!(release = %m.name, "announcement not sent now: {e}");
        }
        Ok(Ok(()))
    }

    /// Records a release and hands it on: a module to the sandbox supervisor, firmware
    /// (with `from`, its announcer, as the first peer to fetch from) to the firmware actor.
    async fn install(
        &mut self,
        signed: &SignedManifest,
        from: Option<PeerId>,
    ) -> Result<(), ActorProcessingErr> {
        let store = self.args.store.clone();
        let record = signed.clone();
        let recorded = tokio::task::spawn_blocking(move || store.record_release(&record)).await?;
        if let Err(e) = recorded {
            // Losing a race with a newer version is fine; anything else is a store fault.
            tracing::warn!(release = %signed.manifest.name, version = signed.manifest.version, "recording release: {e}");
            return Ok(());
        }
        tracing::info!(release = %signed.manifest.name, version = signed.manifest.version, kind = %signed.manifest.kind, "installed release");
        match signed.manifest.kind {
            ReleaseKind::Module => deploy(&self.args, signed).await,
            ReleaseKind::Firmware => {
                let msg = FirmwareMsg::Release {
                    signed: Box::new(signed.clone()),
                    from,
                };
                // A firmware actor that is down reads the recorded release when it
                // starts again.
                if let Err(e) = self.args.firmware.try_send(msg) {
                    tracing::warn!(release = %signed.manifest.name, "handing firmware to the firmware actor: {e}");
                }
            }
            ReleaseKind::Data => {}
        }
        Ok(())
    }

    async fn start_fetches(&mut self) {
        let due = self.book.poll_fetches(Instant::now());
        if due.is_empty() {
            return;
        }
        for (signed, hint) in due {
            let args = self.args.clone();
            tokio::spawn(async move {
                let m = &signed.manifest;
                let label = format!("{} {} v{}", m.kind, m.name, m.version);
                let hint: Vec<PeerId> = hint.into_iter().collect();
                let result = crate::fetch::download(&args.fetch, m.content, m.size, &label, &hint)
                    .await
                    .map(|report| {
                        let from: Vec<String> = report
                            .contributors
                            .iter()
                            .map(|(p, n)| format!("{}:{n}", short_peer(p)))
                            .collect();
                        tracing::info!(release = %m.name, version = m.version, bytes = report.bytes, ms = report.elapsed.as_millis() as u64, from = %from.join(","), exchanges = %report.exchanges, "download complete");
                        report.contributors.first().map(|(p, _)| *p)
                    })
                    .map_err(|e| e.to_string());
                let done = ReleaseMsg::FetchDone {
                    kind: m.kind,
                    name: m.name.clone(),
                    version: m.version,
                    result,
                };
                if let Err(e) = args.myself.try_send(done) {
                    tracing::warn!("reporting a finished fetch: {e}");
                }
            });
        }
    }
}

async fn deploy_installed(args: &ReleaseArgs) -> Result<(), ActorProcessingErr> {
    let store = args.store.clone();
    let installed = tokio::task::spawn_blocking(move || store.current_releases()).await??;
    for signed in installed {
        if signed.manifest.kind == ReleaseKind::Module {
            deploy(args, &signed).await;
        }
    }
    Ok(())
}

async fn deploy(args: &ReleaseArgs, signed: &SignedManifest) {
    let mut m = signed.manifest.clone();
    let store = args.store.clone();
    // A version that failed here (and was rolled back) is not run again: its previous
    // version runs instead, if the store still has it.
    let read = tokio::task::spawn_blocking(move || {
        if store.failed_version(m.kind, &m.name)? == Some(m.version) {
            match store.previous_release(m.kind, &m.name)? {
                Some(prev) if prev.manifest.version < m.version => m = prev.manifest,
                _ => return Ok(None),
            }
        }
        store.read(&m.content).map(|b| Some((m, b)))
    });
    let (m, bytes) = match read.await {
        Ok(Ok(Some(found))) => found,
        Ok(Ok(None)) => {
            tracing::info!(release = %signed.manifest.name, version = signed.manifest.version, "not deploying a release that failed here");
            return;
        }
        Ok(Err(e)) => {
            tracing::error!(release = %signed.manifest.name, "reading module for deployment: {e}");
            return;
        }
        Err(e) => {
            tracing::error!("reading module for deployment: {e}");
            return;
        }
    };
    let deployment = Deployment {
        name: m.name.clone(),
        version: m.version,
        content: m.content,
        bytes: Arc::from(bytes),
        quotas: m.quotas.clone(),
    };
    if let Err(e) = args.sandbox.try_send(SandboxMsg::Deploy(deployment)) {
        tracing::error!(release = %m.name, version = m.version, "handing module to the sandbox supervisor: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Manifest;
    use mesh_transport::{ContentId, SecretKey};

    fn policy(key: &SecretKey) -> TrustPolicy {
        TrustPolicy {
            release_keys: [key.public()].into_iter().collect(),
            threshold: 1,
            ..TrustPolicy::default()
        }
    }

    fn release(key: &SecretKey, version: u64) -> SignedManifest {
        let content = ContentId::of(format!("v{version}").as_bytes());
        SignedManifest::sign(
            Manifest {
                kind: ReleaseKind::Module,
                name: "app".into(),
                version,
                content,
                size: 2,
                created_unix: 0,
                expires_unix: None,
                quotas: Default::default(),
                deltas: Vec::new(),
            },
            &[key],
        )
    }

    #[test]
    fn offer_fetch_retry_install() {
        let k = SecretKey::from_seed([1; 32]);
        let p = policy(&k);
        let t0 = Instant::now();
        let mut book = ReleaseBook::default();
        let r1 = release(&k, 1);
        assert_eq!(
            book.offer(&p, &r1, None, None, false, t0, 0),
            OfferDecision::Fetch
        );
        assert_eq!(
            book.offer(&p, &r1, None, None, false, t0, 0),
            OfferDecision::Ignore("already pending")
        );
        let due = book.poll_fetches(t0);
        assert_eq!(due.len(), 1);
        assert!(
            book.poll_fetches(t0).is_empty(),
            "a running fetch was started twice"
        );
        assert!(book
            .fetch_done(ReleaseKind::Module, "app", 1, false, t0)
            .is_none());
        assert!(book.poll_fetches(t0).is_empty(), "retried without backoff");
        let later = t0 + FETCH_BACKOFF_MAX;
        assert_eq!(book.poll_fetches(later).len(), 1);
        let done = book.fetch_done(ReleaseKind::Module, "app", 1, true, later);
        assert_eq!(done.unwrap().manifest.version, 1);
        assert_eq!(book.pending(), 0);
    }

    #[test]
    fn newer_offer_supersedes_a_running_fetch() {
        let k = SecretKey::from_seed([1; 32]);
        let p = policy(&k);
        let t0 = Instant::now();
        let mut book = ReleaseBook::default();
        book.offer(&p, &release(&k, 1), None, None, false, t0, 0);
        book.poll_fetches(t0);
        assert_eq!(
            book.offer(&p, &release(&k, 2), None, None, false, t0, 0),
            OfferDecision::Fetch
        );
        // The stale fetch finishing must not install version 1.
        assert!(book
            .fetch_done(ReleaseKind::Module, "app", 1, true, t0)
            .is_none());
        assert_eq!(book.poll_fetches(t0)[0].0.manifest.version, 2);
        assert_eq!(
            book.offer(&p, &release(&k, 1), None, None, false, t0, 0),
            OfferDecision::Ignore("a newer version is pending")
        );
    }

    #[test]
    fn rejections_and_installed() {
        let k = SecretKey::from_seed([1; 32]);
        let stranger = SecretKey::from_seed([2; 32]);
        let p = policy(&k);
        let t0 = Instant::now();
        let mut book = ReleaseBook::default();
        assert!(matches!(
            book.offer(&p, &release(&stranger, 1), None, None, false, t0, 0),
            OfferDecision::Reject(_)
        ));
        assert_eq!(
            book.offer(&p, &release(&k, 3), None, Some(3), true, t0, 0),
            OfferDecision::Ignore("already installed")
        );
        assert!(matches!(
            book.offer(&p, &release(&k, 2), None, Some(3), true, t0, 0),
            OfferDecision::Reject(Rejection::NotNewer { .. })
        ));
        assert_eq!(
            book.offer(&p, &release(&k, 4), None, Some(3), true, t0, 0),
            OfferDecision::Install
        );
    }

    #[test]
    fn attempts_are_bounded() {
        let k = SecretKey::from_seed([1; 32]);
        let p = policy(&k);
        let mut now = Instant::now();
        let mut book = ReleaseBook::default();
        book.offer(&p, &release(&k, 1), None, None, false, now, 0);
        for _ in 0..FETCH_ATTEMPTS_MAX {
            now += FETCH_BACKOFF_MAX;
            assert_eq!(book.poll_fetches(now).len(), 1);
            book.fetch_done(ReleaseKind::Module, "app", 1, false, now);
        }
        assert_eq!(book.pending(), 0);
    }
}
