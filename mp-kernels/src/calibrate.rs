//! GEMM paths chosen by measurement, once per machine.
//!
//! A CPU flag says what an instruction can run, not how fast: `vdpbf16ps` runs at twice the
//! float32 FMA rate on AMD Zen 4 and at half of it on the Intel Xeons these machines also are. So
//! at first use on a machine [`calibration`] times every GEMM path this CPU can run for each input
//! dtype ([`GemmPath::candidates`], the 512-bit ones only where AVX-512 exists) on one
//! `768 x 1024 x 768` GEMM, in interleaved rounds, keeps the fastest per dtype (the path the
//! instruction set implies unless another beats it by 3%, so noise cannot flip a tie), and
//! measures the
//! float32 FMA and `vdpbf16ps` peaks with short loops — about 0.3 s in all on a 2-core Zen 4.
//!
//! The result is cached in a small text file keyed by the CPU model, its features, the kernel
//! thread count and the mp-kernels version: `$MP_KERNEL_CACHE_DIR` when set, else
//! `$XDG_CACHE_HOME/mp/kernels`, else `~/.cache/mp/kernels` (beside the MNIST cache). Later
//! processes read it (a few microseconds). Every figure read is checked: each peak and rate
//! finite and above 0, each dtype's chosen path one of its measured paths and the one the rule
//! above picks from their rates (`MP_GEMM_PATH` is applied after, and never cached). A file that
//! fails a check (or is malformed, or stale) is measured again and rewritten, with one line on
//! stderr naming the file and what was wrong. A special file at the cache path (a FIFO, a
//! device, a folder) is never opened: the process says so and measures without the cache.
//!
//! Only a *quiet* measurement is cached: the process's threads used between 0.85 and 1.15 kernel
//! threads' worth of CPU time during it (more means other threads of the process, parallel tests
//! say, competed for the cores; less means other processes did), the peaks measured before and
//! after the GEMMs agree within 10%, no GEMM ran faster than its peak, and every chosen path was
//! timed. A disturbed one is used by this process only and measured again next time.
//!
//! `MP_GEMM_PATH` forces paths: `float32=avx512-6x64,bfloat16=avx512-6x64` (dtypes `float32`,
//! `bfloat16`, `float16` or `f32`, `bf16`, `f16`; path names as [`GemmPath::name`] prints them);
//! dtypes it does not name keep their measured path. A malformed value, or a path this CPU cannot
//! run, is an error naming the knob (from [`crate::Cpu::global`] and every op that uses it).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use half::{bf16, f16};
use mp_core::compat::{CpuFeatures, Measured, PathRate};
use mp_core::{DType, Policy};

use crate::error::{Error, Result};
use crate::gemm::{self, Gemm, GemmInput, GemmPath, GemmPaths, MatMut, MatRef};
use crate::isa::Isa;
use crate::{peak, threads};

/// The knob that forces GEMM paths.
pub const PATH_KNOB: &str = "MP_GEMM_PATH";
/// The knob that names the cache folder.
pub const CACHE_KNOB: &str = "MP_KERNEL_CACHE_DIR";

/// The calibration GEMM: `M x N x K`, big enough to reach the steady state of the packed loops,
/// small enough to take a few milliseconds.
const M: usize = 768;
const N: usize = 1024;
const K: usize = 768;
/// Interleaved rounds; each candidate runs [`CALLS`] times per round, the best call counts.
const ROUNDS: usize = 2;
const CALLS: usize = 2;
/// Iterations of the peak loops (about 20 ms each at 3.5 GHz; each runs twice).
const PEAK_ITERS: usize = 6_000_000;

/// Where a calibration came from.
#[derive(Clone, Debug, PartialEq)]
pub enum Origin {
    /// Measured by this process, taking this many seconds.
    Measured {
        /// Wall time of the measurement.
        seconds: f64,
        /// Whether the cores were ours alone meanwhile (only then is it cached).
        quiet: bool,
    },
    /// Read from this cache file.
    Cached(PathBuf),
}

/// What was measured on this machine and which GEMM paths follow from it.
#[derive(Clone, Debug, PartialEq)]
pub struct Calibration {
    /// What the measurement is valid for: CPU model, features, thread count, version.
    pub key: String,
    /// The rates, in the form mp-core's compatibility check reads.
    pub measured: Measured,
    /// The path per dtype: the fastest measured, or what `MP_GEMM_PATH` forces.
    pub chosen: GemmPaths,
    /// The dtypes whose path `MP_GEMM_PATH` forced.
    pub forced: Vec<DType>,
    /// Measured now or read from the cache.
    pub origin: Origin,
}

