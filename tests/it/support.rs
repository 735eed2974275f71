//! Helpers: temporary directories, free loopback ports, child processes that are always stopped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_peerconf");

pub fn free_addr() -> String {
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
        let log = dir.with_extension(format!("log{}", rand_suffix()));
        let child = Command::new(BIN)
            .args(["run", "--data-dir"])
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .expect("spawn peerconf run");
        let d = Daemon {
            child: Some(child),
            api: api.to_string(),
            log,
        };
        let up = wait_for(Duration::from_secs(20), || {
            std::net::TcpStream::connect(api).ok().map(|_| ())
        });
        assert!(up.is_some(), "node did not come up: {}", d.log_text());
        d
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

pub fn cli(api: &str, args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .arg("--api")
        .arg(format!("http://{api}"))
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
    let api = free_addr();
    let ipc = free_addr();
    let o = Command::new(BIN)
        .args(["init", "--data-dir"])
        .arg(dir)
        .args(["--name", name, "--api-listen", &api, "--ipc-listen", &ipc])
        .output()
        .unwrap();
    assert!(o.status.success(), "init failed: {}", stderr(&o));
    api
}
