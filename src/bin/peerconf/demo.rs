//! Layer: binary (the `peerconf` tool; uses the library's public API only).
//!
//! `peerconf demo`: local nodes on loopback in a temporary directory, until Ctrl-C.

use peerconf::node::{InitOptions, Node, NodeOptions};
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

async fn wait_up(addr: SocketAddr) {
    for _ in 0..400 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

pub async fn run(nodes: usize) -> Result<(), String> {
    if !(1..=16).contains(&nodes) {
        return Err(format!("--nodes {nodes}: between 1 and 16"));
    }
    let tmp = tempfile::Builder::new()
        .prefix("peerconf-demo-")
        .tempdir()
        .map_err(|e| format!("cannot make a temporary directory: {e}"))?;
    let mut apis: Vec<SocketAddr> = Vec::new();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    let mut first_ipc = None;
    for i in 0..nodes {
        let dir = tmp.path().join(format!("node{}", i + 1));
        let opts = InitOptions {
            name: Some(format!("node{}", i + 1)),
            api_listen: loopback_port(7700 + 10 * i as u16),
            ipc_listen: loopback_port(7701 + 10 * i as u16),
            ipc_advertise: None,
            api_tls: false,
            admin: None,
        };
        match first_ipc {
            None => {
                Node::init(&dir, &opts, &NodeOptions::default()).map_err(|e| e.to_string())?;
                first_ipc = Some((opts.ipc_listen, apis.len()));
            }
            Some((ipc, _)) => {
                let api =
                    crate::client::ApiClient::new(&apis[0].to_string(), None).map_err(|e| e.0)?;
                let t = api
                    .call(hyper::Method::POST, "/v1/tokens", Some(b"{}".to_vec()))
                    .await
                    .map_err(|e| e.0)?;
                let token = t["token"].as_str().unwrap_or_default().to_string();
                peerconf::cluster::join::join(&dir, &ipc.to_string(), &token, &opts)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        apis.push(opts.api_listen);
        let mut rx = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            peerconf::daemon::run(&dir, async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await
            .map_err(|e| e.to_string())
        }));
        wait_up(opts.api_listen).await;
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
    if apis.len() > 1 {
        println!(
            "  peerconf --api http://{} get user alice     # replicated to node2",
            apis[1]
        );
        println!("  peerconf node list");
    }
    println!("  peerconf history user alice");
    println!("  curl -s http://{api}/v1/entities/user/alice");
    println!("\nCtrl-C stops the demo and removes its directory.");
    peerconf::daemon::stop_signal().await;
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
