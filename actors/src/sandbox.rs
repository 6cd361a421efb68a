//! WebAssembly sandboxes: one wasmtime engine per node, one store per module instance.
//!
//! The engine uses the pooling allocator when the node can afford its address-space
//! reservation (and falls back to allocating on demand when it cannot), keeps compiled
//! modules in a cache under the node's own state directory, and interrupts calls by
//! epoch (a background thread advances the epoch every [`EPOCH_TICK_MS`] while a call
//! into a guest runs, and sleeps while none does); counting fuel is an option. Modules
//! are linked once, at compile time, into an `InstancePre`, so starting an instance is a
//! copy-on-write mapping and a few field initialisations.
//!
//! A module sees the host API of [`crate::host`] and runs under the limits of its
//! [`ModuleQuotas`]: linear memory, tables and instances (a [`wasmtime::ResourceLimiter`]),
//! time per call, log and publish rates. Everything a guest can get wrong (a bad pointer,
//! invalid UTF-8, an infinite loop, a memory bomb, runaway recursion) turns into an error
//! value for the caller; none of it can panic the host.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use wasmtime::{
    Cache, CacheConfig, Config, Engine, Extern, InstanceAllocationStrategy, InstancePre, Linker,
    Module, PoolingAllocationConfig, Store, Trap, Val,
};

use crate::host::{self, Host, HostServices, HostTrap, Input, MemoryLimitExceeded};
use crate::quota::{ModuleQuotas, Usage};

/// The epoch advances this often while a guest runs; a call's deadline is rounded up to
/// whole ticks, so this is the precision of `call_ms_max`. Ten milliseconds stops a
/// runaway call promptly; the ticker sleeps while no call runs, so an idle node does not
/// wake a hundred times a second (on a two-core machine hosting 32 nodes that was a third
/// of an idle node's CPU).
pub const EPOCH_TICK_MS: u64 = 10;
/// Larger modules are refused before compiling: compiling is CPU- and memory-hungry, and
/// the modules we run on edge devices are small (the largest third-party one we target,
/// esbuild-wasm, is about 11 MiB).
pub const MODULE_BYTES_MAX: usize = 16 << 20;
/// Default time a compile may take before the module is refused: a 16 MiB module
/// compiles in a few seconds on a small ARM board; much longer means a module built to
/// stall the compiler.
pub const DEFAULT_COMPILE_MS_MAX: u64 = 30_000;
/// Compiles that ran past their deadline and are still finishing in the background;
/// Cranelift cannot be interrupted, so beyond this many new compiles are refused rather
/// than letting stalled ones pile up on the CPU.
pub const COMPILES_ABANDONED_MAX: usize = 2;
/// Default linear memory a module may use: enough for an interpreter-sized guest, small
/// enough that a few misbehaving modules cannot exhaust a 1 GiB device.
pub const DEFAULT_MEMORY_BYTES_MAX: u64 = 64 << 20;
/// Default time one call into a module may take: handlers are meant to be short, and a
/// tick that takes longer than this is stuck rather than busy.
pub const DEFAULT_CALL_MS_MAX: u64 = 100;
/// Default length of one log line: the product contract for `log` (brief, section 4).
pub const DEFAULT_LOG_LINE_BYTES_MAX: usize = 1024;
/// One module is one instance; a store never needs a second.
pub const INSTANCES_MAX: usize = 1;
/// One linear memory per store, so that `memory_bytes_max` bounds the module's total
/// memory rather than each of several memories.
pub const MEMORIES_MAX: usize = 1;
/// Tables per store: a compiled C or Rust guest uses one, multi-table code a few.
pub const TABLES_MAX: usize = 4;
/// Elements per table: generous for indirect-call tables of real programs, and at a
/// pointer per element it bounds a table to under a MiB.
pub const TABLE_ELEMENTS_MAX: usize = 100_000;
/// Native stack a call may use: deep enough for recursive parsers, and well inside the
/// 2 MiB stack of the blocking threads calls run on, so runaway recursion traps
/// ("call stack exhausted") instead of overflowing the host's stack.
pub const WASM_STACK_BYTES_MAX: usize = 512 * 1024;
/// Default instance slots of the pooling allocator: every module of a busy node plus
/// room for the second instance that exists during a hot swap.
pub const DEFAULT_POOL_INSTANCES: u32 = 64;

/// Errors from creating the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("creating wasm engine: {0}")]
    Engine(String),
    #[error("creating wasm engine: compiled-module cache in {dir}: {reason}")]
    Cache { dir: PathBuf, reason: String },
    #[error("defining host functions: {0}")]
    Linker(String),
    #[error("starting epoch ticker thread: {0}")]
    Ticker(#[source] std::io::Error),
}

/// Errors from compiling a module.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("compiling module: {bytes} bytes is over the limit of {max} bytes")]
    TooLarge { bytes: usize, max: usize },
    #[error("compiling module: not done within the limit of {ms} ms")]
    TooSlow { ms: u64 },
    #[error(
        "compiling module: {running} earlier compiles that ran past their limit are still running"
    )]
    Busy { running: usize },
    #[error(
        "compiling module: unknown import {module}::{name} (the host provides mesh::* and \
         wasi_snapshot_preview1::*, see docs/host-api.md)"
    )]
    UnknownImport { module: String, name: String },
    #[error("compiling module: linking host functions: {reason}")]
    Link { reason: String },
    #[error("compiling module: {reason}")]
    Invalid { reason: String },
}

/// Errors from instantiating a module.
#[derive(Debug, thiserror::Error)]
pub enum InstantiateError {
    #[error("instantiating module: it was compiled by a different engine")]
    WrongEngine,
    #[error("instantiating module: memory limit of {memory_bytes_max} bytes exceeded")]
    OutOfMemory { memory_bytes_max: u64 },
    #[error("instantiating module: start function ran past its deadline of {ms} ms")]
    Deadline { ms: u64 },
    #[error("instantiating module: {reason}")]
    Failed { reason: String },
}

/// Errors from calling into a module. The caller adds which export it was calling.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("module trapped: {message}")]
    Trap { message: String },
    #[error("module ran past its deadline of {ms} ms")]
    Deadline { ms: u64 },
    #[error("module used up its fuel of {fuel} per call")]
    Fuel { fuel: u64 },
    #[error("module exceeded its memory limit of {memory_bytes_max} bytes")]
    OutOfMemory { memory_bytes_max: u64 },
    #[error("export {export} does not have the signature the host API gives it")]
    WrongSignature { export: String },
}

/// The limits one module instance runs under, for callers that need no other quota.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SandboxLimits {
    /// Linear memory the instance may grow to; growing past it traps.
    pub memory_bytes_max: u64,
    /// Wall-clock time one call may take before it is interrupted.
    pub call_ms_max: u64,
    /// Longer log lines are cut at a character boundary and marked truncated.
    pub log_line_bytes_max: usize,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        SandboxLimits {
            memory_bytes_max: DEFAULT_MEMORY_BYTES_MAX,
            call_ms_max: DEFAULT_CALL_MS_MAX,
            log_line_bytes_max: DEFAULT_LOG_LINE_BYTES_MAX,
        }
    }
}

/// One line a module logged.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LogLine {
    pub module: String,
    pub version: u64,
    pub text: String,
    pub truncated: bool,
    pub unix_ms: u64,
}

/// Slots of the pooling allocator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolConfig {
    /// Instances (and memories) that can exist at once.
    pub instances: u32,
    /// The largest linear memory a slot holds; no module may be given more.
    pub memory_bytes_max: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            instances: DEFAULT_POOL_INSTANCES,
            memory_bytes_max: 4 * DEFAULT_MEMORY_BYTES_MAX,
        }
    }
}

/// How the node's engine is built.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EngineConfig {
    /// Pre-allocated instance slots; `None` allocates each instance on demand (and so
    /// does a node whose pool cannot be reserved, see [`SandboxEngine::pooling`]).
    pub pool: Option<PoolConfig>,
    /// Compiled modules are cached here, keyed by a hash of the module's bytes and of the
    /// engine's configuration and version. Only ever the node's own directory: the cache
    /// holds native code that is loaded without being checked again.
    pub cache_dir: Option<PathBuf>,
    /// Also count fuel, this much per call, besides the time deadline. Fuel makes a
    /// call's budget independent of the machine's load, at a cost in speed.
    pub fuel_per_call: Option<u64>,
    pub compile_ms_max: u64,
    pub module_bytes_max: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            pool: None,
            cache_dir: None,
            fuel_per_call: None,
            compile_ms_max: DEFAULT_COMPILE_MS_MAX,
            module_bytes_max: MODULE_BYTES_MAX,
        }
    }
}

/// The node's wasm engine and the thread that advances its epoch. Cheap to clone.
#[derive(Clone)]
pub struct SandboxEngine {
    inner: Arc<EngineInner>,
}

