//! A bound on an actor's mailbox.
//!
//! ractor's mailboxes are unbounded: a sender that outpaces the actor grows its queue
//! until the node runs out of memory. [`BoundedRef`] puts a counter in front of the
//! actor: every message travels in an [`Envelope`] with a [`Ticket`], the counter goes up
//! when a message is accepted and down when its ticket is dropped (when the actor is done
//! with the message, or when the message is discarded because the actor died). A send
//! that would take the count past `max` is refused at once with [`MailboxError::Full`],
//! so overload becomes an error the sender sees rather than memory the node loses.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ractor::{ActorRef, RpcReplyPort};

/// Why a message could not be delivered (or answered).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MailboxError {
    #[error("sending to actor: mailbox full ({max} messages in flight)")]
    Full { max: usize },
    #[error("sending to actor: the actor has stopped")]
    Gone,
    #[error("waiting for actor reply: no answer within {ms} ms")]
    Timeout { ms: u64 },
}

/// One unit of a mailbox's capacity; gives it back when dropped.
///
/// The actor holds the ticket for as long as it works on the message, so a message being
/// handled still counts against the bound: `max` limits queued plus in-progress messages.
#[derive(Debug)]
pub struct Ticket {
    in_flight: Arc<AtomicUsize>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A message together with the ticket that holds its place in the mailbox.
#[derive(Debug)]
pub struct Envelope<M> {
    pub msg: M,
    pub ticket: Ticket,
}

/// An [`ActorRef`] that refuses messages beyond a fixed number in flight.
pub struct BoundedRef<M> {
    actor: ActorRef<Envelope<M>>,
    in_flight: Arc<AtomicUsize>,
    max: usize,
}

impl<M> Clone for BoundedRef<M> {
    fn clone(&self) -> Self {
        BoundedRef {
            actor: self.actor.clone(),
            in_flight: self.in_flight.clone(),
            max: self.max,
        }
    }
}

impl<M> std::fmt::Debug for BoundedRef<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundedRef")
            .field("actor", &self.actor.get_id())
            .field("in_flight", &self.in_flight.load(Ordering::Acquire))
            .field("max", &self.max)
            .finish()
    }
}

