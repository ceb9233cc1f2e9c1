//! IDX parsing: valid files (raw and gzip, from bytes and from paths) and every kind of bad file.

mod common;

use common::{gzip, header, images, labels};
use mp_data::Error;
use mp_data::idx::{self, IMAGES_MAGIC, LABELS_MAGIC};
use ndarray::{Array1, Array3};

fn err_images(bytes: &[u8]) -> Error {
    idx::parse_images("bad.idx", bytes).expect_err("parse should fail")
}

fn err_labels(bytes: &[u8]) -> Error {
    idx::parse_labels("bad.idx", bytes).expect_err("parse should fail")
}

/// Every message names the file.
fn assert_names_file(e: &Error) {
    let msg = e.to_string();
    assert!(
        msg.starts_with("bad.idx: "),
        "message does not name the file: {msg}"
    );
}

#[test]
fn valid_raw_and_gzip_images_parse() {
    let raw = images(3, 2, 4, 1);
    for bytes in [raw.clone(), gzip(&raw)] {
        let x = idx::parse_images("ok", &bytes).unwrap();
        assert_eq!(x.shape(), &[3, 2, 4]);
        assert_eq!(x[[0, 0, 0]], 1);
        assert_eq!(x[[0, 0, 1]], 8);
        assert_eq!(x.iter().copied().collect::<Vec<_>>(), raw[16..].to_vec());
    }
}

#[test]
fn valid_raw_and_gzip_labels_parse() {
    let raw = labels(&[5, 0, 4, 1, 9]);
    for bytes in [raw.clone(), gzip(&raw)] {
        let y = idx::parse_labels("ok", &bytes).unwrap();
        assert_eq!(y, Array1::from(vec![5u8, 0, 4, 1, 9]));
    }
}

#[test]
fn empty_sets_parse() {
    let x = idx::parse_images("ok", &header(IMAGES_MAGIC, &[0, 28, 28])).unwrap();
    assert_eq!(x.shape(), &[0, 28, 28]);
    let y = idx::parse_labels("ok", &header(LABELS_MAGIC, &[0])).unwrap();
    assert!(y.is_empty());
}

#[test]
fn reads_from_paths_raw_and_gzip() {
    let dir = tempfile::tempdir().unwrap();
    let raw = images(2, 3, 3, 0);
    std::fs::write(dir.path().join("a"), &raw).unwrap();
    std::fs::write(dir.path().join("a.gz"), gzip(&raw)).unwrap();
    let a = idx::read_images(dir.path().join("a")).unwrap();
    let b = idx::read_images(dir.path().join("a.gz")).unwrap();
    assert_eq!(a, b);
    std::fs::write(dir.path().join("l"), labels(&[1, 2])).unwrap();
    assert_eq!(idx::read_labels(dir.path().join("l")).unwrap().len(), 2);

    // Errors from a path name the path.
    let short = dir.path().join("short");
    std::fs::write(&short, &raw[..raw.len() - 1]).unwrap();
    let e = idx::read_images(&short).unwrap_err();
    assert!(matches!(e, Error::HeaderLargerThanFile { .. }), "{e}");
    assert!(
        e.to_string().starts_with(&short.display().to_string()),
        "{e}"
    );
    assert!(idx::labels_from_vec("v", labels(&[4])).is_ok());

    let missing = dir.path().join("missing");
    let e = idx::read_images(&missing).unwrap_err().to_string();
    assert!(e.starts_with("reading ") && e.contains("missing"), "{e}");
}

#[test]
fn encode_round_trips() {
    let x = Array3::from_shape_fn((4, 3, 2), |(i, j, k)| (i * 6 + j * 2 + k) as u8);
    let bytes = idx::encode_images(&x).unwrap();
    assert_eq!(idx::parse_images("rt", &bytes).unwrap(), x);
    let y = Array1::from(vec![3u8, 1, 4]);
    assert_eq!(
        idx::parse_labels("rt", &idx::encode_labels(&y).unwrap()).unwrap(),
        y
    );
}

