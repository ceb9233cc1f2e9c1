//! IDX files (the format of MNIST): images (magic 2051: unsigned bytes, 3 dimensions) and labels
//! (magic 2049: unsigned bytes, 1 dimension), raw or gzip'd.
//!
//! An IDX file is a big-endian header (a 4-byte magic number, then one `u32` per dimension)
//! followed by the data in row-major order. The parser checks the header's sizes (with checked
//! multiplication) against the data actually present *before* allocating anything sized by the
//! header, so a lying header cannot make it allocate: a raw file's data length is known up front,
//! and a gzip stream is read incrementally, the buffer growing only with bytes that really arrive.
//! Gzip is detected by its magic bytes (`1f 8b`), not by the file name.

use std::borrow::Cow;
use std::io::{self, Read};
use std::path::Path;

use flate2::read::MultiGzDecoder;
use ndarray::{Array1, Array3, ArrayBase, Data, Ix1, Ix3};

use crate::error::{Error, Result};

/// The magic number of an IDX image file: unsigned bytes (`0x08`), 3 dimensions.
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// The magic number of an IDX label file: unsigned bytes (`0x08`), 1 dimension.
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// What a parse expects: the magic number and its number of dimensions.
#[derive(Clone, Copy, Debug)]
struct Kind {
    magic: u32,
    ndims: usize,
    what: &'static str,
}

const IMAGES: Kind = Kind {
    magic: IMAGES_MAGIC,
    ndims: 3,
    what: "unsigned bytes, 3 dimensions: an image file",
};
const LABELS: Kind = Kind {
    magic: LABELS_MAGIC,
    ndims: 1,
    what: "unsigned bytes, 1 dimension: a label file",
};

/// Whether `bytes` start with the gzip magic number `1f 8b`.
pub fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b])
}

/// Reads an IDX image file (raw or gzip'd) into an `(n, rows, cols)` array.
pub fn read_images(path: impl AsRef<Path>) -> Result<Array3<u8>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io("reading", path, e))?;
    images_from_vec(&path.display().to_string(), bytes)
}

/// Reads an IDX label file (raw or gzip'd) into an `(n,)` array.
pub fn read_labels(path: impl AsRef<Path>) -> Result<Array1<u8>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io("reading", path, e))?;
    labels_from_vec(&path.display().to_string(), bytes)
}

/// Parses an IDX image file held in memory (raw or gzip'd). `name` names it in errors.
pub fn parse_images(name: &str, bytes: &[u8]) -> Result<Array3<u8>> {
    images(name, Cow::Borrowed(bytes))
}

/// [`parse_images`] taking the bytes by value: a raw file's buffer becomes the array's.
pub fn images_from_vec(name: &str, bytes: Vec<u8>) -> Result<Array3<u8>> {
    images(name, Cow::Owned(bytes))
}

/// [`parse_labels`] taking the bytes by value: a raw file's buffer becomes the array's.
pub fn labels_from_vec(name: &str, bytes: Vec<u8>) -> Result<Array1<u8>> {
    let (_, data) = parse(name, Cow::Owned(bytes), LABELS)?;
    Ok(Array1::from_vec(data))
}

fn images(name: &str, bytes: Cow<'_, [u8]>) -> Result<Array3<u8>> {
    let (dims, data) = parse(name, bytes, IMAGES)?;
    let shape = (dims[0], dims[1], dims[2]);
    Array3::from_shape_vec(shape, data).map_err(|e| Error::InvalidArgument {
        what: format!("{name}: {e}"),
    })
}

/// Parses an IDX label file held in memory (raw or gzip'd). `name` names it in errors.
pub fn parse_labels(name: &str, bytes: &[u8]) -> Result<Array1<u8>> {
    let (_, data) = parse(name, Cow::Borrowed(bytes), LABELS)?;
    Ok(Array1::from_vec(data))
}

/// Encodes images as a raw IDX image file (the inverse of [`parse_images`]).
///
/// Fails if a dimension exceeds `u32::MAX`.
pub fn encode_images<S: Data<Elem = u8>>(images: &ArrayBase<S, Ix3>) -> Result<Vec<u8>> {
    encode(IMAGES_MAGIC, images.shape(), images.iter().copied())
}

