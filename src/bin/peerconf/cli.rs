//! Layer: binary (the `peerconf` tool; uses the library's public API only).
//!
//! The `peerconf` command line: node commands (init, run) and admin commands that talk to a
//! running node's API. The admin commands never open the database themselves.

use crate::auth::{self, SessionStore};
use crate::client::{seg, ApiClient, CallError};
use clap::{Parser, Subcommand};
use hyper::Method;
use peerconf::node::{
    AdminBootstrap, InitOptions, Node, NodeOptions, DEFAULT_API_LISTEN, DEFAULT_IPC_LISTEN,
};
use serde_json::Value;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Parser, Debug)]
#[command(
    name = "peerconf",
    version,
    about = "Replicated configuration store for active/active server clusters"
)]
pub struct Cli {
    /// URL of the node's admin API.
    #[arg(
        long,
        global = true,
        env = "PEERCONF_API",
        default_value = "http://127.0.0.1:7700"
    )]
    pub api: String,
    /// The CA certificate (PEM) that an https:// admin API's certificate must chain to:
    /// `peerconf ca show --data-dir DIR` prints the cluster's.
    #[arg(long, global = true, env = "PEERCONF_CACERT")]
    pub cacert: Option<PathBuf>,
    /// The bearer token an admin command sends (an API token, or a session's): given before the
    /// command (`peerconf --token T list user`). Without it: $PEERCONF_TOKEN if set and not
    /// empty, else the session `peerconf login` stored for this --api URL.
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a node in a new data directory and print its node ID. The new cluster's first
    /// SuperAdmin is created with it: with a generated password printed once on stdout (after
    /// the node ID line), or the one in --admin-password-file.
    Init {
        #[command(flatten)]
        node: NodeArgs,
        /// Name of the first SuperAdmin.
        #[arg(long, value_name = "NAME", default_value = "admin")]
        admin: String,
        /// Read the first SuperAdmin's password from FILE (`-`: stdin; the trailing newline is
        /// not part of it) instead of generating one.
        #[arg(long, value_name = "FILE")]
        admin_password_file: Option<PathBuf>,
    },
    /// Log in to the admin API (--api) as an admin: the password is read from stdin when it is
    /// not a terminal, else asked for without echo. The session is kept in
    /// $XDG_CONFIG_HOME/peerconf/sessions.json (default ~/.config/peerconf/) for that URL.
    Login {
        /// The admin's name.
        #[arg(long, value_name = "NAME")]
        user: String,
    },
    /// End the session stored for the admin API (--api) and forget it.
    Logout,
    /// Who the admin API takes this command's credentials for: name, role, session or API token.
    Whoami,
    /// Follow committed changes (GET /v1/watch): one JSON object per line, `event` (put, delete,
    /// reset) beside the event's data; runs until interrupted.
    Watch {
        /// Only this kind.
        kind: Option<String>,
        /// Only this entity (with KIND).
        #[arg(long)]
        name: Option<String>,
        /// Replay the changes after this event number first (`seq` of an event printed before).
        #[arg(long)]
        since: Option<u64>,
    },
    /// API tokens: bearer tokens for scripts, acting as the admin who made them.
    ApiToken {
        #[command(subcommand)]
        what: ApiTokenCommand,
    },
    /// Recovery of admin access on this host.
    Admin {
        #[command(subcommand)]
        what: AdminCommand,
    },
    /// Join an existing cluster: contact a member's IPC port with a join token, then create the
    /// node in a new data directory (start it with `peerconf run`).
    Join {
        /// IPC address (host:port) of a current member.
        #[arg(long)]
        peer: String,
        /// A token from `peerconf token create` on that member.
        #[arg(long)]
        token: String,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Join tokens.
    Token {
        #[command(subcommand)]
        what: TokenCommand,
    },
    /// Cluster members.
    Node {
        #[command(subcommand)]
        what: NodeCommand,
    },
    /// The state of every node of the cluster, as this node sees it.
    Status {
        /// The report as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop taking new client connections; existing ones finish (closed at the deadline, if any).
    Drain {
        /// e.g. 30s, 5m: connections still open then are told to close.
        #[arg(long)]
        deadline: Option<String>,
    },
    /// Take client connections again.
    Undrain,
    /// The cluster CA.
    Ca {
        #[command(subcommand)]
        what: CaCommand,
    },
    /// Make replaced and deleted secrets unreadable in this node's files now: seals every secret
    /// value again under a fresh at-rest key and deletes the old key (the node also does this by
    /// itself within 10 s of forgetting a secret).
    Compact,
    /// Start a local cluster of N nodes on loopback in a temporary directory, until Ctrl-C.
    Demo {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
    },
    /// Set up a new node from a browser: serves the Setup UI on --listen (its URL, with a
    /// one-time setup code, is printed first), where the operator creates a new cluster or joins
    /// one; then the same process runs the node, its admin API and web console on --listen.
    Setup {
        /// The data directory of the node to make (it must not hold a node yet).
        #[arg(long)]
        data_dir: PathBuf,
        /// Where the Setup UI, then the node's admin API and console, listen. Off loopback they
        /// are served over HTTPS.
        #[arg(long, default_value = "127.0.0.1:7700")]
        listen: std::net::SocketAddr,
    },
    /// Run the node in DIR until SIGINT or SIGTERM.
    Run {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Rebuild a stopped node whose store is damaged from its peers: keeps its identity (node ID,
    /// certificate, node-local settings), moves the damaged database and log aside, and leaves an
    /// empty store the node fills from its peers when it runs again.
    Repair {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// List every entity of a kind.
    List { kind: String },
    /// Show one entity.
    Get { kind: String, name: String },
    /// Create or replace an entity (fields as JSON, from --json or stdin).
    Put {
        kind: String,
        name: String,
        #[arg(long)]
        json: Option<String>,
    },
    /// Change some fields of an entity (a JSON merge patch, from --json or stdin).
    Patch {
        kind: String,
        name: String,
        #[arg(long)]
        json: Option<String>,
    },
    /// Delete an entity.
    Delete { kind: String, name: String },
    /// Show the changes of an entity: who, when, which fields.
    History { kind: String, name: String },
    /// List entities whose fields hold unresolved concurrent values.
    Conflicts,
    /// Show the schema, of every kind or of one.
    Schema { kind: Option<String> },
    /// Measure this machine.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

/// The node-local settings of `init` and `join`.
#[derive(clap::Args, Debug)]
pub struct NodeArgs {
    #[arg(long)]
    data_dir: PathBuf,
    /// Human-readable node name (default: derived from the node ID).
    #[arg(long)]
    name: Option<String>,
    /// Address of the admin API.
    #[arg(long, default_value = DEFAULT_API_LISTEN)]
    api_listen: SocketAddr,
    /// Address of the peer-to-peer (IPC) port.
    #[arg(long, default_value = DEFAULT_IPC_LISTEN)]
    ipc_listen: SocketAddr,
    /// Address the other nodes reach the IPC port at (default: --ipc-listen).
    #[arg(long)]
    ipc_advertise: Option<String>,
    /// Serve the admin API over HTTPS on a loopback address too (off loopback it always is).
    #[arg(long)]
    api_tls: bool,
    /// Serve the admin API over HTTPS with this certificate chain (PEM, the node's certificate
    /// first) instead of one issued by the cluster CA; needs --api-key.
    #[arg(long, requires = "api_key")]
    api_cert: Option<PathBuf>,
    /// The private key (PEM) of --api-cert.
    #[arg(long, requires = "api_cert")]
    api_key: Option<PathBuf>,
    /// Serve the admin API over HTTPS with the `certificate` entity NAME (its chain and its
    /// write-only key, as the cluster replicates them), following it as it changes; a certificate
    /// of the cluster CA until it exists on this node.
    #[arg(long, value_name = "NAME", conflicts_with = "api_cert")]
    api_certificate: Option<String>,
}

impl NodeArgs {
    fn options(&self) -> InitOptions {
        InitOptions {
            name: self.name.clone(),
            api_listen: self.api_listen,
            ipc_listen: self.ipc_listen,
            ipc_advertise: self.ipc_advertise.clone(),
            api_tls: self.api_tls,
            api_cert: self
                .api_cert
                .as_ref()
                .zip(self.api_key.as_ref())
                .map(|(c, k)| {
                    let abs = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
                    peerconf::node::ApiCertFiles {
                        cert: abs(c),
                        key: abs(k),
                    }
                }),
            api_certificate: self.api_certificate.clone(),
            admin: None,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Print the cluster CA certificate (PEM) of the node in DIR: what `--cacert` wants to
    /// verify an admin API served over HTTPS.
    Show {
        #[arg(long)]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a single-use join token (printed alone on the last line).
    Create {
        /// How long the token stays valid, e.g. 30m, 2h (default 1h, at most 7 days).
        #[arg(long)]
        ttl: Option<String>,
    },
    /// List the join tokens this node made: ID, expiry, and whether used or revoked (never the
    /// token itself).
    List,
    /// Revoke a join token of this node: a join with it is refused from then on.
    Revoke {
        /// The token's ID as `peerconf token list` shows it (or its first 6 digits or more).
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ApiTokenCommand {
    /// Create an API token for the admin this command runs as: its ID and expiry on stderr, the
    /// token alone on the last line of stdout (shown once).
    Create {
        /// How long the token stays valid, e.g. 30m, 2h, 30d (default: the node's).
        #[arg(long)]
        ttl: Option<String>,
        /// A note saying what the token is for.
        #[arg(long)]
        label: Option<String>,
    },
    /// List API tokens: ID, admin, label, creation and expiry (never the token itself).
    List,
    /// Revoke an API token: a request with it is refused from then on.
    Revoke {
        /// The token's ID as `peerconf api-token list` shows it.
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Make NAME an enabled SuperAdmin with a new password, on a stopped node (run on its
    /// host): for when no SuperAdmin can log in. The change replicates when the node next runs.
    Reset {
        #[arg(long)]
        data_dir: PathBuf,
        /// The admin's name (created if it does not exist).
        #[arg(long, value_name = "NAME")]
        user: String,
        /// Read the new password from FILE (`-`: stdin; the trailing newline is not part of
        /// it) instead of generating one (printed once on stdout).
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// List the members of the cluster.
    List,
    /// Remove a member: every node refuses its certificate from then on.
    Remove { id: String },
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Load N users into a fresh node: writes/s, write latency, listing time, peak RSS.
    Store {
        #[arg(long, default_value_t = 100_000)]
        entities: usize,
        /// Concurrent writers.
        #[arg(long, default_value_t = 64)]
        writers: usize,
    },
    /// A local 3-node cluster: write-to-visible latency, throughput, catch-up, idle traffic.
    Cluster {
        /// Entities in the cluster for the catch-up and idle measurements.
        #[arg(long, default_value_t = 100_000)]
        entities: usize,
        /// Replication cycle period during the benchmark.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// Measure only write-to-visible latency with one writer, this many writes (for profiling
        /// the replication path).
        #[arg(long)]
        latency_only: Option<usize>,
    },
    /// Crash recovery: a node's log filled by one hot document, then by many documents (on top
    /// of ENTITIES stored ones), copied as a crash leaves it, and reopened: how long until it
    /// serves.
    Recovery {
        #[arg(long, default_value_t = 10_000)]
        entities: usize,
    },
}

fn body_arg(json: Option<String>) -> Result<Vec<u8>, CallError> {
    let text = match json {
        Some(j) => j,
        None => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| CallError::new(format!("reading JSON from stdin: {e}")))?;
            s
        }
    };
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| CallError::new(format!("the fields are not valid JSON: {e}")))?;
    Ok(serde_json::to_vec(&v).expect("json serializes"))
}

fn kind_arg(kind: &str) -> Result<String, CallError> {
    crdt_schema::Kind::parse(kind)
        .map(|k| k.as_str().to_string())
        .map_err(|e| CallError::new(e.to_string()))
}

/// Runs a command; returns the process exit code.
pub fn main(cli: Cli) -> i32 {
    let token = cli.token.as_deref();
    let result = match cli.command {
        Command::Init {
            node,
            admin,
            admin_password_file,
        } => init(&node, &admin, admin_password_file.as_deref()),
        Command::Login { user } => login(&cli.api, cli.cacert.as_deref(), &user),
        Command::Logout => logout(&cli.api, cli.cacert.as_deref()),
        Command::Admin {
            what:
                AdminCommand::Reset {
                    data_dir,
                    user,
                    password_file,
                },
        } => admin_reset(&data_dir, &user, password_file.as_deref()),
        Command::Watch { kind, name, since } => runtime().and_then(|rt| {
            rt.block_on(async {
                let c = admin_client(&cli.api, cli.cacert.as_deref(), token)?;
                let mut q = Vec::new();
                if let Some(k) = &kind {
                    q.push(format!("kind={}", kind_arg(k)?));
                }
                if let Some(n) = &name {
                    q.push(format!("name={}", seg(n)));
                }
                if let Some(s) = since {
                    q.push(format!("since={s}"));
                }
                let path = format!("/v1/watch?{}", q.join("&"));
                let mut event = String::from("message");
                let mut out = std::io::stdout();
                c.stream_lines(&path, |line| {
                    use std::io::Write;
                    if let Some(e) = line.strip_prefix("event:") {
                        event = e.trim().to_string();
                    } else if let Some(d) = line.strip_prefix("data:") {
                        let mut v: Value = serde_json::from_str(d.trim())
                            .unwrap_or_else(|_| Value::String(d.trim().to_string()));
                        if let Some(o) = v.as_object_mut() {
                            o.insert("event".into(), Value::String(event.clone()));
                        }
                        // A closed stdout (a pipe whose reader left) ends the watch.
                        if writeln!(out, "{v}").and_then(|_| out.flush()).is_err() {
                            return false;
                        }
                    } else if line.is_empty() {
                        event = "message".into();
                    }
                    true
                })
                .await
                .map_err(|e| e.to_string())
            })
        }),
        Command::ApiToken {
            what: ApiTokenCommand::Create { ttl, label },
        } => runtime().and_then(|rt| {
            rt.block_on(async {
                let c = admin_client(&cli.api, cli.cacert.as_deref(), token)?;
                let mut body = serde_json::Map::new();
                if let Some(ttl) = ttl {
                    body.insert("ttl".into(), Value::String(ttl));
                }
                if let Some(label) = label {
                    body.insert("label".into(), Value::String(label));
                }
                let body = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
                let v = c.call(Method::POST, "/v1/api-tokens", Some(body)).await?;
                let Some(t) = v["token"].as_str().filter(|t| !t.is_empty()) else {
                    return Err(format!("the answer of {} has no token", c.base()));
                };
                eprintln!(
                    "API token {} of admin {}{}, expires at {} (shown once; revoke it with: peerconf api-token revoke {}):",
                    v["id"].as_str().map_or("?".into(), printable),
                    v["admin"].as_str().map_or("?".into(), printable),
                    v["label"]
                        .as_str()
                        .filter(|l| !l.is_empty())
                        .map_or(String::new(), |l| format!(" ({})", printable(l))),
                    v["expires_at_ms"]
                        .as_u64()
                        .map_or("?".into(), auth::format_ms),
                    v["id"].as_str().map_or("ID".into(), printable),
                );
                println!("{t}");
                Ok(())
            })
        }),
        Command::Repair { data_dir } => {
            let clock = peerconf::node::time::SystemClock::shared();
            peerconf::node::setup::repair(&data_dir, clock.as_ref())
                .map(|r| {
                    for m in &r.moved_to {
                        eprintln!("moved aside: {}", m.display());
                    }
                    eprintln!(
                        "node {} ({}) has an empty store{}; start it with: peerconf run --data-dir {} (it fetches everything from its peers)",
                        r.config.name,
                        r.config.node_id,
                        if r.members_kept {
                            " and its member list"
                        } else {
                            " (its member list is learned from its peers' heartbeats)"
                        },
                        data_dir.display()
                    );
                    println!("{}", r.config.node_id);
                })
                .map_err(|e| e.to_string())
        }
        Command::Setup { data_dir, listen } => runtime().and_then(|rt| {
            let shown = data_dir.display().to_string();
            rt.block_on(peerconf::daemon::setup(
                &data_dir,
                listen,
                peerconf::daemon::stop_signal(),
                |a| {
                    println!("Set up this node in a browser (the link carries a one-time setup code; keep it private):");
                    println!("  {}", a.url);
                    if let Some(fp) = &a.cert_sha256 {
                        println!("The page is HTTPS with a self-signed certificate; its SHA-256 fingerprint is {fp}");
                    }
                    println!("Create a new cluster or join one there; this process then runs the node (data in {shown}), its console at /ui/ on the same address.");
                },
            ))
            .map_err(|e| e.to_string())
        }),
        Command::Run { data_dir } => runtime().and_then(|rt| {
            rt.block_on(peerconf::daemon::run(&data_dir, peerconf::daemon::stop_signal()))
                .map_err(|e| e.to_string())
        }),
        Command::Join { peer, token, node } => {
            let data_dir = node.data_dir.clone();
            let opts = node.options();
            runtime().and_then(|rt| {
                rt.block_on(peerconf::cluster::join::join(&data_dir, &peer, &token, &opts))
                    .map(|cfg| {
                        eprintln!(
                            "node {} ({}) joined cluster {}; start it with: peerconf run --data-dir {}",
                            cfg.name,
                            cfg.node_id,
                            cfg.cluster_id,
                            data_dir.display()
                        );
                        println!("{}", cfg.node_id);
                    })
                    .map_err(|e| e.to_string())
            })
        }
        Command::Token {
            what: TokenCommand::Create { ttl },
        } => runtime().and_then(|rt| {
            rt.block_on(async {
                let c = admin_client(&cli.api, cli.cacert.as_deref(), token)?;
                let body = serde_json::to_vec(&serde_json::json!({ "ttl": ttl })).expect("json");
                let v = c.call(Method::POST, "/v1/tokens", Some(body)).await.map_err(String::from)?;
                eprintln!(
                    "single-use join token for peerconf join --peer {} (expires at {} ms since the epoch):",
                    v["ipc"].as_str().unwrap_or("?"),
                    v["expires_wall_ms"]
                );
                println!("{}", v["token"].as_str().unwrap_or_default());
                Ok(())
            })
        }),
        Command::Status { json: false } => runtime().and_then(|rt| {
            rt.block_on(async {
                let c = admin_client(&cli.api, cli.cacert.as_deref(), token)?;
                let v = c.call(Method::GET, "/v1/status", None).await.map_err(String::from)?;
                print!("{}", status_table(&v));
                Ok(())
            })
        }),
        Command::Demo { nodes } => runtime().and_then(|rt| rt.block_on(crate::demo::run(nodes))),
        Command::Ca {
            what: CaCommand::Show { data_dir },
        } => peerconf::net::tls::TlsFiles::new(&data_dir)
            .read()
            .map(|m| print!("{}", m.ca_cert_pem))
            .map_err(|e| format!("{}: {e}", data_dir.display())),
        Command::Bench { what } => match what {
            BenchCommand::Store { entities, writers } => {
                runtime().and_then(|rt| rt.block_on(crate::bench::store(entities, writers)))
            }
            BenchCommand::Cluster {
                entities,
                interval_ms,
                latency_only,
            } => runtime().and_then(|rt| {
                rt.block_on(crate::bench::cluster(entities, interval_ms, latency_only))
            }),
            BenchCommand::Recovery { entities } => {
                runtime().and_then(|rt| rt.block_on(crate::bench::recovery(entities)))
            }
        },
        admin => runtime().and_then(|rt| {
            rt.block_on(async {
                let c = admin_client(&cli.api, cli.cacert.as_deref(), token)?;
                admin_command(&c, admin).await
            })
                .map(|v| {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&v).expect("json serializes")
                    );
                })
                .map_err(String::from)
        }),
    };
    match result {
        Ok(()) => 0,
        Err(msg) => {
            eprintln!("error: {msg}");
            1
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

/// The client of an admin command, with its credentials: `--token`, else `PEERCONF_TOKEN` (set
/// and not empty), else the session stored for the URL, else none (the node then answers 401,
/// which the client explains as "log in").
fn admin_client(
    api: &str,
    cacert: Option<&Path>,
    flag: Option<&str>,
) -> Result<ApiClient, CallError> {
    let c = ApiClient::new(api, cacert)?;
    let env = std::env::var(auth::TOKEN_ENV).ok();
    let token = auth::resolve_token(flag, env.as_deref(), || {
        // Without a configuration directory there is no stored session: none is sent.
        let Ok(dir) = auth::default_config_dir() else {
            return Ok(None);
        };
        Ok(SessionStore::new(dir).get(c.base())?.map(|s| s.token))
    })
    .map_err(CallError::new)?;
    c.for_admin(token.map(|(t, _)| t))
}

/// The password of `init` or `admin reset`: from FILE (`-`: stdin), else generated; and whether
/// it was generated (then it is printed once).
fn new_password(file: Option<&Path>) -> Result<(String, bool), String> {
    match file {
        Some(f) => auth::read_password_file(f).map(|p| (p, false)),
        None => auth::generate_password().map(|p| (p, true)),
    }
}

fn check_admin_name(name: &str, flag: &str) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err(format!("{flag}: the admin's name is empty"));
    }
    Ok(())
}

/// `peerconf init`: the node and its first SuperAdmin. Stdout's first line is the node ID alone;
/// a generated password follows it, labelled.
fn init(node: &NodeArgs, admin: &str, password_file: Option<&Path>) -> Result<(), String> {
    check_admin_name(admin, "--admin")?;
    let (password, generated) = new_password(password_file)?;
    let data_dir = node.data_dir.clone();
    let mut opts = node.options();
    opts.admin = Some(AdminBootstrap {
        name: admin.to_string(),
        password: password.clone(),
    });
    let cfg = Node::init(&data_dir, &opts, &NodeOptions::default()).map_err(|e| e.to_string())?;
    eprintln!(
        "initialised node {} ({}) in {}; start it with: peerconf run --data-dir {}",
        cfg.name,
        cfg.node_id,
        data_dir.display(),
        data_dir.display()
    );
    println!("{}", cfg.node_id);
    if generated {
        println!("first SuperAdmin: {admin}");
        println!("password (shown once, store it now): {password}");
    } else {
        eprintln!("first SuperAdmin: {admin} (with the password given)");
    }
    Ok(())
}

/// `peerconf admin reset`: on a stopped node, makes `user` an enabled SuperAdmin with a new
/// password.
fn admin_reset(data_dir: &Path, user: &str, password_file: Option<&Path>) -> Result<(), String> {
    check_admin_name(user, "--user")?;
    let (password, generated) = new_password(password_file)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let node = Node::open(data_dir, NodeOptions::default()).map_err(|e| {
        format!(
            "cannot open the node in {}: {e} (admin reset works on a stopped node: if `peerconf run` is running on it, stop it first)",
            data_dir.display()
        )
    })?;
    let reset = rt.block_on(node.reset_superadmin(user, &password));
    node.shutdown();
    reset.map_err(|e| format!("resetting admin {user} in {}: {e}", data_dir.display()))?;
    eprintln!(
        "{user} is an enabled SuperAdmin of the node in {} with a new password; the change replicates to the other nodes when this node next runs (peerconf run --data-dir {})",
        data_dir.display(),
        data_dir.display()
    );
    if generated {
        println!("SuperAdmin: {user}");
        println!("password (shown once, store it now): {password}");
    }
    Ok(())
}

/// `peerconf login`: asks the node for a session and stores it for the URL.
fn login(api: &str, cacert: Option<&Path>, user: &str) -> Result<(), String> {
    check_admin_name(user, "--user")?;
    let c = ApiClient::new(api, cacert)?;
    let store = SessionStore::new(auth::default_config_dir()?);
    let password = auth::read_login_password(&format!("password of {user} at {}: ", c.base()))?;
    let body = serde_json::to_vec(&serde_json::json!({ "name": user, "password": password }))
        .map_err(|e| e.to_string())?;
    let v = runtime()?.block_on(c.call(Method::POST, "/v1/login", Some(body)))?;
    let Some(token) = v["token"].as_str().filter(|t| !t.is_empty()) else {
        return Err(format!("the login answer of {} has no token", c.base()));
    };
    let session = auth::Session {
        token: token.to_string(),
        name: v["name"].as_str().unwrap_or(user).to_string(),
        role: v["role"].as_str().unwrap_or_default().to_string(),
        expires_at_ms: v["expires_at_ms"].as_u64(),
    };
    let (name, role, expires) = (
        printable(&session.name),
        printable(&session.role),
        session.expires_at_ms,
    );
    store.put(c.base(), session)?;
    eprintln!(
        "logged in to {} as {name}{}{}; the session is kept in {}",
        c.base(),
        if role.is_empty() {
            String::new()
        } else {
            format!(" ({role})")
        },
        expires.map_or(String::new(), |ms| format!(
            " until {} at the latest",
            auth::format_ms(ms)
        )),
        store.path().display()
    );
    Ok(())
}

/// `peerconf logout`: ends the stored session on the node (if it can be reached) and forgets it.
fn logout(api: &str, cacert: Option<&Path>) -> Result<(), String> {
    let c = ApiClient::new(api, cacert)?;
    let base = c.base().to_string();
    let store = SessionStore::new(auth::default_config_dir()?);
    let Some(session) = store.get(&base)? else {
        eprintln!(
            "no session stored for {base} (in {}): nothing to do",
            store.path().display()
        );
        return Ok(());
    };
    let ended = match c.with_bearer(&session.token) {
        Ok(c) => runtime()?
            .block_on(c.call(Method::POST, "/v1/logout", None))
            .map(|_| ()),
        Err(e) => Err(e),
    };
    store.remove(&base)?;
    match ended {
        Ok(()) => eprintln!(
            "logged out of {base}: the node ended the session, and it is removed from {}",
            store.path().display()
        ),
        Err(e) => eprintln!(
            "the session of {base} is removed from {} (the node did not confirm ending it: {e})",
            store.path().display()
        ),
    }
    Ok(())
}

async fn admin_command(c: &ApiClient, cmd: Command) -> Result<Value, CallError> {
    let entity = |k: &str, n: &str| -> Result<String, CallError> {
        Ok(format!("/v1/entities/{}/{}", kind_arg(k)?, seg(n)))
    };
    match cmd {
        Command::List { kind } => {
            c.call(
                Method::GET,
                &format!("/v1/entities/{}", kind_arg(&kind)?),
                None,
            )
            .await
        }
        Command::Get { kind, name } => c.call(Method::GET, &entity(&kind, &name)?, None).await,
        Command::Put { kind, name, json } => {
            let path = entity(&kind, &name)?;
            c.call(Method::PUT, &path, Some(body_arg(json)?)).await
        }
        Command::Patch { kind, name, json } => {
            let path = entity(&kind, &name)?;
            c.call(Method::PATCH, &path, Some(body_arg(json)?)).await
        }
        Command::Delete { kind, name } => {
            c.call(Method::DELETE, &entity(&kind, &name)?, None).await
        }
        Command::History { kind, name } => {
            c.call(
                Method::GET,
                &format!("{}/history", entity(&kind, &name)?),
                None,
            )
            .await
        }
        Command::Conflicts => c.call(Method::GET, "/v1/conflicts", None).await,
        Command::Schema { kind } => {
            let path = match kind {
                Some(k) => format!("/v1/schema/{}", kind_arg(&k)?),
                None => "/v1/schema".to_string(),
            };
            c.call(Method::GET, &path, None).await
        }
        Command::Node {
            what: NodeCommand::List,
        } => c.call(Method::GET, "/v1/nodes", None).await,
        Command::Status { .. } => c.call(Method::GET, "/v1/status", None).await,
        Command::Drain { deadline } => {
            let body =
                serde_json::to_vec(&serde_json::json!({ "deadline": deadline })).expect("json");
            c.call(Method::POST, "/v1/drain", Some(body)).await
        }
        Command::Undrain => c.call(Method::POST, "/v1/undrain", None).await,
        Command::Compact => c.call(Method::POST, "/v1/compact", None).await,
        Command::Node {
            what: NodeCommand::Remove { id },
        } => {
            c.call(Method::DELETE, &format!("/v1/nodes/{}", seg(&id)), None)
                .await
        }
        Command::Token {
            what: TokenCommand::List,
        } => c.call(Method::GET, "/v1/tokens", None).await,
        Command::Whoami => c.call(Method::GET, "/v1/whoami", None).await,
        Command::ApiToken {
            what: ApiTokenCommand::List,
        } => c.call(Method::GET, "/v1/api-tokens", None).await,
        Command::ApiToken {
            what: ApiTokenCommand::Revoke { id },
        } => {
            c.call(
                Method::DELETE,
                &format!("/v1/api-tokens/{}", seg(&id)),
                None,
            )
            .await
        }
        Command::Token {
            what: TokenCommand::Revoke { id },
        } => {
            c.call(Method::DELETE, &format!("/v1/tokens/{}", seg(&id)), None)
                .await
        }
        Command::Init { .. }
        | Command::Setup { .. }
        | Command::Run { .. }
        | Command::Repair { .. }
        | Command::Bench { .. }
        | Command::Demo { .. }
        | Command::Join { .. }
        | Command::Ca { .. }
        | Command::Login { .. }
        | Command::Logout
        | Command::Admin { .. }
        | Command::Watch { .. }
        | Command::ApiToken {
            what: ApiTokenCommand::Create { .. },
        }
        | Command::Token {
            what: TokenCommand::Create { .. },
        } => Err(CallError::new(
            "this command does not talk to the admin API (internal error)",
        )),
    }
}

/// `peerconf status` as a table.
fn status_table(v: &Value) -> String {
    let mut out = format!(
        "cluster {}  state {}  (seen from {})\n",
        v["cluster_id"].as_str().map_or("?".into(), printable),
        v["state"].as_str().map_or("?".into(), printable),
        v["name"].as_str().map_or("?".into(), printable)
    );
    out.push_str(&format!(
        "{:<16} {:<12} {:<22} {:<8} {:>9} {:>8} {:>10} {:>8}  {}\n",
        "NAME",
        "STATUS",
        "ADDRESS",
        "VERSION",
        "HEARD(ms)",
        "RTT(ms)",
        "OFFSET(ms)",
        "UNSYNCED",
        "LAST ERROR"
    ));
    let num = |x: &Value| match x.as_f64() {
        Some(f) => format!("{f:.1}"),
        None => "-".into(),
    };
    for n in v["nodes"].as_array().into_iter().flatten() {
        let me = if n["self"].as_bool() == Some(true) {
            "*"
        } else {
            ""
        };
        let err = n["last_error"]["cause"].as_str().map(|c| {
            printable(&format!(
                "{c}: {}",
                n["last_error"]["message"].as_str().unwrap_or("")
            ))
        });
        out.push_str(&format!(
            "{:<16} {:<12} {:<22} {:<8} {:>9} {:>8} {:>10} {:>8}  {}\n",
            format!("{}{me}", n["name"].as_str().map_or("?".into(), printable)),
            n["status"].as_str().map_or("?".into(), printable),
            n["address"].as_str().map_or("?".into(), printable),
            n["version"].as_str().map_or("?".into(), printable),
            n["last_heartbeat_ms_ago"]
                .as_u64()
                .map_or("-".into(), |x| x.to_string()),
            num(&n["rtt_ms"]),
            num(&n["clock_offset_ms"]),
            n["docs_out_of_sync"]
                .as_u64()
                .map_or("-".into(), |x| x.to_string()),
            err.unwrap_or_default()
        ));
    }
    out
}

/// `s` with every control character escaped (`\u{1b}`, `\n`, ...): what a node reports about
/// itself or its peers (names, addresses, error messages) never moves the cursor, clears the
/// screen or starts a new line in a terminal.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_table_escapes_what_nodes_report() {
        let v = serde_json::json!({
            "cluster_id": "c1",
            "state": "healthy",
            "name": "a\u{1b}[2Jb",
            "nodes": [{
                "name": "evil\u{1b}]0;owned\u{7}\nforged log line",
                "status": "ONLINE",
                "address": "127.0.0.1:1\r",
                "version": "0.1.0",
                "last_error": {"cause": "tls", "message": "bad\u{9b}31m"}
            }]
        });
        let table = status_table(&v);
        assert!(!table.contains('\u{1b}'), "{table:?}");
        assert!(!table.contains('\u{7}') && !table.contains('\r') && !table.contains('\u{9b}'));
        // The header, the column titles and one row: the name's newline did not add a line.
        assert_eq!(table.lines().count(), 3, "{table}");
        assert!(table.contains("evil\\u{1b}]0;owned\\u{7}\\nforged log line"));
    }
}