impl<M: Send + 'static> BoundedRef<M> {
    /// Wraps `actor`, allowing at most `max` messages queued or being handled at once.
    ///
    /// Every sender must go through this `BoundedRef` (or a clone of it) for the bound to
    /// hold; messages cast directly on the inner `ActorRef` are not counted.
    pub fn new(actor: ActorRef<Envelope<M>>, max: usize) -> Self {
        BoundedRef {
            actor,
            in_flight: Arc::new(AtomicUsize::new(0)),
            max,
        }
    }

    /// Like [`BoundedRef::new`] with a counter made beforehand, so that an actor can build
    /// its own `BoundedRef` in `pre_start` that shares the count with its spawner's.
    pub(crate) fn with_counter(
        actor: ActorRef<Envelope<M>>,
        in_flight: Arc<AtomicUsize>,
        max: usize,
    ) -> Self {
        BoundedRef {
            actor,
            in_flight,
            max,
        }
    }

    /// Queues `msg` if the mailbox has room; never waits.
    pub fn try_send(&self, msg: M) -> Result<(), MailboxError> {
        let max = self.max;
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| MailboxError::Full { max })?;
        // The ticket exists from here on, so every path below gives the slot back: on a
        // failed cast the envelope (and its ticket) comes back inside the error and drops.
        let ticket = Ticket {
            in_flight: self.in_flight.clone(),
        };
        self.actor
            .cast(Envelope { msg, ticket })
            .map_err(|_| MailboxError::Gone)
    }

    /// Sends a request built by `make` around a reply port and waits up to `timeout` for
    /// the answer. A full mailbox fails at once, like [`BoundedRef::try_send`].
    pub async fn call<R: Send + 'static>(
        &self,
        make: impl FnOnce(RpcReplyPort<R>) -> M,
        timeout: Duration,
    ) -> Result<R, MailboxError> {
        let (tx, rx) = ractor::concurrency::oneshot();
        self.try_send(make(RpcReplyPort::from((tx, timeout))))?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            // The actor dropped the reply port without answering: it stopped, or the
            // message was discarded with its mailbox.
            Ok(Err(_)) => Err(MailboxError::Gone),
            Err(_) => Err(MailboxError::Timeout {
                ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            }),
        }
    }

    pub fn actor(&self) -> &ActorRef<Envelope<M>> {
        &self.actor
    }

    /// Messages currently queued or being handled.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// The bound given to [`BoundedRef::new`].
    pub fn max(&self) -> usize {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ractor::{Actor, ActorProcessingErr};
    use tokio::sync::Semaphore;

    /// An actor whose every message waits for one permit of a semaphore: the test holds
    /// the actor blocked until it adds permits.
    struct Gate;

    enum GateMsg {
        Work,
        Ask(RpcReplyPort<u32>),
    }

    impl Actor for Gate {
        type Msg = Envelope<GateMsg>;
        type State = Arc<Semaphore>;
        type Arguments = Arc<Semaphore>;

        async fn pre_start(
            &self,
            _myself: ActorRef<Self::Msg>,
            gate: Arc<Semaphore>,
        ) -> Result<Self::State, ActorProcessingErr> {
            Ok(gate)
        }

        async fn handle(
            &self,
            _myself: ActorRef<Self::Msg>,
            envelope: Self::Msg,
            gate: &mut Self::State,
        ) -> Result<(), ActorProcessingErr> {
            // Keep the ticket until the work is done, so the message counts while handled.
            let Envelope {
                msg,
                ticket: _ticket,
            } = envelope;
            gate.acquire().await?.forget();
            if let GateMsg::Ask(reply) = msg {
                // The asker may have timed out and gone; that is its business.
                let _ = reply.send(42);
            }
            Ok(())
        }
    }

    async fn wait_until_drained(r: &BoundedRef<GateMsg>) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while r.in_flight() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "mailbox did not drain"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn refuses_past_max_while_blocked_and_accepts_after_draining() {
        let gate = Arc::new(Semaphore::new(0));
        let (actor, handle) = Actor::spawn(None, Gate, gate.clone()).await.unwrap();
        let max = 3;
        let r = BoundedRef::new(actor.clone(), max);
        for _ in 0..max {
            r.try_send(GateMsg::Work).unwrap();
        }
        assert_eq!(r.try_send(GateMsg::Work), Err(MailboxError::Full { max }));
        assert_eq!(r.in_flight(), max);

        gate.add_permits(max);
        wait_until_drained(&r).await;
        r.try_send(GateMsg::Work).unwrap();

        gate.add_permits(1);
        wait_until_drained(&r).await;
        actor.stop(None);
        handle.await.unwrap();
        assert_eq!(r.try_send(GateMsg::Work), Err(MailboxError::Gone));
        assert_eq!(
            r.in_flight(),
            0,
            "a refused message must give its slot back"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn call_answers_and_times_out() {
        let gate = Arc::new(Semaphore::new(1));
        let (actor, handle) = Actor::spawn(None, Gate, gate.clone()).await.unwrap();
        let r = BoundedRef::new(actor.clone(), 2);
        let answer = r.call(GateMsg::Ask, Duration::from_secs(5)).await;
        assert_eq!(answer, Ok(42));

        // No permits left: the actor blocks and the call times out.
        let answer = r.call(GateMsg::Ask, Duration::from_millis(50)).await;
        assert_eq!(answer, Err(MailboxError::Timeout { ms: 50 }));

        gate.add_permits(1);
        wait_until_drained(&r).await;
        actor.stop(None);
        handle.await.unwrap();
    }
}
