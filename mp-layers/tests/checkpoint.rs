//! Checkpoints: exact resume, the safetensors layout, refusal of bad files with the trainer left
//! unchanged, atomic writes across a crash, and fit's checkpoint callbacks.

use std::collections::BTreeMap;
use std::path::Path;

use mp_core::{
    DynamicLossScale, F32, Float32, LossScale, MixedBFloat16, MixedFloat16, PolicyKind, Rng, Tensor,
};
use mp_layers::checkpoint::{
    self, Error as CkptError, KEY_SHA256, KEY_VERSION, safetensors::SafeTensors,
};
use mp_layers::{
    BatchNormalization, BestMetric, Checkpointing, Dense, EpochLogs, FitOptions, Layer, Model,
    ModelCheckpoint, Softmax, SparseCategoricalCrossentropy, TrainOptimizer, Trainer,
    TrainingProgress, Verbose, model,
};
use mp_optim::loss_scale_optimizer::ScalingState;
use mp_optim::{Adam, Optimizer, RmsProp, Sgd};
use ndarray::{Array1, Array2};

#[model]
struct Classifier {
    hidden_1: Dense,
    hidden_2: Dense,
    logits: Dense,
    #[dtype = "float32"]
    probs: Softmax,
}

fn classifier<P: PolicyKind>(units: usize) -> Classifier<P> {
    Classifier {
        hidden_1: Dense::new(units).relu(),
        hidden_2: Dense::new(units).relu(),
        logits: Dense::new(2),
        probs: Softmax::new(),
    }
}

/// Two interleaved spirals.
fn spirals(n_per_class: usize, seed: u64) -> (Array2<f32>, Array1<u32>) {
    let mut rng = Rng::new(seed);
    let mut x = Array2::zeros((2 * n_per_class, 2));
    let mut y = Array1::zeros(2 * n_per_class);
    for i in 0..n_per_class {
        let t = 0.25 + 3.0 * std::f32::consts::PI * i as f32 / n_per_class as f32;
        for class in 0..2 {
            let r = t / (3.0 * std::f32::consts::PI);
            let angle = t + class as f32 * std::f32::consts::PI;
            let row = 2 * i + class;
            x[[row, 0]] = r * angle.cos() + 0.01 * rng.normal();
            x[[row, 1]] = r * angle.sin() + 0.01 * rng.normal();
            y[row] = class as u32;
        }
    }
    (x, y)
}

fn bits(t: &Tensor<F32>) -> Vec<u32> {
    t.as_slice().unwrap().iter().map(|v| v.to_bits()).collect()
}

/// Everything a checkpoint restores, bit for bit.
#[derive(Debug, PartialEq)]
struct Snapshot {
    weights: Vec<(String, Vec<u32>)>,
    slots: Vec<(String, String, Vec<u32>)>,
    iterations: u64,
    learning_rate: u32,
    scaling: Option<ScalingState>,
    progress: TrainingProgress,
    best: Option<(BestMetric, u32)>,
}

fn snapshot<M: Model, O: Optimizer>(t: &mut Trainer<M, O>) -> Snapshot {
    let weights = t
        .model_mut()
        .get_weights()
        .unwrap()
        .iter()
        .map(|(n, w)| (n.clone(), bits(w)))
        .collect();
    let opt = t.optimizer().inner();
    Snapshot {
        weights,
        slots: opt
            .state()
            .into_iter()
            .map(|(v, s, x)| (v, s.to_string(), bits(x)))
            .collect(),
        iterations: opt.iterations(),
        learning_rate: opt.learning_rate().to_bits(),
        scaling: match t.optimizer() {
            TrainOptimizer::Scaled(s) => Some(s.scaling_state()),
            TrainOptimizer::Plain(_) => None,
        },
        progress: t.progress(),
        best: t.best_metric().map(|(m, v)| (m.clone(), v.to_bits())),
    }
}

/// The epoch's numbers without its wall time, as bits.
fn logs_bits(l: &EpochLogs) -> (usize, u32, u32, Option<u32>, Option<u32>, Option<u32>, u64) {
    (
        l.epoch,
        l.loss.to_bits(),
        l.get("accuracy").unwrap().to_bits(),
        l.val_loss.map(f32::to_bits),
        l.get("val_accuracy").map(f32::to_bits),
        l.loss_scale.map(f32::to_bits),
        l.skipped_steps,
    )
}

fn options(epochs: usize) -> FitOptions {
    FitOptions {
        batch_size: 16,
        epochs,
        validation_split: 0.2,
        seed: 1234,
        verbose: Verbose::Silent,
        ..Default::default()
    }
}

const GROWTH_INTERVAL: u64 = 8;

/// A dynamic loss scale far too large for float16 that tries to grow back after 8 finite steps:
/// it falls from 2^24 to 2^19 in the first epoch, then keeps growing to 2^20, overflowing and
/// backing off, so steps are skipped before and after the checkpoint, which lands mid-way
/// through a run of good steps.
fn restless_scale() -> LossScale {
    LossScale::Dynamic(DynamicLossScale::new(16_777_216.0, GROWTH_INTERVAL, 2.0).unwrap())
}

/// Trains 4 epochs straight, and 2 + (checkpoint, new trainer, resume) 2, and compares
/// everything bit for bit.
fn resume_is_bit_identical<P: PolicyKind, O: Optimizer>(
    make_opt: impl Fn() -> O,
    scale: Option<LossScale>,
) -> (Vec<EpochLogs>, Snapshot) {
    let (x, y) = spirals(64, 99);
    let trainer = || {
        let t = Trainer::compile(
            classifier::<P>(16),
            make_opt(),
            SparseCategoricalCrossentropy::new(),
        );
        match &scale {
            Some(s) => t.with_loss_scale(Some(s.clone())),
            None => t,
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let config = ModelCheckpoint::new(dir.path())
        .keep_last(2)
        .best(BestMetric::min("val_loss"));

    let mut straight = trainer().with_callback(ModelCheckpoint::new(dir.path().join("a")));
    let full = straight.fit(x.view(), y.view(), &options(4)).unwrap();

    let mut first = trainer().with_callback(config.clone());
    let h1 = first.fit(x.view(), y.view(), &options(2)).unwrap();
    let at_checkpoint = snapshot(&mut first);
    drop(first);

    let mut resumed = trainer().with_callback(config.clone());
    resumed.model_mut().build(&[2]).unwrap();
    let from = resumed.resume_latest(dir.path()).unwrap().unwrap();
    assert_eq!(from, config.epoch_path(2));
    assert_eq!(
        snapshot(&mut resumed),
        at_checkpoint,
        "resume restores everything"
    );
    let h2 = resumed.fit(x.view(), y.view(), &options(2)).unwrap();

    let split: Vec<_> = h1.epochs.iter().chain(&h2.epochs).map(logs_bits).collect();
    let whole: Vec<_> = full.epochs.iter().map(logs_bits).collect();
    assert_eq!(split, whole, "the per-epoch metrics match bit for bit");
    let end = snapshot(&mut straight);
    let mut resumed_end = snapshot(&mut resumed);
    // The best value is tracked only where checkpointing with a best metric is on.
    assert!(resumed_end.best.is_some());
    resumed_end.best = None;
    assert_eq!(
        resumed_end, end,
        "weights, optimizer, loss scale and progress match"
    );
    assert_eq!(end.progress.epoch, 4);
    assert_eq!(
        end.progress.step,
        4 * 7,
        "102 training samples in batches of 16"
    );

    // keep_last(2): epochs 3 and 4 remain; the best epoch was written too.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().into_string().ok())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "best.safetensors",
            "epoch-000003.safetensors",
            "epoch-000004.safetensors"
        ]
    );
    (full.epochs, at_checkpoint)
}

