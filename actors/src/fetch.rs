//! Downloads: one blob from several peers at once, verified group by group, resumable,
//! rate-limited; and the registry of downloads and providers that serving, progress and
//! discovery share.
//!
//! [`crate::schedule::Schedule`] decides; [`download`] carries it out: it asks peers
//! what they hold, sends the requests the schedule returns, verifies and writes each
//! response into a [`PartialBlob`], checkpoints, announces what it holds so others can
//! fetch from it meanwhile, and hands the finished blob to the store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use mesh_transport::libp2p::PeerId;
use mesh_transport::swarm::{BlobRequest, BlobResponse, SwarmHandle};
use mesh_transport::{wire, ContentId};
use serde::{Deserialize, Serialize};

use crate::bucket::TokenBucket;
use crate::peers::short_peer;
use crate::schedule::{Failure, Schedule};
use crate::store::ContentStore;
use crate::verified::{groups_of, PartialBlob, GROUP_BYTES};

/// The gossipsub topic of have-announcements (which ranges of which blob a node holds).
pub const HAVE_TOPIC: &str = "mesh/have/1";
/// A have-announcement lists at most this many runs.
pub const HAVE_RUNS_MAX: usize = 256;
/// A have-announcement is small: an id, a size and a few runs.
pub const HAVE_BYTES_MAX: usize = 8 * 1024;
/// Blobs whose providers are remembered; the least recently announced are forgotten.
pub const PROVIDER_BLOBS_MAX: usize = 1024;
/// Providers remembered per blob.
pub const PROVIDERS_PER_BLOB_MAX: usize = 64;
/// How often a download asks its peers again what they hold, and announces its own.
pub const HAVE_INTERVAL: Duration = Duration::from_millis(500);
/// How often a download gossips what it holds. Every node checks the signature of
/// every copy of a gossip message it receives (several per message, one per mesh
/// peer), so the cost grows with the fleet's size squared: at one announcement a
/// second, 32 nodes on two cores spent a sixth of their CPU on ed25519. Connected peers
/// learn the same from the direct queries every `HAVE_INTERVAL`, so gossip only has to
/// reach the rest of the mesh, and a completed download is announced at once.
pub const ANNOUNCE_INTERVAL: Duration = Duration::from_secs(4);
/// How often a download's progress is made durable.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// A checkpoint also starts once this many groups arrived since the last one (8 MiB),
/// so the disk writes a fast download back while it runs and the sync that completes
/// it has little left to do (a whole blob's sync at the end took a quarter of a 64 MiB
/// transfer on loopback).
pub const CHECKPOINT_GROUPS: u64 = 512;
/// A download with no usable source for this long gives up (and is retried later by
/// its caller; what it holds stays for the next attempt).
pub const STALL_MAX: Duration = Duration::from_secs(20);
/// Peers a download queries for what they hold per `HAVE_INTERVAL`, those asked
/// longest ago first. Every query is an exchange both ends pay for whatever it carries;
/// asking every connected peer each interval made a 32-node fleet's have-queries
/// outnumber its data requests two to one.
pub const HAVE_QUERIES_MAX: usize = 16;
/// Downloads running at once on a node, whoever started them (releases or operators);
/// each holds a partial file, its outboard and a schedule in memory.
pub const TRANSFERS_MAX: usize = 16;
/// A peer that sent data failing verification is refused this long.
pub const LIAR_BAN: Duration = Duration::from_secs(600);

/// "I hold these groups of this blob", gossiped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaveAnnouncement {
    pub id: ContentId,
    pub size: u64,
    pub ranges: Vec<(u64, u64)>,
}

impl HaveAnnouncement {
    pub fn encode(&self) -> Vec<u8> {
        wire::encode(self).expect("encoding a have-announcement cannot fail")
    }

    pub fn decode(bytes: &[u8]) -> Result<HaveAnnouncement, wire::WireError> {
        let mut h: HaveAnnouncement = wire::decode(bytes, HAVE_BYTES_MAX)?;
        h.ranges.truncate(HAVE_RUNS_MAX);
        Ok(h)
    }

