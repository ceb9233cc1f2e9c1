//! `cargo xtask gpu-check --build`: build the GPU check and the CUDA test binaries (release, the
//! `cuda` feature) and copy them into `.gpu/` (git-ignored; it travels with the working tree to
//! a GPU machine that has CUDA 13 libraries but no Rust toolchain). There, from the repository
//! root:
//!
//! ```text
//! scripts/gpu-check.sh
//! ```
//!
//! which finds the CUDA 13 libraries (the `nvidia-*` pip wheels' `nvidia/cu13/lib`, then
//! `/usr/local/nvidia/lib64` and `/usr/local/cuda/lib64`), puts them on `LD_LIBRARY_PATH`, runs
//! `.gpu/gpu_check` and every test binary in `.gpu/tests/` with `MP_REQUIRE_GPU=1`, and writes
//! `gpu-check.log`.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

/// Runs `cargo xtask gpu-check --build`.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    if args != ["--build"] {
        bail!(
            "usage: cargo xtask gpu-check --build\n(then, on the GPU machine: scripts/gpu-check.sh)"
        );
    }
    let root = crate::root();
    let out = root.join(".gpu");
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("removing {}", out.display()))?;
    }
    std::fs::create_dir_all(out.join("tests"))?;
    let bins = crate::cargo::executables(
        &root,
        &[
            "build",
            "--release",
            "--package",
            "examples",
            "--features",
            "cuda",
            "--bin",
            "gpu_check",
        ],
    )?;
    let gpu_check = bins
        .iter()
        .find(|(name, _)| name == "gpu_check")
        .context("cargo built no gpu_check binary")?;
    copy(&gpu_check.1, &out.join("gpu_check"))?;
    let tests = crate::cargo::executables(
        &root,
        &[
            "test",
            "--release",
            "--no-run",
            "--package",
            "mp-core",
            "--package",
            "mp-kernels",
            "--features",
            "mp-kernels/cuda",
        ],
    )?;
    // The binaries with device tests; the CPU-only ones (GEMM, elementwise) stay here.
    let tests: Vec<_> = tests
        .into_iter()
        .filter(|(name, _)| name.contains("-lib-") || name.ends_with("-cuda"))
        .collect();
    if tests.is_empty() {
        bail!("cargo built no test binaries");
    }
    for (name, path) in &tests {
        copy(path, &out.join("tests").join(name))?;
    }
    println!(
        "gpu-check: copied gpu_check and {} test binaries into {}\n\
         on the GPU machine, from the repository root: scripts/gpu-check.sh",
        tests.len(),
        out.display()
    );
    Ok(())
}

/// Copies a binary and strips its debug information (the release profile keeps line tables,
/// ten times the code's size), so `.gpu/` stays small enough to travel with the working tree.
fn copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    match Command::new("strip").arg("--strip-debug").arg(to).status() {
        Ok(s) if s.success() => {}
        _ => eprintln!("gpu-check: could not strip {} (kept as is)", to.display()),
    }
    Ok(())
}
