//! The training state of a checkpoint (`mp.state`): a JSON object that serde writes and reads,
//! with errors that name the field.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;

use mp_core::{DynamicLossScale, DynamicLossScaleConfig, LossScale, LossScaleState, PolicyKind};
use mp_optim::Optimizer;
use mp_optim::loss_scale_optimizer::ScalingState;
use serde::de::{self, Unexpected, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::error::{Error, Result};
use super::format::KEY_STATE;
use super::safetensors::SafeTensors;
use crate::layer::Model;
use crate::train::{BestMetric, Mode, TrainOptimizer, Trainer, TrainingProgress};

/// `mp.state` for `trainer`, whose weights are the tensors `weights` (in the model's order),
/// of which `frozen` are frozen, and whose optimizer slots are `slots` (`[variable path, slot
/// name, tensor name]`).
pub(super) fn to_json<M: Model, O: Optimizer, Lo>(
    trainer: &Trainer<M, O, Lo>,
    weights: Vec<String>,
    frozen: Vec<String>,
    slots: Vec<(String, String, String)>,
) -> Result<String> {
    let opt = trainer.optimizer().inner();
    let state = State {
        model: trainer.model().model_name().to_string(),
        policy: <M::Policy as PolicyKind>::POLICY.name().to_string(),
        progress: trainer.progress(),
        weights,
        frozen,
        optimizer: SavedOptimizer {
            name: opt.name().to_string(),
            learning_rate: Decimal(opt.learning_rate()),
            iterations: opt.iterations(),
            config: opt
                .config()
                .into_iter()
                .map(|(k, v)| (k.to_string(), Decimal(v)))
                .collect(),
            slots,
        },
        loss_scaling: match trainer.optimizer() {
            TrainOptimizer::Plain(_) => None,
            TrainOptimizer::Scaled(s) => Some(SavedScaling::from(&s.scaling_state())),
        },
        best: trainer.best_metric().map(|(m, v)| SavedBest {
            metric: m.metric.clone(),
            mode: m.mode,
            value: Decimal(v),
        }),
    };
    serde_json::to_string(&state).map_err(|source| Error::State {
        file: "(writing)".into(),
        field: String::new(),
        source,
    })
}

pub(super) fn state_of(file: &str, st: &SafeTensors<'_>) -> Result<SavedState> {
    let text = st.metadata.get(KEY_STATE).ok_or_else(|| Error::Invalid {
        file: file.to_string(),
        what: format!("the training state ({KEY_STATE}) is missing"),
    })?;
    parse_state(file, text)
}

/// Parses and validates `mp.state`; `file` names it in errors.
pub(super) fn parse_state(file: &str, text: &str) -> Result<SavedState> {
    let state = State::parse(text).map_err(|source| Error::State {
        file: file.to_string(),
        field: field_at(text, source.line(), source.column()),
        source,
    })?;
    state.validate().map_err(|what| Error::Invalid {
        file: file.to_string(),
        what: format!("{KEY_STATE}: {what}"),
    })
}

/// `mp.state` as written and read, field for field (format version 1). Serde reads and writes
/// it; [`State::validate`] then checks what the types cannot say (a learning rate out of range,
/// a loss scale no optimizer could have had).
///
/// Every field must be present (`loss_scaling` and `best` as `null` when there is none), every
/// nested object must be a JSON object (not serde's positional array), and fields mp does not
/// know are ignored, as the hand-written reader before it had it; a field given twice is
/// refused (that reader took the last).
#[derive(Debug, Serialize, Deserialize)]
#[serde(expecting = "the training state (a JSON object)")]
struct State {
    /// The model's name, for people and other tools; not read back (the weights are checked
    /// by name and shape instead).
    #[serde(skip_deserializing)]
    model: String,
    /// The policy's name (`mixed_float16`), as `model`.
    #[serde(skip_deserializing)]
    policy: String,
    #[serde(serialize_with = "Progress::serialize", deserialize_with = "progress")]
    progress: TrainingProgress,
    /// The weight tensors' names, in the model's variable order.
    weights: Vec<String>,
    /// The frozen variables' paths (fine-tuning); absent when none is frozen, as in checkpoints
    /// from before freezing existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    frozen: Vec<String>,
    #[serde(deserialize_with = "object")]
    optimizer: SavedOptimizer,
    #[serde(deserialize_with = "nullable_object")]
    loss_scaling: Option<SavedScaling>,
    /// The best value so far of the checkpointing metric.
    #[serde(deserialize_with = "nullable_object")]
    best: Option<SavedBest>,
}

/// [`TrainingProgress`] as saved: `{"epoch": 2, "step": 14, "rng_state": 1234...}`.
#[derive(Serialize, Deserialize)]
#[serde(
    remote = "TrainingProgress",
    expecting = "the training progress (a JSON object)"
)]
struct Progress {
    epoch: usize,
    step: u64,
    rng_state: u64,
}

