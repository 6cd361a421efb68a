//! WebAssembly sandboxes: one wasmtime engine per node, one store per module instance.
//!
//! A module sees exactly one host function, `mesh.log(ptr, len)`, and runs under three
//! limits: linear memory (a [`ResourceLimiter`] on its store), time per call (an epoch
//! deadline, advanced by a background thread every [`EPOCH_TICK_MS`]) and bytes per log
//! line. Everything a guest can get wrong (a bad pointer, invalid UTF-8, an infinite
//! loop, a memory bomb) turns into an error value for the caller; none of it can panic
//! the host.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use wasmtime::{
    Caller, Config, Engine, Extern, Instance, Linker, Module, ResourceLimiter, Store, Trap,
};

/// The epoch advances this often; a call's deadline is rounded up to whole ticks, so this
/// is the precision of `call_ms_max`. Ten milliseconds keeps the ticker thread's cost
/// negligible on a small device while stopping a runaway call promptly.
pub const EPOCH_TICK_MS: u64 = 10;
/// Larger modules are refused before compiling: compiling is CPU- and memory-hungry, and
/// the modules we run on edge devices are small (the largest third-party one we target,
/// esbuild-wasm, is about 11 MiB).
pub const MODULE_BYTES_MAX: usize = 16 << 20;
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

/// The host module name guests import from.
const HOST_MODULE: &str = "mesh";

/// Errors from creating the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("creating wasm engine: {0}")]
    Engine(String),
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
    #[error("compiling module: {reason}")]
    Invalid { reason: String },
}

/// Errors from instantiating a module.
#[derive(Debug, thiserror::Error)]
pub enum InstantiateError {
    #[error("instantiating module: unknown import {module}::{name} (only mesh::log is provided)")]
    UnknownImport { module: String, name: String },
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
    #[error("module exceeded its memory limit of {memory_bytes_max} bytes")]
    OutOfMemory { memory_bytes_max: u64 },
    #[error("export {export} is not a function without parameters and results")]
    WrongSignature { export: String },
}

/// The limits one module instance runs under.
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

/// The node's wasm engine and the thread that advances its epoch. Cheap to clone.
#[derive(Clone)]
pub struct SandboxEngine {
    inner: Arc<EngineInner>,
}

struct EngineInner {
    engine: Engine,
    linker: Linker<Host>,
    /// Tells the ticker thread to exit; set when the last clone of the engine is dropped.
    stop: Arc<AtomicBool>,
}

impl Drop for EngineInner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

impl SandboxEngine {
    pub fn new() -> Result<SandboxEngine, EngineError> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        let engine = Engine::new(&config).map_err(|e| EngineError::Engine(format!("{e:#}")))?;

        let mut linker = Linker::new(&engine);
        linker
            .func_wrap(HOST_MODULE, "log", host_log)
            .map_err(|e| EngineError::Linker(format!("{e:#}")))?;

        let stop = Arc::new(AtomicBool::new(false));
        let ticker_engine = engine.clone();
        let ticker_stop = stop.clone();
        std::thread::Builder::new()
            .name("mesh-epoch".into())
            .spawn(move || {
                // The thread holds the engine but not the `EngineInner`, so it cannot keep
                // itself alive: dropping the last `SandboxEngine` sets `stop`.
                while !ticker_stop.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(EPOCH_TICK_MS));
                    ticker_engine.increment_epoch();
                }
            })
            .map_err(EngineError::Ticker)?;

        Ok(SandboxEngine {
            inner: Arc::new(EngineInner {
                engine,
                linker,
                stop,
            }),
        })
    }

    /// Compiles a module from its binary or WAT text form.
    pub fn compile(&self, bytes: &[u8]) -> Result<CompiledModule, CompileError> {
        if bytes.len() > MODULE_BYTES_MAX {
            return Err(CompileError::TooLarge {
                bytes: bytes.len(),
                max: MODULE_BYTES_MAX,
            });
        }
        let module = Module::new(&self.inner.engine, bytes).map_err(|e| CompileError::Invalid {
            reason: format!("{e:#}"),
        })?;
        Ok(CompiledModule { module })
    }

    /// The ticker thread's stop flag, so a test can watch it flip when the last clone goes.
    #[cfg(test)]
    fn stop_flag(&self) -> Arc<AtomicBool> {
        self.inner.stop.clone()
    }
}

