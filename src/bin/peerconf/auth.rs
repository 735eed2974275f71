//! Layer: binary (the `peerconf` tool; uses the library's public API only).
//!
//! The CLI's credentials: the sessions `peerconf login` stores (one per admin API URL, in
//! `$XDG_CONFIG_HOME/peerconf/sessions.json`), which credentials an admin command sends
//! (`--token`, else `PEERCONF_TOKEN`, else the stored session), and passwords: read from a
//! file, from stdin or a terminal without echo, or generated.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The environment variable an admin command takes its token from when `--token` is not given.
pub const TOKEN_ENV: &str = "PEERCONF_TOKEN";

/// The session file's name, in the `peerconf` directory of the user's configuration directory.
const SESSIONS_FILE: &str = "sessions.json";

/// Length of a generated password: 24 letters and digits, about 143 bits.
const GENERATED_PASSWORD_LEN: usize = 24;

/// One stored session: what `POST /v1/login` answered.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Session {
    pub token: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub role: String,
    #[serde(default)]
    pub expires_at_ms: Option<u64>,
}

/// The session file: the session of each admin API URL the user logged in to.
#[derive(Serialize, Deserialize, Debug, Default, PartialEq)]
pub struct Sessions {
    #[serde(default)]
    pub sessions: BTreeMap<String, Session>,
}

/// The directory of the CLI's configuration: `$XDG_CONFIG_HOME/peerconf`, or
/// `$HOME/.config/peerconf` when `XDG_CONFIG_HOME` is unset, empty or relative (the XDG base
/// directory rules ignore a relative one).
pub fn config_dir(
    xdg_config_home: Option<OsString>,
    home: Option<OsString>,
) -> Result<PathBuf, String> {
    if let Some(x) = xdg_config_home.filter(|x| !x.is_empty()) {
        let p = PathBuf::from(x);
        if p.is_absolute() {
            return Ok(p.join("peerconf"));
        }
    }
    match home.filter(|h| !h.is_empty()) {
        Some(h) => Ok(PathBuf::from(h).join(".config").join("peerconf")),
        None => Err(
            "neither XDG_CONFIG_HOME nor HOME is set: no place to keep the login session (pass --token or set PEERCONF_TOKEN instead)"
                .into(),
        ),
    }
}

/// [`config_dir`] of this process's environment.
pub fn default_config_dir() -> Result<PathBuf, String> {
    config_dir(
        std::env::var_os("XDG_CONFIG_HOME"),
        std::env::var_os("HOME"),
    )
}

/// The session file in `dir` (the `peerconf` configuration directory).
pub struct SessionStore {
    dir: PathBuf,
}

impl SessionStore {
    pub fn new(dir: PathBuf) -> SessionStore {
        SessionStore { dir }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(SESSIONS_FILE)
    }

    /// Every stored session (none when the file does not exist yet).
    pub fn load(&self) -> Result<Sessions, String> {
        let path = self.path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Sessions::default()),
            Err(e) => return Err(format!("reading the sessions file {}: {e}", path.display())),
        };
        serde_json::from_str(&text).map_err(|e| {
            format!(
                "the sessions file {} is damaged ({e}): remove it and log in again",
                path.display()
            )
        })
    }

    /// The session stored for the API at `url` (a normalized URL).
    pub fn get(&self, url: &str) -> Result<Option<Session>, String> {
        Ok(self.load()?.sessions.remove(url))
    }

    /// Stores `session` for `url`, keeping the other URLs' sessions.
    pub fn put(&self, url: &str, session: Session) -> Result<(), String> {
        let mut all = self.load()?;
        all.sessions.insert(url.to_string(), session);
        self.save(&all)
    }

    /// Removes the session of `url`; returns it if there was one.
    pub fn remove(&self, url: &str) -> Result<Option<Session>, String> {
        let mut all = self.load()?;
        let gone = all.sessions.remove(url);
        if gone.is_some() {
            self.save(&all)?;
        }
        Ok(gone)
    }

    /// Writes the whole file: the directory made (mode 0700) if missing, a temporary file made
    /// with mode 0600 beside it, written, synced and renamed over the old one, so that a crash
    /// leaves the old file or the new one, never a part of one, and no other user ever can read
    /// a token.
    fn save(&self, all: &Sessions) -> Result<(), String> {
        let dir = &self.dir;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("creating the directory {}: {e}", dir.display()))?;
        // A directory that existed already (made by hand, say) is made private too.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("making {} private (mode 0700): {e}", dir.display()))?;
        let path = self.path();
        let text =
            serde_json::to_vec_pretty(all).map_err(|e| format!("encoding the sessions: {e}"))?;
        let tmp = dir.join(format!(
            ".{SESSIONS_FILE}.{}.{:08x}.tmp",
            std::process::id(),
            rand::random::<u32>()
        ));
        let written = (|| -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&text)?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            // The rename itself reaches the disk.
            std::fs::File::open(dir)?.sync_all()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(format!("writing the sessions file {}: {e}", path.display()));
        }
        Ok(())
    }
}