/// The optimizer as saved.
#[derive(Debug, Serialize, Deserialize)]
#[serde(expecting = "the optimizer (a JSON object)")]
pub(super) struct SavedOptimizer {
    /// [`Optimizer::name`].
    pub(super) name: String,
    pub(super) learning_rate: Decimal<f32>,
    pub(super) iterations: u64,
    /// [`Optimizer::config`]: the hyperparameters by name.
    pub(super) config: BTreeMap<String, Decimal<f64>>,
    /// `[variable path, slot name, tensor name]`, in the optimizer's order.
    pub(super) slots: Vec<(String, String, String)>,
}

/// [`ScalingState`] as saved.
#[derive(Debug, Serialize, Deserialize)]
#[serde(expecting = "the loss scaling (a JSON object)")]
struct SavedScaling {
    #[serde(deserialize_with = "object")]
    loss_scale: SavedLossScale,
    applied_steps: u64,
    skipped_steps: u64,
    skips_at_floor: u64,
    max_skips_at_floor: u64,
}

/// A [`LossScale`] as saved, tagged by `type`; a dynamic one with its whole configuration.
#[derive(Debug, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "lowercase",
    expecting = "the loss scale (a JSON object)"
)]
enum SavedLossScale {
    Fixed {
        scale: Decimal<f32>,
    },
    Dynamic {
        scale: Decimal<f32>,
        good_steps: u64,
        initial_scale: Decimal<f32>,
        growth_interval: u64,
        multiplier: Decimal<f32>,
        min_scale: Decimal<f32>,
    },
}

/// The checkpointing metric's best value so far, as saved.
#[derive(Debug, Serialize, Deserialize)]
#[serde(expecting = "the best metric (a JSON object)")]
struct SavedBest {
    metric: String,
    mode: Mode,
    value: Decimal<f32>,
}

/// `mp.state` after [`State::validate`], in the trainer's types.
#[derive(Debug)]
pub(super) struct SavedState {
    pub(super) progress: TrainingProgress,
    pub(super) weights: Vec<String>,
    pub(super) frozen: Vec<String>,
    pub(super) optimizer: SavedOptimizer,
    pub(super) scaling: Option<ScalingState>,
    pub(super) best: Option<(BestMetric, f32)>,
}

impl State {
    /// Parses `mp.state`: serde's error names the field or value and its position.
    fn parse(text: &str) -> serde_json::Result<State> {
        let mut de = serde_json::Deserializer::from_str(text);
        let state = object(&mut de)?;
        de.end()?;
        Ok(state)
    }

    /// Checks what the types do not, and turns the state into the trainer's types.
    fn validate(self) -> std::result::Result<SavedState, String> {
        let learning_rate = self.optimizer.learning_rate.0;
        if !(learning_rate.is_finite() && learning_rate >= 0.0) {
            return Err(format!(
                "optimizer.learning_rate {learning_rate:?} is not finite and non-negative"
            ));
        }
        let scaling = self.loss_scaling.map(SavedScaling::validate).transpose()?;
        let counts = count_problems(
            self.optimizer.iterations,
            scaling.as_ref(),
            self.progress.step,
        );
        if !counts.is_empty() {
            return Err(counts.join("; "));
        }
        Ok(SavedState {
            progress: self.progress,
            weights: self.weights,
            frozen: self.frozen,
            optimizer: self.optimizer,
            scaling,
            best: self.best.map(|b| {
                let metric = BestMetric {
                    metric: b.metric,
                    mode: b.mode,
                };
                (metric, b.value.0)
            }),
        })
    }
}

