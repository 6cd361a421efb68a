//! Node configuration: embedded defaults, a TOML file, and command-line flags, in
//! increasing order of precedence.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_actors::firmware::{TargetConfig, TargetKind, AGENT_TARGET};
use mesh_actors::quota::QuotaPolicy;
use mesh_actors::restart::RestartPolicy;
use mesh_actors::sandbox::PoolConfig;
use mesh_actors::sandbox_supervisor::SandboxConfig;
use mesh_actors::trust::TrustPolicy;
use mesh_transport::libp2p::Multiaddr;
use mesh_transport::PublicKey;
use serde::{Deserialize, Serialize};

/// A config file is a few hundred bytes; refuse anything absurd before parsing it.
pub const CONFIG_BYTES_MAX: u64 = 1024 * 1024;
/// The default QUIC port of the mesh (libp2p).
pub const DEFAULT_PORT: u16 = 7400;
/// The default port of the operator's admin endpoint (quinn).
pub const DEFAULT_ADMIN_PORT: u16 = 7401;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is larger than {CONFIG_BYTES_MAX} bytes")]
    TooLarge { path: String },
    #[error("parsing config file {path}: {source}")]
    Parse {
        path: String,
        source: Box<toml::de::Error>,
    },
    #[error("parsing address {addr:?}: expected HOST:PORT or a multiaddr like /ip4/1.2.3.4/udp/7400/quic-v1")]
    Address { addr: String },
    #[error("parsing label {label:?}: expected KEY=VALUE")]
    Label { label: String },
    #[error("no user data directory is known on this system; pass --state DIR")]
    NoStateDir,
    #[error("resolving the state directory {path}: {reason}")]
    StateDir { path: String, reason: String },
    #[error("checking firmware target {name:?}: {reason}")]
    Firmware { name: String, reason: String },
}

/// The `[sandbox]` table.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxSection {
    pub memory_mib: Option<u64>,
    pub call_ms: Option<u64>,
    pub tick_ms: Option<u64>,
    pub log_line_bytes: Option<usize>,
    /// Instance slots of the pooling allocator; 0 allocates on demand.
    pub pool_instances: Option<u32>,
    /// Count fuel too, this much per call.
    pub fuel_per_call: Option<u64>,
    pub compile_ms: Option<u64>,
}

/// The `[quotas]` table: module quota defaults (when a release says nothing), caps
/// (whatever a release says), and the node's budget for all modules together.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaSection {
    pub cpu_permille: Option<u32>,
    pub messages_per_s: Option<u32>,
    pub log_bytes_per_s: Option<u64>,
    pub publish_bytes_per_s: Option<u64>,
    pub state_bytes: Option<u64>,
    pub cap_memory_mib: Option<u64>,
    pub cap_call_ms: Option<u64>,
    pub cap_cpu_permille: Option<u32>,
    pub cap_messages_per_s: Option<u32>,
    pub cap_log_bytes_per_s: Option<u64>,
    pub cap_publish_bytes_per_s: Option<u64>,
    pub cap_state_bytes: Option<u64>,
    pub node_memory_mib: Option<u64>,
    pub node_cpu_permille: Option<u32>,
    pub node_state_bytes: Option<u64>,
}

/// The `[restart]` table: the restart intensity of module actors.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestartSection {
    pub intensity: Option<u32>,
    pub period_ms: Option<u64>,
    pub backoff_initial_ms: Option<u64>,
    pub backoff_max_ms: Option<u64>,
}

/// One `[[firmware]]` table: a device firmware target with its A/B slots.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FirmwareSection {
    /// The release name whose firmware goes into this target.
    pub name: String,
    /// The image slot A starts with (what the device runs); empty when not given.
    pub initial_image: Option<PathBuf>,
    /// Run with `sh -c` to switch the device to a slot (see docs/runtime-semantics.md).
    pub activate: Option<String>,
    /// Run with `sh -c`; must succeed before a new image is confirmed.
    pub health: Option<String>,
    pub boot_attempts: Option<u32>,
    /// How long a new image must stay up before it is confirmed.
    pub grace_ms: Option<u64>,
    /// How long a new image has to become healthy before the switch back.
    pub deadline_ms: Option<u64>,
}

