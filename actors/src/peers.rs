//! Membership: which nodes this node knows, whether they are alive, and what they
//! report about themselves.
//!
//! [`Membership`] is the decision struct (time passed in, no IO); [`PeersActor`] feeds it
//! connection events from the swarm and signed node reports from gossip.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use mesh_transport::libp2p::{Multiaddr, PeerId};
use mesh_transport::PublicKey;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};

use crate::mailbox::Envelope;
use crate::sandbox_supervisor::ModuleStatus;

/// A fleet larger than this is tracked only partially by each node; the least recently
/// seen disconnected peers are forgotten first.
pub const PEERS_TRACKED_MAX: usize = 4096;
/// Modules listed in one node report; a node running more reports the first ones.
pub const REPORT_MODULES_MAX: usize = 256;
/// Labels per node; enough for site, hardware, ring and a few more.
pub const LABELS_MAX: usize = 32;
/// A node report larger than this is dropped unread.
pub const REPORT_BYTES_MAX: usize = 128 * 1024;
/// Addresses kept per peer.
pub const PEER_ADDRS_MAX: usize = 8;

/// What a node says about itself, gossiped periodically and signed by gossipsub with the
/// node's key (the author must be the node the report names).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeReport {
    pub node: PublicKey,
    /// Increases with every report from one run of a node; with `started_unix_ms` it
    /// orders reports across restarts.
    pub seq: u64,
    pub started_unix_ms: u64,
    pub version: String,
    pub labels: BTreeMap<String, String>,
    pub admin: Option<String>,
    pub modules: Vec<ModuleStatus>,
}

impl NodeReport {
    pub fn encode(&self) -> Vec<u8> {
        mesh_transport::wire::encode(self).expect("encoding a node report cannot fail")
    }

    pub fn decode(bytes: &[u8]) -> Result<NodeReport, mesh_transport::wire::WireError> {
        let report: NodeReport = mesh_transport::wire::decode(bytes, REPORT_BYTES_MAX)?;
        Ok(report)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerState {
    /// Connected now.
    Alive,
    /// Known, not connected (it died, restarted elsewhere, or the link is down).
    Down,
}

/// One row of `mesh peers`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerView {
    pub node: Option<PublicKey>,
    pub peer_id: String,
    pub state: PeerState,
    pub addrs: Vec<String>,
    pub rtt_ms: Option<f64>,
    /// Milliseconds since the last sign of life (connection, ping or report).
    pub last_seen_ms: u64,
    pub agent: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub admin: Option<String>,
    pub uptime_ms: Option<u64>,
    pub modules: Vec<ModuleStatus>,
}

#[derive(Clone, Debug)]
struct PeerRecord {
    connected: bool,
    addrs: Vec<Multiaddr>,
    rtt: Option<Duration>,
    last_seen: Instant,
    agent: Option<String>,
    report: Option<NodeReport>,
}

/// The membership table.
#[derive(Debug, Default)]
pub struct Membership {
    peers: HashMap<PeerId, PeerRecord>,
}

impl Membership {
    fn record(&mut self, peer: PeerId, now: Instant) -> &mut PeerRecord {
        if !self.peers.contains_key(&peer) && self.peers.len() >= PEERS_TRACKED_MAX {
            let victim = self
                .peers
                .iter()
                .filter(|(_, r)| !r.connected)
                .min_by_key(|(_, r)| r.last_seen)
                .map(|(p, _)| *p);
            if let Some(v) = victim {
                self.peers.remove(&v);
            }
        }
        self.peers.entry(peer).or_insert_with(|| PeerRecord {
            connected: false,
            addrs: Vec::new(),
            rtt: None,
            last_seen: now,
            agent: None,
            report: None,
        })
    }

    pub fn on_connected(&mut self, peer: PeerId, addr: Multiaddr, now: Instant) {
        let r = self.record(peer, now);
        r.connected = true;
        r.last_seen = now;
        if !r.addrs.contains(&addr) && r.addrs.len() < PEER_ADDRS_MAX {
            r.addrs.push(addr);
        }
    }