/// The step counts that disagree, named as `mp.state` names them. What holds for any trainer
/// that ran its own steps: the loss-scale optimizer's applied steps are the inner optimizer's
/// `iterations` (one count, written twice), the steps skipped at the floor are some of the
/// skipped steps, and every skipped step (one per window) was a step run (`progress.step`
/// counts micro-batches). The optimizer's `iterations` are not compared with `progress.step`:
/// an optimizer may have been stepped before it was given to the trainer.
pub(super) fn count_problems(
    iterations: u64,
    scaling: Option<&ScalingState>,
    step: u64,
) -> Vec<String> {
    let mut problems = vec![];
    if let Some(s) = scaling {
        if s.applied != iterations {
            problems.push(format!(
                "loss_scaling.applied_steps is {} but optimizer.iterations is {iterations}: both \
                 count the applied updates",
                s.applied
            ));
        }
        if s.skips_at_floor > s.skipped {
            problems.push(format!(
                "loss_scaling.skips_at_floor is {} but loss_scaling.skipped_steps is only {}",
                s.skips_at_floor, s.skipped
            ));
        }
        if s.skipped > step {
            problems.push(format!(
                "loss_scaling.skipped_steps is {} but progress.step is only {step}: more steps \
                 skipped than run",
                s.skipped
            ));
        }
    }
    problems
}

impl From<&ScalingState> for SavedScaling {
    fn from(s: &ScalingState) -> Self {
        let loss_scale = match &s.loss_scale {
            LossScale::Fixed(f) => SavedLossScale::Fixed {
                scale: Decimal(f.scale()),
            },
            LossScale::Dynamic(d) => {
                let c = d.config();
                SavedLossScale::Dynamic {
                    scale: Decimal(d.scale()),
                    good_steps: d.good_steps(),
                    initial_scale: Decimal(c.initial_scale),
                    growth_interval: c.growth_interval,
                    multiplier: Decimal(c.multiplier),
                    min_scale: Decimal(c.min_scale),
                }
            }
        };
        SavedScaling {
            loss_scale,
            applied_steps: s.applied,
            skipped_steps: s.skipped,
            skips_at_floor: s.skips_at_floor,
            max_skips_at_floor: s.max_skips_at_floor,
        }
    }
}

impl SavedScaling {
    /// The loss scale as [`LossScale`] builds it (refusing what it refuses), and the scaling
    /// state as [`ScalingState::validate`] accepts it.
    fn validate(self) -> std::result::Result<ScalingState, String> {
        let loss_scale = match self.loss_scale {
            SavedLossScale::Fixed { scale } => LossScale::fixed(scale.0),
            SavedLossScale::Dynamic {
                scale,
                good_steps,
                initial_scale,
                growth_interval,
                multiplier,
                min_scale,
            } => {
                let config = DynamicLossScaleConfig {
                    initial_scale: initial_scale.0,
                    growth_interval,
                    multiplier: multiplier.0,
                    min_scale: min_scale.0,
                };
                let state = LossScaleState {
                    scale_bits: scale.0.to_bits(),
                    good_steps,
                };
                DynamicLossScale::from_config(config).and_then(|mut d| {
                    d.restore(state)?;
                    Ok(LossScale::Dynamic(d))
                })
            }
        }
        .map_err(|e| format!("loss_scaling.loss_scale: {e}"))?;
        let state = ScalingState {
            loss_scale,
            applied: self.applied_steps,
            skipped: self.skipped_steps,
            skips_at_floor: self.skips_at_floor,
            max_skips_at_floor: self.max_skips_at_floor,
        };
        state.validate().map_err(|e| format!("loss_scaling: {e}"))?;
        Ok(state)
    }
}