#[test]
fn resume_is_bit_identical_under_mixed_float16_with_a_moving_loss_scale() {
    let (epochs, at_checkpoint) =
        resume_is_bit_identical::<MixedFloat16, _>(Adam::default, Some(restless_scale()));
    let scaling = at_checkpoint.scaling.unwrap();
    // The scale really moved: steps were skipped before and after the checkpoint, and the
    // scale at the end of each epoch is not the initial one.
    eprintln!(
        "at the checkpoint: {} applied, {} skipped, {}; per epoch: {:?}",
        scaling.applied,
        scaling.skipped,
        scaling.loss_scale,
        epochs
            .iter()
            .map(|e| (e.loss_scale, e.skipped_steps))
            .collect::<Vec<_>>()
    );
    assert!(scaling.skipped > 0 && scaling.applied > 0);
    assert!(epochs[2..].iter().map(|e| e.skipped_steps).sum::<u64>() > 0);
    assert!(epochs.iter().all(|e| e.loss_scale.unwrap() < 16_777_216.0));
    let LossScale::Dynamic(d) = &scaling.loss_scale else {
        panic!("dynamic")
    };
    assert_eq!(
        d.config().growth_interval,
        GROWTH_INTERVAL,
        "the whole config is restored"
    );
    assert!(d.good_steps() > 0, "a good-step count mid-way is restored");
    assert!(at_checkpoint.iterations > 0 && !at_checkpoint.slots.is_empty());
}

#[test]
fn resume_is_bit_identical_without_loss_scaling() {
    resume_is_bit_identical::<MixedBFloat16, _>(
        || RmsProp::default().with_momentum(0.5).unwrap(),
        None,
    );
    resume_is_bit_identical::<Float32, _>(
        || Sgd::new(0.05).unwrap().with_momentum(0.9).unwrap(),
        None,
    );
}

fn trained_trainer() -> Trainer<Classifier<MixedFloat16>, Adam> {
    let (x, y) = spirals(32, 5);
    let mut t = Trainer::compile(
        classifier::<MixedFloat16>(8),
        Adam::default(),
        SparseCategoricalCrossentropy::new(),
    );
    let o = FitOptions {
        batch_size: 8,
        epochs: 2,
        verbose: Verbose::Silent,
        ..Default::default()
    };
    t.fit(x.view(), y.view(), &o).unwrap();
    t
}

#[test]
fn a_checkpoint_is_a_safetensors_file_named_by_parameter_paths() {
    let mut t = trained_trainer();
    let bytes = t.checkpoint_bytes().unwrap();
    // Read it by hand, as the format's specification says.
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!((8 + n) % 8, 0, "the data starts 8-byte aligned");
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    for (name, w) in t.model_mut().get_weights().unwrap() {
        let e = &header[name.as_str()];
        assert_eq!(e["dtype"], "F32", "{name}");
        let shape: Vec<usize> = serde_json::from_value(e["shape"].clone()).unwrap();
        assert_eq!(shape, w.shape(), "{name}");
        let [b, end]: [usize; 2] = serde_json::from_value(e["data_offsets"].clone()).unwrap();
        let values: Vec<u32> = data[b..end]
            .chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(values, bits(&w), "{name}");
    }
    assert_eq!(
        header["hidden_1/kernel"]["shape"],
        serde_json::json!([2, 8])
    );
    assert_eq!(
        header["optimizer/hidden_1/kernel/m"]["shape"],
        serde_json::json!([2, 8])
    );
    let meta = &header["__metadata__"];
    assert_eq!(meta["mp.kind"], "checkpoint");
    assert_eq!(meta[KEY_VERSION], "1");
    let state: serde_json::Value =
        serde_json::from_str(meta["mp.state"].as_str().unwrap()).unwrap();
    assert_eq!(state["policy"], "mixed_float16");
    assert_eq!(state["optimizer"]["name"], "Adam");
    assert_eq!(state["progress"]["epoch"], 2);
    assert_eq!(
        state["loss_scaling"]["loss_scale"]["initial_scale"],
        "32768.0"
    );

    // The weights-only file holds exactly the variables.
    let w = checkpoint::weights_to_bytes(t.model_mut()).unwrap();
    let st = SafeTensors::parse("w", &w).unwrap();
    let names: Vec<&str> = st.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "hidden_1/kernel",
            "hidden_1/bias",
            "hidden_2/kernel",
            "hidden_2/bias",
            "logits/kernel",
            "logits/bias"
        ]
    );
}

/// Rewrites a file through `edit` and gives it a valid checksum again: what passes the
/// checksum must still be refused by name.
fn reseal(
    bytes: &[u8],
    edit: impl FnOnce(&mut BTreeMap<String, String>, &mut Vec<(String, String, Vec<usize>, Vec<u8>)>),
) -> Vec<u8> {
    let st = SafeTensors::parse("x", bytes).unwrap();
    let mut meta = st.metadata.clone();
    let mut tensors: Vec<_> = st
        .tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.dtype.clone(),
                t.shape.clone(),
                st.data(t).to_vec(),
            )
        })
        .collect();
    edit(&mut meta, &mut tensors);
    let write = |meta: &BTreeMap<String, String>| {
        let entries: Vec<_> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.as_str(), d.as_str(), s.as_slice(), b.as_slice()))
            .collect();
        checkpoint::safetensors::serialize(&entries, meta).unwrap()
    };
    let unsealed = write(&meta);
    let sum = checkpoint::checksum(&SafeTensors::parse("x", &unsealed).unwrap());
    meta.insert(KEY_SHA256.into(), sum);
    write(&meta)
}

fn refused<M: Model, O: Optimizer>(t: &mut Trainer<M, O>, bytes: &[u8], expect: &[&str]) {
    let before = snapshot(t);
    let e = t.resume_from_bytes("bad.safetensors", bytes).unwrap_err();
    let msg = e.to_string();
    for part in expect {
        assert!(msg.contains(part), "{part:?} not in: {msg}");
    }
    assert_eq!(
        snapshot(t),
        before,
        "a refused file changed the trainer: {msg}"
    );
}

