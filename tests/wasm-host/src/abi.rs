//! The proxy-wasm ABI 0.2.1 imports (module `env`), implemented over [`VmState`].
//!
//! Return data is handed to the module the way Envoy does it: the host calls the module's
//! `proxy_on_memory_allocate` (or `malloc`), copies the bytes there and writes the pointer and
//! size to the two out-parameters (a null pointer and size 0 for empty data).

use wasmtime::{Caller, Extern, Linker, Memory, Module, Val, ValType};

use crate::state::{
    find_header, lock, CallResponse, Headers, HttpCall, LocalResponse, LogLevel, MetricData, MetricKind, VmState,
};

pub(crate) const OK: i32 = 0;
pub(crate) const NOT_FOUND: i32 = 1;
pub(crate) const BAD_ARGUMENT: i32 = 2;
pub(crate) const SERIALIZATION_FAILURE: i32 = 3;
pub(crate) const EMPTY: i32 = 7;
pub(crate) const CAS_MISMATCH: i32 = 8;
pub(crate) const UNIMPLEMENTED: i32 = 12;

type Res<T> = wasmtime::Result<T>;
type C<'a> = Caller<'a, VmState>;

fn memory(caller: &mut C<'_>) -> Res<Memory> {
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Ok(m),
        _ => wasmtime::bail!("module exports no memory"),
    }
}

pub(crate) fn read(caller: &mut C<'_>, ptr: i32, len: i32) -> Res<Vec<u8>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let mem = memory(caller)?;
    let (ptr, len) = (ptr as u32 as usize, len as u32 as usize);
    match mem.data(&caller).get(ptr..ptr.saturating_add(len)) {
        Some(bytes) => Ok(bytes.to_vec()),
        None => wasmtime::bail!("hostcall read out of bounds: ptr={ptr} len={len}"),
    }
}

fn read_str(caller: &mut C<'_>, ptr: i32, len: i32) -> Res<String> {
    Ok(String::from_utf8_lossy(&read(caller, ptr, len)?).into_owned())
}

pub(crate) fn write(caller: &mut C<'_>, ptr: i32, bytes: &[u8]) -> Res<()> {
    let mem = memory(caller)?;
    let ptr = ptr as u32 as usize;
    match mem.data_mut(caller).get_mut(ptr..ptr.saturating_add(bytes.len())) {
        Some(dst) => {
            dst.copy_from_slice(bytes);
            Ok(())
        }
        None => wasmtime::bail!("hostcall write out of bounds: ptr={ptr} len={}", bytes.len()),
    }
}

pub(crate) fn write_u32(caller: &mut C<'_>, ptr: i32, v: u32) -> Res<()> {
    write(caller, ptr, &v.to_le_bytes())
}

/// Copies `data` into module memory (allocated by the module) and writes pointer and size.
pub(crate) fn return_bytes(caller: &mut C<'_>, data: &[u8], ptr_ptr: i32, size_ptr: i32) -> Res<()> {
    let mut addr = 0u32;
    if !data.is_empty() {
        let alloc = ["proxy_on_memory_allocate", "malloc"]
            .iter()
            .find_map(|name| caller.get_export(name).and_then(Extern::into_func));
        let Some(alloc) = alloc else {
            wasmtime::bail!("module exports neither proxy_on_memory_allocate nor malloc");
        };
        let alloc = alloc.typed::<i32, i32>(&caller)?;
        addr = alloc.call(&mut *caller, data.len() as i32)? as u32;
        if addr == 0 {
            wasmtime::bail!("module allocator returned null for {} bytes", data.len());
        }
        write(caller, addr as i32, data)?;
    }
    write_u32(caller, ptr_ptr, addr)?;
    write_u32(caller, size_ptr, data.len() as u32)
}

