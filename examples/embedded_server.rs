//! A file-transfer server that embeds peerconf. It opens a node in-process and serves it (admin
//! API, replication, health), reads its configuration as typed values and applies every committed
//! change live from the change feed, and runs a toy line-based client service that honours drain:
//! new connections are refused while the node drains, open ones finish, and at the drain's
//! deadline the ones still open are told to close.
//!
//!     peerconf init --data-dir /tmp/ex
//!     cargo run --example embedded_server -- /tmp/ex 127.0.0.1:2121
//!     nc 127.0.0.1 2121                       # "220 ready", then echoes lines
//!     peerconf drain --deadline 30s           # new connections get "421 draining"
//!     peerconf undrain
//!
//! Without a data directory argument it initialises one in the temporary directory.

use peerconf::typed::{Site, User};
use peerconf::{Kind, Node, NodeOptions};
use std::collections::BTreeMap;
use std::path::PathBuf;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// The server's live view of its configuration.
#[derive(Default)]
struct LiveConfig {
    sites: BTreeMap<String, Site>,
    users: BTreeMap<String, User>,
}

impl LiveConfig {
    fn load(node: &Node) -> Result<LiveConfig, peerconf::Error> {
        Ok(LiveConfig {
            sites: node.list_typed::<Site>()?.into_iter().collect(),
            users: node.list_typed::<User>()?.into_iter().collect(),
        })
    }

    /// Applies one change: re-reads just that entity.
    fn apply(&mut self, node: &Node, ev: &peerconf::ChangeEvent) -> Result<(), peerconf::Error> {
        match ev.kind {
            Kind::Site => match node.get_typed::<Site>(&ev.name)? {
                Some(s) => {
                    self.sites.insert(ev.name.clone(), s);
                }
                None => {
                    self.sites.remove(&ev.name);
                }
            },
            Kind::User => match node.get_typed::<User>(&ev.name)? {
                Some(u) => {
                    self.users.insert(ev.name.clone(), u);
                }
                None => {
                    self.users.remove(&ev.name);
                }
            },
            _ => {}
        }
        Ok(())
    }
}

/// One client connection of the toy service: greets, echoes lines, and closes when the client
/// does or when the drain deadline passes.
async fn client(mut sock: tokio::net::TcpStream, node: Node) {
    let Some(guard) = node.drain().admit() else {
        let _ = sock.write_all(b"421 draining, try another node\r\n").await;
        return;
    };
    let (r, mut w) = sock.split();
    let mut lines = BufReader::new(r).lines();
    if w.write_all(b"220 ready\r\n").await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(l)) => {
                    if w.write_all(format!("250 {l}\r\n").as_bytes()).await.is_err() {
                        return;
                    }
                }
                _ => return,
            },
            _ = guard.closing() => {
                let _ = w.write_all(b"421 closing: the node was drained\r\n").await;
                return;
            }
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let dir: PathBuf = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("peerconf-embedded-example"));
    let service = args.next().unwrap_or_else(|| "127.0.0.1:2121".to_string());
    if !dir.join(peerconf::node::DB_FILE).exists() {
        let cfg = Node::init(&dir, &Default::default(), &NodeOptions::default())?;
        println!("initialised node {} in {}", cfg.node_id, dir.display());
    }
    let node = Node::open(&dir, NodeOptions::default())?;
    // Subscribe before loading, so no change falls between the two.
    let mut feed = node.subscribe();
    let mut live = LiveConfig::load(&node)?;
    println!(
        "loaded {} sites and {} users",
        live.sites.len(),
        live.users.len()
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut rx = stop_rx.clone();
    let served = tokio::spawn(peerconf::daemon::serve(node.clone(), async move {
        let _ = rx.wait_for(|s| *s).await;
    }));
    let listener = tokio::net::TcpListener::bind(&service).await?;
    println!("service listening on {}", listener.local_addr()?);

    loop {
        tokio::select! {
            acc = listener.accept() => {
                if let Ok((sock, _)) = acc {
                    tokio::spawn(client(sock, node.clone()));
                }
            }
            ev = feed.recv() => match ev {
                Ok(ev) => {
                    live.apply(&node, &ev)?;
                    println!("{} {} {} ({:?}): {} sites, {} users live",
                        if ev.alive { "changed" } else { "deleted" }, ev.kind, ev.name, ev.origin,
                        live.sites.len(), live.users.len());
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    println!("missed {n} changes: reloading");
                    live = LiveConfig::load(&node)?;
                }
                Err(_) => break,
            },
            _ = peerconf::daemon::stop_signal() => break,
        }
    }
    // Stop taking clients, let the open ones finish (at most 10 s), then stop the node.
    node.drain().start(Some(std::time::Duration::from_secs(10)));
    let outcome = node.drain().drained().await;
    println!("drained: {outcome:?}");
    let _ = stop_tx.send(true);
    let _ = served.await;
    tokio::task::spawn_blocking(move || node.shutdown()).await?;
    Ok(())
}
