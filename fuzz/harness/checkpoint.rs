//! The checkpoint loader's fuzz harness: shared by the fuzz target `checkpoint` and by the
//! stable test `mp-layers/tests/fuzz_corpus.rs`, which replays the kept corpus through it.
//!
//! Any input may be refused, but nothing may panic, and:
//! - a file the safetensors reader accepts, re-written by the writer, reads back the same;
//! - a refused checkpoint leaves the trainer exactly as it was (its whole state, compared as
//!   the bytes of a checkpoint of it), and an accepted one saves and loads back identically;
//! - the same for the weights-only loader and the model;
//! - an input that parses is also tried re-sealed (the same content with a valid checksum),
//!   so that mutations reach the validation behind the checksum.

use std::collections::BTreeMap;

use mp_core::MixedFloat16;
use mp_layers::checkpoint::{self, KEY_SHA256, KEY_VERSION, safetensors::SafeTensors};
use mp_layers::{
    Checkpointing, Dense, Layer, Model, Softmax, SparseCategoricalCrossentropy, Trainer, model,
};
use mp_optim::Adam;

/// The model every fuzzed checkpoint is loaded into.
#[model]
pub struct Tiny {
    hidden: Dense,
    logits: Dense,
    #[dtype = "float32"]
    probs: Softmax,
}

/// A built trainer for [`Tiny`] under `mixed_float16` (so with a dynamic loss scale) and Adam.
pub fn trainer() -> Trainer<Tiny<MixedFloat16>, Adam> {
    let model = Tiny {
        hidden: Dense::new(3).relu(),
        logits: Dense::new(2),
        probs: Softmax::new(),
    };
    let mut t = Trainer::compile(model, Adam::default(), SparseCategoricalCrossentropy::new());
    t.model_mut().build(&[2]).expect("the tiny model builds");
    t
}

type Owned = Vec<(String, String, Vec<usize>, Vec<u8>)>;

fn write(tensors: &Owned, metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let entries: Vec<_> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.as_str(), d.as_str(), s.as_slice(), b.as_slice()))
        .collect();
    checkpoint::safetensors::serialize(&entries, metadata).expect("parsed tensors re-serialize")
}

fn owned(st: &SafeTensors<'_>) -> Owned {
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
}

/// Loads `data` as a checkpoint and as weights, checking that refusals change nothing.
fn load(data: &[u8]) {
    let mut t = trainer();
    let before = t
        .checkpoint_bytes()
        .expect("a checkpoint of the tiny trainer");
    match t.resume_from_bytes("fuzz", data) {
        Err(_) => {
            let after = t
                .checkpoint_bytes()
                .expect("a checkpoint of the tiny trainer");
            assert!(after == before, "a refused checkpoint changed the trainer");
        }
        Ok(()) => {
            let saved = t.checkpoint_bytes().expect("an accepted checkpoint saves");
            let mut u = trainer();
            u.resume_from_bytes("saved", &saved)
                .expect("a saved checkpoint loads");
            let again = u.checkpoint_bytes().expect("and saves again");
            assert!(again == saved, "a checkpoint did not round-trip");
        }
    }
    let mut m = trainer();
    let before = m.model_mut().get_weights().expect("weights");
    if checkpoint::load_weights_from_bytes(m.model_mut(), "fuzz", data).is_err() {
        let after = m.model_mut().get_weights().expect("weights");
        let same = before.iter().zip(&after).all(|((na, a), (nb, b))| {
            na == nb
                && a.as_slice()
                    .ok()
                    .map(|s| s.iter().map(|v| v.to_bits()).collect::<Vec<_>>())
                    == b.as_slice()
                        .ok()
                        .map(|s| s.iter().map(|v| v.to_bits()).collect::<Vec<_>>())
        });
        assert!(same, "refused weights changed the model");
    }
}

/// Runs the checkpoint reader and loaders on `data` and checks the properties above.
pub fn run(data: &[u8]) {
    let parsed = SafeTensors::parse("fuzz", data);
    if let Ok(st) = &parsed {
        let tensors = owned(st);
        let again = write(&tensors, &st.metadata);
        let back = SafeTensors::parse("again", &again).expect("what the writer writes, reads");
        assert_eq!(owned(&back), tensors, "tensors changed through the writer");
        assert_eq!(
            back.metadata, st.metadata,
            "metadata changed through the writer"
        );
    }
    load(data);
    if let Ok(st) = &parsed
        && st.metadata.contains_key(KEY_VERSION)
    {
        let tensors = owned(st);
        let mut metadata = st.metadata.clone();
        metadata.remove(KEY_SHA256);
        let unsealed = write(&tensors, &metadata);
        let sum = checkpoint::checksum(&SafeTensors::parse("x", &unsealed).expect("parses"));
        metadata.insert(KEY_SHA256.to_string(), sum);
        load(&write(&tensors, &metadata));
    }
}
