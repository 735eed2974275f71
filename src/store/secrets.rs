//! Layer: store (imports core only).
//!
//! Secret values at rest. A document never holds a secret (a password hash, a private key): it
//! holds a reference to it ([`crdt_schema::secret`]), and the value lives in the store's
//! `secrets` table and in log records, sealed (ChaCha20-Poly1305) under the node's at-rest key.
//!
//! The key ring lives in one small file beside the database (`<db>.keys`, mode 0600): never in
//! redb, never in the log, never sent anywhere. Forgetting works by rotation: after a secret was
//! replaced or deleted, every live value is sealed again under a fresh key in one durable commit,
//! and the key file is then rewritten without the old key. Every copy of an old value still in
//! the files (a freed redb page, a log record from before the checkpoint) is then ciphertext
//! under a key that no longer exists anywhere.
//!
//! Rotation order, so that a crash at any point loses nothing: (1) the key file gains the new key
//! (both keys present); (2) every row is sealed again under it, durably; (3) the key file drops the
//! old key. A node that finds two keys at open finishes the rotation.
//!
//! Sealed value layout: `key id u32 LE | nonce 12 bytes | ciphertext | tag 16 bytes`; the row's
//! key is the additional data, so a sealed value moved to another row does not open.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const MAGIC: &[u8; 8] = b"pckeys01";
const KEY_LEN: usize = 32;

/// Why the key ring could not be read or written.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KeyringError {
    #[error("key file {path}: {error}")]
    Io { path: String, error: String },
    #[error("key file {0} is damaged (bad magic, length or checksum)")]
    Damaged(String),
    #[error("key file {0} is missing but the database holds sealed secrets")]
    Missing(String),
    #[error("a sealed secret names key {0}, which the key file does not hold")]
    UnknownKey(u32),
    #[error("a sealed secret does not open (damaged, or moved from another row)")]
    Open,
}

/// Where the key ring is kept: a file, or (simulated disks) memory that survives a crash.
#[derive(Clone)]
pub enum KeyFile {
    Path(PathBuf),
    Mem(Arc<Mutex<Option<Vec<u8>>>>),
}

impl KeyFile {
    /// The key file of the database at `db`.
    pub fn beside(db: &Path) -> KeyFile {
        let mut name = db.file_name().unwrap_or_default().to_os_string();
        name.push(".keys");
        KeyFile::Path(db.with_file_name(name))
    }

    fn name(&self) -> String {
        match self {
            KeyFile::Path(p) => p.display().to_string(),
            KeyFile::Mem(_) => "(memory)".into(),
        }
    }

    fn read(&self) -> Result<Option<Vec<u8>>, KeyringError> {
        match self {
            KeyFile::Path(p) => match std::fs::read(p) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(self.io(e)),
            },
            KeyFile::Mem(m) => Ok(m.lock().unwrap_or_else(|p| p.into_inner()).clone()),
        }
    }

    /// Replaces the file atomically and durably: a temporary file, fsync, rename, fsync of the
    /// directory. The file is private to its owner from its creation.
    fn write(&self, bytes: &[u8]) -> Result<(), KeyringError> {
        match self {
            KeyFile::Path(p) => {
                use std::os::unix::fs::OpenOptionsExt;
                let mut tmp_name = p.file_name().unwrap_or_default().to_os_string();
                tmp_name.push(".tmp");
                let tmp = p.with_file_name(tmp_name);
                let _ = std::fs::remove_file(&tmp);
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(|e| self.io(e))?;
                f.write_all(bytes).map_err(|e| self.io(e))?;
                f.sync_all().map_err(|e| self.io(e))?;
                drop(f);
                std::fs::rename(&tmp, p).map_err(|e| self.io(e))?;
                if let Some(dir) = p.parent() {
                    let dir = if dir.as_os_str().is_empty() {
                        Path::new(".")
                    } else {
                        dir
                    };
                    std::fs::File::open(dir)
                        .and_then(|d| d.sync_all())
                        .map_err(|e| self.io(e))?;
                }
                Ok(())
            }
            KeyFile::Mem(m) => {
                *m.lock().unwrap_or_else(|p| p.into_inner()) = Some(bytes.to_vec());
                Ok(())
            }
        }
    }

    fn io(&self, e: std::io::Error) -> KeyringError {
        KeyringError::Io {
            path: self.name(),
            error: e.to_string(),
        }
    }
}

