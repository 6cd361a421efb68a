//! The delta codec of mesh-actors, compiled on its own for fuzzing.

#[path = "../../src/delta/mod.rs"]
pub mod delta;
pub use mesh_transport::ContentId;