impl Calibration {
    /// The measured rate of `path` for `dtype` inputs, GFLOP/s.
    pub fn rate(&self, dtype: DType, path: GemmPath) -> Option<f64> {
        self.measured
            .rates
            .iter()
            .find(|r| r.dtype == dtype && r.path == path.name())
            .map(|r| r.gflops)
    }

    /// One line per dtype: every measured rate, the chosen path marked.
    pub fn describe(&self) -> String {
        let mut out = format!(
            "float32 FMA peak {:.1} GFLOP/s",
            self.measured.fma_f32_gflops
        );
        if let Some(dp) = self.measured.dpbf16_gflops {
            let _ = write!(
                out,
                ", vdpbf16ps peak {dp:.1} GFLOP/s ({:.2}x float32)",
                dp / self.measured.fma_f32_gflops
            );
        }
        for d in [DType::F32, DType::BF16, DType::F16] {
            let _ = write!(out, "\n  {d}:");
            for r in self.measured.rates.iter().filter(|r| r.dtype == d) {
                let mark = if r.path == self.chosen.get(d).name() {
                    "*"
                } else {
                    ""
                };
                let _ = write!(out, " {}{mark} {:.1}", r.path, r.gflops);
            }
            if self.forced.contains(&d) {
                let _ = write!(out, " (forced: {})", self.chosen.get(d));
            }
        }
        out
    }
}

/// This machine's calibration: read from the cache, or measured once per process (and cached),
/// with `MP_GEMM_PATH` applied.
///
/// # Errors
/// [`Error::InvalidArgument`] naming `MP_GEMM_PATH` when it is malformed or names a path this CPU
/// cannot run; naming `MP_NUM_THREADS` when the kernel threads cannot be started
/// ([`threads::try_pool`]).
pub fn calibration() -> Result<&'static Calibration> {
    // Measuring needs the kernel threads, and the cache key names their count: a process thread
    // limit that stops them is the error to report (naming MP_NUM_THREADS).
    threads::try_pool()?;
    static CAL: OnceLock<std::result::Result<Calibration, String>> = OnceLock::new();
    CAL.get_or_init(|| {
        let forced = parse_knob(std::env::var(PATH_KNOB).ok().as_deref())?;
        let mut cal = load_or_measure();
        for &(d, p) in &forced {
            cal.chosen.set(d, p);
            cal.forced.push(d);
        }
        Ok(cal)
    })
    .as_ref()
    .map_err(|what| Error::InvalidArgument {
        op: PATH_KNOB,
        what: what.clone(),
    })
}

/// The compatibility check of `policy` on this machine, from what was measured.
///
/// # Errors
/// As [`calibration`].
pub fn check(policy: Policy) -> Result<mp_core::compat::CompatReport> {
    let cal = calibration()?;
    Ok(mp_core::compat::check_with(
        policy,
        &CpuFeatures::detect(),
        &cal.measured,
    ))
}

/// The policy this machine's measurement recommends (the main job's default): see
/// [`mp_core::compat::recommended_policy_for`].
///
/// # Errors
/// As [`calibration`].
pub fn recommended_policy() -> Result<Policy> {
    Ok(mp_core::compat::recommended_policy_for(
        &calibration()?.measured,
    ))
}