/// Encodes labels as a raw IDX label file (the inverse of [`parse_labels`]).
///
/// Fails if there are more than `u32::MAX` labels.
pub fn encode_labels<S: Data<Elem = u8>>(labels: &ArrayBase<S, Ix1>) -> Result<Vec<u8>> {
    encode(LABELS_MAGIC, labels.shape(), labels.iter().copied())
}

fn encode(magic: u32, shape: &[usize], data: impl ExactSizeIterator<Item = u8>) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(4 + 4 * shape.len() + data.len());
    out.extend_from_slice(&magic.to_be_bytes());
    for &d in shape {
        let d = u32::try_from(d).map_err(|_| Error::InvalidArgument {
            what: format!("dimension {d} of shape {shape:?} does not fit an IDX header (u32)"),
        })?;
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend(data);
    Ok(out)
}

/// Decompresses gzip'd `bytes` (all members), refusing more than `limit` output bytes; returns
/// non-gzip bytes unchanged. `name` names the data in errors.
pub fn gunzip(name: &str, bytes: &[u8], limit: u64) -> Result<Vec<u8>> {
    if !is_gzip(bytes) {
        return Ok(bytes.to_vec());
    }
    let mut out = Vec::new();
    let mut decoder = MultiGzDecoder::new(bytes).take(limit.saturating_add(1));
    read_growing(&mut decoder, &mut out).map_err(|e| gzip_error(name, e))?;
    if out.len() as u64 > limit {
        return Err(Error::TooLarge {
            file: name.to_string(),
            limit,
        });
    }
    Ok(out)
}

/// Parses a whole IDX file: returns its dimensions and its data.
/// Raw bytes handed over as a `Vec` are reused for the data (no copy).
fn parse(name: &str, bytes: Cow<'_, [u8]>, kind: Kind) -> Result<(Vec<usize>, Vec<u8>)> {
    if is_gzip(&bytes) {
        parse_stream(name, MultiGzDecoder::new(&bytes[..]), kind)
    } else {
        let header = parse_header(name, &bytes, kind)?;
        check_data_len(name, &header, (bytes.len() - header.len) as u64)?;
        let data = match bytes {
            Cow::Borrowed(b) => b[header.len..].to_vec(),
            Cow::Owned(mut v) => {
                v.drain(..header.len);
                v
            }
        };
        Ok((header.dims_usize(), data))
    }
}

/// Parses an IDX stream (a gzip decoder), reading the data incrementally so that the buffer
/// grows only with bytes that actually arrive, never to a size the header merely claims.
fn parse_stream(name: &str, mut reader: impl Read, kind: Kind) -> Result<(Vec<usize>, Vec<u8>)> {
    let mut head = vec![0u8; 4 + 4 * kind.ndims];
    let got = read_up_to(&mut reader, &mut head).map_err(|e| gzip_error(name, e))?;
    let header = parse_header(name, &head[..got], kind)?;
    let mut data = Vec::new();
    let mut limited = (&mut reader).take(header.data_len);
    read_growing(&mut limited, &mut data).map_err(|e| gzip_error(name, e))?;
    // At most `data_len` bytes were read: this reports only a short stream.
    check_data_len(name, &header, data.len() as u64)?;
    let extra = io::copy(&mut reader, &mut io::sink()).map_err(|e| gzip_error(name, e))?;
    if extra > 0 {
        return Err(trailing(name, &header, extra));
    }
    Ok((header.dims_usize(), data))
}

/// A checked IDX header.
#[derive(Debug)]
struct Header {
    /// Header length in bytes.
    len: usize,
    dims: Vec<u32>,
    /// Data bytes the dimensions describe (checked product).
    data_len: u64,
}

impl Header {
    fn dims_usize(&self) -> Vec<usize> {
        // Every dimension fits a usize: their product (data_len) was checked to.
        self.dims.iter().map(|&d| d as usize).collect()
    }
}

