//! Layer: core (sans-IO; imports only other core modules and `crdt-schema`).
//!
//! The one place that knows the binary format (bincode 2, standard config). Every decode has a
//! size limit, so a hostile peer or a corrupt row cannot make a node allocate without bound.

use serde::{de::DeserializeOwned, Serialize};

/// Largest value any decode accepts: the biggest IPC body (see `limits`) plus slack.
pub const DECODE_BYTES_MAX: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
#[error("malformed message: {0}")]
pub struct WireError(pub String);

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(v, bincode::config::standard())
        .expect("encoding to a Vec cannot fail")
}

pub fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, WireError> {
    if b.len() > DECODE_BYTES_MAX {
        return Err(WireError(format!(
            "{} bytes, more than the {DECODE_BYTES_MAX} allowed",
            b.len()
        )));
    }
    let cfg = bincode::config::standard().with_limit::<DECODE_BYTES_MAX>();
    let (v, used) =
        bincode::serde::decode_from_slice(b, cfg).map_err(|e| WireError(e.to_string()))?;
    if used != b.len() {
        return Err(WireError(format!("{} trailing bytes", b.len() - used)));
    }
    Ok(v)
}
