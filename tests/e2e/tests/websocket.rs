//! The exo web UI at `/` and its websockets pass through the balancer to a node.

use e2e::{Cluster, NodeSpec};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_ui_and_websockets_pass_through() {
    let c = Cluster::start(vec![NodeSpec::new("a", &["m1"]), NodeSpec::new("b", &["m2"])], json!({})).await;
    let page = c.get("/").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("exo web UI"), "{}", page.body);
    let node = page.node().expect("x-exo-lb-node");
    assert!(page.body.contains(&format!("node: {node}")), "the page came from the node named");

    let mut seen = Vec::new();
    for _ in 0..4 {
        let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", c.envoy.listen))
            .await
            .expect("websocket through Envoy");
        assert_eq!(resp.status(), 101);
        let node = resp.headers().get("x-exo-lb-node").expect("x-exo-lb-node").to_str().unwrap().to_string();
        for text in ["hello", "second message"] {
            ws.send(Message::text(text)).await.unwrap();
            let reply = ws.next().await.expect("a reply").unwrap();
            assert_eq!(reply.into_text().unwrap().as_str(), format!("{node}: {text}"), "echoed by the node named");
        }
        ws.close(None).await.unwrap();
        seen.push(node);
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen, ["a", "b"], "websockets are balanced like other non-inference requests");
    let log = c.envoy.access_log_lines(5).await;
    assert_eq!(log.iter().filter(|l| l["path"] == "/ws" && l["status"] == 101).count(), 4, "{log:?}");
}
