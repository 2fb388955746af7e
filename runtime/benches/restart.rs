//! How fast a failed actor is back and serving: kill it through its supervisor, immediately
//! call it, and time the reply (the call waits in the actor's mailbox, which survives the
//! restart, and is answered by the new instance). Prints percentiles; it passes or fails nothing.
//!
//! `cargo bench -p colony-runtime --bench restart`

use std::sync::Arc;
use std::time::{Duration, Instant};

use colony_certs::{IssueOptions, NodeIdentity, init_ca, issue_node_cert};
use colony_cluster::{Address, Cluster, ClusterSettings};
use colony_config::ClusterConfig;
use colony_runtime::supervision::supervisor::{self, OperatorAction};

const KILLS: usize = 2000;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    init_ca(dir.path(), "bench", false).expect("CA");
    let files = issue_node_cert(dir.path(), "n", &IssueOptions::default()).expect("cert");
    let identity =
        NodeIdentity::load(&dir.path().join("ca.pem"), &files.cert, &files.key).expect("identity");
    let config = ClusterConfig::from_toml_str(
        "[cluster]\nname = \"bench\"\n[supervision]\nmax_restarts = 100000\nwithin_secs = 1\nbackoff_ms = 0\n\
         [[node]]\nname = \"n\"\nlisten = \"127.0.0.1:0\"\n[[actor]]\nname = \"lb\"\nnode = \"n\"\nkind = \"balancer\"\n",
        "bench.toml",
    )
    .expect("config");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let settings = ClusterSettings::from_config(&config, "n").expect("node");
        let cluster = Cluster::start(settings, identity).await.expect("cluster");
        let (sup, starts) = supervisor::start(cluster.clone(), Arc::new(config), "n", dir.path().join("data"));
        for (_, s) in starts {
            s.await.expect("start report").expect("started");
        }
        let lb = Address::new("n", "lb");
        let status = serde_json::json!({"status": {}});
        let mut samples = Vec::with_capacity(KILLS);
        for _ in 0..KILLS {
            let t = Instant::now();
            sup.act("lb", OperatorAction::Kill).await.expect("kill");
            let _: serde_json::Value = cluster.call(&lb, None, &status, Some(Duration::from_secs(5))).await.expect("served");
            samples.push(t.elapsed());
        }
        samples.sort();
        println!("colony-runtime restart benchmark: {KILLS} kills of a balancer actor, one_for_one, no backoff");
        println!("  (with the default backoff the first restart in a window is immediate, as here)");
        println!(
            "  kill -> serving again: p50 {:?}  p90 {:?}  p99 {:?}  max {:?}",
            percentile(&samples, 0.5),
            percentile(&samples, 0.9),
            percentile(&samples, 0.99),
            samples[samples.len() - 1]
        );
        sup.shutdown().await;
        cluster.shutdown().await;
    });
}
