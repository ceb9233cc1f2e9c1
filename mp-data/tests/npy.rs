//! NumPy files: every numeric dtype to float32 features, integer labels checked, `.npz` arrays
//! by name (stored and compressed), and every bad file named.
#![cfg(feature = "npy")]

use mp_data::npy::{
    npz_features, npz_labels, parse_features, parse_labels, read_features, read_labels,
};
use ndarray::{Array1, ArrayD, IxDyn, array};
use ndarray_npy::{NpzWriter, WriteNpyExt};

fn npy<A: WriteNpyExt>(a: &A) -> Vec<u8> {
    let mut bytes = Vec::new();
    a.write_npy(&mut bytes).unwrap();
    bytes
}

#[test]
fn every_numeric_dtype_reads_as_float32_features() {
    let want = [[0.0f32, 1.0, 2.0], [3.0, 4.0, 5.0]];
    let check = |bytes: Vec<u8>, what: &str| {
        let x = parse_features("x.npy", &bytes).unwrap();
        assert_eq!(x.shape(), &[2, 3], "{what}");
        for (i, row) in want.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                assert_eq!(x[[i, j]], v, "{what}");
            }
        }
    };
    check(npy(&array![[0.0f32, 1., 2.], [3., 4., 5.]]), "f32");
    check(npy(&array![[0.0f64, 1., 2.], [3., 4., 5.]]), "f64");
    check(npy(&array![[0u8, 1, 2], [3, 4, 5]]), "u8");
    check(npy(&array![[0i8, 1, 2], [3, 4, 5]]), "i8");
    check(npy(&array![[0u16, 1, 2], [3, 4, 5]]), "u16");
    check(npy(&array![[0i32, 1, 2], [3, 4, 5]]), "i32");
    check(npy(&array![[0i64, 1, 2], [3, 4, 5]]), "i64");
    check(npy(&array![[0u64, 1, 2], [3, 4, 5]]), "u64");
    // Any rank; non-finite values are kept.
    let cube = ArrayD::from_shape_vec(
        IxDyn(&[2, 2, 2]),
        vec![1.5f64, f64::NAN, -3.0, 4.0, 5.0, 6.0, 7.0, f64::INFINITY],
    )
    .unwrap();
    let x = parse_features("cube.npy", &npy(&cube)).unwrap();
    assert_eq!(x.shape(), &[2, 2, 2]);
    assert!(x[[0, 0, 1]].is_nan() && x[[1, 1, 1]] == f32::INFINITY);
    let b = parse_features("mask.npy", &npy(&array![true, false, true])).unwrap();
    assert_eq!(b.as_slice().unwrap(), &[1.0, 0.0, 1.0]);
}

#[test]
fn labels_are_whole_numbers_from_zero() {
    assert_eq!(
        parse_labels("y.npy", &npy(&array![3i64, 0, 9]))
            .unwrap()
            .to_vec(),
        vec![3, 0, 9]
    );
    assert_eq!(
        parse_labels("y.npy", &npy(&array![[1u8], [2]]))
            .unwrap()
            .to_vec(),
        vec![1, 2]
    );
    assert_eq!(
        parse_labels("y.npy", &npy(&array![2.0f32, 1.0]))
            .unwrap()
            .to_vec(),
        vec![2, 1]
    );
    let e = parse_labels("y.npy", &npy(&array![1i32, -4, 2]))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "y.npy: label 1 is -4: a class id must be a whole number from 0"
    );
    let e = parse_labels("y.npy", &npy(&array![0.5f64]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("label 0 is 0.5"), "{e}");
    let e = parse_labels("y.npy", &npy(&array![1.0f32, f32::NAN]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("label 1 is NaN"), "{e}");
    let e = parse_labels("y.npy", &npy(&array![[1u8, 2], [3, 4]]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("labels must be 1-D (or one column), not of shape [2, 2]"),
        "{e}"
    );
}

#[test]
fn bad_files_are_named() {
    let good = npy(&array![[1.0f32, 2.0], [3.0, 4.0]]);
    let e = parse_features("cut.npy", &good[..good.len() - 3])
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("cut.npy: truncated"), "{e}");
    let mut long = good.clone();
    long.extend([0, 0, 0, 0]);
    let e = parse_features("long.npy", &long).unwrap_err().to_string();
    assert!(e.starts_with("long.npy: 4 bytes after the data"), "{e}");
    let e = parse_features("text.npy", b"x,y\n1,2\n")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("text.npy: not a .npy file"), "{e}");
    // A complex array: a dtype that is not read, said so.
    let mut complex = good.clone();
    let at = complex.windows(3).position(|w| w == b"<f4").unwrap();
    complex[at..at + 3].copy_from_slice(b"<c8");
    let e = parse_features("c.npy", &complex).unwrap_err().to_string();
    assert!(e.contains("its dtype is none of"), "{e}");
    let e = read_features("/no/such/x.npy").unwrap_err().to_string();
    assert!(e.contains("/no/such/x.npy"), "{e}");
}

#[test]
fn npz_arrays_by_name_stored_or_compressed() {
    let dir = tempfile::tempdir().unwrap();
    for compressed in [false, true] {
        let path = dir.path().join(format!("d{compressed}.npz"));
        {
            let file = std::fs::File::create(&path).unwrap();
            let mut npz = if compressed {
                NpzWriter::new_compressed(file)
            } else {
                NpzWriter::new(file)
            };
            npz.add_array("x_train", &array![[0u8, 255], [128, 7]])
                .unwrap();
            npz.add_array("y_train", &array![1i64, 0]).unwrap();
            npz.finish().unwrap();
        }
        let x = npz_features(&path, "x_train").unwrap();
        assert_eq!(x.as_slice().unwrap(), &[0.0, 255.0, 128.0, 7.0]);
        let y: Array1<u32> = npz_labels(&path, "y_train").unwrap();
        assert_eq!(y.to_vec(), vec![1, 0]);
        let e = npz_features(&path, "x_test").unwrap_err().to_string();
        assert!(
            e.ends_with(
                "[x_test]: no array \"x_test\"; the archive holds [\"x_train\", \"y_train\"]"
            ),
            "{e}"
        );
        let e = npz_labels(&path, "x_train").unwrap_err().to_string();
        assert!(e.contains("[x_train]: labels must be 1-D"), "{e}");
    }
    // A .npy given as an archive, and files read from disk.
    let path = dir.path().join("y.npy");
    std::fs::write(&path, npy(&array![4u16, 2])).unwrap();
    assert_eq!(read_labels(&path).unwrap().to_vec(), vec![4, 2]);
    let e = npz_features(&path, "x").unwrap_err().to_string();
    assert!(e.contains("not an .npz archive"), "{e}");
}
