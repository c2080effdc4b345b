//! Renders an nginx.conf for nginx with Kong's ngx_wasm_module from the same filter
//! configuration that `render` turns into Envoy's (`exo-lb-ctl render-nginx`).
//!
//! How the rendered file expects the filter to route (docs/nginx.md): the filter sets the request
//! header `x-gateway-destination-endpoint` to its ranked `ip:port` list, as for Envoy. One `map`
//! turns the list's first two entries into the name of an `upstream` block: for each ordered pair
//! of nodes (A, B) `exo_lb_A_then_B` has A as its server and B as a `backup`, so that nginx itself
//! fails over from A to B (`proxy_next_upstream`) inside the same request. The request never
//! leaves its location: an `error_page` redirect would make ngx_wasm_module drop the filter's
//! stream context (no response headers, `on_log` or `on_done` for it: observed). A list of one
//! node maps to that node's own upstream. The map never yields an empty value (an empty
//! `proxy_pass` address crashed ngx_wasm_module's worker): anything else maps to
//! `exo_lb_unrouted`, an upstream whose only server is `down` (nginx answers 502 without
//! connecting).

use exo_lb::logic::config::Config;
use std::fmt::Write as _;
use std::net::SocketAddr;

/// Attempts per request: the filter's first node, then its second (nginx orders a primary and
/// one backup exactly; Envoy tries up to three).
pub const MAX_ATTEMPTS: usize = 2;
/// The upstream every map falls back to: no live server, so nginx answers 502 at once.
pub const UNROUTED: &str = "exo_lb_unrouted";
/// Where the filter routes a request it answers with an error once the body was read (its
/// `platform::RELAY_DESTINATION`), and the upstream that leads to the status listener.
pub const RELAY_DESTINATION: &str = "exo-lb-reply";
pub const RELAY_UPSTREAM: &str = "exo_lb_reply";
/// Client limits, the same as the Envoy configuration's defaults.
pub const MAX_CONNECTIONS: u64 = 1024;
pub const CLIENT_HEADER_TIMEOUT_S: u64 = 10;
pub const CLIENT_BODY_TIMEOUT_S: u64 = 60;
pub const KEEPALIVE_TIMEOUT_S: u64 = 75;
/// The module name in `wasm { module ... }` and `proxy_wasm`.
pub const MODULE_NAME: &str = "exo_lb";
/// nginx's variable for the filter's request header with the ranked endpoint list.
pub const DESTINATION_VARIABLE: &str = "$http_x_gateway_destination_endpoint";
/// Set to `status` on the status listener (`set $exo_lb_role status;`), to `balancer` on the
/// public one: nginx has no named root ids (`plugin_root_id` is a number), so the filter can read
/// the property `ngx.exo_lb_role` instead.
pub const ROLE_VARIABLE: &str = "exo_lb_role";

#[derive(Debug, Clone)]
pub struct NginxOptions {
    /// The public listener.
    pub listen: SocketAddr,
    /// The local status listener: nginx's stub_status at /nginx_status, the filter's /status.
    pub status: SocketAddr,
    /// Where nginx finds exo_lb.wasm.
    pub wasm_path: String,
    /// The filter's JSON configuration.
    pub filter_config: String,
    /// Named in the header and in errors.
    pub source: String,
    /// proxy_read_timeout / proxy_send_timeout (seconds without a byte from a node).
    pub idle_timeout_s: u64,
    /// Directory of error.log and access.log; relative paths are under nginx's prefix (-p).
    pub log_dir: String,
}

impl Default for NginxOptions {
    fn default() -> NginxOptions {
        NginxOptions {
            listen: "0.0.0.0:80".parse().expect("address"),
            status: "127.0.0.1:8080".parse().expect("address"),
            wasm_path: "target/wasm32-wasip1/release/exo_lb.wasm".into(),
            filter_config: String::new(),
            source: "exo-lb.json".into(),
            idle_timeout_s: crate::DEFAULT_IDLE_TIMEOUT_S,
            log_dir: "logs".into(),
        }
    }
}