/// The dotted path (`progress.step`, `optimizer.slots.2`) of the innermost value that JSON
/// `text` is in at `line` and `column` (1-based line, bytes into it), as serde_json reports an
/// error's position: just after the value or key it stopped at, or after the `}` of the object
/// that lacks a field. `text` is well-formed up to there (the parser got that far); past the
/// end, the path at the end.
fn field_at(text: &str, line: usize, column: usize) -> String {
    enum Frame {
        /// The key being read or whose value is being read, and whether a key comes next.
        Object(Option<String>, bool),
        /// The element's index.
        Array(usize),
    }
    let start: usize = text
        .split_inclusive('\n')
        .take(line.saturating_sub(1))
        .map(str::len)
        .sum();
    let bytes = &text.as_bytes()[..(start + column).min(text.len())];
    let mut frames = vec![];
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'{' => frames.push(Frame::Object(None, true)),
            b'[' => frames.push(Frame::Array(0)),
            b'}' | b']' => {
                frames.pop();
            }
            b',' => match frames.last_mut() {
                Some(Frame::Object(_, next_is_key)) => *next_is_key = true,
                Some(Frame::Array(index)) => *index += 1,
                None => {}
            },
            b'"' => {
                let begin = i + 1;
                i = begin;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                if let Some(Frame::Object(key, next_is_key @ true)) = frames.last_mut() {
                    let end = i.min(bytes.len());
                    *key = Some(String::from_utf8_lossy(&bytes[begin..end]).into_owned());
                    *next_is_key = false;
                }
            }
            _ => {}
        }
        i += 1;
    }
    let names: Vec<String> = frames
        .into_iter()
        .filter_map(|f| match f {
            Frame::Object(key, _) => key,
            Frame::Array(index) => Some(index.to_string()),
        })
        .collect();
    names.join(".")
}

/// A float written as a JSON string of its shortest decimal that reads back to the same bits
/// (`"0.001"`, `"1e-7"`, `"32768.0"`, `"NaN"`): exact for float32 and float64 alike, where a
/// JSON number is read as float64 by most tools and cannot hold NaN or infinity.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Decimal<T>(pub(super) T);

impl<T: fmt::Debug> Serialize for Decimal<T> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{:?}", self.0))
    }
}

impl<'de, T: FromStr> Deserialize<'de> for Decimal<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Text<T>(PhantomData<T>);
        impl<T: FromStr> Visitor<'_> for Text<T> {
            type Value = Decimal<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number written as a string")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> std::result::Result<Decimal<T>, E> {
                s.parse()
                    .map(Decimal)
                    .map_err(|_| E::invalid_value(Unexpected::Str(s), &self))
            }
        }
        d.deserialize_str(Text(PhantomData))
    }
}

/// Deserializes `T` (a struct or an internally tagged enum) from a JSON object only: serde's
/// derived structs also accept an array of their fields in order, which mp never writes.
fn object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> std::result::Result<T, D::Error> {
    T::deserialize(ObjectOnly(d))
}

/// [`object`] or `null` (`None`). As a `deserialize_with` it also makes the field required
/// (serde would let a missing `Option` be `None`).
fn nullable_object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> std::result::Result<Option<T>, D::Error> {
    struct Object<T>(T);
    impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
            object(d).map(Object)
        }
    }
    Ok(Option::<Object<T>>::deserialize(d)?.map(|o| o.0))
}

/// [`object`] for [`TrainingProgress`], which is saved through [`Progress`].
fn progress<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<TrainingProgress, D::Error> {
    Progress::deserialize(ObjectOnly(d))
}

/// A deserializer that reads whatever is asked of it as a map (see [`object`]).
struct ObjectOnly<D>(D);

