//! Project tasks, run as `cargo xtask <task>` (the alias is in `.cargo/config.toml`).
//!
//! - `cargo xtask bench [gemm] [--quick] [--rounds N]`: builds the measuring binary
//!   (`examples/src/bin/bench.rs`) in release mode and runs it; it prints a markdown table and
//!   writes JSON under `target/bench/`.
//!
//! - `cargo xtask data [--dir DIR]`: fetches and verifies MNIST (through mp-data's
//!   `fetch_mnist` example) into `$MP_DATA_DIR` or the default cache.
//!
//! - `cargo xtask kernels [--check]`: compiles `mp-kernels/cuda/*.cu` to PTX through NVRTC,
//!   assembles it with ptxas (errors and spills fail), prints the register table, and writes
//!   (or, with `--check`, verifies) the committed PTX in `mp-kernels/cuda/ptx/`.
//!
//! - `cargo xtask gpu-check --build`: builds the GPU check (`examples/src/bin/gpu_check.rs`, with
//!   the `cuda` feature) and the CUDA test binaries in release mode and copies them into `.gpu/`,
//!   for `scripts/gpu-check.sh` on a GPU machine without a Rust toolchain.
//!
//! xtask stays a thin dispatcher with few dependencies: the measuring code lives in `examples/`.

mod bench;
mod cargo;
mod data;
mod gpu;
mod kernels;
mod nvrtc;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("bench") => bench::run(&args[1..]),
        Some("data") => data::run(&args[1..]),
        Some("kernels") => kernels::run(&args[1..]),
        Some("gpu-check") => gpu::run(&args[1..]),
        Some("-h" | "--help" | "help") | None => {
            print!("{}", USAGE);
            Ok(())
        }
        Some(other) => Err(anyhow::anyhow!("unknown task {other:?}\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "\
usage: cargo xtask <task>

tasks:
  bench [train] [gemm] [--quick] [--rounds N]
                                        run the benchmarks (release build); writes target/bench/
                                        report.{json,svg} and, without --quick, BENCHMARKS.md
  data [--dir DIR]                      fetch and verify MNIST into $MP_DATA_DIR or ~/.cache/mp/mnist
  kernels [--check]                     NVRTC + ptxas over mp-kernels/cuda/*.cu: write (or check)
                                        the committed PTX in mp-kernels/cuda/ptx/
  gpu-check --build                     build the GPU check and CUDA tests (release) into .gpu/;
                                        run them on a GPU machine with scripts/gpu-check.sh
";

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// The cargo that runs us (`$CARGO`), or `cargo`.
pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string())
}
