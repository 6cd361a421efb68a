//! The host API a module imports (`mesh.*`), and the subset of WASI preview1 that C
//! guests need (`wasi_snapshot_preview1.*`, with no file system: nothing is preopened).
//!
//! The contract, from the guest's side, is in `docs/host-api.md`. In short:
//! - a pointer and length that do not lie inside the module's memory are a bug in the
//!   module: the call **traps** (the module is stopped and restarted like after any trap);
//! - everything the module may legitimately be refused (a sensor not on the allowlist, a
//!   rate or state quota, a full queue, a missing key) is a **negative error code**;
//! - nothing a guest passes can panic the host.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rand::RngCore;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use wasmtime::{AsContextMut, Caller, Extern, Linker, Memory, ResourceLimiter, Val, ValType};

use crate::kv::{KvError, KvStore, KV_KEY_BYTES_MAX, KV_VALUE_BYTES_MAX};
use crate::quota::{ModuleQuotas, TokenBucket, Usage};
use crate::sandbox::{LogLine, INSTANCES_MAX, MEMORIES_MAX, TABLES_MAX, TABLE_ELEMENTS_MAX};

/// The import module of the mesh host API.
pub const HOST_MODULE: &str = "mesh";
/// The import module of WASI preview1.
pub const WASI_MODULE: &str = "wasi_snapshot_preview1";

/// A bad argument value (not a bad pointer): an invalid topic, no message to read.
pub const E_INVALID: i32 = -1;
/// Not allowed on this node: a sensor path not on the allowlist, a service not offered.
pub const E_DENIED: i32 = -2;
/// No such key or sensor.
pub const E_NOT_FOUND: i32 = -3;
/// The argument is larger than the call accepts.
pub const E_TOO_LARGE: i32 = -4;
/// Over a quota: a rate (publish), the state size, the number of subscriptions.
pub const E_QUOTA: i32 = -5;
/// A queue on the way is full; the same call may succeed later.
pub const E_FULL: i32 = -6;
/// The node failed to do it (a sensor read or a database error); not the module's fault.
pub const E_IO: i32 = -7;

/// Topic names are short identifiers, `[a-z0-9][a-z0-9._/-]*`.
pub const TOPIC_BYTES_MAX: usize = 64;
/// One published message: readings and aggregates, not bulk data; gossip carries it to
/// every node, so it stays small.
pub const PUBLISH_BYTES_MAX: usize = 8 * 1024;
/// Topics one module may subscribe to; each costs a lookup per delivered message.
pub const SUBSCRIPTIONS_MAX: usize = 16;
/// One sensor reading: sysfs and procfs values are a few bytes to a few lines.
pub const SENSOR_BYTES_MAX: usize = 4096;
/// A sensor path, as written in the node's allowlist.
pub const SENSOR_PATH_BYTES_MAX: usize = 256;
/// Random bytes per call: enough for keys and nonces, too little to turn the call into
/// a way of burning the node's entropy or CPU.
pub const RANDOM_BYTES_MAX: usize = 4096;
/// The state a module hands to its next version in `snapshot`; larger state belongs in
/// the key-value store, which survives restarts too.
pub const SNAPSHOT_BYTES_MAX: usize = 1 << 20;
/// I/O vectors in one WASI `fd_write` or `fd_read`; wasi-libc uses one or two.
pub const IOVECS_MAX: u32 = 64;
/// Bytes one WASI `random_get` may ask for (wasi-libc asks for 256 at most).
pub const WASI_RANDOM_BYTES_MAX: u32 = 64 * 1024;

/// WASI errno values (preview1).
const ERRNO_SUCCESS: i32 = 0;
const ERRNO_BADF: i32 = 8;
const ERRNO_INVAL: i32 = 28;
const ERRNO_NOSYS: i32 = 52;
const ERRNO_SPIPE: i32 = 70;

/// WASI functions implemented here; any other a module imports from `WASI_MODULE`
/// answers `ENOSYS` (when its type allows an errno result).
const WASI_IMPLEMENTED: &[&str] = &[
    "args_get",
    "args_sizes_get",
    "environ_get",
    "environ_sizes_get",
    "clock_res_get",
    "clock_time_get",
    "fd_write",
    "fd_read",
    "fd_close",
    "fd_seek",
    "fd_fdstat_get",
    "fd_prestat_get",
    "fd_prestat_dir_name",
    "proc_exit",
    "random_get",
    "sched_yield",
];

/// The host functions of the mesh API, by name.
pub const HOST_FUNCTIONS: &[&str] = &[
    "log",
    "sensor_read",
    "publish",
    "subscribe",
    "kv_get",
    "kv_set",
    "now_us",
    "random",
    "msg_topic",
    "msg_data",
    "snapshot_write",
];

/// What the node offers its modules beyond their own memory. Cheap to clone.
#[derive(Clone, Default)]
pub struct HostServices {
    /// Persistent state; without it `kv_get`/`kv_set` answer `E_DENIED`.
    pub kv: Option<Arc<KvStore>>,
    /// Files `sensor_read` may read, exactly as listed (no prefixes, no globbing).
    pub sensors: Arc<BTreeSet<PathBuf>>,
    /// Where published messages go; without it `publish` answers `E_DENIED`.
    pub outbox: Option<mpsc::Sender<Published>>,
}

