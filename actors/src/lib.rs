//! mesh-actors: the supervision tree of a mesh node and what each actor owns.
//!
//! Decisions (restart budgets, release acceptance) live in plain structs that take `now`
//! and inputs and return what to do; the actors are thin shells that feed them messages
//! and carry out the result. See `docs/architecture.md` and `docs/runtime-semantics.md`.

pub mod backlog;
pub mod bucket;
pub mod delta;
pub mod fetch;
pub mod firmware;
pub mod host;
pub mod kv;
pub mod mailbox;
pub mod manifest;
pub mod node;
pub mod peers;
pub mod quota;
pub mod releases;
pub mod restart;
pub mod sandbox;
pub mod sandbox_supervisor;
pub mod schedule;
pub mod seeding;
pub mod slots;
pub mod store;
#[cfg(test)]
mod swarm_model;
pub mod trust;
pub mod verified;

/// Milliseconds since the Unix epoch, for reports and log lines (never for decisions,
/// which take their `now` as an argument).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