    pub fn on_disconnected(&mut self, peer: PeerId, now: Instant) {
        let r = self.record(peer, now);
        r.connected = false;
        r.rtt = None;
    }

    pub fn on_rtt(&mut self, peer: PeerId, rtt: Duration, now: Instant) {
        let r = self.record(peer, now);
        r.rtt = Some(rtt);
        r.last_seen = now;
    }

    pub fn on_identified(
        &mut self,
        peer: PeerId,
        agent: String,
        addrs: Vec<Multiaddr>,
        now: Instant,
    ) {
        let r = self.record(peer, now);
        r.agent = Some(agent);
        r.addrs = addrs.into_iter().take(PEER_ADDRS_MAX).collect();
        r.last_seen = now;
    }

    /// Accepts a report when its author (gossipsub's signed source) is the node it
    /// names and it is newer than the one held. Returns whether it was accepted.
    pub fn on_report(&mut self, author: PeerId, mut report: NodeReport, now: Instant) -> bool {
        match report.node.peer_id() {
            Ok(p) if p == author => {}
            _ => return false,
        }
        report.modules.truncate(REPORT_MODULES_MAX);
        if report.labels.len() > LABELS_MAX {
            return false;
        }
        let r = self.record(author, now);
        let newer = match &r.report {
            None => true,
            Some(old) => (report.started_unix_ms, report.seq) > (old.started_unix_ms, old.seq),
        };
        if newer {
            r.report = Some(report);
            r.last_seen = now;
        }
        newer
    }

    /// Peers that are connected now, fastest first: the candidates to fetch from.
    pub fn connected(&self) -> Vec<PeerId> {
        let mut v: Vec<(PeerId, Duration)> = self
            .peers
            .iter()
            .filter(|(_, r)| r.connected)
            .map(|(p, r)| (*p, r.rtt.unwrap_or(Duration::from_secs(1))))
            .collect();
        v.sort_by_key(|(p, rtt)| (*rtt, *p));
        v.into_iter().map(|(p, _)| p).collect()
    }

    pub fn view(&self, now: Instant, now_unix_ms: u64) -> Vec<PeerView> {
        let mut out: Vec<PeerView> = self
            .peers
            .iter()
            .map(|(peer, r)| PeerView {
                node: PublicKey::from_peer_id(peer),
                peer_id: peer.to_string(),
                state: if r.connected {
                    PeerState::Alive
                } else {
                    PeerState::Down
                },
                addrs: r.addrs.iter().map(|a| a.to_string()).collect(),
                rtt_ms: r.rtt.map(|d| d.as_secs_f64() * 1000.0),
                last_seen_ms: now.saturating_duration_since(r.last_seen).as_millis() as u64,
                agent: r.agent.clone(),
                labels: r
                    .report
                    .as_ref()
                    .map(|x| x.labels.clone())
                    .unwrap_or_default(),
                admin: r.report.as_ref().and_then(|x| x.admin.clone()),
                uptime_ms: r
                    .report
                    .as_ref()
                    .map(|x| now_unix_ms.saturating_sub(x.started_unix_ms)),
                modules: r
                    .report
                    .as_ref()
                    .map(|x| x.modules.clone())
                    .unwrap_or_default(),
            })
            .collect();
        out.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        out
    }
}

/// Messages to the peers actor.
pub enum PeersMsg {
    Connected {
        peer: PeerId,
        addr: Multiaddr,
    },
    Disconnected {
        peer: PeerId,
    },
    Rtt {
        peer: PeerId,
        rtt: Duration,
    },
    Identified {
        peer: PeerId,
        agent: String,
        addrs: Vec<Multiaddr>,
    },
    Report {
        author: PeerId,
        report: NodeReport,
    },
    List(RpcReplyPort<Vec<PeerView>>),
    ConnectedPeers(RpcReplyPort<Vec<PeerId>>),
}

/// Thin shell around [`Membership`].
pub struct PeersActor;

impl Actor for PeersActor {
    type Msg = Envelope<PeersMsg>;
    type State = Membership;
    type Arguments = ();

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        _args: (),
    ) -> Result<Membership, ActorProcessingErr> {
        Ok(Membership::default())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        envelope: Self::Msg,
        m: &mut Membership,
    ) -> Result<(), ActorProcessingErr> {
        let now = Instant::now();
        match envelope.msg {
            PeersMsg::Connected { peer, addr } => {
                tracing::info!(peer = %short_peer(&peer), %addr, "peer connected");
                m.on_connected(peer, addr, now)
            }
            PeersMsg::Disconnected { peer } => {
                tracing::info!(peer = %short_peer(&peer), "peer down");
                m.on_disconnected(peer, now)
            }
            PeersMsg::Rtt { peer, rtt } => m.on_rtt(peer, rtt, now),
            PeersMsg::Identified { peer, agent, addrs } => m.on_identified(peer, agent, addrs, now),
            PeersMsg::Report { author, report } => {
                if !m.on_report(author, report, now) {
                    tracing::debug!(peer = %short_peer(&author), "ignored a stale or mis-signed node report");
                }
            }
            PeersMsg::List(reply) => {
                let _ = reply.send(m.view(now, crate::unix_ms()));
            }
            PeersMsg::ConnectedPeers(reply) => {
                let _ = reply.send(m.connected());
            }
        }
        Ok(())
    }
}

