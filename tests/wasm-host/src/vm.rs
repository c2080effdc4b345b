//! Compiling (once per process and path) and instantiating VMs, and calling their exports with
//! traps and host-detected problems turned into errors that carry the VM's log.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context as _, Result};
use wasmtime::{Config, Engine, Instance, InstancePre, Linker, Module, Store, Val};

use crate::state::{Clock, SharedRef, VmState};
use crate::{abi, wasi};

/// A compiled module, its linker and what was stubbed.
pub(crate) struct Compiled {
    pub engine: Engine,
    pub pre: InstancePre<VmState>,
    pub stubbed: Vec<String>,
    pub compile_time: Duration,
}

type CacheKey = (PathBuf, Option<SystemTime>, u64);

fn engine() -> Result<Engine> {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    if let Some(e) = ENGINE.get() {
        return Ok(e.clone());
    }
    let mut config = Config::new();
    config.cranelift_opt_level(wasmtime::OptLevel::Speed);
    // Fuel counts the wasm operations the filter runs: its own work per request, measured
    // exactly (a timed run measures the machine as much as the filter).
    config.consume_fuel(true);
    let engine = Engine::new(&config).map_err(anyhow::Error::from)?;
    Ok(ENGINE.get_or_init(|| engine).clone())
}

/// Compiles `path` once per process (keyed by path, modification time and size).
pub(crate) fn compiled(path: &Path) -> Result<Arc<Compiled>> {
    static CACHE: OnceLock<Mutex<HashMap<CacheKey, Arc<Compiled>>>> = OnceLock::new();
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read wasm module {}", path.display()))?;
    let key = (path.to_path_buf(), meta.modified().ok(), meta.len());
    let cache = CACHE.get_or_init(Default::default);
    // Holding the lock while compiling makes parallel tests wait for one compilation
    // instead of all compiling the same module.
    let mut map = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = map.get(&key) {
        return Ok(c.clone());
    }
    let started = Instant::now();
    let engine = engine()?;
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let module = Module::new(&engine, &bytes)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("compiling {}", path.display()))?;
    let abi_ok = module.exports().any(|e| e.name().starts_with("proxy_abi_version_0_2"));
    if !abi_ok {
        bail!("{} exports no proxy_abi_version_0_2_x: not a proxy-wasm ABI 0.2 module", path.display());
    }
    let mut linker: Linker<VmState> = Linker::new(&engine);
    let wasi = wasi::add_to_linker(&mut linker).map_err(anyhow::Error::from)?;
    let env = abi::add_to_linker(&mut linker).map_err(anyhow::Error::from)?;
    let implemented: Vec<(&str, &str)> =
        wasi.into_iter().map(|n| (wasi::MODULE, n)).chain(env.into_iter().map(|n| ("env", n))).collect();
    let stubbed = abi::add_stubs(&mut linker, &module, &implemented).map_err(anyhow::Error::from)?;
    let pre = linker
        .instantiate_pre(&module)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("linking {}", path.display()))?;
    let compiled = Arc::new(Compiled { engine, pre, stubbed, compile_time: started.elapsed() });
    map.insert(key, compiled.clone());
    Ok(compiled)
}

/// One VM (one Envoy worker thread's wasm instance).
pub(crate) struct Vm {
    pub store: Store<VmState>,
    pub instance: Instance,
    /// Set when a call trapped: the VM must be reloaded before it is used again.
    pub crashed: Option<String>,
    pub next_context_id: u32,
}

pub(crate) struct VmParams<'a> {
    pub worker: usize,
    pub generation: u64,
    pub shared: SharedRef,
    pub clock: Clock,
    pub plugin_config: &'a [u8],
    pub vm_config: &'a [u8],
    pub echo_logs: bool,
}

pub(crate) const ROOT_ID: u32 = 1;

