//! Running cargo from xtask, and the one way xtask finds what cargo built: the `executable`
//! paths of cargo's JSON messages, and the target folder cargo itself reports (which honours
//! `CARGO_TARGET_DIR` and cargo's configuration).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// Runs cargo with `args` and JSON messages; returns `(name, path)` of every executable built.
pub fn executables(root: &Path, args: &[&str]) -> anyhow::Result<Vec<(String, PathBuf)>> {
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
    Ok(parse_executables(&String::from_utf8_lossy(&output.stdout)))
}

/// The executables in cargo's JSON messages, named `<target>` for binaries and
/// `<package>-<target>` for test binaries.
pub fn parse_executables(json_lines: &str) -> Vec<(String, PathBuf)> {
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

/// The target folder, as `cargo metadata` reports it.
pub fn target_dir(root: &Path) -> anyhow::Result<PathBuf> {
    let output = Command::new(crate::cargo())
        .current_dir(root)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo metadata")?;
    if !output.status.success() {
        bail!("cargo metadata failed");
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("parsing cargo metadata")?;
    meta["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata has no target_directory")
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
        let exes = parse_executables(lines);
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