/// A path as an nginx directive argument: refused if nginx would split or misread it.
fn check_conf_path(what: &str, path: &str) -> Result<(), String> {
    if path.is_empty() || path.chars().any(|c| c.is_whitespace() || c.is_control() || "\"';{}$\\#".contains(c)) {
        return Err(format!("{what} '{path}' is empty or has spaces, quotes, ;, {{}}, $, # or backslashes"));
    }
    Ok(())
}

/// `s` with the JSON whitespace outside strings removed (one line for the directive).
fn minify_json(s: &str) -> String {
    let (mut out, mut in_string, mut escaped) = (String::with_capacity(s.len()), false, false);
    for c in s.chars() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !c.is_whitespace() {
            out.push(c);
        }
    }
    out
}

/// `s` inside an nginx single-quoted string.
fn nginx_single_quoted(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// `s` as a literal in a PCRE regex.
fn regex_escape(s: &str) -> String {
    s.chars().fold(String::new(), |mut out, c| {
        if "\\.+*?()|[]{}^$:".contains(c) {
            out.push('\\');
        }
        out.push(c);
        out
    })
}

/// The upstream block for a node (names are `A-Z a-z 0-9 - _ .`, checked by the filter's parser).
fn upstream_name(node_name: &str) -> String {
    format!("exo_lb_node_{node_name}")
}

/// The upstream for "`first`, then `second`".
fn pair_name(first: &str, second: &str) -> String {
    format!("exo_lb_{first}_then_{second}")
}

/// The map variable with the upstream for the filter's choice.
pub const ROUTE_VARIABLE: &str = "exo_lb_upstream";

/// Renders nginx.conf (see the module docs). Errors name the configuration and its field.
pub fn render_nginx(opts: &NginxOptions) -> Result<String, String> {
    let config = Config::parse(opts.filter_config.as_bytes()).map_err(|e| format!("{}: {e}", opts.source))?;
    if !config.admin_paths.is_empty() {
        return Err(format!(
            "{}: admin_paths: render-nginx has no API keys, and admin_paths would let any client \
             administer the nodes ({}); remove it, or use `render` (Envoy) with --api-keys-file",
            opts.source,
            config.admin_paths.join(", ")
        ));
    }
    check_conf_path("wasm path", &opts.wasm_path)?;
    check_conf_path("log directory", &opts.log_dir)?;
    if opts.listen == opts.status {
        return Err(format!("--listen and --status are both {}", opts.listen));
    }
    if !(1..=86_400).contains(&opts.idle_timeout_s) {
        return Err(format!("idle timeout {} s is outside 1..=86400", opts.idle_timeout_s));
    }
    // Above the filter's limit, so that the filter sees an oversized body and answers with its
    // own JSON error instead of nginx's HTML 413. The whole allowed body stays in memory: the
    // filter reads it from nginx's buffers.
    let body_limit = config.max_body_bytes.saturating_add(1 << 20);
    let log_dir = opts.log_dir.trim_end_matches('/');
    let log_dir = if log_dir.is_empty() { "/" } else { log_dir };
    let filter_json = nginx_single_quoted(&minify_json(opts.filter_config.trim()));

    let mut o = String::new();
    let w = &mut o;
    let _ = writeln!(w, "# nginx + ngx_wasm_module configuration for exo-lb, generated by `exo-lb-ctl render-nginx`");
    let _ = writeln!(w, "# from {}. Edit that file and re-render; do not edit this one.", opts.source);
    let _ = writeln!(w, "#");
    let _ = writeln!(w, "# Run: .nginx-wasm/sbin/nginx -p <dir> -c <this file>   (relative paths are under <dir>;");
    let _ = writeln!(w, "# create <dir>/{log_dir} first when it is relative). Test: nginx -t -p <dir> -c <this file>.");
    let _ = writeln!(w);
    let _ = writeln!(w, "# One worker is plenty for a handful of nodes; the filter's state is in shm_kv either way.");
    let _ = writeln!(w, "worker_processes 1;");
    let _ = writeln!(w, "error_log {log_dir}/error.log notice;");
    let _ = writeln!(w, "pid {log_dir}/nginx.pid;");
    let _ = writeln!(w);
    let _ = writeln!(w, "events {{");
    let _ = writeln!(w, "    worker_connections {MAX_CONNECTIONS};");
    let _ = writeln!(w, "}}");
    let _ = writeln!(w);
    let _ = writeln!(w, "wasm {{");
    let _ = writeln!(w, "    module {MODULE_NAME} {};", opts.wasm_path);
    let _ = writeln!(w, "    # The filter's shared state (node states, in-flight, queue), compare-and-swap updated.");
    let _ = writeln!(w, "    shm_kv * 4m;");
    // Queued requests wait on a dispatch timer that expires by design: its timeouts are not
    // errors worth a log line each.
    let _ = writeln!(w, "    proxy_wasm_log_dispatch_errors off;");
    let _ = writeln!(w, "}}");
    let _ = writeln!(w);
    let _ = writeln!(w, "http {{");
    let _ = writeln!(w, "    server_tokens off;");
    let _ = writeln!(w, "    default_type application/octet-stream;");
    let _ = writeln!(w, "    # Client limits like Envoy's (README, \"Security\").");
    let _ = writeln!(w, "    client_header_timeout {CLIENT_HEADER_TIMEOUT_S}s;");
    let _ = writeln!(w, "    client_body_timeout {CLIENT_BODY_TIMEOUT_S}s;");
    let _ = writeln!(w, "    keepalive_timeout {KEEPALIVE_TIMEOUT_S}s;");
    let _ = writeln!(w, "    send_timeout {}s;", opts.idle_timeout_s);
    let _ = writeln!(w);
    let _ = writeln!(w, "    # One JSON line per request: the model the filter read from the body, the node that");
    let _ =
        writeln!(w, "    # answered (from the last upstream address), the filter's ranked list. No request headers");
    let _ = writeln!(w, "    # such as Authorization.");
    let _ = writeln!(w, "    log_format exo_lb escape=json");
    let _ = writeln!(
        w,
        "        '{{\"time\":\"$time_iso8601\",\"client\":\"$remote_addr\",\"method\":\"$request_method\",'"
    );
    let _ = writeln!(
        w,
        "        '\"path\":\"$request_uri\",\"model\":\"$http_x_exo_lb_model\",\"node\":\"$exo_lb_node\",'"
    );
    let _ = writeln!(
        w,
        "        '\"upstream\":\"$upstream_addr\",\"route\":\"{DESTINATION_VARIABLE}\",\"status\":\"$status\",'"
    );
    let _ = writeln!(w, "        '\"upstream_status\":\"$upstream_status\",\"bytes_in\":\"$request_length\",\"bytes_out\":\"$bytes_sent\",'");
    let _ = writeln!(w, "        '\"ttfb_s\":\"$upstream_header_time\",\"duration_s\":\"$request_time\",\"request_id\":\"$request_id\"}}';");
    let _ = writeln!(w, "    access_log {log_dir}/access.log exo_lb;");
    let _ = writeln!(w);

    // Upstreams named by the map below: connections are kept alive, and proxy_pass to a
    // variable naming an upstream needs no resolver. max_fails=0: the filter, not nginx, decides
    // whether a node is up.
    let _ = writeln!(w, "    # One upstream per node, and one per ordered pair of nodes (the filter's first and");
    let _ = writeln!(w, "    # second choice: nginx tries the backup when the first cannot be reached).");
    for node in &config.nodes {
        let _ = writeln!(w, "    upstream {} {{", upstream_name(&node.name));
        let _ = writeln!(w, "        server {} max_fails=0;", node.address);
        let _ = writeln!(w, "        keepalive 8;");
        let _ = writeln!(w, "    }}");
    }
    for first in &config.nodes {
        for second in config.nodes.iter().filter(|n| n.name != first.name) {
            let _ = writeln!(w, "    upstream {} {{", pair_name(&first.name, &second.name));
            let _ = writeln!(w, "        server {} max_fails=0;", first.address);
            let _ = writeln!(w, "        server {} max_fails=0 backup;", second.address);
            let _ = writeln!(w, "        keepalive 8;");
            let _ = writeln!(w, "    }}");
        }
    }
    let _ = writeln!(w, "    # Where a request goes when the filter named no node: nowhere (502 without connecting).");
    let _ = writeln!(w, "    upstream {UNROUTED} {{");
    let _ = writeln!(w, "        server 127.0.0.1:9 down;");
    let _ = writeln!(w, "    }}");
    let _ = writeln!(w);
    let _ = writeln!(w, "    # Errors the filter decides once it has read a request's body: ngx_wasm_module ignores a");
    let _ = writeln!(w, "    # reply sent then, so the filter relays it through the status listener, whose filter");
    let _ = writeln!(w, "    # answers it (as JSON, with the status it was given).");
    let _ = writeln!(w, "    upstream {RELAY_UPSTREAM} {{");
    let _ = writeln!(w, "        server {};", opts.status);
    let _ = writeln!(w, "        keepalive 2;");
    let _ = writeln!(w, "    }}");
    let _ = writeln!(w, "    # The filter's choice: the first two entries of its ranked ip:port list -> upstream.");
    let _ = writeln!(w, "    # Never empty: an empty proxy_pass address crashes ngx_wasm_module's worker.");
    let _ = writeln!(w, "    map {DESTINATION_VARIABLE} ${ROUTE_VARIABLE} {{");
    for first in &config.nodes {
        for second in config.nodes.iter().filter(|n| n.name != first.name) {
            let _ = writeln!(
                w,
                "        \"~^\\s*{}\\s*,\\s*{}\\s*(,|$)\" {};",
                regex_escape(&first.address),
                regex_escape(&second.address),
                pair_name(&first.name, &second.name)
            );
        }
    }
    for node in &config.nodes {
        let _ = writeln!(w, "        \"~^\\s*{}\\s*$\" {};", regex_escape(&node.address), upstream_name(&node.name));
    }
    let _ = writeln!(w, "        {RELAY_DESTINATION} {RELAY_UPSTREAM};");
    let _ = writeln!(w, "        default {UNROUTED};");
    let _ = writeln!(w, "    }}");
    let _ =
        writeln!(w, "    # The node that answered, for the access log: the last address of $upstream_addr, when its");
    let _ =
        writeln!(w, "    # response headers arrived (a number as the last $upstream_header_time; \"-\": not reached).");
    let _ = writeln!(w, "    map \"$upstream_header_time|$upstream_addr\" $exo_lb_node {{");
    for node in &config.nodes {
        let _ = writeln!(w, "        \"~[0-9.]\\|(?:.*\\s)?{}$\" {};", regex_escape(&node.address), node.name);
    }
    let _ = writeln!(w, "        default \"\";");
    let _ = writeln!(w, "    }}");
    let _ = writeln!(w, "    # Keep-alive to the nodes, except for websocket upgrades (exo's web UI).");
    let _ = writeln!(w, "    map $http_upgrade $exo_lb_connection {{");
    let _ = writeln!(w, "        default upgrade;");
    let _ = writeln!(w, "        \"\" \"\";");
    let _ = writeln!(w, "    }}");
    let _ = writeln!(w);

    // The public server.
    let _ = writeln!(w, "    server {{");
    let _ = writeln!(w, "        listen {};", opts.listen);
    let _ = writeln!(
        w,
        "        # Which listener the filter serves (property ngx.{ROLE_VARIABLE}): set at server level, so"
    );
    let _ =
        writeln!(w, "        # that it is set before the filter's request headers callback (location rewrite phase).");
    let _ = writeln!(w, "        set ${ROLE_VARIABLE} balancer;");
    let _ = writeln!(w, "        # The filter answers 413 itself above max_body_bytes ({}).", config.max_body_bytes);
    let _ = writeln!(w, "        client_max_body_size {body_limit};");
    let _ = writeln!(w, "        client_body_buffer_size {body_limit};");
    let _ = writeln!(w);
    let _ = writeln!(w, "        # Streams (SSE) flow unbuffered; long generations may be silent for a while.");
    let _ = writeln!(w, "        proxy_http_version 1.1;");
    let _ = writeln!(w, "        proxy_buffering off;");
    let _ = writeln!(w, "        proxy_cache off;");
    let _ = writeln!(w, "        chunked_transfer_encoding on;");
    let _ = writeln!(w, "        proxy_connect_timeout 10s;");
    let _ = writeln!(w, "        proxy_read_timeout {}s;", opts.idle_timeout_s);
    let _ = writeln!(w, "        proxy_send_timeout {}s;", opts.idle_timeout_s);
    let _ = writeln!(w, "        # Fail-over to the backup (the filter's second node) only when the request never");
    let _ =
        writeln!(w, "        # reached the first: nginx re-sends a POST only if it was not sent (no non_idempotent).");
    let _ = writeln!(w, "        proxy_next_upstream error timeout http_502 http_504;");
    let _ = writeln!(w, "        proxy_next_upstream_tries {MAX_ATTEMPTS};");
    let _ = writeln!(w, "        proxy_set_header Host $http_host;");
    let _ = writeln!(w, "        proxy_set_header X-Real-IP $remote_addr;");
    let _ = writeln!(w, "        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;");
    let _ = writeln!(w, "        proxy_set_header X-Forwarded-Proto $scheme;");
    let _ = writeln!(w, "        proxy_set_header X-Request-Id $request_id;");
    let _ = writeln!(w, "        proxy_set_header Upgrade $http_upgrade;");
    let _ = writeln!(w, "        proxy_set_header Connection $exo_lb_connection;");
    let _ = writeln!(w, "        # The filter's routing headers stay inside the balancer.");
    let _ = writeln!(w, "        proxy_set_header X-Gateway-Destination-Endpoint \"\";");
    let _ = writeln!(w, "        proxy_set_header X-Envoy-Max-Retries \"\";");
    let _ = writeln!(w, "        proxy_set_header X-Exo-Lb-Model \"\";");
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "        # Everything goes through the filter: /v1/ (routed by model), {} and /v1/models",
        config.healthcheck_path
    );
    let _ = writeln!(w, "        # (answered by the filter), exo's web UI and older paths. No error_page here: its");
    let _ = writeln!(w, "        # internal redirect would cut the filter off from the rest of the request.");
    let _ = writeln!(w, "        location / {{");
    let _ = writeln!(w, "            proxy_wasm {MODULE_NAME} {filter_json};");
    let _ = writeln!(w, "            proxy_pass http://${ROUTE_VARIABLE};");
    let _ = writeln!(w, "        }}");
    let _ = writeln!(w, "        # A body above client_max_body_size is refused by nginx before the filter sees it:");
    let _ = writeln!(w, "        # the filter's JSON, from nginx. (Safe as an error_page: such a request was never");
    let _ = writeln!(w, "        # routed, so the filter holds nothing for it.)");
    let _ = writeln!(w, "        error_page 413 = @exo_lb_too_large;");
    let _ = writeln!(w, "        location @exo_lb_too_large {{");
    let _ = writeln!(w, "            default_type application/json;");
    let _ = writeln!(
        w,
        "            return 413 '{{\"error\":{{\"message\":\"The request body is larger than the limit of {} bytes.\",\"type\":\"invalid_request_error\",\"code\":\"request_too_large\",\"request_id\":\"$request_id\"}}}}';",
        config.max_body_bytes
    );
    let _ = writeln!(w, "        }}");
    let _ = writeln!(w, "    }}");
    let _ = writeln!(w);

    // The status server.
    let _ = writeln!(w, "    # Status, like the seed's: never on a public address.");
    let _ = writeln!(w, "    server {{");
    let _ = writeln!(w, "        listen {};", opts.status);
    let _ = writeln!(w, "        set ${ROLE_VARIABLE} status;");
    let _ = writeln!(w, "        # Errors relayed from the balancer arrive with the request's body (up to its limit).");
    let _ = writeln!(w, "        client_max_body_size {body_limit};");
    let _ = writeln!(w, "        access_log off;");
    let _ = writeln!(w, "        default_type application/json;");
    let _ = writeln!(w, "        location = /nginx_status {{");
    let _ = writeln!(w, "            stub_status;");
    let _ = writeln!(w, "        }}");
    let _ = writeln!(w, "        # The filter's own status page (GET /status) and {}.", config.healthcheck_path);
    let _ = writeln!(w, "        location / {{");
    let _ = writeln!(w, "            proxy_wasm {MODULE_NAME} {filter_json};");
    let _ =
        writeln!(w, "            # Not `return` or try_files: they answer before the filter's own reply (sent from");
    let _ = writeln!(w, "            # the content phase). What the filter does not answer goes nowhere: not found.");
    let _ = writeln!(w, "            proxy_pass http://{UNROUTED};");
    let _ = writeln!(w, "            error_page 502 504 = @exo_lb_not_found;");
    let _ = writeln!(w, "        }}");
    let _ = writeln!(w, "        location @exo_lb_not_found {{");
    let _ = writeln!(
        w,
        "            return 404 '{{\"error\":\"not found: try /status, {} or /nginx_status\"}}';",
        config.healthcheck_path
    );
    let _ = writeln!(w, "        }}");
    let _ = writeln!(w, "    }}");
    let _ = writeln!(w, "}}");
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../envoy/exo-lb.json");

    fn opts(config: &str) -> NginxOptions {
        NginxOptions { filter_config: config.into(), source: "test.json".into(), ..NginxOptions::default() }
    }

    fn render_example() -> String {
        render_nginx(&opts(EXAMPLE)).unwrap()
    }

    #[test]
    fn has_the_wasm_module_and_filter_with_its_configuration() {
        let conf = render_example();
        assert!(conf.contains("module exo_lb target/wasm32-wasip1/release/exo_lb.wasm;"), "{conf}");
        assert!(conf.contains("shm_kv * 4m;"));
        assert!(conf.contains("proxy_wasm_log_dispatch_errors off;"));
        let line = conf.lines().find(|l| l.trim_start().starts_with("proxy_wasm exo_lb '")).unwrap();
        assert!(line.contains(r#"'{"nodes":[{"name":"rk1","address":"192.168.1.101:52415""#), "{line}");
        assert!(line.contains(r#""max_body_bytes":1048576"#));
        assert!(!line.contains('\n') && line.trim_end().ends_with("}';"));
    }

    #[test]
    fn body_limit_is_above_the_filters() {
        let conf = render_example();
        // The public server and the status server (which gets the bodies of relayed errors).
        assert_eq!(conf.matches(&format!("client_max_body_size {};", 1048576 + (1 << 20))).count(), 2);
        let small = EXAMPLE.replace("\"max_body_bytes\": 1048576", "\"max_body_bytes\": 1000");
        let conf = render_nginx(&opts(&small)).unwrap();
        assert!(conf.contains(&format!("client_max_body_size {};", 1000 + (1 << 20))));
    }

    #[test]
    fn streams_are_unbuffered_with_long_timeouts() {
        let conf = render_example();
        for line in [
            "proxy_buffering off;",
            "proxy_http_version 1.1;",
            "proxy_read_timeout 300s;",
            "proxy_send_timeout 300s;",
            "proxy_cache off;",
        ] {
            assert!(conf.contains(line), "missing {line}");
        }
        let conf = render_nginx(&NginxOptions { idle_timeout_s: 42, ..opts(EXAMPLE) }).unwrap();
        assert!(conf.contains("proxy_read_timeout 42s;"));
    }

    #[test]
    fn the_filters_first_two_choices_map_to_an_upstream_with_a_safe_default() {
        let conf = render_example();
        for name in ["rk1", "rk2", "rk3"] {
            assert!(conf.contains(&format!("upstream exo_lb_node_{name} {{")), "{name}");
        }
        assert!(conf.contains("server 192.168.1.101:52415 max_fails=0;"));
        assert!(conf.contains("map $http_x_gateway_destination_endpoint $exo_lb_upstream {"));
        assert!(conf.contains(r#""~^\s*192\.168\.1\.101\:52415\s*$" exo_lb_node_rk1;"#), "{conf}");
        assert!(conf
            .contains(r#""~^\s*192\.168\.1\.103\:52415\s*,\s*192\.168\.1\.101\:52415\s*(,|$)" exo_lb_rk3_then_rk1;"#));
        assert_eq!(conf.matches("default exo_lb_unrouted;").count(), 1);
        assert!(conf.contains("server 127.0.0.1:9 down;"));
        assert!(conf.contains("proxy_pass http://$exo_lb_upstream;"));
        // Late errors relayed through the status listener.
        assert!(conf.contains("        exo-lb-reply exo_lb_reply;"), "{conf}");
        assert!(conf.contains("upstream exo_lb_reply {\n        server 127.0.0.1:8080;"), "{conf}");
    }

    #[test]
    fn fails_over_to_the_second_choice_inside_the_request() {
        let conf = render_example();
        // Every ordered pair: the first as server, the second as backup.
        assert_eq!(conf.matches("_then_").count(), 2 * 6);
        let pair = conf.split("upstream exo_lb_rk2_then_rk3 {").nth(1).unwrap();
        let pair = &pair[..pair.find('}').unwrap()];
        assert!(pair.contains("server 192.168.1.102:52415 max_fails=0;"), "{pair}");
        assert!(pair.contains("server 192.168.1.103:52415 max_fails=0 backup;"), "{pair}");
        assert!(conf.contains("proxy_next_upstream error timeout http_502 http_504;"));
        assert!(conf.contains("proxy_next_upstream_tries 2;"));
        // No internal redirect on the public server for what the filter routes: it would cut the
        // filter off the request. Only nginx's own 413 (never routed) has one.
        let public = &conf[..conf.find("# Status, like the seed's").unwrap()];
        let pages: Vec<&str> = public.lines().map(str::trim).filter(|l| l.starts_with("error_page")).collect();
        assert_eq!(pages, ["error_page 413 = @exo_lb_too_large;"], "{public}");
        assert_eq!(conf.matches("proxy_wasm exo_lb '").count(), 2);
        // A single node: no pairs.
        let one = r#"{"nodes":[{"name":"a","address":"127.0.0.1:5000"}]}"#;
        let conf = render_nginx(&opts(one)).unwrap();
        assert!(!conf.contains("_then_"));
        assert!(conf.contains(r#""~^\s*127\.0\.0\.1\:5000\s*$" exo_lb_node_a;"#));
    }

    #[test]
    fn logs_node_and_model_and_serves_status_locally() {
        let conf = render_example();
        assert!(conf.contains("log_format exo_lb escape=json"));
        assert!(conf.contains(r#""model":"$http_x_exo_lb_model""#));
        assert!(conf.contains(r#""node":"$exo_lb_node""#));
        assert!(conf.contains(r#"map "$upstream_header_time|$upstream_addr" $exo_lb_node {"#));
        assert!(conf.contains(r#""~[0-9.]\|(?:.*\s)?192\.168\.1\.103\:52415$" rk3;"#), "{conf}");
        assert!(conf.contains("access_log logs/access.log exo_lb;"));
        assert!(conf.contains("listen 0.0.0.0:80;"));
        assert!(conf.contains("listen 127.0.0.1:8080;"));
        assert!(conf.contains("stub_status;"));
        assert!(conf.contains("set $exo_lb_role status;"));
        let conf = render_nginx(&NginxOptions {
            listen: "127.0.0.1:18080".parse().unwrap(),
            status: "127.0.0.1:18081".parse().unwrap(),
            wasm_path: "/opt/exo_lb.wasm".into(),
            log_dir: "/var/log/nginx/".into(),
            ..opts(EXAMPLE)
        })
        .unwrap();
        assert!(conf.contains("listen 127.0.0.1:18080;") && conf.contains("listen 127.0.0.1:18081;"));
        assert!(conf.contains("module exo_lb /opt/exo_lb.wasm;"));
        assert!(conf.contains("access_log /var/log/nginx/access.log exo_lb;"));
    }

    #[test]
    fn internal_headers_are_not_sent_to_nodes() {
        let conf = render_example();
        for h in ["X-Gateway-Destination-Endpoint", "X-Envoy-Max-Retries", "X-Exo-Lb-Model"] {
            assert!(conf.contains(&format!("proxy_set_header {h} \"\";")), "{h}");
        }
    }

    #[test]
    fn ipv6_nodes_are_escaped() {
        let v6 = r#"{"nodes":[{"name":"a","address":"[::1]:5000"},{"name":"b.x-1","address":"127.0.0.1:5001"}]}"#;
        let conf = render_nginx(&opts(v6)).unwrap();
        assert!(conf.contains("server [::1]:5000 max_fails=0;"));
        assert!(conf.contains(r#""~^\s*\[\:\:1\]\:5000\s*$" exo_lb_node_a;"#), "{conf}");
        assert!(conf.contains("upstream exo_lb_b.x-1_then_a {"));
        assert!(conf.contains("upstream exo_lb_node_b.x-1 {"));
    }

    #[test]
    fn quotes_in_the_configuration_are_escaped() {
        let cfg = r#"{"nodes":[{"name":"a","address":"127.0.0.1:5000","models":["it's \"x\" \\ y"]}]}"#;
        let conf = render_nginx(&opts(cfg)).unwrap();
        assert!(conf.contains(r#"["it\'s \\"x\\" \\\\ y"]"#), "{conf}");
    }

    #[test]
    fn minify_keeps_strings() {
        assert_eq!(minify_json("{ \"a b\" : [ 1, \"x\\\" y\" ]\n}"), r#"{"a b":[1,"x\" y"]}"#);
    }

    #[test]
    fn config_errors_name_the_file_and_field() {
        let e = render_nginx(&opts(r#"{"nodes":[{"name":"a","address":"nothost"}]}"#)).unwrap_err();
        assert!(e.starts_with("test.json: nodes[0].address") || e.contains("address"), "{e}");
        assert!(e.contains("test.json"), "{e}");
        let e = render_nginx(&opts(r#"{"nodes":[{"name":"a","address":"127.0.0.1:1"}],"max_body_bytes":"x"}"#))
            .unwrap_err();
        assert!(e.contains("max_body_bytes"), "{e}");
        let e = render_nginx(&opts(r#"{"nodes":[{"name":"a","address":"127.0.0.1:1"}],"admin_paths":["/x"]}"#))
            .unwrap_err();
        assert!(e.contains("admin_paths"), "{e}");
        let e = render_nginx(&NginxOptions { wasm_path: "a b.wasm".into(), ..opts(EXAMPLE) }).unwrap_err();
        assert!(e.contains("wasm path"), "{e}");
        let e = render_nginx(&NginxOptions { status: "0.0.0.0:80".parse().unwrap(), ..opts(EXAMPLE) }).unwrap_err();
        assert!(e.contains("--status"), "{e}");
    }

    #[test]
    fn shipped_file_is_current() {
        let shipped = include_str!("../../nginx/nginx.conf");
        let opts = NginxOptions { source: "envoy/exo-lb.json".into(), ..opts(EXAMPLE) };
        assert_eq!(shipped, render_nginx(&opts).unwrap(), "nginx/nginx.conf is stale: cargo run -p exo-lb-ctl -- render-nginx --config envoy/exo-lb.json -o nginx/nginx.conf");
    }
}
