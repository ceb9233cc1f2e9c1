//! Replays the IDX fuzz target's kept corpus (`fuzz/corpus/idx`) through its harness
//! (`fuzz/harness/idx.rs`) as an ordinary stable test: no input may panic or break the harness's
//! properties. Fuzzing itself needs nightly: `cargo +nightly fuzz run idx`.

use std::io::Write;
use std::path::{Path, PathBuf};

#[path = "../../fuzz/harness/idx.rs"]
mod harness;

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn idx_fuzz_corpus_replays_without_panics() {
    let files = corpus("idx");
    assert!(!files.is_empty(), "the kept corpus is missing");
    let mut failed = vec![];
    for path in &files {
        let bytes = std::fs::read(path).unwrap();
        if std::panic::catch_unwind(|| harness::run(&bytes)).is_err() {
            failed.push(path.display().to_string());
        }
    }
    eprintln!("replayed {} inputs", files.len());
    assert!(failed.is_empty(), "inputs that panic: {failed:#?}");
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Writes the seed inputs the corpus was grown from into `$MP_FUZZ_SEEDS`:
/// `MP_FUZZ_SEEDS=dir cargo test -p mp-data --test fuzz_corpus -- --ignored`.
#[test]
#[ignore = "writes the fuzz seeds when MP_FUZZ_SEEDS is set"]
fn write_fuzz_seeds() {
    let Ok(dir) = std::env::var("MP_FUZZ_SEEDS") else {
        return;
    };
    let dir = Path::new(&dir);
    std::fs::create_dir_all(dir).unwrap();
    let header = |magic: u32, dims: &[u32]| -> Vec<u8> {
        let mut v = magic.to_be_bytes().to_vec();
        dims.iter()
            .for_each(|d| v.extend_from_slice(&d.to_be_bytes()));
        v
    };
    let mut images = header(2051, &[2, 3, 4]);
    images.extend((0..24u8).map(|i| i * 10));
    let mut labels = header(2049, &[5]);
    labels.extend([7, 2, 1, 0, 4]);
    let mut two_members = gzip(&images[..10]);
    two_members.extend(gzip(&images[10..]));
    let mut trailing = gzip(&labels);
    trailing.extend(b"junk");
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("images", images.clone()),
        ("images.gz", gzip(&images)),
        ("labels", labels.clone()),
        ("labels.gz", gzip(&labels)),
        ("empty-images", header(2051, &[0, 28, 28])),
        ("lying-header", header(2051, &[60000, 28, 28])),
        ("zero-rows", header(2051, &[1, 0, 28])),
        ("truncated", images[..20].to_vec()),
        ("two-members.gz", two_members),
        ("trailing.gz", trailing),
        ("truncated.gz", gzip(&images)[..30].to_vec()),
        ("html", b"<!DOCTYPE html><html></html>".to_vec()),
    ];
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}