    pub fn complete(id: ContentId, size: u64) -> HaveAnnouncement {
        HaveAnnouncement {
            id,
            size,
            ranges: vec![(0, groups_of(size))],
        }
    }
}

/// One row of `mesh transfers`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TransferInfo {
    pub id: ContentId,
    pub label: String,
    pub size: u64,
    pub have_bytes: u64,
    pub bytes_per_s: f64,
    pub peers: usize,
    pub elapsed_ms: u64,
    pub eta_ms: Option<u64>,
}

struct Active {
    partial: Arc<Mutex<PartialBlob>>,
    label: String,
    started: Instant,
    /// Bytes received this run, for the rate (resumed bytes do not count).
    received: u64,
    peers: usize,
}

/// A provider and the runs of groups it announced.
pub type Provider = (PeerId, Vec<(u64, u64)>);

/// What one provider announced for one blob: size, runs held, when, and the
/// announcement's number (see [`Transfers::providers_after`]).
type Announced = (u64, Vec<(u64, u64)>, Instant, u64);

#[derive(Default)]
struct Inner {
    active: HashMap<ContentId, Active>,
    /// id -> (peer -> (size, runs, when announced, number))
    providers: HashMap<ContentId, HashMap<PeerId, Announced>>,
    /// The number of the last announcement recorded; numbers only grow.
    announced: u64,
}

/// Downloads in progress and who has what; shared by the downloads, the store actor
/// (to serve partial blobs) and the admin endpoint (progress).
#[derive(Clone, Default)]
pub struct Transfers(Arc<Mutex<Inner>>);

impl Transfers {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a peer's have-announcement.
    pub fn on_have(&self, peer: PeerId, have: HaveAnnouncement, now: Instant) {
        let mut inner = self.lock();
        if !inner.providers.contains_key(&have.id) && inner.providers.len() >= PROVIDER_BLOBS_MAX {
            let oldest = inner
                .providers
                .iter()
                .map(|(id, m)| (*id, m.values().map(|v| v.2).max()))
                .min_by_key(|(_, t)| *t)
                .map(|(id, _)| id);
            if let Some(id) = oldest {
                inner.providers.remove(&id);
            }
        }
        let number = inner.announced + 1;
        let per = inner.providers.entry(have.id).or_default();
        if !per.contains_key(&peer) && per.len() >= PROVIDERS_PER_BLOB_MAX {
            return;
        }
        per.insert(peer, (have.size, have.ranges, now, number));
        inner.announced = number;
    }

    /// Forgets a peer that went away, so downloads stop counting on it.
    pub fn forget_peer(&self, peer: &PeerId) {
        for per in self.lock().providers.values_mut() {
            per.remove(peer);
        }
    }

    /// Peers known to hold (part of) a blob, with their runs.
    pub fn providers(&self, id: &ContentId) -> Vec<Provider> {
        self.providers_after(id, 0).0
    }

    /// The announcements for a blob numbered above `after`, and the highest number
    /// recorded so far (for any blob), to pass as `after` next time. A download asks
    /// on every turn of its loop, and handing it only what changed keeps that turn
    /// from re-merging every provider's runs.
    pub fn providers_after(&self, id: &ContentId, after: u64) -> (Vec<Provider>, u64) {
        let inner = self.lock();
        let fresh = inner
            .providers
            .get(id)
            .map(|m| {
                m.iter()
                    .filter(|(_, a)| a.3 > after)
                    .map(|(p, a)| (*p, a.1.clone()))
                    .collect()
            })
            .unwrap_or_default();
        (fresh, inner.announced)
    }

    /// The size a peer announced for a blob.
    pub fn announced_size(&self, id: &ContentId, peer: &PeerId) -> Option<u64> {
        self.lock().providers.get(id)?.get(peer).map(|a| a.0)
    }

    /// Registers a partial blob as a download in progress without running one, so
    /// tests can serve from it.
    #[cfg(test)]
    pub(crate) fn insert_partial(&self, partial: Arc<Mutex<PartialBlob>>) {
        let id = lock(&partial).id();
        self.lock().active.insert(
            id,
            Active {
                partial,
                label: "test".into(),
                started: Instant::now(),
                received: 0,
                peers: 0,
            },
        );
    }