/// A message a module published, on its way to subscribers on every node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    /// The publishing module.
    pub module: String,
    pub topic: String,
    pub data: Vec<u8>,
}

/// The gossipsub topic that carries published messages between nodes.
pub const APP_TOPIC: &str = "mesh/app/1";
/// An encoded [`Published`]: the payload, the topic and the module name, with room for
/// their length prefixes.
pub const PUBLISHED_BYTES_MAX: usize =
    PUBLISH_BYTES_MAX + TOPIC_BYTES_MAX + crate::manifest::NAME_BYTES_MAX + 32;

/// Errors from decoding a published message received from a peer.
#[derive(Debug, thiserror::Error)]
pub enum PublishedDecodeError {
    #[error("decoding published message: {0}")]
    Wire(#[from] mesh_transport::wire::WireError),
    #[error("decoding published message: invalid topic {0:?}")]
    Topic(String),
    #[error("decoding published message: {0}")]
    Name(#[from] crate::manifest::ShapeError),
    #[error("decoding published message: {len} bytes of data is over {PUBLISH_BYTES_MAX}")]
    TooLarge { len: usize },
}

impl Published {
    /// The gossip form.
    pub fn encode(&self) -> Vec<u8> {
        // Strings and bytes always encode; a failure would be a programming error.
        mesh_transport::wire::encode(self).expect("published messages always encode")
    }

    /// Decodes untrusted bytes from a peer, within [`PUBLISHED_BYTES_MAX`], checking the
    /// topic, the module name and the payload size as `publish` does.
    pub fn decode(bytes: &[u8]) -> Result<Published, PublishedDecodeError> {
        let m: Published = mesh_transport::wire::decode(bytes, PUBLISHED_BYTES_MAX)?;
        if !valid_topic(&m.topic) {
            return Err(PublishedDecodeError::Topic(m.topic));
        }
        crate::manifest::check_name(&m.module)?;
        if m.data.len() > PUBLISH_BYTES_MAX {
            return Err(PublishedDecodeError::TooLarge { len: m.data.len() });
        }
        Ok(m)
    }
}

/// Whether `topic` is a valid topic name.
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= TOPIC_BYTES_MAX
        && topic.char_indices().all(|(i, c)| {
            c.is_ascii_lowercase()
                || c.is_ascii_digit()
                || (i > 0 && matches!(c, '.' | '_' | '/' | '-'))
        })
}

/// The input of the call in progress: a message (`on_message`) or a snapshot (`restore`).
/// Shared, not owned: a message is handed to the guest without copying it first, since
/// the same bytes may be queued for several modules.
pub(crate) struct Input {
    pub topic: Arc<str>,
    pub data: Arc<[u8]>,
}

/// The state a store carries for the host functions and the limiter.
pub(crate) struct Host {
    pub module: String,
    pub version: u64,
    pub log_line_bytes_max: usize,
    pub logs: mpsc::Sender<LogLine>,
    pub usage: Arc<Usage>,
    pub services: HostServices,
    pub quotas: ModuleQuotas,
    pub log_bucket: TokenBucket,
    pub publish_messages: TokenBucket,
    pub publish_bytes: TokenBucket,
    pub limiter: Limiter,
    /// The instance's exported "memory", looked up once after instantiation rather than
    /// by name in every host call (`None` before that, or if there is none).
    pub memory: Option<Memory>,
    pub input: Option<Input>,
    /// `Some` while the `snapshot` export runs: what it wrote so far.
    pub snapshot: Option<Vec<u8>>,
    pub subscriptions: BTreeSet<String>,
    /// Bytes written to WASI stdout/stderr that do not end a line yet.
    pub stdio_line: Vec<u8>,
    /// The current call's clock, for the time host calls spend blocked on IO.
    pub call: CallClock,
}

/// Time a host call spends blocked on the disk (a durable `kv_set`, a `sensor_read`) is
/// given back to the call's deadline, up to this much per call: a slow disk must not
/// make a module overrun its CPU deadline and be restarted, and past this the deadline
/// counts it again, so a guest cannot run forever on host calls.
pub const HOST_BLOCKED_MS_MAX: u64 = 2_000;

/// When the current call into the guest started, and how long its host calls were
/// blocked (the deadline is the guest's own time, `call_ms_max`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct CallClock {
    started: Instant,
    blocked: Duration,
    call_ms_max: u64,
}

impl CallClock {
    pub fn start(call_ms_max: u64, now: Instant) -> CallClock {
        CallClock {
            started: now,
            blocked: Duration::ZERO,
            call_ms_max,
        }
    }

    /// Records `blocked` spent in a host call, ending `now`; returns the milliseconds
    /// of guest time the call has left.
    pub fn blocked_for(&mut self, blocked: Duration, now: Instant) -> u64 {
        self.blocked = (self.blocked + blocked).min(Duration::from_millis(HOST_BLOCKED_MS_MAX));
        let guest = now
            .duration_since(self.started)
            .saturating_sub(self.blocked);
        self.call_ms_max
            .saturating_sub(u64::try_from(guest.as_millis()).unwrap_or(u64::MAX))
    }
}

