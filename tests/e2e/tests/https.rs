//! HTTPS through the real Envoy with a certificate made by the test, the HTTP to HTTPS redirect,
//! certbot's challenges on port 80, and the committed HTTPS variant.

use e2e::{chat_body, free_port, root, Cluster, NodeSpec};
use exo_lb_ctl::{RenderOptions, TlsOptions};
use serde_json::json;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The name the test certificate is for (the client resolves it to Envoy's address).
const HOST: &str = "exo-lb.test";

/// A self-signed certificate for `names`, written as certbot names its files; returns the
/// directory and the certificate PEM.
fn certificate(names: &[&str]) -> (PathBuf, String) {
    let cert = rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .expect("a certificate");
    let dir = std::env::temp_dir().join(format!("exo-lb-tls-{}-{}", std::process::id(), free_port([127, 0, 0, 1])));
    std::fs::create_dir_all(&dir).unwrap();
    let pem = cert.cert.pem();
    std::fs::write(dir.join("fullchain.pem"), &pem).unwrap();
    std::fs::write(dir.join("privkey.pem"), cert.key_pair.serialize_pem()).unwrap();
    (dir, pem)
}

fn tls_at(dir: &Path, listen: SocketAddr) -> TlsOptions {
    TlsOptions {
        listen,
        cert_path: dir.join("fullchain.pem").display().to_string(),
        key_path: dir.join("privkey.pem").display().to_string(),
        acme_challenge: None,
    }
}

fn https_client(pem: &str, addr: SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
        .resolve(HOST, addr)
        .build()
        .unwrap()
}

/// A one-shot stand-in for `certbot --standalone`: answers every request with `body`.
async fn fake_certbot(addr: SocketAddr, body: &'static str) -> tokio::task::JoinHandle<String> {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        let request = String::from_utf8_lossy(&buf[..n]).to_string();
        let reply = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
        s.write_all(reply.as_bytes()).await.unwrap();
        request
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_generated_certificate_and_a_redirect_from_http() {
    let (dir, pem) = certificate(&[HOST]);
    let https = SocketAddr::from(([127, 0, 0, 1], free_port([127, 0, 0, 1])));
    let http = SocketAddr::from(([127, 0, 0, 1], free_port([127, 0, 0, 1])));
    let acme = SocketAddr::from(([127, 0, 0, 1], free_port([127, 0, 0, 1])));
    let c = Cluster::start_rendered(
        vec![NodeSpec::new("a", &["m1"]), NodeSpec::new("b", &["m2"])],
        json!({}),
        Some(http),
        RenderOptions {
            tls: Some(TlsOptions { acme_challenge: Some(acme), ..tls_at(&dir, https) }),
            redirect_http_to_https: true,
            ..RenderOptions::default()
        },
    )
    .await;
    let client = https_client(&pem, https);
    let base = format!("https://{HOST}:{}", https.port());

    // The API over HTTPS, routed by model, streamed.
    for (model, node) in [("m1", "a"), ("m2", "b")] {
        let r = client
            .post(format!("{base}/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(chat_body(model, true, 4))
            .send()
            .await
            .expect("an HTTPS request");
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-exo-lb-node"], node);
        let body = r.text().await.unwrap();
        assert!(body.contains("data: ") && body.contains(&format!("\"system_fingerprint\":\"{node}\"")), "{body}");
    }
    let health: serde_json::Value =
        client.get(format!("{base}/healthcheck")).send().await.unwrap().json().await.unwrap();
    assert_eq!(health["status"], "ok");
    // A client that does not trust the certificate is refused.
    let untrusting = reqwest::Client::builder().use_rustls_tls().resolve(HOST, https).build().unwrap();
    assert!(untrusting.get(format!("{base}/healthcheck")).send().await.is_err());

    // Plain HTTP redirects, keeping the path and query, with 308 so that a POST stays a POST.
    let plain = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let r = plain
        .get(format!("http://{http}/v1/models?x=1"))
        .header("host", format!("{HOST}:{}", http.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(r.headers()["location"], format!("https://{HOST}:{}/v1/models?x=1", https.port()).as_str());
    let r =
        plain.post(format!("http://{http}/v1/chat/completions")).body(chat_body("m1", false, 4)).send().await.unwrap();
    assert_eq!(r.status(), 308);
    assert!(r.headers()["location"].to_str().unwrap().starts_with("https://"));
    assert_eq!(
        c.node("a").stats().requests_by_path.get("/v1/chat/completions"),
        Some(&1),
        "no plain request reached a node"
    );

    // Let's Encrypt's HTTP-01 challenge reaches certbot's standalone server.
    let certbot = fake_certbot(acme, "token.thumbprint").await;
    let r = plain.get(format!("http://{http}/.well-known/acme-challenge/token")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "token.thumbprint");
    assert!(certbot.await.unwrap().starts_with("GET /.well-known/acme-challenge/token "));

    let log = c.envoy.access_log_lines(3).await;
    let served: Vec<_> = log.iter().filter(|l| l["path"] == "/v1/chat/completions" && l["status"] == 200).collect();
    assert_eq!(served.len(), 2, "{log:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// `envoy/envoy-https.yaml` names certbot's files for exo-lb.example.com; given a certificate
/// there (here: one made by the test, in a directory standing in for /etc/letsencrypt/live/..),
/// Envoy accepts it. Envoy reads the certificate when it validates, so it must exist.
#[test]
fn committed_https_variant_validates_in_envoy() {
    let committed = std::fs::read_to_string(root().join(exo_lb_ctl::HTTPS_VARIANT)).unwrap();
    let live = format!("/etc/letsencrypt/live/{}", exo_lb_ctl::EXAMPLE_DOMAIN);
    assert!(committed.contains(&format!("{live}/fullchain.pem")) && committed.contains(&format!("{live}/privkey.pem")));
    let (dir, _) = certificate(&[exo_lb_ctl::EXAMPLE_DOMAIN]);
    let config = dir.join("envoy-https.yaml");
    std::fs::write(&config, committed.replace(&live, &dir.display().to_string())).unwrap();
    let out = std::process::Command::new(e2e::envoy_binary())
        .current_dir(root())
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(&config)
        .output()
        .expect("run envoy");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("OK"), "{text}");
    assert!(text.contains("configured 3 node(s)"), "the filter loaded its configuration: {text}");
    let _ = std::fs::remove_dir_all(dir);
}