/// The config file, every field optional.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    pub state: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub listen: Option<Vec<String>>,
    pub admin: Option<SocketAddr>,
    /// UDP port of the blob data endpoint, on the first listen address's host.
    pub blob_port: Option<u16>,
    pub bootstrap: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub release_keys: Vec<PublicKey>,
    pub threshold: Option<usize>,
    pub operators: Vec<PublicKey>,
    pub module_bytes_max: Option<u64>,
    /// Total bytes of blobs (and downloads in progress) the node stores.
    pub store_bytes_max: Option<u64>,
    /// Upload cap for serving peers, bytes per second.
    pub upload_bytes_per_s: Option<u64>,
    /// Download cap for fetching from peers, bytes per second.
    pub download_bytes_per_s: Option<u64>,
    pub sandbox: SandboxSection,
    pub restart: RestartSection,
    pub quotas: QuotaSection,
    /// Files modules may read with `sensor_read`, exactly as listed.
    pub sensors: Vec<PathBuf>,
    /// Device firmware targets.
    pub firmware: Vec<FirmwareSection>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let shown = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        if meta.len() > CONFIG_BYTES_MAX {
            return Err(ConfigError::TooLarge { path: shown });
        }
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: shown,
            source: Box::new(source),
        })
    }
}

/// Everything a node needs, resolved.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub state_dir: PathBuf,
    pub key_path: PathBuf,
    pub listen: Vec<Multiaddr>,
    pub admin: SocketAddr,
    /// UDP port of the blob data endpoint; 0 picks a free one (peers learn it).
    pub blob_port: u16,
    pub bootstrap: Vec<Multiaddr>,
    pub labels: BTreeMap<String, String>,
    pub policy: TrustPolicy,
    pub operators: Vec<PublicKey>,
    pub sandbox: SandboxConfig,
    /// Files modules may read with `sensor_read`.
    pub sensors: BTreeSet<PathBuf>,
    pub store_bytes_max: Option<u64>,
    pub upload_bytes_per_s: Option<u64>,
    pub download_bytes_per_s: Option<u64>,
    /// How often the node gossips its report (health, labels, modules).
    pub report_interval: Duration,
    /// Device firmware targets (the agent's own target comes from the launcher).
    pub firmware: Vec<TargetConfig>,
}

/// The flags of `mesh agent`, already parsed; `None` and empty mean "not given".
#[derive(Clone, Debug, Default)]
pub struct AgentFlags {
    pub config: Option<PathBuf>,
    pub state: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub listen: Vec<String>,
    pub admin: Option<SocketAddr>,
    pub blob_port: Option<u16>,
    pub bootstrap: Vec<String>,
    pub labels: Vec<String>,
    pub release_keys: Vec<PublicKey>,
    pub threshold: Option<usize>,
    pub operators: Vec<PublicKey>,
    pub store_bytes_max: Option<u64>,
    pub upload_bytes_per_s: Option<u64>,
    pub download_bytes_per_s: Option<u64>,
}