    /// The partial download of `id`, if one is running, to serve from.
    pub fn partial(&self, id: &ContentId) -> Option<Arc<Mutex<PartialBlob>>> {
        self.lock().active.get(id).map(|a| a.partial.clone())
    }

    /// Bytes that running downloads will still add to the store.
    pub fn reserved(&self) -> u64 {
        self.lock()
            .active
            .values()
            .map(|a| {
                let p = a.partial.lock().unwrap_or_else(|e| e.into_inner());
                p.size() - p.have_bytes()
            })
            .sum()
    }

    pub fn list(&self, now: Instant) -> Vec<TransferInfo> {
        let inner = self.lock();
        let mut out: Vec<TransferInfo> = inner
            .active
            .iter()
            .map(|(id, a)| {
                let p = a.partial.lock().unwrap_or_else(|e| e.into_inner());
                let elapsed = now.duration_since(a.started);
                let rate = a.received as f64 / elapsed.as_secs_f64().max(0.001);
                let left = p.size() - p.have_bytes();
                TransferInfo {
                    id: *id,
                    label: a.label.clone(),
                    size: p.size(),
                    have_bytes: p.have_bytes(),
                    bytes_per_s: rate,
                    peers: a.peers,
                    elapsed_ms: elapsed.as_millis() as u64,
                    eta_ms: (rate > 0.0).then(|| (left as f64 / rate * 1000.0) as u64),
                }
            })
            .collect();
        out.sort_by(|a, b| a.label.cmp(&b.label));
        out
    }
}

/// What a download needs from the node.
#[derive(Clone)]
pub struct FetchCtx {
    pub swarm: SwarmHandle,
    pub store: Arc<ContentStore>,
    pub transfers: Transfers,
    /// The node's download cap, shared by all downloads; `None` is unlimited.
    pub download_limit: Option<Arc<Mutex<TokenBucket>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("fetching {id}: {source}")]
    Store {
        id: ContentId,
        source: crate::store::PutError,
    },
    #[error("fetching {id}: {source}")]
    Partial {
        id: ContentId,
        source: crate::verified::VerifiedError,
    },
    #[error(
        "fetching {id}: no peer has what is missing ({have} of {groups} groups held); will retry"
    )]
    NoSource {
        id: ContentId,
        have: u64,
        groups: u64,
    },
    #[error("fetching {id}: another download of it is running")]
    Busy { id: ContentId },
    #[error("fetching {id}: storing it here failed: {reason}")]
    Local { id: ContentId, reason: String },
    #[error(
        "fetching {id}: {TRANSFERS_MAX} downloads are running already; try again when one finishes"
    )]
    TooMany { id: ContentId },
}

/// How a finished download went.
#[derive(Debug)]
pub struct FetchReport {
    pub id: ContentId,
    pub bytes: u64,
    pub elapsed: Duration,
    /// Peers that delivered groups, most first.
    pub contributors: Vec<(PeerId, u64)>,
    pub exchanges: Exchanges,
}

/// How many exchanges a download made with its peers, by kind and outcome: what an
/// operator (or the propagation benchmark) reads to see where a slow download's time
/// and its peers' CPU went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Exchanges {
    /// Requests for groups.
    pub requests: u64,
    /// Questions of what a peer holds.
    pub have_queries: u64,
    /// Requests answered with data.
    pub served: u64,
    /// Requests answered "busy".
    pub busy: u64,
    /// Requests sent elsewhere (the server sent those groups to another peer).
    pub redirected: u64,
    /// Requests the peer could not serve (it does not hold the groups).
    pub unavailable: u64,
    /// Requests lost in transport or timed out.
    pub lost: u64,
}

impl std::fmt::Display for Exchanges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "requests={} have_queries={} served={} busy={} redirected={} unavailable={} lost={}",
            self.requests,
            self.have_queries,
            self.served,
            self.busy,
            self.redirected,
            self.unavailable,
            self.lost
        )
    }
}

enum Outcome {
    Groups {
        peer: PeerId,
        start: u64,
        end: u64,
        result: Result<BlobResponse, String>,
    },
    Have {
        peer: PeerId,
        result: Result<BlobResponse, String>,
    },
}