/// Parses `MP_GEMM_PATH` (`None` or empty: nothing forced).
fn parse_knob(value: Option<&str>) -> std::result::Result<Vec<(DType, GemmPath)>, String> {
    let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(vec![]);
    };
    let names: Vec<&str> = GemmPath::ALL.iter().map(|p| p.name()).collect();
    let mut out: Vec<(DType, GemmPath)> = vec![];
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((d, p)) = item.split_once('=') else {
            return Err(format!(
                "{PATH_KNOB}={value:?}: {item:?} is not DTYPE=PATH (for example \
                 bfloat16=avx512-6x64)"
            ));
        };
        let dtype = match d.trim() {
            "float32" | "f32" => DType::F32,
            "bfloat16" | "bf16" => DType::BF16,
            "float16" | "f16" => DType::F16,
            other => {
                return Err(format!(
                    "{PATH_KNOB}={value:?}: unknown dtype {other:?} (float32, bfloat16 or \
                     float16)"
                ));
            }
        };
        let path = GemmPath::from_name(p.trim()).ok_or_else(|| {
            format!(
                "{PATH_KNOB}={value:?}: unknown path {:?} (one of {})",
                p.trim(),
                names.join(", ")
            )
        })?;
        if !path.runs_here(dtype) {
            return Err(format!(
                "{PATH_KNOB}={value:?}: path {path} cannot run {dtype} GEMMs on this CPU \
                 (these can: {})",
                GemmPath::candidates(dtype)
                    .iter()
                    .map(|p| p.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if out.iter().any(|(d, _)| *d == dtype) {
            return Err(format!("{PATH_KNOB}={value:?}: {dtype} is given twice"));
        }
        out.push((dtype, path));
    }
    Ok(out)
}

/// The key a measurement is valid for.
fn machine_key() -> String {
    format!(
        "{} | {} | isa {:?} | {} threads | mp-kernels {} | paths {}",
        crate::peak::cpu_model(),
        CpuFeatures::detect().summary(),
        Isa::detect(),
        threads::num_threads(),
        env!("CARGO_PKG_VERSION"),
        // A new path makes older measurements incomplete: measure again.
        GemmPath::ALL.map(GemmPath::name).join(",")
    )
}

/// The cache folder, if any can be named.
fn cache_dir() -> Option<PathBuf> {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = var(CACHE_KNOB) {
        return Some(dir);
    }
    if let Some(xdg) = var("XDG_CACHE_HOME").filter(|p| p.is_absolute()) {
        return Some(xdg.join("mp").join("kernels"));
    }
    var("HOME").map(|h| h.join(".cache").join("mp").join("kernels"))
}

/// The cache file for `key`: one file per key (a hash of it in the name, the key inside).
fn cache_file(key: &str) -> Option<PathBuf> {
    // FNV-1a: stable across Rust versions, unlike `DefaultHasher`.
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    cache_dir().map(|d| d.join(format!("calibration-{hash:016x}.txt")))
}

fn load_or_measure() -> Calibration {
    let key = machine_key();
    let file = cache_file(&key);
    let (cal, note) = load_or_measure_at(file.as_deref(), key);
    if let Some(note) = note {
        eprintln!("mp: {note}");
    }
    cal
}

/// The calibration for `key`: read from the cache `file` when it holds a valid one, else
/// measured (and written there when quiet); and what to tell the user about the file when it
/// could not be used.
fn load_or_measure_at(file: Option<&Path>, key: String) -> (Calibration, Option<String>) {
    let Some(file) = file else {
        return (measure(key), None);
    };
    let note = match read_cache(file) {
        Ok(None) => None,
        Ok(Some(text)) => match parse(&text, &key) {
            Ok(mut cal) => {
                cal.origin = Origin::Cached(file.to_path_buf());
                return (cal, None);
            }
            Err(why) => Some(format!(
                "the GEMM calibration cache {} is not valid: {why}; measuring again",
                file.display()
            )),
        },
        Err(Unusable::Special(kind)) => {
            let note = format!(
                "the GEMM calibration cache {} is {kind}, not a regular file: measuring \
                 without the cache (the file is neither read nor written)",
                file.display()
            );
            return (measure(key), Some(note));
        }
        Err(Unusable::Unreadable(e)) => Some(format!(
            "the GEMM calibration cache {} cannot be read ({e}); measuring again",
            file.display()
        )),
    };
    let cal = measure(key);
    if let Origin::Measured { quiet: true, .. } = cal.origin {
        // Best effort: a read-only or missing home only costs a measurement next time.
        let _ = write_atomic(file, &format(&cal));
    }
    (cal, note)
}

/// Why a cache file cannot be used.
#[derive(Debug)]
enum Unusable {
    /// Not a regular file (what it is: `a FIFO`, `a folder`, ...); never opened.
    Special(&'static str),
    /// Reading it failed, or it is too long or not text.
    Unreadable(String),
}

/// The largest cache file read (a real one is well under 1 KiB).
const MAX_CACHE_BYTES: u64 = 64 * 1024;

/// The text of the cache file `path`: `None` when there is none. A special file is never
/// opened (opening a FIFO for reading blocks until a writer comes); the type is checked again
/// on the opened file.
fn read_cache(path: &Path) -> std::result::Result<Option<String>, Unusable> {
    use std::io::Read as _;
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Unusable::Unreadable(e.to_string())),
    };
    if !meta.is_file() {
        return Err(Unusable::Special(file_kind(&meta.file_type())));
    }
    let file = std::fs::File::open(path).map_err(|e| Unusable::Unreadable(e.to_string()))?;
    let meta = file
        .metadata()
        .map_err(|e| Unusable::Unreadable(e.to_string()))?;
    if !meta.is_file() {
        return Err(Unusable::Special(file_kind(&meta.file_type())));
    }
    let mut bytes = vec![];
    file.take(MAX_CACHE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Unusable::Unreadable(e.to_string()))?;
    if bytes.len() as u64 > MAX_CACHE_BYTES {
        return Err(Unusable::Unreadable(format!(
            "it is longer than {MAX_CACHE_BYTES} bytes"
        )));
    }
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| Unusable::Unreadable("it is not UTF-8 text".into()))
}

/// What a file that is not a regular file is, in words.
fn file_kind(t: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt as _;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_char_device() || t.is_block_device() {
            return "a device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_dir() {
        "a folder"
    } else {
        "a special file"
    }
}