impl<'de, D: Deserializer<'de>> Deserializer<'de> for ObjectOnly<D> {
    type Error = D::Error;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> std::result::Result<V::Value, D::Error> {
        self.0.deserialize_map(v)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier
        ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_error(text: &str) -> String {
        parse_state("f", text).unwrap_err().to_string()
    }

    /// The messages name the field, then serde's: the missing field, or the value and what was
    /// expected, and the position.
    #[test]
    fn state_fields_name_their_path() {
        let prefix = "f holds an invalid checkpoint: mp.state: ";
        let e = state_error(r#"{"progress": {"epoch": 1, "step": -1}}"#);
        assert_eq!(
            e.strip_prefix(prefix).unwrap(),
            "progress.step: invalid value: integer `-1`, expected u64 at line 1 column 36"
        );
        let e = state_error(r#"{"progress": {"epoch": 1, "step": 1}}"#);
        assert_eq!(
            e.strip_prefix(prefix).unwrap(),
            "progress: missing field `rng_state` at line 1 column 36"
        );
        let e = state_error("[]");
        assert_eq!(
            e.strip_prefix(prefix).unwrap(),
            "invalid type: sequence, expected the training state (a JSON object) at line 1 \
             column 0"
        );
        // Nested objects must be objects too: serde alone would take an array of the fields.
        let e = state_error(r#"{"progress": [1, 2, 3]}"#);
        assert!(
            e.contains("progress: invalid type: sequence, expected the training progress"),
            "{e}"
        );
        let e = state_error(
            r#"{"progress": {"epoch": 1, "step": 1, "rng_state": 1}, "weights": ["a", 2]}"#,
        );
        assert!(
            e.contains("weights.1: invalid type: integer `2`, expected a string"),
            "{e}"
        );
        let e = state_error("{\n  \"progress\": {\n    \"epoch\": \"1\"\n  }\n}");
        assert!(
            e.contains("progress.epoch: invalid type: string \"1\", expected usize at line 3"),
            "{e}"
        );
        let e = state_error(r#"{"progress": {"epoch": 1, "step": 1, "rng_state": 1},"#);
        assert!(e.contains("EOF while parsing"), "{e}");
    }

    #[test]
    fn field_paths_follow_keys_escapes_and_arrays() {
        let text = r#"{"a\"}": {"b": [0, {"c": "}"}]}, "d": 1}"#;
        let at = |needle: &str| field_at(text, 1, text.find(needle).unwrap() + needle.len());
        assert_eq!(at(r#""a\"}""#), "a\\\"}");
        assert_eq!(at("[0"), "a\\\"}.b.0");
        assert_eq!(at(r#""c": "}""#), "a\\\"}.b.1.c");
        assert_eq!(at(r#""}"}"#), "a\\\"}.b.1");
        assert_eq!(at(r#""d": 1"#), "d");
        assert_eq!(field_at(text, 1, 0), "");
        assert_eq!(field_at(text, 9, 99), "", "past the end");
    }

    #[test]
    fn floats_are_decimal_strings_that_read_back_to_the_same_bits() {
        for v in [
            0.001f32,
            1e-7,
            32768.0,
            -0.0,
            f32::MIN_POSITIVE,
            f32::MAX,
            f32::NAN,
        ] {
            let text = serde_json::to_string(&Decimal(v)).unwrap();
            let back: Decimal<f32> = serde_json::from_str(&text).unwrap();
            assert_eq!(back.0.to_bits(), v.to_bits(), "{text}");
        }
        assert_eq!(serde_json::to_string(&Decimal(0.9f64)).unwrap(), r#""0.9""#);
        assert_eq!(
            serde_json::to_string(&Decimal(1e-7f32)).unwrap(),
            r#""1e-7""#
        );
        let e = serde_json::from_str::<Decimal<f32>>("0.5").unwrap_err();
        assert!(
            e.to_string()
                .contains("expected a number written as a string"),
            "{e}"
        );
        let e = serde_json::from_str::<Decimal<f32>>(r#""half""#).unwrap_err();
        assert!(
            e.to_string().starts_with("invalid value: string \"half\""),
            "{e}"
        );
    }
}