#[test]
fn truncated_corrupted_and_foreign_files_are_refused_and_change_nothing() {
    let mut source = trained_trainer();
    let good = source.checkpoint_bytes().unwrap();
    // The target: another trainer, trained differently, whose state must survive every refusal.
    let mut t = trained_trainer();
    let (x, y) = spirals(16, 8);
    let o = FitOptions {
        batch_size: 4,
        epochs: 1,
        seed: 3,
        verbose: Verbose::Silent,
        ..Default::default()
    };
    t.fit(x.view(), y.view(), &o).unwrap();
    let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;

    // Truncated anywhere.
    refused(&mut t, &[], &["truncated", "8-byte header length"]);
    refused(&mut t, &good[..5], &["truncated"]);
    refused(&mut t, &good[..8], &["truncated", "header length"]);
    refused(&mut t, &good[..8 + n / 2], &["truncated"]);
    refused(
        &mut t,
        &good[..good.len() - 1],
        &["truncated", "data section"],
    );
    refused(&mut t, &good[..good.len() - 100], &["truncated"]);
    // Trailing bytes.
    refused(&mut t, &[&good[..], b"x"].concat(), &["trailing bytes"]);
    // Corrupted data (one bit) and corrupted header.
    let mut flipped = good.clone();
    *flipped.last_mut().unwrap() ^= 1;
    refused(&mut t, &flipped, &["corrupted", "checksum"]);
    let mut flipped = good.clone();
    flipped[8 + n / 2] ^= 0x40;
    let e = t.resume_from_bytes("f", &flipped).unwrap_err().to_string();
    assert!(
        e.contains("not a valid safetensors") || e.contains("corrupted"),
        "{e}"
    );
    // Foreign files.
    let idx = [0u8, 0, 8, 3, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 7];
    refused(&mut t, &idx, &["not a valid safetensors file"]);
    refused(&mut t, b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", &["header length"]);
    refused(
        &mut t,
        b"{\"not\": \"safetensors\"}",
        &["not a valid safetensors"],
    );
    let foreign = checkpoint::safetensors::serialize(
        &[("weight", "F32", &[1][..], &[0, 0, 128, 63][..])],
        &BTreeMap::new(),
    )
    .unwrap();
    refused(&mut t, &foreign, &["not an mp checkpoint", "another tool"]);
    let weights = checkpoint::weights_to_bytes(source.model_mut()).unwrap();
    refused(&mut t, &weights, &["not an mp checkpoint", "weights only"]);

    // A newer format version is refused before anything else is trusted.
    let newer = reseal(&good, |m, _| {
        m.insert(KEY_VERSION.into(), "2".into());
    });
    refused(
        &mut t,
        &newer,
        &["format version 2", "newer than the newest", "(1)"],
    );
    // Checksummed but wrong: a float16 weight, a weight of the wrong shape, a missing one.
    let f16 = reseal(&good, |_, ts| {
        let k = ts.iter_mut().find(|t| t.0 == "hidden_2/bias").unwrap();
        k.1 = "F16".into();
        k.3.truncate(k.3.len() / 2);
    });
    refused(
        &mut t,
        &f16,
        &["\"hidden_2/bias\" has dtype F16, expected F32"],
    );
    let bad_state = reseal(&good, |m, _| {
        let s = m.get_mut("mp.state").unwrap();
        *s = s.replace("\"growth_interval\":2000", "\"growth_interval\":0");
    });
    refused(
        &mut t,
        &bad_state,
        &["invalid checkpoint", "growth_interval"],
    );

    // Another model: every mismatching variable is named, with both shapes.
    let mut wide = Trainer::compile(
        classifier::<MixedFloat16>(12),
        Adam::default(),
        SparseCategoricalCrossentropy::new(),
    );
    wide.model_mut().build(&[2]).unwrap();
    let wide = wide.checkpoint_bytes().unwrap();
    let before = snapshot(&mut t);
    let e = t.resume_from_bytes("wide", &wide).unwrap_err();
    let CkptError::Mismatch { problems, .. } = &e else {
        panic!("{e}")
    };
    assert_eq!(snapshot(&mut t), before);
    for name in [
        "hidden_1/kernel",
        "hidden_1/bias",
        "hidden_2/kernel",
        "logits/kernel",
    ] {
        assert!(
            problems
                .iter()
                .any(|p| p.contains(&format!("{name:?} has shape"))),
            "{name} not named in {problems:?}"
        );
    }
    assert!(
        problems
            .iter()
            .any(|p| p.contains("[2, 12] in the file, [2, 8] in the model"))
    );

    // Another optimizer, another loss scaling, an unbuilt model.
    let mut rms = Trainer::compile(
        classifier::<MixedFloat16>(8),
        RmsProp::default(),
        SparseCategoricalCrossentropy::new(),
    );
    rms.model_mut().build(&[2]).unwrap();
    refused(
        &mut rms,
        &good,
        &["the optimizer is Adam in the file, RMSprop in the trainer"],
    );
    let mut plain = Trainer::compile(
        classifier::<Float32>(8),
        Adam::default(),
        SparseCategoricalCrossentropy::new(),
    );
    plain.model_mut().build(&[2]).unwrap();
    refused(&mut plain, &good, &["the file has loss scaling"]);
    let mut unbuilt = Trainer::compile(
        classifier::<MixedFloat16>(8),
        Adam::default(),
        SparseCategoricalCrossentropy::new(),
    );
    refused(&mut unbuilt, &good, &["build it"]);
    let mut adam = Trainer::compile(
        classifier::<MixedFloat16>(8),
        Adam::default().with_betas(0.8, 0.999).unwrap(),
        SparseCategoricalCrossentropy::new(),
    );
    adam.model_mut().build(&[2]).unwrap();
    refused(
        &mut adam,
        &good,
        &["Adam beta_1 is 0.9 in the file, 0.8 in the trainer"],
    );

    // And the good file still loads.
    t.resume_from_bytes("good", &good).unwrap();
    assert_eq!(snapshot(&mut t), snapshot(&mut source));
}

#[test]
fn weights_files_round_trip_and_foreign_files_are_checked_by_name() {
    let mut t = trained_trainer();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    checkpoint::save_weights(t.model_mut(), &path).unwrap();
    let mut fresh = classifier::<MixedFloat16>(8);
    fresh.build(&[2]).unwrap();
    checkpoint::load_weights(&mut fresh, &path).unwrap();
    let bits_of = |m: &mut Classifier<MixedFloat16>| -> Vec<Vec<u32>> {
        m.get_weights()
            .unwrap()
            .iter()
            .map(|(_, w)| bits(w))
            .collect()
    };
    assert_eq!(bits_of(&mut fresh), bits_of(t.model_mut()));
    // A whole checkpoint gives its weights too.
    let mut other = classifier::<MixedFloat16>(8);
    other.build(&[2]).unwrap();
    let ckpt = t.checkpoint_bytes().unwrap();
    checkpoint::load_weights_from_bytes(&mut other, "ckpt", &ckpt).unwrap();
    assert_eq!(bits_of(&mut other), bits_of(t.model_mut()));

    // A file from another tool (no mp metadata): names, dtypes and shapes decide.
    let weights = t.model_mut().get_weights().unwrap();
    let raw: Vec<(String, Vec<usize>, Vec<u8>)> = weights
        .iter()
        .map(|(n, w)| {
            let b = w
                .as_slice()
                .unwrap()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            (n.clone(), w.shape().to_vec(), b)
        })
        .collect();
    let write = |skip: &str, extra: bool| {
        let mut entries: Vec<(&str, &str, &[usize], &[u8])> = raw
            .iter()
            .filter(|(n, _, _)| n != skip)
            .map(|(n, s, b)| (n.as_str(), "F32", s.as_slice(), b.as_slice()))
            .collect();
        if extra {
            entries.push(("dense_9/kernel", "F32", &[0][..], &[][..]));
        }
        checkpoint::safetensors::serialize(&entries, &BTreeMap::new()).unwrap()
    };
    let mut m = classifier::<MixedFloat16>(8);
    m.build(&[2]).unwrap();
    let before = bits_of(&mut m);
    checkpoint::load_weights_from_bytes(&mut m, "foreign", &write("", false)).unwrap();
    assert_eq!(bits_of(&mut m), bits_of(t.model_mut()));
    let mut m = classifier::<MixedFloat16>(8);
    m.build(&[2]).unwrap();
    let e = checkpoint::load_weights_from_bytes(&mut m, "f", &write("logits/bias", true))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("\"logits/bias\" of the model is missing from the file")
            && e.contains("\"dense_9/kernel\" in the file is not a variable of the model"),
        "{e}"
    );
    assert_eq!(bits_of(&mut m), before, "unchanged");
}

