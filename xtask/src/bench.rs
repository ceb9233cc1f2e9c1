//! `cargo xtask bench`: build the measuring binary in release mode and run it.

use std::process::Command;

use anyhow::{Context, bail};

/// The benchmark groups the measuring binary knows.
const GROUPS: &[&str] = &["train", "gemm", "cnn", "vit", "dp"];

/// The options of the groups that take a value (the next argument).
const VALUE_OPTIONS: &[&str] = &[
    "--rounds",
    "--out",
    "--batch",
    "--batches",
    "--units",
    "--steps",
    "--sizes",
    "--budget-gib",
];

/// Runs `cargo xtask bench [GROUP] [OPTIONS]`.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    let (groups, options) = split_args(args)?;
    let root = crate::root();
    let mut build = vec![
        "build",
        "--release",
        "--package",
        "examples",
        "--bin",
        "bench",
    ];
    // The data-parallel group runs 2 ranks under mpirun: with Open MPI installed, the binary
    // gets the `mpi` feature (else that group reports why it was skipped).
    let mpi = Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if mpi {
        build.extend(["--features", "mpi"]);
    }
    let built = crate::cargo::executables(&root, &build)?;
    let exe = built
        .into_iter()
        .find(|(name, _)| name == "bench")
        .map(|(_, path)| path)
        .context("cargo built no bench binary")?;
    let dir = crate::cargo::target_dir(&root)?.join("bench");
    for group in &groups {
        let mut cmd = Command::new(&exe);
        cmd.current_dir(&root).arg(group).args(&options);
        if !options.iter().any(|o| o == "--out") {
            cmd.arg("--out").arg(dir.join(format!("{group}.json")));
        }
        let status = cmd
            .status()
            .with_context(|| format!("running {}", exe.display()))?;
        if !status.success() {
            bail!("benchmark group {group} failed");
        }
    }
    let inputs = crate::report::read_inputs(&dir, &groups)?;
    let command = format!("cargo xtask bench {}", args.join(" "));
    let quick = options.iter().any(|o| o == "--quick");
    let all = GROUPS.iter().all(|g| groups.iter().any(|r| r == g));
    crate::report::write(&root, &dir, &inputs, command.trim(), quick, !quick && all)
}

/// Splits arguments into benchmark groups (all of them when none is named) and options passed
/// through to the measuring binary.
fn split_args(args: &[String]) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let mut groups = vec![];
    let mut options = vec![];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a.starts_with("--") {
            options.push(a.clone());
            if VALUE_OPTIONS.contains(&a.as_str()) {
                let v = it.next().with_context(|| format!("{a} needs a value"))?;
                options.push(v.clone());
            }
        } else if GROUPS.contains(&a.as_str()) {
            groups.push(a.clone());
        } else {
            bail!(
                "unknown benchmark group {a:?}; known groups: {}",
                GROUPS.join(", ")
            );
        }
    }
    if groups.is_empty() {
        groups = GROUPS.iter().map(|g| g.to_string()).collect();
    }
    Ok((groups, options))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn splits_groups_and_options() {
        let (g, o) = split_args(&s(&["gemm", "--quick", "--rounds", "7"])).unwrap();
        assert_eq!(g, s(&["gemm"]));
        assert_eq!(o, s(&["--quick", "--rounds", "7"]));
        let (g, o) = split_args(&s(&["vit", "--batch", "64"])).unwrap();
        assert_eq!(g, s(&["vit"]));
        assert_eq!(o, s(&["--batch", "64"]));
        let (g, _) = split_args(&[]).unwrap();
        assert_eq!(g, s(GROUPS));
        assert!(split_args(&s(&["nope"])).is_err());
        assert!(split_args(&s(&["--rounds"])).is_err());
    }
}
