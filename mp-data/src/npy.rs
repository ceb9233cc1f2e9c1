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

/// An element type an array may be stored in, converted straight to what is asked of it
/// (no wider intermediate array).
trait Numeric: ReadableElement + Copy + std::fmt::Display {
    /// As float32 (rounded to nearest for the wider types).
    fn to_f32(self) -> f32;
    /// As a class id when it is a whole number from 0 to `u32::MAX`.
    fn to_class(self) -> Option<u32>;
}

macro_rules! integers {
    ($($t:ty),*) => {$(
        impl Numeric for $t {
            fn to_f32(self) -> f32 {
                self as f32
            }
            fn to_class(self) -> Option<u32> {
                u32::try_from(self).ok()
            }
        }
    )*};
}
integers!(u8, i8, u16, i16, u32, i32, u64, i64);

macro_rules! floats {
    ($($t:ty),*) => {$(
        impl Numeric for $t {
            fn to_f32(self) -> f32 {
                self as f32
            }
            fn to_class(self) -> Option<u32> {
                let v = f64::from(self);
                (v >= 0.0 && v <= f64::from(u32::MAX) && v.fract() == 0.0).then_some(v as u32)
            }
        }
    )*};
}
floats!(f32, f64);

impl Numeric for bool {
    fn to_f32(self) -> f32 {
        f32::from(u8::from(self))
    }
    fn to_class(self) -> Option<u32> {
        Some(u32::from(self))
    }
}

/// What is made of the array, whatever its dtype: float32 features or class ids.
trait Visit {
    type Out;
    fn visit<T: Numeric>(&self, a: ArrayD<T>) -> std::result::Result<Self::Out, String>;
}

struct Features;

impl Visit for Features {
    type Out = ArrayD<f32>;
    fn visit<T: Numeric>(&self, a: ArrayD<T>) -> std::result::Result<ArrayD<f32>, String> {
        Ok(a.mapv(T::to_f32))
    }
}

/// Class ids: one per sample, each a whole number from 0 to `u32::MAX`.
struct Labels;

impl Visit for Labels {
    type Out = Array1<u32>;
    fn visit<T: Numeric>(&self, a: ArrayD<T>) -> std::result::Result<Array1<u32>, String> {
        let shape = a.shape().to_vec();
        let n = match shape.as_slice() {
            [n] | [n, 1] => *n,
            _ => {
                return Err(format!(
                    "labels must be 1-D (or one column), not of shape {shape:?}"
                ));
            }
        };
        let mut out = Vec::with_capacity(n);
        for (i, &v) in a.iter().enumerate() {
            match v.to_class() {
                Some(id) => out.push(id),
                None => {
                    return Err(format!(
                        "label {i} is {v}: a class id must be a whole number from 0"
                    ));
                }
            }
        }
        Ok(Array1::from(out))
    }
}

/// Where an array comes from: a `.npy` file's bytes, or one array of an `.npz` archive.
enum Source<'a> {
    Npy(&'a [u8]),
    Npz(&'a [u8], &'a str),
}

/// One attempt at reading the source as `T`: `Ok(None)` when its dtype is not `T`.
fn try_read<T: Numeric>(src: &Source<'_>) -> std::result::Result<Option<ArrayD<T>>, String> {
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
        Ok(a) => Ok(Some(a)),
        Err(None) => Ok(None),
        Err(Some(what)) => Err(what),
    }
}

