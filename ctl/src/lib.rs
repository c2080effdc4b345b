//! Renders `envoy/envoy.template.yaml` into a runnable Envoy configuration. Production, the demo
//! and the tests all go through [`render`], so what is tested is what ships.
//!
//! The template has `{{placeholder}}`s, replaced by values, and optional sections: the lines
//! between `{{#name}}` and `{{/name}}` are kept when the feature `name` is on, those between
//! `{{^name}}` and `{{/name}}` when it is off. A tag alone on its line takes the line with it.

pub mod dynamic;
pub mod nginx;

use exo_lb::logic::config::Config;
use std::net::SocketAddr;

/// The template, compiled in so the tool works from anywhere.
pub const TEMPLATE: &str = include_str!("../../envoy/envoy.template.yaml");

#[derive(Debug, Clone)]
pub struct RenderOptions {
    /// The public plain-HTTP listener. With [`RenderOptions::tls`] set, it exists only to
    /// redirect to HTTPS (when [`RenderOptions::redirect_http_to_https`] is on).
    pub listen: SocketAddr,
    /// Envoy's admin interface (keep it on loopback).
    pub admin: SocketAddr,
    /// The status page listener (keep it on loopback).
    pub status: SocketAddr,
    /// Where Envoy finds `exo_lb.wasm`.
    pub wasm_path: String,
    /// The filter's JSON configuration (the node list is also the cluster's endpoints).
    pub filter_config: String,
    /// Named in the generated file's header.
    pub source: String,
    /// The longest wait for a byte from a node or a client (Envoy's stream idle timeout).
    pub idle_timeout_s: u64,
    /// Serve HTTPS (instead of plain HTTP) on `tls.listen`.
    pub tls: Option<TlsOptions>,
    /// With `tls`: answer every plain-HTTP request on `listen` with a redirect (308) to HTTPS.
    pub redirect_http_to_https: bool,
    /// Bearer keys clients must send (`Authorization: Bearer <key>`); empty: no check. The
    /// health check stays public.
    pub api_keys: Vec<String>,
    /// Browser origins allowed by CORS (`https://chat.example.com`, or `*` for any); empty: no
    /// CORS headers.
    pub cors_origins: Vec<String>,
    /// Hide the balancer's insides from clients: no `x-exo-lb-node` header (the access log still
    /// names the node), and a health check that says only `ok` or `unavailable`.
    pub hide_node_details: bool,
    /// Envoy's limits against too many, slow or forged clients (README, "Security").
    pub limits: Limits,
}

/// What Envoy allows a client, rendered into the listener and the overload manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open client connections across all listeners except the status page and admin
    /// (`envoy.resource_monitors.global_downstream_max_connections`); more are closed at once.
    pub max_connections: u64,
    /// Envoy's heap budget (`envoy.resource_monitors.fixed_heap`): at 90 % Envoy returns freed
    /// memory to the system, at 92 % it stops keep-alive, at 95 % it answers new requests 503.
    pub max_heap_mb: u64,
    /// The longest a client may take to send a whole request, body included (408 after). Not a
    /// limit on generations: it stops when the body has arrived or the response starts.
    pub request_timeout_s: u64,
    /// The longest a client may take to send the request headers (408 after).
    pub request_headers_timeout_s: u64,
    /// An idle keep-alive connection (no request in flight) is closed after this long.
    pub connection_idle_timeout_s: u64,
    /// Proxies in front of Envoy whose X-Forwarded-For entries are trusted (0: the client is
    /// the connection's peer, and X-Forwarded-For from clients is ignored).
    pub xff_num_trusted_hops: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 1024,
            max_heap_mb: 1024,
            request_timeout_s: 60,
            request_headers_timeout_s: 10,
            // nginx's keepalive_timeout.
            connection_idle_timeout_s: 75,
            xff_num_trusted_hops: 0,
        }
    }
}

impl Limits {
    fn check(&self) -> Result<(), String> {
        let within = |what: &str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(format!("{what} {v} is outside {lo}..={hi}"))
            }
        };
        within("max connections", self.max_connections, 1, 10_000_000)?;
        within("max heap (MiB)", self.max_heap_mb, 64, 1 << 20)?;
        within("request timeout (s)", self.request_timeout_s, 1, 86_400)?;
        within("request headers timeout (s)", self.request_headers_timeout_s, 1, self.request_timeout_s)?;
        within("connection idle timeout (s)", self.connection_idle_timeout_s, 1, 86_400)?;
        within("trusted X-Forwarded-For hops", u64::from(self.xff_num_trusted_hops), 0, 10)?;
        Ok(())
    }
}

