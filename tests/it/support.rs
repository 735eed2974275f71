//! Helpers: temporary directories, free loopback ports, child processes that are always stopped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_peerconf");

/// A loopback address nobody listens on, for a node started later. Ports come from 20000..32000,
/// below Linux's ephemeral range (32768 and up): a port the kernel hands out for port 0 or for an
/// outgoing connection of another test could be taken again before our node binds it, one from
/// this range only by another test's pick, which the per-process offset makes unlikely.
pub fn free_addr() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7919)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
    for _ in 0..1000 {
        let n = start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed).wrapping_mul(97));
        let port = 20000 + (n % 12000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return format!("127.0.0.1:{port}");
        }
    }
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().to_string()
}

/// Polls `f` until it returns Some or the deadline passes.
pub fn wait_for<T>(deadline: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let until = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `peerconf run` process, killed when dropped.
pub struct Daemon {
    pub child: Option<Child>,
    pub api: String,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(dir: &Path, api: &str) -> Daemon {
        Daemon::start_env(dir, api, &[])
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs the admin CLI against this node.
    pub fn cli(&self, args: &[&str]) -> Output {
        cli(&self.api, args, None)
    }

    pub fn cli_stdin(&self, args: &[&str], stdin: &str) -> Output {
        cli(&self.api, args, Some(stdin))
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let status = wait_for(Duration::from_secs(10), || c.try_wait().ok().flatten());
        match status {
            Some(s) => s,
            None => {
                let _ = c.kill();
                panic!("node ignored SIGTERM for 10 s: {}", self.log_text());
            }
        }
    }

    pub fn kill9(&mut self) {
        let mut c = self.child.take().expect("running");
        c.kill().unwrap();
        c.wait().unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn rand_suffix() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

// ---- Admin credentials ----
//
// Every node a test makes with [`init_node`] (or with [`admin_args`]) has the SuperAdmin
// `admin` with password [`ADMIN_PW`]; joined nodes get it by replication. The helpers below log
// in to each node's API once (a session of that node, kept for the test process) and send its
// token with every request and CLI run, so tests about other things need not care. Tests about
// authentication itself use [`try_http_as`] and [`cli_as`], which send what they are given.

/// The password of the SuperAdmin `admin` of every test cluster.
pub const ADMIN_PW: &str = "Test-admin-pw-1";

/// A file holding [`ADMIN_PW`], for `init --admin-password-file` (private to this user).
pub fn admin_pw_file() -> &'static Path {
    static FILE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("peerconf-it-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let f = dir.join("admin-pw");
        std::fs::write(&f, ADMIN_PW).expect("write the admin password file");
        f
    })
}

/// `--admin admin --admin-password-file FILE`, for `peerconf init`.
pub fn admin_args() -> Vec<String> {
    vec![
        "--admin".into(),
        "admin".into(),
        "--admin-password-file".into(),
        admin_pw_file().display().to_string(),
    ]
}

/// Where the CLI run by these helpers keeps its stored sessions: never the user's own.
pub fn cli_config_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("peerconf-it-{}/config", std::process::id()));
        std::fs::create_dir_all(&d).expect("config dir");
        d
    })
}

fn tokens() -> &'static std::sync::Mutex<std::collections::HashMap<String, String>> {
    static T: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<String, String>>> =
        std::sync::OnceLock::new();
    T.get_or_init(Default::default)
}

/// A session token of `admin` on the node whose API is at `addr` (plain HTTP), logging in if
/// none is held; None while the node cannot log anyone in (not listening, recovering, or the
/// account not replicated to it yet).
pub fn token_for(addr: &str) -> Option<String> {
    if let Some(t) = tokens().lock().unwrap().get(addr) {
        return Some(t.clone());
    }
    let body = serde_json::json!({"name": "admin", "password": ADMIN_PW}).to_string();
    match try_http_as(addr, "POST", "/v1/login", Some(&body), None) {
        Ok((200, b)) => {
            let v: serde_json::Value = serde_json::from_str(&b).ok()?;
            let t = v["token"].as_str()?.to_string();
            tokens().lock().unwrap().insert(addr.into(), t.clone());
            Some(t)
        }
        _ => None,
    }
}

/// Forgets the session held for `addr` (the node restarted: its sessions are gone).
pub fn forget_token(addr: &str) {
    tokens().lock().unwrap().remove(addr);
}