impl NodeConfig {
    /// Resolves defaults, then the config file, then the flags.
    pub fn resolve(flags: &AgentFlags) -> Result<NodeConfig, ConfigError> {
        let file = match &flags.config {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        let state_dir = match flags.state.clone().or(file.state.clone()) {
            Some(s) => s,
            None => dirs::data_dir()
                .ok_or(ConfigError::NoStateDir)?
                .join("mesh"),
        };
        // The compiled-module cache needs an absolute path, and the launcher starts the
        // agent from wherever it runs: a relative `--state` means the current directory's.
        let state_dir = std::path::absolute(&state_dir).map_err(|e| ConfigError::StateDir {
            path: state_dir.display().to_string(),
            reason: e.to_string(),
        })?;
        let key_path = flags
            .key
            .clone()
            .or(file.key.clone())
            .unwrap_or_else(|| state_dir.join("node.key"));
        let listen_strs = if !flags.listen.is_empty() {
            flags.listen.clone()
        } else {
            file.listen
                .clone()
                .unwrap_or_else(|| vec![format!("0.0.0.0:{DEFAULT_PORT}")])
        };
        let listen = listen_strs
            .iter()
            .map(|s| parse_peer_addr(s))
            .collect::<Result<Vec<_>, _>>()?;
        let bootstrap = file
            .bootstrap
            .iter()
            .chain(flags.bootstrap.iter())
            .map(|s| parse_peer_addr(s))
            .collect::<Result<Vec<_>, _>>()?;
        let mut labels = file.labels.clone();
        for l in &flags.labels {
            let (k, v) = l
                .split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| ConfigError::Label { label: l.clone() })?;
            labels.insert(k.to_string(), v.to_string());
        }
        let release_keys: BTreeSet<PublicKey> = file
            .release_keys
            .iter()
            .chain(flags.release_keys.iter())
            .copied()
            .collect();
        let mut policy = TrustPolicy {
            release_keys,
            threshold: flags.threshold.or(file.threshold).unwrap_or(1),
            ..TrustPolicy::default()
        };
        if let Some(max) = file.module_bytes_max {
            policy.module_bytes_max = max;
        }
        let mut operators = file.operators.clone();
        operators.extend(flags.operators.iter().copied());
        operators.sort();
        operators.dedup();

        let sandbox_quotas = resolve_quotas(&file);
        let mut restart = RestartPolicy::default();
        if let Some(i) = file.restart.intensity {
            restart.intensity = i;
        }
        if let Some(ms) = file.restart.period_ms {
            restart.period = Duration::from_millis(ms);
        }
        if let Some(ms) = file.restart.backoff_initial_ms {
            restart.backoff_initial = Duration::from_millis(ms);
        }
        if let Some(ms) = file.restart.backoff_max_ms {
            restart.backoff_max = Duration::from_millis(ms);
        }
        let mut sandbox = SandboxConfig {
            quotas: sandbox_quotas,
            restart,
            ..SandboxConfig::default()
        };
        if let Some(b) = file.sandbox.log_line_bytes {
            sandbox.log_line_bytes_max = b;
        }
        // Compiled modules are cached under the node's own state directory only.
        sandbox.engine.cache_dir = Some(state_dir.join("cache"));
        sandbox.engine.fuel_per_call = file.sandbox.fuel_per_call;
        if let Some(ms) = file.sandbox.compile_ms {
            sandbox.engine.compile_ms_max = ms;
        }
        sandbox.engine.pool = match file.sandbox.pool_instances {
            Some(0) => None,
            n => Some(PoolConfig {
                instances: n.unwrap_or(PoolConfig::default().instances),
                memory_bytes_max: sandbox.quotas.caps.memory_bytes,
            }),
        };
        if let Some(ms) = file.sandbox.tick_ms {
            sandbox.tick_interval = Duration::from_millis(ms.max(1));
        }
        Ok(NodeConfig {
            state_dir,
            key_path,
            listen,
            admin: flags
                .admin
                .or(file.admin)
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], DEFAULT_ADMIN_PORT))),
            blob_port: flags.blob_port.or(file.blob_port).unwrap_or(0),
            bootstrap,
            labels,
            policy,
            operators,
            sandbox,
            sensors: file.sensors.iter().cloned().collect(),
            store_bytes_max: flags.store_bytes_max.or(file.store_bytes_max),
            upload_bytes_per_s: flags.upload_bytes_per_s.or(file.upload_bytes_per_s),
            download_bytes_per_s: flags.download_bytes_per_s.or(file.download_bytes_per_s),
            report_interval: Duration::from_secs(2),
            firmware: resolve_firmware(&file.firmware)?,
        })
    }
}

