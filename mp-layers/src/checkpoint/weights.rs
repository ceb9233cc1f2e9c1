//! Weights only: a model's variables as a safetensors file, and the checks of a file's tensors
//! against a model's variables (names, dtypes, shapes, values), every problem by name.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use mp_core::{Device, Domain, F32, PolicyKind, Tensor};

use super::atomic::{read, write_atomic};
use super::error::{Error, Result};
use super::format::{KEY_DTYPE, KEY_KIND, KEY_LAYOUT, KIND_CHECKPOINT, KIND_WEIGHTS};
use super::layout::{ForeignTensor, ForeignTensors, Layout, Part, Transform, WeightDtype};
use super::safetensors::{SafeTensors, TensorInfo};
use super::seal::{Entry, check_mp_metadata, seal_entries};
use super::state::state_of;
use crate::layer::Model;

/// The model's variables, `(path, shape)` in order.
pub(super) fn variables<M: Model>(model: &mut M) -> Result<Vec<(String, Vec<usize>)>> {
    let mut out = vec![];
    model.visit_variables("", &mut |path, v| {
        out.push((path.to_string(), v.shape().to_vec()));
        Ok(())
    })?;
    Ok(out)
}

/// The [`Domain`] of each of the model's variables, by path.
pub(super) fn domains<M: Model>(model: &mut M) -> Result<HashMap<String, Domain>> {
    let mut out = HashMap::new();
    model.visit_variables("", &mut |path, v| {
        out.insert(path.to_string(), v.domain());
        Ok(())
    })?;
    Ok(out)
}

/// `"name" holds NaN at index 3, which is not finite` when `t` has a value outside `domain`.
pub(super) fn value_problem(name: &str, t: &Tensor<F32>, domain: Domain) -> Result<Option<String>> {
    let host;
    let values = if t.device().is_cpu() {
        t.as_slice().map_err(crate::Error::from)?
    } else {
        host = t.to_device(Device::Cpu).map_err(crate::Error::from)?;
        host.as_slice().map_err(crate::Error::from)?
    };
    Ok(domain
        .first_outside(values)
        .map(|bad| format!("{name:?} holds {bad}")))
}

/// Every weight of `weights` that holds a value outside its variable's domain (finite; not
/// negative for a variance), by name.
pub(super) fn weight_value_problems(
    weights: &[(String, Tensor<F32>)],
    domains: &HashMap<String, Domain>,
) -> Result<Vec<String>> {
    let mut problems = vec![];
    for (name, t) in weights {
        let domain = domains.get(name).copied().unwrap_or_default();
        problems.extend(value_problem(name, t, domain)?);
    }
    Ok(problems)
}

/// [`Error::InvalidValues`] when there are value problems in `file`.
pub(super) fn invalid_values(file: &str, problems: Vec<String>) -> Result<()> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::InvalidValues {
            file: file.to_string(),
            problems,
        })
    }
}

/// [`Error::Unsaveable`] when there are problems with what would be saved as `what`.
pub(super) fn unsaveable(what: &'static str, problems: Vec<String>) -> Result<()> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Unsaveable { what, problems })
    }
}

/// Matches the file's weight tensors (`names`) against the model's variables, pushing every
/// problem; returns the values in the model's order when there were none.
pub(super) fn match_weights(
    st: &SafeTensors<'_>,
    names: &[&str],
    vars: &[(String, Vec<usize>)],
    problems: &mut Vec<String>,
) -> Result<Vec<(String, Tensor<F32>)>> {
    let before = problems.len();
    if vars.is_empty() {
        problems.push(
            "the model has no variables: build it (model.build(input_shape)) before loading".into(),
        );
    }
    let in_file: HashMap<&str, ()> = names.iter().map(|n| (*n, ())).collect();
    let mut out = vec![];
    for (path, shape) in vars {
        if !in_file.contains_key(path.as_str()) {
            problems.push(format!(
                "variable {path:?} of the model is missing from the file"
            ));
            continue;
        }
        let Some(t) = st.get(path) else {
            problems.push(format!("variable {path:?} is listed but has no tensor"));
            continue;
        };
        if t.dtype != "F32" {
            problems.push(format!("{path:?} has dtype {}, expected F32", t.dtype));
        } else if t.shape != *shape {
            problems.push(format!(
                "{path:?} has shape {:?} in the file, {shape:?} in the model",
                t.shape
            ));
        } else if problems.len() == before {
            let values = st.f32_values(t).unwrap_or_default();
            out.push((
                path.clone(),
                Tensor::from_vec(shape, values).map_err(crate::Error::from)?,
            ));
        }
    }
    let model_vars: HashMap<&str, ()> = vars.iter().map(|(p, _)| (p.as_str(), ())).collect();
    for name in names {
        if !model_vars.contains_key(name) {
            problems.push(format!(
                "{name:?} in the file is not a variable of the model"
            ));
        }
    }
    Ok(out)
}

