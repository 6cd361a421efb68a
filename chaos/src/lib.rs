//! mesh-chaos: the fault-injection harness and the whole-system benchmarks.
//!
//! It starts fleets of real `mesh` processes, injects faults (kill, pause, partitions,
//! loss, slow links, full or corrupted disks, lying peers), checks invariants, and
//! hosts the `bench` commands. The harness arrives with its own issue; until then this
//! crate only pins the dependency direction (transport <- actors <- mesh <- chaos).

pub use mesh;
