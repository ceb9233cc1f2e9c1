//! Replays the checkpoint fuzz target's kept corpus (`fuzz/corpus/checkpoint`) through its
//! harness (`fuzz/harness/checkpoint.rs`) as an ordinary stable test: no input may panic, and a
//! refused file must leave the trainer unchanged. Fuzzing itself needs nightly:
//! `cargo +nightly fuzz run checkpoint`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mp_core::{LossScale, Rng};
use mp_layers::{BestMetric, Checkpointing, FitOptions, ModelCheckpoint, Verbose};
use ndarray::{Array1, Array2};

#[path = "../../fuzz/harness/checkpoint.rs"]
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
fn checkpoint_fuzz_corpus_replays_without_panics() {
    let files = corpus("checkpoint");
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

/// Writes the seed inputs the corpus was grown from into `$MP_FUZZ_SEEDS`:
/// `MP_FUZZ_SEEDS=dir cargo test -p mp-layers --test fuzz_corpus -- --ignored`.
#[test]
#[ignore = "writes the fuzz seeds when MP_FUZZ_SEEDS is set"]
fn write_fuzz_seeds() {
    let Ok(dir) = std::env::var("MP_FUZZ_SEEDS") else {
        return;
    };
    let dir = Path::new(&dir);
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = Rng::new(7);
    let x = Array2::from_shape_fn((12, 2), |_| rng.uniform(-1.0, 1.0));
    let y = Array1::from_shape_fn(12, |i| (i % 2) as u32);
    let o = FitOptions {
        batch_size: 4,
        epochs: 2,
        validation_split: 0.25,
        verbose: Verbose::Silent,
        ..Default::default()
    };
    let mut fresh = harness::trainer();
    let mut trained = harness::trainer();
    trained.fit(x.view(), y.view(), &o).unwrap();
    let tmp = std::env::temp_dir().join(format!("mp-fuzz-seeds-{}", std::process::id()));
    let mut best = harness::trainer()
        .with_callback(ModelCheckpoint::new(&tmp).best(BestMetric::min("val_loss")));
    best.fit(x.view(), y.view(), &o).unwrap();
    let _ = std::fs::remove_dir_all(&tmp);
    let mut fixed = harness::trainer().with_loss_scale(Some(LossScale::fixed(128.0).unwrap()));
    fixed.fit(x.view(), y.view(), &o).unwrap();
    let foreign = mp_layers::checkpoint::safetensors::serialize(
        &[("hidden/kernel", "F16", &[2, 3][..], &[0u8; 12][..])],
        &BTreeMap::from([("format".to_string(), "pt".to_string())]),
    )
    .unwrap();
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("fresh", fresh.checkpoint_bytes().unwrap()),
        ("trained", trained.checkpoint_bytes().unwrap()),
        ("best", best.checkpoint_bytes().unwrap()),
        ("fixed-scale", fixed.checkpoint_bytes().unwrap()),
        (
            "weights",
            mp_layers::checkpoint::weights_to_bytes(trained.model_mut()).unwrap(),
        ),
        ("foreign", foreign),
    ];
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}
