//! Fetches MNIST into its cache directory (if needed), verifies the four files' SHA-256, and
//! prints where they are. `cargo xtask data` runs this.
//!
//! ```text
//! cargo run --release -p mp-data --example fetch_mnist [-- --dir DIR]
//! ```
//!
//! Without `--dir` the directory is `$MP_DATA_DIR`, else `$XDG_CACHE_HOME/mp/mnist`, else
//! `~/.cache/mp/mnist`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use mp_data::mnist::{Loader, Manifest};

const USAGE: &str = "usage: fetch_mnist [--dir DIR]";

fn main() -> ExitCode {
    let mut loader = Loader::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--dir" => match args.next() {
                Some(dir) => loader = loader.cache_dir(PathBuf::from(dir)),
                None => return fail(&format!("--dir needs a value\n{USAGE}")),
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => return fail(&format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let start = Instant::now();
    let dir = match loader.ensure() {
        Ok(dir) => dir,
        Err(e) => return fail(&e.to_string()),
    };
    println!(
        "MNIST is ready in {} (4 files, SHA-256 verified, {:.1} s):",
        dir.display(),
        start.elapsed().as_secs_f64()
    );
    for spec in Manifest::mnist().files() {
        let len = std::fs::metadata(dir.join(&spec.name)).map_or(0, |m| m.len());
        println!("  {:<24} {len:>9} bytes  sha256 {}", spec.name, spec.sha256);
    }
    let from_env = std::env::var_os("MP_DATA_DIR").map(PathBuf::from);
    if from_env.as_deref() != Some(dir.as_path())
        && mp_data::mnist::default_cache_dir().ok() != Some(dir.clone())
    {
        println!("set MP_DATA_DIR={} for mp to find it there", dir.display());
    }
    ExitCode::SUCCESS
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("fetch_mnist: {msg}");
    ExitCode::FAILURE
}
