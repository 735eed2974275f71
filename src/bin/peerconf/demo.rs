//! Layer: binary (the `peerconf` tool; uses the library's public API only).
//!
//! `peerconf demo`: local nodes on loopback in a temporary directory, until Ctrl-C.

use crate::client::ApiClient;
use hyper::Method;
use peerconf::node::{AdminBootstrap, InitOptions, Node, NodeOptions};
use std::net::{SocketAddr, TcpListener};

/// The demo cluster's first SuperAdmin.
const DEMO_ADMIN: &str = "admin";

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

/// Logs in to the first node as its SuperAdmin (retrying while the node starts); returns the
/// session token.
async fn login(api: SocketAddr, password: &str) -> Result<String, String> {
    let c = ApiClient::new(&api.to_string(), None)?;
    let body = serde_json::to_vec(&serde_json::json!({ "name": DEMO_ADMIN, "password": password }))
        .map_err(|e| e.to_string())?;
    let mut tries = 0;
    loop {
        match c.call(Method::POST, "/v1/login", Some(body.clone())).await {
            Ok(v) => {
                return v["token"]
                    .as_str()
                    .filter(|t| !t.is_empty())
                    .map(str::to_string)
                    .ok_or_else(|| format!("the login answer of {} has no token", c.base()))
            }
            // Not listening yet, or busy starting: try again for a while.
            Err(e)
                if tries < 40
                    && e.status
                        .is_none_or(|s| s == hyper::StatusCode::SERVICE_UNAVAILABLE) =>
            {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => {
                return Err(format!(
                    "logging in to the demo's first node as {DEMO_ADMIN}: {e}"
                ))
            }
        }
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
    let password = crate::auth::generate_password()?;
    // The first node's admin API, logged in as the SuperAdmin: it makes the join tokens.
    let mut admin: Option<ApiClient> = None;
    for i in 0..nodes {
        let dir = tmp.path().join(format!("node{}", i + 1));
        let opts = InitOptions {
            name: Some(format!("node{}", i + 1)),
            api_listen: loopback_port(7700 + 10 * i as u16),
            ipc_listen: loopback_port(7701 + 10 * i as u16),
            ipc_advertise: None,
            api_tls: false,
            api_cert: None,
            api_certificate: None,
            admin: (i == 0).then(|| AdminBootstrap {
                name: DEMO_ADMIN.into(),
                password: password.clone(),
            }),
        };
        match first_ipc {
            None => {
                Node::init(&dir, &opts, &NodeOptions::default()).map_err(|e| e.to_string())?;
                first_ipc = Some((opts.ipc_listen, apis.len()));
            }
            Some((ipc, _)) => {
                let Some(api) = &admin else {
                    return Err(
                        "the demo's first node has no admin session (internal error)".into(),
                    );
                };
                let t = api
                    .call(Method::POST, "/v1/tokens", Some(b"{}".to_vec()))
                    .await
                    .map_err(String::from)?;
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
        if i == 0 {
            let session = login(opts.api_listen, &password).await?;
            admin =
                Some(ApiClient::new(&opts.api_listen.to_string(), None)?.for_admin(Some(session))?);
        }
    }
    let Some(admin) = admin else {
        return Err("the demo's first node has no admin session (internal error)".into());
    };
    // An API token for the commands the demo suggests (the session stays the demo's own).
    let made = admin
        .call(
            Method::POST,
            "/v1/api-tokens",
            Some(br#"{"label":"peerconf demo"}"#.to_vec()),
        )
        .await
        .map_err(|e| format!("making an API token on the demo's first node: {e}"))?;
    let Some(api_token) = made["token"].as_str().filter(|t| !t.is_empty()) else {
        return Err("the demo's first node made an API token but its answer has no token".into());
    };
    println!("peerconf demo: {nodes} node(s) in {}", tmp.path().display());
    for (i, api) in apis.iter().enumerate() {
        println!("  node{}  admin API http://{api}", i + 1);
    }
    let api = apis[0];
    // The commands run as printed from where the demo was started: the binary by its path
    // relative to here (target/release/peerconf after `cargo run --release -- demo`).
    let pc = std::env::current_exe()
        .ok()
        .map(|exe| {
            std::env::current_dir()
                .ok()
                .and_then(|cwd| exe.strip_prefix(cwd).ok().map(|p| p.to_path_buf()))
                .unwrap_or(exe)
        })
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "peerconf".into());
    println!("\nSuperAdmin: {DEMO_ADMIN}  password: {password}");
    println!("Web console: http://{api}/ (any node's address; sign in as {DEMO_ADMIN})");
    println!("\nTry, in another terminal:");
    println!("  export PEERCONF_API=http://{api}");
    println!("  export PEERCONF_TOKEN={api_token}     # an API token of {DEMO_ADMIN}");
    println!("  {pc} put site main --json '{{\"protocols\":[\"sftp\"],\"bindings\":[\"0.0.0.0:2222\"],\"root_dir\":\"/srv\"}}'");
    println!("  {pc} put user alice --json '{{\"home_dir\":\"/srv/alice\",\"site\":\"main\",\"password\":\"a long password\"}}'");
    println!("  {pc} list user");
    if apis.len() > 1 {
        println!(
            "  {pc} --api http://{} get user alice     # replicated to node2",
            apis[1]
        );
        println!("  {pc} node list");
    }
    println!("  {pc} history user alice");
    println!("  {pc} watch user     # follows changes (Ctrl-C to stop)");
    println!("  curl -s -H \"Authorization: Bearer $PEERCONF_TOKEN\" http://{api}/v1/entities/user/alice");
    println!("\nOr log in instead of the API token (the session is kept for that URL):");
    println!("  unset PEERCONF_TOKEN");
    println!("  printf '%s' '{password}' | {pc} --api http://{api} login --user {DEMO_ADMIN}");
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
