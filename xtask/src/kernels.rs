//! `cargo xtask kernels [--check]`: compile every `mp-kernels/cuda/*.cu` to PTX for each
//! architecture through NVRTC (the library's own compile code and options), assemble each PTX
//! with ptxas (any error or register spill fails), print a register table, then write the PTX to
//! `mp-kernels/cuda/ptx/` (committed, embedded by the library) or, with `--check`, fail if the
//! committed PTX differs.
//!
//! The pinned CUDA 13.0.88 wheels (NVRTC, the headers, ptxas) are installed with pip into a cache
//! outside the clone (`$MP_CUDA_TOOLS_DIR`, default `~/.cache/mp-cuda-tools/13.0.88`) on first
//! use. NVRTC is loaded by cudarc with dlopen, which reads `LD_LIBRARY_PATH` only at process
//! start, so the task re-runs itself with the wheel's library folder on it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::nvrtc;

/// The CUDA wheels' version: the H200's toolkit (driver 580 = CUDA 13.0). NVRTC 13.1+ emits PTX
/// ISA versions that the 13.0 ptxas and driver refuse.
pub const CUDA_WHEEL_VERSION: &str = "13.0.88";

/// Set in the environment of the re-run that has NVRTC on `LD_LIBRARY_PATH`.
const READY_ENV: &str = "MP_XTASK_NVRTC_READY";

/// Runs `cargo xtask kernels [--check]`.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut check = false;
    for a in args {
        match a.as_str() {
            "--check" => check = true,
            other => bail!("unknown option {other:?} for `kernels` (expected --check)"),
        }
    }
    let tools = ensure_tools()?;
    if std::env::var_os(READY_ENV).is_none() {
        return rerun_with_nvrtc(&tools);
    }
    let root = crate::root();
    let src_dir = root.join("mp-kernels/cuda");
    let out_dir = crate::cargo::target_dir(&root)?.join("ptx-gen");
    if out_dir.exists() {
        std::fs::remove_dir_all(&out_dir)
            .with_context(|| format!("removing {}", out_dir.display()))?;
    }
    std::fs::create_dir_all(&out_dir)?;
    let generated = generate(&tools, &src_dir, &out_dir)?;
    let rows = assemble(&tools, &generated)?;
    print_table(&rows);
    let committed = src_dir.join("ptx");
    if check {
        compare(&out_dir, &committed)?;
        println!(
            "kernels: the committed PTX in {} is up to date ({} files)",
            committed.display(),
            generated.len()
        );
    } else {
        write_committed(&out_dir, &committed)?;
        println!(
            "kernels: wrote {} PTX files to {}",
            generated.len(),
            committed.display()
        );
    }
    Ok(())
}