fn write_atomic(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// The cache file's text: `key`, the peaks, one `rate` line per measured path, one `chosen` line
/// per dtype.
fn format(cal: &Calibration) -> String {
    let mut s = String::from("# mp-kernels GEMM calibration (delete to measure again)\n");
    let _ = writeln!(s, "key {}", cal.key);
    let _ = writeln!(s, "fma_f32 {}", cal.measured.fma_f32_gflops);
    if let Some(dp) = cal.measured.dpbf16_gflops {
        let _ = writeln!(s, "dpbf16 {dp}");
    }
    for r in &cal.measured.rates {
        let _ = writeln!(s, "rate {} {} {}", r.dtype, r.path, r.gflops);
    }
    for d in [DType::F32, DType::BF16, DType::F16] {
        let _ = writeln!(s, "chosen {d} {}", cal.chosen.get(d));
    }
    s
}

/// Reads [`format`]'s text back, checking every figure; the error says what is wrong (then it
/// is measured again): a malformed line, another key, a peak or rate that is not finite and
/// above 0, a path this CPU cannot run, or a chosen path that was not measured or is not the one
/// [`choose`] picks from the rates.
fn parse(text: &str, key: &str) -> std::result::Result<Calibration, String> {
    let dtype = |s: &str| {
        DType::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| format!("unknown dtype {s:?}"))
    };
    let path = |s: &str| GemmPath::from_name(s).ok_or_else(|| format!("unknown path {s:?}"));
    let positive = |what: &str, v: &str| match v.parse::<f64>() {
        Ok(g) if g.is_finite() && g > 0.0 => Ok(g),
        Ok(g) => Err(format!("{what} is {g} (it must be finite and above 0)")),
        Err(_) => Err(format!("{what} {v:?} is not a number")),
    };
    let mut got_key = None;
    let mut fma = None;
    let mut dp = None;
    let mut rates: Vec<PathRate> = vec![];
    let mut chosen: Vec<(DType, GemmPath)> = vec![];
    for (n, line) in text.lines().enumerate() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let malformed = |why: String| format!("line {} {line:?}: {why}", n + 1);
        let (tag, rest) = line
            .split_once(' ')
            .ok_or_else(|| malformed("no value".into()))?;
        match tag {
            "key" => got_key = Some(rest),
            "fma_f32" => fma = Some(positive("the float32 FMA peak", rest).map_err(malformed)?),
            "dpbf16" => dp = Some(positive("the vdpbf16ps peak", rest).map_err(malformed)?),
            "rate" => {
                let fields: Vec<&str> = rest.split(' ').collect();
                let &[d, p, g] = fields.as_slice() else {
                    return Err(malformed("not `rate DTYPE PATH GFLOPS`".into()));
                };
                let (d, p) = (dtype(d).map_err(malformed)?, path(p).map_err(malformed)?);
                let g = positive(&format!("the {d} rate of path {p}"), g).map_err(malformed)?;
                if !p.runs_here(d) {
                    return Err(malformed(format!(
                        "path {p} cannot run {d} GEMMs on this CPU"
                    )));
                }
                if rates.iter().any(|r| r.dtype == d && r.path == p.name()) {
                    return Err(malformed(format!("{d} path {p} is measured twice")));
                }
                rates.push(PathRate {
                    dtype: d,
                    path: p.name(),
                    gflops: g,
                });
            }
            "chosen" => {
                let (d, p) = rest
                    .split_once(' ')
                    .ok_or_else(|| malformed("not `chosen DTYPE PATH`".into()))?;
                let (d, p) = (dtype(d).map_err(malformed)?, path(p).map_err(malformed)?);
                if chosen.iter().any(|(c, _)| *c == d) {
                    return Err(malformed(format!("the {d} path is chosen twice")));
                }
                chosen.push((d, p));
            }
            other => return Err(malformed(format!("unknown entry {other:?}"))),
        }
    }
    match got_key {
        None => return Err("it has no key".into()),
        Some(k) if k != key => {
            return Err(format!(
                "it is for another machine or version (key {k:?}, this one {key:?})"
            ));
        }
        Some(_) => {}
    }
    let fma = fma.ok_or("it has no float32 FMA peak (fma_f32)")?;
    let mut paths = GemmPaths::default_for(Isa::Scalar);
    for d in [DType::F32, DType::BF16, DType::F16] {
        let &(_, p) = chosen
            .iter()
            .find(|(c, _)| *c == d)
            .ok_or_else(|| format!("it chooses no {d} path"))?;
        let measured: Vec<(GemmPath, f64)> = rates
            .iter()
            .filter(|r| r.dtype == d)
            .filter_map(|r| Some((GemmPath::from_name(r.path)?, r.gflops)))
            .collect();
        let Some(&(_, rate)) = measured.iter().find(|(m, _)| *m == p) else {
            let names: Vec<&str> = measured.iter().map(|(m, _)| m.name()).collect();
            return Err(format!(
                "the chosen {d} path {p} was not measured (measured: {})",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            ));
        };
        let pick = choose(d, &measured);
        if pick != p {
            let best = measured
                .iter()
                .find(|(m, _)| *m == pick)
                .map_or(0.0, |(_, g)| *g);
            return Err(if rate < best {
                format!(
                    "the chosen {d} path {p} ({rate} GFLOP/s) is not the fastest measured: \
                     {pick} ({best} GFLOP/s)"
                )
            } else {
                format!(
                    "the chosen {d} path {p} ({rate} GFLOP/s) is not the one its rates pick: \
                     {pick} ({best} GFLOP/s) is within {}% and the instruction set's default",
                    MARGIN * 100.0
                )
            });
        }
        paths.set(d, p);
    }
    Ok(Calibration {
        key: key.to_string(),
        measured: Measured {
            fma_f32_gflops: fma,
            dpbf16_gflops: dp,
            rates,
            chosen: [DType::F32, DType::BF16, DType::F16].map(|d| (d, paths.get(d).name())),
        },
        chosen: paths,
        forced: vec![],
        origin: Origin::Measured {
            seconds: 0.0,
            quiet: true,
        },
    })
}

