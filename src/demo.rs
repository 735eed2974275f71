//! `peerconf demo`: local nodes on loopback in a temporary directory, until Ctrl-C.

use crate::node::{InitOptions, Node, NodeOptions};
use std::net::{SocketAddr, TcpListener};

/// The preferred port if free, else any free loopback port.
fn loopback_port(preferred: u16) -> SocketAddr {
    let try_bind = |p: u16| {
        TcpListener::bind(("127.0.0.1", p))
            .ok()
            .and_then(|l| l.local_addr().ok())
    };
    try_bind(preferred)
        .or_else(|| try_bind(0))
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], preferred)))
}

pub async fn run(nodes: usize) -> Result<(), String> {
    if nodes != 1 {
        return Err(format!(
            "--nodes {nodes}: this build runs single nodes only; clustering is not implemented yet"
        ));
    }
    let tmp = tempfile::Builder::new()
        .prefix("peerconf-demo-")
        .tempdir()
        .map_err(|e| format!("cannot make a temporary directory: {e}"))?;
    let mut apis = Vec::new();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for i in 0..nodes {
        let dir = tmp.path().join(format!("node{}", i + 1));
        let opts = InitOptions {
            name: Some(format!("node{}", i + 1)),
            api_listen: loopback_port(7700 + 10 * i as u16),
            ipc_listen: loopback_port(7701 + 10 * i as u16),
            ipc_advertise: None,
        };
        Node::init(&dir, &opts, &NodeOptions::default()).map_err(|e| e.to_string())?;
        apis.push(opts.api_listen);
        let mut rx = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            crate::daemon::run(&dir, async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await
        }));
    }
    // Wait until every API answers before telling the user.
    for api in &apis {
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(api).await.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
    }
    println!("peerconf demo: {nodes} node(s) in {}", tmp.path().display());
    for (i, api) in apis.iter().enumerate() {
        println!("  node{}  admin API http://{api}", i + 1);
    }
    let api = apis[0];
    println!("\nTry, in another terminal:");
    println!("  export PEERCONF_API=http://{api}");
    println!("  peerconf put site main --json '{{\"protocols\":[\"sftp\"],\"bindings\":[\"0.0.0.0:2222\"],\"root_dir\":\"/srv\"}}'");
    println!("  peerconf put user alice --json '{{\"home_dir\":\"/srv/alice\",\"site\":\"main\",\"password\":\"a long password\"}}'");
    println!("  peerconf list user");
    println!("  peerconf history user alice");
    println!("  curl -s http://{api}/v1/entities/user/alice");
    println!("\nCtrl-C stops the demo and removes its directory.");
    crate::daemon::stop_signal().await;
    let _ = stop_tx.send(true);
    for t in tasks {
        match t.await {
            Ok(Err(e)) => eprintln!("a node stopped with an error: {e}"),
            Err(e) => eprintln!("a node task failed: {e}"),
            Ok(Ok(())) => {}
        }
    }
    Ok(())
}