/// The type code of a `.npy` file's `descr` (`f4` for `'<f4'`), read from its header without
/// parsing the data, so the right element type is tried first; `None` when the header is not
/// one (the full parse then names the problem).
fn descr(bytes: &[u8]) -> Option<&str> {
    let rest = bytes.strip_prefix(b"\x93NUMPY")?;
    let (len, text_at): (usize, usize) = match rest.first()? {
        1 => (
            usize::from(u16::from_le_bytes([*rest.get(2)?, *rest.get(3)?])),
            4,
        ),
        _ => (
            u32::from_le_bytes([*rest.get(2)?, *rest.get(3)?, *rest.get(4)?, *rest.get(5)?])
                as usize,
            6,
        ),
    };
    let header = std::str::from_utf8(rest.get(text_at..text_at.checked_add(len)?)?).ok()?;
    let after = &header[header.find("'descr'")? + "'descr'".len()..];
    let quoted = &after[after.find('\'')? + 1..];
    let code = &quoted[..quoted.find('\'')?];
    Some(code.trim_start_matches(['<', '>', '|', '=']))
}

/// What `v` makes of the array, trying its dtype first (from a `.npy` header), then every
/// supported dtype.
fn read_any<V: Visit>(src: &Source<'_>, v: &V) -> std::result::Result<V::Out, String> {
    let first = match src {
        Source::Npy(bytes) => descr(bytes),
        Source::Npz(..) => None,
    };
    macro_rules! each {
        ($(($t:ty, $code:literal)),*) => {
            $(
                if first == Some($code) && let Some(a) = try_read::<$t>(src)? {
                    return v.visit(a);
                }
            )*
            $(
                if first != Some($code) && let Some(a) = try_read::<$t>(src)? {
                    return v.visit(a);
                }
            )*
        };
    }
    each!(
        (f32, "f4"),
        (f64, "f8"),
        (u8, "u1"),
        (i8, "i1"),
        (u16, "u2"),
        (i16, "i2"),
        (u32, "u4"),
        (i32, "i4"),
        (u64, "u8"),
        (i64, "i8"),
        (bool, "b1")
    );
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
    read_any(&Source::Npy(bytes), &Features).map_err(|w| bad(file, w))
}

/// The features in the `.npy` file at `path` (see the [module docs](self)).
///
/// # Errors
/// [`Error::Io`] for a file that cannot be read; as [`parse_features`].
pub fn read_features(path: impl AsRef<Path>) -> Result<ArrayD<f32>> {
    let path = path.as_ref();
    parse_features(&path.display().to_string(), &read_file(path)?)
}

/// The class ids in the `.npy` bytes, named `file` in errors.
///
/// # Errors
/// [`Error::Npy`] naming `file` and the problem (a label's index where one is bad).
pub fn parse_labels(file: &str, bytes: &[u8]) -> Result<Array1<u32>> {
    read_any(&Source::Npy(bytes), &Labels).map_err(|w| bad(file, w))
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
    read_any(&Source::Npz(&bytes, name), &Features).map_err(|w| bad(&file, w))
}

/// The class ids in array `name` of the `.npz` archive at `path`.
///
/// # Errors
/// As [`npz_features`], and a bad label named by its index.
pub fn npz_labels(path: impl AsRef<Path>, name: &str) -> Result<Array1<u32>> {
    let path = path.as_ref();
    let file = format!("{} [{name}]", path.display());
    let bytes = read_file(path)?;
    read_any(&Source::Npz(&bytes, name), &Labels).map_err(|w| bad(&file, w))
}

#[cfg(test)]
mod tests {
    use ndarray::array;
    use ndarray_npy::WriteNpyExt;

    use super::descr;

    #[test]
    fn the_header_names_the_dtype_to_try_first() {
        let mut f4 = Vec::new();
        array![1.0f32, 2.0].write_npy(&mut f4).unwrap();
        assert_eq!(descr(&f4), Some("f4"));
        let mut u1 = Vec::new();
        array![[1u8]].write_npy(&mut u1).unwrap();
        assert_eq!(descr(&u1), Some("u1"));
        // Not a header: no guess (the full parse names the problem).
        assert_eq!(descr(b"\x93NUMPY\x01\x00\xff\xff{"), None);
        assert_eq!(descr(b"PK\x03\x04"), None);
        assert_eq!(descr(&f4[..12]), None);
    }
}
