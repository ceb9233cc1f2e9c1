//! NumPy arrays from `.npy` files and `.npz` archives (`numpy.save`, `numpy.savez`,
//! `numpy.savez_compressed`), as float32 features or integer class ids, whatever numeric dtype
//! the file holds (the `npy` feature, on by default; parsed by `ndarray-npy`).
//!
//! - [`read_features`] / [`npz_features`]: any of float32, float64, the signed and unsigned
//!   integers of 8 to 64 bits and booleans, converted to float32 as they are (uint8 pixels stay
//!   0 to 255: scale them as your model expects), any shape.
//! - [`read_labels`] / [`npz_labels`]: integers (or whole-numbered floats), one per sample (a
//!   1-D array, or 2-D with one column), each from 0 to `u32::MAX`; another value is an error
//!   naming its index.
//!
//! Errors name the file (and the array of an archive) and the problem: a missing array (with
//! the names the archive holds), an unsupported dtype, a truncated file.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use ndarray::array;
//! use ndarray_npy::WriteNpyExt;
//!
//! let mut bytes = Vec::new();
//! array![[0u8, 128], [255, 7]].write_npy(&mut bytes)?;
//! let x = mp_data::npy::parse_features("pixels.npy", &bytes)?;
//! assert_eq!(x.shape(), &[2, 2]);
//! assert_eq!(x[[1, 0]], 255.0);
//! # Ok(())
//! # }
//! ```

use std::io::Cursor;
use std::path::Path;

use ndarray::{Array1, ArrayD, IxDyn, OwnedRepr};
use ndarray_npy::{NpzReader, ReadNpyError, ReadNpyExt, ReadNpzError, ReadableElement};

use crate::error::{Error, Result};

/// An element type an array may be stored in, and its float64 value (exact for every integer
/// up to 2^53, and for float32).
trait Numeric: ReadableElement + Copy {
    fn to_f64(self) -> f64;
}

macro_rules! numeric {
    ($($t:ty),*) => {$(
        impl Numeric for $t {
            fn to_f64(self) -> f64 {
                self as f64
            }
        }
    )*};
}
numeric!(f32, f64, u8, i8, u16, i16, u32, i32, u64, i64);

impl Numeric for bool {
    fn to_f64(self) -> f64 {
        f64::from(u8::from(self))
    }
}

/// Where an array comes from: a `.npy` file's bytes, or one array of an `.npz` archive.
enum Source<'a> {
    Npy(&'a [u8]),
    Npz(&'a [u8], &'a str),
}

/// One attempt at reading the source as `T`: `Ok(None)` when its dtype is not `T`.
fn try_read<T: Numeric>(src: &Source<'_>) -> std::result::Result<Option<ArrayD<f64>>, String> {
    let wrong = |e: &ReadNpyError| matches!(e, ReadNpyError::WrongDescriptor(_));
    let read = match src {
        Source::Npy(bytes) => ArrayD::<T>::read_npy(Cursor::new(*bytes))
            .map_err(|e| if wrong(&e) { None } else { Some(npy_what(&e)) }),
        Source::Npz(bytes, name) => {
            let mut npz = NpzReader::new(Cursor::new(*bytes))
                .map_err(|e| format!("not an .npz archive: {e}"))?;
            match npz.by_name::<OwnedRepr<T>, IxDyn>(name) {
                Ok(a) => Ok(a),
                Err(ReadNpzError::Npy(e)) if wrong(&e) => Err(None),
                Err(ReadNpzError::Npy(e)) => Err(Some(npy_what(&e))),
                Err(ReadNpzError::Zip(_)) => {
                    let names = npz.names().unwrap_or_default();
                    Err(Some(format!(
                        "no array {name:?}; the archive holds {names:?}"
                    )))
                }
            }
        }
    };
    match read {
        Ok(a) => Ok(Some(a.mapv(T::to_f64))),
        Err(None) => Ok(None),
        Err(Some(what)) => Err(what),
    }
}

/// The array as float64, trying every supported dtype.
fn read_any(src: &Source<'_>) -> std::result::Result<ArrayD<f64>, String> {
    macro_rules! each {
        ($($t:ty),*) => {$(
            if let Some(a) = try_read::<$t>(src)? {
                return Ok(a);
            }
        )*};
    }
    each!(f32, f64, u8, i8, u16, i16, u32, i32, u64, i64, bool);
    Err(
        "its dtype is none of float32, float64, the 8- to 64-bit integers and bool (complex, \
         float16, strings and objects are not read)"
            .into(),
    )
}