pub fn cli(api: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let o = cli_as(api, args, stdin, token_for(api).as_deref());
    if !o.status.success() && stderr(&o).contains("credentials refused") {
        // The node restarted since the login: log in again, once.
        forget_token(api);
        return cli_as(api, args, stdin, token_for(api).as_deref());
    }
    o
}

/// The CLI against `api` with exactly the credentials given (`PEERCONF_TOKEN`), and a config
/// folder of this test process.
pub fn cli_as(api: &str, args: &[&str], stdin: Option<&str>, token: Option<&str>) -> Output {
    let url = format!("http://{api}");
    let mut all = vec!["--api", url.as_str()];
    all.extend_from_slice(args);
    run_cli(&all, stdin, token)
}

/// `peerconf ARGS` with `stdin`, exactly the credentials given (`PEERCONF_TOKEN`), no
/// `PEERCONF_CACERT` from the caller's environment, and the config folder of this test process.
pub fn run_cli(args: &[&str], stdin: Option<&str>, token: Option<&str>) -> Output {
    use std::io::Write;
    let mut c = Command::new(BIN);
    c.env_remove("PEERCONF_TOKEN")
        .env_remove("PEERCONF_CACERT")
        .env("XDG_CONFIG_HOME", cli_config_dir());
    if let Some(t) = token {
        c.env("PEERCONF_TOKEN", t);
    }
    let mut child = c
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn peerconf");
    {
        let mut i = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            i.write_all(s.as_bytes()).unwrap();
        }
    }
    child.wait_with_output().unwrap()
}

pub fn stdout_json(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&o.stdout)
        )
    })
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// `peerconf init` with fresh loopback ports; returns the API address.
pub fn init(dir: &Path, name: &str) -> String {
    init_node(dir, name).0
}

// ---- Cluster helpers (tests/it/cluster.rs) ----

/// `peerconf init` with fresh loopback ports; returns (API address, IPC address, node ID).
pub fn init_node(dir: &Path, name: &str) -> (String, String, String) {
    let api = free_addr();
    let ipc = free_addr();
    let o = Command::new(BIN)
        .args(["init", "--data-dir"])
        .arg(dir)
        .args(["--name", name, "--api-listen", &api, "--ipc-listen", &ipc])
        .args(admin_args())
        .output()
        .unwrap();
    assert!(o.status.success(), "init of {name} failed: {}", stderr(&o));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert_eq!(id.len(), 32, "init of {name} printed {id:?}, not a node ID");
    (api, ipc, id)
}

/// `peerconf token create [--ttl TTL]` against a node's API; returns the token, which is alone on
/// the last line of stdout.
pub fn token_create(api: &str, ttl: Option<&str>) -> String {
    token_create_output(api, ttl).0
}

/// `peerconf token create --ttl TTL`; returns the token and when it expires, in ms since the
/// epoch of the node's wall clock, as `token create` says on stderr ("expires at N ms since the
/// epoch").
pub fn token_create_expiring(api: &str, ttl: &str) -> (String, i64) {
    let (token, o) = token_create_output(api, Some(ttl));
    let err = stderr(&o);
    let expires = err
        .split("expires at ")
        .nth(1)
        .and_then(|r| r.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("`token create` did not say when the token expires: {err:?}"));
    (token, expires)
}

fn token_create_output(api: &str, ttl: Option<&str>) -> (String, Output) {
    let mut args = vec!["token", "create"];
    if let Some(t) = ttl {
        args.extend(["--ttl", t]);
    }
    let o = cli(api, &args, None);
    assert!(o.status.success(), "token create failed: {}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let token = out.lines().last().unwrap_or_default().trim().to_string();
    assert!(
        token.starts_with("pcjoin1-"),
        "the last line of `token create` is not a token: {out:?}"
    );
    (token, o)
}

/// This machine's wall clock, in ms since the epoch (what a node on it reads).
pub fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_millis() as i64
}