struct EngineInner {
    engine: Engine,
    linker: Linker<Host>,
    config: EngineConfig,
    pooling: bool,
    cache: Option<Cache>,
    /// Compiles that ran past their deadline and have not finished yet.
    abandoned: Arc<AtomicUsize>,
    /// What the engine and its ticker thread share.
    ticker: Arc<Ticker>,
    /// The ticker thread, woken when the first call starts and when the engine goes.
    ticker_thread: std::thread::Thread,
}

impl Drop for EngineInner {
    fn drop(&mut self) {
        self.ticker.stop.store(true, Ordering::Release);
        self.ticker_thread.unpark();
    }
}

/// The state of the epoch ticker thread.
#[derive(Default)]
struct Ticker {
    /// Tells the thread to exit; set when the last clone of the engine is dropped.
    stop: AtomicBool,
    /// Calls into guests running now; the thread ticks only while this is above zero.
    calls: AtomicUsize,
    /// Epoch increments so far, so a test can see the ticker sleep.
    ticks: AtomicU64,
}

impl Ticker {
    /// The thread's loop: tick while calls run, park while none does. A call that starts
    /// between the check and `park` has already unparked the thread, and `park` then
    /// returns at once, so no call runs without ticks.
    fn run(&self, engine: &Engine) {
        while !self.stop.load(Ordering::Acquire) {
            if self.calls.load(Ordering::Acquire) == 0 {
                std::thread::park();
                continue;
            }
            std::thread::sleep(Duration::from_millis(EPOCH_TICK_MS));
            engine.increment_epoch();
            self.ticks.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Counts one call into a guest for as long as it lives, waking the ticker for the first.
struct CallGuard<'a>(&'a Ticker);

impl<'a> CallGuard<'a> {
    fn enter(inner: &'a EngineInner) -> CallGuard<'a> {
        if inner.ticker.calls.fetch_add(1, Ordering::AcqRel) == 0 {
            inner.ticker_thread.unpark();
        }
        CallGuard(&inner.ticker)
    }
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        self.0.calls.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Where a compile that may be abandoned stands, shared by the caller and the thread.
enum CompileSlot {
    Waiting,
    Abandoned,
    Done(Result<Module, String>),
}

impl SandboxEngine {
    /// An engine with the default configuration: no pool, no cache, no fuel.
    pub fn new() -> Result<SandboxEngine, EngineError> {
        SandboxEngine::with_config(EngineConfig::default())
    }

    pub fn with_config(config: EngineConfig) -> Result<SandboxEngine, EngineError> {
        let cache = match &config.cache_dir {
            Some(dir) => Some(open_cache(dir)?),
            None => None,
        };
        let build = |pool: Option<&PoolConfig>| {
            let mut c = Config::new();
            c.epoch_interruption(true);
            c.max_wasm_stack(WASM_STACK_BYTES_MAX);
            c.consume_fuel(config.fuel_per_call.is_some());
            c.cache(cache.clone());
            if let Some(p) = pool {
                let mut pooling = PoolingAllocationConfig::new();
                pooling
                    .total_core_instances(p.instances)
                    .total_memories(p.instances)
                    .total_tables(p.instances.saturating_mul(TABLES_MAX as u32))
                    .max_memories_per_module(MEMORIES_MAX as u32)
                    .max_tables_per_module(TABLES_MAX as u32)
                    .table_elements(TABLE_ELEMENTS_MAX)
                    .max_memory_size(usize::try_from(p.memory_bytes_max).unwrap_or(usize::MAX));
                c.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
            }
            Engine::new(&c)
        };
        let (engine, pooling) = match config.pool.as_ref().map(|p| build(Some(p))) {
            Some(Ok(engine)) => (engine, true),
            Some(Err(e)) => {
                // A small or 32-bit device may not be able to reserve the pool's address
                // space; such a node still runs modules, allocating each on demand.
                tracing::warn!(
                    "pooling allocator unavailable, allocating instances on demand: {e:#}"
                );
                let engine = build(None).map_err(|e| EngineError::Engine(format!("{e:#}")))?;
                (engine, false)
            }
            None => {
                let engine = build(None).map_err(|e| EngineError::Engine(format!("{e:#}")))?;
                (engine, false)
            }
        };

        let mut linker = Linker::new(&engine);
        host::define(&mut linker).map_err(|e| EngineError::Linker(format!("{e:#}")))?;

        let ticker = Arc::new(Ticker::default());
        let ticker_engine = engine.clone();
        let thread_ticker = ticker.clone();
        // The thread holds the engine but not the `EngineInner`, so it cannot keep itself
        // alive: dropping the last `SandboxEngine` sets `stop` and wakes it.
        let ticker_thread = std::thread::Builder::new()
            .name("mesh-epoch".into())
            .spawn(move || thread_ticker.run(&ticker_engine))
            .map_err(EngineError::Ticker)?
            .thread()
            .clone();

        Ok(SandboxEngine {
            inner: Arc::new(EngineInner {
                engine,
                linker,
                config,
                pooling,
                cache,
                abandoned: Arc::default(),
                ticker,
                ticker_thread,
            }),
        })
    }

    /// Whether instances come from the pooling allocator (false when none was asked for
    /// or it could not be reserved).
    pub fn pooling(&self) -> bool {
        self.inner.pooling
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// Cache hits and misses since the engine started, when there is a cache.
    pub fn cache_stats(&self) -> Option<(usize, usize)> {
        self.inner
            .cache
            .as_ref()
            .map(|c| (c.cache_hits(), c.cache_misses()))
    }

    /// A hex digest of everything that makes compiled code of this engine incompatible
    /// with another's (wasmtime version, target, settings). Part of every cache key.
    pub fn fingerprint(&self) -> String {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.inner
            .engine
            .precompile_compatibility_hash()
            .hash(&mut h);
        format!("{:016x}", h.finish())
    }

    /// Compiles a module from its binary or WAT text form and links it against the host
    /// API, within the size and time limits.
    pub fn compile(&self, bytes: &[u8]) -> Result<CompiledModule, CompileError> {
        let max = self.inner.config.module_bytes_max;
        if bytes.len() > max {
            return Err(CompileError::TooLarge {
                bytes: bytes.len(),
                max,
            });
        }
        let module = self.compile_within_deadline(bytes)?;
        if let Some((module, name)) = host::unsupported_import(&module) {
            return Err(CompileError::UnknownImport { module, name });
        }
        let mut linker = self.inner.linker.clone();
        host::define_wasi_stubs(&mut linker, &module).map_err(|e| CompileError::Link {
            reason: format!("{e:#}"),
        })?;
        let pre = linker
            .instantiate_pre(&module)
            .map_err(|e| CompileError::Link {
                reason: format!("{e:#}"),
            })?;
        let has_initialize = module
            .exports()
            .any(|e| e.name() == "_initialize" && matches!(e.ty(), wasmtime::ExternType::Func(_)));
        Ok(CompiledModule {
            module,
            pre: Arc::new(pre),
            has_initialize,
        })
    }

    /// Runs the compiler on its own thread and waits at most `compile_ms_max` for it.
    fn compile_within_deadline(&self, bytes: &[u8]) -> Result<Module, CompileError> {
        let running = self.inner.abandoned.load(Ordering::Acquire);
        if running >= COMPILES_ABANDONED_MAX {
            return Err(CompileError::Busy { running });
        }
        let ms = self.inner.config.compile_ms_max;
        let slot = Arc::new((Mutex::new(CompileSlot::Waiting), std::sync::Condvar::new()));
        let thread_slot = slot.clone();
        let engine = self.inner.engine.clone();
        let abandoned = self.inner.abandoned.clone();
        let bytes = bytes.to_vec();
        std::thread::Builder::new()
            .name("mesh-compile".into())
            .spawn(move || {
                let result = Module::new(&engine, &bytes).map_err(|e| format!("{e:#}"));
                let (lock, cvar) = &*thread_slot;
                let mut s = lock.lock().unwrap_or_else(|e| e.into_inner());
                if matches!(*s, CompileSlot::Abandoned) {
                    abandoned.fetch_sub(1, Ordering::AcqRel);
                } else {
                    *s = CompileSlot::Done(result);
                    cvar.notify_one();
                }
            })
            .map_err(|e| CompileError::Invalid {
                reason: format!("starting the compiler thread: {e}"),
            })?;
        let (lock, cvar) = &*slot;
        let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        let (mut s, _) = cvar
            .wait_timeout_while(guard, Duration::from_millis(ms), |s| {
                matches!(s, CompileSlot::Waiting)
            })
            .unwrap_or_else(|e| e.into_inner());
        match std::mem::replace(&mut *s, CompileSlot::Abandoned) {
            CompileSlot::Done(result) => result.map_err(|reason| CompileError::Invalid { reason }),
            _ => {
                // The thread finishes on its own and, finding the slot abandoned, counts
                // itself out; the lock makes that and this count one consistent story.
                self.inner.abandoned.fetch_add(1, Ordering::AcqRel);
                Err(CompileError::TooSlow { ms })
            }
        }
    }

    /// The ticker's shared state, so a test can watch it sleep and stop.
    #[cfg(test)]
    fn ticker(&self) -> Arc<Ticker> {
        self.inner.ticker.clone()
    }
}

fn open_cache(dir: &std::path::Path) -> Result<Cache, EngineError> {
    let err = |reason: String| EngineError::Cache {
        dir: dir.to_path_buf(),
        reason,
    };
    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    // The cache holds native code that is mapped and run without further checks, so no
    // other local user may write (or read) it.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| err(e.to_string()))?;
    let mut config = CacheConfig::new();
    config.with_directory(dir);
    Cache::new(config).map_err(|e| err(format!("{e:#}")))
}

/// A compiled module, linked and ready to instantiate any number of times. Cheap to clone.
#[derive(Clone)]
pub struct CompiledModule {
    module: Module,
    pre: Arc<InstancePre<Host>>,
    /// Known at compile time, so starting a module without it costs no export lookup.
    has_initialize: bool,
}

impl CompiledModule {
    /// Whether the module exports a function named `name`.
    pub fn exports_function(&self, name: &str) -> bool {
        self.module
            .exports()
            .any(|e| e.name() == name && matches!(e.ty(), wasmtime::ExternType::Func(_)))
    }

    /// Bytes of native code and data the compiled module occupies.
    pub fn image_bytes(&self) -> usize {
        let r = self.module.image_range();
        (r.end as usize).saturating_sub(r.start as usize)
    }
}

/// Everything one instance runs with.
#[derive(Clone)]
pub struct InstanceSetup {
    pub name: String,
    pub version: u64,
    pub quotas: ModuleQuotas,
    pub log_line_bytes_max: usize,
    pub logs: mpsc::Sender<LogLine>,
    /// Shared with the supervisor, so figures survive the instance.
    pub usage: Arc<Usage>,
    pub services: HostServices,
}

/// One running module instance with its own store.
pub struct Sandbox {
    store: Store<Host>,
    instance: wasmtime::Instance,
    call_ms_max: u64,
    memory_bytes_max: u64,
    fuel_per_call: Option<u64>,
    /// `on_message`, looked up once: it is called for every message.
    on_message: Option<OnMessage>,
    /// How long the last call into the guest took and when it ended, so a caller that
    /// meters CPU need not read the clock again.
    last_call: Option<(Duration, Instant)>,
    /// Keeps the engine and its epoch ticker alive for as long as this instance can run
    /// code, and wakes the ticker for each call.
    engine: SandboxEngine,
}

/// What looking up `on_message` found.
#[derive(Clone)]
enum OnMessage {
    Missing,
    Found(wasmtime::TypedFunc<(i32, i32), ()>),
}

impl Sandbox {
    /// Instantiates `module` with `limits` and the default rates, without kv, sensors or
    /// publishing (tests, tools and benchmarks).
    pub fn instantiate(
        engine: &SandboxEngine,
        module: &CompiledModule,
        name: &str,
        version: u64,
        limits: SandboxLimits,
        logs: mpsc::Sender<LogLine>,
    ) -> Result<Sandbox, InstantiateError> {
        let quotas = ModuleQuotas {
            memory_bytes: limits.memory_bytes_max,
            call_ms: limits.call_ms_max,
            ..ModuleQuotas::default()
        };
        Sandbox::start(
            engine,
            module,
            InstanceSetup {
                name: name.to_string(),
                version,
                quotas,
                log_line_bytes_max: limits.log_line_bytes_max,
                logs,
                usage: Arc::default(),
                services: HostServices::default(),
            },
        )
    }

    /// Instantiates `module`, runs its start function and, for a WASI reactor, its
    /// `_initialize` export, all under the call deadline.
    pub fn start(
        engine: &SandboxEngine,
        module: &CompiledModule,
        setup: InstanceSetup,
    ) -> Result<Sandbox, InstantiateError> {
        if !Engine::same(&engine.inner.engine, module.module.engine()) {
            return Err(InstantiateError::WrongEngine);
        }
        let call_ms_max = setup.quotas.call_ms;
        let memory_bytes_max = setup.quotas.memory_bytes;
        let host = Host::new(
            &setup.name,
            setup.version,
            setup.log_line_bytes_max,
            setup.logs,
            setup.usage,
            setup.services,
            setup.quotas,
        );
        let mut store = Store::new(&engine.inner.engine, host);
        store.limiter(|host| &mut host.limiter);
        let fuel_per_call = engine.inner.config.fuel_per_call;
        // Instantiation runs the module's start function, if it has one: same deadline.
        store.set_epoch_deadline(deadline_ticks(call_ms_max));
        store.data_mut().call = crate::host::CallClock::start(call_ms_max, Instant::now());
        if let Some(fuel) = fuel_per_call {
            store.set_fuel(fuel).map_err(|e| InstantiateError::Failed {
                reason: format!("setting fuel: {e:#}"),
            })?;
        }
        let fail = |e: wasmtime::Error, store: &Store<Host>| {
            let limits = Classify {
                call_ms_max,
                memory_bytes_max,
                fuel_per_call,
            };
            match limits.classify(&e, store.data().limiter.memory_limit_hit) {
                CallError::Deadline { ms } => InstantiateError::Deadline { ms },
                CallError::OutOfMemory { memory_bytes_max } => {
                    InstantiateError::OutOfMemory { memory_bytes_max }
                }
                other => InstantiateError::Failed {
                    reason: match other {
                        CallError::Trap { message } => message,
                        other => other.to_string(),
                    },
                },
            }
        };
        let instantiated = {
            let _running = CallGuard::enter(&engine.inner);
            module.pre.instantiate(&mut store)
        };
        let instance = match instantiated {
            Ok(i) => i,
            Err(e) => return Err(fail(e, &store)),
        };
        // A start function may already have called the host, which then looked the
        // memory up by name; from here on the host calls use this one.
        store.data_mut().memory = instance.get_memory(&mut store, "memory");
        let mut sandbox = Sandbox {
            store,
            instance,
            call_ms_max,
            memory_bytes_max,
            fuel_per_call,
            on_message: None,
            last_call: None,
            engine: engine.clone(),
        };
        if module.has_initialize {
            sandbox
                .call("_initialize")
                .map_err(|e| InstantiateError::Failed {
                    reason: format!("calling _initialize: {e}"),
                })?;
        }
        Ok(sandbox)
    }

    fn classify(&self) -> Classify {
        Classify {
            call_ms_max: self.call_ms_max,
            memory_bytes_max: self.memory_bytes_max,
            fuel_per_call: self.fuel_per_call,
        }
    }

    /// Runs `f` (one call into the guest) with a fresh deadline (and fuel), counting the
    /// call and its time in the module's usage.
    fn run<R>(
        &mut self,
        f: impl FnOnce(&mut Store<Host>) -> wasmtime::Result<R>,
    ) -> Result<R, CallError> {
        self.store.data_mut().limiter.memory_limit_hit = false;
        self.store
            .set_epoch_deadline(deadline_ticks(self.call_ms_max));
        if let Some(fuel) = self.fuel_per_call {
            // Only fails when fuel is not enabled, which `fuel_per_call` says it is.
            let _ = self.store.set_fuel(fuel);
        }
        // One clock read serves both the CPU meter and the host calls' deadline clock.
        let started = Instant::now();
        self.store.data_mut().call = crate::host::CallClock::start(self.call_ms_max, started);
        let result = {
            let _running = CallGuard::enter(&self.engine.inner);
            f(&mut self.store)
        };
        let ended = Instant::now();
        let took = ended.saturating_duration_since(started);
        self.last_call = Some((took, ended));
        let usage = &self.store.data().usage;
        Usage::add(&usage.calls, 1);
        Usage::add(
            &usage.cpu_us,
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
        );
        let hit = self.store.data().limiter.memory_limit_hit;
        result.map_err(|e| self.classify().classify(&e, hit))
    }

    /// The export `name` if it is a function; `Ok(None)` if there is no such export.
    fn func(&mut self, name: &str) -> Result<Option<wasmtime::Func>, CallError> {
        match self.instance.get_export(&mut self.store, name) {
            None => Ok(None),
            Some(Extern::Func(f)) => Ok(Some(f)),
            Some(_) => Err(CallError::WrongSignature {
                export: name.to_string(),
            }),
        }
    }

    /// Calls a no-argument, no-result export. Ok(false) when the module does not export it.
    pub fn call(&mut self, export: &str) -> Result<bool, CallError> {
        let Some(func) = self.func(export)? else {
            return Ok(false);
        };
        let func = func
            .typed::<(), ()>(&self.store)
            .map_err(|_| CallError::WrongSignature {
                export: export.to_string(),
            })?;
        self.run(|store| func.call(store, ()))?;
        Ok(true)
    }

    /// Hands a message to `on_message(topic_len, data_len)`; the guest copies topic and
    /// data out with `msg_topic` and `msg_data`. Ok(false) when there is no `on_message`.
    pub fn deliver(&mut self, topic: &str, data: &[u8]) -> Result<bool, CallError> {
        self.deliver_shared(topic.into(), data.into())
    }

    /// [`Sandbox::deliver`] for a message already held in shared buffers: the guest reads
    /// it from them, so nothing is copied before the call.
    pub fn deliver_shared(&mut self, topic: Arc<str>, data: Arc<[u8]>) -> Result<bool, CallError> {
        let func = match &self.on_message {
            Some(OnMessage::Found(f)) => f.clone(),
            Some(OnMessage::Missing) => return Ok(false),
            None => {
                let found = match self.func("on_message")? {
                    None => OnMessage::Missing,
                    Some(f) => {
                        OnMessage::Found(f.typed::<(i32, i32), ()>(&self.store).map_err(|_| {
                            CallError::WrongSignature {
                                export: "on_message".to_string(),
                            }
                        })?)
                    }
                };
                self.on_message = Some(found);
                return self.deliver_shared(topic, data);
            }
        };
        let args = (
            i32::try_from(topic.len()).unwrap_or(i32::MAX),
            i32::try_from(data.len()).unwrap_or(i32::MAX),
        );
        self.store.data_mut().input = Some(Input { topic, data });
        let result = self.run(|store| func.call(store, args));
        self.store.data_mut().input = None;
        result?;
        Ok(true)
    }

    /// How long the last call into the guest took and when it ended (`None` before the
    /// first call).
    pub fn last_call(&self) -> Option<(Duration, Instant)> {
        self.last_call
    }

    /// Takes the module's `snapshot`: what the guest writes with `snapshot_write` while
    /// the export runs. `Ok(None)` when the module has no `snapshot` export.
    pub fn snapshot(&mut self) -> Result<Option<Vec<u8>>, CallError> {
        self.store.data_mut().snapshot = Some(Vec::new());
        let called = self.call("snapshot");
        let taken = self.store.data_mut().snapshot.take();
        Ok(if called? { taken } else { None })
    }

    /// Hands a snapshot of the previous version to `restore(len)`; the guest reads it
    /// with `msg_data`. Ok(false) when the module has no `restore` export.
    pub fn restore(&mut self, state: &[u8]) -> Result<bool, CallError> {
        self.call_with_input("restore", "", state, |_, len_d| len_d)
    }

    fn call_with_input<P: wasmtime::WasmParams>(
        &mut self,
        export: &str,
        topic: &str,
        data: &[u8],
        params: impl FnOnce(i32, i32) -> P,
    ) -> Result<bool, CallError> {
        let Some(func) = self.func(export)? else {
            return Ok(false);
        };
        let func = func
            .typed::<P, ()>(&self.store)
            .map_err(|_| CallError::WrongSignature {
                export: export.to_string(),
            })?;
        let args = params(
            i32::try_from(topic.len()).unwrap_or(i32::MAX),
            i32::try_from(data.len()).unwrap_or(i32::MAX),
        );
        self.store.data_mut().input = Some(Input {
            topic: topic.into(),
            data: data.into(),
        });
        let result = self.run(|store| func.call(store, args));
        self.store.data_mut().input = None;
        result?;
        Ok(true)
    }

    /// Calls any exported function with `args`, for tools, tests and benchmarks that run
    /// modules written for other hosts.
    pub fn call_raw(&mut self, export: &str, args: &[Val]) -> Result<Vec<Val>, CallError> {
        let Some(func) = self.func(export)? else {
            return Err(CallError::WrongSignature {
                export: export.to_string(),
            });
        };
        let n = func.ty(&self.store).results().len();
        let mut results = vec![Val::I32(0); n];
        self.run(|store| func.call(store, args, &mut results))?;
        Ok(results)
    }

    /// Copies `bytes` into the exported memory `memory` at `offset`, for the same callers
    /// as [`Sandbox::call_raw`].
    pub fn write_memory(
        &mut self,
        memory: &str,
        offset: usize,
        bytes: &[u8],
    ) -> Result<(), CallError> {
        let Some(Extern::Memory(mem)) = self.instance.get_export(&mut self.store, memory) else {
            return Err(CallError::WrongSignature {
                export: memory.to_string(),
            });
        };
        mem.write(&mut self.store, offset, bytes)
            .map_err(|e| CallError::Trap {
                message: format!("writing {} bytes at {offset}: {e}", bytes.len()),
            })
    }

    /// The topics the module subscribed to (with `subscribe`, usually in `init`).
    pub fn subscriptions(&self) -> BTreeSet<String> {
        self.store.data().subscriptions.clone()
    }

    pub fn usage(&self) -> Arc<Usage> {
        self.store.data().usage.clone()
    }

    /// Log lines dropped: over the log rate, or the log channel was full (or closed).
    pub fn logs_dropped(&self) -> u64 {
        self.store
            .data()
            .usage
            .log_lines_dropped
            .load(Ordering::Relaxed)
    }

    pub fn call_ms_max(&self) -> u64 {
        self.call_ms_max
    }
}

/// Epoch ticks for a deadline of `call_ms_max`: rounded up, plus one because the first
/// tick may come at any moment after the deadline is set. A call is therefore stopped
/// between `call_ms_max` and `call_ms_max + EPOCH_TICK_MS` after it starts (plus however
/// late the ticker thread gets scheduled).
pub(crate) fn deadline_ticks(call_ms_max: u64) -> u64 {
    call_ms_max.div_ceil(EPOCH_TICK_MS).saturating_add(1)
}

/// The limits an error out of wasm is judged against.
struct Classify {
    call_ms_max: u64,
    memory_bytes_max: u64,
    fuel_per_call: Option<u64>,
}

impl Classify {
    /// Turns an error out of wasm into what went wrong, as the module's owner should see it.
    fn classify(&self, e: &wasmtime::Error, memory_limit_hit: bool) -> CallError {
        if memory_limit_hit || e.downcast_ref::<MemoryLimitExceeded>().is_some() {
            return CallError::OutOfMemory {
                memory_bytes_max: self.memory_bytes_max,
            };
        }
        if let Some(trap) = e.downcast_ref::<Trap>() {
            if *trap == Trap::Interrupt {
                return CallError::Deadline {
                    ms: self.call_ms_max,
                };
            }
            if *trap == Trap::OutOfFuel {
                return CallError::Fuel {
                    fuel: self.fuel_per_call.unwrap_or(0),
                };
            }
            // wasmtime prefixes every trap's text with "wasm trap: "; our variant says that.
            let text = trap.to_string();
            let message = text
                .strip_prefix("wasm trap: ")
                .unwrap_or(&text)
                .to_string();
            return CallError::Trap { message };
        }
        if let Some(HostTrap(message)) = e.downcast_ref::<HostTrap>() {
            return CallError::Trap {
                message: message.clone(),
            };
        }
        CallError::Trap {
            message: format!("{e:#}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{
        Published, E_DENIED, E_FULL, E_INVALID, E_NOT_FOUND, E_QUOTA, E_TOO_LARGE,
        PUBLISH_BYTES_MAX,
    };
    use crate::kv::KvStore;

    fn engine() -> SandboxEngine {
        SandboxEngine::new().unwrap()
    }

    fn limits() -> SandboxLimits {
        SandboxLimits {
            memory_bytes_max: 4 << 20,
            call_ms_max: 50,
            log_line_bytes_max: 16,
        }
    }

    fn instantiate(
        engine: &SandboxEngine,
        wat: &str,
        logs: mpsc::Sender<LogLine>,
    ) -> Result<Sandbox, InstantiateError> {
        let module = engine.compile(wat.as_bytes()).unwrap();
        Sandbox::instantiate(engine, &module, "test", 7, limits(), logs)
    }

    fn example(file: &str) -> Vec<u8> {
        let path = format!("{}/../examples/modules/{file}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(path).unwrap()
    }

    /// A module whose `go` export logs the bytes of its data segment at the given pointer
    /// and length.
    fn log_module(data: &str, ptr: i64, len: i64) -> String {
        format!(
            r#"(module
                (import "mesh" "log" (func $log (param i32 i32)))
                (memory (export "memory") 1)
                (data (i32.const 0) "{data}")
                (func (export "go") (call $log (i32.const {ptr}) (i32.const {len}))))"#
        )
    }

    /// A module exporting `go(a, b, c, d) -> i32`, which calls the host function `name`
    /// (of type `sig`) with those arguments; `data` is at address 0 of its memory.
    fn call_module(name: &str, params: usize, data: &str) -> String {
        let p = "i32 ".repeat(params);
        let args: String = (0..params).map(|i| format!("(local.get {i}) ")).collect();
        format!(
            r#"(module
                (import "mesh" "{name}" (func $f (param {p}) (result i32)))
                (memory (export "memory") 1)
                (data (i32.const 0) "{data}")
                (func (export "go") (param {p}) (result i32) (call $f {args})))"#
        )
    }

    struct Guest {
        sb: Sandbox,
    }

    impl Guest {
        fn new(wat: &str, setup: impl FnOnce(&mut InstanceSetup)) -> Guest {
            let engine = engine();
            let module = engine.compile(wat.as_bytes()).unwrap();
            let (logs, _rx) = mpsc::channel(16);
            let mut s = InstanceSetup {
                name: "guest".into(),
                version: 1,
                quotas: ModuleQuotas {
                    memory_bytes: 4 << 20,
                    call_ms: 1000,
                    ..ModuleQuotas::default()
                },
                log_line_bytes_max: 64,
                logs,
                usage: Arc::default(),
                services: HostServices::default(),
            };
            setup(&mut s);
            Guest {
                sb: Sandbox::start(&engine, &module, s).unwrap(),
            }
        }

        fn go(&mut self, args: &[i32]) -> Result<i32, CallError> {
            let args: Vec<Val> = args.iter().map(|&a| Val::I32(a)).collect();
            let out = self.sb.call_raw("go", &args)?;
            Ok(out[0].unwrap_i32())
        }

        fn memory(&mut self, at: usize, len: usize) -> Vec<u8> {
            let Some(Extern::Memory(m)) = self.sb.instance.get_export(&mut self.sb.store, "memory")
            else {
                panic!("no memory")
            };
            m.data(&self.sb.store)[at..at + len].to_vec()
        }
    }

    fn trap_message(r: Result<i32, CallError>) -> String {
        match r {
            Err(CallError::Trap { message }) => message,
            other => panic!("expected a trap, got {other:?}"),
        }
    }

    #[test]
    fn hello_logs_from_init_and_tick() {
        let engine = engine();
        let (tx, mut rx) = mpsc::channel(16);
        let module = engine.compile(&example("hello.wat")).unwrap();
        let mut sb =
            Sandbox::instantiate(&engine, &module, "hello", 3, SandboxLimits::default(), tx)
                .unwrap();
        assert!(sb.call("init").unwrap());
        assert!(sb.call("on_tick").unwrap());
        assert!(sb.call("on_tick").unwrap());
        let texts: Vec<String> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|l| {
                assert_eq!((l.module.as_str(), l.version), ("hello", 3));
                l.text
            })
            .collect();
        assert_eq!(texts.len(), 3, "{texts:?}");
        assert!(texts[0].starts_with("hello"), "{texts:?}");
        assert_eq!(texts[1..], ["tick 1", "tick 2"]);
        assert_eq!(sb.usage().figures().calls, 3);
    }

    #[test]
    fn missing_export_is_not_an_error() {
        let engine = engine();
        let (tx, _rx) = mpsc::channel(1);
        let mut sb = instantiate(&engine, "(module)", tx).unwrap();
        assert_eq!(sb.call("on_tick"), Ok(false));
        assert_eq!(sb.deliver("t", b"x"), Ok(false));
        assert_eq!(sb.snapshot(), Ok(None));
        assert_eq!(sb.restore(b"x"), Ok(false));
    }

    #[test]
    fn wrong_signature_is_refused() {
        let engine = engine();
        let (tx, _rx) = mpsc::channel(1);
        let wat = r#"(module (func (export "on_tick") (param i32)) (global (export "init") i32 (i32.const 0))
                     (func (export "on_message") (param i32)))"#;
        let mut sb = instantiate(&engine, wat, tx).unwrap();
        assert!(matches!(
            sb.call("on_tick"),
            Err(CallError::WrongSignature { export }) if export == "on_tick"
        ));
        assert!(matches!(
            sb.call("init"),
            Err(CallError::WrongSignature { .. })
        ));
        assert!(matches!(
            sb.deliver("t", b""),
            Err(CallError::WrongSignature { .. })
        ));
    }

    #[test]
    fn log_truncates_at_a_char_boundary() {
        let engine = engine();
        let (tx, mut rx) = mpsc::channel(4);
        // 15 ASCII bytes then a 2-byte "é": the 16-byte cap falls inside the "é".
        let text = "abcdefghijklmno\u{e9}xyz";
        let mut sb = instantiate(&engine, &log_module(text, 0, text.len() as i64), tx).unwrap();
        sb.call("go").unwrap();
        let line = rx.try_recv().unwrap();
        assert_eq!(line.text, "abcdefghijklmno");
        assert!(line.truncated);
        assert_eq!(sb.usage().figures().log_lines_truncated, 1);

        let (tx, mut rx) = mpsc::channel(4);
        let mut sb = instantiate(&engine, &log_module("short", 0, 5), tx).unwrap();
        sb.call("go").unwrap();
        let line = rx.try_recv().unwrap();
        assert_eq!((line.text.as_str(), line.truncated), ("short", false));
        assert_eq!((line.module.as_str(), line.version), ("test", 7));
    }

    #[test]
    fn invalid_log_pointer_traps_instead_of_panicking() {
        let engine = engine();
        for (ptr, len) in [(65_530, 100), (-16, 100), (0, -1), (70_000, 0)] {
            let (tx, _rx) = mpsc::channel(4);
            let mut sb = instantiate(&engine, &log_module("x", ptr, len), tx).unwrap();
            match sb.call("go") {
                Err(CallError::Trap { message }) => {
                    assert!(message.starts_with("log: "), "{message}");
                    assert!(message.contains("outside the module's memory"), "{message}");
                }
                other => panic!("ptr {ptr} len {len}: expected a trap, got {other:?}"),
            }
        }
        // The end of memory exactly is fine.
        let (tx, mut rx) = mpsc::channel(4);
        let mut sb = instantiate(&engine, &log_module("x", 65_536, 0), tx).unwrap();
        sb.call("go").unwrap();
        assert_eq!(rx.try_recv().unwrap().text, "");
    }

    #[test]
    fn invalid_utf8_traps() {
        let engine = engine();
        let (tx, _rx) = mpsc::channel(4);
        let mut sb = instantiate(&engine, &log_module("a\\ff\\fe", 0, 3), tx).unwrap();
        assert_eq!(
            sb.call("go"),
            Err(CallError::Trap {
                message: "log: not utf-8".into()
            })
        );
    }

    #[test]
    fn log_without_memory_traps() {
        let engine = engine();
        let (tx, _rx) = mpsc::channel(4);
        let wat = r#"(module
            (import "mesh" "log" (func $log (param i32 i32)))
            (func (export "go") (call $log (i32.const 0) (i32.const 0))))"#;
        let mut sb = instantiate(&engine, wat, tx).unwrap();
        assert!(matches!(
            sb.call("go"),
            Err(CallError::Trap { message }) if message.contains("no memory named")
        ));
    }

    #[test]
    fn full_log_channel_drops_and_counts() {
        let engine = engine();
        let (tx, mut rx) = mpsc::channel(2);
        let mut sb = instantiate(&engine, &log_module("hi", 0, 2), tx).unwrap();
        for _ in 0..5 {
            sb.call("go").unwrap();
        }
        assert_eq!(sb.logs_dropped(), 3);
        assert_eq!(rx.try_recv().unwrap().text, "hi");
        assert_eq!(rx.try_recv().unwrap().text, "hi");
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn log_spam_trips_the_log_rate() {
        let engine = engine();
        let (tx, mut rx) = mpsc::channel(10_000);
        let module = engine.compile(&example("logspam.wat")).unwrap();
        let quotas = ModuleQuotas {
            log_bytes_per_s: 100,
            call_ms: 1000,
            ..ModuleQuotas::default()
        };
        let mut sb = Sandbox::start(
            &engine,
            &module,
            InstanceSetup {
                name: "spam".into(),
                version: 1,
                quotas,
                log_line_bytes_max: 1024,
                logs: tx,
                usage: Arc::default(),
                services: HostServices::default(),
            },
        )
        .unwrap();
        let started = Instant::now();
        sb.call("on_tick").unwrap();
        let took = started.elapsed().as_secs_f64();
        let f = sb.usage().figures();
        let delivered = std::iter::from_fn(|| rx.try_recv().ok()).count() as u64;
        // The burst is two seconds of the rate (200 bytes of 10-byte lines), plus what
        // refilled while the call ran.
        let allowed = 200 + (100.0 * took).ceil() as u64;
        assert!(
            delivered >= 1 && f.log_bytes <= allowed,
            "{f:?} in {took} s"
        );
        assert_eq!(delivered + f.log_lines_dropped, 1000, "{f:?}");
        assert!(
            f.log_lines_dropped >= 1000 - allowed / 10,
            "{f:?} in {took} s"
        );
    }

    #[test]
    fn unreachable_is_a_trap() {
        let engine = engine();
        let (tx, _rx) = mpsc::channel(1);
        let module = engine.compile(&example("trap.wat")).unwrap();
        let mut sb = Sandbox::instantiate(&engine, &module, "trap", 1, limits(), tx).unwrap();
        assert!(sb.call("init").is_ok());
        match sb.call("on_tick") {
            Err(CallError::Trap { message }) => assert!(message.contains("unreachable")),
            other => panic!("expected a trap, got {other:?}"),
        }
    }

    #[test]
    fn infinite_loop_hits_the_deadline() {
        let engine = engine();
        let (tx, _rx) = mpsc::channel(1);
        let module = engine.compile(&example("spin.wat")).unwrap();
        let mut sb = Sandbox::instantiate(&engine, &module, "spin", 1, limits(), tx).unwrap();
        let started = Instant::now();
        assert_eq!(sb.call("on_tick"), Err(CallError::Deadline { ms: 50 }));
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(50), "stopped early: {took:?}");
        // The deadline is set afresh for every call: the next call gets its full budget.
        let started = Instant::now();
        assert_eq!(sb.call("on_tick"), Err(CallError::Deadline { ms: 50 }));
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    #[test]
    fn fuel_stops_a_spinner_when_enabled() {
        let engine = SandboxEngine::with_config(EngineConfig {
            fuel_per_call: Some(100_000),
            ..EngineConfig::default()
        })
        .unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let module = engine.compile(&example("spin.wat")).unwrap();
        let mut limits = limits();
        limits.call_ms_max = 60_000;
        let mut sb = Sandbox::instantiate(&engine, &module, "spin", 1, limits, tx).unwrap();
        assert_eq!(sb.call("on_tick"), Err(CallError::Fuel { fuel: 100_000 }));
        // Fuel is refilled for the next call: a short export still runs.
        let module = engine
            .compile(br#"(module (func (export "on_tick")))"#)
            .unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let mut sb =
            Sandbox::instantiate(&engine, &module, "ok", 1, super::tests::limits(), tx).unwrap();
        for _ in 0..3 {
            assert_eq!(sb.call("on_tick"), Ok(true));
        }
    }

    #[test]
    fn deep_recursion_is_a_trap() {
        let engine = engine();
        let (tx, _rx) = mpsc::channel(1);
        let module = engine.compile(&example("recursion.wat")).unwrap();
        let mut sb = Sandbox::instantiate(&engine, &module, "rec", 1, limits(), tx).unwrap();
        match sb.call("on_tick") {
            Err(CallError::Trap { message }) => {
                assert!(message.contains("call stack exhausted"), "{message}")
            }
            other => panic!("expected a stack overflow trap, got {other:?}"),
        }
    }

    #[test]
    fn memory_bomb_is_stopped_at_the_limit() {
        let engine = engine();
        let (tx, _rx) = mpsc::channel(1);
        let module = engine.compile(&example("membomb.wat")).unwrap();
        let mut sb = Sandbox::instantiate(&engine, &module, "bomb", 1, limits(), tx).unwrap();
        assert_eq!(
            sb.call("on_tick"),
            Err(CallError::OutOfMemory {
                memory_bytes_max: 4 << 20
            })
        );
        assert!(sb.usage().figures().memory_bytes <= 4 << 20);
    }

    #[test]
    fn table_growth_past_the_limit_is_refused() {
        let engine = engine();
        let (tx, _rx) = mpsc::channel(1);
        let wat = r#"(module
            (table $t 1 funcref)
            (func (export "grow") (param i32) (result i32)
                (table.grow $t (ref.null func) (local.get 0))))"#;
        let mut sb = instantiate(&engine, wat, tx).unwrap();
        let grow =
            |sb: &mut Sandbox, n: i32| sb.call_raw("grow", &[Val::I32(n)]).unwrap()[0].unwrap_i32();
        // From 1 element to the limit is fine; one more is refused (-1), not a trap.
        assert_eq!(grow(&mut sb, TABLE_ELEMENTS_MAX as i32 - 1), 1);
        assert_eq!(grow(&mut sb, 1), -1);
    }

    #[test]
    fn a_second_memory_or_too_many_tables_fail_instantiation() {
        let engine = engine();
        let (tx, _rx) = mpsc::channel(1);
        let err = instantiate(&engine, "(module (memory 1) (memory 1))", tx.clone())
            .err()
            .unwrap();
        assert!(err.to_string().contains("memor"), "{err}");
        let tables = "(table 1 funcref)".repeat(TABLES_MAX + 1);
        let err = instantiate(&engine, &format!("(module {tables})"), tx)
            .err()
            .unwrap();
        assert!(err.to_string().contains("table"), "{err}");
    }

    #[test]
    fn initial_memory_over_the_limit_fails_instantiation() {
        let engine = engine();
        let (tx, _rx) = mpsc::channel(1);
        // 100 pages of 64 KiB is over the 4 MiB test limit.
        let err = instantiate(&engine, "(module (memory 100))", tx)
            .err()
            .unwrap();
        assert!(
            matches!(err, InstantiateError::OutOfMemory { memory_bytes_max } if memory_bytes_max == 4 << 20),
            "{err}"
        );
    }

    #[test]
    fn spinning_start_function_hits_the_deadline() {
        let engine = engine();
        let (tx, _rx) = mpsc::channel(1);
        let wat = "(module (func $s (loop (br 0))) (start $s))";
        let err = instantiate(&engine, wat, tx).err().unwrap();
        assert!(
            matches!(err, InstantiateError::Deadline { ms: 50 }),
            "{err}"
        );
    }

    #[test]
    fn unknown_import_is_refused_at_compile_time_by_name() {
        let engine = engine();
        for (wat, named) in [
            (
                r#"(module (import "env" "fd_write" (func (param i32))))"#,
                "env::fd_write",
            ),
            (
                r#"(module (import "mesh" "launch" (func)))"#,
                "mesh::launch",
            ),
            (
                r#"(module (import "wasi_snapshot_preview1" "path_open" (func (param i32))))"#,
                "wasi_snapshot_preview1::path_open",
            ),
        ] {
            let err = engine.compile(wat.as_bytes()).err().unwrap();
            assert!(matches!(err, CompileError::UnknownImport { .. }), "{err}");
            assert!(err.to_string().contains(named), "{err}");
        }
    }

    #[test]
    fn host_function_with_the_wrong_signature_fails_to_link() {
        let engine = engine();
        let wat = r#"(module (import "mesh" "log" (func (param i32))))"#;
        let err = engine.compile(wat.as_bytes()).err().unwrap();
        assert!(matches!(err, CompileError::Link { .. }), "{err}");
    }

    #[test]
    fn compile_rejects_garbage_and_oversized_input() {
        let engine = engine();
        assert!(matches!(
            engine.compile(b"\0asm\x01\0\0\0garbage"),
            Err(CompileError::Invalid { .. })
        ));
        assert!(matches!(
            engine.compile(b"(module (func $f (call $nope)))"),
            Err(CompileError::Invalid { .. })
        ));
        let big = vec![0u8; MODULE_BYTES_MAX + 1];
        assert!(matches!(
            engine.compile(&big),
            Err(CompileError::TooLarge { .. })
        ));
    }

    #[test]
    fn compile_past_its_time_limit_is_refused_and_counted_out_later() {
        let engine = SandboxEngine::with_config(EngineConfig {
            compile_ms_max: 0,
            ..EngineConfig::default()
        })
        .unwrap();
        // Enough functions that compiling takes far longer than spawning a thread.
        let funcs: String = (0..2000)
            .map(|i| {
                format!(
                    "(func (export \"f{i}\") (result i32) (i32.add (i32.const {i}) (i32.const 1)))"
                )
            })
            .collect();
        let wat = format!("(module {funcs})");
        assert!(matches!(
            engine.compile(wat.as_bytes()),
            Err(CompileError::TooSlow { ms: 0 })
        ));
        assert_eq!(engine.inner.abandoned.load(Ordering::Acquire), 1);
        let deadline = Instant::now() + Duration::from_secs(120);
        while engine.inner.abandoned.load(Ordering::Acquire) != 0 {
            assert!(
                Instant::now() < deadline,
                "the abandoned compile never finished"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn module_from_another_engine_is_refused() {
        let a = engine();
        let b = engine();
        let (tx, _rx) = mpsc::channel(1);
        let module = a.compile(b"(module)").unwrap();
        assert!(matches!(
            Sandbox::instantiate(&b, &module, "x", 1, limits(), tx),
            Err(InstantiateError::WrongEngine)
        ));
    }

    #[test]
    fn pooling_engine_runs_modules_and_gives_slots_back() {
        let engine = SandboxEngine::with_config(EngineConfig {
            pool: Some(PoolConfig {
                instances: 4,
                memory_bytes_max: 8 << 20,
            }),
            ..EngineConfig::default()
        })
        .unwrap();
        assert!(engine.pooling());
        let module = engine.compile(&example("hello.wat")).unwrap();
        // More instances over time than the pool has slots: dropped ones are reused.
        for _ in 0..20 {
            let (tx, _rx) = mpsc::channel(4);
            let mut sb = Sandbox::instantiate(&engine, &module, "hello", 1, limits(), tx).unwrap();
            assert!(sb.call("init").unwrap());
        }
        // A module whose initial memory is larger than a slot is refused when compiled.
        let err = engine.compile(b"(module (memory 200))").err().unwrap();
        assert!(err.to_string().contains("pooling"), "{err}");
    }

    #[test]
    fn compiled_modules_are_cached_in_the_given_directory() {
        let dir = tempfile::tempdir().unwrap();
        let cache_dir = dir.path().join("cache");
        let config = EngineConfig {
            cache_dir: Some(cache_dir.clone()),
            ..EngineConfig::default()
        };
        let a = SandboxEngine::with_config(config.clone()).unwrap();
        a.compile(&example("hello.wat")).unwrap();
        assert_eq!(a.cache_stats(), Some((0, 1)));
        let b = SandboxEngine::with_config(config).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        let module = b.compile(&example("hello.wat")).unwrap();
        assert_eq!(b.cache_stats(), Some((1, 0)));
        let (tx, mut rx) = mpsc::channel(4);
        let mut sb = Sandbox::instantiate(&b, &module, "hello", 1, limits(), tx).unwrap();
        sb.call("init").unwrap();
        assert!(rx.try_recv().unwrap().text.starts_with("hello"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&cache_dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn ticker_stops_with_the_last_engine_clone() {
        let engine = engine();
        let ticker = engine.ticker();
        let clone = engine.clone();
        drop(engine);
        assert!(!ticker.stop.load(Ordering::Acquire));
        drop(clone);
        assert!(ticker.stop.load(Ordering::Acquire));
        // The thread was parked (no call ever ran); woken by the drop, it exits and lets
        // go of its share.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&ticker) > 1 {
            assert!(Instant::now() < deadline, "the ticker thread did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn the_epoch_ticker_runs_only_while_a_guest_does() {
        let engine = engine();
        let ticker = engine.ticker();
        let (tx, _rx) = mpsc::channel(1);
        let module = engine.compile(&example("spin.wat")).unwrap();
        let mut sb = Sandbox::instantiate(&engine, &module, "spin", 1, limits(), tx).unwrap();
        let idle = ticker.ticks.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(5 * EPOCH_TICK_MS));
        // Instantiating may have let one tick start; none more without a call.
        assert!(ticker.ticks.load(Ordering::Relaxed) <= idle + 1);
        let before = ticker.ticks.load(Ordering::Relaxed);
        assert_eq!(sb.call("on_tick"), Err(CallError::Deadline { ms: 50 }));
        // A spinning guest is stopped by ticks, so they came while it ran.
        let after = ticker.ticks.load(Ordering::Relaxed);
        assert!(after >= before + 50 / EPOCH_TICK_MS, "{before} -> {after}");
        std::thread::sleep(Duration::from_millis(5 * EPOCH_TICK_MS));
        assert!(ticker.ticks.load(Ordering::Relaxed) <= after + 1);
        // Woken again, it stops the next runaway call as promptly.
        assert_eq!(sb.call("on_tick"), Err(CallError::Deadline { ms: 50 }));
        assert_eq!(ticker.calls.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn sandbox_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<Sandbox>();
        assert_send::<SandboxEngine>();
        assert_send::<CompiledModule>();
    }

    #[test]
    fn sensor_read_contract() {
        let dir = tempfile::tempdir().unwrap();
        let allowed = dir.path().join("temp");
        std::fs::write(&allowed, "21.5\n").unwrap();
        let missing = dir.path().join("gone");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "x").unwrap();
        let paths = [allowed.clone(), missing.clone(), secret.clone()];
        let strs: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        let data = strs.concat();
        let mut g = Guest::new(&call_module("sensor_read", 4, &data), |s| {
            s.services.sensors = Arc::new([allowed.clone(), missing.clone()].into());
        });
        let (a, m, x) = (
            strs[0].len() as i32,
            strs[1].len() as i32,
            strs[2].len() as i32,
        );
        let buf = 4096;
        // Allowed: the bytes and their length.
        assert_eq!(g.go(&[0, a, buf, 64]), Ok(5));
        assert_eq!(g.memory(4096, 5), b"21.5\n");
        // A small buffer gets what fits, and the full length says it was cut.
        assert_eq!(g.go(&[0, a, buf + 100, 2]), Ok(5));
        assert_eq!(g.memory(4196, 3), b"21\0");
        assert_eq!(g.go(&[a, m, buf, 64]), Ok(E_NOT_FOUND));
        // Not on the allowlist: refused, whatever exists there.
        assert_eq!(g.go(&[a + m, x, buf, 64]), Ok(E_DENIED));
        // A prefix of an allowed path is not allowed.
        assert_eq!(g.go(&[0, a - 1, buf, 64]), Ok(E_DENIED));
        // Bad pointers and lengths trap, for the path and for the buffer.
        assert!(trap_message(g.go(&[65_000, 1000, buf, 64])).starts_with("sensor_read: "));
        assert!(trap_message(g.go(&[0, a, 65_530, 64])).contains("outside the module's memory"));
        assert!(trap_message(g.go(&[0, -1, buf, 64])).contains("outside"));
    }

    #[test]
    fn publish_contract() {
        let (tx, mut rx) = mpsc::channel(2);
        let data = format!("temp{}bad topic", "x".repeat(100));
        let mut g = Guest::new(&call_module("publish", 4, &data), |s| {
            s.services.outbox = Some(tx);
            s.quotas.messages_per_s = 1;
            s.quotas.publish_bytes_per_s = 1000;
        });
        assert_eq!(g.go(&[0, 4, 4, 10]), Ok(0));
        let m: Published = rx.try_recv().unwrap();
        assert_eq!(
            (m.module.as_str(), m.topic.as_str(), m.data.len()),
            ("guest", "temp", 10)
        );
        assert_eq!(g.go(&[104, 9, 0, 1]), Ok(E_INVALID), "space in topic");
        assert_eq!(g.go(&[0, 0, 0, 1]), Ok(E_INVALID), "empty topic");
        assert_eq!(
            g.go(&[0, 4, 0, PUBLISH_BYTES_MAX as i32 + 1]),
            Ok(E_TOO_LARGE)
        );
        // The burst of two messages a second: the second is allowed, the third is not.
        assert_eq!(g.go(&[0, 4, 0, 1]), Ok(0));
        assert_eq!(g.go(&[0, 4, 0, 1]), Ok(E_QUOTA));
        assert!(trap_message(g.go(&[0, 4, 65_536, 1])).starts_with("publish: "));
        let f = g.sb.usage().figures();
        assert_eq!((f.published, f.published_bytes), (2, 11));
        assert_eq!(f.publish_refused, 4);

        // A full outbox is E_FULL; no outbox at all is E_DENIED.
        let (tx, _rx) = mpsc::channel(1);
        let mut g = Guest::new(&call_module("publish", 4, "t"), |s| {
            s.services.outbox = Some(tx)
        });
        assert_eq!(g.go(&[0, 1, 0, 1]), Ok(0));
        assert_eq!(g.go(&[0, 1, 0, 1]), Ok(E_FULL));
        let mut g = Guest::new(&call_module("publish", 4, "t"), |_| {});
        assert_eq!(g.go(&[0, 1, 0, 1]), Ok(E_DENIED));
    }

    #[test]
    fn publish_bytes_rate_is_enforced() {
        let (tx, _rx) = mpsc::channel(100);
        let mut g = Guest::new(&call_module("publish", 4, "t"), |s| {
            s.services.outbox = Some(tx);
            s.quotas.messages_per_s = 1000;
            s.quotas.publish_bytes_per_s = 1000;
        });
        // 2000 bytes of burst: two of 1000, then refused.
        assert_eq!(g.go(&[0, 1, 0, 1000]), Ok(0));
        assert_eq!(g.go(&[0, 1, 0, 1000]), Ok(0));
        assert_eq!(g.go(&[0, 1, 0, 1000]), Ok(E_QUOTA));
    }

    #[test]
    fn subscribe_contract() {
        let mut g = Guest::new(&call_module("subscribe", 2, "temp/aBC"), |_| {});
        assert_eq!(g.go(&[0, 4]), Ok(0));
        assert_eq!(g.go(&[0, 4]), Ok(0), "subscribing twice is fine");
        assert_eq!(g.go(&[0, 8]), Ok(E_INVALID), "upper case");
        assert!(trap_message(g.go(&[65_535, 4])).starts_with("subscribe: "));
        assert_eq!(g.sb.subscriptions(), ["temp".to_string()].into());
        let topics: String = (0..20).map(|i| format!("t{i:02}")).collect();
        let mut g = Guest::new(&call_module("subscribe", 2, &topics), |_| {});
        for i in 0..crate::host::SUBSCRIPTIONS_MAX as i32 {
            assert_eq!(g.go(&[i * 3, 3]), Ok(0));
        }
        assert_eq!(g.go(&[19 * 3, 3]), Ok(E_QUOTA));
    }

    #[test]
    fn kv_contract() {
        let dir = tempfile::tempdir().unwrap();
        let kv = Arc::new(KvStore::open(&dir.path().join("kv.redb")).unwrap());
        let wat = r#"(module
            (import "mesh" "kv_get" (func $get (param i32 i32 i32 i32) (result i32)))
            (import "mesh" "kv_set" (func $set (param i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 2)
            (data (i32.const 0) "countervalue")
            (func (export "get") (param i32 i32 i32 i32) (result i32)
                (call $get (local.get 0) (local.get 1) (local.get 2) (local.get 3)))
            (func (export "set") (param i32 i32 i32 i32) (result i32)
                (call $set (local.get 0) (local.get 1) (local.get 2) (local.get 3))))"#;
        let mut g = Guest::new(wat, |s| {
            s.services.kv = Some(kv.clone());
            s.quotas.state_bytes = 20;
        });
        let mut call = |f: &str, a: [i32; 4]| {
            let args: Vec<Val> = a.iter().map(|&x| Val::I32(x)).collect();
            g.sb.call_raw(f, &args).map(|r| r[0].unwrap_i32())
        };
        assert_eq!(call("get", [0, 7, 1000, 64]), Ok(E_NOT_FOUND));
        assert_eq!(call("set", [0, 7, 7, 5]), Ok(0));
        assert_eq!(call("get", [0, 7, 1000, 64]), Ok(5));
        assert_eq!(call("get", [0, 7, 2000, 2]), Ok(5), "full length when cut");
        // "counter" (7) + 5 = 12 bytes used; key "value" (5) + 14 more would be 31 > 20.
        assert_eq!(call("set", [7, 5, 0, 14]), Ok(E_QUOTA));
        assert_eq!(call("set", [7, 5, 0, 3]), Ok(0));
        assert_eq!(call("set", [0, 0, 0, 1]), Ok(E_INVALID), "empty key");
        assert_eq!(call("set", [0, 300, 0, 1]), Ok(E_INVALID), "key too long");
        assert_eq!(call("set", [0, 7, 0, 70_000]), Ok(E_TOO_LARGE));
        assert!(trap_message(call("set", [0, 7, 131_000, 100])).starts_with("kv_set: "));
        assert!(trap_message(call("get", [0, 7, 131_070, 64])).starts_with("kv_get: "));
        let f = g.sb.usage().figures();
        assert_eq!((f.state_bytes, f.state_refused), (20, 1));
        assert_eq!(
            kv.get("guest", b"counter").unwrap().as_deref(),
            Some(&b"value"[..])
        );
        // No database: denied.
        let mut g = Guest::new(wat, |_| {});
        assert_eq!(
            g.sb.call_raw(
                "get",
                &[Val::I32(0), Val::I32(7), Val::I32(100), Val::I32(8)]
            )
            .map(|r| r[0].unwrap_i32()),
            Ok(E_DENIED)
        );
    }

    #[test]
    fn random_time_and_message_contracts() {
        let wat = r#"(module
            (import "mesh" "random" (func $random (param i32 i32) (result i32)))
            (import "mesh" "now_us" (func $now (result i64)))
            (import "mesh" "msg_topic" (func $topic (param i32 i32) (result i32)))
            (import "mesh" "msg_data" (func $data (param i32 i32) (result i32)))
            (import "mesh" "snapshot_write" (func $snap (param i32 i32) (result i32)))
            (memory (export "memory") 1)
            (global $seen_topic (mut i32) (i32.const 0))
            (func (export "random") (param i32 i32) (result i32) (call $random (local.get 0) (local.get 1)))
            (func (export "now") (result i64) (call $now))
            (func (export "topic") (param i32 i32) (result i32) (call $topic (local.get 0) (local.get 1)))
            (func (export "snap") (param i32 i32) (result i32) (call $snap (local.get 0) (local.get 1)))
            (func (export "on_message") (param $tl i32) (param $dl i32)
                (drop (call $topic (i32.const 100) (local.get $tl)))
                (drop (call $data (i32.const 200) (local.get $dl))))
            (func (export "snapshot")
                (drop (call $snap (i32.const 100) (i32.const 3))))
            (func (export "restore") (param $len i32)
                (drop (call $data (i32.const 300) (local.get $len)))))"#;
        let mut g = Guest::new(wat, |_| {});
        let mut call = |f: &str, a: &[i32]| {
            let args: Vec<Val> = a.iter().map(|&x| Val::I32(x)).collect();
            g.sb.call_raw(f, &args)
        };
        assert_eq!(call("random", &[0, 64]).unwrap()[0].unwrap_i32(), 0);
        assert_eq!(
            call("random", &[0, 4097]).unwrap()[0].unwrap_i32(),
            E_TOO_LARGE
        );
        assert!(
            trap_message(call("random", &[65_535, 2]).map(|r| r[0].unwrap_i32()))
                .starts_with("random: ")
        );
        let t1 = call("now", &[]).unwrap()[0].unwrap_i64();
        let t2 = call("now", &[]).unwrap()[0].unwrap_i64();
        assert!(t1 >= 0 && t2 >= t1);
        // Outside on_message and restore there is nothing to read; snapshot_write outside
        // snapshot is refused.
        assert_eq!(call("topic", &[0, 10]).unwrap()[0].unwrap_i32(), E_INVALID);
        assert_eq!(call("snap", &[0, 10]).unwrap()[0].unwrap_i32(), E_INVALID);
        assert_eq!(g.sb.deliver("temp", b"21.5"), Ok(true));
        assert_eq!(g.memory(100, 4), b"temp");
        assert_eq!(g.memory(200, 4), b"21.5");
        g.sb.write_memory("memory", 100, b"abc").unwrap();
        assert_eq!(g.sb.snapshot(), Ok(Some(b"abc".to_vec())));
        assert_eq!(g.sb.restore(b"xyz"), Ok(true));
        assert_eq!(g.memory(300, 3), b"xyz");
    }

    #[test]
    fn wasi_subset_logs_stdout_and_has_no_files() {
        let wat = r#"(module
            (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "fd_prestat_get" (func $prestat (param i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "path_open"
                (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
            (memory (export "memory") 1)
            (data (i32.const 0) "\10\00\00\00\09\00\00\00")
            (data (i32.const 16) "hi there\0a")
            (func (export "write") (param i32) (result i32)
                (call $write (local.get 0) (i32.const 0) (i32.const 1) (i32.const 32)))
            (func (export "prestat") (result i32) (call $prestat (i32.const 3) (i32.const 64)))
            (func (export "open") (result i32)
                (call $open (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 0)
                            (i64.const 0) (i64.const 0) (i32.const 0) (i32.const 64)))
            (func (export "clock") (param i32) (result i32) (call $clock (local.get 0) (i64.const 0) (i32.const 64))))"#;
        let engine = engine();
        let module = engine.compile(wat.as_bytes()).unwrap();
        let (tx, mut rx) = mpsc::channel(4);
        let mut sb = Sandbox::instantiate(&engine, &module, "c", 1, limits(), tx).unwrap();
        let mut call = |f: &str, a: &[i32]| {
            let args: Vec<Val> = a.iter().map(|&x| Val::I32(x)).collect();
            sb.call_raw(f, &args).unwrap()[0].unwrap_i32()
        };
        assert_eq!(call("write", &[1]), 0);
        assert_eq!(rx.try_recv().unwrap().text, "hi there");
        assert_eq!(
            call("write", &[5]),
            8,
            "EBADF for anything but stdout and stderr"
        );
        assert_eq!(call("prestat", &[]), 8, "nothing is preopened");
        assert_eq!(call("open", &[]), 52, "path_open is ENOSYS");
        assert_eq!(call("clock", &[1]), 0);
        assert_eq!(call("clock", &[9]), 28);
    }

    #[test]
    fn third_party_xxhash_module_runs() {
        // xxhash-wasm 1.1.0 from npm (MIT, see examples/modules/third_party/).
        let engine = engine();
        let bytes = example("third_party/xxhash.wasm");
        let module = engine.compile(&bytes).unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let mut sb = Sandbox::instantiate(&engine, &module, "xxhash", 1, limits(), tx).unwrap();
        for (input, expected) in [
            (&b"hello"[..], 0xfb0077f9u32),
            (b"hello mesh, this is longer than 16 bytes", 0x8f56741d),
        ] {
            sb.write_memory("mem", 0, input).unwrap();
            let out = sb
                .call_raw(
                    "xxh32",
                    &[Val::I32(0), Val::I32(input.len() as i32), Val::I32(0)],
                )
                .unwrap();
            assert_eq!(out[0].unwrap_i32() as u32, expected);
        }
    }
}