/// A compiled module, ready to instantiate any number of times. Cheap to clone.
#[derive(Clone)]
pub struct CompiledModule {
    module: Module,
}

impl CompiledModule {
    /// The first import the host does not provide, as (module, name), if any.
    ///
    /// Deploys check this up front so that a module that can never start is refused
    /// instead of being restarted until its budget runs out.
    pub fn unsupported_import(&self) -> Option<(String, String)> {
        self.module
            .imports()
            .find(|i| !(i.module() == HOST_MODULE && i.name() == "log"))
            .map(|i| (i.module().to_string(), i.name().to_string()))
    }
}

/// The state a store carries for its host functions and limiter.
struct Host {
    module: String,
    version: u64,
    log_line_bytes_max: usize,
    logs: mpsc::Sender<LogLine>,
    logs_dropped: Arc<AtomicU64>,
    limiter: Limiter,
}

struct Limiter {
    memory_bytes_max: u64,
    /// Set when the guest asked for more memory than allowed, so that the trap it gets is
    /// reported as running out of memory even if the error's type is lost on the way.
    memory_limit_hit: bool,
}

/// The error a denied memory growth raises inside wasmtime.
#[derive(Debug, thiserror::Error)]
#[error("growing memory to {desired} bytes: over the limit of {max} bytes")]
struct MemoryLimitExceeded {
    desired: usize,
    max: u64,
}

/// A trap raised by a host function, with the message the module's owner will see.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct HostTrap(String);

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