/// Measures every candidate path of every dtype on this machine (no cache, no knob).
pub fn measure_now() -> Calibration {
    measure(machine_key())
}

fn measure(key: String) -> Calibration {
    let start = Instant::now();
    let cpu0 = crate::cpu_time::process_cpu_secs();
    // The peaks before and after the GEMMs: a quiet machine gives the same figures twice.
    let fma0 = peak::fma_f32_peak_gflops_with(PEAK_ITERS);
    let dp0 = peak::dpbf16_peak_gflops_with(PEAK_ITERS);
    let mut rates: Vec<PathRate> = vec![];
    let mut chosen = GemmPaths::default_for(Isa::detect());
    let f32_rates = time_paths::<f32>();
    let bf16_rates = time_paths::<bf16>();
    let f16_rates = time_paths::<f16>();
    for (d, list) in [
        (DType::F32, f32_rates),
        (DType::BF16, bf16_rates),
        (DType::F16, f16_rates),
    ] {
        chosen.set(d, choose(d, &list));
        rates.extend(list.into_iter().map(|(p, g)| PathRate {
            dtype: d,
            path: p.name(),
            gflops: g,
        }));
    }
    let fma1 = peak::fma_f32_peak_gflops_with(PEAK_ITERS);
    let dp1 = peak::dpbf16_peak_gflops_with(PEAK_ITERS);
    let (fma, dp) = (fma0.max(fma1), dp0.zip(dp1).map(|(a, b)| a.max(b)));
    let steady = |a: f64, b: f64| a.min(b) >= 0.9 * a.max(b);
    let below = |d: DType, peak: f64| {
        rates
            .iter()
            .filter(|r| r.dtype == d && (d != DType::BF16 || r.path != "avx512bf16-dot"))
            .all(|r| r.gflops <= 1.05 * peak)
    };
    // A path whose GEMM failed has no rate (see `time_paths`): a dtype left without a rate for
    // its path is not cached, for the cache's check would refuse it.
    let chosen_measured = [DType::F32, DType::BF16, DType::F16].iter().all(|&d| {
        rates
            .iter()
            .any(|r| r.dtype == d && r.path == chosen.get(d).name())
    });
    let consistent = chosen_measured
        && steady(fma0, fma1)
        && dp0.zip(dp1).is_none_or(|(a, b)| steady(a, b))
        && below(DType::F32, fma)
        && rates
            .iter()
            .filter(|r| r.path == "avx512bf16-dot")
            .all(|r| dp.is_some_and(|dp| r.gflops <= 1.05 * dp));
    Calibration {
        key,
        measured: Measured {
            fma_f32_gflops: fma,
            dpbf16_gflops: dp,
            rates,
            chosen: [DType::F32, DType::BF16, DType::F16].map(|d| (d, chosen.get(d).name())),
        },
        chosen,
        forced: vec![],
        origin: {
            let seconds = start.elapsed().as_secs_f64();
            let share = cpu0
                .zip(crate::cpu_time::process_cpu_secs())
                .map(|(c0, c1)| (c1 - c0) / (seconds * threads::num_threads() as f64));
            Origin::Measured {
                seconds,
                // Without a CPU-time source, trust the share.
                quiet: consistent && share.is_none_or(|s| (0.85..=1.15).contains(&s)),
            }
        },
    }
}