#[test]
fn truncated_header() {
    for bytes in [&[][..], &[0, 0][..], &[0, 0, 8, 3, 0, 0, 0, 1][..]] {
        for e in [err_images(bytes), err_images(&gzip(bytes))] {
            assert!(matches!(e, Error::Truncated { needed: 16, .. }), "{e}");
            assert!(e.to_string().contains("truncated"), "{e}");
            assert_names_file(&e);
        }
    }
    let e = err_labels(&[0, 0, 8, 1, 0]);
    assert!(
        matches!(
            e,
            Error::Truncated {
                needed: 8,
                got: 5,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn wrong_magic_reports_the_value_found() {
    let mut bytes = images(1, 2, 2, 0);
    bytes[3] = 4;
    let e = err_images(&bytes);
    match &e {
        Error::BadMagic {
            found, expected, ..
        } => {
            assert_eq!(*found, 0x804);
            assert_eq!(*expected, 2051);
        }
        other => panic!("unexpected {other}"),
    }
    let msg = e.to_string();
    assert!(msg.contains("2052") && msg.contains("2051"), "{msg}");
    assert_names_file(&e);

    // Labels given where images are expected, and the other way round.
    let e = err_images(&labels(&[1, 2, 3]));
    assert!(e.to_string().contains("label file"), "{e}");
    let e = err_labels(&images(1, 1, 1, 0));
    assert!(e.to_string().contains("image file"), "{e}");
    // A gzip'd file with the wrong magic.
    let e = err_labels(&gzip(b"\x12\x34\x56\x78 and more"));
    assert!(
        matches!(
            e,
            Error::BadMagic {
                found: 0x1234_5678,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn header_larger_than_file() {
    // 60000 x 28 x 28 claimed, 10 bytes present.
    let mut bytes = header(IMAGES_MAGIC, &[60000, 28, 28]);
    bytes.extend_from_slice(&[0; 10]);
    for e in [err_images(&bytes), err_images(&gzip(&bytes))] {
        match &e {
            Error::HeaderLargerThanFile { expected, got, .. } => {
                assert_eq!(*expected, 47_040_000);
                assert_eq!(*got, 10);
            }
            other => panic!("unexpected {other}"),
        }
        assert_names_file(&e);
    }
    // Truncated data (one byte short).
    let mut short = labels(&[1, 2, 3]);
    short.pop();
    let e = err_labels(&short);
    assert!(
        matches!(
            e,
            Error::HeaderLargerThanFile {
                expected: 3,
                got: 2,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn trailing_garbage() {
    let mut bytes = images(2, 2, 2, 0);
    bytes.extend_from_slice(b"garbage");
    for e in [err_images(&bytes), err_images(&gzip(&bytes))] {
        assert!(
            matches!(
                e,
                Error::TrailingBytes {
                    extra: 7,
                    expected: 8,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("7 trailing bytes"), "{e}");
        assert_names_file(&e);
    }
    // Garbage after the gzip member itself is a gzip error, naming the file.
    let mut gz = gzip(&labels(&[1]));
    gz.extend_from_slice(b"junk after the gzip stream");
    let e = err_labels(&gz);
    assert!(matches!(e, Error::Gzip { .. }), "{e}");
    assert_names_file(&e);
}

#[test]
fn zero_dimensions() {
    for dims in [[2, 0, 28], [2, 28, 0], [0, 0, 0]] {
        let e = err_images(&header(IMAGES_MAGIC, &dims));
        assert!(matches!(e, Error::ZeroDimension { .. }), "{dims:?}: {e}");
        assert!(e.to_string().contains("zero dimension"), "{e}");
        assert_names_file(&e);
    }
}

#[test]
fn overflowing_dimensions_allocate_nothing() {
    let max = u32::MAX;
    for dims in [[max, max, max], [max, max, 2], [2, max, max]] {
        let bytes = header(IMAGES_MAGIC, &dims);
        for e in [err_images(&bytes), err_images(&gzip(&bytes))] {
            assert!(matches!(e, Error::SizeOverflow { .. }), "{dims:?}: {e}");
            assert!(e.to_string().contains("overflow"), "{e}");
            assert_names_file(&e);
        }
    }
    // (2^32-1)^2 x 1 fits a u64 but not the file: refused before allocating ~16 EiB.
    let e = err_images(&header(IMAGES_MAGIC, &[max, max, 1]));
    assert!(
        matches!(
            e,
            Error::HeaderLargerThanFile { got: 0, .. } | Error::SizeOverflow { .. }
        ),
        "{e}"
    );
}

#[test]
fn lying_gzip_header_is_refused_without_allocating_its_size() {
    // A gzip stream claiming 2^16 x 2^16 x 255 bytes (~1 TiB) over 100 real bytes: refused
    // quickly (the buffer only grows with real bytes, so this would abort otherwise).
    let mut bytes = header(IMAGES_MAGIC, &[65536, 65536, 255]);
    bytes.extend_from_slice(&[1; 100]);
    let e = err_images(&gzip(&bytes));
    assert!(
        matches!(e, Error::HeaderLargerThanFile { got: 100, .. }),
        "{e}"
    );
}

#[test]
fn corrupt_gzip_names_the_file() {
    let mut gz = gzip(&images(4, 4, 4, 0));
    let n = gz.len();
    gz.truncate(n - 10);
    let e = err_images(&gz);
    assert!(matches!(e, Error::Gzip { .. }), "{e}");
    assert!(e.to_string().contains("gzip"), "{e}");
    assert_names_file(&e);
}
