//! `exo-lb-ctl`: render Envoy's configuration from the node list, and check a filter config.

use clap::{Args, Parser, Subcommand};
use exo_lb::logic::config::Config;
use exo_lb_ctl::{
    dynamic, nginx, parse_api_keys, production_https_options, production_options, render, Limits, RenderOptions,
    TlsOptions, DEFAULT_IDLE_TIMEOUT_S, EXAMPLE_API_KEYS, HTTPS_VARIANT, TEMPLATE,
};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per run: a large variant costs nothing worth boxing it for.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Render an Envoy configuration from a filter configuration (JSON with the node list).
    Render {
        /// The public plain-HTTP listener (with --tls-listen: only for --redirect-http).
        #[arg(long, default_value = "0.0.0.0:80")]
        listen: SocketAddr,
        /// Serve HTTPS on this address (e.g. 0.0.0.0:443) instead of plain HTTP on --listen.
        #[arg(long, requires = "tls_source")]
        tls_listen: Option<SocketAddr>,
        /// With --tls-listen: certbot's certificate for this domain
        /// (/etc/letsencrypt/live/<domain>/fullchain.pem and privkey.pem).
        #[arg(long, group = "tls_source", requires = "tls_listen")]
        tls_domain: Option<String>,
        /// With --tls-listen: the PEM certificate chain (instead of --tls-domain).
        #[arg(long, group = "tls_source", requires_all = ["tls_listen", "tls_key"])]
        tls_cert: Option<String>,
        /// With --tls-cert: the PEM private key.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<String>,
        /// With --tls-listen: --listen answers every request with a redirect to HTTPS.
        #[arg(long, requires = "tls_listen")]
        redirect_http: bool,
        /// With --redirect-http: forward /.well-known/acme-challenge/ to certbot's standalone
        /// server here (certbot certonly --standalone --http-01-address/--http-01-port).
        #[arg(long, requires = "redirect_http")]
        acme_challenge: Option<SocketAddr>,
        /// Require `Authorization: Bearer <key>` with a key from this file (one per line, #
        /// comments); /healthcheck stays public.
        #[arg(long)]
        api_keys_file: Option<PathBuf>,
        /// Allow this browser origin by CORS (e.g. https://chat.example.com, or * for any);
        /// repeatable.
        #[arg(long = "cors-origin")]
        cors_origins: Vec<String>,
        /// Hide x-exo-lb-node from clients (the access log keeps it) and reduce /healthcheck to
        /// {"status":"ok"} or {"status":"unavailable"}.
        #[arg(long)]
        hide_node_details: bool,
        /// Envoy's admin interface.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: SocketAddr,
        /// A different template (default: the built-in envoy/envoy.template.yaml).
        #[arg(long)]
        template: Option<PathBuf>,
        /// Write here instead of standard output.
        #[arg(long, short)]
        out: Option<PathBuf>,
        #[command(flatten)]
        envoy: EnvoyArgs,
    },
    /// Re-render the committed production files from envoy/exo-lb.json (run from the
    /// repository root): envoy/envoy.yaml (plain HTTP on :80) and envoy/envoy-https.yaml (the
    /// HTTPS variant, with the example keys of envoy/api-keys.example).
    RenderProduction,
    /// Render a dynamic configuration into a directory: bootstrap.yaml (start Envoy with it),
    /// lds.yaml and cds.yaml (which Envoy watches). With --apply, change the Envoy running from
    /// that directory (admin interface at --admin) over to the new node list without dropping
    /// streams.
    RenderDynamic {
        /// Where the three files live.
        #[arg(long)]
        dir: PathBuf,
        /// Change the running Envoy (the one whose admin interface is --admin) over to this
        /// configuration, in a safe order, instead of writing fresh files.
        #[arg(long)]
        apply: bool,
        /// The public plain-HTTP listener.
        #[arg(long, default_value = "0.0.0.0:80")]
        listen: SocketAddr,
        /// Envoy's admin interface (as in `render`); with --apply, where the running Envoy is
        /// told about the change.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: SocketAddr,
        #[command(flatten)]
        envoy: EnvoyArgs,
    },
    /// Render an nginx.conf for nginx with ngx_wasm_module (scripts/setup-nginx.sh builds it)
    /// from a filter configuration; docs/nginx.md.
    RenderNginx {
        /// The public listener.
        #[arg(long, default_value = "0.0.0.0:80")]
        listen: SocketAddr,
        /// Directory of error.log and access.log (relative: under nginx's -p prefix).
        #[arg(long, default_value = "logs")]
        log_dir: String,
        /// Write here instead of standard output.
        #[arg(long, short)]
        out: Option<PathBuf>,
        #[command(flatten)]
        proxy: ProxyArgs,
    },
    /// Validate a filter configuration the way the filter does on load.
    Check { config: PathBuf },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("exo-lb-ctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn read(path: &PathBuf) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Render {
            envoy,
            listen,
            tls_listen,
            tls_domain,
            tls_cert,
            tls_key,
            redirect_http,
            acme_challenge,
            api_keys_file,
            cors_origins,
            hide_node_details,
            admin,
            template,
            out,
        } => {
            let template = match &template {
                Some(path) => read(path)?,
                None => TEMPLATE.to_string(),
            };
            let opts = RenderOptions {
                tls: tls_listen.map(|tls_listen| {
                    let mut tls = TlsOptions::certbot(tls_listen, tls_domain.as_deref().unwrap_or_default());
                    if let (Some(cert), Some(key)) = (tls_cert, tls_key) {
                        (tls.cert_path, tls.key_path) = (cert, key);
                    }
                    tls.acme_challenge = acme_challenge;
                    tls
                }),
                redirect_http_to_https: redirect_http,
                api_keys: match &api_keys_file {
                    Some(path) => parse_api_keys(&read(path)?).map_err(|e| format!("{}: {e}", path.display()))?,
                    None => Vec::new(),
                },
                cors_origins,
                hide_node_details,
                ..envoy.options(listen, admin)?
            };
            if api_keys_file.is_some() && opts.api_keys.is_empty() {
                return Err("the API key file has no keys".into());
            }
            let yaml = render(&template, &opts)?;
            match out {
                Some(path) => std::fs::write(&path, yaml).map_err(|e| format!("cannot write {}: {e}", path.display())),
                None => {
                    print!("{yaml}");
                    Ok(())
                }
            }
        }
        Command::RenderProduction => {
            let source = read(&PathBuf::from("envoy/exo-lb.json"))?;
            let keys = parse_api_keys(&read(&PathBuf::from(EXAMPLE_API_KEYS))?)?;
            for (file, opts) in [
                ("envoy/envoy.yaml", production_options(source.clone())),
                (HTTPS_VARIANT, production_https_options(source, keys)),
            ] {
                let yaml = render(TEMPLATE, &opts)?;
                std::fs::write(file, yaml).map_err(|e| format!("cannot write {file}: {e}"))?;
                println!("wrote {file}");
            }
            Ok(())
        }
        Command::RenderDynamic { envoy, dir, apply, listen, admin } => {
            let opts = envoy.options(listen, admin)?;
            let config = envoy.proxy.config;
            let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
            let files = dynamic::split(&render(TEMPLATE, &opts)?, &dir)?;
            if apply {
                dynamic::apply(&dir, &files, &admin.to_string())?;
                println!("applied {} to the Envoy at {admin}", config.display());
            } else {
                // Envoy watches these files: rewriting them under a running Envoy would change
                // the listener and the cluster in no particular order.
                if let Some(existing) = [dynamic::LDS_FILE, dynamic::CDS_FILE].iter().find(|f| dir.join(f).exists()) {
                    return Err(format!(
                        "{} already exists: to change the Envoy running from {}, add --apply \
                         (it applies the change in a safe order); to start afresh with no Envoy \
                         running, delete {}/{{lds,cds}}.yaml first",
                        dir.join(existing).display(),
                        dir.display(),
                        dir.display()
                    ));
                }
                dynamic::write_all(&dir, &files)?;
                println!("wrote {}/{{bootstrap,lds,cds}}.yaml", dir.display());
            }
            Ok(())
        }
        Command::RenderNginx { listen, log_dir, out, proxy } => {
            let opts = nginx::NginxOptions {
                listen,
                status: proxy.status,
                wasm_path: proxy.wasm,
                filter_config: read(&proxy.config)?,
                source: proxy.config.display().to_string(),
                idle_timeout_s: proxy.idle_timeout,
                log_dir,
            };
            let conf = nginx::render_nginx(&opts)?;
            match out {
                Some(path) => std::fs::write(&path, conf).map_err(|e| format!("cannot write {}: {e}", path.display())),
                None => {
                    print!("{conf}");
                    Ok(())
                }
            }
        }
        Command::Check { config } => {
            let parsed = Config::parse(read(&config)?.as_bytes()).map_err(|e| format!("{}: {e}", config.display()))?;
            println!("{}: valid, {} node(s):", config.display(), parsed.nodes.len());
            for n in &parsed.nodes {
                let models = if n.serves_any_model() { "*".to_string() } else { n.models.join(", ") };
                println!(
                    "  {} {} weight={} models=[{}]{}{}",
                    n.name,
                    n.address,
                    n.weight,
                    models,
                    if n.down { " down" } else { "" },
                    if n.backup { " backup" } else { "" }
                );
            }
            Ok(())
        }
    }
}