/// The path to keep for `dtype` from its measured rates: the fastest, unless the path the
/// instruction set implies is within [`MARGIN`] of it (timing noise must not flip a choice
/// between two paths that run at the same speed).
fn choose(dtype: DType, rates: &[(GemmPath, f64)]) -> GemmPath {
    let default = GemmPath::default_for(Isa::detect(), dtype);
    let Some(&(best, top)) = rates.iter().max_by(|a, b| a.1.total_cmp(&b.1)) else {
        return default;
    };
    match rates.iter().find(|(p, _)| *p == default) {
        Some(&(_, r)) if r >= top * (1.0 - MARGIN) => default,
        _ => best,
    }
}

/// How much faster than the default path another path must measure to be chosen.
const MARGIN: f64 = 0.03;

/// The paths worth timing for `T` here: the 512-bit ones where AVX-512 exists (AVX2 and the
/// portable path are the fallbacks of CPUs without it), else the best one below.
fn timed_candidates(dtype: DType) -> Vec<GemmPath> {
    let all = GemmPath::candidates(dtype);
    let wide: Vec<GemmPath> = all
        .iter()
        .copied()
        .filter(|p| p.isa() >= Isa::Avx512)
        .collect();
    if !wide.is_empty() {
        return wide;
    }
    all.last().copied().into_iter().collect()
}