pub(super) fn weights_problems(file: &str, problems: Vec<String>) -> Result<()> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Mismatch {
            file: file.to_string(),
            problems,
        })
    }
}

/// The model's tensors in `layout` and the hyperparameters the layout records. In mp's layout
/// each variable is itself; in another, the layers say (see
/// [`Layer::foreign_tensors`](crate::Layer::foreign_tensors)), and every variable must appear in
/// exactly one tensor.
pub(super) fn foreign_tensors<M: Model>(
    model: &mut M,
    layout: Layout,
) -> Result<(Vec<ForeignTensor>, BTreeMap<String, String>)> {
    let vars = variables(model)?;
    if layout == Layout::Mp {
        let tensors = vars
            .into_iter()
            .map(|(path, shape)| ForeignTensor {
                name: path.clone(),
                shape: shape.clone(),
                parts: vec![Part {
                    path,
                    shape,
                    transform: Transform::Same,
                }],
            })
            .collect();
        return Ok((tensors, BTreeMap::new()));
    }
    let mut out = ForeignTensors::new(layout);
    model.foreign_tensors("", &mut out)?;
    let (tensors, hyperparameters) = out.into_parts();
    let mut covered: HashMap<&str, usize> = HashMap::new();
    for part in tensors.iter().flat_map(|t| &t.parts) {
        *covered.entry(part.path.as_str()).or_default() += 1;
    }
    let wrong: Vec<String> = vars
        .iter()
        .filter(|(path, _)| covered.get(path.as_str()) != Some(&1))
        .map(|(path, _)| {
            format!(
                "variable {path:?} is in {} tensors of the {layout} layout, not 1",
                covered.get(path.as_str()).copied().unwrap_or(0)
            )
        })
        .collect();
    if !wrong.is_empty() {
        return Err(crate::Error::InvalidState {
            layer: model.model_name().to_string(),
            what: format!(
                "a layer's foreign_tensors does not describe its variables: {}",
                wrong.join("; ")
            ),
        }
        .into());
    }
    Ok((tensors, hyperparameters))
}

/// The model's weights as a safetensors file in mp's layout, float32: one tensor per variable,
/// named by its path, with mp metadata (`mp.kind` = `weights`, the version and the checksum).
/// [`weights_to_bytes_as`] writes other layouts and dtypes.
///
/// # Errors
/// [`Error::Unsaveable`] naming every variable that holds NaN or infinity (or a variance below
/// 0): such weights are never written.
pub fn weights_to_bytes<M: Model>(model: &mut M) -> Result<Vec<u8>> {
    weights_to_bytes_as(model, Layout::Mp, WeightDtype::F32)
}

/// The model's weights as a safetensors file in `layout` (mp's, or PyTorch's as Hugging Face
/// tools and candle read it), stored as `dtype`: float32 exactly, or a bfloat16 or float16
/// serving copy at half the bytes (the float32 master weights stay in the model and its
/// checkpoints). The metadata records the layout, the dtype, the model, its policy and the
/// hyperparameters the tensors do not carry (`mp.hparams.<layer>.eps`, GELU's `approximate`,
/// a fused `activation`); PyTorch's loaders ignore it.
///
/// # Errors
/// [`Error::Unsaveable`] naming every variable that holds NaN or infinity (or a variance below
/// 0), and for float16 every tensor holding a value past float16's largest finite value
/// (65504), with its index; nothing is written.
pub fn weights_to_bytes_as<M: Model>(
    model: &mut M,
    layout: Layout,
    dtype: WeightDtype,
) -> Result<Vec<u8>> {
    let weights = model.get_weights()?;
    unsaveable(
        "the weights",
        weight_value_problems(&weights, &domains(model)?)?,
    )?;
    let mut values: HashMap<String, Vec<f32>> = HashMap::new();
    for (path, t) in weights {
        let host = t
            .to_device(Device::Cpu)
            .and_then(|h| h.to_f32_vec())
            .map_err(crate::Error::from)?;
        values.insert(path, host);
    }
    let (tensors, hyperparameters) = foreign_tensors(model, layout)?;
    let mut bytes = Vec::with_capacity(tensors.len());
    let mut problems = vec![];
    for t in &tensors {
        if t.parts.is_empty() {
            bytes.push(("I64", 0i64.to_le_bytes().to_vec()));
            continue;
        }
        let mut flat = Vec::with_capacity(t.shape.iter().product());
        for p in &t.parts {
            flat.extend(p.transform.mp_to_foreign(&p.shape, &values[&p.path]));
        }
        match dtype.encode(&flat) {
            Ok(b) => bytes.push((dtype.safetensors_name(), b)),
            Err((at, v)) => {
                problems.push(format!(
                    "{:?} holds {v} at index {at}, past float16's largest finite value 65504 \
                     (export as bfloat16, or float32)",
                    t.name
                ));
                bytes.push((dtype.safetensors_name(), vec![]));
            }
        }
    }
    unsaveable("the weights as float16", problems)?;
    let entries: Vec<Entry<'_>> = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, (d, b))| (t.name.as_str(), *d, t.shape.as_slice(), b.as_slice()))
        .collect();
    let mut metadata = hyperparameters;
    metadata.insert(KEY_KIND.to_string(), KIND_WEIGHTS.to_string());
    metadata.insert("mp.model".to_string(), model.model_name().to_string());
    metadata.insert(
        "mp.policy".to_string(),
        <M::Policy as PolicyKind>::POLICY.name().to_string(),
    );
    metadata.insert(KEY_LAYOUT.to_string(), layout.name().to_string());
    metadata.insert(KEY_DTYPE.to_string(), dtype.to_string());
    seal_entries(&entries, metadata)
}