/// Downloads blob `id` of `size` bytes. `hint` peers (the announcer) are asked first;
/// connected peers and announced providers join as they are learned.
pub async fn download(
    ctx: &FetchCtx,
    id: ContentId,
    size: u64,
    label: &str,
    hint: &[PeerId],
) -> Result<FetchReport, FetchError> {
    if ctx.store.has(&id) {
        return Ok(FetchReport {
            id,
            bytes: 0,
            elapsed: Duration::ZERO,
            contributors: Vec::new(),
            exchanges: Exchanges::default(),
        });
    }
    let started = Instant::now();
    let partial = open_partial(ctx, id, size).await?;
    let registered = {
        let mut inner = ctx.transfers.lock();
        let inner_len = inner.active.len();
        match inner.active.entry(id) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(_) if inner_len >= TRANSFERS_MAX => {
                return Err(FetchError::TooMany { id });
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(Active {
                    partial: partial.clone(),
                    label: label.to_string(),
                    started,
                    received: 0,
                    peers: 0,
                });
                true
            }
        }
    };
    if !registered {
        return Err(FetchError::Busy { id });
    }
    // The checkpoint running beside the download (at most one). Every way out waits
    // for it: an older snapshot landing after a newer one, or after the files were
    // removed, would roll the checkpoint back or bring the files back.
    let mut checkpointing: Option<tokio::task::JoinHandle<()>> = None;
    let result = run(ctx, id, size, hint, &partial, started, &mut checkpointing).await;
    if let Some(c) = checkpointing.take() {
        let _ = c.await;
    }
    // Whatever happened, what was received is kept for the next attempt.
    if result.is_err() {
        let p = partial.clone();
        let _ = tokio::task::spawn_blocking(move || lock(&p).checkpoint()).await;
    }
    ctx.transfers.lock().active.remove(&id);
    result
}

fn lock(p: &Arc<Mutex<PartialBlob>>) -> MutexGuard<'_, PartialBlob> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

async fn open_partial(
    ctx: &FetchCtx,
    id: ContentId,
    size: u64,
) -> Result<Arc<Mutex<PartialBlob>>, FetchError> {
    let store = ctx.store.clone();
    let reserved = ctx.transfers.reserved();
    let opened = tokio::task::spawn_blocking(move || {
        let p = PartialBlob::open(store.downloads_dir(), id, size)
            .map_err(|source| FetchError::Partial { id, source })?;
        store
            .check_room(&id, size - p.have_bytes(), reserved)
            .map_err(|source| FetchError::Store { id, source })?;
        Ok::<_, FetchError>(p)
    })
    .await
    .map_err(|e| FetchError::Partial {
        id,
        source: crate::verified::VerifiedError::Io {
            action: "opening a download".into(),
            source: std::io::Error::other(e.to_string()),
        },
    })??;
    if opened.have_groups() > 0 {
        tracing::info!(content = %id.short(), have = opened.have_bytes(), size, "resuming download");
    }
    Ok(Arc::new(Mutex::new(opened)))
}