#[test]
fn fit_keeps_the_last_epochs_and_the_best_one() {
    let (x, y) = spirals(40, 21);
    let dir = tempfile::tempdir().unwrap();
    let config = ModelCheckpoint::new(dir.path())
        .keep_last(2)
        .best(BestMetric::max("val_accuracy"));
    let mut t = Trainer::compile(
        classifier::<Float32>(8),
        Adam::new(0.01).unwrap(),
        SparseCategoricalCrossentropy::new(),
    )
    .with_callback(config.clone());
    // A later epoch left by another run in the same directory is not this run's to prune.
    std::fs::create_dir_all(dir.path()).unwrap();
    std::fs::write(config.epoch_path(9), b"another run").unwrap();
    let h = t.fit(x.view(), y.view(), &options(5)).unwrap();
    assert!(!config.epoch_path(3).exists());
    assert!(config.epoch_path(4).exists() && config.epoch_path(5).exists());
    assert_eq!(std::fs::read(config.epoch_path(9)).unwrap(), b"another run");
    std::fs::remove_file(config.epoch_path(9)).unwrap();
    // best.safetensors is the first epoch with the highest validation accuracy.
    let acc = h.get("val_accuracy").unwrap();
    let best_epoch = 1
        + (0..acc.len())
            .reduce(|b, i| if acc[i] > acc[b] { i } else { b })
            .unwrap();
    let mut probe = Trainer::compile(
        classifier::<Float32>(8),
        Adam::new(0.01).unwrap(),
        SparseCategoricalCrossentropy::new(),
    )
    .with_callback(config.clone());
    probe.model_mut().build(&[2]).unwrap();
    probe.resume(config.best_path()).unwrap();
    assert_eq!(probe.progress().epoch, best_epoch, "val_accuracy {acc:?}");
    let (metric, value) = probe.best_metric().unwrap();
    assert_eq!(
        (metric, value),
        (&BestMetric::max("val_accuracy"), acc[best_epoch - 1])
    );

    // A metric that does not exist, or needs validation data that is not there, is refused
    // before training.
    for (best, split, expect) in [
        (BestMetric::min("val_los"), 0.2, "unknown checkpoint metric"),
        (BestMetric::min("val_loss"), 0.0, "needs validation data"),
    ] {
        let mut t = Trainer::compile(
            classifier::<Float32>(8),
            Adam::default(),
            SparseCategoricalCrossentropy::new(),
        )
        .with_callback(ModelCheckpoint::new(dir.path().join("x")).best(best));
        let o = FitOptions {
            validation_split: split,
            ..options(1)
        };
        let e = t.fit(x.view(), y.view(), &o).unwrap_err().to_string();
        assert!(e.contains(expect), "{e}");
        assert_eq!(t.progress().step, 0);
    }
}

const CRASH_ENV: &str = "MP_CHECKPOINT_CRASH_PATH";

/// Run by `a_crash_mid_write_leaves_the_previous_checkpoint` in a child process: starts writing a
/// new checkpoint over the old one and dies (SIGABRT) halfway through.
#[test]
#[ignore = "run as a child process by a_crash_mid_write_leaves_the_previous_checkpoint"]
fn crash_while_writing() {
    let Ok(path) = std::env::var(CRASH_ENV) else {
        return;
    };
    let mut t = trained_trainer();
    let (x, y) = spirals(16, 2);
    let o = FitOptions {
        verbose: Verbose::Silent,
        ..Default::default()
    };
    t.fit(x.view(), y.view(), &o).unwrap();
    let bytes = t.checkpoint_bytes().unwrap();
    let _ = checkpoint::write_atomic_with(&path, |f| {
        std::io::Write::write_all(f, &bytes[..bytes.len() / 2])?;
        f.sync_all()?;
        std::process::abort()
    });
}

#[test]
fn a_crash_mid_write_leaves_the_previous_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("epoch-000002.safetensors");
    let mut t = trained_trainer();
    t.save_checkpoint(&path).unwrap();
    let old = std::fs::read(&path).unwrap();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "crash_while_writing",
            "--exact",
            "--include-ignored",
            "--nocapture",
        ])
        .env(CRASH_ENV, &path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "the child was meant to die mid-write");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        old,
        "the previous checkpoint is intact"
    );
    let stray: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert_eq!(stray.len(), 1, "the dead writer's half file: {stray:?}");
    assert!(
        std::fs::metadata(dir.path().join(&stray[0])).unwrap().len() > 0,
        "it did write"
    );
    // The half-written temporary is never mistaken for a checkpoint.
    assert_eq!(checkpoint::latest(dir.path()).unwrap(), Some(path.clone()));
    let mut fresh = Trainer::compile(
        classifier::<MixedFloat16>(8),
        Adam::default(),
        SparseCategoricalCrossentropy::new(),
    );
    fresh.model_mut().build(&[2]).unwrap();
    assert_eq!(fresh.resume_latest(dir.path()).unwrap(), Some(path));
    assert_eq!(snapshot(&mut fresh), snapshot(&mut t));
}