/// Saves the model's weights atomically as a safetensors file in mp's layout, float32 (see
/// [`weights_to_bytes`]). Weights that hold NaN or infinity are refused by name and no file is
/// written or replaced.
pub fn save_weights<M: Model>(model: &mut M, path: impl AsRef<Path>) -> Result<()> {
    write_atomic(path, &weights_to_bytes(model)?)
}

/// Saves the model's weights atomically in `layout`, stored as `dtype` (see
/// [`weights_to_bytes_as`]).
///
/// ```
/// use mp_core::MixedBFloat16;
/// use mp_layers::checkpoint::{Layout, WeightDtype, load_weights, save_weights_as};
/// use mp_layers::{Dense, Layer, Softmax, model};
///
/// #[model]
/// struct Net {
///     hidden: Dense,
///     logits: Dense,
///     #[dtype = "float32"]
///     probs: Softmax,
/// }
/// let new = || Net::<MixedBFloat16> {
///     hidden: Dense::new(8).relu(),
///     logits: Dense::new(3),
///     probs: Softmax::new(),
/// };
/// let mut net = new();
/// net.build(&[4])?;
/// let dir = tempfile::tempdir()?;
/// let file = dir.path().join("net.safetensors");
/// // `hidden.weight` [8, 4], `hidden.bias`, `logits.weight` [3, 8], `logits.bias`, in bfloat16.
/// save_weights_as(&mut net, &file, Layout::PyTorch, WeightDtype::BF16)?;
/// let mut other = new();
/// other.build(&[4])?;
/// load_weights(&mut other, &file)?; // the layout and dtype are read from the file
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn save_weights_as<M: Model>(
    model: &mut M,
    path: impl AsRef<Path>,
    layout: Layout,
    dtype: WeightDtype,
) -> Result<()> {
    write_atomic(path, &weights_to_bytes_as(model, layout, dtype)?)
}

/// Maps a file's tensor names to the names the model expects.
type Rename = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// How [`load_weights_with`] reads a file: its layout (found from the file by default), strict
/// or not, and a map from foreign names.
#[derive(Default)]
pub struct LoadOptions {
    layout: Option<Layout>,
    non_strict: bool,
    rename: Option<Rename>,
}

impl std::fmt::Debug for LoadOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadOptions")
            .field("layout", &self.layout)
            .field("strict", &!self.non_strict)
            .field("rename", &self.rename.is_some())
            .finish()
    }
}

impl LoadOptions {
    /// Strict, the layout read from the file's `mp.layout` metadata or, for a file without it,
    /// the layout whose names the file holds most of, no renaming.
    pub fn new() -> Self {
        LoadOptions::default()
    }

    /// Reads the file as `layout`, whatever it says.
    pub fn layout(mut self, layout: Layout) -> Self {
        self.layout = Some(layout);
        self
    }

    /// PyTorch's `strict=False`: the model's variables the file lacks keep their values, the
    /// file's tensors the model lacks are skipped, and both are listed in the [`LoadReport`]. A
    /// tensor of the wrong shape or dtype, or holding NaN or infinity, is still refused.
    pub fn non_strict(mut self) -> Self {
        self.non_strict = true;
        self
    }