/// `peerconf join` with fresh loopback ports and extra environment variables; returns the output
/// and the (API, IPC) addresses the node was given.
pub fn join_node(
    dir: &Path,
    peer: &str,
    token: &str,
    name: &str,
    envs: &[(&str, &str)],
) -> (Output, String, String) {
    let api = free_addr();
    let ipc = free_addr();
    let o = Command::new(BIN)
        .args(["join", "--data-dir"])
        .arg(dir)
        .args([
            "--peer",
            peer,
            "--token",
            token,
            "--name",
            name,
            "--api-listen",
            &api,
            "--ipc-listen",
            &ipc,
        ])
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (o, api, ipc)
}

/// `peerconf run` on a directory that must not hold a usable node: returns its output. Panics
/// (after killing it) if it is still running after 10 s.
pub fn run_must_fail(dir: &Path) -> Output {
    let mut c = Command::new(BIN)
        .args(["run", "--data-dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn peerconf run");
    let exited = wait_for(Duration::from_secs(10), || c.try_wait().ok().flatten());
    if exited.is_none() {
        let _ = c.kill();
        let o = c.wait_with_output().unwrap();
        panic!(
            "`peerconf run --data-dir {}` is still running after 10 s: the directory holds a usable node; stderr: {}",
            dir.display(),
            stderr(&o)
        );
    }
    c.wait_with_output().unwrap()
}

/// Waits until something accepts TCP connections at `addr`.
pub fn wait_listening(addr: &str, what: &str) {
    let up = wait_for(Duration::from_secs(20), || {
        std::net::TcpStream::connect(addr).ok().map(|_| ())
    });
    assert!(up.is_some(), "{what} does not listen on {addr}");
}

/// One HTTP/1.1 request with a JSON body over a plain TcpStream; returns (status, body).
pub fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    try_http(addr, method, path, body).unwrap_or_else(|e| panic!("{e}"))
}

/// [`http`], with Err naming what went wrong instead of a panic (nothing listening, no answer).
/// Sends the test session of `admin` on that node ([`token_for`]); logs in again once when the
/// node no longer knows it (it restarted).
pub fn try_http(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), String> {
    if matches!(path, "/livez" | "/readyz" | "/v1/login") {
        return try_http_as(addr, method, path, body, None);
    }
    let held = tokens().lock().unwrap().get(addr).cloned();
    let r = try_http_as(addr, method, path, body, token_for(addr).as_deref())?;
    if r.0 == 401 && held.is_some() {
        forget_token(addr);
        return try_http_as(addr, method, path, body, token_for(addr).as_deref());
    }
    Ok(r)
}

/// One HTTP/1.1 request with exactly the bearer token given (or none).
pub fn try_http_as(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect(addr).map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let body = body.unwrap_or("");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| format!("{method} {path} on {addr}: {e}"))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .map_err(|e| format!("{method} {path} on {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{method} {path} on {addr}: not an HTTP answer: {text:?}"))?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{method} {path} on {addr}: bad status line: {head:?}"))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    if !chunked {
        return Ok((status, rest.to_string()));
    }
    let mut out = String::new();
    let mut r = rest;
    while let Some((size, tail)) = r.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        r = tail[n..].trim_start_matches("\r\n");
    }
    Ok((status, out))
}

/// `GET path` that answered 200 with JSON, or None.
pub fn http_json(addr: &str, path: &str) -> Option<serde_json::Value> {
    let (status, body) = http(addr, "GET", path, None);
    if status != 200 {
        return None;
    }
    serde_json::from_str(&body).ok()
}

/// A member of a cluster formed by [`form_cluster`].
pub struct ClusterNode {
    pub name: String,
    pub dir: PathBuf,
    pub api: String,
    pub ipc: String,
    pub id: String,
    pub d: Daemon,
}

impl ClusterNode {
    /// Starts the node again after [`Daemon::stop`].
    pub fn restart(&mut self) {
        assert!(self.d.child.is_none(), "{} is still running", self.name);
        self.d = Daemon::start(&self.dir, &self.api);
        wait_listening(&self.ipc, &format!("{}'s IPC port", self.name));
    }

    /// SIGTERM; the exit must be clean.
    pub fn stop(&mut self) {
        let status = self.d.stop();
        assert!(
            status.success(),
            "{} exited with {status:?} after SIGTERM; log: {}",
            self.name,
            self.d.log_text()
        );
    }
}

