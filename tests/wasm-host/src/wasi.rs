//! The WASI preview 1 calls a proxy-wasm filter built for wasm32-wasip1 makes: no arguments or
//! environment, clocks that read the test clock, deterministic "random" bytes, stdout and stderr
//! captured into the VM's log, and `proc_exit`. Any other WASI import is stubbed by
//! [`crate::abi::add_stubs`] (a call fails the test).
//!
//! Written here rather than taken from wasmtime-wasi: that crate comes only with WASI preview 2
//! and wasmtime's component model, which this host never uses and which were a third of its
//! compile time (and of the test command's).

use wasmtime::{Caller, Linker};

use crate::abi::{read, write, write_u32};
use crate::state::VmState;

pub(crate) const MODULE: &str = "wasi_snapshot_preview1";

const SUCCESS: i32 = 0;
const BADF: i32 = 8;
const INVAL: i32 = 28;

type Res<T> = wasmtime::Result<T>;
type C<'a> = Caller<'a, VmState>;

/// `proc_exit(code)`: ends the call as a trap carrying the code; code 0 is a clean exit.
#[derive(Debug)]
pub struct ProcExit(pub i32);

impl std::fmt::Display for ProcExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the module called proc_exit({})", self.0)
    }
}

impl std::error::Error for ProcExit {}

/// The WASI functions defined here (module [`MODULE`]).
pub(crate) fn add_to_linker(linker: &mut Linker<VmState>) -> Res<Vec<&'static str>> {
    let mut names = Vec::new();
    macro_rules! def {
        ($name:literal, $f:expr) => {{
            linker.func_wrap(MODULE, $name, $f)?;
            names.push($name);
        }};
    }
    // No arguments and no environment: two zero counts.
    def!("args_sizes_get", |mut c: C<'_>, count: i32, size: i32| -> Res<i32> { zero_counts(&mut c, count, size) });
    def!("args_get", |_c: C<'_>, _argv: i32, _buf: i32| -> Res<i32> { Ok(SUCCESS) });
    def!("environ_sizes_get", |mut c: C<'_>, count: i32, size: i32| -> Res<i32> { zero_counts(&mut c, count, size) });
    def!("environ_get", |_c: C<'_>, _environ: i32, _buf: i32| -> Res<i32> { Ok(SUCCESS) });
    // Realtime and monotonic clocks alike read the test clock (nanoseconds since the epoch).
    def!("clock_time_get", |mut c: C<'_>, _id: i32, _precision: i64, out: i32| -> Res<i32> {
        let now = c.data().clock.now_ns();
        write(&mut c, out, &now.to_le_bytes())?;
        Ok(SUCCESS)
    });
    def!("clock_res_get", |mut c: C<'_>, _id: i32, out: i32| -> Res<i32> {
        write(&mut c, out, &1u64.to_le_bytes())?;
        Ok(SUCCESS)
    });
    def!("random_get", |mut c: C<'_>, buf: i32, len: i32| -> Res<i32> {
        let bytes: Vec<u8> = (0..len.max(0)).map(|_| c.data_mut().next_random_byte()).collect();
        write(&mut c, buf, &bytes)?;
        Ok(SUCCESS)
    });
    def!("fd_write", |mut c: C<'_>, fd: i32, iovs: i32, iovs_len: i32, written: i32| -> Res<i32> {
        if !(1..=2).contains(&fd) {
            return Ok(BADF);
        }
        let Ok(count) = usize::try_from(iovs_len) else { return Ok(INVAL) };
        let mut data = Vec::new();
        for i in 0..count {
            // An iovec is (pointer: u32, length: u32).
            let entry = read(&mut c, iovs.wrapping_add((i * 8) as i32), 8)?;
            let field = |at: usize| entry.get(at..at + 4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes);
            let (Some(ptr), Some(len)) = (field(0), field(4)) else { return Ok(INVAL) };
            data.extend(read(&mut c, ptr as i32, len as i32)?);
        }
        write_u32(&mut c, written, data.len() as u32)?;
        let state = c.data_mut();
        if fd == 1 { &mut state.stdout } else { &mut state.stderr }.extend(data);
        Ok(SUCCESS)
    });
    def!("proc_exit", |_c: C<'_>, code: i32| -> Res<()> { Err(wasmtime::Error::new(ProcExit(code))) });
    def!("sched_yield", |_c: C<'_>| -> Res<i32> { Ok(SUCCESS) });
    Ok(names)
}

fn zero_counts(c: &mut C<'_>, count: i32, size: i32) -> Res<i32> {
    write_u32(c, count, 0)?;
    write_u32(c, size, 0)?;
    Ok(SUCCESS)
}
