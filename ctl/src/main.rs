//! `exo-lb-ctl`: render Envoy's configuration from the node list, and check a filter config.

use clap::{Parser, Subcommand};
use exo_lb::logic::config::Config;
use exo_lb_ctl::{dynamic, production_options, render, RenderOptions, DEFAULT_IDLE_TIMEOUT_S, TEMPLATE};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Render an Envoy configuration from a filter configuration (JSON with the node list).
    Render {
        /// The filter configuration, e.g. envoy/exo-lb.json.
        #[arg(long)]
        config: PathBuf,
        /// The public listener.
        #[arg(long, default_value = "0.0.0.0:80")]
        listen: SocketAddr,
        /// Envoy's admin interface.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: SocketAddr,
        /// The status page listener (GET /status).
        #[arg(long, default_value = "127.0.0.1:8080")]
        status: SocketAddr,
        /// Path of exo_lb.wasm as Envoy will see it.
        #[arg(long, default_value = "target/wasm32-wasip1/release/exo_lb.wasm")]
        wasm: String,
        /// Seconds without a byte before Envoy gives up on a stream.
        #[arg(long, default_value_t = DEFAULT_IDLE_TIMEOUT_S)]
        idle_timeout: u64,
        /// A different template (default: the built-in envoy/envoy.template.yaml).
        #[arg(long)]
        template: Option<PathBuf>,
        /// Write here instead of standard output.
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Re-render the committed production file envoy/envoy.yaml from envoy/exo-lb.json
    /// (run from the repository root).
    RenderProduction,
    /// Render a dynamic configuration into a directory: bootstrap.yaml (start Envoy with it),
    /// lds.yaml and cds.yaml (which Envoy watches). With --admin, change a running Envoy over to
    /// the new node list without dropping streams.
    RenderDynamic {
        /// The filter configuration, e.g. envoy/exo-lb.json.
        #[arg(long)]
        config: PathBuf,
        /// Where the three files live.
        #[arg(long)]
        dir: PathBuf,
        /// The running Envoy's admin address: apply the change to it, in a safe order.
        #[arg(long)]
        admin: Option<String>,
        #[arg(long, default_value = "0.0.0.0:80")]
        listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9901")]
        envoy_admin: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:8080")]
        status: SocketAddr,
        #[arg(long, default_value = "target/wasm32-wasip1/release/exo_lb.wasm")]
        wasm: String,
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
        Command::Render { config, listen, admin, status, wasm, template, idle_timeout, out } => {
            let template = match &template {
                Some(path) => read(path)?,
                None => TEMPLATE.to_string(),
            };
            let opts = RenderOptions {
                listen,
                admin,
                status,
                wasm_path: wasm,
                filter_config: read(&config)?,
                source: config.display().to_string(),
                idle_timeout_s: idle_timeout,
                ..RenderOptions::default()
            };
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
            let yaml = render(TEMPLATE, &production_options(read(&PathBuf::from("envoy/exo-lb.json"))?))?;
            std::fs::write("envoy/envoy.yaml", yaml).map_err(|e| format!("cannot write envoy/envoy.yaml: {e}"))?;
            println!("wrote envoy/envoy.yaml");
            Ok(())
        }
        Command::RenderDynamic { config, dir, admin, listen, envoy_admin, status, wasm } => {
            let opts = RenderOptions {
                listen,
                admin: envoy_admin,
                status,
                wasm_path: wasm,
                filter_config: read(&config)?,
                source: config.display().to_string(),
                ..RenderOptions::default()
            };
            let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
            let files = dynamic::split(&render(TEMPLATE, &opts)?, &dir)?;
            match admin {
                Some(admin) => {
                    dynamic::apply(&dir, &files, &admin)?;
                    println!("applied {} to the Envoy at {admin}", config.display());
                }
                None => {
                    dynamic::write_all(&dir, &files)?;
                    println!("wrote {}/{{bootstrap,lds,cds}}.yaml", dir.display());
                }
            }
            Ok(())
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