/// The node key's short hex when the peer id embeds one, for logs that match `mesh peers`.
pub fn short_peer(peer: &PeerId) -> String {
    PublicKey::from_peer_id(peer)
        .map(|k| k.short())
        .unwrap_or_else(|| peer.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_transport::SecretKey;

    fn report(key: &SecretKey, seq: u64) -> NodeReport {
        NodeReport {
            node: key.public(),
            seq,
            started_unix_ms: 1000,
            version: "t".into(),
            labels: BTreeMap::from([("site".into(), "lab".into())]),
            admin: None,
            modules: vec![],
        }
    }

    #[test]
    fn connect_disconnect_and_reports() {
        let t0 = Instant::now();
        let mut m = Membership::default();
        let k = SecretKey::from_seed([5; 32]);
        let peer = k.public().peer_id().unwrap();
        m.on_connected(peer, "/ip4/127.0.0.1/udp/1/quic-v1".parse().unwrap(), t0);
        assert_eq!(m.connected(), vec![peer]);
        assert!(m.on_report(peer, report(&k, 2), t0));
        assert!(
            !m.on_report(peer, report(&k, 1), t0),
            "older report accepted"
        );
        let v = m.view(t0, 5000);
        assert_eq!(v[0].state, PeerState::Alive);
        assert_eq!(v[0].labels["site"], "lab");
        assert_eq!(v[0].node, Some(k.public()));
        m.on_disconnected(peer, t0);
        assert!(m.connected().is_empty());
        assert_eq!(m.view(t0, 5000)[0].state, PeerState::Down);
    }

    #[test]
    fn report_must_come_from_the_node_it_names() {
        let t0 = Instant::now();
        let mut m = Membership::default();
        let k = SecretKey::from_seed([5; 32]);
        let liar = SecretKey::from_seed([6; 32]).public().peer_id().unwrap();
        assert!(!m.on_report(liar, report(&k, 1), t0));
        assert!(m.view(t0, 0).is_empty());
    }

    #[test]
    fn report_round_trip_and_limit() {
        let k = SecretKey::from_seed([5; 32]);
        let r = report(&k, 9);
        let back = NodeReport::decode(&r.encode()).unwrap();
        assert_eq!(back.seq, 9);
        assert!(NodeReport::decode(&vec![0u8; REPORT_BYTES_MAX + 1]).is_err());
    }
}