/// Forms a cluster of `n` running nodes named n1..nN in `root`: `init` + `run` for n1, global
/// settings `settings` (JSON) put on n1, then `token create` on n1 + `join --peer <n1's IPC>` +
/// `run` for each other node.
pub fn form_cluster(root: &Path, n: usize, settings: &str) -> Vec<ClusterNode> {
    form_cluster_env(root, n, settings, &[])
}

/// [`form_cluster`] with extra environment variables for every `peerconf run`.
pub fn form_cluster_env(
    root: &Path,
    n: usize,
    settings: &str,
    envs: &[(&str, &str)],
) -> Vec<ClusterNode> {
    let dir = root.join("n1");
    let (api, ipc, id) = init_node(&dir, "n1");
    let d = Daemon::start_env(&dir, &api, envs);
    wait_listening(&ipc, "n1's IPC port");
    stdout_json(&d.cli(&["put", "settings", "global", "--json", settings]));
    // A joined node learns the accounts by replication; the test support's first login there
    // may come before they do, and must not lock loopback out.
    stdout_json(&d.cli(&[
        "patch",
        "security",
        "global",
        "--json",
        r#"{"max_login_attempts":0}"#,
    ]));
    let mut nodes = vec![ClusterNode {
        name: "n1".into(),
        dir,
        api,
        ipc,
        id,
        d,
    }];
    for i in 2..=n {
        let name = format!("n{i}");
        let dir = root.join(&name);
        let token = token_create(&nodes[0].api, None);
        let (o, api, ipc) = join_node(&dir, &nodes[0].ipc, &token, &name, &[]);
        assert!(o.status.success(), "join of {name} failed: {}", stderr(&o));
        let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
        assert_eq!(id.len(), 32, "join of {name} printed {id:?}, not a node ID");
        let d = Daemon::start_env(&dir, &api, envs);
        wait_listening(&ipc, &format!("{name}'s IPC port"));
        nodes.push(ClusterNode {
            name,
            dir,
            api,
            ipc,
            id,
            d,
        });
    }
    nodes
}

// ---- Health helpers (tests/it/health.rs) ----

impl Daemon {
    /// `peerconf run` with extra environment variables (an advertised version, a faked clock);
    /// waits until the node is ready, like [`Daemon::start`].
    pub fn start_env(dir: &Path, api: &str, envs: &[(&str, &str)]) -> Daemon {
        let log = dir.with_extension(format!("log{}", rand_suffix()));
        let child = Command::new(BIN)
            .args(["run", "--data-dir"])
            .arg(dir)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .expect("spawn peerconf run");
        let mut d = Daemon {
            child: Some(child),
            api: api.to_string(),
            log,
        };
        d.wait_ready(&format!("node in {} with env {envs:?}", dir.display()));
        d
    }

    /// Waits until the node's admin API serves requests: it listens as soon as the process
    /// starts but answers 503 (`recovering`) until the store is open and the node started.
    /// Panics with the log if the process exits first or is not ready within 20 s.
    pub fn wait_ready(&mut self, what: &str) {
        let mut last = String::from("nothing yet");
        let ready = wait_for(Duration::from_secs(20), || {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Some(Err(format!("it exited with {status}")));
            }
            // Ready once the store is open: the gate answers 503 until then, the API itself 401
            // without credentials (no login here: a node whose admin password the test changed
            // must not count failed logins).
            match try_http_as(&self.api, "GET", "/v1/node", None, None) {
                Ok((401 | 200, _)) => Some(Ok(())),
                Ok((status, body)) => {
                    last = format!("GET /v1/node answered {status}: {body}");
                    None
                }
                Err(e) => {
                    last = e;
                    None
                }
            }
        });
        match ready {
            Some(Ok(())) => {}
            Some(Err(why)) => panic!(
                "{what} did not come up: {why}; its log:\n{}",
                self.log_text()
            ),
            None => panic!(
                "{what} was not ready within 20 s (last: {last}); its log:\n{}",
                self.log_text()
            ),
        }
    }
}

impl ClusterNode {
    /// Starts the node again, after [`Daemon::stop`] or [`Daemon::kill9`], with extra
    /// environment variables.
    pub fn restart_env(&mut self, envs: &[(&str, &str)]) {
        assert!(self.d.child.is_none(), "{} is still running", self.name);
        self.d = Daemon::start_env(&self.dir, &self.api, envs);
        wait_listening(&self.ipc, &format!("{}'s IPC port", self.name));
    }
}
