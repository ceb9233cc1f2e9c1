//! The mp metadata of a safetensors file (its kind and format version) and its checksum:
//! sealing tensors into a file, and checking a file's seal.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use mp_core::{F32, Tensor};
use sha2::{Digest, Sha256};

use super::error::{Error, Result};
use super::safetensors::{self, SafeTensors};

use super::format::{FORMAT_VERSION, KEY_KIND, KEY_SHA256, KEY_VERSION};
use super::format::{KIND_CHECKPOINT, KIND_WEIGHTS};

/// A tensor to write: name, safetensors dtype, shape, little-endian bytes.
pub(super) type Entry<'a> = (&'a str, &'a str, &'a [usize], &'a [u8]);

fn digest<'a>(
    metadata: &BTreeMap<String, String>,
    tensors: impl Iterator<Item = Entry<'a>>,
) -> String {
    let mut h = Sha256::new();
    let mut put = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    put(b"mp checkpoint sha256 v1");
    for (k, v) in metadata.iter().filter(|(k, _)| *k != KEY_SHA256) {
        put(k.as_bytes());
        put(v.as_bytes());
    }
    for (name, dtype, shape, data) in tensors {
        put(name.as_bytes());
        put(dtype.as_bytes());
        let dims: Vec<u8> = shape
            .iter()
            .flat_map(|&d| (d as u64).to_le_bytes())
            .collect();
        put(&dims);
        put(data);
    }
    let mut hex = String::with_capacity(64);
    for b in h.finalize() {
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

/// The checksum mp stores in `mp.sha256`: SHA-256 over every tensor's name, dtype, shape and
/// bytes (in data order) and every other metadata entry, each length-prefixed.
pub fn checksum(st: &SafeTensors<'_>) -> String {
    digest(
        &st.metadata,
        st.tensors.iter().map(|t| {
            (
                t.name.as_str(),
                t.dtype.as_str(),
                t.shape.as_slice(),
                st.data(t),
            )
        }),
    )
}

/// Serializes float32 tensors with mp metadata and its checksum.
pub(super) fn seal(
    tensors: &[(String, &Tensor<F32>)],
    metadata: BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut seen = BTreeSet::new();
    let mut bytes = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        if !seen.insert(name.as_str()) {
            return Err(Error::Invalid {
                file: "(writing)".into(),
                what: format!("two tensors are named {name:?}"),
            });
        }
        // A host copy (a shared O(1) clone for host tensors).
        let values = t
            .to_device(mp_core::Device::Cpu)
            .and_then(|h| h.to_f32_vec())
            .map_err(crate::Error::from)?;
        bytes.push(
            values
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        );
    }
    let entries: Vec<Entry<'_>> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, t), b)| (name.as_str(), "F32", t.shape(), b.as_slice()))
        .collect();
    seal_entries(&entries, metadata)
}

/// Serializes tensors of any dtype (`(name, dtype, shape, bytes)`, names unique) with mp
/// metadata and its checksum.
pub(super) fn seal_entries(
    entries: &[Entry<'_>],
    mut metadata: BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    metadata.insert(KEY_VERSION.into(), FORMAT_VERSION.to_string());
    let sum = digest(&metadata, entries.iter().copied());
    metadata.insert(KEY_SHA256.into(), sum);
    safetensors::serialize(entries, &metadata)
}

/// Checks what kind of mp file this is (refusing newer versions) and its checksum.
/// Returns the kind, `None` for a safetensors file without mp metadata.
pub(super) fn check_mp_metadata(file: &str, st: &SafeTensors<'_>) -> Result<Option<String>> {
    let Some(version) = st.metadata.get(KEY_VERSION) else {
        return Ok(None);
    };
    let invalid = |what: String| Error::Invalid {
        file: file.to_string(),
        what,
    };
    let version: u64 = version
        .parse()
        .map_err(|_| invalid(format!("{KEY_VERSION} {version:?} is not a version number")))?;
    if version > FORMAT_VERSION {
        return Err(Error::NewerVersion {
            file: file.to_string(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    if version == 0 {
        return Err(invalid(format!("{KEY_VERSION} 0 does not exist")));
    }
    let Some(expected) = st.metadata.get(KEY_SHA256) else {
        return Err(Error::Corrupted {
            file: file.to_string(),
            what: format!("the checksum ({KEY_SHA256}) is missing"),
        });
    };
    let got = checksum(st);
    if *expected != got {
        return Err(Error::Corrupted {
            file: file.to_string(),
            what: format!(
                "the content does not match its checksum (stored {expected}, computed {got}): \
                 the file was damaged or edited"
            ),
        });
    }
    let kind = st.metadata.get(KEY_KIND).cloned().unwrap_or_default();
    if kind != KIND_CHECKPOINT && kind != KIND_WEIGHTS {
        return Err(invalid(format!("unknown {KEY_KIND} {kind:?}")));
    }
    Ok(Some(kind))
}
