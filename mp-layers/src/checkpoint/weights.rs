//! Weights only: a model's variables as a safetensors file, and the checks of a file's tensors
//! against a model's variables (names, dtypes, shapes), every mismatch by name.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use mp_core::{F32, PolicyKind, Tensor};

use super::atomic::{read, write_atomic};
use super::error::{Error, Result};
use super::format::{KEY_KIND, KIND_CHECKPOINT, KIND_WEIGHTS};
use super::safetensors::SafeTensors;
use super::seal::{check_mp_metadata, seal};
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

/// The model's weights as a safetensors file: one float32 tensor per variable, named by its
/// path, with mp metadata (`mp.kind` = `weights`, the version and the checksum).
pub fn weights_to_bytes<M: Model>(model: &mut M) -> Result<Vec<u8>> {
    let weights = model.get_weights()?;
    let tensors: Vec<(String, &Tensor<F32>)> =
        weights.iter().map(|(n, t)| (n.clone(), t)).collect();
    let mut metadata = BTreeMap::new();
    metadata.insert(KEY_KIND.to_string(), KIND_WEIGHTS.to_string());
    metadata.insert("mp.model".to_string(), model.model_name().to_string());
    metadata.insert(
        "mp.policy".to_string(),
        <M::Policy as PolicyKind>::POLICY.name().to_string(),
    );
    seal(&tensors, metadata)
}

/// Saves the model's weights atomically as a safetensors file (see [`weights_to_bytes`]).
pub fn save_weights<M: Model>(model: &mut M, path: impl AsRef<Path>) -> Result<()> {
    write_atomic(path, &weights_to_bytes(model)?)
}

/// Loads weights from a safetensors file: one written by [`save_weights`], a checkpoint (its
/// weights only), or a file from another tool whose tensors are exactly the model's variables
/// (float32, named by path). Every name, dtype and shape is checked before anything is written;
/// each mismatch is reported by name and the model is left unchanged.
pub fn load_weights<M: Model>(model: &mut M, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    load_weights_from_bytes(model, &path.display().to_string(), &read(path)?)
}

/// [`load_weights`] from bytes in memory; `file` names them in errors.
pub fn load_weights_from_bytes<M: Model>(model: &mut M, file: &str, bytes: &[u8]) -> Result<()> {
    let st = SafeTensors::parse(file, bytes)?;
    let names: Vec<String> = match check_mp_metadata(file, &st)?.as_deref() {
        Some(KIND_CHECKPOINT) => state_of(file, &st)?.weights,
        _ => st.tensors.iter().map(|t| t.name.clone()).collect(),
    };
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let vars = variables(model)?;
    let mut problems = vec![];
    let weights = match_weights(&st, &names, &vars, &mut problems)?;
    weights_problems(file, problems)?;
    model.set_weights(&weights)?;
    Ok(())
}