/// Gives the time since `since`, spent blocked in this host call, back to the call's
/// deadline (see [`HOST_BLOCKED_MS_MAX`]).
fn give_back_blocked(caller: &mut Caller<'_, Host>, since: Instant) {
    let now = Instant::now();
    let left = caller.data_mut().call.blocked_for(now - since, now);
    // A call already past its deadline traps at its next check; a deadline of even one
    // tick would let a guest that loops on host calls push it back for ever.
    let ticks = if left == 0 {
        0
    } else {
        crate::sandbox::deadline_ticks(left)
    };
    caller.as_context_mut().set_epoch_deadline(ticks);
}

impl Host {
    pub fn new(
        module: &str,
        version: u64,
        log_line_bytes_max: usize,
        logs: mpsc::Sender<LogLine>,
        usage: Arc<Usage>,
        services: HostServices,
        quotas: ModuleQuotas,
    ) -> Host {
        let now = Instant::now();
        Host {
            module: module.to_string(),
            version,
            log_line_bytes_max,
            logs,
            limiter: Limiter {
                memory_bytes_max: quotas.memory_bytes,
                memory_limit_hit: false,
                usage: usage.clone(),
            },
            usage,
            services,
            log_bucket: TokenBucket::for_rate(quotas.log_bytes_per_s, now),
            publish_messages: TokenBucket::for_rate(quotas.messages_per_s.into(), now),
            publish_bytes: TokenBucket::for_rate(quotas.publish_bytes_per_s, now),
            quotas,
            memory: None,
            input: None,
            snapshot: None,
            subscriptions: BTreeSet::new(),
            stdio_line: Vec::new(),
            call: CallClock::start(0, now),
        }
    }

    /// Sends one log line, within the module's log rate; a line over the rate, or one
    /// the node's log channel has no room for, is dropped and counted.
    fn emit_log(&mut self, text: &str) {
        let (text, truncated) = truncate_at_char(text, self.log_line_bytes_max);
        let usage = &self.usage;
        if truncated {
            Usage::add(&usage.log_lines_truncated, 1);
        }
        // An empty line still costs a token, so a flood of empty lines is limited too.
        let cost = (text.len() as u64).max(1);
        if !self.log_bucket.try_take(cost, Instant::now()) {
            Usage::add(&usage.log_lines_dropped, 1);
            return;
        }
        Usage::add(&usage.log_bytes, text.len() as u64);
        let line = LogLine {
            module: self.module.clone(),
            version: self.version,
            text: text.to_string(),
            truncated,
            unix_ms: crate::unix_ms(),
        };
        // Never wait for the reader: a slow log consumer must not stall the module (and
        // the call's deadline would not cover time spent blocked here anyway).
        if self.logs.try_send(line).is_err() {
            Usage::add(&usage.log_lines_dropped, 1);
        }
    }
}

/// Limits memory, tables and instances of one store.
pub(crate) struct Limiter {
    pub memory_bytes_max: u64,
    /// Set when the guest asked for more memory than allowed, so that the trap it gets
    /// is reported as running out of memory even if the error's type is lost on the way.
    pub memory_limit_hit: bool,
    usage: Arc<Usage>,
}

/// The error a denied memory growth raises inside wasmtime.
#[derive(Debug, thiserror::Error)]
#[error("growing memory to {desired} bytes: over the limit of {max} bytes")]
pub(crate) struct MemoryLimitExceeded {
    pub desired: usize,
    pub max: u64,
}

/// A trap raised by a host function, with the message the module's owner will see.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct HostTrap(pub String);

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if u64::try_from(desired).map_or(true, |d| d > self.memory_bytes_max) {
            // Trapping rather than letting `memory.grow` return -1 is deliberate: a module
            // over its quota is stopped and reported as such, instead of looping on a
            // failed allocation until its deadline hides the real cause.
            self.memory_limit_hit = true;
            return Err(wasmtime::Error::new(MemoryLimitExceeded {
                desired,
                max: self.memory_bytes_max,
            }));
        }
        self.usage
            .memory_bytes
            .store(desired as u64, Ordering::Relaxed);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= TABLE_ELEMENTS_MAX)
    }

    fn instances(&self) -> usize {
        INSTANCES_MAX
    }

    fn tables(&self) -> usize {
        TABLES_MAX
    }

    fn memories(&self) -> usize {
        MEMORIES_MAX
    }
}

pub(crate) fn host_trap(message: impl Into<String>) -> wasmtime::Error {
    wasmtime::Error::new(HostTrap(message.into()))
}

/// The longest prefix of `text` that fits in `max` bytes without splitting a character.
pub(crate) fn truncate_at_char(text: &str, max: usize) -> (&str, bool) {
    if text.len() <= max {
        return (text, false);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (&text[..end], true)
}

/// The module's exported memory, or a trap naming the host call that needed it.
fn memory(caller: &mut Caller<'_, Host>, call: &str) -> wasmtime::Result<Memory> {
    if let Some(m) = caller.data().memory {
        return Ok(m);
    }
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Ok(m),
        _ => Err(host_trap(format!(
            "{call}: the module exports no memory named \"memory\""
        ))),
    }
}