/// Device firmware targets from the `[[firmware]]` tables.
fn resolve_firmware(sections: &[FirmwareSection]) -> Result<Vec<TargetConfig>, ConfigError> {
    let mut out: Vec<TargetConfig> = Vec::new();
    for s in sections {
        let err = |reason: String| ConfigError::Firmware {
            name: s.name.clone(),
            reason,
        };
        mesh_actors::manifest::check_name(&s.name).map_err(|e| err(e.to_string()))?;
        if s.name == AGENT_TARGET {
            return Err(err(format!(
                "{AGENT_TARGET:?} is the agent's own target, managed by `mesh launcher`"
            )));
        }
        if out.iter().any(|t| t.name == s.name) {
            return Err(err("listed twice".into()));
        }
        let mut t = TargetConfig::device(&s.name);
        t.kind = TargetKind::Device {
            activate: s.activate.clone(),
        };
        t.initial_image = s.initial_image.clone();
        t.health = s.health.clone();
        set(&mut t.boot_attempts, s.boot_attempts);
        set(&mut t.grace, s.grace_ms.map(Duration::from_millis));
        set(&mut t.deadline, s.deadline_ms.map(Duration::from_millis));
        out.push(t);
    }
    Ok(out)
}

/// Module quotas: the built-in policy, then the `[sandbox]` and `[quotas]` tables.
fn resolve_quotas(file: &FileConfig) -> QuotaPolicy {
    let mut p = QuotaPolicy::default();
    let (s, q) = (&file.sandbox, &file.quotas);
    let mib = |m: u64| m.saturating_mul(1024 * 1024);
    let d = &mut p.defaults;
    if let Some(m) = s.memory_mib {
        d.memory_bytes = mib(m);
    }
    if let Some(ms) = s.call_ms {
        d.call_ms = ms;
    }
    set(&mut d.cpu_share_permille, q.cpu_permille);
    set(&mut d.messages_per_s, q.messages_per_s);
    set(&mut d.log_bytes_per_s, q.log_bytes_per_s);
    set(&mut d.publish_bytes_per_s, q.publish_bytes_per_s);
    set(&mut d.state_bytes, q.state_bytes);
    let c = &mut p.caps;
    set(&mut c.memory_bytes, q.cap_memory_mib.map(mib));
    set(&mut c.call_ms, q.cap_call_ms);
    set(&mut c.cpu_share_permille, q.cap_cpu_permille);
    set(&mut c.messages_per_s, q.cap_messages_per_s);
    set(&mut c.log_bytes_per_s, q.cap_log_bytes_per_s);
    set(&mut c.publish_bytes_per_s, q.cap_publish_bytes_per_s);
    set(&mut c.state_bytes, q.cap_state_bytes);
    // A default above its cap would be capped anyway; raising the cap to the default
    // keeps an operator's explicit default meaningful.
    c.memory_bytes = c.memory_bytes.max(p.defaults.memory_bytes);
    c.call_ms = c.call_ms.max(p.defaults.call_ms);
    let b = &mut p.budget;
    set(&mut b.memory_bytes, q.node_memory_mib.map(mib));
    set(&mut b.cpu_permille, q.node_cpu_permille);
    set(&mut b.state_bytes, q.node_state_bytes);
    p
}

fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *field = v;
    }
}

