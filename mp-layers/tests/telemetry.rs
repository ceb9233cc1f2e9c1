//! Step telemetry: `on_batch_end` reports every update of `fit`, and `StepLogger` writes them to
//! CSV or JSON Lines, one row per step, skipped steps marked with their cause, a resumed run
//! truncated to its checkpoint's step.

use mp_core::{DynamicLossScale, Float32, LossScale, MixedFloat16, PolicyKind, Rng};
use mp_layers::{
    Callback, Dense, EpochLogs, FitOptions, Layer, Softmax, SparseCategoricalCrossentropy,
    StepLogger, StepReport, Trainer, TrainingProgress, Verbose, model,
};
use mp_optim::Adam;
use ndarray::{Array1, Array2};
use std::sync::{Arc, Mutex};

#[model]
struct Net {
    hidden: Dense,
    logits: Dense,
    #[dtype = "float32"]
    probs: Softmax,
}

fn trainer<P: PolicyKind>() -> Trainer<Net<P>, Adam> {
    let net = Net {
        hidden: Dense::new(16).relu(),
        logits: Dense::new(3),
        probs: Softmax::new(),
    };
    let mut t = Trainer::compile(
        net,
        Adam::new(0.01).unwrap(),
        SparseCategoricalCrossentropy::new(),
    );
    t.model_mut().build(&[5]).unwrap();
    t
}

/// 64 samples of a task the model learns: the label is the argmax of the first three features.
fn data() -> (Array2<f32>, Array1<u32>) {
    let mut rng = Rng::new(3);
    let x = Array2::from_shape_fn((64, 5), |_| rng.uniform(-1.0, 1.0));
    let y = Array1::from_shape_fn(64, |i| {
        let r = x.row(i);
        (0..3).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap() as u32
    });
    (x, y)
}

fn silent(epochs: usize) -> FitOptions {
    FitOptions {
        batch_size: 8,
        epochs,
        validation_split: 0.0,
        verbose: Verbose::Silent,
        ..Default::default()
    }
}

/// Splits a CSV row on commas outside double quotes.
fn cells(line: &str) -> Vec<String> {
    let (mut out, mut cur, mut quoted) = (vec![], String::new(), false);
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// The rows of a CSV step log as maps from column to cell, checking the header.
fn read_csv(path: &std::path::Path) -> Vec<std::collections::HashMap<String, String>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header = cells(lines.next().unwrap());
    assert_eq!(header, mp_layers::STEP_LOG_COLUMNS);
    lines
        .map(|l| {
            let c = cells(l);
            assert_eq!(c.len(), header.len(), "row {l:?}");
            header.iter().cloned().zip(c).collect()
        })
        .collect()
}

/// Keeps every report `fit` gives the callbacks.
struct Reports(Arc<Mutex<Vec<StepReport>>>);

impl<P: PolicyKind> Callback<Net<P>, Adam> for Reports {
    fn on_batch_end(
        &mut self,
        _: &mut Trainer<Net<P>, Adam>,
        r: &StepReport,
    ) -> mp_layers::Result<()> {
        self.0.lock().unwrap().push(r.clone());
        Ok(())
    }
    fn on_epoch_end(
        &mut self,
        _: &mut Trainer<Net<P>, Adam>,
        _: &EpochLogs,
    ) -> mp_layers::Result<()> {
        Ok(())
    }
}

#[test]
fn every_update_is_reported_and_logged_with_skipped_steps_marked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("steps.csv");
    let reports = Arc::new(Mutex::new(vec![]));
    // A loss scale far too large for float16: the first steps overflow and are skipped, the
    // scale halving each time, until it fits.
    let scale = LossScale::Dynamic(DynamicLossScale::new(2f32.powi(40), 1000, 2.0).unwrap());
    let mut t = trainer::<MixedFloat16>()
        .with_loss_scale(Some(scale))
        .with_callback(Reports(reports.clone()))
        .with_callback(StepLogger::csv(&path));
    let (x, y) = data();
    let history = t.fit(x.view(), y.view(), &silent(3)).unwrap();
    let reports = reports.lock().unwrap().clone();
    assert_eq!(reports.len(), 24, "8 updates per epoch");
    let skipped_total: u64 = history.epochs.iter().map(|e| e.skipped_steps).sum();
    let skipped: Vec<&StepReport> = reports.iter().filter(|r| !r.applied).collect();
    assert_eq!(skipped.len() as u64, skipped_total);
    assert!(
        skipped.len() >= 10,
        "2^40 needs at least 10 halvings: {}",
        skipped.len()
    );
    for (i, r) in reports.iter().enumerate() {
        assert_eq!(r.step, i as u64 + 1);
        assert_eq!((r.epoch, r.batch), (i / 8, i % 8 + 1));
        assert_eq!((r.micro_batches, r.samples), (1, 8));
        assert_eq!(r.learning_rate, 0.01);
        let norm = r.gradient_norm.expect("the logger asks for the norm");
        if r.applied {
            assert!(r.skipped.is_none());
            assert!(norm.is_finite() && norm > 0.0, "step {}: {norm}", r.step);
        } else {
            let why = r.skipped.as_deref().unwrap();
            assert!(why.starts_with("non-finite gradient: "), "{why}");
            assert!(!norm.is_finite());
        }
        // The scale halves after each skipped step and stays after an applied one (the
        // growth interval is not reached).
        if let Some(next) = reports.get(i + 1) {
            let s = r.loss_scale.unwrap();
            assert_eq!(
                next.loss_scale.unwrap(),
                if r.applied { s } else { s / 2.0 }
            );
        }
    }
    let rows = read_csv(&path);
    assert_eq!(rows.len(), 24);
    for (row, r) in rows.iter().zip(&reports) {
        assert_eq!(row["step"].parse::<u64>().unwrap(), r.step);
        assert_eq!(row["applied"], r.applied.to_string());
        assert_eq!(
            row["loss_scale"].parse::<f32>().unwrap(),
            r.loss_scale.unwrap()
        );
        assert_eq!(row["skipped"], r.skipped.clone().unwrap_or_default());
        if r.loss.is_finite() {
            assert_eq!(row["loss"].parse::<f32>().unwrap(), r.loss);
        }
    }
    // It learned once the scale fitted.
    assert!(history.epochs[2].loss < history.epochs[0].loss);
}