fn npy_what(e: &ReadNpyError) -> String {
    match e {
        ReadNpyError::MissingData => "truncated: the header describes more data".into(),
        ReadNpyError::ExtraBytes(n) => format!("{n} bytes after the data the header describes"),
        ReadNpyError::ParseHeader(e) => format!("not a .npy file (bad header: {e})"),
        e => e.to_string(),
    }
}

fn bad(file: &str, what: String) -> Error {
    Error::Npy {
        file: file.to_string(),
        what,
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Io {
        op: "reading",
        path: path.to_path_buf(),
        source,
    })
}

/// The features in the `.npy` bytes, named `file` in errors.
///
/// # Errors
/// [`Error::Npy`] naming `file` and the problem.
pub fn parse_features(file: &str, bytes: &[u8]) -> Result<ArrayD<f32>> {
    let a = read_any(&Source::Npy(bytes)).map_err(|w| bad(file, w))?;
    Ok(a.mapv(|v| v as f32))
}

/// The features in the `.npy` file at `path` (see the [module docs](self)).
///
/// # Errors
/// [`Error::Io`] for a file that cannot be read; as [`parse_features`].
pub fn read_features(path: impl AsRef<Path>) -> Result<ArrayD<f32>> {
    let path = path.as_ref();
    parse_features(&path.display().to_string(), &read_file(path)?)
}

/// Class ids from an array: one per sample, each a whole number from 0 to `u32::MAX`.
fn to_labels(file: &str, a: ArrayD<f64>) -> Result<Array1<u32>> {
    let shape = a.shape().to_vec();
    let n = match shape.as_slice() {
        [n] | [n, 1] => *n,
        _ => {
            return Err(bad(
                file,
                format!("labels must be 1-D (or one column), not of shape {shape:?}"),
            ));
        }
    };
    let flat: Vec<f64> = a.iter().copied().collect();
    let mut out = Vec::with_capacity(n);
    for (i, &v) in flat.iter().enumerate() {
        if !(v >= 0.0 && v <= f64::from(u32::MAX) && v.fract() == 0.0) {
            return Err(bad(
                file,
                format!("label {i} is {v}: a class id must be a whole number from 0"),
            ));
        }
        out.push(v as u32);
    }
    Ok(Array1::from(out))
}

/// The class ids in the `.npy` bytes, named `file` in errors.
///
/// # Errors
/// [`Error::Npy`] naming `file` and the problem (a label's index where one is bad).
pub fn parse_labels(file: &str, bytes: &[u8]) -> Result<Array1<u32>> {
    let a = read_any(&Source::Npy(bytes)).map_err(|w| bad(file, w))?;
    to_labels(file, a)
}

/// The class ids in the `.npy` file at `path` (see the [module docs](self)).
///
/// # Errors
/// [`Error::Io`] for a file that cannot be read; as [`parse_labels`].
pub fn read_labels(path: impl AsRef<Path>) -> Result<Array1<u32>> {
    let path = path.as_ref();
    parse_labels(&path.display().to_string(), &read_file(path)?)
}

/// The features in array `name` of the `.npz` archive at `path`.
///
/// # Errors
/// [`Error::Io`] for a file that cannot be read; [`Error::Npy`] naming the file, the
/// array and the problem (a missing array with the names the archive holds).
pub fn npz_features(path: impl AsRef<Path>, name: &str) -> Result<ArrayD<f32>> {
    let path = path.as_ref();
    let file = format!("{} [{name}]", path.display());
    let bytes = read_file(path)?;
    let a = read_any(&Source::Npz(&bytes, name)).map_err(|w| bad(&file, w))?;
    Ok(a.mapv(|v| v as f32))
}

/// The class ids in array `name` of the `.npz` archive at `path`.
///
/// # Errors
/// As [`npz_features`], and a bad label named by its index.
pub fn npz_labels(path: impl AsRef<Path>, name: &str) -> Result<Array1<u32>> {
    let path = path.as_ref();
    let file = format!("{} [{name}]", path.display());
    let bytes = read_file(path)?;
    let a = read_any(&Source::Npz(&bytes, name)).map_err(|w| bad(&file, w))?;
    to_labels(&file, a)
}