#[test]
fn io_errors_name_the_path() {
    let mut t = trained_trainer();
    let e = t
        .resume(Path::new("/nonexistent/dir/c.safetensors"))
        .unwrap_err();
    assert!(matches!(e, CkptError::Io { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("reading /nonexistent/dir/c.safetensors"),
        "{e}"
    );
    let e = t
        .save_checkpoint("/nonexistent/dir/c.safetensors")
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/dir"), "{e}");
    assert_eq!(checkpoint::latest("/nonexistent/dir").unwrap(), None);
}

// ---------------------------------------------------------------------------------------------
// A checkpoint written by an earlier mp (tests/fixtures/checkpoint-v1.safetensors)
// ---------------------------------------------------------------------------------------------

/// The fixture: a checkpoint of format version 1 written by the mp of commit 85c2235, whose
/// `mp.state` was built by hand with `json!` (before the state derived `Serialize`). It is kept
/// as it was written: regenerating it with a newer mp would defeat its purpose.
const FIXTURE_V1: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/checkpoint-v1.safetensors"
);

#[model]
struct Small {
    hidden: Dense,
    logits: Dense,
    #[dtype = "float32"]
    probs: Softmax,
}

/// Dense(8, relu) -> Dense(3) -> float32 softmax under `mixed_float16`, with Adam and a dynamic
/// loss scale that starts far too high for float16 and tries to grow every 3 good steps, so the
/// saved scale, its good-step count and the skip counts all moved.
fn small_trainer() -> Trainer<Small<MixedFloat16>, Adam> {
    let model = Small {
        hidden: Dense::new(8).relu(),
        logits: Dense::new(3),
        probs: Softmax::new(),
    };
    Trainer::compile(model, Adam::default(), SparseCategoricalCrossentropy::new()).with_loss_scale(
        Some(LossScale::Dynamic(
            DynamicLossScale::new(1_048_576.0, 3, 2.0).unwrap(),
        )),
    )
}

/// 32 samples of 4 features, 3 classes: the class is the largest of three linear scores.
fn small_data() -> (Array2<f32>, Array1<u32>) {
    let mut rng = Rng::new(2024);
    let x = Array2::from_shape_fn((32, 4), |_| rng.uniform(-1.0, 1.0));
    let y = Array1::from_shape_fn(32, |i| {
        let r = x.row(i);
        let scores = [r[0] + r[1], r[2] - r[0], r[3] - r[1]];
        (0..3)
            .max_by(|&a, &b| scores[a].total_cmp(&scores[b]))
            .unwrap() as u32
    });
    (x, y)
}

fn small_options(epochs: usize) -> FitOptions {
    FitOptions {
        batch_size: 8,
        epochs,
        validation_split: 0.25,
        seed: 77,
        verbose: Verbose::Silent,
        ..Default::default()
    }
}

/// FNV-1a over names and bits: one number for a list of tensors.
fn fnv(items: impl IntoIterator<Item = (String, Vec<u32>)>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut put = |bytes: &[u8]| {
        for b in bytes {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for (name, bits) in items {
        put(name.as_bytes());
        for b in bits {
            put(&b.to_le_bytes());
        }
    }
    h
}

/// What the fixture holds, as the numbers the tests compare.
#[derive(Debug, PartialEq)]
struct Digest {
    weights: u64,
    slots: u64,
    iterations: u64,
    learning_rate: u32,
    /// Scale bits, good steps, applied, skipped, skips at the floor, their limit.
    scaling: (u32, u64, u64, u64, u64, u64),
    progress: TrainingProgress,
    best: Option<(BestMetric, u32)>,
}

fn digest(s: &Snapshot) -> Digest {
    let scaling = s.scaling.as_ref().unwrap();
    let LossScale::Dynamic(d) = &scaling.loss_scale else {
        panic!("a dynamic loss scale")
    };
    Digest {
        weights: fnv(s.weights.iter().cloned()),
        slots: fnv(s
            .slots
            .iter()
            .map(|(v, slot, b)| (format!("{v}/{slot}"), b.clone()))),
        iterations: s.iterations,
        learning_rate: s.learning_rate,
        scaling: (
            d.scale().to_bits(),
            d.good_steps(),
            scaling.applied,
            scaling.skipped,
            scaling.skips_at_floor,
            scaling.max_skips_at_floor,
        ),
        progress: s.progress,
        best: s.best.clone(),
    }
}

/// Writes a fixture to `$MP_WRITE_CHECKPOINT_FIXTURE` and prints what the tests below expect of
/// it: `MP_WRITE_CHECKPOINT_FIXTURE=<path> cargo test -p mp-layers --test checkpoint --
/// --ignored write_checkpoint_fixture --nocapture`. This is how the mp of commit 85c2235 wrote
/// the v1 fixture; a later mp writes its own format with it, for a new version's fixture, never
/// over the v1 file.
#[test]
#[ignore = "writes a checkpoint fixture to $MP_WRITE_CHECKPOINT_FIXTURE"]
fn write_checkpoint_fixture() {
    let Some(out) = std::env::var_os("MP_WRITE_CHECKPOINT_FIXTURE") else {
        return;
    };
    let (x, y) = small_data();
    let dir = tempfile::tempdir().unwrap();
    let mut t = small_trainer().with_callback(
        ModelCheckpoint::new(dir.path())
            .keep_last(0)
            .best(BestMetric::min("val_loss")),
    );
    t.fit(x.view(), y.view(), &small_options(2)).unwrap();
    t.save_checkpoint(&out).unwrap();
    println!("saved: {:#?}", digest(&snapshot(&mut t)));
    println!("scaling: {:?}", snapshot(&mut t).scaling);
    // The reference continuation: the same trainer, never interrupted, one more epoch.
    let h = t.fit(x.view(), y.view(), &small_options(1)).unwrap();
    println!("continued: {:#?}", digest(&snapshot(&mut t)));
    println!("continued logs: {:?}", logs_bits(&h.epochs[0]));
}

/// What the fixture holds (printed by [`write_checkpoint_fixture`] when it was written).
fn fixture_digest() -> Digest {
    Digest {
        weights: 8_002_722_175_401_597_975,
        slots: 8_092_067_555_275_910_595,
        iterations: 4,
        learning_rate: 0.001f32.to_bits(),
        // 2^19 after two overflows from 2^20, one good step since; 4 applied, 2 skipped.
        scaling: (524_288.0f32.to_bits(), 1, 4, 2, 0, 20),
        progress: TrainingProgress {
            epoch: 2,
            step: 6,
            rng_state: 7_924_047_624_999_685_139,
        },
        best: Some((BestMetric::min("val_loss"), 0.947_987_2f32.to_bits())),
    }
}

/// One more epoch of the run that wrote the fixture, never interrupted (as printed then).
fn continued_digest() -> Digest {
    Digest {
        weights: 13_538_821_786_529_116_037,
        slots: 18_424_187_404_925_938_252,
        iterations: 6,
        learning_rate: 0.001f32.to_bits(),
        scaling: (524_288.0f32.to_bits(), 0, 6, 3, 0, 20),
        progress: TrainingProgress {
            epoch: 3,
            step: 9,
            rng_state: 11_886_071_437_499_527_670,
        },
        best: Some((BestMetric::min("val_loss"), 1_064_423_541)),
    }
}

/// A trainer for the fixture that tracks the best `val_loss` as the run that wrote it did.
fn small_resumable(dir: &Path) -> Trainer<Small<MixedFloat16>, Adam> {
    let mut t = small_trainer().with_callback(
        ModelCheckpoint::new(dir)
            .keep_last(0)
            .best(BestMetric::min("val_loss")),
    );
    t.model_mut().build(&[4]).unwrap();
    t
}

#[test]
fn a_checkpoint_written_before_the_serde_state_still_loads() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = small_resumable(dir.path());
    t.resume(FIXTURE_V1).unwrap();
    let loaded = snapshot(&mut t);
    assert_eq!(digest(&loaded), fixture_digest());
    let LossScale::Dynamic(d) = &loaded.scaling.as_ref().unwrap().loss_scale else {
        panic!("dynamic")
    };
    assert_eq!(
        (
            d.config().initial_scale,
            d.config().growth_interval,
            d.config().multiplier,
            d.config().min_scale
        ),
        (1_048_576.0, 3, 2.0, 1.0),
        "the whole loss-scale configuration"
    );
    // Written back, it is the same file in meaning: the same tensors, and the same JSON state
    // (the same field names and nesting, floats as the same strings) in another key order.
    let fixture = std::fs::read(FIXTURE_V1).unwrap();
    let again = t.checkpoint_bytes().unwrap();
    let (old, new) = (
        SafeTensors::parse("fixture", &fixture).unwrap(),
        SafeTensors::parse("again", &again).unwrap(),
    );
    let tensors = |st: &SafeTensors<'_>| -> Vec<_> {
        st.tensors
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    t.dtype.clone(),
                    t.shape.clone(),
                    st.data(t).to_vec(),
                )
            })
            .collect()
    };
    assert!(tensors(&old) == tensors(&new), "the tensors differ");
    let json = |st: &SafeTensors<'_>| -> serde_json::Value {
        serde_json::from_str(&st.metadata["mp.state"]).unwrap()
    };
    assert_eq!(json(&new), json(&old));
    let others = |st: &SafeTensors<'_>| {
        let mut m = st.metadata.clone();
        m.remove("mp.state");
        m.remove(KEY_SHA256);
        // Which machine computed it: informative, added after the fixture was written.
        m.remove(checkpoint::KEY_KERNEL_PATHS);
        m
    };
    assert_eq!(others(&new), others(&old));
    assert!(!old.metadata.contains_key(checkpoint::KEY_KERNEL_PATHS));
    assert!(new.metadata.contains_key(checkpoint::KEY_KERNEL_PATHS));

    // Training continues exactly: from the fixture, and from the file re-saved by this mp.
    let (x, y) = small_data();
    let h = t.fit(x.view(), y.view(), &small_options(1)).unwrap();
    let mut u = small_resumable(dir.path());
    u.resume_from_bytes("again", &again).unwrap();
    let hu = u.fit(x.view(), y.view(), &small_options(1)).unwrap();
    assert_eq!(logs_bits(&h.epochs[0]), logs_bits(&hu.epochs[0]));
    let end = snapshot(&mut t);
    assert_eq!(snapshot(&mut u), end);
    // And as the uninterrupted run that wrote the fixture did. These bits depend on the GEMM
    // path (every FMA path, AVX2 or AVX-512, gives the same ones; the portable one may not) and
    // pin training's numerics as of the fixture: if those change on purpose, take the new
    // numbers from this assertion's message (the fixture itself stays as it is).
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") && std::env::var_os("MP_GEMM_PATH").is_none() {
        assert_eq!(
            digest(&end),
            continued_digest(),
            "the continuation from the fixture"
        );
        assert_eq!(
            logs_bits(&h.epochs[0]),
            (
                2,
                1_065_241_947,
                1_059_061_760,
                Some(1_064_423_541),
                Some(1_061_158_912),
                Some(524_288.0f32.to_bits()),
                1
            )
        );
    }
}