/// Random bytes for keys and nonces: the operating system's generator in production, a seeded
/// one in the simulator.
pub type Fill = Box<dyn FnMut(&mut [u8]) + Send>;

/// The operating system's generator.
pub fn os_fill() -> Fill {
    Box::new(|buf: &mut [u8]| {
        use ring::rand::SecureRandom;
        ring::rand::SystemRandom::new()
            .fill(buf)
            .expect("the operating system's random generator failed");
    })
}

/// The node's at-rest keys: the current one seals, every one held opens.
pub struct Keyring {
    file: KeyFile,
    keys: Vec<(u32, [u8; KEY_LEN])>,
    fill: Fill,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key bytes.
        f.debug_struct("Keyring")
            .field("file", &self.file.name())
            .field("key_ids", &self.key_ids())
            .finish()
    }
}

/// The length of a sealed value of `plain_len` bytes: key ID, nonce, ciphertext, tag.
pub fn sealed_len(plain_len: usize) -> usize {
    4 + NONCE_LEN + plain_len + 16
}

impl Keyring {
    /// Opens the key ring, creating it with one fresh key when the file does not exist yet.
    /// `has_sealed` says whether the database already holds sealed values: then a missing file
    /// is an error (those values could never be read), not a fresh start.
    pub fn open(file: KeyFile, has_sealed: bool, mut fill: Fill) -> Result<Keyring, KeyringError> {
        match file.read()? {
            Some(bytes) => {
                let keys = decode(&bytes).ok_or_else(|| KeyringError::Damaged(file.name()))?;
                Ok(Keyring { file, keys, fill })
            }
            None if has_sealed => Err(KeyringError::Missing(file.name())),
            None => {
                let mut key = [0u8; KEY_LEN];
                fill(&mut key);
                let ring = Keyring {
                    file,
                    keys: vec![(1, key)],
                    fill,
                };
                ring.file.write(&encode(&ring.keys))?;
                Ok(ring)
            }
        }
    }

    /// IDs of the keys held, oldest first.
    pub fn key_ids(&self) -> Vec<u32> {
        self.keys.iter().map(|(id, _)| *id).collect()
    }

    /// The key that seals.
    pub fn current(&self) -> u32 {
        self.keys.last().map(|(id, _)| *id).unwrap_or(0)
    }

    /// Whether a rotation was interrupted (more than one key held).
    pub fn rotating(&self) -> bool {
        self.keys.len() > 1
    }

    /// Step 1 of a rotation: the file gains a fresh key, which seals from now on.
    pub fn add_key(&mut self) -> Result<u32, KeyringError> {
        let id = self.current().wrapping_add(1).max(1);
        let mut key = [0u8; KEY_LEN];
        (self.fill)(&mut key);
        let mut keys = self.keys.clone();
        keys.push((id, key));
        self.file.write(&encode(&keys))?;
        self.keys = keys;
        Ok(id)
    }

    /// Step 3 of a rotation: the file keeps only the current key.
    pub fn drop_old_keys(&mut self) -> Result<(), KeyringError> {
        let Some(last) = self.keys.last().copied() else {
            return Ok(());
        };
        let keys = vec![last];
        self.file.write(&encode(&keys))?;
        self.keys = keys;
        Ok(())
    }

    /// Seals `plain` for the row `row` under the current key.
    pub fn seal(&mut self, row: &[u8], plain: &[u8]) -> Vec<u8> {
        let (id, key) = *self.keys.last().expect("a key ring holds at least one key");
        let mut nonce = [0u8; NONCE_LEN];
        (self.fill)(&mut nonce);
        let key = aead_key(&key);
        let mut out = Vec::with_capacity(4 + NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(row),
            &mut body,
        )
        .expect("sealing a value of bounded size cannot fail");
        out.extend_from_slice(&body);
        out
    }

    /// The key a sealed value names.
    pub fn key_of(sealed: &[u8]) -> Option<u32> {
        sealed
            .get(..4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    /// Opens a value sealed for the row `row`.
    pub fn open_sealed(&self, row: &[u8], sealed: &[u8]) -> Result<Vec<u8>, KeyringError> {
        if sealed.len() < 4 + NONCE_LEN + 16 {
            return Err(KeyringError::Open);
        }
        let id = Self::key_of(sealed).ok_or(KeyringError::Open)?;
        let (_, key) = self
            .keys
            .iter()
            .find(|(k, _)| *k == id)
            .ok_or(KeyringError::UnknownKey(id))?;
        let nonce: [u8; NONCE_LEN] = sealed[4..4 + NONCE_LEN].try_into().expect("nonce length");
        let mut body = sealed[4 + NONCE_LEN..].to_vec();
        let plain = aead_key(key)
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(row),
                &mut body,
            )
            .map_err(|_| KeyringError::Open)?;
        Ok(plain.to_vec())
    }
}

fn aead_key(key: &[u8; KEY_LEN]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, key).expect("a 32-byte key"))
}