/// What every render command shares, for Envoy and nginx alike.
#[derive(Args)]
struct ProxyArgs {
    /// The filter configuration, e.g. envoy/exo-lb.json.
    #[arg(long)]
    config: PathBuf,
    /// The local status listener: the filter's GET /status (on nginx also /nginx_status).
    #[arg(long, default_value = "127.0.0.1:8080")]
    status: SocketAddr,
    /// Path of exo_lb.wasm as the proxy (Envoy or nginx) will see it.
    #[arg(long, default_value = "target/wasm32-wasip1/release/exo_lb.wasm")]
    wasm: String,
    /// Seconds without a byte from a node before the proxy gives up on the stream.
    #[arg(long, default_value_t = DEFAULT_IDLE_TIMEOUT_S)]
    idle_timeout: u64,
}

/// What `render` and `render-dynamic` share.
#[derive(Args)]
struct EnvoyArgs {
    #[command(flatten)]
    proxy: ProxyArgs,
    #[command(flatten)]
    limits: LimitArgs,
}

impl EnvoyArgs {
    /// The options these flags set, with the filter configuration read, for a public listener
    /// on `listen` and the admin interface on `admin`.
    fn options(&self, listen: SocketAddr, admin: SocketAddr) -> Result<RenderOptions, String> {
        let proxy = &self.proxy;
        Ok(RenderOptions {
            listen,
            admin,
            status: proxy.status,
            wasm_path: proxy.wasm.clone(),
            filter_config: read(&proxy.config)?,
            source: proxy.config.display().to_string(),
            idle_timeout_s: proxy.idle_timeout,
            limits: self.limits.limits(),
            ..RenderOptions::default()
        })
    }
}