/// The guest range `ptr..ptr+len` of `data`, or a trap. Wasm addresses are unsigned
/// 32-bit numbers that travel as i32, so negative values are large addresses.
fn range(
    data_len: usize,
    ptr: i32,
    len: i32,
    call: &str,
) -> wasmtime::Result<std::ops::Range<usize>> {
    let start = ptr as u32 as usize;
    let len = len as u32 as usize;
    match start.checked_add(len) {
        Some(end) if end <= data_len => Ok(start..end),
        _ => Err(host_trap(format!(
            "{call}: {len} bytes at {start} are outside the module's memory ({data_len} bytes)"
        ))),
    }
}

/// Copies `len` bytes at `ptr` out of the guest.
fn read_guest(
    caller: &mut Caller<'_, Host>,
    mem: Memory,
    ptr: i32,
    len: i32,
    call: &str,
) -> wasmtime::Result<Vec<u8>> {
    let data = mem.data(&caller);
    let r = range(data.len(), ptr, len, call)?;
    Ok(data[r].to_vec())
}

/// Copies `bytes` into the guest at `ptr`, which must have room for all of them.
fn write_guest(
    caller: &mut Caller<'_, Host>,
    mem: Memory,
    ptr: i32,
    bytes: &[u8],
    call: &str,
) -> wasmtime::Result<()> {
    let data = mem.data_mut(caller);
    let r = range(data.len(), ptr, bytes.len() as i32, call)?;
    data[r].copy_from_slice(bytes);
    Ok(())
}

/// Checks that the output buffer `ptr..ptr+cap` lies in memory, then copies as much of
/// `bytes` as fits; returns the full length of `bytes` so the guest can tell it was cut.
fn copy_out(
    caller: &mut Caller<'_, Host>,
    mem: Memory,
    ptr: i32,
    cap: i32,
    bytes: &[u8],
    call: &str,
) -> wasmtime::Result<i32> {
    let data_len = mem.data_size(&caller);
    let r = range(data_len, ptr, cap, call)?;
    let n = bytes.len().min(r.len());
    write_guest(caller, mem, ptr, &bytes[..n], call)?;
    Ok(i32::try_from(bytes.len()).unwrap_or(i32::MAX))
}

/// Reads a UTF-8 name (topic, path) from the guest: `None` when it is not UTF-8.
fn read_name(
    caller: &mut Caller<'_, Host>,
    mem: Memory,
    ptr: i32,
    len: i32,
    call: &str,
) -> wasmtime::Result<Option<String>> {
    let bytes = read_guest(caller, mem, ptr, len, call)?;
    Ok(String::from_utf8(bytes).ok())
}

/// Monotonic time origin shared by every module of the process.
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Defines the mesh host API and the WASI subset in `linker`.
pub(crate) fn define(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    origin();
    linker.func_wrap(HOST_MODULE, "log", host_log)?;
    linker.func_wrap(HOST_MODULE, "sensor_read", host_sensor_read)?;
    linker.func_wrap(HOST_MODULE, "publish", host_publish)?;
    linker.func_wrap(HOST_MODULE, "subscribe", host_subscribe)?;
    linker.func_wrap(HOST_MODULE, "kv_get", host_kv_get)?;
    linker.func_wrap(HOST_MODULE, "kv_set", host_kv_set)?;
    linker.func_wrap(HOST_MODULE, "now_us", || -> i64 {
        i64::try_from(origin().elapsed().as_micros()).unwrap_or(i64::MAX)
    })?;
    linker.func_wrap(HOST_MODULE, "random", host_random)?;
    linker.func_wrap(
        HOST_MODULE,
        "msg_topic",
        |mut c: Caller<'_, Host>, ptr: i32, cap: i32| {
            let mem = memory(&mut c, "msg_topic")?;
            let Some(topic) = c.data().input.as_ref().map(|i| Arc::clone(&i.topic)) else {
                return Ok(E_INVALID);
            };
            copy_out(&mut c, mem, ptr, cap, topic.as_bytes(), "msg_topic")
        },
    )?;
    linker.func_wrap(
        HOST_MODULE,
        "msg_data",
        |mut c: Caller<'_, Host>, ptr: i32, cap: i32| {
            let mem = memory(&mut c, "msg_data")?;
            let Some(data) = c.data().input.as_ref().map(|i| Arc::clone(&i.data)) else {
                return Ok(E_INVALID);
            };
            copy_out(&mut c, mem, ptr, cap, &data, "msg_data")
        },
    )?;
    linker.func_wrap(HOST_MODULE, "snapshot_write", host_snapshot_write)?;
    define_wasi(linker)
}

/// The first import of `module` that the host cannot provide, as (module, name).
/// WASI functions beyond the implemented subset are provided as `ENOSYS` stubs when
/// their type returns an errno, so they do not count.
pub(crate) fn unsupported_import(module: &wasmtime::Module) -> Option<(String, String)> {
    module
        .imports()
        .find(|i| match i.module() {
            HOST_MODULE => !HOST_FUNCTIONS.contains(&i.name()),
            WASI_MODULE => !WASI_IMPLEMENTED.contains(&i.name()) && nosys_type(&i.ty()).is_none(),
            _ => true,
        })
        .map(|i| (i.module().to_string(), i.name().to_string()))
}

/// The function type of an import that can be stubbed to return `ENOSYS`.
fn nosys_type(ty: &wasmtime::ExternType) -> Option<wasmtime::FuncType> {
    let wasmtime::ExternType::Func(f) = ty else {
        return None;
    };
    let results: Vec<ValType> = f.results().collect();
    (results.len() == 1 && matches!(results[0], ValType::I32)).then(|| f.clone())
}