    /// Renames the file's tensors before matching: `rename(name)` returns the name the model
    /// expects in the chosen layout, or `None` to keep the name. Two tensors renamed to one
    /// name are an error. A table is a closure over a map:
    /// `move |n| table.get(n).cloned()`.
    pub fn rename(
        mut self,
        rename: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.rename = Some(Box::new(rename));
        self
    }
}

/// What [`load_weights_with`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadReport {
    /// The layout the file was read as.
    pub layout: Layout,
    /// The model's tensors (in that layout's names) the file lacks, which kept their values
    /// (non-strict loads only: a strict load refuses them).
    pub missing: Vec<String>,
    /// The file's tensors (after renaming) the model has no variable for, which were skipped
    /// (non-strict loads only).
    pub unexpected: Vec<String>,
}

/// Loads weights from a safetensors file: one written by [`save_weights`] or
/// [`save_weights_as`], a checkpoint (its weights only), or a file from another tool in mp's or
/// PyTorch's layout (see [`load_weights_with`]), in float32, bfloat16 or float16. Every name,
/// dtype, shape and value is checked before anything is written: each mismatch
/// ([`Error::Mismatch`]) and each tensor holding NaN or infinity, or a variance below 0
/// ([`Error::InvalidValues`]), is reported by name and the model is left unchanged.
pub fn load_weights<M: Model>(model: &mut M, path: impl AsRef<Path>) -> Result<()> {
    load_weights_with(model, path, &LoadOptions::new()).map(|_| ())
}

/// [`load_weights`] from bytes in memory; `file` names them in errors.
pub fn load_weights_from_bytes<M: Model>(model: &mut M, file: &str, bytes: &[u8]) -> Result<()> {
    load_weights_from_bytes_with(model, file, bytes, &LoadOptions::new()).map(|_| ())
}

/// Loads weights as `options` say into the model's float32 master weights. Values stored as
/// bfloat16 or float16 widen exactly; PyTorch's `num_batches_tracked` is accepted and ignored.
/// Every problem is checked before anything is written, and named: a strict load refuses any
/// missing or unexpected tensor; every load refuses a tensor of the wrong shape or dtype, or
/// holding NaN, infinity or a negative variance. On any error the model is unchanged.
///
/// ```
/// use mp_core::Float32;
/// use mp_layers::checkpoint::{Layout, LoadOptions, WeightDtype, load_weights_with, save_weights_as};
/// use mp_layers::{Dense, Layer, Softmax, model};
///
/// #[model]
/// struct Body {
///     hidden: Dense,
///     head: Dense,
///     #[dtype = "float32"]
///     probs: Softmax,
/// }
/// let mut trained = Body::<Float32> {
///     hidden: Dense::new(8).relu(),
///     head: Dense::new(3),
///     probs: Softmax::new(),
/// };
/// trained.build(&[4])?;
/// let dir = tempfile::tempdir()?;
/// let file = dir.path().join("body.safetensors");
/// save_weights_as(&mut trained, &file, Layout::PyTorch, WeightDtype::F32)?;
///
/// // A new head of another size: load the rest, skip the head.
/// let mut parity = Body::<Float32> {
///     hidden: Dense::new(8).relu(),
///     head: Dense::new(2),
///     probs: Softmax::new(),
/// };
/// parity.build(&[4])?;
/// let rename = |n: &str| n.strip_prefix("head.").map(|rest| format!("old_head.{rest}"));
/// let options = LoadOptions::new().non_strict().rename(rename);
/// let report = load_weights_with(&mut parity, &file, &options)?;
/// assert_eq!(report.missing, ["head.weight", "head.bias"]);
/// assert_eq!(report.unexpected, ["old_head.bias", "old_head.weight"]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn load_weights_with<M: Model>(
    model: &mut M,
    path: impl AsRef<Path>,
    options: &LoadOptions,
) -> Result<LoadReport> {
    let path = path.as_ref();
    load_weights_from_bytes_with(model, &path.display().to_string(), &read(path)?, options)
}