/// Where the pinned CUDA wheels live, installing them on first use.
pub fn ensure_tools() -> anyhow::Result<PathBuf> {
    let base = match std::env::var_os("MP_CUDA_TOOLS_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let home = std::env::var_os("HOME").context("HOME is not set")?;
            PathBuf::from(home)
                .join(".cache/mp-cuda-tools")
                .join(CUDA_WHEEL_VERSION)
        }
    };
    let cu = base.join("nvidia/cu13");
    let ready = cu.join("bin/ptxas").exists()
        && cu.join("lib/libnvrtc.so.13").exists()
        && cu.join("include/cuda_bf16.h").exists()
        && cu.join("include/crt/mma.h").exists();
    if ready {
        return Ok(cu);
    }
    std::fs::create_dir_all(&base)?;
    let log = base.with_extension("pip.log");
    println!(
        "kernels: installing the CUDA {CUDA_WHEEL_VERSION} wheels (NVRTC, headers, ptxas) into {}",
        base.display()
    );
    let log_file = std::fs::File::create(&log)?;
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--no-cache-dir",
            "--no-deps",
            "--upgrade",
            "--target",
        ])
        .arg(&base)
        .args(
            [
                "nvidia-cuda-nvrtc",
                "nvidia-cuda-runtime",
                "nvidia-cuda-crt",
                "nvidia-cuda-nvcc",
            ]
            .map(|w| format!("{w}=={CUDA_WHEEL_VERSION}")),
        )
        // pip's output goes to a file, never a pipe that may close early.
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .status()
        .context("running python3 -m pip")?;
    if !status.success() {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        bail!("pip install of the CUDA wheels failed:\n{text}");
    }
    // Unused duplicate libraries (110 MB).
    for entry in std::fs::read_dir(cu.join("lib"))? {
        let path = entry?.path();
        if path.to_string_lossy().contains(".alt.so") {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(cu)
}

/// Re-runs this task with the wheel's NVRTC on `LD_LIBRARY_PATH`.
fn rerun_with_nvrtc(tools: &Path) -> anyhow::Result<()> {
    let lib = tools.join("lib");
    let path = match std::env::var_os("LD_LIBRARY_PATH") {
        Some(old) if !old.is_empty() => {
            let mut p = lib.into_os_string();
            p.push(":");
            p.push(old);
            p
        }
        _ => lib.into_os_string(),
    };
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    let status = Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("LD_LIBRARY_PATH", path)
        .env(READY_ENV, "1")
        .status()
        .context("re-running xtask with NVRTC on LD_LIBRARY_PATH")?;
    if !status.success() {
        // The child printed why.
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}

/// One generated PTX file.
struct Generated {
    path: PathBuf,
    source: String,
    arch: &'static str,
}

/// Compiles every source for every architecture (twice, to check that the output is
/// deterministic) into `out_dir`.
fn generate(tools: &Path, src_dir: &Path, out_dir: &Path) -> anyhow::Result<Vec<Generated>> {
    // SAFETY: only probes for the library with dlopen.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        bail!(
            "libnvrtc.so.13 is not loadable (LD_LIBRARY_PATH={:?})",
            std::env::var("LD_LIBRARY_PATH").unwrap_or_default()
        );
    }
    let version = nvrtc::version().map_err(anyhow::Error::msg)?;
    if version != nvrtc::NVRTC_VERSION {
        bail!(
            "NVRTC {}.{} loaded, but the committed PTX is made with NVRTC {}.{}",
            version.0,
            version.1,
            nvrtc::NVRTC_VERSION.0,
            nvrtc::NVRTC_VERSION.1
        );
    }
    let include = vec![
        src_dir.display().to_string(),
        tools.join("include").display().to_string(),
    ];
    let mut out = vec![];
    let mut failures = vec![];
    let sources = nvrtc::sources(src_dir)
        .with_context(|| format!("listing the kernel sources in {}", src_dir.display()))?;
    for stem in &sources {
        let name = format!("{stem}.cu");
        let path = src_dir.join(&name);
        let src = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        for &arch in nvrtc::ARCHS {
            let first = nvrtc::compile(&src, &name, arch, &include);
            let compiled = match first {
                Ok(c) if !c.log.is_empty() => {
                    failures.push(format!("{name} ({arch}) has NVRTC warnings:\n{}", c.log));
                    continue;
                }
                Ok(c) => c,
                Err(e) => {
                    failures.push(e);
                    continue;
                }
            };
            let again = nvrtc::compile(&src, &name, arch, &include).map_err(anyhow::Error::msg)?;
            if again.ptx != compiled.ptx {
                failures.push(format!(
                    "{name} ({arch}): NVRTC output differs between two runs"
                ));
            }
            let file = out_dir.join(format!("{stem}.{arch}.ptx"));
            std::fs::write(&file, &compiled.ptx)?;
            out.push(Generated {
                path: file,
                source: name.clone(),
                arch,
            });
        }
    }
    if !failures.is_empty() {
        bail!("NVRTC failed:\n{}", failures.join("\n"));
    }
    Ok(out)
}

/// One kernel's resources as ptxas reports them.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct KernelRow {
    /// The `.cu` file.
    pub source: String,
    /// `sm_80` or `sm_90`.
    pub sm: String,
    /// The entry point.
    pub function: String,
    /// Registers per thread.
    pub registers: u32,
    /// Bytes of spill stores and loads.
    pub spills: (u32, u32),
    /// Bytes of stack frame.
    pub stack: u32,
    /// Bytes of shared memory.
    pub smem: u32,
}

/// Assembles each PTX for its own architecture; any error or spill fails.
fn assemble(tools: &Path, generated: &[Generated]) -> anyhow::Result<Vec<KernelRow>> {
    let ptxas = tools.join("bin/ptxas");
    let mut rows = vec![];
    let mut failures = vec![];
    for g in generated {
        let sm = g.arch.replace("compute_", "sm_");
        let output = Command::new(&ptxas)
            .arg(format!("-arch={sm}"))
            .args([
                "-v",
                "--warn-on-spills",
                "--warning-as-error",
                "-o",
                "/dev/null",
            ])
            .arg(&g.path)
            .output()
            .with_context(|| format!("running {}", ptxas.display()))?;
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if !output.status.success() {
            failures.push(format!(
                "ptxas failed on {} (from {}):\n{log}",
                g.path.display(),
                g.source
            ));
            continue;
        }
        for mut row in parse_ptxas(&log) {
            if row.spills != (0, 0) {
                failures.push(format!(
                    "{} ({sm}): {} spills {} bytes stored, {} loaded",
                    g.source, row.function, row.spills.0, row.spills.1
                ));
            }
            row.source = g.source.clone();
            rows.push(row);
        }
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("\n"));
    }
    Ok(rows)
}