/// Adds `ENOSYS` stubs to `linker` for the WASI functions `module` imports that the host
/// does not implement.
pub(crate) fn define_wasi_stubs(
    linker: &mut Linker<Host>,
    module: &wasmtime::Module,
) -> wasmtime::Result<()> {
    for import in module.imports() {
        if import.module() != WASI_MODULE || WASI_IMPLEMENTED.contains(&import.name()) {
            continue;
        }
        if let Some(ty) = nosys_type(&import.ty()) {
            let name = import.name().to_string();
            linker.func_new(WASI_MODULE, &name, ty, |_caller, _params, results| {
                results[0] = Val::I32(ERRNO_NOSYS);
                Ok(())
            })?;
        }
    }
    Ok(())
}

/// `mesh.log(ptr, len)`: logs `len` bytes of UTF-8 at `ptr`.
fn host_log(mut caller: Caller<'_, Host>, ptr: i32, len: i32) -> wasmtime::Result<()> {
    let mem = memory(&mut caller, "log")?;
    let data = mem.data(&caller);
    let r = range(data.len(), ptr, len, "log")?;
    let Ok(text) = std::str::from_utf8(&data[r]) else {
        return Err(host_trap("log: not utf-8"));
    };
    let text = text.to_string();
    caller.data_mut().emit_log(&text);
    Ok(())
}

/// `mesh.sensor_read(path_ptr, path_len, buf_ptr, buf_len) -> i32`.
fn host_sensor_read(
    mut caller: Caller<'_, Host>,
    path_ptr: i32,
    path_len: i32,
    buf_ptr: i32,
    buf_len: i32,
) -> wasmtime::Result<i32> {
    let mem = memory(&mut caller, "sensor_read")?;
    let size = mem.data_size(&caller);
    range(size, path_ptr, path_len, "sensor_read")?;
    range(size, buf_ptr, buf_len, "sensor_read")?;
    if path_len as u32 as usize > SENSOR_PATH_BYTES_MAX {
        return Ok(E_TOO_LARGE);
    }
    let Some(path) = read_name(&mut caller, mem, path_ptr, path_len, "sensor_read")? else {
        return Ok(E_INVALID);
    };
    let path = PathBuf::from(path);
    if !caller.data().services.sensors.contains(&path) {
        return Ok(E_DENIED);
    }
    use std::io::Read;
    let mut bytes = Vec::new();
    let since = Instant::now();
    let read = std::fs::File::open(&path)
        .and_then(|f| f.take(SENSOR_BYTES_MAX as u64).read_to_end(&mut bytes));
    give_back_blocked(&mut caller, since);
    match read {
        Ok(_) => copy_out(&mut caller, mem, buf_ptr, buf_len, &bytes, "sensor_read"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(E_NOT_FOUND),
        Err(e) => {
            tracing::debug!(module = %caller.data().module, path = %path.display(), "sensor_read: {e}");
            Ok(E_IO)
        }
    }
}

/// `mesh.publish(topic_ptr, topic_len, data_ptr, data_len) -> i32`.
fn host_publish(
    mut caller: Caller<'_, Host>,
    topic_ptr: i32,
    topic_len: i32,
    data_ptr: i32,
    data_len: i32,
) -> wasmtime::Result<i32> {
    let mem = memory(&mut caller, "publish")?;
    let size = mem.data_size(&caller);
    range(size, topic_ptr, topic_len, "publish")?;
    range(size, data_ptr, data_len, "publish")?;
    let refused = |c: &Caller<'_, Host>, code: i32| {
        Usage::add(&c.data().usage.publish_refused, 1);
        Ok(code)
    };
    if topic_len as u32 as usize > TOPIC_BYTES_MAX {
        return refused(&caller, E_INVALID);
    }
    let topic = match read_name(&mut caller, mem, topic_ptr, topic_len, "publish")? {
        Some(t) if valid_topic(&t) => t,
        _ => return refused(&caller, E_INVALID),
    };
    let len = data_len as u32 as usize;
    if len > PUBLISH_BYTES_MAX {
        return refused(&caller, E_TOO_LARGE);
    }
    let Some(outbox) = caller.data().services.outbox.clone() else {
        return refused(&caller, E_DENIED);
    };
    let now = Instant::now();
    let host = caller.data_mut();
    // Both rates must allow it; check before taking so a refusal costs nothing.
    if host.publish_messages.available(now) < 1 || host.publish_bytes.available(now) < len as u64 {
        return refused(&caller, E_QUOTA);
    }
    host.publish_messages.try_take(1, now);
    host.publish_bytes.try_take(len as u64, now);
    let data = read_guest(&mut caller, mem, data_ptr, data_len, "publish")?;
    let msg = Published {
        module: caller.data().module.clone(),
        topic,
        data,
    };
    if outbox.try_send(msg).is_err() {
        return refused(&caller, E_FULL);
    }
    let usage = &caller.data().usage;
    Usage::add(&usage.published, 1);
    Usage::add(&usage.published_bytes, len as u64);
    Ok(0)
}

