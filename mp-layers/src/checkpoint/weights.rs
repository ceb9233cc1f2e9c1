//! Weights only: a model's variables as a safetensors file, and the checks of a file's tensors
//! against a model's variables (names, dtypes, shapes, values), every problem by name.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use mp_core::{Device, Domain, F32, PolicyKind, Tensor};

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

/// The model's weights as a safetensors file: one float32 tensor per variable, named by its
/// path, with mp metadata (`mp.kind` = `weights`, the version and the checksum).
///
/// # Errors
/// [`Error::Unsaveable`] naming every variable that holds NaN or infinity (or a variance below
/// 0): such weights are never written.
pub fn weights_to_bytes<M: Model>(model: &mut M) -> Result<Vec<u8>> {
    let weights = model.get_weights()?;
    unsaveable(
        "the weights",
        weight_value_problems(&weights, &domains(model)?)?,
    )?;
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

/// Saves the model's weights atomically as a safetensors file (see [`weights_to_bytes`]). Weights
/// that hold NaN or infinity are refused by name and no file is written or replaced.
pub fn save_weights<M: Model>(model: &mut M, path: impl AsRef<Path>) -> Result<()> {
    write_atomic(path, &weights_to_bytes(model)?)
}

/// Loads weights from a safetensors file: one written by [`save_weights`], a checkpoint (its
/// weights only), or a file from another tool whose tensors are exactly the model's variables
/// (float32, named by path). Every name, dtype, shape and value is checked before anything is
/// written: each mismatch ([`Error::Mismatch`]) and each tensor holding NaN or infinity, or a
/// variance below 0 ([`Error::InvalidValues`]), is reported by name and the model is left
/// unchanged.
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
    invalid_values(file, weight_value_problems(&weights, &domains(model)?)?)?;
    model.set_weights(&weights)?;
    Ok(())
}
