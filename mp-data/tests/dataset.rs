//! `Dataset`: shuffling, batching, take/skip and the validation split.

use mp_core::rng::test_seed;
use mp_data::{Dataset, Error};
use ndarray::{Array1, Array2, array};

/// `n` samples of 3 features; sample `i` has features `[i, 10 i, 100 i]` and label `i`.
fn numbered(n: usize) -> Dataset {
    let x = Array2::from_shape_fn((n, 3), |(i, j)| (i as f32) * 10f32.powi(j as i32));
    let y = Array1::from_iter(0..n as u32);
    Dataset::new(x, y).unwrap()
}

/// Every row still pairs its features with its label.
fn assert_rows_intact(ds: &Dataset) {
    for (row, &label) in ds.features().rows().into_iter().zip(ds.labels()) {
        assert_eq!(row[0], label as f32);
        assert_eq!(row[2], label as f32 * 100.0);
    }
}

#[test]
fn shuffle_is_a_deterministic_permutation() {
    let seed = test_seed("shuffle_is_a_deterministic_permutation");
    let ds = numbered(1000);
    let a = ds.shuffle(seed);
    let b = ds.shuffle(seed);
    assert_eq!(a, b, "same seed, same order");
    assert_ne!(
        a,
        ds.shuffle(seed.wrapping_add(1)),
        "another seed, another order"
    );
    assert_ne!(a.labels(), ds.labels());
    let mut labels = a.labels().to_vec();
    labels.sort_unstable();
    assert_eq!(labels, (0..1000).collect::<Vec<u32>>());
    assert_rows_intact(&a);
    // The order is mp_core's permutation for that seed.
    let order = mp_core::Rng::new(seed).permutation(1000);
    assert_eq!(
        a.labels().to_vec(),
        order.iter().map(|&i| i as u32).collect::<Vec<_>>()
    );
}

#[test]
fn batches_cover_every_sample_once() {
    let ds = numbered(10);
    let batches: Vec<_> = ds.batches(4).collect();
    assert_eq!(batches.len(), 3);
    assert_eq!(ds.batches(4).len(), 3);
    let sizes: Vec<usize> = batches
        .iter()
        .map(|(x, y)| {
            assert_eq!(x.nrows(), y.len());
            assert_eq!(x.ncols(), 3);
            y.len()
        })
        .collect();
    assert_eq!(sizes, vec![4, 4, 2]);
    let seen: Vec<u32> = batches.iter().flat_map(|(_, y)| y.to_vec()).collect();
    assert_eq!(seen, (0..10).collect::<Vec<_>>());
    assert_eq!(batches[2].0, array![[8.0, 80.0, 800.0], [9.0, 90.0, 900.0]]);

    assert_eq!(ds.batches(0).len(), 10, "batch size 0 is taken as 1");
    assert_eq!(ds.batches(100).len(), 1);
    assert_eq!(numbered(0).batches(4).len(), 0);
}

#[test]
fn shuffled_batches_cover_every_sample_once() {
    let seed = test_seed("shuffled_batches_cover_every_sample_once");
    let ds = numbered(103);
    let batches: Vec<_> = ds.shuffled_batches(10, seed).collect();
    assert_eq!(batches.len(), 11);
    let mut seen: Vec<u32> = Vec::new();
    for (x, y) in &batches {
        for (row, &l) in x.rows().into_iter().zip(y) {
            assert_eq!(row[1], l as f32 * 10.0);
        }
        seen.extend(y.iter());
    }
    // Same order as shuffling the whole dataset with that seed.
    assert_eq!(seen, ds.shuffle(seed).labels().to_vec());
    seen.sort_unstable();
    assert_eq!(seen, (0..103).collect::<Vec<_>>());
}

#[test]
fn take_and_skip() {
    let ds = numbered(10);
    assert_eq!(ds.take(3).labels().to_vec(), vec![0, 1, 2]);
    assert_eq!(ds.skip(7).labels().to_vec(), vec![7, 8, 9]);
    assert_eq!(ds.take(100).len(), 10);
    assert_eq!(ds.skip(100).len(), 0);
    assert!(ds.skip(10).is_empty());
    let (head, tail) = (ds.take(4), ds.skip(4));
    assert_eq!(head.len() + tail.len(), ds.len());
    assert_rows_intact(&tail);
}

#[test]
fn validation_split_takes_the_last_fraction() {
    let ds = numbered(10);
    let (train, val) = ds.split_validation(0.2).unwrap();
    assert_eq!(train.labels().to_vec(), (0..8).collect::<Vec<_>>());
    assert_eq!(val.labels().to_vec(), vec![8, 9]);
    let (train, val) = ds.split_validation(0.0).unwrap();
    assert_eq!((train.len(), val.len()), (10, 0));
    for bad in [1.0, -0.1, f64::NAN] {
        let e = ds.split_validation(bad).unwrap_err();
        assert!(e.to_string().contains("validation_split"), "{e}");
    }
}

#[test]
fn constructors_check_lengths() {
    let e = Dataset::new(Array2::zeros((3, 2)), Array1::zeros(2)).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    assert!(
        e.to_string().contains("3 rows but there are 2 labels"),
        "{e}"
    );

    let ds = Dataset::from_slices(&[1.0, 2.0, 3.0, 4.0], 2, &[1u8, 2]).unwrap();
    assert_eq!(ds.features(), array![[1.0, 2.0], [3.0, 4.0]]);
    assert_eq!(ds.labels(), array![1u32, 2]);
    assert!(Dataset::from_slices(&[1.0, 2.0, 3.0], 2, &[1u8, 2]).is_err());
    assert!(Dataset::from_slices::<u32>(&[], usize::MAX, &[1, 2]).is_err());

    let x = array![[0.5f32], [0.25]];
    let y = array![3u8, 4];
    let ds = Dataset::from_views(x.view(), y.view()).unwrap();
    assert_eq!(ds.labels(), array![3u32, 4]);
    let y32 = array![3u32, 4];
    assert_eq!(Dataset::from_views(x.view(), y32.view()).unwrap(), ds);

    assert_eq!(ds.gather(&[1, 1, 0]).unwrap().labels(), array![4u32, 4, 3]);
    assert!(ds.gather(&[2]).is_err());
    let (x2, y2) = ds.into_parts();
    assert_eq!((x2, y2), (x, y32));
}