async fn run(
    ctx: &FetchCtx,
    id: ContentId,
    size: u64,
    hint: &[PeerId],
    partial: &Arc<Mutex<PartialBlob>>,
    started: Instant,
    checkpointing: &mut Option<tokio::task::JoinHandle<()>>,
) -> Result<FetchReport, FetchError> {
    let groups = groups_of(size);
    let mut schedule = {
        let p = lock(partial);
        // Start where this node's id and the blob's id point, so nodes spread out.
        let mut h = blake3::Hasher::new();
        h.update(&ctx.swarm.local_peer().to_bytes());
        h.update(&id.0);
        let origin = u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().unwrap_or([0; 8]));
        Schedule::new(groups, |g| p.has_group(g), origin)
    };
    // The announcer of a release holds all of it; asking it first saves a round trip.
    for peer in hint {
        schedule.set_peer(*peer, None, Instant::now());
    }
    let mut pending: FuturesUnordered<futures::future::BoxFuture<'static, Outcome>> =
        FuturesUnordered::new();
    let mut asked_have: HashMap<PeerId, Instant> = HashMap::new();
    // The last provider announcement fed to the schedule (see `providers_after`); every
    // HAVE_INTERVAL all are fed again.
    let mut providers_seen = 0u64;
    // Have-queries sent in the current round of `HAVE_INTERVAL`.
    let mut round_started = Instant::now();
    let mut queried = 0;
    let mut last_checkpoint = Instant::now();
    let mut checkpointed_have = schedule.have_count();
    let mut last_announce = Instant::now() - ANNOUNCE_INTERVAL;
    let mut last_progress = Instant::now();
    let mut announced_have = u64::MAX;
    let mut connected: Vec<PeerId> = Vec::new();
    let mut last_connected_at = Instant::now() - HAVE_INTERVAL;
    let mut counts = Exchanges::default();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    while !schedule.is_complete() {
        let now = Instant::now();
        // Learn sources: announced providers right away, and ask peers (the hint first)
        // what they hold, again every HAVE_INTERVAL for those that may hold more.
        let (fresh, latest) = ctx.transfers.providers_after(&id, providers_seen);
        providers_seen = latest;
        for (peer, ranges) in fresh {
            if !schedule.is_banned(&peer) {
                let complete = ranges == [(0, groups)];
                schedule.add_peer_ranges(peer, if complete { None } else { Some(ranges) }, now);
            }
        }
        let mut candidates: Vec<PeerId> = hint.to_vec();
        if now.duration_since(last_connected_at) >= HAVE_INTERVAL {
            last_connected_at = now;
            let before = std::mem::take(&mut connected);
            connected = connected_peers(&ctx.swarm).await;
            // A peer that went away and came back (a restart, a healed link) is asked
            // again at once instead of after the rest its lost requests earned.
            for peer in connected.iter().filter(|p| !before.contains(p)) {
                schedule.on_reconnected(*peer, now);
            }
            // Only peers still in view are remembered, so a long download on a fleet
            // that churns does not collect every peer it ever asked.
            asked_have.retain(|p, _| connected.contains(p) || hint.contains(p));
        }
        candidates.extend(connected.iter().copied());
        if now.duration_since(round_started) >= HAVE_INTERVAL {
            round_started = now;
            queried = 0;
            // Once a round, every announcement is fed again: the schedule drops what a
            // peer announces while it is narrowed to a redirect, and a direct answer
            // may replace runs a newer announcement added; both would otherwise stay
            // lost until the peer announces again.
            providers_seen = 0;
        }
        let due = have_queries_due(
            &candidates,
            &asked_have,
            |p| schedule.is_banned(p) || schedule.holds_all(p),
            now,
            HAVE_QUERIES_MAX.saturating_sub(queried),
        );
        for peer in due {
            asked_have.insert(peer, now);
            queried += 1;
            counts.have_queries += 1;
            let swarm = ctx.swarm.clone();
            pending.push(Box::pin(async move {
                let result = swarm
                    .request_blob(peer, BlobRequest::Have { id })
                    .await
                    .map_err(|e| e.to_string());
                Outcome::Have { peer, result }
            }));
        }

        for req in schedule.poll(now) {
            tracing::trace!(peer = %short_peer(&req.peer), start = req.start, end = req.end, "request");
            if let Some(limit) = &ctx.download_limit {
                let bytes = (req.end - req.start) * GROUP_BYTES;
                let wait = limit
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take(bytes, Instant::now());
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
            }
            let swarm = ctx.swarm.clone();
            pending.push(Box::pin(async move {
                let result = swarm
                    .request_blob(
                        req.peer,
                        BlobRequest::Groups {
                            id,
                            start: req.start,
                            end: req.end,
                        },
                    )
                    .await
                    .map_err(|e| e.to_string());
                Outcome::Groups {
                    peer: req.peer,
                    start: req.start,
                    end: req.end,
                    result,
                }
            }));
        }

        tokio::select! {
            Some(outcome) = pending.next(), if !pending.is_empty() => {
                handle(ctx, id, groups, partial, &mut schedule, &mut counts, outcome).await?;
            }
            _ = tick.tick() => {}
        }

        let now = Instant::now();
        if schedule.has_source() || !pending.is_empty() {
            last_progress = now;
        } else if now.duration_since(last_progress) > STALL_MAX {
            return Err(FetchError::NoSource {
                id,
                have: schedule.have_count(),
                groups,
            });
        }
        let due = now.duration_since(last_checkpoint) >= CHECKPOINT_INTERVAL
            || schedule.have_count() >= checkpointed_have + CHECKPOINT_GROUPS;
        if due && checkpointing.as_ref().is_none_or(|c| c.is_finished()) {
            last_checkpoint = now;
            checkpointed_have = schedule.have_count();
            *checkpointing = Some(start_checkpoint(id, partial));
        }
        // Nothing held yet is nothing to offer; that announcement would only cost.
        if now.duration_since(last_announce) >= ANNOUNCE_INTERVAL
            && schedule.have_count() > 0
            && schedule.have_count() != announced_have
        {
            last_announce = now;
            announced_have = schedule.have_count();
            let ranges: Vec<(u64, u64)> = lock(partial)
                .ranges()
                .into_iter()
                .take(HAVE_RUNS_MAX)
                .collect();
            let have = HaveAnnouncement { id, size, ranges };
            // Nobody subscribed yet is fine; peers also ask directly.
            let _ = ctx.swarm.publish(HAVE_TOPIC, have.encode()).await;
        }
        if let Some(a) = ctx.transfers.lock().active.get_mut(&id) {
            a.peers = schedule.active_peers();
        }
    }

    // The checkpoint runs beside the download rather than stalling it while a second's
    // worth of data is synced. The files are about to be removed; a checkpoint still
    // writing would bring them back.
    if let Some(c) = checkpointing.take() {
        let _ = c.await;
    }
    let p = partial.clone();
    let store = ctx.store.clone();
    tokio::task::spawn_blocking(move || {
        let mut blob = lock(&p);
        let (data, outboard) = blob
            .finish()
            .map_err(|source| FetchError::Partial { id, source })?;
        store
            .adopt(&id, &data, size, &outboard)
            .map_err(|source| FetchError::Store { id, source })?;
        PartialBlob::remove(store.downloads_dir(), &id);
        Ok::<_, FetchError>(())
    })
    .await
    .map_err(|e| FetchError::Partial {
        id,
        source: crate::verified::VerifiedError::Io {
            action: "finishing a download".into(),
            source: std::io::Error::other(e.to_string()),
        },
    })??;
    let _ = ctx
        .swarm
        .publish(HAVE_TOPIC, HaveAnnouncement::complete(id, size).encode())
        .await;
    Ok(FetchReport {
        id,
        bytes: size,
        elapsed: started.elapsed(),
        contributors: schedule.contributors(),
        exchanges: Exchanges {
            requests: schedule.requests_sent(),
            ..counts
        },
    })
}