/// Reads and checks the header at the start of `bytes` (which may hold only the header).
fn parse_header(name: &str, bytes: &[u8], kind: Kind) -> Result<Header> {
    let len = 4 + 4 * kind.ndims;
    let Some(magic) = be_u32(bytes, 0) else {
        return Err(Error::Truncated {
            file: name.to_string(),
            needed: len,
            got: bytes.len(),
        });
    };
    if magic != kind.magic {
        return Err(Error::BadMagic {
            file: name.to_string(),
            found: magic,
            expected: kind.magic,
            expected_what: kind.what,
            hint: magic_hint(magic, bytes),
        });
    }
    let dims: Option<Vec<u32>> = (0..kind.ndims).map(|i| be_u32(bytes, 4 + 4 * i)).collect();
    let Some(dims) = dims else {
        return Err(Error::Truncated {
            file: name.to_string(),
            needed: len,
            got: bytes.len(),
        });
    };
    // The sample count may be zero (an empty set); an image's rows and columns may not.
    if dims.iter().skip(1).any(|&d| d == 0) {
        return Err(Error::ZeroDimension {
            file: name.to_string(),
            dims,
        });
    }
    let product = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(u64::from(d)))
        .filter(|&p| usize::try_from(p).is_ok());
    let Some(data_len) = product else {
        return Err(Error::SizeOverflow {
            file: name.to_string(),
            dims,
        });
    };
    Ok(Header {
        len,
        dims,
        data_len,
    })
}

fn check_data_len(name: &str, header: &Header, got: u64) -> Result<()> {
    if got < header.data_len {
        Err(Error::HeaderLargerThanFile {
            file: name.to_string(),
            dims: header.dims.clone(),
            expected: header.data_len,
            got,
        })
    } else if got > header.data_len {
        Err(trailing(name, header, got - header.data_len))
    } else {
        Ok(())
    }
}

fn trailing(name: &str, header: &Header, extra: u64) -> Error {
    Error::TrailingBytes {
        file: name.to_string(),
        dims: header.dims.clone(),
        expected: header.data_len,
        extra,
    }
}

/// What a wrong magic number looks like, to help the reader.
fn magic_hint(magic: u32, bytes: &[u8]) -> &'static str {
    match magic {
        IMAGES_MAGIC => "; this is an IDX image file, not a label file",
        LABELS_MAGIC => "; this is an IDX label file, not an image file",
        m if m >> 16 == 0 => "; this is an IDX file of another element type or rank",
        _ if bytes.starts_with(b"<") => "; this looks like an HTML or XML page, not an IDX file",
        _ => "",
    }
}

fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at + 4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Fills `buf` as far as the reader allows; returns the number of bytes read (short at EOF).
fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Reads to EOF, growing `out` only as bytes arrive (no reservation from a size hint).
pub(crate) fn read_growing(reader: &mut impl Read, out: &mut Vec<u8>) -> io::Result<()> {
    let mut chunk = [0u8; 64 * 1024];
    loop {
        match reader.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn gzip_error(name: &str, source: io::Error) -> Error {
    Error::Gzip {
        file: name.to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(magic: u32, dims: &[u32]) -> Vec<u8> {
        let mut v = magic.to_be_bytes().to_vec();
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v
    }

    #[test]
    fn overflow_is_caught_before_any_allocation() {
        let bytes = header(IMAGES_MAGIC, &[u32::MAX, u32::MAX, u32::MAX]);
        let e = parse_images("big", &bytes).unwrap_err();
        assert!(matches!(e, Error::SizeOverflow { .. }), "{e}");
    }

    #[test]
    fn stream_buffer_grows_with_real_bytes_only() {
        // A header claiming 4 GiB over a 10-byte body: the reader must stop at 10 bytes.
        let mut body = header(IMAGES_MAGIC, &[1, 65536, 65536]);
        body.extend_from_slice(&[7u8; 10]);
        let e = parse_stream("s", &body[..], IMAGES).unwrap_err();
        match e {
            Error::HeaderLargerThanFile { expected, got, .. } => {
                assert_eq!(expected, 1 << 32);
                assert_eq!(got, 10);
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn hints_name_the_other_kind() {
        let bytes = header(LABELS_MAGIC, &[1]);
        let e = parse_images("l", &bytes).unwrap_err().to_string();
        assert!(e.contains("label file"), "{e}");
        let e = parse_labels("h", b"<!DOCTYPE html>")
            .unwrap_err()
            .to_string();
        assert!(e.contains("HTML"), "{e}");
    }
}