#[test]
fn json_lines_parse_and_a_float32_run_has_no_loss_scale() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("steps.jsonl");
    let mut t =
        trainer::<Float32>().with_callback(StepLogger::jsonl(&path).without_gradient_norm());
    let (x, y) = data();
    t.fit(x.view(), y.view(), &silent(2)).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 16);
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r["step"], i as u64 + 1);
        assert_eq!(r["applied"], true);
        assert!(
            r["loss_scale"].is_null() && r["skipped"].is_null() && r["gradient_norm"].is_null()
        );
        assert!(r["loss"].as_f64().unwrap() > 0.0);
    }
}

/// Records the trainer's progress at the end of epoch `at`.
struct ProgressAt(usize, Arc<Mutex<Option<TrainingProgress>>>);

impl Callback<Net<Float32>, Adam> for ProgressAt {
    fn on_epoch_end(
        &mut self,
        t: &mut Trainer<Net<Float32>, Adam>,
        logs: &EpochLogs,
    ) -> mp_layers::Result<()> {
        if logs.epoch == self.0 {
            *self.1.lock().unwrap() = Some(t.progress());
        }
        Ok(())
    }
}

#[test]
fn a_resumed_run_drops_the_rows_after_its_checkpoint_and_appends() {
    let dir = tempfile::tempdir().unwrap();
    for (path, logger) in [
        (
            dir.path().join("a.csv"),
            StepLogger::csv as fn(std::path::PathBuf) -> StepLogger,
        ),
        (dir.path().join("a.jsonl"), StepLogger::jsonl),
    ] {
        let (x, y) = data();
        // The interrupted run: three epochs logged, the checkpoint taken after the first.
        let at = Arc::new(Mutex::new(None));
        let mut t = trainer::<Float32>()
            .with_callback(logger(path.clone()))
            .with_callback(ProgressAt(0, at.clone()));
        t.fit(x.view(), y.view(), &silent(3)).unwrap();
        let progress = at.lock().unwrap().unwrap();
        assert_eq!(progress.step, 8);
        // The resumed run: from that checkpoint's progress, two more epochs.
        let mut t = trainer::<Float32>().with_callback(logger(path.clone()));
        t.set_progress(progress);
        t.fit(x.view(), y.view(), &silent(2)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let steps: Vec<u64> = if path.extension().unwrap() == "csv" {
            read_csv(&path)
                .iter()
                .map(|r| r["step"].parse().unwrap())
                .collect()
        } else {
            text.lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                        .as_u64()
                        .unwrap()
                })
                .collect()
        };
        assert_eq!(steps, (1..=24).collect::<Vec<u64>>(), "{}", path.display());
        // A fresh run starts the log anew.
        let mut t = trainer::<Float32>().with_callback(logger(path.clone()));
        t.fit(x.view(), y.view(), &silent(1)).unwrap();
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert_eq!(lines, 8 + usize::from(path.extension().unwrap() == "csv"));
    }
}

#[test]
fn a_log_that_cannot_be_resumed_is_named_and_left_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("steps.csv");
    let junk = format!(
        "{}\n1,0,1,0.5\nseven,0,2\n",
        mp_layers::STEP_LOG_COLUMNS.join(",")
    );
    std::fs::write(&path, &junk).unwrap();
    let mut t = trainer::<Float32>().with_callback(StepLogger::csv(&path));
    t.set_progress(TrainingProgress {
        epoch: 1,
        step: 8,
        rng_state: Rng::new(0).state(),
    });
    let (x, y) = data();
    let err = t
        .fit(x.view(), y.view(), &silent(1))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("steps.csv line 3") && err.contains("\"seven\""),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), junk);
    assert_eq!(t.progress().step, 8, "nothing trained");
}
