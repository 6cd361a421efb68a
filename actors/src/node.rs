//! The node supervisor and the children it restarts: store, peers, trust (releases) and
//! the sandbox supervisor.
//!
//! Other parts of the node hold an [`Addr`] for each child rather than an actor ref, so
//! that a restarted child is reached through the same handle.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use mesh_transport::swarm::{RangeRequest, RangeResponse, Responder, SwarmHandle};
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use crate::mailbox::{BoundedRef, Envelope, MailboxError};
use crate::peers::{PeersActor, PeersMsg};
use crate::releases::{ReleaseActor, ReleaseArgs, ReleaseMsg};
use crate::restart::{RestartBudget, RestartDecision, RestartPolicy};
use crate::sandbox_supervisor::{spawn_sandbox_supervisor, SandboxMsg, SandboxSupervisorArgs};
use crate::store::ContentStore;
use crate::trust::TrustPolicy;

/// Swarm events for one peer arrive in bursts (connect, identify, ping, report); a few
/// thousand queued means the node is far behind and new ones should be dropped.
pub const PEERS_MAILBOX_MAX: usize = 4096;
/// Offers come from gossip and release lists; each is small and checked quickly.
pub const RELEASES_MAILBOX_MAX: usize = 1024;
/// Range requests waiting for the disk; beyond this peers are told `Busy`.
pub const STORE_MAILBOX_MAX: usize = 256;

/// A handle to a child actor that survives the child's restarts.
pub struct Addr<M>(Arc<RwLock<Option<BoundedRef<M>>>>);

impl<M> Clone for Addr<M> {
    fn clone(&self) -> Self {
        Addr(self.0.clone())
    }
}

impl<M> Default for Addr<M> {
    fn default() -> Self {
        Addr(Arc::new(RwLock::new(None)))
    }
}

impl<M: Send + 'static> Addr<M> {
    pub fn set(&self, r: Option<BoundedRef<M>>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = r;
    }

    fn get(&self) -> Result<BoundedRef<M>, MailboxError> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(MailboxError::Gone)
    }

    pub fn try_send(&self, msg: M) -> Result<(), MailboxError> {
        self.get()?.try_send(msg)
    }

    pub async fn call<R: Send + 'static>(
        &self,
        make: impl FnOnce(RpcReplyPort<R>) -> M,
        timeout: Duration,
    ) -> Result<R, MailboxError> {
        self.get()?.call(make, timeout).await
    }
}

/// Messages to the store actor.
pub enum StoreMsg {
    ServeRange {
        request: RangeRequest,
        reply: Responder<RangeResponse>,
    },
}

/// Serves blob ranges to peers from the content store.
pub struct StoreActor;

impl Actor for StoreActor {
    type Msg = Envelope<StoreMsg>;
    type State = Arc<ContentStore>;
    type Arguments = Arc<ContentStore>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        store: Arc<ContentStore>,
    ) -> Result<Arc<ContentStore>, ActorProcessingErr> {
        Ok(store)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        envelope: Self::Msg,
        store: &mut Arc<ContentStore>,
    ) -> Result<(), ActorProcessingErr> {
        match envelope.msg {
            StoreMsg::ServeRange { request, reply } => {
                let store = store.clone();
                let response =
                    tokio::task::spawn_blocking(move || serve_range(&store, &request)).await?;
                reply.send(response);
            }
        }
        Ok(())
    }
}

fn serve_range(store: &ContentStore, request: &RangeRequest) -> RangeResponse {
    let Some(total) = store.size_of(&request.id) else {
        return RangeResponse::NotFound;
    };
    match store.read_range(&request.id, request.offset, u64::from(request.len)) {
        Ok(bytes) => RangeResponse::Data { total, bytes },
        Err(crate::store::ReadError::NotFound { .. }) => RangeResponse::NotFound,
        Err(e) => {
            tracing::warn!(content = %request.id.short(), "serving a range: {e}");
            RangeResponse::Invalid(e.to_string())
        }
    }
}

/// The handles through which the rest of the node reaches the tree.
#[derive(Clone, Default)]
pub struct NodeAddrs {
    pub store: Addr<StoreMsg>,
    pub peers: Addr<PeersMsg>,
    pub releases: Addr<ReleaseMsg>,
    pub sandbox: Addr<SandboxMsg>,
}