/// Parses a peer address: `HOST:PORT` (QUIC over UDP) or a full multiaddr.
pub fn parse_peer_addr(s: &str) -> Result<Multiaddr, ConfigError> {
    let err = || ConfigError::Address {
        addr: s.to_string(),
    };
    if s.starts_with('/') {
        return s.parse().map_err(|_| err());
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(err)?;
    let port: u16 = port.parse().map_err(|_| err())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ma = match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => format!("/ip4/{ip}/udp/{port}/quic-v1"),
        Ok(std::net::IpAddr::V6(ip)) => format!("/ip6/{ip}/udp/{port}/quic-v1"),
        Err(_) if !host.is_empty() => format!("/dns/{host}/udp/{port}/quic-v1"),
        Err(_) => return Err(err()),
    };
    ma.parse().map_err(|_| err())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            parse_peer_addr("127.0.0.1:7400").unwrap().to_string(),
            "/ip4/127.0.0.1/udp/7400/quic-v1"
        );
        assert_eq!(
            parse_peer_addr("[::1]:1").unwrap().to_string(),
            "/ip6/::1/udp/1/quic-v1"
        );
        assert!(parse_peer_addr("nohost").is_err());
        assert!(parse_peer_addr("/ip4/1.2.3.4/udp/1/quic-v1").is_ok());
    }

    #[test]
    fn quotas_sensors_and_engine_from_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.toml");
        std::fs::write(
            &path,
            "sensors = [\"/sys/class/thermal/thermal_zone0/temp\"]\n\
             [sandbox]\nmemory_mib = 8\npool_instances = 0\nfuel_per_call = 1000\n\
             [quotas]\ncpu_permille = 50\ncap_memory_mib = 4\nnode_memory_mib = 100\n",
        )
        .unwrap();
        let flags = AgentFlags {
            config: Some(path),
            state: Some(dir.path().join("s")),
            ..AgentFlags::default()
        };
        let c = NodeConfig::resolve(&flags).unwrap();
        let q = &c.sandbox.quotas;
        assert_eq!(q.defaults.memory_bytes, 8 << 20);
        // A cap below the default is raised to it: the operator's default holds.
        assert_eq!(q.caps.memory_bytes, 8 << 20);
        assert_eq!(q.defaults.cpu_share_permille, 50);
        assert_eq!(q.budget.memory_bytes, 100 << 20);
        assert!(c.sandbox.engine.pool.is_none());
        assert_eq!(c.sandbox.engine.fuel_per_call, Some(1000));
        assert!(c.sensors.contains(std::path::Path::new(
            "/sys/class/thermal/thermal_zone0/temp"
        )));
        // The default node gets a pool sized to the memory cap.
        let c = NodeConfig::resolve(&AgentFlags {
            state: Some(dir.path().join("t")),
            ..AgentFlags::default()
        })
        .unwrap();
        let pool = c.sandbox.engine.pool.unwrap();
        assert_eq!(pool.memory_bytes_max, c.sandbox.quotas.caps.memory_bytes);
    }

    #[test]
    fn flags_override_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.toml");
        let k = mesh_transport::SecretKey::from_seed([1; 32]).public();
        std::fs::write(
            &path,
            format!(
                "state = \"/tmp/x\"\nlabels = {{ site = \"a\", hw = \"rpi4\" }}\nrelease_keys = [\"{k}\"]\nthreshold = 1\n[sandbox]\ncall_ms = 7\n"
            ),
        )
        .unwrap();
        let flags = AgentFlags {
            config: Some(path.clone()),
            state: Some(dir.path().join("s")),
            labels: vec!["site=b".into()],
            ..AgentFlags::default()
        };
        let c = NodeConfig::resolve(&flags).unwrap();
        assert_eq!(c.state_dir, dir.path().join("s"));
        assert_eq!(c.labels["site"], "b");
        assert_eq!(c.labels["hw"], "rpi4");
        assert!(c.policy.release_keys.contains(&k));
        assert_eq!(c.sandbox.quotas.defaults.call_ms, 7);
        assert_eq!(c.sandbox.engine.cache_dir, Some(dir.path().join("s/cache")));
        assert_eq!(c.key_path, dir.path().join("s/node.key"));

        std::fs::write(
            &path,
            "[[firmware]]\nname = \"gw\"\nactivate = \"true\"\ngrace_ms = 500\n",
        )
        .unwrap();
        let c = NodeConfig::resolve(&flags).unwrap();
        assert_eq!(c.firmware.len(), 1);
        assert_eq!(c.firmware[0].grace, Duration::from_millis(500));
        std::fs::write(&path, "[[firmware]]\nname = \"agent\"\n").unwrap();
        assert!(NodeConfig::resolve(&flags).is_err(), "agent is reserved");

        std::fs::write(&path, "unknown_field = 1\n").unwrap();
        let err = NodeConfig::resolve(&flags).unwrap_err().to_string();
        assert!(err.contains("parsing config file"), "{err}");
    }

    #[test]
    fn a_relative_state_dir_is_made_absolute() {
        let flags = AgentFlags {
            state: Some(PathBuf::from("relative/state")),
            ..AgentFlags::default()
        };
        let c = NodeConfig::resolve(&flags).unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(c.state_dir, cwd.join("relative/state"));
        assert_eq!(
            c.sandbox.engine.cache_dir,
            Some(cwd.join("relative/state/cache"))
        );
    }
}