/// Parses `ptxas -v` output into one row per entry function.
pub fn parse_ptxas(log: &str) -> Vec<KernelRow> {
    let mut rows: Vec<KernelRow> = vec![];
    let number_before = |line: &str, word: &str| -> u32 {
        let words: Vec<&str> = line.split_whitespace().collect();
        words
            .iter()
            .position(|w| w.trim_end_matches(',') == word)
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| words[i].parse().ok())
            .unwrap_or(0)
    };
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let function = rest.split('\'').next().unwrap_or_default().to_string();
            let sm = rest
                .split("for '")
                .nth(1)
                .and_then(|s| s.split('\'').next())
                .unwrap_or_default()
                .to_string();
            rows.push(KernelRow {
                function,
                sm,
                ..KernelRow::default()
            });
        } else if let Some(row) = rows.last_mut() {
            if line.contains("bytes stack frame") {
                row.stack = number_before(line, "bytes");
                let stores = line.split(',').find(|p| p.contains("spill stores"));
                let loads = line.split(',').find(|p| p.contains("spill loads"));
                row.spills = (
                    stores.map_or(0, |p| number_before(p, "bytes")),
                    loads.map_or(0, |p| number_before(p, "bytes")),
                );
            } else if line.contains("Used") && line.contains("registers") {
                row.registers = number_before(line, "registers");
                row.smem = line
                    .split(',')
                    .find(|p| p.contains("bytes smem"))
                    .map_or(0, |p| number_before(p, "bytes"));
            }
        }
    }
    rows
}

fn print_table(rows: &[KernelRow]) {
    println!(
        "| source | arch | kernel | registers | spill st/ld (bytes) | stack | smem |\n|---|---|---|---:|---:|---:|---:|"
    );
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {}/{} | {} | {} |",
            r.source, r.sm, r.function, r.registers, r.spills.0, r.spills.1, r.stack, r.smem
        );
    }
}

/// The `.ptx` files of a folder, by name.
fn ptx_files(dir: &Path) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    let mut files = BTreeMap::new();
    if !dir.exists() {
        return Ok(files);
    }
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "ptx") {
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            files.insert(name, std::fs::read(&path)?);
        }
    }
    Ok(files)
}

/// Fails, naming each file, when the committed PTX differs from the generated PTX.
fn compare(generated: &Path, committed: &Path) -> anyhow::Result<()> {
    let new = ptx_files(generated)?;
    let old = ptx_files(committed)?;
    let mut problems = vec![];
    for (name, text) in &new {
        match old.get(name) {
            None => problems.push(format!("{name} is missing from {}", committed.display())),
            Some(o) if o != text => problems.push(format!("{name} differs")),
            Some(_) => {}
        }
    }
    for name in old.keys().filter(|n| !new.contains_key(*n)) {
        problems.push(format!("{name} is committed but no longer generated"));
    }
    if !problems.is_empty() {
        bail!(
            "the committed PTX is stale; run `cargo xtask kernels` and commit the result:\n  {}",
            problems.join("\n  ")
        );
    }
    Ok(())
}

/// Replaces the committed PTX with the generated files.
fn write_committed(generated: &Path, committed: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(committed)?;
    let new = ptx_files(generated)?;
    for name in ptx_files(committed)?.keys() {
        if !new.contains_key(name) {
            std::fs::remove_file(committed.join(name))?;
        }
    }
    for (name, text) in &new {
        std::fs::write(committed.join(name), text)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_verbose_output() {
        let log = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'bias_grad_bf16' for 'sm_90'
ptxas info    : Function properties for bias_grad_bf16
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 18 registers, used 1 barriers, 4224 bytes smem, 392 bytes cmem[0]
ptxas info    : Compiling entry function 'spilly' for 'sm_90'
ptxas info    : Function properties for spilly
    8 bytes stack frame, 52 bytes spill stores, 36 bytes spill loads
ptxas info    : Used 28 registers, used 0 barriers, 380 bytes cmem[0]
";
        let rows = parse_ptxas(log);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].function, "bias_grad_bf16");
        assert_eq!(rows[0].sm, "sm_90");
        assert_eq!(rows[0].registers, 18);
        assert_eq!(rows[0].smem, 4224);
        assert_eq!(rows[0].spills, (0, 0));
        assert_eq!(rows[1].spills, (52, 36));
        assert_eq!(rows[1].stack, 8);
        assert_eq!(rows[1].smem, 0);
    }

    #[test]
    fn compare_names_each_stale_file() {
        let dir = std::env::temp_dir().join(format!("mp-xtask-ptx-{}", std::process::id()));
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(a.join("x.compute_80.ptx"), "one").unwrap();
        std::fs::write(b.join("x.compute_80.ptx"), "one").unwrap();
        compare(&a, &b).unwrap();
        std::fs::write(b.join("x.compute_80.ptx"), "two").unwrap();
        std::fs::write(b.join("old.compute_90.ptx"), "gone").unwrap();
        std::fs::write(a.join("y.compute_90.ptx"), "new").unwrap();
        let err = compare(&a, &b).unwrap_err().to_string();
        assert!(err.contains("x.compute_80.ptx differs"), "{err}");
        assert!(err.contains("y.compute_90.ptx is missing"), "{err}");
        assert!(err.contains("old.compute_90.ptx is committed"), "{err}");
        write_committed(&a, &b).unwrap();
        compare(&a, &b).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