/// `mesh.subscribe(topic_ptr, topic_len) -> i32`.
fn host_subscribe(mut caller: Caller<'_, Host>, ptr: i32, len: i32) -> wasmtime::Result<i32> {
    let mem = memory(&mut caller, "subscribe")?;
    range(mem.data_size(&caller), ptr, len, "subscribe")?;
    if len as u32 as usize > TOPIC_BYTES_MAX {
        return Ok(E_INVALID);
    }
    let topic = match read_name(&mut caller, mem, ptr, len, "subscribe")? {
        Some(t) if valid_topic(&t) => t,
        _ => return Ok(E_INVALID),
    };
    let subs = &mut caller.data_mut().subscriptions;
    if !subs.contains(&topic) && subs.len() >= SUBSCRIPTIONS_MAX {
        return Ok(E_QUOTA);
    }
    subs.insert(topic);
    Ok(0)
}

/// `mesh.kv_get(key_ptr, key_len, buf_ptr, buf_len) -> i32`.
fn host_kv_get(
    mut caller: Caller<'_, Host>,
    key_ptr: i32,
    key_len: i32,
    buf_ptr: i32,
    buf_len: i32,
) -> wasmtime::Result<i32> {
    let mem = memory(&mut caller, "kv_get")?;
    let size = mem.data_size(&caller);
    range(size, key_ptr, key_len, "kv_get")?;
    range(size, buf_ptr, buf_len, "kv_get")?;
    let Some(kv) = caller.data().services.kv.clone() else {
        return Ok(E_DENIED);
    };
    let klen = key_len as u32 as usize;
    if klen == 0 || klen > KV_KEY_BYTES_MAX {
        return Ok(E_INVALID);
    }
    let key = read_guest(&mut caller, mem, key_ptr, key_len, "kv_get")?;
    let module = caller.data().module.clone();
    match kv.get(&module, &key) {
        Ok(Some(value)) => copy_out(&mut caller, mem, buf_ptr, buf_len, &value, "kv_get"),
        Ok(None) => Ok(E_NOT_FOUND),
        Err(e) => {
            tracing::warn!(module = %module, "kv_get: {e}");
            Ok(E_IO)
        }
    }
}

/// `mesh.kv_set(key_ptr, key_len, val_ptr, val_len) -> i32`; an empty value deletes.
fn host_kv_set(
    mut caller: Caller<'_, Host>,
    key_ptr: i32,
    key_len: i32,
    val_ptr: i32,
    val_len: i32,
) -> wasmtime::Result<i32> {
    let mem = memory(&mut caller, "kv_set")?;
    let size = mem.data_size(&caller);
    range(size, key_ptr, key_len, "kv_set")?;
    range(size, val_ptr, val_len, "kv_set")?;
    let Some(kv) = caller.data().services.kv.clone() else {
        return Ok(E_DENIED);
    };
    let klen = key_len as u32 as usize;
    if klen == 0 || klen > KV_KEY_BYTES_MAX {
        return Ok(E_INVALID);
    }
    if val_len as u32 as usize > KV_VALUE_BYTES_MAX {
        return Ok(E_TOO_LARGE);
    }
    let key = read_guest(&mut caller, mem, key_ptr, key_len, "kv_set")?;
    let value = read_guest(&mut caller, mem, val_ptr, val_len, "kv_set")?;
    let since = Instant::now();
    let result = {
        let host = caller.data();
        kv.set(&host.module, &key, &value, host.quotas.state_bytes)
    };
    // The write is committed durably: on a busy disk that can take longer than the
    // guest's whole deadline.
    give_back_blocked(&mut caller, since);
    let host = caller.data();
    match result {
        Ok(used) => {
            host.usage.state_bytes.store(used, Ordering::Relaxed);
            Ok(0)
        }
        Err(KvError::Quota { .. }) => {
            Usage::add(&host.usage.state_refused, 1);
            Ok(E_QUOTA)
        }
        Err(KvError::Key { .. }) => Ok(E_INVALID),
        Err(KvError::Value { .. }) => Ok(E_TOO_LARGE),
        Err(e) => {
            tracing::warn!(module = %host.module, "kv_set: {e}");
            Ok(E_IO)
        }
    }
}

/// `mesh.random(ptr, len) -> i32`: fills the buffer with random bytes from the OS-seeded
/// generator.
fn host_random(mut caller: Caller<'_, Host>, ptr: i32, len: i32) -> wasmtime::Result<i32> {
    let mem = memory(&mut caller, "random")?;
    let data = mem.data_mut(&mut caller);
    let r = range(data.len(), ptr, len, "random")?;
    if r.len() > RANDOM_BYTES_MAX {
        return Ok(E_TOO_LARGE);
    }
    rand::thread_rng().fill_bytes(&mut data[r]);
    Ok(0)
}

/// `mesh.snapshot_write(ptr, len) -> i32`: appends to the snapshot being taken.
fn host_snapshot_write(mut caller: Caller<'_, Host>, ptr: i32, len: i32) -> wasmtime::Result<i32> {
    let mem = memory(&mut caller, "snapshot_write")?;
    let bytes = read_guest(&mut caller, mem, ptr, len, "snapshot_write")?;
    let Some(snapshot) = caller.data_mut().snapshot.as_mut() else {
        return Ok(E_INVALID);
    };
    if snapshot.len() + bytes.len() > SNAPSHOT_BYTES_MAX {
        return Ok(E_TOO_LARGE);
    }
    snapshot.extend_from_slice(&bytes);
    Ok(0)
}