/// Serializes a header map: count, (key_len, value_len) pairs, then `key\0value\0` each.
pub fn serialize_map(map: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(map.len() as u32).to_le_bytes());
    for (k, v) in map {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in map {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// Parses the serialization of [`serialize_map`]; `None` when malformed.
pub fn deserialize_map(bytes: &[u8]) -> Option<Headers> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let word = |at: usize| -> Option<usize> {
        let b: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
        Some(u32::from_le_bytes(b) as usize)
    };
    let n = word(0)?;
    let mut pos = 4usize.checked_add(n.checked_mul(8)?)?;
    let mut out = Vec::with_capacity(n.min(1024));
    for i in 0..n {
        let klen = word(4 + i * 8)?;
        let vlen = word(8 + i * 8)?;
        let key = bytes.get(pos..pos.checked_add(klen)?)?;
        pos += klen + 1;
        let value = bytes.get(pos..pos.checked_add(vlen)?)?;
        pos += vlen + 1;
        out.push((String::from_utf8_lossy(key).into_owned(), String::from_utf8_lossy(value).into_owned()));
    }
    Some(out)
}

/// Which header map a map type designates, for the current effective context.
enum MapRef {
    Request,
    RequestTrailers,
    Response,
    ResponseTrailers,
    CallHeaders,
    CallTrailers,
}

fn map_ref(map_type: i32) -> Option<MapRef> {
    Some(match map_type {
        0 => MapRef::Request,
        1 => MapRef::RequestTrailers,
        2 => MapRef::Response,
        3 => MapRef::ResponseTrailers,
        6 => MapRef::CallHeaders,
        7 => MapRef::CallTrailers,
        _ => return None,
    })
}

/// Result of looking a map up: the map, or the status Envoy returns when it is missing.
fn with_map<R>(state: &mut VmState, map_type: i32, f: impl FnOnce(&mut Headers) -> R) -> Result<R, i32> {
    let Some(which) = map_ref(map_type) else {
        return Err(BAD_ARGUMENT);
    };
    match which {
        MapRef::CallHeaders | MapRef::CallTrailers => {
            let Some(resp) = state.call_response.as_mut() else {
                return Err(NOT_FOUND);
            };
            Ok(f(match which {
                MapRef::CallHeaders => &mut resp.headers,
                _ => &mut resp.trailers,
            }))
        }
        _ => {
            let Some(stream) = state.stream() else {
                return Err(BAD_ARGUMENT);
            };
            let log_phase = stream.log_phase;
            let map = match which {
                MapRef::Request if stream.request.headers_present => Some(&mut stream.request.headers),
                MapRef::Response if stream.response.headers_present => Some(&mut stream.response.headers),
                MapRef::RequestTrailers => stream.request.trailers.as_mut(),
                MapRef::ResponseTrailers => stream.response.trailers.as_mut(),
                _ => None,
            };
            match map {
                Some(map) => Ok(f(map)),
                None if log_phase => {
                    let mut empty = Vec::new();
                    Ok(f(&mut empty))
                }
                None => Err(BAD_ARGUMENT),
            }
        }
    }
}

fn diag_status(state: &mut VmState, call: &str, status: i32) -> i32 {
    let ctx = state.effective;
    state.host_diag(format!("{call} in context {ctx} returned status {status} ({})", status_name(status)));
    status
}

pub(crate) fn status_name(status: i32) -> &'static str {
    match status {
        OK => "Ok",
        NOT_FOUND => "NotFound",
        BAD_ARGUMENT => "BadArgument",
        SERIALIZATION_FAILURE => "SerializationFailure",
        4 => "ParseFailure",
        EMPTY => "Empty",
        CAS_MISMATCH => "CasMismatch",
        10 => "InternalFailure",
        UNIMPLEMENTED => "Unimplemented",
        _ => "?",
    }
}

fn set_header(map: &mut Headers, key: &str, value: &str) {
    match map.iter().position(|(k, _)| k == key) {
        Some(first) => {
            if let Some(entry) = map.get_mut(first) {
                entry.1 = value.to_string();
            }
            let mut i = 0usize;
            map.retain(|(k, _)| {
                let keep = i <= first || k != key;
                i += 1;
                keep
            });
        }
        None => map.push((key.to_string(), value.to_string())),
    }
}

fn buffer_of(state: &mut VmState, buffer_type: i32) -> Option<&mut Vec<u8>> {
    match buffer_type {
        0 => state.stream().map(|s| &mut s.request.buffer),
        1 => state.stream().map(|s| &mut s.response.buffer),
        4 => state.call_response.as_mut().map(|r| &mut r.body),
        6 => Some(&mut state.vm_config),
        7 => Some(&mut state.plugin_config),
        _ => None,
    }
}