/// The peers of `candidates` to ask now what they hold, at most `quota`: those not
/// skipped and not asked within `HAVE_INTERVAL`, never asked first, then those asked
/// longest ago, so a fleet larger than a round's queries is asked in turn. The order
/// is otherwise kept, so a hint put first leads.
fn have_queries_due(
    candidates: &[PeerId],
    asked: &HashMap<PeerId, Instant>,
    skip: impl Fn(&PeerId) -> bool,
    now: Instant,
    quota: usize,
) -> Vec<PeerId> {
    let mut due: Vec<PeerId> = Vec::new();
    for peer in candidates {
        let fresh = asked
            .get(peer)
            .is_some_and(|t| now.duration_since(*t) < HAVE_INTERVAL);
        if !fresh && !skip(peer) && !due.contains(peer) {
            due.push(*peer);
        }
    }
    due.sort_by_key(|p| asked.get(p).copied());
    due.truncate(quota);
    due
}

/// Starts a checkpoint of `partial` on a blocking thread. Only the snapshot is taken
/// under the lock; the sync and the writes run without it, so receiving goes on.
fn start_checkpoint(
    id: ContentId,
    partial: &Arc<Mutex<PartialBlob>>,
) -> tokio::task::JoinHandle<()> {
    let p = partial.clone();
    tokio::task::spawn_blocking(move || {
        let snapshot = lock(&p).begin_checkpoint();
        let written = snapshot.and_then(|c| c.map_or(Ok(()), |c| c.write()));
        if let Err(e) = written {
            lock(&p).mark_dirty();
            tracing::warn!(content = %id.short(), "checkpointing a download: {e}");
        }
    })
}