/// The HTTPS listener.
#[derive(Debug, Clone)]
pub struct TlsOptions {
    pub listen: SocketAddr,
    /// PEM certificate chain, e.g. certbot's `/etc/letsencrypt/live/<domain>/fullchain.pem`.
    pub cert_path: String,
    /// PEM private key, e.g. certbot's `/etc/letsencrypt/live/<domain>/privkey.pem`.
    pub key_path: String,
    /// With the redirect: the plain-HTTP listener forwards `/.well-known/acme-challenge/` here,
    /// where `certbot certonly --standalone --http-01-address 127.0.0.1 --http-01-port <port>`
    /// answers, so certificates renew while Envoy keeps port 80.
    pub acme_challenge: Option<SocketAddr>,
}

impl TlsOptions {
    /// certbot's paths for `domain`.
    pub fn certbot(listen: SocketAddr, domain: &str) -> TlsOptions {
        TlsOptions {
            listen,
            cert_path: format!("/etc/letsencrypt/live/{domain}/fullchain.pem"),
            key_path: format!("/etc/letsencrypt/live/{domain}/privkey.pem"),
            acme_challenge: None,
        }
    }
}

/// nginx's proxy_read_timeout in the setup exo-lb replaces.
pub const DEFAULT_IDLE_TIMEOUT_S: u64 = 300;
/// Where certbot's standalone HTTP-01 server is expected in the HTTPS variant.
pub const DEFAULT_ACME_CHALLENGE: &str = "127.0.0.1:8402";
/// The domain of the committed HTTPS variant `envoy/envoy-https.yaml` (a placeholder).
pub const EXAMPLE_DOMAIN: &str = "exo-lb.example.com";

/// Reads an API key file: one key per line; blank lines and `#` comments are skipped. Keys are
/// 16 to 256 characters of `A-Z a-z 0-9 - . _ ~ + / =`. Errors name the line, never the key.
pub fn parse_api_keys(text: &str) -> Result<Vec<String>, String> {
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let key = line.trim();
        if key.is_empty() || key.starts_with('#') {
            continue;
        }
        let ok_char = |c: char| c.is_ascii_alphanumeric() || "-._~+/=".contains(c);
        if !(16..=256).contains(&key.len()) || !key.chars().all(ok_char) {
            return Err(format!(
                "line {}: an API key must be 16 to 256 characters of A-Z a-z 0-9 - . _ ~ + / = \
                 (e.g. `openssl rand -hex 24`)",
                i + 1
            ));
        }
        if !keys.iter().any(|k| k == key) {
            keys.push(key.to_string());
        }
    }
    Ok(keys)
}

fn check_origin(origin: &str) -> Result<(), String> {
    let rest = origin.strip_prefix("https://").or_else(|| origin.strip_prefix("http://"));
    let ok = origin == "*"
        || rest.is_some_and(|r| !r.is_empty() && r.chars().all(|c| c.is_ascii_alphanumeric() || "-.:[]".contains(c)));
    if ok {
        Ok(())
    } else {
        Err(format!("CORS origin '{origin}' is not `*` or scheme://host[:port] (e.g. https://chat.example.com)"))
    }
}

fn check_path(what: &str, path: &str) -> Result<(), String> {
    if path.is_empty() || path.chars().any(|c| c == '"' || c == '\\' || c.is_control()) {
        return Err(format!("{what} '{path}' is empty or has quotes, backslashes or control characters"));
    }
    Ok(())
}

/// `s` as a literal in an RE2 regex.
fn regex_escape(s: &str) -> String {
    s.chars().fold(String::new(), |mut out, c| {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
        out
    })
}