/// Property paths arrive as segments joined by NUL; we key properties by dotted names.
fn property_key(path: &[u8]) -> String {
    String::from_utf8_lossy(path).replace('\0', ".")
}

/// Names of every import this module implements (everything else in `env` gets a stub).
pub(crate) fn add_to_linker(linker: &mut Linker<VmState>) -> Res<Vec<&'static str>> {
    let mut names = Vec::new();
    macro_rules! def {
        ($name:literal, $f:expr) => {{
            linker.func_wrap("env", $name, $f)?;
            names.push($name);
        }};
    }

    def!("proxy_log", |mut c: C<'_>, level: i32, ptr: i32, len: i32| -> Res<i32> {
        let msg = read_str(&mut c, ptr, len)?;
        c.data_mut().log(LogLevel::from_abi(level as u32), msg);
        Ok(OK)
    });
    def!("proxy_get_log_level", |mut c: C<'_>, ret: i32| -> Res<i32> {
        let level = lock(&c.data().shared).log_level;
        write_u32(&mut c, ret, level)?;
        Ok(OK)
    });
    def!("proxy_get_current_time_nanoseconds", |mut c: C<'_>, ret: i32| -> Res<i32> {
        let now = c.data().clock.now_ns();
        write(&mut c, ret, &now.to_le_bytes())?;
        Ok(OK)
    });
    def!("proxy_set_tick_period_milliseconds", |mut c: C<'_>, period: i32| -> Res<i32> {
        let s = c.data_mut();
        s.tick_period_ms = period as u32;
        s.next_tick_ns = if period == 0 { None } else { Some(s.clock.now_ns() + period as u32 as u64 * 1_000_000) };
        Ok(OK)
    });
    def!("proxy_get_configuration", |mut c: C<'_>, rp: i32, rs: i32| -> Res<i32> {
        let cfg = c.data().plugin_config.clone();
        return_bytes(&mut c, &cfg, rp, rs)?;
        Ok(OK)
    });
    def!("proxy_get_buffer_bytes", |mut c: C<'_>, bt: i32, start: i32, max: i32, rp: i32, rs: i32| -> Res<i32> {
        let Some(buf) = buffer_of(c.data_mut(), bt) else {
            return Ok(NOT_FOUND);
        };
        let (start, max) = (start as u32 as usize, max as u32 as usize);
        if start > buf.len() {
            return Ok(BAD_ARGUMENT);
        }
        let end = start.saturating_add(max).min(buf.len());
        let data = buf.get(start..end).unwrap_or_default().to_vec();
        return_bytes(&mut c, &data, rp, rs)?;
        Ok(OK)
    });
    def!("proxy_set_buffer_bytes", |mut c: C<'_>, bt: i32, start: i32, size: i32, ptr: i32, len: i32| -> Res<i32> {
        let data = read(&mut c, ptr, len)?;
        if !matches!(bt, 0 | 1) {
            return Ok(diag_status(c.data_mut(), "proxy_set_buffer_bytes", BAD_ARGUMENT));
        }
        let Some(buf) = buffer_of(c.data_mut(), bt) else {
            return Ok(NOT_FOUND);
        };
        let start = (start as u32 as usize).min(buf.len());
        let end = start.saturating_add(size as u32 as usize).min(buf.len());
        buf.splice(start..end, data);
        Ok(OK)
    });
    def!("proxy_get_header_map_pairs", |mut c: C<'_>, mt: i32, rp: i32, rs: i32| -> Res<i32> {
        match with_map(c.data_mut(), mt, |m| serialize_map(m)) {
            Ok(bytes) => {
                return_bytes(&mut c, &bytes, rp, rs)?;
                Ok(OK)
            }
            Err(st) => Ok(diag_status(c.data_mut(), "proxy_get_header_map_pairs", st)),
        }
    });
    def!("proxy_set_header_map_pairs", |mut c: C<'_>, mt: i32, ptr: i32, len: i32| -> Res<i32> {
        let bytes = read(&mut c, ptr, len)?;
        let Some(pairs) = deserialize_map(&bytes) else {
            return Ok(SERIALIZATION_FAILURE);
        };
        let pairs: Headers = pairs.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect();
        match with_map(c.data_mut(), mt, |m| *m = pairs) {
            Ok(()) => Ok(OK),
            Err(st) => Ok(diag_status(c.data_mut(), "proxy_set_header_map_pairs", st)),
        }
    });
    def!("proxy_get_header_map_value", |mut c: C<'_>, mt: i32, kp: i32, kl: i32, rp: i32, rs: i32| -> Res<i32> {
        let key = read_str(&mut c, kp, kl)?.to_ascii_lowercase();
        let log_phase = c.data_mut().stream().is_some_and(|s| s.log_phase);
        match with_map(c.data_mut(), mt, |m| find_header(m, &key).map(str::to_string)) {
            Ok(Some(v)) => {
                return_bytes(&mut c, v.as_bytes(), rp, rs)?;
                Ok(OK)
            }
            Ok(None) => Ok(NOT_FOUND),
            Err(_) if log_phase => Ok(NOT_FOUND),
            Err(st) => Ok(diag_status(c.data_mut(), "proxy_get_header_map_value", st)),
        }
    });
    def!("proxy_replace_header_map_value", |mut c: C<'_>, mt: i32, kp: i32, kl: i32, vp: i32, vl: i32| -> Res<i32> {
        let key = read_str(&mut c, kp, kl)?.to_ascii_lowercase();
        let value = read_str(&mut c, vp, vl)?;
        match with_map(c.data_mut(), mt, |m| set_header(m, &key, &value)) {
            Ok(()) => Ok(OK),
            Err(st) => Ok(diag_status(c.data_mut(), "proxy_replace_header_map_value", st)),
        }
    });
    def!("proxy_add_header_map_value", |mut c: C<'_>, mt: i32, kp: i32, kl: i32, vp: i32, vl: i32| -> Res<i32> {
        let key = read_str(&mut c, kp, kl)?.to_ascii_lowercase();
        let value = read_str(&mut c, vp, vl)?;
        match with_map(c.data_mut(), mt, |m| m.push((key, value))) {
            Ok(()) => Ok(OK),
            Err(st) => Ok(diag_status(c.data_mut(), "proxy_add_header_map_value", st)),
        }
    });
    def!("proxy_remove_header_map_value", |mut c: C<'_>, mt: i32, kp: i32, kl: i32| -> Res<i32> {
        let key = read_str(&mut c, kp, kl)?.to_ascii_lowercase();
        match with_map(c.data_mut(), mt, |m| m.retain(|(k, _)| *k != key)) {
            Ok(()) => Ok(OK),
            Err(st) => Ok(diag_status(c.data_mut(), "proxy_remove_header_map_value", st)),
        }
    });
    def!("proxy_get_property", |mut c: C<'_>, pp: i32, pl: i32, rp: i32, rs: i32| -> Res<i32> {
        let key = property_key(&read(&mut c, pp, pl)?);
        let s = c.data_mut();
        let value =
            s.stream().and_then(|st| st.properties.get(&key).cloned()).or_else(|| s.root_properties.get(&key).cloned());
        match value {
            Some(v) => {
                return_bytes(&mut c, &v, rp, rs)?;
                Ok(OK)
            }
            None => Ok(NOT_FOUND),
        }
    });
    def!("proxy_set_property", |mut c: C<'_>, pp: i32, pl: i32, vp: i32, vl: i32| -> Res<i32> {
        let key = property_key(&read(&mut c, pp, pl)?);
        let value = read(&mut c, vp, vl)?;
        let s = c.data_mut();
        match s.stream() {
            Some(st) => st.properties.insert(key, value),
            None => s.root_properties.insert(key, value),
        };
        Ok(OK)
    });
    def!("proxy_get_shared_data", |mut c: C<'_>, kp: i32, kl: i32, rp: i32, rs: i32, rc: i32| -> Res<i32> {
        let key = read_str(&mut c, kp, kl)?;
        let found = lock(&c.data().shared).data.get(&key).cloned();
        match found {
            Some((value, cas)) => {
                return_bytes(&mut c, &value, rp, rs)?;
                write_u32(&mut c, rc, cas)?;
                Ok(OK)
            }
            None => Ok(NOT_FOUND),
        }
    });
    def!("proxy_set_shared_data", |mut c: C<'_>, kp: i32, kl: i32, vp: i32, vl: i32, cas: i32| -> Res<i32> {
        let key = read_str(&mut c, kp, kl)?;
        let value = read(&mut c, vp, vl)?;
        let mut sh = lock(&c.data().shared);
        let cas = cas as u32;
        if let Some((_, current)) = sh.data.get(&key) {
            if cas != 0 && cas != *current {
                return Ok(CAS_MISMATCH);
            }
        }
        let next = sh.bump_cas();
        sh.data.insert(key, (value, next));
        Ok(OK)
    });
    def!("proxy_register_shared_queue", |mut c: C<'_>, np: i32, nl: i32, ret: i32| -> Res<i32> {
        let name = read_str(&mut c, np, nl)?;
        let (worker, generation) = (c.data().worker, c.data().generation);
        let id = {
            let mut sh = lock(&c.data().shared);
            match sh.queues.iter().position(|q| q.name == name) {
                Some(i) => {
                    if let Some(q) = sh.queues.get_mut(i) {
                        q.owner_worker = worker;
                        q.owner_generation = generation;
                    }
                    i + 1
                }
                None => {
                    sh.queues.push(crate::state::Queue {
                        name,
                        owner_worker: worker,
                        owner_generation: generation,
                        items: Default::default(),
                    });
                    sh.queues.len()
                }
            }
        };
        write_u32(&mut c, ret, id as u32)?;
        Ok(OK)
    });
    def!("proxy_resolve_shared_queue", |mut c: C<'_>, _vp: i32, _vl: i32, np: i32, nl: i32, ret: i32| -> Res<i32> {
        let name = read_str(&mut c, np, nl)?;
        let id = lock(&c.data().shared).queues.iter().position(|q| q.name == name);
        match id {
            Some(i) => {
                write_u32(&mut c, ret, i as u32 + 1)?;
                Ok(OK)
            }
            None => Ok(NOT_FOUND),
        }
    });
    def!("proxy_enqueue_shared_queue", |mut c: C<'_>, id: i32, vp: i32, vl: i32| -> Res<i32> {
        let value = read(&mut c, vp, vl)?;
        let mut sh = lock(&c.data().shared);
        let Some(q) = sh.queues.get_mut((id as u32 as usize).wrapping_sub(1)) else {
            return Ok(NOT_FOUND);
        };
        q.items.push_back(value);
        let owner = (q.owner_worker, q.owner_generation, id as u32);
        sh.queue_ready.push(owner);
        Ok(OK)
    });
    def!("proxy_dequeue_shared_queue", |mut c: C<'_>, id: i32, rp: i32, rs: i32| -> Res<i32> {
        let item = {
            let mut sh = lock(&c.data().shared);
            let Some(q) = sh.queues.get_mut((id as u32 as usize).wrapping_sub(1)) else {
                return Ok(NOT_FOUND);
            };
            q.items.pop_front()
        };
        match item {
            Some(v) => {
                return_bytes(&mut c, &v, rp, rs)?;
                Ok(OK)
            }
            None => Ok(EMPTY),
        }
    });
    fn continue_stream(c: &mut C<'_>, stream_type: i32, name: &str) -> i32 {
        let s = c.data_mut();
        let Some(stream) = s.stream() else {
            return diag_status(s, name, BAD_ARGUMENT);
        };
        match stream_type {
            0 => stream.request.continue_iteration(),
            1 => stream.response.continue_iteration(),
            _ => return diag_status(s, name, BAD_ARGUMENT),
        }
        OK
    }
    def!("proxy_continue_stream", |mut c: C<'_>, st: i32| -> Res<i32> {
        Ok(continue_stream(&mut c, st, "proxy_continue_stream"))
    });
    def!("proxy_continue_request", |mut c: C<'_>| -> Res<i32> {
        Ok(continue_stream(&mut c, 0, "proxy_continue_request"))
    });
    def!("proxy_continue_response", |mut c: C<'_>| -> Res<i32> {
        Ok(continue_stream(&mut c, 1, "proxy_continue_response"))
    });
    def!("proxy_close_stream", |mut c: C<'_>, st: i32| -> Res<i32> {
        let s = c.data_mut();
        match (s.stream(), st) {
            (Some(stream), 0 | 1) => {
                stream.reset_by_filter = true;
                s.needs_settle = true;
                Ok(OK)
            }
            _ => Ok(diag_status(s, "proxy_close_stream", BAD_ARGUMENT)),
        }
    });
    def!("proxy_clear_route_cache", |_c: C<'_>| -> Res<i32> { Ok(OK) });
    def!("proxy_send_local_response", |mut c: C<'_>,
                                       status: i32,
                                       dp: i32,
                                       dl: i32,
                                       bp: i32,
                                       bl: i32,
                                       hp: i32,
                                       hl: i32,
                                       grpc: i32|
     -> Res<i32> {
        let details = read_str(&mut c, dp, dl)?;
        let body = read(&mut c, bp, bl)?;
        let hbytes = read(&mut c, hp, hl)?;
        let Some(headers) = deserialize_map(&hbytes) else {
            return Ok(SERIALIZATION_FAILURE);
        };
        let headers: Headers = headers.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect();
        let s = c.data_mut();
        let Some(stream) = s.stream() else {
            return Ok(diag_status(s, "proxy_send_local_response", BAD_ARGUMENT));
        };
        if stream.local_response.is_some() || stream.response.forwarded_headers.is_some() {
            return Ok(diag_status(s, "proxy_send_local_response (second reply)", BAD_ARGUMENT));
        }
        let status = status as u32;
        let mut resp_headers = vec![(":status".to_string(), status.to_string())];
        resp_headers.extend(headers.iter().cloned());
        stream.response.headers = resp_headers;
        stream.response.headers_present = true;
        stream.properties.insert("response.code".into(), (status as u64).to_le_bytes().to_vec());
        stream.local_response = Some(LocalResponse { status, details, headers, body, grpc_status: grpc });
        s.needs_settle = true;
        Ok(OK)
    });
    def!("proxy_http_call", |mut c: C<'_>,
                             up: i32,
                             ul: i32,
                             hp: i32,
                             hl: i32,
                             bp: i32,
                             bl: i32,
                             tp: i32,
                             tl: i32,
                             timeout: i32,
                             ret: i32|
     -> Res<i32> {
        let upstream = read_str(&mut c, up, ul)?;
        let hbytes = read(&mut c, hp, hl)?;
        let body = read(&mut c, bp, bl)?;
        let tbytes = read(&mut c, tp, tl)?;
        let (Some(headers), Some(trailers)) = (deserialize_map(&hbytes), deserialize_map(&tbytes)) else {
            return Ok(SERIALIZATION_FAILURE);
        };
        for required in [":method", ":path", ":authority"] {
            if find_header(&headers, required).is_none() {
                let s = c.data_mut();
                s.host_diag(format!(
                    "proxy_http_call to {upstream} without {required}: BadArgument (Envoy rejects it)"
                ));
                return Ok(BAD_ARGUMENT);
            }
        }
        let s = c.data();
        let sent_at_ms = s.clock.now_ns() / 1_000_000;
        let token = {
            let mut sh = lock(&s.shared);
            sh.next_token += 1;
            let token = sh.next_token;
            sh.calls.push(HttpCall {
                token,
                worker: s.worker,
                context_id: s.effective,
                upstream,
                headers,
                body,
                trailers,
                timeout_ms: timeout as u32,
                sent_at_ms,
                done: false,
                generation: s.generation,
            });
            token
        };
        write_u32(&mut c, ret, token)?;
        Ok(OK)
    });
    def!("proxy_set_effective_context", |mut c: C<'_>, id: i32| -> Res<i32> {
        let s = c.data_mut();
        let id = id as u32;
        let live = s.streams.get(&id).is_some_and(|st| !st.deleted);
        if id == s.root_id || live {
            s.effective = id;
            Ok(OK)
        } else {
            Ok(diag_status(s, "proxy_set_effective_context", BAD_ARGUMENT))
        }
    });
    def!("proxy_done", |mut c: C<'_>| -> Res<i32> {
        let s = c.data_mut();
        match s.stream() {
            Some(stream) => {
                stream.done_called = true;
                s.needs_settle = true;
                Ok(OK)
            }
            None => Ok(diag_status(s, "proxy_done", NOT_FOUND)),
        }
    });
    def!("proxy_define_metric", |mut c: C<'_>, kind: i32, np: i32, nl: i32, ret: i32| -> Res<i32> {
        let name = read_str(&mut c, np, nl)?;
        let kind = match kind {
            0 => MetricKind::Counter,
            1 => MetricKind::Gauge,
            2 => MetricKind::Histogram,
            _ => return Ok(BAD_ARGUMENT),
        };
        let id = {
            let mut sh = lock(&c.data().shared);
            match sh.metrics.iter().position(|m| m.name == name) {
                Some(i) => i + 1,
                None => {
                    sh.metrics.push(MetricData { name, kind, value: 0, recorded: Vec::new() });
                    sh.metrics.len()
                }
            }
        };
        write_u32(&mut c, ret, id as u32)?;
        Ok(OK)
    });
    def!("proxy_get_metric", |mut c: C<'_>, id: i32, ret: i32| -> Res<i32> {
        let value = {
            let sh = lock(&c.data().shared);
            match sh.metrics.get((id as u32 as usize).wrapping_sub(1)) {
                None => return Ok(NOT_FOUND),
                Some(m) if m.kind == MetricKind::Histogram => return Ok(BAD_ARGUMENT),
                Some(m) => m.value,
            }
        };
        write(&mut c, ret, &(value as u64).to_le_bytes())?;
        Ok(OK)
    });
    def!("proxy_record_metric", |c: C<'_>, id: i32, value: i64| -> Res<i32> {
        let mut sh = lock(&c.data().shared);
        let Some(m) = sh.metrics.get_mut((id as u32 as usize).wrapping_sub(1)) else {
            return Ok(NOT_FOUND);
        };
        match m.kind {
            MetricKind::Counter => m.value = m.value.wrapping_add(value),
            MetricKind::Gauge => m.value = value,
            MetricKind::Histogram => m.recorded.push(value as u64),
        }
        Ok(OK)
    });
    def!("proxy_increment_metric", |c: C<'_>, id: i32, offset: i64| -> Res<i32> {
        let mut sh = lock(&c.data().shared);
        let Some(m) = sh.metrics.get_mut((id as u32 as usize).wrapping_sub(1)) else {
            return Ok(NOT_FOUND);
        };
        match m.kind {
            MetricKind::Counter if offset < 0 => return Ok(BAD_ARGUMENT),
            MetricKind::Counter | MetricKind::Gauge => m.value = m.value.wrapping_add(offset),
            MetricKind::Histogram => return Ok(BAD_ARGUMENT),
        }
        Ok(OK)
    });
    Ok(names)
}

