//! The least a body-routing filter does: pause on headers, buffer the body, read it, set the
//! destination header, continue. The floor under exo-lb's per-request cost.
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { first: Rc::new(String::new()), host_calls: 0 })
    });
}}

struct Root {
    first: Rc<String>,
    /// Extra host calls per request (`"host_calls": N` in the configuration): measures what
    /// one costs.
    host_calls: u32,
}
impl Context for Root {}
impl RootContext for Root {
    fn on_configure(&mut self, _: usize) -> bool {
        let cfg =
            hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX).ok().flatten().unwrap_or_default();
        let s = String::from_utf8_lossy(&cfg);
        let key = "\"address\"";
        let first = s.find(key).and_then(|i| s[i + key.len()..].split('"').nth(1)).unwrap_or("").to_string();
        self.first = Rc::new(first);
        let key = "\"host_calls\":";
        self.host_calls = s
            .find(key)
            .map(|i| s[i + key.len()..].trim_start().chars().take_while(char::is_ascii_digit).collect::<String>())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        true
    }
    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream { first: self.first.clone(), host_calls: self.host_calls }))
    }
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
struct Stream {
    first: Rc<String>,
    host_calls: u32,
}
impl Context for Stream {}
impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _: usize, eos: bool) -> Action {
        if eos {
            Action::Continue
        } else {
            Action::Pause
        }
    }
    fn on_http_request_body(&mut self, size: usize, eos: bool) -> Action {
        if !eos {
            return Action::Pause;
        }
        let body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size).ok().flatten().unwrap_or_default();
        for _ in 0..self.host_calls {
            let _ = hostcalls::get_property(vec!["request", "path"]);
        }
        if body.windows(7).any(|w| w == b"\"model\"") {
            let _ = hostcalls::set_map_value(
                MapType::HttpRequestHeaders,
                "x-gateway-destination-endpoint",
                Some(&self.first),
            );
        }
        Action::Continue
    }
}