/// [`load_weights_with`] from bytes in memory; `file` names them in errors.
pub fn load_weights_from_bytes_with<M: Model>(
    model: &mut M,
    file: &str,
    bytes: &[u8],
    options: &LoadOptions,
) -> Result<LoadReport> {
    let st = SafeTensors::parse(file, bytes)?;
    let names: Vec<String> = match check_mp_metadata(file, &st)?.as_deref() {
        Some(KIND_CHECKPOINT) => state_of(file, &st)?.weights,
        _ => st.tensors.iter().map(|t| t.name.clone()).collect(),
    };
    if variables(model)?.is_empty() {
        weights_problems(
            file,
            vec![
                "the model has no variables: build it (model.build(input_shape)) before loading"
                    .into(),
            ],
        )?;
    }
    let mut problems = vec![];
    // The file's tensors under the names the model expects.
    let mut in_file: BTreeMap<String, &TensorInfo> = BTreeMap::new();
    for name in &names {
        let Some(info) = st.get(name) else {
            problems.push(format!("variable {name:?} is listed but has no tensor"));
            continue;
        };
        let renamed = options
            .rename
            .as_ref()
            .and_then(|r| r(name))
            .unwrap_or_else(|| name.clone());
        if in_file.insert(renamed.clone(), info).is_some() {
            problems.push(format!(
                "two tensors of the file are named {renamed:?} after renaming"
            ));
        }
    }
    let layout = match (options.layout, st.metadata.get(KEY_LAYOUT)) {
        (Some(layout), _) => layout,
        (None, Some(name)) => name.parse().map_err(|_| Error::Invalid {
            file: file.to_string(),
            what: format!("unknown {KEY_LAYOUT} {name:?}"),
        })?,
        (None, None) => {
            // The layout whose names the file holds most of; mp's on a tie.
            let mut best = (Layout::Mp, 0);
            for layout in Layout::ALL {
                let (tensors, _) = foreign_tensors(model, layout)?;
                let found = tensors
                    .iter()
                    .filter(|t| in_file.contains_key(&t.name))
                    .count();
                if found > best.1 {
                    best = (layout, found);
                }
            }
            best.0
        }
    };
    let (tensors, _) = foreign_tensors(model, layout)?;
    let mp = layout == Layout::Mp;
    let domains = domains(model)?;
    let mut missing = vec![];
    let mut loaded: HashMap<String, Tensor<F32>> = HashMap::new();
    let mut value_problems = vec![];
    for t in &tensors {
        let Some(info) = in_file.get(&t.name) else {
            if !t.parts.is_empty() {
                missing.push(t.name.clone());
                if !options.non_strict {
                    problems.push(if mp {
                        format!(
                            "variable {:?} of the model is missing from the file",
                            t.name
                        )
                    } else {
                        format!(
                            "tensor {:?} (the model's {}) is missing from the file",
                            t.name,
                            t.parts
                                .iter()
                                .map(|p| p.path.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    });
                }
            }
            continue;
        };
        if t.parts.is_empty() {
            continue; // num_batches_tracked: PyTorch's step counter, not a weight.
        }
        let Some(dtype) = WeightDtype::from_safetensors_name(&info.dtype) else {
            problems.push(format!(
                "{:?} has dtype {}, expected F32, BF16 or F16",
                t.name, info.dtype
            ));
            continue;
        };
        if info.shape != t.shape {
            problems.push(format!(
                "{:?} has shape {:?} in the file, {:?} in the model",
                t.name, info.shape, t.shape
            ));
            continue;
        }
        let flat = dtype.decode(st.data(info));
        let mut at = 0;
        for p in &t.parts {
            let n: usize = p.shape.iter().product();
            let foreign = &flat[at..at + n];
            // Checked in the file's order, so the index is the file's.
            let domain = domains.get(&p.path).copied().unwrap_or_default();
            if let Some(mut bad) = domain.first_outside(foreign) {
                bad.index += at;
                value_problems.push(format!("{:?} holds {bad}", t.name));
            }
            let values = p.transform.foreign_to_mp(&p.shape, foreign);
            at += n;
            let tensor = Tensor::from_vec(&p.shape, values).map_err(crate::Error::from)?;
            loaded.insert(p.path.clone(), tensor);
        }
    }
    let expected: HashMap<&str, ()> = tensors.iter().map(|t| (t.name.as_str(), ())).collect();
    let unexpected: Vec<String> = in_file
        .keys()
        .filter(|n| !expected.contains_key(n.as_str()))
        .cloned()
        .collect();
    if !options.non_strict {
        problems.extend(
            unexpected
                .iter()
                .map(|n| format!("{n:?} in the file is not a variable of the model")),
        );
    }
    weights_problems(file, problems)?;
    invalid_values(file, value_problems)?;
    model.visit_variables("", &mut |path, v| {
        if let Some(t) = loaded.remove(path) {
            *v.value_mut() = t.to_device(v.value().device())?;
        }
        Ok(())
    })?;
    Ok(LoadReport {
        layout,
        missing,
        unexpected,
    })
}