/// Envoy's limits against too many or slow clients (README, "Security").
#[derive(Args)]
#[command(next_help_heading = "Client limits")]
struct LimitArgs {
    /// Open client connections at most (more are closed at once; the status page and admin
    /// interface are not counted).
    #[arg(long, default_value_t = Limits::default().max_connections)]
    max_connections: u64,
    /// Envoy's heap budget in MiB: at 95 % new requests get 503 until memory is freed.
    #[arg(long, default_value_t = Limits::default().max_heap_mb)]
    max_heap_mb: u64,
    /// Seconds a client may take to send a whole request, body included (then 408). Does not
    /// limit generations.
    #[arg(long, default_value_t = Limits::default().request_timeout_s)]
    request_timeout: u64,
    /// Seconds a client may take to send the request headers (then 408).
    #[arg(long, default_value_t = Limits::default().request_headers_timeout_s)]
    request_headers_timeout: u64,
    /// Seconds before an idle keep-alive connection is closed.
    #[arg(long, default_value_t = Limits::default().connection_idle_timeout_s)]
    connection_idle_timeout: u64,
    /// Proxies in front of Envoy whose X-Forwarded-For entries are trusted (0: the client is
    /// the connection's peer).
    #[arg(long, default_value_t = Limits::default().xff_num_trusted_hops)]
    xff_num_trusted_hops: u32,
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        Limits {
            max_connections: self.max_connections,
            max_heap_mb: self.max_heap_mb,
            request_timeout_s: self.request_timeout,
            request_headers_timeout_s: self.request_headers_timeout,
            connection_idle_timeout_s: self.connection_idle_timeout,
            xff_num_trusted_hops: self.xff_num_trusted_hops,
        }
    }
}