/// Defines a recording stub for every import of `module` that neither the proxy-wasm
/// implementation above nor `wasi.rs` provides (`implemented`: module and name).
pub(crate) fn add_stubs(
    linker: &mut Linker<VmState>,
    module: &Module,
    implemented: &[(&str, &str)],
) -> Res<Vec<String>> {
    let mut stubbed = Vec::new();
    for import in module.imports() {
        if implemented.contains(&(import.module(), import.name())) {
            continue;
        }
        let Some(ty) = import.ty().func().cloned() else {
            continue;
        };
        let label = format!("{}::{}", import.module(), import.name());
        stubbed.push(label.clone());
        let results: Vec<ValType> = ty.results().collect();
        linker.func_new(
            import.module(),
            import.name(),
            ty,
            move |mut c: C<'_>, _params: &[Val], out: &mut [Val]| {
                let msg = format!("unimplemented import {label} called (the wasm-host stubs it)");
                c.data_mut().host_diag(msg.clone());
                c.data_mut().problems.push(msg);
                for (slot, ty) in out.iter_mut().zip(&results) {
                    *slot = match ty {
                        ValType::I32 => Val::I32(UNIMPLEMENTED),
                        ValType::I64 => Val::I64(0),
                        ValType::F32 => Val::F32(0),
                        ValType::F64 => Val::F64(0),
                        _ => Val::I32(0),
                    };
                }
                Ok(())
            },
        )?;
    }
    Ok(stubbed)
}

/// Sets the HTTP-call response data visible through map types 6/7 and buffer type 4.
pub(crate) fn call_response(headers: Headers, body: Vec<u8>) -> CallResponse {
    CallResponse { headers, body, trailers: Vec::new() }
}