/// Where an admin command's credentials came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Flag,
    Env,
    Session,
}

/// The credentials an admin command sends: `--token`, else `PEERCONF_TOKEN` when set and not
/// empty, else the session stored for the API's URL (read only when needed), else none.
pub fn resolve_token(
    flag: Option<&str>,
    env: Option<&str>,
    stored: impl FnOnce() -> Result<Option<String>, String>,
) -> Result<Option<(String, Source)>, String> {
    if let Some(t) = flag {
        if t.is_empty() {
            return Err("--token is empty".into());
        }
        return Ok(Some((t.to_string(), Source::Flag)));
    }
    if let Some(t) = env.filter(|t| !t.is_empty()) {
        return Ok(Some((t.to_string(), Source::Env)));
    }
    Ok(stored()?.map(|t| (t, Source::Session)))
}

/// `text` without its trailing line ends (`\n`, `\r\n`, several of them): what a password file
/// or a pipe holds is the password and, usually, a newline.
pub fn strip_trailing_newlines(text: &str) -> &str {
    text.trim_end_matches(['\n', '\r'])
}

/// A password from `text` as read: trailing newlines removed; empty is refused.
fn password_from(text: String, from: &str) -> Result<String, String> {
    let p = strip_trailing_newlines(&text);
    if p.is_empty() {
        return Err(format!("the password from {from} is empty"));
    }
    Ok(p.to_string())
}

/// The password in FILE, or on stdin for `-`.
pub fn read_password_file(file: &Path) -> Result<String, String> {
    if file == Path::new("-") {
        return read_all_stdin().and_then(|t| password_from(t, "stdin"));
    }
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("reading the password file {}: {e}", file.display()))?;
    password_from(text, &file.display().to_string())
}

fn read_all_stdin() -> Result<String, String> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .map_err(|e| format!("reading the password from stdin: {e}"))?;
    Ok(s)
}

/// The password of `peerconf login`: the whole of stdin when it is not a terminal, else typed
/// at a prompt (on stderr) without echo.
pub fn read_login_password(prompt: &str) -> Result<String, String> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        return read_all_stdin().and_then(|t| password_from(t, "stdin"));
    }
    eprint!("{prompt}");
    let _ = std::io::stderr().flush();
    let line = read_line_without_echo()?;
    eprintln!();
    password_from(line, "the terminal")
}

/// One line from the terminal on stdin, with echo off while it is typed (restored after, also
/// when the read fails).
fn read_line_without_echo() -> Result<String, String> {
    let fd = libc::STDIN_FILENO;
    // SAFETY: a termios is plain data; tcgetattr fills it or fails.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is open (stdin) and `saved` is a valid termios to write to.
    if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
        return Err(format!(
            "cannot turn the terminal's echo off: {}",
            std::io::Error::last_os_error()
        ));
    }
    let mut quiet = saved;
    quiet.c_lflag &= !libc::ECHO;
    // SAFETY: as above; `quiet` is a valid termios.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) } != 0 {
        return Err(format!(
            "cannot turn the terminal's echo off: {}",
            std::io::Error::last_os_error()
        ));
    }
    let mut line = String::new();
    let read = std::io::stdin().read_line(&mut line);
    // SAFETY: restores the settings read above.
    unsafe { libc::tcsetattr(fd, libc::TCSANOW, &saved) };
    read.map_err(|e| format!("reading the password from the terminal: {e}"))?;
    Ok(line)
}

/// A new random password: 24 letters and digits from the operating system's RNG.
pub fn generate_password() -> Result<String, String> {
    use rand::TryRngCore;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    // Bytes at or above the largest multiple of 62 are dropped, so every character is equally
    // likely.
    let limit = (256 / ALPHABET.len() * ALPHABET.len()) as u8;
    let mut out = String::with_capacity(GENERATED_PASSWORD_LEN);
    let mut buf = [0u8; 64];
    while out.len() < GENERATED_PASSWORD_LEN {
        rand::rngs::OsRng
            .try_fill_bytes(&mut buf)
            .map_err(|e| format!("the operating system's random number generator failed: {e}"))?;
        for b in buf {
            if b < limit && out.len() < GENERATED_PASSWORD_LEN {
                out.push(ALPHABET[b as usize % ALPHABET.len()] as char);
            }
        }
    }
    Ok(out)
}