async fn connected_peers(swarm: &SwarmHandle) -> Vec<PeerId> {
    swarm
        .info()
        .await
        .map(|i| i.connected.iter().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

async fn handle(
    ctx: &FetchCtx,
    id: ContentId,
    groups: u64,
    partial: &Arc<Mutex<PartialBlob>>,
    schedule: &mut Schedule,
    counts: &mut Exchanges,
    outcome: Outcome,
) -> Result<(), FetchError> {
    let now = Instant::now();
    match outcome {
        Outcome::Have { peer, result } => {
            if let Ok(BlobResponse::Have { ranges, .. }) = result {
                tracing::trace!(peer = %short_peer(&peer), runs = ranges.len(), "peer holds");
                let complete = ranges == [(0, groups)];
                schedule.set_peer(peer, if complete { None } else { Some(ranges) }, now);
            }
        }
        Outcome::Groups {
            peer,
            start,
            end,
            result,
        } => match result {
            Ok(BlobResponse::Encoded(bytes)) => {
                counts.served += 1;
                let p = partial.clone();
                let received =
                    tokio::task::spawn_blocking(move || lock(&p).receive(start, end, &bytes)).await;
                let Ok(received) = received else {
                    schedule.on_failure(peer, start, Failure::Lost, now);
                    return Ok(());
                };
                let fresh = received.groups.len() as u64 * GROUP_BYTES;
                tracing::trace!(peer = %short_peer(&peer), start, end, fresh = received.groups.len(), "groups received");
                if let Some(a) = ctx.transfers.lock().active.get_mut(&id) {
                    a.received += fresh;
                }
                schedule.on_response(
                    peer,
                    start,
                    &received.groups,
                    received.bad.is_some(),
                    Instant::now(),
                );
                if let Some(why) = received.local {
                    // A full disk or an IO error here is not the peer's doing: stop this
                    // download (what was checkpointed stays) and blame nobody.
                    schedule.on_failure(peer, start, Failure::Busy, now);
                    return Err(FetchError::Local { id, reason: why });
                }
                if let Some(why) = received.bad {
                    tracing::warn!(peer = %short_peer(&peer), content = %id.short(), "peer sent data that failed verification: {why}");
                    ctx.transfers.forget_peer(&peer);
                    ctx.swarm
                        .penalize(
                            peer,
                            LIAR_BAN,
                            format!("sent groups of {} that failed verification", id.short()),
                        )
                        .await;
                }
            }
            Ok(BlobResponse::Busy) => {
                tracing::trace!(peer = %short_peer(&peer), start, end, "busy");
                counts.busy += 1;
                schedule.on_failure(peer, start, Failure::Busy, now)
            }
            Ok(BlobResponse::Elsewhere { fresh }) => {
                tracing::trace!(peer = %short_peer(&peer), start, end, runs = fresh.len(), "redirected");
                counts.redirected += 1;
                schedule.on_redirect(peer, start, fresh, now)
            }
            Ok(BlobResponse::NotFound) | Ok(BlobResponse::Have { .. }) => {
                counts.unavailable += 1;
                schedule.on_failure(peer, start, Failure::Unavailable, now)
            }
            Ok(BlobResponse::Invalid(why)) => {
                counts.unavailable += 1;
                tracing::debug!(peer = %short_peer(&peer), "peer refused a request: {why}");
                schedule.on_failure(peer, start, Failure::Unavailable, now)
            }
            Err(e) => {
                counts.lost += 1;
                tracing::debug!(peer = %short_peer(&peer), "blob request failed: {e}");
                schedule.on_failure(peer, start, Failure::Lost, now)
            }
        },
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(n: u8) -> Vec<PeerId> {
        (1..=n)
            .map(|i| {
                mesh_transport::SecretKey::from_seed([i; 32])
                    .public()
                    .peer_id()
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn a_download_is_handed_only_announcements_it_has_not_seen() {
        let t = Transfers::default();
        let [a, b] = peers(2)[..] else { unreachable!() };
        let id = ContentId::of(b"blob");
        let other = ContentId::of(b"other blob");
        let have = |id, ranges: Vec<(u64, u64)>| HaveAnnouncement {
            id,
            size: 1 << 20,
            ranges,
        };
        let now = Instant::now();
        t.on_have(a, have(id, vec![(0, 4)]), now);
        t.on_have(b, have(id, vec![(8, 12)]), now);
        let (mut first, seen) = t.providers_after(&id, 0);
        first.sort();
        let mut want = vec![(a, vec![(0, 4)]), (b, vec![(8, 12)])];
        want.sort();
        assert_eq!(first, want);
        // Nothing new: nothing handed again.
        assert_eq!(t.providers_after(&id, seen), (vec![], seen));
        // Another blob's announcement moves the number but hands this download nothing.
        t.on_have(a, have(other, vec![(0, 1)]), now);
        let (fresh, seen2) = t.providers_after(&id, seen);
        assert!(fresh.is_empty());
        assert!(seen2 > seen);
        // A peer announcing again is handed over with its latest runs only.
        t.on_have(a, have(id, vec![(0, 6)]), now);
        let (fresh, seen3) = t.providers_after(&id, seen2);
        assert_eq!(fresh, vec![(a, vec![(0, 6)])]);
        assert!(t.providers_after(&id, seen3).0.is_empty());
        // A forgotten peer is not handed over; everyone else still is, from the start.
        t.forget_peer(&a);
        assert_eq!(t.providers(&id), vec![(b, vec![(8, 12)])]);
    }

    #[test]
    fn have_queries_take_turns_within_a_quota_per_interval() {
        let all = peers(31);
        let mut asked: HashMap<PeerId, Instant> = HashMap::new();
        let t0 = Instant::now();
        let mut counts: HashMap<PeerId, usize> = HashMap::new();
        // Four rounds of one interval each, with the round's quota of queries.
        for round in 0..4u32 {
            let now = t0 + HAVE_INTERVAL * round;
            let due = have_queries_due(&all, &asked, |_| false, now, HAVE_QUERIES_MAX);
            assert_eq!(due.len(), HAVE_QUERIES_MAX, "round {round}");
            for p in due {
                assert!(
                    asked
                        .get(&p)
                        .is_none_or(|t| now.duration_since(*t) >= HAVE_INTERVAL),
                    "round {round}: a peer asked again within the interval"
                );
                asked.insert(p, now);
                *counts.entry(p).or_default() += 1;
            }
            // Later in the same round nobody just asked is due again.
            let later = have_queries_due(&all, &asked, |_| false, now, HAVE_QUERIES_MAX);
            assert!(
                later.iter().all(|p| asked.get(p) != Some(&now)),
                "round {round}"
            );
            // Nobody waits more than two rounds: 31 peers at 16 a round.
            if round >= 1 {
                let previous = now - HAVE_INTERVAL;
                assert!(
                    all.iter()
                        .all(|p| asked.get(p).is_some_and(|t| *t >= previous)),
                    "round {round}: a peer was not asked in the last two rounds"
                );
            }
        }
        assert_eq!(counts.values().sum::<usize>(), 4 * HAVE_QUERIES_MAX);
        assert!(counts.values().all(|&n| n >= 2), "{counts:?}");
    }

    #[test]
    fn the_hint_leads_and_skipped_or_repeated_peers_are_not_asked() {
        let all = peers(5);
        let now = Instant::now();
        let mut asked: HashMap<PeerId, Instant> = HashMap::new();
        // The hint is put first and also appears among the connected peers.
        let candidates = [vec![all[3]], all.clone()].concat();
        let due = have_queries_due(&candidates, &asked, |p| *p == all[1], now, 3);
        assert_eq!(due, vec![all[3], all[0], all[2]]);
        // Asked long ago comes after never asked; asked just now is not due.
        asked.insert(all[0], now - HAVE_INTERVAL * 4);
        asked.insert(all[2], now);
        let due = have_queries_due(&all, &asked, |_| false, now, 10);
        assert_eq!(due, vec![all[1], all[3], all[4], all[0]]);
    }
}
