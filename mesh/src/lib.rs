//! mesh: the node assembly, its configuration, the admin protocol and the operator's
//! CLI. The binary `mesh` is a thin wrapper around [`cli::run`].

pub mod cli;
pub mod config;
pub mod node;
pub mod proto;