/// Writes a little-endian u32 into guest memory.
fn put_u32(
    c: &mut Caller<'_, Host>,
    mem: Memory,
    ptr: i32,
    v: u32,
    call: &str,
) -> wasmtime::Result<()> {
    write_guest(c, mem, ptr, &v.to_le_bytes(), call)
}

fn put_u64(
    c: &mut Caller<'_, Host>,
    mem: Memory,
    ptr: i32,
    v: u64,
    call: &str,
) -> wasmtime::Result<()> {
    write_guest(c, mem, ptr, &v.to_le_bytes(), call)
}

/// Reads `count` WASI iovecs (`{ buf: u32, len: u32 }`) at `ptr` as guest ranges.
fn iovecs(
    c: &mut Caller<'_, Host>,
    mem: Memory,
    ptr: i32,
    count: i32,
    call: &str,
) -> wasmtime::Result<Vec<std::ops::Range<usize>>> {
    let count = count as u32;
    if count > IOVECS_MAX {
        return Err(host_trap(format!(
            "{call}: {count} iovecs is over {IOVECS_MAX}"
        )));
    }
    let raw = read_guest(c, mem, ptr, (count * 8) as i32, call)?;
    let size = mem.data_size(&c);
    raw.chunks_exact(8)
        .map(|v| {
            let buf = u32::from_le_bytes([v[0], v[1], v[2], v[3]]);
            let len = u32::from_le_bytes([v[4], v[5], v[6], v[7]]);
            range(size, buf as i32, len as i32, call)
        })
        .collect()
}

/// WASI preview1, the part a C guest built with wasi-libc uses. There is no file system
/// (nothing is preopened, so `fd_prestat_get` says `EBADF` from fd 3 on), no arguments,
/// no environment; stdout and stderr become log lines, stdin is empty.
fn define_wasi(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    let w = WASI_MODULE;
    // No arguments and no environment: both are empty lists.
    for (sizes, get) in [
        ("args_sizes_get", "args_get"),
        ("environ_sizes_get", "environ_get"),
    ] {
        linker.func_wrap(
            w,
            sizes,
            move |mut c: Caller<'_, Host>, count: i32, bytes: i32| {
                let mem = memory(&mut c, sizes)?;
                put_u32(&mut c, mem, count, 0, sizes)?;
                put_u32(&mut c, mem, bytes, 0, sizes)?;
                Ok(ERRNO_SUCCESS)
            },
        )?;
        linker.func_wrap(w, get, |_: Caller<'_, Host>, _: i32, _: i32| ERRNO_SUCCESS)?;
    }
    linker.func_wrap(
        w,
        "clock_res_get",
        |mut c: Caller<'_, Host>, id: i32, out: i32| {
            if !(0..=1).contains(&id) {
                return Ok(ERRNO_INVAL);
            }
            let mem = memory(&mut c, "clock_res_get")?;
            put_u64(&mut c, mem, out, 1_000, "clock_res_get")?;
            Ok(ERRNO_SUCCESS)
        },
    )?;
    linker.func_wrap(
        w,
        "clock_time_get",
        |mut c: Caller<'_, Host>, id: i32, _precision: i64, out: i32| {
            let ns = match id {
                0 => std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0),
                1 => origin().elapsed().as_nanos() as u64,
                _ => return Ok(ERRNO_INVAL),
            };
            let mem = memory(&mut c, "clock_time_get")?;
            put_u64(&mut c, mem, out, ns, "clock_time_get")?;
            Ok(ERRNO_SUCCESS)
        },
    )?;
    linker.func_wrap(
        w,
        "fd_write",
        |mut c: Caller<'_, Host>, fd: i32, iovs: i32, count: i32, written: i32| {
            let mem = memory(&mut c, "fd_write")?;
            let ranges = iovecs(&mut c, mem, iovs, count, "fd_write")?;
            if !(1..=2).contains(&fd) {
                return Ok(ERRNO_BADF);
            }
            let mut total = 0u32;
            let mut bytes = Vec::new();
            {
                let data = mem.data(&c);
                for r in ranges {
                    total = total.saturating_add(r.len() as u32);
                    bytes.extend_from_slice(&data[r]);
                }
            }
            stdio_write(c.data_mut(), &bytes);
            put_u32(&mut c, mem, written, total, "fd_write")?;
            Ok(ERRNO_SUCCESS)
        },
    )?;
    linker.func_wrap(
        w,
        "fd_read",
        |mut c: Caller<'_, Host>, fd: i32, iovs: i32, count: i32, read: i32| {
            let mem = memory(&mut c, "fd_read")?;
            iovecs(&mut c, mem, iovs, count, "fd_read")?;
            if fd != 0 {
                return Ok(ERRNO_BADF);
            }
            // Stdin is empty: every read is at its end.
            put_u32(&mut c, mem, read, 0, "fd_read")?;
            Ok(ERRNO_SUCCESS)
        },
    )?;
    linker.func_wrap(w, "fd_close", |_: Caller<'_, Host>, fd: i32| {
        if (0..=2).contains(&fd) {
            ERRNO_SUCCESS
        } else {
            ERRNO_BADF
        }
    })?;
    linker.func_wrap(
        w,
        "fd_seek",
        |_: Caller<'_, Host>, fd: i32, _offset: i64, _whence: i32, _out: i32| {
            if (0..=2).contains(&fd) {
                ERRNO_SPIPE
            } else {
                ERRNO_BADF
            }
        },
    )?;
    linker.func_wrap(
        w,
        "fd_fdstat_get",
        |mut c: Caller<'_, Host>, fd: i32, out: i32| {
            if !(0..=2).contains(&fd) {
                return Ok(ERRNO_BADF);
            }
            // fdstat: filetype u8 (2 = character device), flags u16, rights base and
            // inheriting u64 at 8 and 16; 24 bytes in all.
            let mut stat = [0u8; 24];
            stat[0] = 2;
            stat[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
            let mem = memory(&mut c, "fd_fdstat_get")?;
            write_guest(&mut c, mem, out, &stat, "fd_fdstat_get")?;
            Ok(ERRNO_SUCCESS)
        },
    )?;
    linker.func_wrap(
        w,
        "fd_prestat_get",
        |_: Caller<'_, Host>, _fd: i32, _out: i32| ERRNO_BADF,
    )?;
    linker.func_wrap(
        w,
        "fd_prestat_dir_name",
        |_: Caller<'_, Host>, _fd: i32, _ptr: i32, _len: i32| ERRNO_BADF,
    )?;
    linker.func_wrap(
        w,
        "proc_exit",
        |_: Caller<'_, Host>, code: i32| -> wasmtime::Result<()> {
            Err(host_trap(format!(
                "proc_exit: the module exited with code {code}"
            )))
        },
    )?;
    linker.func_wrap(
        w,
        "random_get",
        |mut c: Caller<'_, Host>, ptr: i32, len: i32| {
            if len as u32 > WASI_RANDOM_BYTES_MAX {
                return Ok(ERRNO_INVAL);
            }
            let mem = memory(&mut c, "random_get")?;
            let data = mem.data_mut(&mut c);
            let r = range(data.len(), ptr, len, "random_get")?;
            rand::thread_rng().fill_bytes(&mut data[r]);
            Ok(ERRNO_SUCCESS)
        },
    )?;
    linker.func_wrap(w, "sched_yield", |_: Caller<'_, Host>| ERRNO_SUCCESS)?;
    Ok(())
}