/// Times each candidate path for `T` inputs (float32 output), interleaved: the best call of all
/// rounds per path, GFLOP/s (a single candidate is timed too: the compatibility check compares
/// the dtypes' rates). Only finite rates above 0 are returned.
fn time_paths<T: GemmInput>() -> Vec<(GemmPath, f64)> {
    let paths = timed_candidates(T::DTYPE);
    // Values in [-1, 1), exact in every dtype: no subnormals, no rounding effects.
    let fill = |n: usize, seed: usize| -> Vec<T> {
        (0..n)
            .map(|i| T::from_f32(((i * 37 + seed) % 64) as f32 / 32.0 - 1.0))
            .collect()
    };
    let (a, b) = (fill(M * K, 1), fill(K * N, 7));
    let mut c = vec![0.0f32; M * N];
    let mut best = vec![f64::INFINITY; paths.len()];
    let run = |path: GemmPath, c: &mut [f32]| {
        let t = Instant::now();
        // The shapes are fixed and the path was checked, so this cannot fail; a failure would
        // only make the path look slow.
        let ok = gemm::gemm_views(
            path,
            MatRef::new(&a, M, K),
            MatRef::new(&b, K, N),
            MatMut::new(c, M, N),
            Gemm::new(),
        )
        .is_ok();
        if ok {
            t.elapsed().as_secs_f64()
        } else {
            f64::INFINITY
        }
    };
    for &p in &paths {
        run(p, &mut c); // warm-up: pack buffers, clocks
    }
    for _ in 0..ROUNDS {
        for (i, &p) in paths.iter().enumerate() {
            for _ in 0..CALLS {
                best[i] = best[i].min(run(p, &mut c));
            }
        }
    }
    let flop = 2.0 * (M * N * K) as f64;
    // A path whose GEMM failed (infinite time) is left out rather than given a rate of 0.
    paths
        .into_iter()
        .zip(best)
        .map(|(p, s)| (p, flop / s / 1e9))
        .filter(|(_, g)| g.is_finite() && *g > 0.0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_must_beat_the_default_by_the_margin() {
        let d = GemmPath::default_for(Isa::detect(), DType::F32);
        let other = GemmPath::Scalar;
        assert_eq!(choose(DType::F32, &[(d, 100.0), (other, 102.0)]), d);
        if d != other {
            assert_eq!(choose(DType::F32, &[(d, 100.0), (other, 104.0)]), other);
        }
        assert_eq!(choose(DType::F32, &[(other, 5.0)]), other);
        assert_eq!(choose(DType::F32, &[]), d);
    }

    #[test]
    fn knob_parses_and_refuses_by_name() {
        assert_eq!(parse_knob(None), Ok(vec![]));
        assert_eq!(parse_knob(Some("  ")), Ok(vec![]));
        assert_eq!(
            parse_knob(Some("f32=scalar, bfloat16=scalar")),
            Ok(vec![
                (DType::F32, GemmPath::Scalar),
                (DType::BF16, GemmPath::Scalar)
            ])
        );
        for (bad, says) in [
            ("bf16", "is not DTYPE=PATH"),
            ("int8=scalar", "unknown dtype \"int8\""),
            ("f32=fast", "unknown path \"fast\""),
            ("f32=avx512bf16-dot", "cannot run float32"),
            ("f16=scalar,float16=scalar", "float16 is given twice"),
        ] {
            let e = parse_knob(Some(bad)).unwrap_err();
            assert!(e.contains(PATH_KNOB) && e.contains(says), "{bad}: {e}");
        }
    }

    /// A valid calibration of this CPU's candidate paths: rates 10.25, 20.25, ... in
    /// [`GemmPath::ALL`] order, each dtype's chosen path the one [`choose`] picks.
    fn sample(key: &str) -> Calibration {
        let mut rates = vec![];
        let mut chosen = GemmPaths::default_for(Isa::Scalar);
        for d in [DType::F32, DType::BF16, DType::F16] {
            let list: Vec<(GemmPath, f64)> = GemmPath::candidates(d)
                .into_iter()
                .enumerate()
                .map(|(i, p)| (p, 10.0 * (i + 1) as f64 + 0.25))
                .collect();
            chosen.set(d, choose(d, &list));
            rates.extend(list.iter().map(|&(p, g)| PathRate {
                dtype: d,
                path: p.name(),
                gflops: g,
            }));
        }
        Calibration {
            key: key.into(),
            measured: Measured {
                fma_f32_gflops: 232.5,
                dpbf16_gflops: Some(463.0),
                rates,
                chosen: [DType::F32, DType::BF16, DType::F16].map(|d| (d, chosen.get(d).name())),
            },
            chosen,
            forced: vec![],
            origin: Origin::Measured {
                seconds: 0.0,
                quiet: true,
            },
        }
    }

    /// `cal` with the chosen path of `dtype` set to `path` (what a tampered file says).
    fn choosing(mut cal: Calibration, dtype: DType, path: GemmPath) -> Calibration {
        cal.chosen.set(dtype, path);
        cal.measured.chosen =
            [DType::F32, DType::BF16, DType::F16].map(|d| (d, cal.chosen.get(d).name()));
        cal
    }

    #[test]
    fn cache_text_round_trips_and_refuses_other_keys() {
        let cal = sample("cpu | flags");
        let text = format(&cal);
        assert_eq!(parse(&text, "cpu | flags"), Ok(cal));
        for (bad, key, says) in [
            (
                text.clone(),
                "another cpu",
                "is for another machine or version",
            ),
            (
                text.replace("232.5", "x"),
                "cpu | flags",
                "\"x\" is not a number",
            ),
            (
                text.replace("chosen", "chose"),
                "cpu | flags",
                "unknown entry \"chose\"",
            ),
            (
                text.replace("fma_f32 232.5", "fma_f32 0"),
                "cpu | flags",
                "peak is 0",
            ),
            (
                text.replace("dpbf16 463", "dpbf16 NaN"),
                "cpu | flags",
                "peak is NaN",
            ),
            (String::new(), "cpu | flags", "it has no key"),
        ] {
            let e = parse(&bad, key).unwrap_err();
            assert!(e.contains(says), "{says:?} missing from {e:?}");
        }
    }

    #[test]
    fn a_rate_that_is_not_finite_and_positive_is_refused_by_path() {
        for bad in [f64::NAN, f64::INFINITY, -3.0, 0.0] {
            let mut cal = sample("k");
            let chosen = cal.chosen.bf16;
            let r = cal
                .measured
                .rates
                .iter_mut()
                .find(|r| r.dtype == DType::BF16 && r.path == chosen.name())
                .unwrap();
            r.gflops = bad;
            let e = parse(&format(&cal), "k").unwrap_err();
            let says = format!("the bfloat16 rate of path {chosen} is {bad} (it must be finite");
            assert!(e.contains(&says), "{says:?} missing from {e:?}");
        }
    }

    #[test]
    fn a_chosen_path_that_was_not_measured_is_refused() {
        // The sweep's file: bfloat16's chosen path has no rate, so the compatibility check
        // would compare a rate that does not exist.
        let mut cal = sample("k");
        let chosen = cal.chosen.bf16;
        cal.measured
            .rates
            .retain(|r| !(r.dtype == DType::BF16 && r.path == chosen.name()));
        let e = parse(&format(&cal), "k").unwrap_err();
        assert!(
            e.contains(&format!(
                "the chosen bfloat16 path {chosen} was not measured"
            )),
            "{e}"
        );
        // Every chosen path scalar, only the other paths measured.
        let mut cal = sample("k");
        cal.measured.rates.retain(|r| r.path != "scalar");
        let cal = [DType::F32, DType::BF16, DType::F16]
            .into_iter()
            .fold(cal, |c, d| choosing(c, d, GemmPath::Scalar));
        let e = parse(&format(&cal), "k").unwrap_err();
        assert!(
            e.contains("the chosen float32 path scalar was not measured"),
            "{e}"
        );
    }

    #[test]
    fn a_chosen_path_that_is_not_the_fastest_is_refused() {
        let cal = sample("k");
        let candidates = GemmPath::candidates(DType::F32);
        if candidates.len() < 2 {
            eprintln!("skipped: this CPU runs a single float32 GEMM path ({candidates:?})");
            return;
        }
        // Scalar measured slowest (10.25) but chosen.
        let e = parse(&format(&choosing(cal, DType::F32, GemmPath::Scalar)), "k").unwrap_err();
        assert!(
            e.contains("the chosen float32 path scalar (10.25 GFLOP/s) is not the fastest"),
            "{e}"
        );
        // A path 2% faster than the instruction set's default is not picked (the margin), so
        // a file that chose it is refused too.
        let default = GemmPath::default_for(Isa::detect(), DType::F32);
        let other = *candidates.iter().find(|&&p| p != default).unwrap();
        let mut cal = sample("k");
        cal.measured.rates.retain(|r| r.dtype != DType::F32);
        for (p, g) in [(default, 100.0), (other, 102.0)] {
            cal.measured.rates.push(PathRate {
                dtype: DType::F32,
                path: p.name(),
                gflops: g,
            });
        }
        let e = parse(&format(&choosing(cal, DType::F32, other)), "k").unwrap_err();
        assert!(
            e.contains(&format!(
                "the chosen float32 path {other} (102 GFLOP/s) is not the one its rates pick: \
                 {default} (100 GFLOP/s) is within 3%"
            )),
            "{e}"
        );
    }

    /// A fresh folder under the system's temporary folder, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!(
                "mp-kernels-calibrate-{name}-{}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// `f()` on another thread; if it has not returned after a minute (it blocks), `unblock()`
    /// releases it and the test fails.
    fn without_blocking<R: Send + 'static>(
        f: impl FnOnce() -> R + Send + 'static,
        unblock: impl FnOnce(),
    ) -> R {
        let (tx, rx) = std::sync::mpsc::channel();
        let worker = std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        match rx.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(r) => {
                worker.join().unwrap();
                r
            }
            Err(_) => {
                unblock();
                panic!("blocked on a special file");
            }
        }
    }

    #[test]
    fn a_special_file_at_the_cache_path_is_never_opened() {
        let dir = TempDir::new("special");
        // A folder.
        let folder = dir.0.join("folder.txt");
        std::fs::create_dir(&folder).unwrap();
        assert!(matches!(
            read_cache(&folder),
            Err(Unusable::Special("a folder"))
        ));
        // A FIFO: opening it for reading would block until a writer comes.
        let fifo = dir.0.join("calibration.txt");
        match std::process::Command::new("mkfifo").arg(&fifo).status() {
            Ok(s) if s.success() => {}
            other => {
                eprintln!("skipped the FIFO case: mkfifo failed ({other:?})");
                return;
            }
        }
        let release = || {
            let _ = std::fs::OpenOptions::new().write(true).open(&fifo);
        };
        let f = fifo.clone();
        let read = without_blocking(move || format!("{:?}", read_cache(&f)), release);
        assert_eq!(read, "Err(Special(\"a FIFO\"))");
        // The whole load: measured without the cache, said once, the FIFO left in place.
        let (f, key) = (fifo.clone(), machine_key());
        let (cal, note) = without_blocking(move || load_or_measure_at(Some(&f), key), release);
        assert!(
            matches!(cal.origin, Origin::Measured { .. }),
            "{:?}",
            cal.origin
        );
        let note = note.unwrap();
        let says = format!("the GEMM calibration cache {} is a FIFO", fifo.display());
        assert!(note.contains(&says), "{says:?} missing from {note:?}");
        assert!(note.contains("measuring without the cache"), "{note}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileTypeExt as _;
            assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
        }
    }

    #[test]
    fn an_invalid_cache_is_measured_again_and_the_reason_named() {
        let dir = TempDir::new("invalid");
        let file = dir.0.join("calibration.txt");
        let key = machine_key();
        let mut cal = sample(&key);
        cal.measured.rates[0].gflops = f64::NAN;
        let bad = cal.measured.rates[0].clone();
        std::fs::write(&file, format(&cal)).unwrap();
        let (cal, note) = load_or_measure_at(Some(&file), key.clone());
        let note = note.unwrap();
        for part in [
            format!("the GEMM calibration cache {} is not valid", file.display()),
            format!("the {} rate of path {} is NaN", bad.dtype, bad.path),
            "measuring again".to_string(),
        ] {
            assert!(note.contains(&part), "{part:?} missing from {note:?}");
        }
        let Origin::Measured { quiet, .. } = cal.origin else {
            panic!("{:?}", cal.origin);
        };
        // A quiet measurement replaced the file; the next process reads it back as it is.
        if quiet {
            let (again, note) = load_or_measure_at(Some(&file), key);
            assert_eq!(note, None);
            assert_eq!(again.origin, Origin::Cached(file.clone()));
            assert_eq!(again.measured, cal.measured);
        }
    }
}