/// Keeps or drops the optional sections of `template` (see the module docs).
pub fn apply_sections(template: &str, features: &[(&str, bool)]) -> Result<String, String> {
    // A tag alone on its line (but for spaces) covers the whole line, newline included.
    fn span(s: &str, start: usize, end: usize) -> (usize, usize) {
        let line_start = s[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = s[end..].find('\n').map_or(s.len(), |i| end + i + 1);
        if s[line_start..start].trim().is_empty() && s[end..line_end].trim().is_empty() {
            (line_start, line_end)
        } else {
            (start, end)
        }
    }
    let mut out = template.to_string();
    for &(name, on) in features {
        let close = format!("{{{{/{name}}}}}");
        for (open, keep) in [(format!("{{{{#{name}}}}}"), on), (format!("{{{{^{name}}}}}"), !on)] {
            while let Some(start) = out.find(&open) {
                let inner = start + open.len();
                let end = out[inner..].find(&close).map(|i| i + inner).ok_or(format!("{open} is never closed"))?;
                let (open_start, inner_start) = span(&out, start, inner);
                let (inner_end, close_end) = span(&out, end, end + close.len());
                let kept = if keep { &out[inner_start..inner_end] } else { "" };
                out = format!("{}{}{}", &out[..open_start], kept, &out[close_end..]);
            }
        }
        if out.contains(&close) {
            return Err(format!("{close} without an opening tag"));
        }
    }
    Ok(out)
}

/// Validates the filter configuration (with the filter's own code) and renders the template.
pub fn render(template: &str, opts: &RenderOptions) -> Result<String, String> {
    let config = Config::parse(opts.filter_config.as_bytes()).map_err(|e| format!("{}: {e}", opts.source))?;
    if opts.redirect_http_to_https && opts.tls.is_none() {
        return Err("redirecting HTTP to HTTPS needs TLS (a certificate and an HTTPS listener)".into());
    }
    if let Some(tls) = &opts.tls {
        check_path("certificate path", &tls.cert_path)?;
        check_path("key path", &tls.key_path)?;
        if opts.redirect_http_to_https && tls.listen == opts.listen {
            return Err(format!("HTTP and HTTPS cannot both listen on {}", opts.listen));
        }
    }
    let keys = parse_api_keys(&opts.api_keys.join("\n"))?;
    opts.limits.check()?;
    if !config.admin_paths.is_empty() && keys.is_empty() {
        return Err(format!(
            "{}: admin_paths lets clients administer the nodes ({}): it needs API keys (--api-keys-file)",
            opts.source,
            config.admin_paths.join(", ")
        ));
    }
    for origin in &opts.cors_origins {
        check_origin(origin)?;
    }
    let indent = " ".repeat(20);
    let filter_configuration: String =
        opts.filter_config.trim().lines().map(|l| format!("{indent}{l}\n")).collect::<String>().trim_end().to_string();
    let mut endpoints = String::new();
    for node in &config.nodes {
        let addr: SocketAddr = node.address.parse().map_err(|_| format!("bad address {}", node.address))?;
        endpoints.push_str(&format!(
            "        - endpoint: {{ address: {{ socket_address: {{ address: \"{}\", port_value: {} }} }} }}  # {}\n",
            addr.ip(),
            addr.port(),
            node.name
        ));
    }
    let principals: String = keys
        .iter()
        .map(|k| {
            format!(
                "                    - header: {{ name: authorization, string_match: {{ exact: \"Bearer {k}\" }} }}\n"
            )
        })
        .collect();
    let origins: String = opts
        .cors_origins
        .iter()
        .map(|o| match o.as_str() {
            "*" => "                  - safe_regex: { regex: \".*\" }\n".to_string(),
            _ => format!("                  - exact: \"{o}\"\n"),
        })
        .collect();
    // The public listener is the HTTPS one when there is one; the plain one then only redirects.
    let public = opts.tls.as_ref().map_or(opts.listen, |t| t.listen);
    let https_port = opts.tls.as_ref().map_or(443, |t| t.listen.port());
    let acme = opts.tls.as_ref().and_then(|t| t.acme_challenge).filter(|_| opts.redirect_http_to_https);
    let replacements = [
        (
            "{{generated_notice}}",
            format!("Generated by `exo-lb-ctl render` from {}: edit that and re-render.", opts.source),
        ),
        ("{{admin_address}}", opts.admin.ip().to_string()),
        ("{{admin_port}}", opts.admin.port().to_string()),
        ("{{listen_address}}", public.ip().to_string()),
        ("{{listen_port}}", public.port().to_string()),
        ("{{http_address}}", opts.listen.ip().to_string()),
        ("{{http_port}}", opts.listen.port().to_string()),
        // Browsers and clients omit :443; another port must be named.
        (
            "{{https_port_redirect}}",
            if https_port == 443 { String::new() } else { format!("port_redirect: {https_port}, ") },
        ),
        ("{{cert_path}}", opts.tls.as_ref().map(|t| t.cert_path.clone()).unwrap_or_default()),
        ("{{key_path}}", opts.tls.as_ref().map(|t| t.key_path.clone()).unwrap_or_default()),
        ("{{acme_address}}", acme.map(|a| a.ip().to_string()).unwrap_or_default()),
        ("{{acme_port}}", acme.map(|a| a.port().to_string()).unwrap_or_default()),
        ("{{api_key_principals}}", principals.trim_end().to_string()),
        ("{{cors_origins}}", origins.trim_end().to_string()),
        ("{{status_address}}", opts.status.ip().to_string()),
        ("{{status_port}}", opts.status.port().to_string()),
        ("{{healthcheck_path}}", config.healthcheck_path.clone()),
        (
            "{{healthcheck_path_regex}}",
            format!("^{}(\\?.*)?$", regex_escape(&config.healthcheck_path)).replace('\'', "''"),
        ),
        (
            "{{stream_idle_timeout}}",
            format!("{}s", opts.idle_timeout_s.saturating_add(config.queue.timeout_ms.div_ceil(1_000))),
        ),
        ("{{idle_timeout}}", format!("{}s", opts.idle_timeout_s)),
        ("{{wasm_path}}", opts.wasm_path.clone()),
        ("{{filter_configuration}}", filter_configuration),
        ("{{endpoints}}", endpoints.trim_end().to_string()),
        ("{{max_connections}}", opts.limits.max_connections.to_string()),
        ("{{max_heap_bytes}}", opts.limits.max_heap_mb.saturating_mul(1 << 20).to_string()),
        ("{{request_timeout}}", format!("{}s", opts.limits.request_timeout_s)),
        ("{{request_headers_timeout}}", format!("{}s", opts.limits.request_headers_timeout_s)),
        ("{{connection_idle_timeout}}", format!("{}s", opts.limits.connection_idle_timeout_s)),
        ("{{xff_num_trusted_hops}}", opts.limits.xff_num_trusted_hops.to_string()),
    ];
    let mut out = template.to_string();
    for (key, value) in replacements {
        if !out.contains(key) {
            return Err(format!("the template has no {key}"));
        }
        out = out.replace(key, &value);
    }
    let out = apply_sections(
        &out,
        &[
            ("tls", opts.tls.is_some()),
            ("redirect_http_to_https", opts.redirect_http_to_https),
            ("acme_challenge", acme.is_some()),
            ("api_keys", !keys.is_empty()),
            ("cors", !opts.cors_origins.is_empty()),
            ("hide_node_details", opts.hide_node_details),
        ],
    )?;
    if let Some(pos) = out.find("{{") {
        let rest: String = out.chars().skip(pos).take(40).collect();
        return Err(format!("the template has an unknown placeholder near '{rest}'"));
    }
    Ok(out)
}

/// The production defaults; the caller supplies `filter_config` (and whatever differs).
impl Default for RenderOptions {
    fn default() -> RenderOptions {
        RenderOptions {
            listen: SocketAddr::from(([0, 0, 0, 0], 80)),
            admin: SocketAddr::from(([127, 0, 0, 1], 9901)),
            status: SocketAddr::from(([127, 0, 0, 1], 8080)),
            wasm_path: "target/wasm32-wasip1/release/exo_lb.wasm".to_string(),
            filter_config: String::new(),
            source: "envoy/exo-lb.json".to_string(),
            idle_timeout_s: DEFAULT_IDLE_TIMEOUT_S,
            tls: None,
            redirect_http_to_https: false,
            api_keys: Vec::new(),
            cors_origins: Vec::new(),
            hide_node_details: false,
            limits: Limits::default(),
        }
    }
}

/// The options of the committed production file `envoy/envoy.yaml`: plain HTTP on :80.
pub fn production_options(filter_config: String) -> RenderOptions {
    RenderOptions { filter_config, ..RenderOptions::default() }
}

/// The committed HTTPS variant, rendered by `render-production` beside `envoy/envoy.yaml`.
pub const HTTPS_VARIANT: &str = "envoy/envoy-https.yaml";
/// The (public, example) key file the HTTPS variant is rendered with.
pub const EXAMPLE_API_KEYS: &str = "envoy/api-keys.example";

/// The options of the committed HTTPS variant `envoy/envoy-https.yaml`: HTTPS on :443 with
/// certbot's certificate for [`EXAMPLE_DOMAIN`], :80 redirecting (and forwarding ACME challenges
/// to certbot), API keys, and node details hidden. Not CORS: that depends on the web app.
pub fn production_https_options(filter_config: String, api_keys: Vec<String>) -> RenderOptions {
    RenderOptions {
        filter_config,
        tls: Some(TlsOptions {
            acme_challenge: DEFAULT_ACME_CHALLENGE.parse().ok(),
            ..TlsOptions::certbot(SocketAddr::from(([0, 0, 0, 0], 443)), EXAMPLE_DOMAIN)
        }),
        redirect_http_to_https: true,
        api_keys,
        hide_node_details: true,
        ..RenderOptions::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(filter_config: &str) -> RenderOptions {
        RenderOptions {
            wasm_path: "exo_lb.wasm".into(),
            filter_config: filter_config.into(),
            source: "test.json".into(),
            ..RenderOptions::default()
        }
    }

    const ONE_NODE: &str = r#"{"nodes":[{"name":"rk1","address":"10.1.0.1:52415"}]}"#;

    fn parse(yaml: &str) -> serde_yaml_ng::Value {
        serde_yaml_ng::from_str(yaml).unwrap_or_else(|e| panic!("not YAML ({e}):\n{yaml}"))
    }

    fn http_filters(yaml: &str) -> Vec<String> {
        let doc = parse(yaml);
        doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn endpoints_come_from_the_node_list() {
        let out = render(
            TEMPLATE,
            &opts(r#"{"nodes":[{"name":"rk1","address":"10.1.0.1:52415"},{"name":"rk2","address":"[fd00::2]:8000"}]}"#),
        )
        .unwrap();
        assert!(out.contains(r#"address: "10.1.0.1", port_value: 52415 } } }  # rk1"#), "{out}");
        assert!(out.contains(r#"address: "fd00::2", port_value: 8000 } } }  # rk2"#));
        assert!(out.contains("\"name\":\"rk1\""));
        assert!(!out.contains("{{"));
    }

    #[test]
    fn invalid_filter_config_is_refused_with_the_field() {
        let e = render(TEMPLATE, &opts(r#"{"nodes":[{"name":"rk1","address":"rk1.local:52415"}]}"#)).unwrap_err();
        assert!(e.contains("nodes[0].address"), "{e}");
    }

    #[test]
    fn sections_are_kept_or_dropped_with_their_lines() {
        let t = "a\n  {{#x}}\nin x\n  {{/x}}\nb {{^x}}not x{{/x}} c\n{{#y}}\ny\n{{/y}}\nd\n";
        assert_eq!(apply_sections(t, &[("x", true), ("y", false)]).unwrap(), "a\nin x\nb  c\nd\n");
        assert_eq!(apply_sections(t, &[("x", false), ("y", true)]).unwrap(), "a\nb not x c\ny\nd\n");
        // Different sections nest.
        let nested = "{{#x}}\n1\n{{#y}}\n2\n{{/y}}\n{{/x}}\n";
        assert_eq!(apply_sections(nested, &[("x", true), ("y", false)]).unwrap(), "1\n");
        assert_eq!(apply_sections(nested, &[("x", false), ("y", true)]).unwrap(), "");
        assert!(apply_sections("{{#x}} open", &[("x", true)]).unwrap_err().contains("never closed"));
        assert!(apply_sections("stray {{/x}}", &[("x", true)]).unwrap_err().contains("without an opening"));
    }

    #[test]
    fn the_default_rendering_has_no_optional_features() {
        let out = render(TEMPLATE, &opts(ONE_NODE)).unwrap();
        for absent in ["transport_socket", "rbac", "cors", "header_to_metadata", "https_redirect", "acme"] {
            assert!(!out.contains(absent), "{absent} in the default rendering");
        }
        assert_eq!(http_filters(&out), ["envoy.filters.http.wasm", "envoy.filters.http.router"]);
        assert!(out.contains(r#"node: "%RESP(X-EXO-LB-NODE)%""#));
    }

    fn everything() -> RenderOptions {
        RenderOptions {
            listen: "0.0.0.0:80".parse().unwrap(),
            tls: Some(TlsOptions {
                acme_challenge: Some(DEFAULT_ACME_CHALLENGE.parse().unwrap()),
                ..TlsOptions::certbot("0.0.0.0:443".parse().unwrap(), "lb.example.org")
            }),
            redirect_http_to_https: true,
            api_keys: vec!["0123456789abcdef0123".into(), "sk-another-key-of-16+".into()],
            cors_origins: vec!["https://chat.example.org".into(), "*".into()],
            hide_node_details: true,
            ..opts(ONE_NODE)
        }
    }

    #[test]
    fn every_feature_renders_to_valid_yaml_with_auth_before_the_filter() {
        let out = render(TEMPLATE, &everything()).unwrap();
        assert!(!out.contains("{{"), "{out}");
        let doc = parse(&out);
        let listeners = doc["static_resources"]["listeners"].as_sequence().unwrap();
        let names: Vec<_> = listeners.iter().map(|l| l["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["exo_lb", "exo_lb_http", "exo_lb_status"]);
        assert_eq!(listeners[0]["address"]["socket_address"]["port_value"].as_u64(), Some(443));
        assert_eq!(listeners[1]["address"]["socket_address"]["port_value"].as_u64(), Some(80));
        let tls = &listeners[0]["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"];
        assert_eq!(
            tls["tls_certificates"][0]["certificate_chain"]["filename"].as_str(),
            Some("/etc/letsencrypt/live/lb.example.org/fullchain.pem")
        );
        // Unauthenticated requests never reach the exo-lb filter: auth comes first. CORS comes
        // before auth so that browsers' preflights (which carry no key) are answered.
        assert_eq!(
            http_filters(&out),
            [
                "envoy.filters.http.cors",
                "envoy.filters.http.rbac",
                "envoy.filters.http.header_to_metadata",
                "envoy.filters.http.wasm",
                "envoy.filters.http.router"
            ]
        );
        assert!(out.contains(r#"exact: "Bearer 0123456789abcdef0123""#));
        assert!(out.contains(r#"- exact: "https://chat.example.org""#));
        assert!(out.contains(r#"node: "%DYNAMIC_METADATA(exo_lb:node)%""#));
        assert!(out.contains("'^/healthcheck(\\?.*)?$'"), "{out}");
        assert!(out.contains("https_redirect: true"));
        assert!(!out.contains("port_redirect"), "443 is implied");
        let acme =
            doc["static_resources"]["clusters"].as_sequence().unwrap().iter().any(|c| c["name"] == "acme_challenge");
        assert!(acme);
    }

    #[test]
    fn options_are_checked() {
        let e = render(TEMPLATE, &RenderOptions { redirect_http_to_https: true, ..opts(ONE_NODE) }).unwrap_err();
        assert!(e.contains("needs TLS"), "{e}");
        let e = render(TEMPLATE, &RenderOptions { api_keys: vec!["short".into()], ..opts(ONE_NODE) }).unwrap_err();
        assert!(e.contains("16 to 256") && !e.contains("short"), "the key is not echoed: {e}");
        let e = render(TEMPLATE, &RenderOptions { api_keys: vec!["a\"quote-in-the-key-x".into()], ..opts(ONE_NODE) })
            .unwrap_err();
        assert!(e.contains("API key"), "{e}");
        let e = render(TEMPLATE, &RenderOptions { cors_origins: vec!["chat.example.org".into()], ..opts(ONE_NODE) })
            .unwrap_err();
        assert!(e.contains("CORS origin"), "{e}");
        let mut tls = everything();
        tls.tls.as_mut().unwrap().key_path = "/etc/\"x".into();
        assert!(render(TEMPLATE, &tls).unwrap_err().contains("key path"));
        assert_eq!(
            parse_api_keys("# comment\n\n  0123456789abcdef  \n0123456789abcdef\n").unwrap(),
            ["0123456789abcdef"]
        );
    }

    #[test]
    fn hardening_is_rendered() {
        let out = render(TEMPLATE, &everything()).unwrap();
        let doc = parse(&out);
        let hcm = &doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
        for (key, want) in [
            ("normalize_path", "true"),
            ("merge_slashes", "true"),
            ("path_with_escaped_slashes_action", "REJECT_REQUEST"),
            ("use_remote_address", "true"),
            ("xff_num_trusted_hops", "0"),
            ("preserve_external_request_id", "false"),
            ("request_timeout", "60s"),
            ("request_headers_timeout", "10s"),
        ] {
            let got = serde_yaml_ng::to_string(&hcm[key]).unwrap();
            assert_eq!(got.trim(), want, "{key}");
        }
        assert_eq!(hcm["common_http_protocol_options"]["idle_timeout"].as_str(), Some("75s"));
        let om = &doc["overload_manager"];
        assert_eq!(
            om["resource_monitors"][0]["typed_config"]["max_active_downstream_connections"].as_u64(),
            Some(1024)
        );
        assert_eq!(om["resource_monitors"][1]["typed_config"]["max_heap_size_bytes"].as_u64(), Some(1 << 30));
        // The health check's exemption from the key check is for GET and HEAD only.
        let routes = &hcm["route_config"]["virtual_hosts"][0]["routes"];
        let health = routes.as_sequence().unwrap().iter().find(|r| r["match"]["path"] == "/healthcheck").unwrap();
        assert_eq!(health["match"]["headers"][0]["name"], ":method");
        assert!(health["typed_per_filter_config"]["envoy.filters.http.rbac"].is_mapping());

        let custom = RenderOptions {
            limits: Limits {
                max_connections: 10,
                max_heap_mb: 256,
                request_timeout_s: 5,
                request_headers_timeout_s: 2,
                connection_idle_timeout_s: 30,
                xff_num_trusted_hops: 1,
            },
            ..opts(ONE_NODE)
        };
        let out = render(TEMPLATE, &custom).unwrap();
        for text in ["max_active_downstream_connections: 10", "max_heap_size_bytes: 268435456", "request_timeout: 5s"] {
            assert!(out.contains(text), "{text}");
        }
        assert!(out.contains("xff_num_trusted_hops: 1\n"));
        let bad = Limits { request_headers_timeout_s: 9, request_timeout_s: 5, ..Limits::default() };
        let e = render(TEMPLATE, &RenderOptions { limits: bad, ..opts(ONE_NODE) }).unwrap_err();
        assert!(e.contains("request headers timeout"), "{e}");
    }

    #[test]
    fn admin_paths_need_api_keys() {
        let cfg = r#"{"nodes":[{"name":"rk1","address":"10.1.0.1:52415"}],"admin_paths":["/quit"]}"#;
        let e = render(TEMPLATE, &opts(cfg)).unwrap_err();
        assert!(e.contains("admin_paths") && e.contains("API keys"), "{e}");
        let keyed = RenderOptions { api_keys: vec!["0123456789abcdef0123".into()], ..opts(cfg) };
        assert!(render(TEMPLATE, &keyed).is_ok());
    }

    #[test]
    fn https_on_another_port_redirects_to_it() {
        let o = RenderOptions {
            listen: "127.0.0.1:8080".parse().unwrap(),
            tls: Some(TlsOptions::certbot("127.0.0.1:8443".parse().unwrap(), "x")),
            redirect_http_to_https: true,
            ..opts(ONE_NODE)
        };
        let out = render(TEMPLATE, &o).unwrap();
        assert!(out.contains("port_redirect: 8443"));
        assert!(!out.contains("acme_challenge"), "no ACME forwarding unless asked");
    }

    #[test]
    fn committed_production_configs_are_the_rendered_ones() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let source = std::fs::read_to_string(format!("{root}/envoy/exo-lb.json")).unwrap();
        let keys = std::fs::read_to_string(format!("{root}/{EXAMPLE_API_KEYS}")).unwrap();
        for (file, opts) in [
            ("envoy/envoy.yaml", production_options(source.clone())),
            (HTTPS_VARIANT, production_https_options(source, parse_api_keys(&keys).unwrap())),
        ] {
            let committed = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
            let rendered = render(TEMPLATE, &opts).unwrap();
            assert!(committed == rendered, "{file} is stale: run `cargo run -p exo-lb-ctl -- render-production`");
        }
    }
}
