//! A file-transfer server that embeds peerconf: it opens a node in-process, reads its
//! configuration as typed values, and applies every committed change live from the change feed.
//!
//!     cargo run --example embedded_server -- /tmp/embedded-node
//!
//! It initialises the directory on first use, writes a site and a user so there is something to
//! see, and runs until Ctrl-C.

use peerconf::typed::{Site, User};
use peerconf::{Kind, Node, NodeOptions};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::PathBuf;

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

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir: PathBuf = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("peerconf-embedded-example"));
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

    node.put(
        Kind::Site,
        "main",
        json!({"protocols": ["sftp"], "bindings": ["0.0.0.0:2222"], "root_dir": "/srv/main"}),
    )
    .await?;
    node.put(
        Kind::User,
        "demo",
        json!({"home_dir": "/srv/main/demo", "site": "main", "password": "demo-password-1"}),
    )
    .await?;

    loop {
        tokio::select! {
            ev = feed.recv() => match ev {
                Ok(ev) => {
                    live.apply(&node, &ev)?;
                    println!("{} {} {} ({:?}): {} sites, {} users live",
                        if ev.alive { "changed" } else { "deleted" }, ev.kind, ev.name, ev.origin,
                        live.sites.len(), live.users.len());
                    if ev.kind == Kind::User && ev.name == "demo" {
                        let ok = node.verify_password(Kind::User, "demo", "demo-password-1")?;
                        println!("login check for demo: {}", if ok { "accepted" } else { "refused" });
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    println!("missed {n} changes: reloading");
                    live = LiveConfig::load(&node)?;
                }
                Err(_) => break,
            },
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    tokio::task::spawn_blocking(move || node.shutdown()).await?;
    Ok(())
}