impl Vm {
    /// Instantiates the module and runs Envoy's start sequence. Returns the VM and whether
    /// on_vm_start and on_configure both returned true.
    pub fn start(compiled: &Compiled, p: VmParams<'_>) -> Result<(Vm, bool)> {
        let state = VmState {
            stdout: Vec::new(),
            stderr: Vec::new(),
            random: 0x5eed,
            worker: p.worker,
            generation: p.generation,
            shared: p.shared,
            clock: p.clock,
            plugin_config: p.plugin_config.to_vec(),
            vm_config: p.vm_config.to_vec(),
            logs: Vec::new(),
            echo_logs: p.echo_logs,
            root_id: ROOT_ID,
            effective: ROOT_ID,
            streams: Default::default(),
            root_properties: Default::default(),
            tick_period_ms: 0,
            next_tick_ns: None,
            call_response: None,
            problems: Vec::new(),
            needs_settle: false,
            host_calls: 0,
            fuel_trace: std::env::var_os("EXO_LB_FUEL_TRACE").map(|_| Vec::new()),
        };
        let mut store = Store::new(&compiled.engine, state);
        store.set_fuel(u64::MAX).map_err(anyhow::Error::from)?;
        store.call_hook(|mut store, hook| {
            if matches!(hook, wasmtime::CallHook::CallingHost) {
                store.data_mut().host_calls += 1;
                // Only when tracing: this runs on every host call of every test.
                if store.data().fuel_trace.is_some() {
                    let used = u64::MAX - store.get_fuel().unwrap_or(u64::MAX);
                    if let Some(trace) = &mut store.data_mut().fuel_trace {
                        trace.push(used);
                    }
                }
            }
            Ok(())
        });
        let instance =
            compiled.pre.instantiate(&mut store).map_err(anyhow::Error::from).context("instantiating the module")?;
        let mut vm = Vm { store, instance, crashed: None, next_context_id: ROOT_ID + 1 };
        if vm.has_export("_initialize") {
            vm.call("_initialize", ROOT_ID, &[])?;
        } else if vm.has_export("_start") {
            vm.call("_start", ROOT_ID, &[])?;
        }
        vm.call("proxy_on_context_create", ROOT_ID, &[ROOT_ID as i32, 0])?;
        let vm_config_len = vm.store.data().vm_config.len() as i32;
        let started = vm.call("proxy_on_vm_start", ROOT_ID, &[ROOT_ID as i32, vm_config_len])?;
        if started == Some(0) {
            vm.store.data_mut().host_diag("proxy_on_vm_start returned false".into());
            return Ok((vm, false));
        }
        let config_len = vm.store.data().plugin_config.len() as i32;
        let configured = vm.call("proxy_on_configure", ROOT_ID, &[ROOT_ID as i32, config_len])?;
        if configured == Some(0) {
            vm.store.data_mut().host_diag("proxy_on_configure returned false: configuration rejected".into());
        }
        Ok((vm, configured != Some(0)))
    }

    /// What the VM has run so far: wasm operations (fuel) and calls into the host.
    pub fn cost(&self) -> crate::Cost {
        crate::Cost {
            fuel: u64::MAX - self.store.get_fuel().unwrap_or(u64::MAX),
            host_calls: self.store.data().host_calls,
        }
    }

    pub fn has_export(&mut self, name: &str) -> bool {
        self.instance.get_func(&mut self.store, name).is_some()
    }

    /// Calls export `name` with `ctx` as the effective context. Traps become errors (and mark
    /// the VM crashed); so do calls of unimplemented imports made during the call.
    pub fn call(&mut self, name: &str, ctx: u32, args: &[i32]) -> Result<Option<i32>> {
        let worker = self.store.data().worker;
        if let Some(reason) = &self.crashed {
            bail!("worker {worker}: VM crashed earlier ({reason}); call host.reload_worker({worker}) first");
        }
        let Some(func) = self.instance.get_func(&mut self.store, name) else {
            bail!("worker {worker}: the module does not export {name}");
        };
        let params: Vec<Val> = args.iter().map(|a| Val::I32(*a)).collect();
        let n_results = func.ty(&self.store).results().len();
        let mut results = vec![Val::I32(0); n_results];
        let previous_effective = self.store.data().effective;
        self.store.data_mut().effective = ctx;
        let outcome = func.call(&mut self.store, &params, &mut results);
        self.store.data_mut().effective = previous_effective;
        self.store.data_mut().drain_stdio();
        if let Err(err) = outcome {
            let err = anyhow::Error::from(err);
            let exit_ok = err.downcast_ref::<wasi::ProcExit>().is_some_and(|e| e.0 == 0);
            if !exit_ok {
                let summary = format!("{name}({args:?}) trapped: {}", err.root_cause());
                self.crashed = Some(summary.clone());
                let problems = std::mem::take(&mut self.store.data_mut().problems);
                // `err` reads "error while executing at wasm backtrace: <frames>"; the panic
                // message is in the log below (the VM's stderr).
                return Err(anyhow!(self.report(&format!("{summary}\n{err}"), &problems)));
            }
        }
        let problems = std::mem::take(&mut self.store.data_mut().problems);
        if !problems.is_empty() {
            return Err(anyhow!(self.report(&format!("{name}({args:?}) hit host problems"), &problems)));
        }
        Ok(results.first().and_then(Val::i32))
    }

    /// An error text with the VM's problems and its last log lines.
    pub fn report(&self, what: &str, problems: &[String]) -> String {
        let s = self.store.data();
        let mut out = format!("worker {}: {what}", s.worker);
        for p in problems {
            let _ = write!(out, "\n  problem: {p}");
        }
        let tail = s.logs.len().saturating_sub(60);
        let _ = write!(out, "\n--- last {} log lines of worker {} ---", s.logs.len() - tail, s.worker);
        for line in s.logs.iter().skip(tail) {
            let _ = write!(out, "\n{line}");
        }
        out
    }
}