/// `magic | count u32 | (id u32 | key 32)* | crc32`.
fn encode(keys: &[(u32, [u8; KEY_LEN])]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + keys.len() * (4 + KEY_LEN));
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(keys.len() as u32).to_le_bytes());
    for (id, key) in keys {
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(key);
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn decode(bytes: &[u8]) -> Option<Vec<(u32, [u8; KEY_LEN])>> {
    let (body, crc) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
    if crc32fast::hash(body).to_le_bytes() != crc || body.get(..8)? != MAGIC || body.len() < 12 {
        return None;
    }
    let count = u32::from_le_bytes(body[8..12].try_into().ok()?) as usize;
    let rest = &body[12..];
    if count == 0 || rest.len() != count.checked_mul(4 + KEY_LEN)? {
        return None;
    }
    Some(
        rest.chunks_exact(4 + KEY_LEN)
            .map(|c| {
                let id = u32::from_le_bytes(c[..4].try_into().expect("4 bytes"));
                let key: [u8; KEY_LEN] = c[4..].try_into().expect("key length");
                (id, key)
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded(seed: u64) -> Fill {
        use rand::{RngCore, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        Box::new(move |b: &mut [u8]| rng.fill_bytes(b))
    }

    #[test]
    fn a_value_opens_only_in_its_row_and_only_while_its_key_is_held() {
        let file = KeyFile::Mem(Default::default());
        let mut ring = Keyring::open(file.clone(), false, seeded(1)).unwrap();
        let sealed = ring.seal(b"user/a\0p", b"$argon2id$old");
        assert!(!sealed.windows(4).any(|w| w == b"argo"));
        assert_eq!(
            ring.open_sealed(b"user/a\0p", &sealed).unwrap(),
            b"$argon2id$old"
        );
        assert!(matches!(
            ring.open_sealed(b"user/b\0p", &sealed),
            Err(KeyringError::Open)
        ));
        // Rotation: while both keys are held, both open; after, the old one is gone from the
        // file too.
        ring.add_key().unwrap();
        let resealed = ring.seal(b"user/a\0p", b"$argon2id$old");
        assert!(ring.open_sealed(b"user/a\0p", &sealed).is_ok());
        let reopened = Keyring::open(file.clone(), true, seeded(2)).unwrap();
        assert!(
            reopened.rotating(),
            "an interrupted rotation is seen at open"
        );
        ring.drop_old_keys().unwrap();
        let reopened = Keyring::open(file, true, seeded(3)).unwrap();
        assert_eq!(reopened.key_ids(), vec![2]);
        assert!(matches!(
            reopened.open_sealed(b"user/a\0p", &sealed),
            Err(KeyringError::UnknownKey(1))
        ));
        assert!(reopened.open_sealed(b"user/a\0p", &resealed).is_ok());
    }

    #[test]
    fn a_damaged_or_missing_key_file_is_refused() {
        let file = KeyFile::Mem(Default::default());
        assert!(matches!(
            Keyring::open(file.clone(), true, seeded(1)),
            Err(KeyringError::Missing(_))
        ));
        Keyring::open(file.clone(), false, seeded(1)).unwrap();
        if let KeyFile::Mem(m) = &file {
            let mut g = m.lock().unwrap();
            let b = g.as_mut().unwrap();
            b[10] ^= 1;
        }
        assert!(matches!(
            Keyring::open(file, true, seeded(1)),
            Err(KeyringError::Damaged(_))
        ));
    }

    #[test]
    fn the_key_file_is_private_to_its_owner() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile_dir();
        let file = KeyFile::beside(&dir.join("peerconf.redb"));
        Keyring::open(file.clone(), false, os_fill()).unwrap();
        let KeyFile::Path(p) = file else {
            unreachable!()
        };
        assert_eq!(p.file_name().unwrap(), "peerconf.redb.keys");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "peerconf-keys-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