/// Everything the node supervisor needs to start (and restart) its children.
pub struct NodeArgs {
    pub store: Arc<ContentStore>,
    pub swarm: SwarmHandle,
    pub policy: TrustPolicy,
    pub sandbox: SandboxSupervisorArgs,
    pub restart: RestartPolicy,
    pub addrs: NodeAddrs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Child {
    Store,
    Peers,
    Releases,
    Sandbox,
}

const CHILDREN: [Child; 4] = [Child::Store, Child::Peers, Child::Sandbox, Child::Releases];

pub struct NodeState {
    args: NodeArgs,
    running: Vec<(Child, ActorCell, RestartBudget)>,
}

/// The root of the node's tree. One-for-one: a failed child is restarted alone, within
/// its restart budget; a child that exhausts its budget stops the node supervisor, which
/// the agent treats as fatal (the process exits non-zero and its launcher restarts it).
pub struct NodeSupervisor;

pub enum NodeMsg {
    /// A child whose restart delay has passed.
    Restart(usize),
}

impl NodeSupervisor {
    /// Starts the tree; the returned handle completes when the supervisor stops.
    pub async fn start(
        args: NodeArgs,
    ) -> Result<(ActorRef<NodeMsg>, tokio::task::JoinHandle<()>), ractor::SpawnErr> {
        Actor::spawn(None, NodeSupervisor, args).await
    }
}

async fn spawn_child(
    child: Child,
    args: &NodeArgs,
    me: ActorCell,
) -> Result<ActorCell, ActorProcessingErr> {
    let a = &args.addrs;
    let cell = match child {
        Child::Store => {
            let (r, _) = Actor::spawn_linked(None, StoreActor, args.store.clone(), me).await?;
            a.store
                .set(Some(BoundedRef::new(r.clone(), STORE_MAILBOX_MAX)));
            r.get_cell()
        }
        Child::Peers => {
            let (r, _) = Actor::spawn_linked(None, PeersActor, (), me).await?;
            a.peers
                .set(Some(BoundedRef::new(r.clone(), PEERS_MAILBOX_MAX)));
            r.get_cell()
        }
        Child::Sandbox => {
            let (r, _) = spawn_sandbox_supervisor(args.sandbox.clone(), Some(me)).await?;
            let cell = r.actor().get_cell();
            a.sandbox.set(Some(r));
            cell
        }
        Child::Releases => {
            let release_args = ReleaseArgs {
                policy: args.policy.clone(),
                store: args.store.clone(),
                swarm: args.swarm.clone(),
                sandbox: a.sandbox.clone(),
                peers: a.peers.clone(),
                myself: a.releases.clone(),
            };
            // The actor sets its own address in pre_start, before it starts the tick
            // task that sends to it.
            let (r, _) = Actor::spawn_linked(None, ReleaseActor, release_args, me).await?;
            r.get_cell()
        }
    };
    Ok(cell)
}

impl Actor for NodeSupervisor {
    type Msg = NodeMsg;
    type State = NodeState;
    type Arguments = NodeArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<NodeMsg>,
        args: NodeArgs,
    ) -> Result<NodeState, ActorProcessingErr> {
        let mut running = Vec::new();
        let now = Instant::now();
        for child in CHILDREN {
            let cell = spawn_child(child, &args, myself.get_cell()).await?;
            let mut budget = RestartBudget::new(args.restart.clone());
            budget.on_start(now);
            running.push((child, cell, budget));
        }
        tracing::debug!("node supervision tree started");
        Ok(NodeState { args, running })
    }

    async fn handle(
        &self,
        myself: ActorRef<NodeMsg>,
        msg: NodeMsg,
        state: &mut NodeState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            NodeMsg::Restart(i) => {
                let child = state.running[i].0;
                let cell = spawn_child(child, &state.args, myself.get_cell()).await?;
                state.running[i].1 = cell;
                state.running[i].2.on_start(Instant::now());
                tracing::warn!(?child, "restarted node actor");
                if child == Child::Sandbox {
                    // A new sandbox supervisor starts empty; the installed modules are
                    // the trust actor's to hand over again.
                    if let Err(e) = state.args.addrs.releases.try_send(ReleaseMsg::Redeploy) {
                        tracing::error!("redeploying modules after a sandbox restart: {e}");
                    }
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<NodeMsg>,
        event: SupervisionEvent,
        state: &mut NodeState,
    ) -> Result<(), ActorProcessingErr> {
        let (who, reason) = match &event {
            SupervisionEvent::ActorFailed(who, err) => (who.get_id(), err.to_string()),
            SupervisionEvent::ActorTerminated(who, _, reason) => (
                who.get_id(),
                reason.clone().unwrap_or_else(|| "stopped".into()),
            ),
            _ => return Ok(()),
        };
        let Some(i) = state.running.iter().position(|(_, c, _)| c.get_id() == who) else {
            return Ok(());
        };
        let child = state.running[i].0;
        match state.running[i].2.on_failure(Instant::now()) {
            RestartDecision::Restart { delay, attempt } => {
                tracing::error!(?child, %reason, attempt, ?delay, "node actor failed, restarting");
                self.clear_addr(child, &state.args.addrs);
                let me = myself.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = me.cast(NodeMsg::Restart(i));
                });
            }
            RestartDecision::GiveUp { restarts, period } => {
                tracing::error!(?child, %reason, restarts, ?period, "node actor exceeded its restart intensity, stopping the node");
                myself.stop(Some(format!(
                    "{child:?} failed {restarts} times within {period:?}: {reason}"
                )));
            }
        }
        Ok(())
    }
}

impl NodeSupervisor {
    fn clear_addr(&self, child: Child, a: &NodeAddrs) {
        match child {
            Child::Store => a.store.set(None),
            Child::Peers => a.peers.set(None),
            Child::Releases => a.releases.set(None),
            Child::Sandbox => a.sandbox.set(None),
        }
    }
}