/// Appends bytes written to stdout or stderr and logs every complete line. A line that
/// grows past the log line limit without ending is logged (truncated) at once, so the
/// buffer stays bounded.
fn stdio_write(host: &mut Host, bytes: &[u8]) {
    for &b in bytes {
        if b == b'\n' {
            let line = std::mem::take(&mut host.stdio_line);
            host.emit_log(&String::from_utf8_lossy(&line));
        } else {
            host.stdio_line.push(b);
            if host.stdio_line.len() > host.log_line_bytes_max {
                let line = std::mem::take(&mut host.stdio_line);
                host.emit_log(&String::from_utf8_lossy(&line));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_blocked_in_host_calls_is_given_back_within_a_cap() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut c = CallClock::start(100, t0);
        // 60 ms into the call, 50 of them blocked on the disk: 10 ms of guest time.
        assert_eq!(c.blocked_for(ms(50), t0 + ms(60)), 90);
        // Blocked time is given back only up to the cap: with 2 s more blocked, 50 ms
        // later, the call is over its deadline (uncapped, it would have 40 ms left).
        let late = t0 + ms(HOST_BLOCKED_MS_MAX + 110);
        assert_eq!(c.blocked_for(ms(HOST_BLOCKED_MS_MAX), late), 0);
        // Guest time alone still runs the deadline out.
        let mut c = CallClock::start(100, t0);
        assert_eq!(c.blocked_for(ms(0), t0 + ms(150)), 0);
    }

    #[test]
    fn topics() {
        for good in ["a", "temp", "site/a/temp", "x.y_z-1"] {
            assert!(valid_topic(good), "{good}");
        }
        for bad in ["", "/a", "A", "a b", "é", &"a".repeat(TOPIC_BYTES_MAX + 1)] {
            assert!(!valid_topic(bad), "{bad}");
        }
    }

    #[test]
    fn published_round_trips_and_refuses_bad_input() {
        let m = Published {
            module: "sensor".into(),
            topic: "temp".into(),
            data: vec![7; PUBLISH_BYTES_MAX],
        };
        assert_eq!(Published::decode(&m.encode()).unwrap(), m);
        for bad in [
            Published {
                topic: "Bad".into(),
                ..m.clone()
            },
            Published {
                module: "Bad".into(),
                ..m.clone()
            },
            Published {
                data: vec![0; PUBLISH_BYTES_MAX + 1],
                ..m.clone()
            },
        ] {
            assert!(Published::decode(&bad.encode()).is_err(), "{bad:?}");
        }
        assert!(Published::decode(&[0xff; 16]).is_err());
    }

    #[test]
    fn truncation_respects_characters() {
        assert_eq!(truncate_at_char("abc", 3), ("abc", false));
        assert_eq!(truncate_at_char("ab\u{e9}", 3), ("ab", true));
    }
}
