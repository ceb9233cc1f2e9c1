//! A checkpoint folder: the per-epoch files `epoch-000007.safetensors`, `best.safetensors`, and
//! the temporary files that killed writes leave.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::atomic::io_error;
use super::error::Result;

/// The file name of the best checkpoint in a [`super::ModelCheckpoint::dir`].
pub(crate) const BEST_FILE: &str = "best.safetensors";

/// The epoch number of a per-epoch checkpoint's file name (`epoch-000007.safetensors` → 7).
fn epoch_of(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("epoch-")?.strip_suffix(".safetensors")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The per-epoch checkpoints in `dir`, oldest first (temporary files and others ignored).
pub(crate) fn epoch_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(io_error("listing", dir, e)),
    };
    let mut found = vec![];
    for entry in entries {
        let entry = entry.map_err(|e| io_error("listing", dir, e))?;
        if let Some(n) = entry.file_name().to_str().and_then(epoch_of) {
            found.push((n, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// The writer's process id in the name of a temporary file that [`super::write_atomic_with`]
/// made for a checkpoint of a [`super::ModelCheckpoint::dir`]
/// (`.epoch-000007.safetensors.tmp-<pid>-<n>`, `.best.safetensors.tmp-<pid>-<n>`); `None` for
/// any other name.
fn temporary_of(name: &str) -> Option<u32> {
    let (target, tail) = name.strip_prefix('.')?.rsplit_once(".tmp-")?;
    let (pid, n) = tail.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !(digits(pid) && digits(n)) || (epoch_of(target).is_none() && target != BEST_FILE) {
        return None;
    }
    pid.parse().ok()
}

/// How long the temporary file of a writer that is no longer running must have been untouched
/// before it is removed: a margin for a writer in another PID namespace (a container) or on
/// another host sharing the directory, whose process id means nothing here.
const DEAD_WRITER_GRACE: Duration = Duration::from_secs(60);

/// Where there is no `/proc` to tell whether the writer runs, how old a temporary file must be
/// before it is removed (no checkpoint write takes that long).
const UNKNOWN_WRITER_AGE: Duration = Duration::from_secs(60 * 60);

/// Whether process `pid` is running: `Some` on Linux (from `/proc`), `None` where this cannot
/// tell.
fn running(pid: u32) -> Option<bool> {
    (cfg!(target_os = "linux") && Path::new("/proc/self").exists())
        .then(|| Path::new("/proc").join(pid.to_string()).exists())
}

/// Removes the temporary files that killed checkpoint writes left in `dir` (see
/// [`temporary_of`]): on Linux those whose writer is no longer running and that were untouched
/// for [`DEAD_WRITER_GRACE`]; elsewhere those older than [`UNKNOWN_WRITER_AGE`]. Never this
/// process's own, which may be in flight. Best effort: what cannot be read or removed is left.
pub(crate) fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(temporary_of) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Some(age) = entry
            .metadata()
            .ok()
            .filter(fs::Metadata::is_file)
            .and_then(|m| m.modified().ok())
            .and_then(|t| now.duration_since(t).ok())
        else {
            continue;
        };
        let stale = match running(pid) {
            Some(alive) => !alive && age >= DEAD_WRITER_GRACE,
            None => age >= UNKNOWN_WRITER_AGE,
        };
        if stale {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// The newest per-epoch checkpoint in `dir` (`None` when there is none, or no `dir`): the
/// highest epoch number, whichever run wrote it (see [`super::ModelCheckpoint`] on reusing a
/// folder).
pub fn latest(dir: impl AsRef<Path>) -> Result<Option<PathBuf>> {
    Ok(epoch_files(dir.as_ref())?.pop().map(|(_, p)| p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_names_parse() {
        assert_eq!(epoch_of("epoch-000007.safetensors"), Some(7));
        assert_eq!(epoch_of("epoch-.safetensors"), None);
        assert_eq!(epoch_of(".epoch-000007.safetensors.tmp-1-0"), None);
        assert_eq!(epoch_of("epoch-+7.safetensors"), None);
        assert_eq!(epoch_of("best.safetensors"), None);
    }

    #[test]
    fn temporary_names_parse() {
        assert_eq!(
            temporary_of(".epoch-000007.safetensors.tmp-123-0"),
            Some(123)
        );
        assert_eq!(temporary_of(".best.safetensors.tmp-9-17"), Some(9));
        assert_eq!(temporary_of("epoch-000007.safetensors.tmp-123-0"), None);
        assert_eq!(temporary_of(".epoch-000007.safetensors.tmp-123-"), None);
        assert_eq!(temporary_of(".epoch-000007.safetensors.tmp-x-0"), None);
        assert_eq!(
            temporary_of(".notes.txt.tmp-123-0"),
            None,
            "not a checkpoint's"
        );
        assert_eq!(
            temporary_of(".w.safetensors.tmp-123-0"),
            None,
            "not a folder's name"
        );
        assert_eq!(temporary_of("epoch-000007.safetensors"), None);
    }
}
