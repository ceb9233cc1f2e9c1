//! Runnable examples of mp, the Keras mixed precision guide in Rust (`src/bin/`):
//!
//! - `mnist_fit`: the guide's first half — the model, the dtypes it prints, `fit`, `evaluate`;
//! - `mnist_custom_loop`: the guide's custom training loop with a `LossScaleOptimizer`;
//! - `bench`: the measuring binary behind `cargo xtask bench`.
//!
//! This library holds what they share: the guide's model and a small argument parser.

use mp_layers::{Dense, Softmax, model};

pub mod bench_step_gemms;
pub mod bench_train;

/// The guide's model: `784 -> Dense(units, relu) -> Dense(units, relu) -> Dense(10)` and a
/// softmax kept in float32, so the model's output is float32 under every policy.
#[model]
pub struct Digits {
    /// The first hidden layer.
    pub dense_1: Dense,
    /// The second hidden layer.
    pub dense_2: Dense,
    /// The logits.
    pub dense_logits: Dense,
    /// The softmax, in float32 whatever the policy (the guide's advice).
    #[dtype = "float32"]
    pub predictions: Softmax,
}

impl<P: mp_core::PolicyKind> Digits<P> {
    /// The guide's model with `units` hidden units, not yet built.
    pub fn guide(units: usize) -> Self {
        Digits {
            dense_1: Dense::new(units).relu(),
            dense_2: Dense::new(units).relu(),
            dense_logits: Dense::new(10),
            predictions: Softmax::new(),
        }
    }
}

/// `--name value` command-line options, parsed by hand (the examples need nothing more).
#[derive(Debug, Clone)]
pub struct Args {
    pairs: Vec<(String, String)>,
    flags: Vec<String>,
}

impl Args {
    /// Parses `std::env::args()`; `flags` lists the options that take no value.
    pub fn from_env(flags: &[&str]) -> anyhow::Result<Self> {
        Self::parse(std::env::args().skip(1), flags)
    }

    /// Parses the given arguments.
    pub fn parse(args: impl IntoIterator<Item = String>, flags: &[&str]) -> anyhow::Result<Self> {
        let mut pairs = vec![];
        let mut set = vec![];
        let mut it = args.into_iter();
        while let Some(a) = it.next() {
            let Some(name) = a.strip_prefix("--") else {
                anyhow::bail!("unexpected argument {a:?}: options look like --name value");
            };
            if flags.contains(&name) {
                set.push(name.to_string());
                continue;
            }
            let (name, value) = match name.split_once('=') {
                Some((n, v)) => (n.to_string(), v.to_string()),
                None => {
                    let v = it
                        .next()
                        .ok_or_else(|| anyhow::anyhow!("--{name} needs a value"))?;
                    (name.to_string(), v)
                }
            };
            pairs.push((name, value));
        }
        Ok(Args { pairs, flags: set })
    }

    /// The value of `--name`, parsed, or `default`.
    pub fn get<T: std::str::FromStr>(&self, name: &str, default: T) -> anyhow::Result<T>
    where
        T::Err: std::fmt::Display,
    {
        match self.pairs.iter().rev().find(|(n, _)| n == name) {
            Some((_, v)) => v
                .parse()
                .map_err(|e| anyhow::anyhow!("--{name} {v:?}: {e}")),
            None => Ok(default),
        }
    }

    /// The raw value of `--name`, if given.
    pub fn raw(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the flag `--name` was given.
    pub fn flag(&self, name: &str) -> bool {
        self.flags.iter().any(|f| f == name)
    }

    /// Fails on options not in `known`.
    pub fn check_known(&self, known: &[&str]) -> anyhow::Result<()> {
        for (n, _) in &self.pairs {
            if !known.contains(&n.as_str()) {
                anyhow::bail!(
                    "unknown option --{n}; known options: --{}",
                    known.join(", --")
                );
            }
        }
        Ok(())
    }
}

/// The calibration as the report reads it: the chosen path per dtype and every measured rate.
pub fn calibration_json(cal: &mp_kernels::calibrate::Calibration) -> serde_json::Value {
    let rates: Vec<_> = cal
        .measured
        .rates
        .iter()
        .map(|r| serde_json::json!({ "dtype": r.dtype.name(), "path": r.path, "gflops": r.gflops }))
        .collect();
    let chosen: serde_json::Map<String, serde_json::Value> = [
        mp_core::DType::F32,
        mp_core::DType::BF16,
        mp_core::DType::F16,
    ]
    .iter()
    .map(|&d| (d.name().to_string(), cal.chosen.get(d).name().into()))
    .collect();
    serde_json::json!({
        "chosen": chosen,
        "forced": cal.forced.iter().map(|d| d.name()).collect::<Vec<_>>(),
        "rates": rates,
        "fma_f32_gflops": cal.measured.fma_f32_gflops,
        "dpbf16_gflops": cal.measured.dpbf16_gflops,
        "measured_seconds": match cal.origin {
            mp_kernels::calibrate::Origin::Measured { seconds, .. } => Some(seconds),
            mp_kernels::calibrate::Origin::Cached(_) => None,
        },
        "quiet": match cal.origin {
            mp_kernels::calibrate::Origin::Measured { quiet, .. } => Some(quiet),
            mp_kernels::calibrate::Origin::Cached(_) => None,
        },
        "paths_available": mp_kernels::gemm::GemmPath::ALL.iter().filter(|p| p.isa().is_supported()).map(|p| p.name()).collect::<Vec<_>>(),
    })
}