/// `mesh.log(ptr, len)`: logs `len` bytes of UTF-8 at `ptr` in the module's memory.
fn host_log(mut caller: Caller<'_, Host>, ptr: i32, len: i32) -> wasmtime::Result<()> {
    let Some(Extern::Memory(memory)) = caller.get_export("memory") else {
        return Err(host_trap(
            "log: the module exports no memory named \"memory\"",
        ));
    };
    // Wasm addresses are unsigned 32-bit numbers that travel as i32.
    let start = ptr as u32 as usize;
    let len = len as u32 as usize;
    let data = memory.data(&caller);
    let Some(bytes) = start.checked_add(len).and_then(|end| data.get(start..end)) else {
        return Err(host_trap(format!(
            "log: {len} bytes at {start} are outside the module's memory ({} bytes)",
            data.len()
        )));
    };
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Err(host_trap("log: not utf-8"));
    };
    let host = caller.data();
    let (text, truncated) = truncate_at_char(text, host.log_line_bytes_max);
    let line = LogLine {
        module: host.module.clone(),
        version: host.version,
        text: text.to_string(),
        truncated,
        unix_ms: crate::unix_ms(),
    };
    // Never wait for the reader: a slow log consumer must not stall the module (and the
    // call's deadline would not cover time spent blocked here anyway).
    if host.logs.try_send(line).is_err() {
        host.logs_dropped.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

fn host_trap(message: impl Into<String>) -> wasmtime::Error {
    wasmtime::Error::new(HostTrap(message.into()))
}

/// The longest prefix of `text` that fits in `max` bytes without splitting a character.
fn truncate_at_char(text: &str, max: usize) -> (&str, bool) {
    if text.len() <= max {
        return (text, false);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (&text[..end], true)
}

/// One running module instance with its own store.
pub struct Sandbox {
    store: Store<Host>,
    instance: Instance,
    limits: SandboxLimits,
    /// Keeps the epoch ticker running for as long as this instance can run code.
    _engine: SandboxEngine,
}

impl Sandbox {
    pub fn instantiate(
        engine: &SandboxEngine,
        module: &CompiledModule,
        name: &str,
        version: u64,
        limits: SandboxLimits,
        logs: mpsc::Sender<LogLine>,
    ) -> Result<Sandbox, InstantiateError> {
        Sandbox::instantiate_counting(
            engine,
            module,
            name,
            version,
            limits,
            logs,
            Arc::new(AtomicU64::new(0)),
        )
    }

    /// Like [`Sandbox::instantiate`], counting dropped log lines in `logs_dropped`, so
    /// that the count can outlive this instance (the supervisor keeps one per module
    /// across restarts).
    pub(crate) fn instantiate_counting(
        engine: &SandboxEngine,
        module: &CompiledModule,
        name: &str,
        version: u64,
        limits: SandboxLimits,
        logs: mpsc::Sender<LogLine>,
        logs_dropped: Arc<AtomicU64>,
    ) -> Result<Sandbox, InstantiateError> {
        if !Engine::same(&engine.inner.engine, module.module.engine()) {
            return Err(InstantiateError::WrongEngine);
        }
        if let Some((module, name)) = module.unsupported_import() {
            return Err(InstantiateError::UnknownImport { module, name });
        }
        let host = Host {
            module: name.to_string(),
            version,
            log_line_bytes_max: limits.log_line_bytes_max,
            logs,
            logs_dropped,
            limiter: Limiter {
                memory_bytes_max: limits.memory_bytes_max,
                memory_limit_hit: false,
            },
        };
        let mut store = Store::new(&engine.inner.engine, host);
        store.limiter(|host| &mut host.limiter);
        // Instantiation runs the module's start function, if it has one: same deadline.
        store.set_epoch_deadline(deadline_ticks(limits.call_ms_max));
        let instance = engine
            .inner
            .linker
            .instantiate(&mut store, &module.module)
            .map_err(
                |e| match classify(&e, store.data().limiter.memory_limit_hit, &limits) {
                    CallError::Deadline { ms } => InstantiateError::Deadline { ms },
                    CallError::OutOfMemory { memory_bytes_max } => {
                        InstantiateError::OutOfMemory { memory_bytes_max }
                    }
                    _ => InstantiateError::Failed {
                        reason: format!("{e:#}"),
                    },
                },
            )?;
        Ok(Sandbox {
            store,
            instance,
            limits,
            _engine: engine.clone(),
        })
    }

    /// Calls a no-argument, no-result export. Ok(false) when the module does not export it.
    pub fn call(&mut self, export: &str) -> Result<bool, CallError> {
        let func = match self.instance.get_export(&mut self.store, export) {
            None => return Ok(false),
            Some(Extern::Func(f)) => f,
            Some(_) => {
                return Err(CallError::WrongSignature {
                    export: export.to_string(),
                })
            }
        };
        let func = func
            .typed::<(), ()>(&self.store)
            .map_err(|_| CallError::WrongSignature {
                export: export.to_string(),
            })?;
        self.store.data_mut().limiter.memory_limit_hit = false;
        self.store
            .set_epoch_deadline(deadline_ticks(self.limits.call_ms_max));
        func.call(&mut self.store, ())
            .map_err(|e| classify(&e, self.store.data().limiter.memory_limit_hit, &self.limits))?;
        Ok(true)
    }

    /// Log lines dropped because the log channel was full (or closed).
    pub fn logs_dropped(&self) -> u64 {
        self.store.data().logs_dropped.load(Ordering::Relaxed)
    }

    pub fn limits(&self) -> &SandboxLimits {
        &self.limits
    }
}

/// Epoch ticks for a deadline of `call_ms_max`: rounded up, plus one because the first
/// tick may come at any moment after the deadline is set. A call is therefore stopped
/// between `call_ms_max` and `call_ms_max + EPOCH_TICK_MS` after it starts (plus however
/// late the ticker thread gets scheduled).
fn deadline_ticks(call_ms_max: u64) -> u64 {
    call_ms_max.div_ceil(EPOCH_TICK_MS).saturating_add(1)
}

/// Turns an error out of wasm into what went wrong, as the module's owner should see it.
fn classify(e: &wasmtime::Error, memory_limit_hit: bool, limits: &SandboxLimits) -> CallError {
    if memory_limit_hit || e.downcast_ref::<MemoryLimitExceeded>().is_some() {
        return CallError::OutOfMemory {
            memory_bytes_max: limits.memory_bytes_max,
        };
    }
    if let Some(trap) = e.downcast_ref::<Trap>() {
        if *trap == Trap::Interrupt {
            return CallError::Deadline {
                ms: limits.call_ms_max,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

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

    fn hello_wat() -> String {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/modules/hello.wat");
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn hello_logs_from_init_and_tick() {
        let engine = engine();
        let (tx, mut rx) = mpsc::channel(16);
        let module = engine.compile(hello_wat().as_bytes()).unwrap();
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
    }

    #[test]
    fn missing_export_is_not_an_error() {
        let engine = engine();
        let (tx, _rx) = mpsc::channel(1);
        let mut sb = instantiate(&engine, "(module)", tx).unwrap();
        assert_eq!(sb.call("on_tick"), Ok(false));
    }

    #[test]
    fn wrong_signature_is_refused() {
        let engine = engine();
        let (tx, _rx) = mpsc::channel(1);
        let wat = r#"(module (func (export "on_tick") (param i32)) (global (export "init") i32 (i32.const 0)))"#;
        let mut sb = instantiate(&engine, wat, tx).unwrap();
        assert!(matches!(
            sb.call("on_tick"),
            Err(CallError::WrongSignature { export }) if export == "on_tick"
        ));
        assert!(matches!(
            sb.call("init"),
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
    fn unreachable_is_a_trap() {
        let engine = engine();
        let (tx, _rx) = mpsc::channel(1);
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/modules/trap.wat");
        let module = engine
            .compile(std::fs::read_to_string(path).unwrap().as_bytes())
            .unwrap();
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
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/modules/spin.wat");
        let module = engine
            .compile(std::fs::read_to_string(path).unwrap().as_bytes())
            .unwrap();
        let mut sb = Sandbox::instantiate(&engine, &module, "spin", 1, limits(), tx).unwrap();
        let started = Instant::now();
        assert_eq!(sb.call("on_tick"), Err(CallError::Deadline { ms: 50 }));
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(50), "stopped early: {took:?}");
        assert!(took < Duration::from_secs(2), "stopped late: {took:?}");
        // The deadline is set afresh for every call: the next call gets its full budget.
        let started = Instant::now();
        assert_eq!(sb.call("on_tick"), Err(CallError::Deadline { ms: 50 }));
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    #[test]
    fn memory_bomb_is_stopped_at_the_limit() {
        let engine = engine();
        let (tx, _rx) = mpsc::channel(1);
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/modules/membomb.wat"
        );
        let module = engine
            .compile(std::fs::read_to_string(path).unwrap().as_bytes())
            .unwrap();
        let mut sb = Sandbox::instantiate(&engine, &module, "bomb", 1, limits(), tx).unwrap();
        assert_eq!(
            sb.call("on_tick"),
            Err(CallError::OutOfMemory {
                memory_bytes_max: 4 << 20
            })
        );
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
    fn unknown_import_is_refused_by_name() {
        let engine = engine();
        let (tx, _rx) = mpsc::channel(1);
        let wat = r#"(module (import "env" "fd_write" (func (param i32))))"#;
        let module = engine.compile(wat.as_bytes()).unwrap();
        assert_eq!(
            module.unsupported_import(),
            Some(("env".to_string(), "fd_write".to_string()))
        );
        let err = Sandbox::instantiate(&engine, &module, "x", 1, limits(), tx)
            .err()
            .unwrap();
        assert!(err.to_string().contains("env::fd_write"), "{err}");
        assert!(matches!(err, InstantiateError::UnknownImport { .. }));
    }

    #[test]
    fn log_with_the_wrong_signature_fails_to_link() {
        let engine = engine();
        let (tx, _rx) = mpsc::channel(1);
        let wat = r#"(module (import "mesh" "log" (func (param i32))))"#;
        let err = instantiate(&engine, wat, tx).err().unwrap();
        assert!(matches!(err, InstantiateError::Failed { .. }), "{err}");
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
    fn ticker_stops_with_the_last_engine_clone() {
        let engine = engine();
        let stop = engine.stop_flag();
        let clone = engine.clone();
        drop(engine);
        assert!(!stop.load(Ordering::Acquire));
        drop(clone);
        assert!(stop.load(Ordering::Acquire));
    }

    #[test]
    fn sandbox_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<Sandbox>();
        assert_send::<SandboxEngine>();
        assert_send::<CompiledModule>();
    }
}
