//! `nginx -t` on what `render-nginx` writes, with the nginx-wasm of scripts/setup-nginx.sh.
//! Needs `.nginx-wasm/sbin/nginx` and the built filter; without them the test says so and passes,
//! unless EXO_LB_REQUIRE_NGINX=1 (then it fails).

use exo_lb_ctl::nginx::{render_nginx, NginxOptions};
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

fn nginx_t(nginx: &Path, conf: &str, name: &str) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("exo-lb-nginx-t-{}-{name}", std::process::id()));
    std::fs::create_dir_all(dir.join("logs")).map_err(|e| e.to_string())?;
    let file = dir.join("nginx.conf");
    std::fs::write(&file, conf).map_err(|e| e.to_string())?;
    let out = Command::new(nginx).arg("-t").arg("-p").arg(&dir).arg("-c").arg(&file).output();
    let _ = std::fs::remove_dir_all(&dir);
    let out = out.map_err(|e| format!("cannot run {}: {e}", nginx.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("nginx -t failed for {name}:\n{}\n{conf}", String::from_utf8_lossy(&out.stderr)))
    }
}

#[test]
fn rendered_configurations_pass_nginx_t() {
    let root = repo();
    let nginx = root.join(".nginx-wasm/sbin/nginx");
    let wasm = root.join("target/wasm32-wasip1/release/exo_lb.wasm");
    for (path, how) in
        [(&nginx, "scripts/setup-nginx.sh"), (&wasm, "cargo build --release --target wasm32-wasip1 -p exo-lb")]
    {
        if !path.exists() {
            let msg = format!("{} is missing ({how}): nginx -t not run", path.display());
            assert!(std::env::var("EXO_LB_REQUIRE_NGINX").as_deref() != Ok("1"), "{msg}");
            eprintln!("SKIPPED: {msg}");
            return;
        }
    }
    let example = std::fs::read_to_string(root.join("envoy/exo-lb.json")).expect("envoy/exo-lb.json");
    let odd = r#"{"nodes":[
        {"name":"a.b-1","address":"[::1]:52415","models":["it's \"quoted\""]},
        {"name":"c_2","address":"127.0.0.1:52416"},
        {"name":"solo","address":"10.0.0.3:52417","down":true}
    ],"max_body_bytes":10}"#;
    let single = r#"{"nodes":[{"name":"only","address":"127.0.0.1:52415"}]}"#;
    for (name, config) in [("example", example.as_str()), ("odd", odd), ("single", single)] {
        let conf = render_nginx(&NginxOptions {
            filter_config: config.into(),
            source: name.into(),
            wasm_path: wasm.display().to_string(),
            ..NginxOptions::default()
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        nginx_t(&nginx, &conf, name).unwrap();
    }
}