/// A time in milliseconds since the epoch, as RFC 3339 (UTC, seconds).
pub fn format_ms(ms: u64) -> String {
    match std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_millis(ms)) {
        Some(t) => humantime::format_rfc3339_seconds(t).to_string(),
        None => format!("{ms} ms since the epoch"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(token: &str) -> Session {
        Session {
            token: token.into(),
            name: "admin".into(),
            role: "superadmin".into(),
            expires_at_ms: Some(1_700_000_000_000),
        }
    }

    #[test]
    fn the_session_file_is_private_and_keeps_other_urls() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = config_dir(Some(tmp.path().join("cfg").into()), None).unwrap();
        assert_eq!(dir, tmp.path().join("cfg").join("peerconf"));
        let store = SessionStore::new(dir.clone());
        assert_eq!(store.get("http://a:1").unwrap(), None);
        store.put("http://a:1", session("t1")).unwrap();
        store.put("https://b:2", session("t2")).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&store.path()), 0o600);
        assert_eq!(store.get("http://a:1").unwrap(), Some(session("t1")));
        // Logging in again replaces that URL's session only.
        store.put("http://a:1", session("t3")).unwrap();
        assert_eq!(store.get("http://a:1").unwrap().unwrap().token, "t3");
        assert_eq!(store.get("https://b:2").unwrap().unwrap().token, "t2");
        assert_eq!(store.remove("http://a:1").unwrap().unwrap().token, "t3");
        assert_eq!(store.remove("http://a:1").unwrap(), None);
        assert_eq!(store.get("https://b:2").unwrap().unwrap().token, "t2");
        assert_eq!(mode(&store.path()), 0o600);
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from(SESSIONS_FILE)]);
    }

    #[test]
    fn a_loose_existing_directory_is_made_private() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("peerconf");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        SessionStore::new(dir.clone())
            .put("http://a:1", session("t"))
            .unwrap();
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }

    #[test]
    fn a_damaged_session_file_is_named_in_the_error() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SessionStore::new(tmp.path().to_path_buf());
        std::fs::write(store.path(), "{not json").unwrap();
        let e = store.get("http://a:1").unwrap_err();
        assert!(e.contains("sessions.json") && e.contains("damaged"), "{e}");
    }

    #[test]
    fn the_config_dir_follows_xdg_then_home() {
        let home = Some(OsString::from("/home/u"));
        assert_eq!(
            config_dir(Some("/x".into()), home.clone()).unwrap(),
            PathBuf::from("/x/peerconf")
        );
        for xdg in [
            None,
            Some(OsString::new()),
            Some(OsString::from("relative")),
        ] {
            assert_eq!(
                config_dir(xdg, home.clone()).unwrap(),
                PathBuf::from("/home/u/.config/peerconf")
            );
        }
        assert!(config_dir(None, None).is_err());
    }

    #[test]
    fn credentials_come_from_the_flag_then_the_env_then_the_session() {
        let stored = || Ok(Some("stored".to_string()));
        let never = || -> Result<Option<String>, String> { panic!("the session file was read") };
        assert_eq!(
            resolve_token(Some("flag"), Some("env"), never).unwrap(),
            Some(("flag".into(), Source::Flag))
        );
        assert_eq!(
            resolve_token(None, Some("env"), never).unwrap(),
            Some(("env".into(), Source::Env))
        );
        assert_eq!(
            resolve_token(None, Some(""), stored).unwrap(),
            Some(("stored".into(), Source::Session))
        );
        assert_eq!(
            resolve_token(None, None, stored).unwrap(),
            Some(("stored".into(), Source::Session))
        );
        assert_eq!(resolve_token(None, None, || Ok(None)).unwrap(), None);
        assert!(resolve_token(Some(""), None, stored).is_err());
        assert!(resolve_token(None, None, || Err("damaged".into())).is_err());
    }

    #[test]
    fn passwords_lose_their_trailing_newlines_only() {
        assert_eq!(strip_trailing_newlines("pw\n"), "pw");
        assert_eq!(strip_trailing_newlines("pw\r\n\n"), "pw");
        assert_eq!(strip_trailing_newlines(" p w \t"), " p w \t");
        assert_eq!(strip_trailing_newlines("a\nb\n"), "a\nb");
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("pw");
        std::fs::write(&f, "s3cret pass\n").unwrap();
        assert_eq!(read_password_file(&f).unwrap(), "s3cret pass");
        std::fs::write(&f, "\n").unwrap();
        assert!(read_password_file(&f).unwrap_err().contains("empty"));
        assert!(read_password_file(&tmp.path().join("missing")).is_err());
    }

    #[test]
    fn generated_passwords_are_24_letters_and_digits() {
        let a = generate_password().unwrap();
        let b = generate_password().unwrap();
        assert_eq!(a.len(), 24);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()), "{a}");
        assert_ne!(a, b);
    }
}