#[test]
fn the_fixture_with_a_newer_format_version_is_refused_by_name() {
    let fixture = std::fs::read(FIXTURE_V1).unwrap();
    let newer = reseal(&fixture, |m, _| {
        m.insert(KEY_VERSION.into(), "2".into());
    });
    let dir = tempfile::tempdir().unwrap();
    let mut t = small_resumable(dir.path());
    let before = snapshot(&mut t);
    let e = t.resume_from_bytes("v2.safetensors", &newer).unwrap_err();
    assert!(
        matches!(
            e,
            CkptError::NewerVersion {
                found: 2,
                supported: 1,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "v2.safetensors has checkpoint format version 2, newer than the newest this version of \
         mp reads (1): load it with a newer mp"
    );
    assert_eq!(snapshot(&mut t), before, "a refused file changes nothing");
    let e = checkpoint::load_weights_from_bytes(t.model_mut(), "v2", &newer).unwrap_err();
    assert!(matches!(e, CkptError::NewerVersion { found: 2, .. }), "{e}");
}

#[test]
fn errors_keep_their_cause() {
    use std::error::Error as _;
    let mut t = trained_trainer();
    let dir = tempfile::tempdir().unwrap();
    let cause = |e: &CkptError| -> std::io::ErrorKind {
        e.source()
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .unwrap_or_else(|| panic!("no io::Error behind {e}"))
            .kind()
    };
    // A missing directory.
    let e = t
        .save_checkpoint(dir.path().join("missing/c.safetensors"))
        .unwrap_err();
    let CkptError::Io { op, path, .. } = &e else {
        panic!("{e}")
    };
    assert_eq!(*op, "creating");
    assert!(path.starts_with(dir.path().join("missing")), "{e}");
    assert!(e.to_string().contains("creating "), "{e}");
    assert!(e.to_string().contains("missing/.c.safetensors.tmp-"), "{e}");
    assert_eq!(cause(&e), std::io::ErrorKind::NotFound);
    // A file where a directory should be.
    std::fs::write(dir.path().join("file"), b"x").unwrap();
    let e = t
        .save_checkpoint(dir.path().join("file/c.safetensors"))
        .unwrap_err();
    assert!(e.to_string().contains("file/.c.safetensors.tmp-"), "{e}");
    assert_eq!(cause(&e), std::io::ErrorKind::NotADirectory);
    // Reading a missing file.
    let e = t.resume(dir.path().join("none.safetensors")).unwrap_err();
    assert_eq!(cause(&e), std::io::ErrorKind::NotFound);
    // A read-only directory (where the permission holds: not for root).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let ro = dir.path().join("ro");
        std::fs::create_dir(&ro).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        if std::fs::write(ro.join("probe"), b"").is_err() {
            let e = t.save_checkpoint(ro.join("c.safetensors")).unwrap_err();
            assert!(e.to_string().contains("creating "), "{e}");
            assert_eq!(cause(&e), std::io::ErrorKind::PermissionDenied);
        }
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // A header that is not JSON, and a training state that does not parse, keep serde's error.
    let header = br#"{"a":1,}"#;
    let file = [&(header.len() as u64).to_le_bytes()[..], header].concat();
    let e = t.resume_from_bytes("h", &file).unwrap_err();
    assert!(matches!(e, CkptError::Header { .. }), "{e}");
    assert!(
        e.to_string()
            .starts_with("h is not a valid safetensors file: the header is not valid JSON ("),
        "{e}"
    );
    let json = e
        .source()
        .and_then(|s| s.downcast_ref::<serde_json::Error>())
        .unwrap();
    assert!(json.is_syntax(), "{json}");
    let good = t.checkpoint_bytes().unwrap();
    let bad = reseal(&good, |m, _| {
        let s = m.get_mut("mp.state").unwrap();
        *s = s.replace("\"iterations\":", "\"iterations\":-");
    });
    let e = t.resume_from_bytes("bad", &bad).unwrap_err();
    assert!(matches!(e, CkptError::State { .. }), "{e}");
    assert!(
        e.to_string().starts_with(
            "bad holds an invalid checkpoint: mp.state: optimizer.iterations: invalid value: \
             integer `-"
        ),
        "{e}"
    );
    let json = e
        .source()
        .and_then(|s| s.downcast_ref::<serde_json::Error>())
        .unwrap();
    assert!(json.is_data(), "{json}");
}

#[test]
fn fit_removes_the_temporary_files_of_dead_writers() {
    use std::time::{Duration, SystemTime};
    let dir = tempfile::tempdir().unwrap();
    // A process that has exited: its id is no longer running.
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("--list")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let own = std::process::id();
    let two_hours_ago = SystemTime::now() - Duration::from_secs(2 * 60 * 60);
    let put = |name: String, old: bool| {
        let path = dir.path().join(name);
        std::fs::write(&path, b"half a checkpoint").unwrap();
        if old {
            let f = std::fs::File::options().write(true).open(&path).unwrap();
            f.set_modified(two_hours_ago).unwrap();
        }
        path
    };
    let dead_epoch = put(format!(".epoch-000001.safetensors.tmp-{dead}-0"), true);
    let dead_best = put(format!(".best.safetensors.tmp-{dead}-3"), true);
    let dead_fresh = put(format!(".epoch-000001.safetensors.tmp-{dead}-1"), false);
    let ours = put(format!(".epoch-000001.safetensors.tmp-{own}-999"), true);
    let init = put(".epoch-000001.safetensors.tmp-1-0".into(), true);
    let other = put(format!(".notes.txt.tmp-{dead}-0"), true);

    let (x, y) = spirals(16, 3);
    let mut t = Trainer::compile(
        classifier::<Float32>(4),
        Adam::default(),
        SparseCategoricalCrossentropy::new(),
    )
    .with_callback(ModelCheckpoint::new(dir.path()));
    t.fit(x.view(), y.view(), &options(1)).unwrap();

    assert!(
        !dead_epoch.exists() && !dead_best.exists(),
        "dead writers' files"
    );
    assert!(dead_fresh.exists(), "touched within the last minute: kept");
    assert!(ours.exists(), "this process's own: kept");
    assert!(other.exists(), "not a checkpoint's temporary file: kept");
    // Process 1 runs: on Linux its file is kept; elsewhere only the age can tell.
    assert_eq!(init.exists(), cfg!(target_os = "linux"));
    assert!(ModelCheckpoint::new(dir.path()).epoch_path(1).exists());
}

/// A checkpoint that `fit` cannot write stops it with an error whose `source()` chain reaches
/// the I/O error, through `mp_layers::Error::Callback`.
#[test]
fn fit_reports_a_failed_checkpoint_with_its_cause() {
    use std::error::Error as _;
    let dir = tempfile::tempdir().unwrap();
    // A file where the checkpoint folder should be.
    let blocked = dir.path().join("blocked");
    std::fs::write(&blocked, b"x").unwrap();
    let (x, y) = spirals(32, 5);
    let mut t = Trainer::compile(
        classifier::<MixedFloat16>(8),
        Adam::default(),
        SparseCategoricalCrossentropy::new(),
    )
    .with_callback(ModelCheckpoint::new(&blocked));
    let e = t.fit(x.view(), y.view(), &options(1)).unwrap_err();
    assert!(
        matches!(
            e,
            mp_layers::Error::Callback {
                callback: "ModelCheckpoint",
                ..
            }
        ),
        "{e:?}"
    );
    let mut cause: Option<&(dyn std::error::Error + 'static)> = e.source();
    let mut io = None;
    while let Some(c) = cause {
        if let Some(found) = c.downcast_ref::<std::io::Error>() {
            io = Some(found.kind());
        }
        cause = c.source();
    }
    assert!(io.is_some(), "no io::Error in the chain of {e}");
}

#[model]
struct Normed {
    hidden: Dense,
    batch_normalization: BatchNormalization,
    logits: Dense,
    #[dtype = "float32"]
    probs: Softmax,
}

/// Dense(8) -> BatchNormalization -> Dense(3) -> softmax under `mixed_float16` with Adam,
/// trained one epoch (seeded by `seed`), so weights, moving statistics and slots all moved.
fn normed_trainer(seed: u64) -> Trainer<Normed<MixedFloat16>, Adam> {
    let model = Normed {
        hidden: Dense::new(8).relu(),
        batch_normalization: BatchNormalization::new(),
        logits: Dense::new(3),
        probs: Softmax::new(),
    };
    let mut t = Trainer::compile(model, Adam::default(), SparseCategoricalCrossentropy::new());
    let (x, y) = small_data();
    let o = FitOptions {
        seed,
        ..small_options(1)
    };
    t.fit(x.view(), y.view(), &o).unwrap();
    t
}

/// `bytes` with element `index` of tensor `name` set to `value`, resealed.
fn with_value(bytes: &[u8], name: &str, index: usize, value: f32) -> Vec<u8> {
    reseal(bytes, |_, ts| {
        let t = ts.iter_mut().find(|t| t.0 == name).expect(name);
        t.3[4 * index..4 * index + 4].copy_from_slice(&value.to_le_bytes());
    })
}

/// `bytes` with `mp.state` edited as JSON, resealed.
fn with_state(bytes: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    reseal(bytes, |m, _| {
        let s = m.get_mut("mp.state").unwrap();
        let mut v: serde_json::Value = serde_json::from_str(s).unwrap();
        edit(&mut v);
        *s = v.to_string();
    })
}

/// Every value of a checkpoint is checked before anything is assigned: a NaN or infinite
/// weight, moving statistic or optimizer slot, and a moving variance or second moment below 0,
/// are each refused naming the tensor as the file names it, the index and the value; the trainer
/// (every variable's bits, the slots, the counts, the progress) is unchanged.
#[test]
fn non_finite_and_negative_values_in_a_checkpoint_are_refused_by_name_and_change_nothing() {
    let good = normed_trainer(1).checkpoint_bytes().unwrap();
    let mut t = normed_trainer(2);
    let cases: &[(&str, usize, f32, &str)] = &[
        (
            "hidden/kernel",
            3,
            f32::NAN,
            "NaN at index 3, which is not finite",
        ),
        (
            "hidden/kernel",
            0,
            f32::INFINITY,
            "inf at index 0, which is not finite",
        ),
        (
            "logits/bias",
            2,
            f32::NEG_INFINITY,
            "-inf at index 2, which is not finite",
        ),
        (
            "batch_normalization/moving_variance",
            1,
            f32::NAN,
            "NaN at index 1, which is not finite",
        ),
        (
            "batch_normalization/moving_variance",
            4,
            -1.0,
            "-1.0 at index 4, which is below 0",
        ),
        (
            "batch_normalization/moving_mean",
            0,
            f32::INFINITY,
            "inf at index 0, which is not finite",
        ),
        (
            "optimizer/hidden/kernel/v",
            5,
            f32::NAN,
            "NaN at index 5, which is not finite",
        ),
        (
            "optimizer/hidden/kernel/v",
            0,
            -1.0,
            "-1.0 at index 0, which is below 0",
        ),
        (
            "optimizer/logits/bias/m",
            1,
            f32::NAN,
            "NaN at index 1, which is not finite",
        ),
    ];
    for &(name, index, value, what) in cases {
        let bad = with_value(&good, name, index, value);
        let want = format!("bad.safetensors holds invalid values: {name:?} holds {what}");
        refused(&mut t, &bad, &[&want]);
        let e = t.resume_from_bytes("bad.safetensors", &bad).unwrap_err();
        assert!(matches!(e, CkptError::InvalidValues { .. }), "{e:?}");
    }
    // Every such tensor is named, not just the first.
    let two = with_value(
        &with_value(&good, "optimizer/logits/kernel/v", 0, -2.0),
        "batch_normalization/moving_variance",
        0,
        f32::NAN,
    );
    refused(
        &mut t,
        &two,
        &[
            "\"batch_normalization/moving_variance\" holds NaN at index 0",
            "; \"optimizer/logits/kernel/v\" holds -2.0 at index 0, which is below 0",
        ],
    );
    // A negative moving mean, first moment or weight is a state training can reach: it loads.
    let negative = with_value(
        &with_value(&good, "batch_normalization/moving_mean", 0, -3.0),
        "optimizer/hidden/kernel/m",
        0,
        -1.0,
    );
    t.resume_from_bytes("ok", &negative).unwrap();
    let mut source = normed_trainer(1);
    t.resume_from_bytes("good", &good).unwrap();
    assert_eq!(snapshot(&mut t), snapshot(&mut source));
}

/// The step counts of a checkpoint must agree: the loss-scale optimizer's applied steps are the
/// optimizer's `iterations` (one count, written twice), no more steps were skipped at the floor
/// than skipped, and no more were skipped than run. Each disagreement is refused naming both
/// fields and their values, and the trainer is unchanged.
#[test]
fn inconsistent_step_counts_in_a_checkpoint_are_refused_by_name_and_change_nothing() {
    let mut source = small_trainer();
    let (x, y) = small_data();
    source.fit(x.view(), y.view(), &small_options(2)).unwrap();
    let good = source.checkpoint_bytes().unwrap();
    let s = snapshot(&mut source);
    let (iterations, scaling, step) = (s.iterations, s.scaling.unwrap(), s.progress.step);
    assert!(scaling.skipped > 0, "the restless scale skipped steps");
    assert_eq!(scaling.applied, iterations);
    let mut t = small_trainer();
    t.fit(x.view(), y.view(), &small_options(1)).unwrap();

    let more_applied = with_state(&good, |v| {
        v["loss_scaling"]["applied_steps"] = (iterations + 1).into();
    });
    refused(
        &mut t,
        &more_applied,
        &[&format!(
            "holds an invalid checkpoint: mp.state: loss_scaling.applied_steps is {} but \
             optimizer.iterations is {iterations}: both count the applied updates",
            iterations + 1
        )],
    );
    let fewer_iterations = with_state(&good, |v| {
        v["optimizer"]["iterations"] = (iterations - 1).into();
    });
    refused(
        &mut t,
        &fewer_iterations,
        &[&format!("optimizer.iterations is {}", iterations - 1)],
    );
    let more_skipped = with_state(&good, |v| {
        v["loss_scaling"]["skipped_steps"] = (step + 1).into();
    });
    refused(
        &mut t,
        &more_skipped,
        &[&format!(
            "loss_scaling.skipped_steps is {} but progress.step is only {step}: more steps \
             skipped than run",
            step + 1
        )],
    );
    let more_at_floor = with_state(&good, |v| {
        v["loss_scaling"]["skips_at_floor"] = (scaling.skipped + 1).into();
    });
    refused(
        &mut t,
        &more_at_floor,
        &[&format!(
            "{} skips at the floor but only {} skipped steps",
            scaling.skipped + 1,
            scaling.skipped
        )],
    );
    t.resume_from_bytes("good", &good).unwrap();
    assert_eq!(snapshot(&mut t), snapshot(&mut source));

    // What would be refused is not written either: a trainer whose progress was reset below
    // its skipped steps cannot be checkpointed.
    source.set_progress(TrainingProgress {
        step: 0,
        ..source.progress()
    });
    let e = source.checkpoint_bytes().unwrap_err();
    assert!(matches!(e, CkptError::Unsaveable { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!(
            "refusing to save the checkpoint: loss_scaling.skipped_steps is {} but progress.step \
             is only 0: more steps skipped than run; nothing was written",
            scaling.skipped
        )
    );
}

/// `set_weights` refuses a NaN weight or a negative variance naming the variable path, and
/// changes nothing; weights that became non-finite anyway (written through `value_mut`, the
/// kernels' unchecked path) are never saved: the checkpoint and the weights file are refused by
/// name, and no file is written or replaced.
#[test]
fn non_finite_weights_are_neither_set_nor_saved() {
    let mut t = normed_trainer(3);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.safetensors");
    t.save_checkpoint(&path).unwrap();
    let saved = std::fs::read(&path).unwrap();
    let before = snapshot(&mut t);

    let good = t.model_mut().get_weights().unwrap();
    let set = |t: &mut Trainer<Normed<MixedFloat16>, Adam>, name: &str, i: usize, x: f32| {
        let mut w = good.clone();
        let (_, value) = w.iter_mut().find(|(n, _)| n == name).unwrap();
        let mut values = value.to_f32_vec().unwrap();
        values[i] = x;
        *value = Tensor::from_vec(value.shape(), values).unwrap();
        t.model_mut().set_weights(&w).unwrap_err().to_string()
    };
    assert_eq!(
        set(&mut t, "hidden/kernel", 2, f32::NAN),
        "set_weights: hidden/kernel would hold NaN at index 2, which is not finite; it is \
         unchanged"
    );
    assert_eq!(
        set(&mut t, "batch_normalization/moving_variance", 1, -1.0),
        "set_weights: batch_normalization/moving_variance would hold -1.0 at index 1, which is \
         below 0; it is unchanged"
    );
    assert!(set(&mut t, "logits/bias", 0, f32::INFINITY).contains("logits/bias would hold inf"));
    assert_eq!(
        snapshot(&mut t),
        before,
        "a refused set_weights changed the model"
    );
    // Assigning one variable is checked the same way.
    t.model_mut()
        .visit_variables("", &mut |path, v| {
            if path == "logits/bias" {
                let e = v.assign(&[0.0, f32::NAN, 0.0]).unwrap_err().to_string();
                assert!(e.contains("would hold NaN at index 1"), "{e}");
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(snapshot(&mut t), before);

    // Poisoned through the unchecked path.
    t.model_mut()
        .visit_variables("", &mut |path, v| {
            if path == "logits/bias" {
                v.value_mut().as_mut_slice()?[1] = f32::NAN;
            }
            Ok(())
        })
        .unwrap();
    let want = "\"logits/bias\" holds NaN at index 1, which is not finite; nothing was written";
    let e = t.save_checkpoint(&path).unwrap_err();
    assert!(matches!(e, CkptError::Unsaveable { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!("refusing to save the checkpoint: {want}")
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        saved,
        "the old checkpoint was replaced"
    );
    let fresh = dir.path().join("new.safetensors");
    assert!(t.save_checkpoint(&fresh).is_err());
    let e = checkpoint::save_weights(t.model_mut(), &fresh).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("refusing to save the weights: {want}")
    );
    assert!(!fresh.exists(), "a refused save wrote a file");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temporary file left behind"
    );
}

/// `load_weights` checks the values of a plain weights file (mp's or another tool's) the same
/// way, and leaves the model unchanged.
#[test]
fn load_weights_refuses_non_finite_and_negative_values_by_name() {
    let mut t = normed_trainer(4);
    let bytes = checkpoint::weights_to_bytes(t.model_mut()).unwrap();
    let mut m = normed_trainer(5).into_model();
    let bits_of = |m: &mut Normed<MixedFloat16>| -> Vec<Vec<u32>> {
        m.get_weights()
            .unwrap()
            .iter()
            .map(|(_, w)| bits(w))
            .collect()
    };
    let before = bits_of(&mut m);
    for (name, index, value, what) in [
        (
            "batch_normalization/moving_variance",
            0,
            -1.0,
            "-1.0 at index 0, which is below 0",
        ),
        (
            "hidden/bias",
            7,
            f32::NAN,
            "NaN at index 7, which is not finite",
        ),
    ] {
        let bad = with_value(&bytes, name, index, value);
        let e = checkpoint::load_weights_from_bytes(&mut m, "w.safetensors", &bad).unwrap_err();
        assert!(matches!(e, CkptError::InvalidValues { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!("w.safetensors holds invalid values: {name:?} holds {what}")
        );
        assert_eq!(bits_of(&mut m), before);
    }
    // A file from another tool, without mp metadata.
    let st = SafeTensors::parse("w", &bytes).unwrap();
    let mut raw: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone(), st.data(t).to_vec()))
        .collect();
    raw[0].2[..4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    let entries: Vec<(&str, &str, &[usize], &[u8])> = raw
        .iter()
        .map(|(n, s, b)| (n.as_str(), "F32", s.as_slice(), b.as_slice()))
        .collect();
    let foreign = checkpoint::safetensors::serialize(&entries, &BTreeMap::new()).unwrap();
    let e = checkpoint::load_weights_from_bytes(&mut m, "foreign", &foreign).unwrap_err();
    assert!(
        e.to_string()
            .contains("\"hidden/kernel\" holds inf at index 0, which is not finite"),
        "{e}"
    );
    assert_eq!(bits_of(&mut m), before);
    checkpoint::load_weights_from_bytes(&mut m, "w", &bytes).unwrap();
    assert_eq!(bits_of(&mut m), bits_of(t.model_mut()));
}

/// A checkpoint records the CPU kernel paths that computed it; resuming on the same paths says
/// nothing, on others it says which and why it matters (bits, not correctness).
#[test]
fn a_checkpoint_records_its_kernel_paths_and_a_resume_on_others_says_so() {
    let mut t = trained_trainer();
    let bytes = t.checkpoint_bytes().unwrap();
    let st = SafeTensors::parse("x", &bytes).unwrap();
    let ours = mp_kernels::Cpu::global().unwrap().kernel_paths();
    let saved = st.metadata.get(checkpoint::KEY_KERNEL_PATHS).unwrap();
    assert_eq!(saved, &ours);
    assert!(
        ours.contains("float32=") && ours.contains("threads"),
        "{ours}"
    );
    assert_eq!(checkpoint::paths_note("c.safetensors", Some(saved)), None);
    assert_eq!(checkpoint::paths_note("c.safetensors", None), None);
    let other = "float32=scalar, bfloat16=scalar, float16=scalar; elementwise Scalar; 1 threads";
    let note = checkpoint::paths_note("c.safetensors", Some(other)).unwrap();
    for needle in ["c.safetensors", other, &ours, "bit-for-bit", "MP_GEMM_PATH"] {
        assert!(note.contains(needle), "{needle:?} in {note}");
    }
    // The file still resumes (the note is on stderr).
    let mut again = trained_trainer();
    again.resume_from_bytes("x", &bytes).unwrap();
}
