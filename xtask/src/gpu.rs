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

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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
    let bins = cargo_executables(
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
    let tests = cargo_executables(
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

/// Runs cargo with `args` and JSON messages; returns `(name, path)` of every executable built.
fn cargo_executables(root: &Path, args: &[&str]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let output = Command::new(crate::cargo())
        .current_dir(root)
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !output.status.success() {
        bail!("cargo {} failed", args.join(" "));
    }
    Ok(executables(&String::from_utf8_lossy(&output.stdout)))
}

/// The executables in cargo's JSON messages, named `<target>` for binaries and
/// `<package>-<target>` for test binaries.
pub fn executables(json_lines: &str) -> Vec<(String, PathBuf)> {
    let mut out = vec![];
    for line in json_lines.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(exe) = msg.get("executable").and_then(|e| e.as_str()) else {
            continue;
        };
        let target = msg["target"]["name"].as_str().unwrap_or("bin");
        let test = msg["profile"]["test"].as_bool().unwrap_or(false);
        let name = if test {
            let package = msg["package_id"]
                .as_str()
                .and_then(|id| id.rsplit('/').next())
                .and_then(|s| s.split(['#', '@']).next())
                .unwrap_or("pkg");
            let kind = msg["target"]["kind"][0].as_str().unwrap_or("test");
            format!("{package}-{kind}-{target}")
        } else {
            target.to_string()
        };
        out.push((name, PathBuf::from(exe)));
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_executables_from_cargo_json() {
        let lines = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/mp-kernels#0.1.0","target":{"kind":["lib"],"name":"mp_kernels"},"profile":{"test":true},"executable":"/t/release/deps/mp_kernels-1234"}
{"reason":"compiler-artifact","package_id":"path+file:///w/mp-kernels#0.1.0","target":{"kind":["test"],"name":"cuda"},"profile":{"test":true},"executable":"/t/release/deps/cuda-99"}
{"reason":"compiler-artifact","package_id":"path+file:///w/examples#0.1.0","target":{"kind":["bin"],"name":"gpu_check"},"profile":{"test":false},"executable":"/t/release/gpu_check"}
{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"half"},"profile":{"test":false},"executable":null}
{"reason":"build-finished","success":true}"#;
        let exes = executables(lines);
        let names: Vec<&str> = exes.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "mp-kernels-lib-mp_kernels",
                "mp-kernels-test-cuda",
                "gpu_check"
            ]
        );
        assert_eq!(exes[2].1, PathBuf::from("/t/release/gpu_check"));
    }
}
