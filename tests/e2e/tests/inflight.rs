//! In-flight counts return to zero after every kind of request end, across Envoy's workers.

use e2e::{both_hosts, chat_body, Cluster, Host, NodeSpec};
use futures_util::StreamExt;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

both_hosts!(client_aborts_give_their_slots_back);
async fn client_aborts_give_their_slots_back(host: Host) {
    let slow = |name: &str| NodeSpec::new(name, &["m"]).with(|s| s.time_scale = 1.0);
    let c =
        // No hold after the aborts (these nodes stop when their client leaves; holds have tests
        // of their own): this test is about in-flight counts only.
        Cluster::start_on(
            host,
            vec![slow("a"), slow("b")],
            json!({"policy": "least_conn", "max_inflight": 2, "hold_after_abort": false}),
        )
        .await;
    // Four concurrent streams: two per node. Read the first chunk of each, then hang up on a's.
    let mut streams = Vec::new();
    for _ in 0..4 {
        let resp =
            c.client.post(c.envoy.url("/v1/chat/completions")).body(chat_body("m", true, 40)).send().await.unwrap();
        streams.push(resp);
    }
    let mut per_node = BTreeMap::new();
    let mut keep = Vec::new();
    for resp in streams {
        let node = resp.headers()["x-exo-lb-node"].to_str().unwrap().to_string();
        *per_node.entry(node.clone()).or_insert(0) += 1;
        let mut body = resp.bytes_stream();
        body.next().await.expect("first chunk").unwrap();
        if node == "b" {
            keep.push(body);
        } // a's streams are dropped here: the client goes away mid-stream.
    }
    assert_eq!(per_node, BTreeMap::from([("a".to_string(), 2), ("b".to_string(), 2)]));
    for mut body in keep {
        while let Some(chunk) = body.next().await {
            chunk.unwrap();
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(c.node("a").stats().aborted, 2, "the node saw its clients leave");
    // Had a's aborted streams leaked their in-flight counts, least_conn would now send both
    // of these to b.
    let replies =
        futures_util::future::join_all((0..2).map(|_| c.post("/v1/chat/completions", chat_body("m", true, 10), &[])))
            .await;
    let mut nodes: Vec<String> = replies.iter().map(|r| r.node().unwrap()).collect();
    nodes.sort();
    assert_eq!(nodes, ["a", "b"]);
}
