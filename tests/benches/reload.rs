//! How long a reload takes, end to end as an operator sees it: three `colony node` processes
//! with about 100 actors, `colony ctl reload` of a config that starts 10, stops 10 and changes
//! 10 in place, and `colony ctl reconfigure` of one actor. Prints figures; passes or fails nothing.
//!
//! `cargo build --release --bins && cargo bench -p colony-tests --bench reload`

use std::fmt::Write;
use std::time::{Duration, Instant};

use colony_tests::{Workdir, assert_success, free_udp_port, healthy, wait_for};

const ACTORS_PER_NODE: usize = 33;

fn config(ports: &[u16; 3], variant: bool) -> String {
    let mut c = String::from("[cluster]\nname = \"bench\"\nheartbeat_ms = 100\n");
    for (i, p) in ports.iter().enumerate() {
        let _ = write!(c, "[[node]]\nname = \"n{i}\"\nlisten = \"127.0.0.1:{p}\"\n");
    }
    for node in 0..3 {
        for a in 0..ACTORS_PER_NODE {
            // The variant stops actors 0..3 on each node, starts 3 new ones, and tunes 3 more.
            if variant && a < 3 {
                continue;
            }
            let threshold = if variant && (3..6).contains(&a) {
                0.2
            } else {
                0.05
            };
            let _ = write!(
                c,
                "[[actor]]\nname = \"lb{a}\"\nnode = \"n{node}\"\nkind = \"balancer\"\nanti_flap_threshold = {threshold}\n"
            );
        }
        if variant {
            for a in 0..3 {
                let _ = write!(
                    c,
                    "[[actor]]\nname = \"new{a}\"\nnode = \"n{node}\"\nkind = \"balancer\"\n"
                );
            }
        }
    }
    c
}

fn timed(work: &Workdir, args: &[&str]) -> Duration {
    let t = Instant::now();
    let out = work.ctl("n0", args);
    let elapsed = t.elapsed();
    assert_success(&out, &format!("ctl {args:?}"));
    elapsed
}

fn main() {
    let ports = [free_udp_port(), free_udp_port(), free_udp_port()];
    let work = Workdir::new(&config(&ports, false));
    let _nodes: Vec<_> = (0..3).map(|i| work.start_node(&format!("n{i}"))).collect();
    assert!(
        wait_for(Duration::from_secs(30), || work
            .status("n0")
            .is_some_and(|s| healthy(&s))),
        "cluster not healthy"
    );
    let a = work.path().join("a.toml");
    let b = work.path().join("b.toml");
    std::fs::write(&a, config(&ports, false)).expect("write");
    std::fs::write(&b, config(&ports, true)).expect("write");
    let (a, b) = (a.to_str().expect("utf-8"), b.to_str().expect("utf-8"));

    let mut reloads = Vec::new();
    let mut noops = Vec::new();
    for _ in 0..5 {
        reloads.push(timed(&work, &["reload", b]));
        noops.push(timed(&work, &["reload", b]));
        reloads.push(timed(&work, &["reload", a]));
    }
    let mut reconfigures = Vec::new();
    for i in 0..20 {
        let settings = format!("{{\"anti_flap_threshold\": 0.{}}}", 10 + i);
        reconfigures.push(timed(&work, &["reconfigure", "n2/lb10", &settings]));
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    println!(
        "colony reload benchmark: 3 nodes, {} actors, each reload starts 9, stops 9, changes 9 in place",
        3 * ACTORS_PER_NODE
    );
    println!(
        "  (wall time of `colony ctl reload` / `reconfigure`, including starting the ctl process)"
    );
    println!(
        "  reload applied:        median {:?} over {} reloads",
        median(&mut reloads),
        reloads.len()
    );
    println!("  reload with no change: median {:?}", median(&mut noops));
    println!(
        "  reconfigure in place (remote node): median {:?} over {}",
        median(&mut reconfigures),
        reconfigures.len()
    );
}
