//! Turns the measuring binary's JSON into the report: a markdown table on stdout,
//! `target/bench/report.json`, `target/bench/report.svg`, and `BENCHMARKS.md` (full runs only).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};

/// What the report is built from.
#[derive(Debug, Default)]
pub struct Inputs {
    /// `target/bench/gemm.json`, if that group ran.
    pub gemm: Option<Value>,
    /// `target/bench/train.json`, if that group ran.
    pub train: Option<Value>,
    /// `target/bench/cnn.json`, if that group ran (its section comes written, in `markdown`).
    pub cnn: Option<Value>,
    /// `target/bench/vit.json`, if that group ran (its section comes written, in `markdown`).
    pub vit: Option<Value>,
    /// `target/bench/dp.json`, if that group ran (its section comes written, in `markdown`).
    pub dp: Option<Value>,
}

/// Reads whatever JSON the groups that ran wrote.
pub fn read_inputs(dir: &Path, groups: &[String]) -> Result<Inputs> {
    let read = |name: &str| -> Result<Option<Value>> {
        if !groups.iter().any(|g| g == name) {
            return Ok(None);
        }
        let path = dir.join(format!("{name}.json"));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(Some(
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?,
        ))
    };
    Ok(Inputs {
        gemm: read("gemm")?,
        train: read("train")?,
        cnn: read("cnn")?,
        vit: read("vit")?,
        dp: read("dp")?,
    })
}

/// The records of the training report, each with a `flag` when a policy is slower than float32.
pub fn train_records(train: &Value) -> Vec<Value> {
    let mut out = vec![];
    for r in train["records"].as_array().into_iter().flatten() {
        let mut r = r.clone();
        let speedup = r["speedup_vs_float32"].as_f64().unwrap_or(1.0);
        if speedup < 1.0 {
            let reason = r["compat_reason"].as_str().unwrap_or("").to_string();
            r["flag"] = json!(format!(
                "slower than float32 on this machine ({:.2}x); {}",
                speedup,
                if reason.is_empty() {
                    "no reason recorded".to_string()
                } else {
                    reason
                }
            ));
        }
        out.push(r);
    }
    out
}

/// The markdown report.
pub fn markdown(inputs: &Inputs) -> String {
    let mut s = String::new();
    if let Some(train) = &inputs.train {
        let m = &train["machine"];
        let _ = writeln!(
            s,
            "Machine: {} — {} threads; measured float32 FMA peak {:.1} GFLOP/s, vdpbf16ps peak {}, memory bandwidth {:.1} GB/s\n",
            m["cpu"].as_str().unwrap_or("?"),
            m["threads"],
            m["fma_f32_peak_gflops"].as_f64().unwrap_or(0.0),
            m["dpbf16_peak_gflops"]
                .as_f64()
                .map_or("n/a".to_string(), |v| format!("{v:.1} GFLOP/s")),
            m["memory_bandwidth_gbps"].as_f64().unwrap_or(0.0),
        );
        s.push_str(&calibration_section(&train["calibration"]));
        if let Some(p) = train["recommended_policy"].as_str() {
            let _ = writeln!(
                s,
                "Recommended policy (from the measurement, the main job's default): `{p}`.\n"
            );
        }
        let _ = writeln!(
            s,
            "## Training the guide's model ({} units, RMSprop), median of {} interleaved rounds\n",
            train["model"]["units"], train["rounds"]
        );
        s.push_str("| policy | GEMM path | batch | ms/step | min | max | samples/s | vs float32 | of peak | vs float32, of medians | of median peak | peak tensor MiB | activation MiB | largest batch in budget |\n");
        s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
        let records = train_records(train);
        for r in &records {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.0} | {:.2}x | {:.1}% | {:.2}x | {:.1}% | {:.1} | {:.1} | {} |",
                r["variant"].as_str().unwrap_or("?"),
                r["gemm_path"].as_str().unwrap_or("?"),
                r["batch"],
                r["ms_per_step"].as_f64().unwrap_or(0.0),
                r["min_ms_per_step"].as_f64().unwrap_or(0.0),
                r["max_ms_per_step"].as_f64().unwrap_or(0.0),
                r["samples_per_s"].as_f64().unwrap_or(0.0),
                r["speedup_vs_float32"].as_f64().unwrap_or(0.0),
                100.0 * r["fraction_of_peak"].as_f64().unwrap_or(0.0),
                r["speedup_of_medians"].as_f64().unwrap_or(0.0),
                100.0 * r["fraction_of_median_peak"].as_f64().unwrap_or(0.0),
                mib(&r["peak_tensor_bytes"]),
                mib(&r["activation_bytes"]),
                r["max_batch_in_budget"],
            );
        }
        let flags: Vec<&Value> = records.iter().filter(|r| r.get("flag").is_some()).collect();
        if !flags.is_empty() {
            s.push_str("\nFlagged:\n");
            for r in flags {
                let _ = writeln!(
                    s,
                    "- {} at batch {}: {}",
                    r["variant"].as_str().unwrap_or("?"),
                    r["batch"],
                    r["flag"].as_str().unwrap_or("")
                );
            }
        }
        let _ = writeln!(
            s,
            "\nFLOP per step counted as 6 × batch × weights; \"of peak\" is against the peak of the GEMM path the policy's compute dtype uses: the vdpbf16ps peak for the bfloat16 dot-product path, else the float32 FMA peak. \"vs float32\" and \"of peak\" pair measurements taken seconds apart, so that a shared machine whose speed drifts moves them least: \"of peak\" is the median over steps of each step's GFLOP/s against that peak measured right before and right after the step, \"vs float32\" the median over rounds of float32's step time over this policy's in the same round. The two columns after them are the plain ratios of the medians (ms/step against the median of all peak samples). Activation MiB = peak tensor bytes during a step minus the bytes held before it (weights, 16-bit weight copies, gradients, optimizer state); the budget is {:.0} GiB.",
            train["budget_bytes"].as_f64().unwrap_or(0.0) / (1u64 << 30) as f64
        );
    }
    if let Some(gemm) = &inputs.gemm {
        if inputs.train.is_none() {
            s.push_str(&calibration_section(&gemm["calibration"]));
        }
        s.push_str("\n## GEMM (square, all cores)\n\nThe peak of bfloat16 is the faster of its two paths' peaks (vdpbf16ps, float32 FMA), whichever path runs. As for training, \"of peak\" is the median over rounds of each timing's GFLOP/s against that peak measured right before and right after it, and \"vs float32\" the median over rounds of the ratio within the round; \"peak\" is the median of the peaks measured once per round, and the columns after each are the plain ratios of the medians.\n\n| dtype | path | n | GFLOP/s (median) | min | max | peak | of peak | of median peak | vs float32 | vs float32, of medians |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
        let times = |x: &Value| x.as_f64().map_or("-".to_string(), |x| format!("{x:.2}x"));
        for r in gemm_records(gemm) {
            let g = r["gflops"].as_f64().unwrap_or(0.0);
            let p = r["peak_gflops"].as_f64().unwrap_or(0.0);
            let of_median = if p > 0.0 { g / p } else { 0.0 };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1}% | {:.1}% | {} | {} |",
                r["dtype"].as_str().unwrap_or("?"),
                r["path"].as_str().unwrap_or("?"),
                r["n"],
                g,
                r["min_gflops"].as_f64().unwrap_or(0.0),
                r["max_gflops"].as_f64().unwrap_or(0.0),
                p,
                100.0 * r["fraction_of_peak"].as_f64().unwrap_or(of_median),
                100.0 * of_median,
                times(&r["ratio_to_float32"]),
                times(&r["ratio_of_medians_to_float32"]),
            );
        }
        if let Some(micro) = gemm["microkernel"].as_array().filter(|m| !m.is_empty()) {
            s.push_str("\n## GEMM microkernels alone (one thread)\n\nEach path's microkernel on one tile, its operands packed once and kept in cache (depth 128: a 64-wide B panel of 32 KiB, in L1; depth 768: in L2), against one thread's share of the peak: the ceiling of every GEMM on the path on this CPU.\n\n| path | dtype | depth | GFLOP/s | peak per thread | of peak |\n|---|---|---|---|---|---|\n");
            for r in micro {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {:.1} | {:.1} | {:.1}% |",
                    r["path"].as_str().unwrap_or("?"),
                    r["dtype"].as_str().unwrap_or("?"),
                    r["depth"],
                    r["gflops"].as_f64().unwrap_or(0.0),
                    r["peak_per_thread_gflops"].as_f64().unwrap_or(0.0),
                    100.0 * r["fraction_of_peak"].as_f64().unwrap_or(0.0),
                );
            }
        }
    }
    for section in [&inputs.cnn, &inputs.vit, &inputs.dp] {
        if let Some(md) = section.as_ref().and_then(|c| c["markdown"].as_str()) {
            s.push('\n');
            s.push_str(md);
        }
    }
    s
}

/// The calibration: the GEMM path chosen per dtype and every rate measured to choose it.
fn calibration_section(cal: &Value) -> String {
    let mut s = String::new();
    let Some(rates) = cal["rates"].as_array() else {
        return s;
    };
    let _ = writeln!(
        s,
        "## GEMM paths chosen by measurement\n\nCalibration ({}): float32 FMA peak {:.1} GFLOP/s, vdpbf16ps peak {}; {}.\n\n| dtype | path | GFLOP/s (768 x 1024 x 768) | chosen |\n|---|---|---|---|",
        match cal["measured_seconds"].as_f64() {
            Some(secs) => format!("measured in {secs:.2} s by this run"),
            None => "read from this machine's cache".to_string(),
        },
        cal["fma_f32_gflops"].as_f64().unwrap_or(0.0),
        cal["dpbf16_gflops"]
            .as_f64()
            .map_or("n/a".to_string(), |v| format!("{v:.1} GFLOP/s")),
        match cal["forced"].as_array() {
            Some(f) if !f.is_empty() => format!("forced by MP_GEMM_PATH: {f:?}"),
            _ => "nothing forced".to_string(),
        }
    );
    for r in rates {
        let (d, p) = (
            r["dtype"].as_str().unwrap_or("?"),
            r["path"].as_str().unwrap_or("?"),
        );
        let chosen = cal["chosen"][d].as_str() == Some(p);
        let _ = writeln!(
            s,
            "| {d} | {p} | {:.1} | {} |",
            r["gflops"].as_f64().unwrap_or(0.0),
            if chosen { "yes" } else { "" }
        );
    }
    s.push('\n');
    s
}

/// The per-dtype-and-size records of a GEMM report.
fn gemm_records(gemm: &Value) -> impl Iterator<Item = &Value> {
    gemm["results"]
        .as_array()
        .or_else(|| gemm["records"].as_array())
        .into_iter()
        .flatten()
}

fn mib(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0) / (1u64 << 20) as f64
}

/// An SVG bar chart of samples/s per policy, one group per batch size, speedups marked.
pub fn svg(train: &Value) -> String {
    let records = train_records(train);
    let (w, h, left, top, bottom) = (760.0, 360.0, 70.0, 40.0, 70.0);
    let max = records
        .iter()
        .filter_map(|r| r["samples_per_s"].as_f64())
        .fold(1.0, f64::max);
    let n = records.len().max(1) as f64;
    let slot = (w - left - 20.0) / n;
    let colors = ["#4e79a7", "#59a14f", "#e15759", "#f28e2b"];
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">
<text x="{}" y="20" text-anchor="middle" font-size="14">Training throughput of the guide's model (samples/s, higher is better)</text>
<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/>
"#,
        w / 2.0,
        h - bottom,
        w - 20.0,
        h - bottom
    );
    for (i, r) in records.iter().enumerate() {
        let v = r["samples_per_s"].as_f64().unwrap_or(0.0);
        let bh = (h - top - bottom) * v / max;
        let x = left + i as f64 * slot + slot * 0.15;
        let y = h - bottom - bh;
        let color = colors[i % colors.len()];
        let _ = write!(
            s,
            r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{bh:.1}" fill="{color}"/>
<text x="{:.1}" y="{:.1}" text-anchor="middle">{:.0}/s ({:.2}x)</text>
<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>
<text x="{:.1}" y="{:.1}" text-anchor="middle">batch {}</text>
"#,
            slot * 0.7,
            x + slot * 0.35,
            y - 4.0,
            v,
            r["speedup_vs_float32"].as_f64().unwrap_or(0.0),
            x + slot * 0.35,
            h - bottom + 14.0,
            xml(r["variant"].as_str().unwrap_or("?")),
            x + slot * 0.35,
            h - bottom + 28.0,
            r["batch"],
        );
    }
    s.push_str("</svg>\n");
    s
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Writes report.json, report.svg and, for a `full` run (every group, not `--quick`),
/// BENCHMARKS.md; prints the markdown. A run of some groups leaves BENCHMARKS.md as it is, so
/// that it always holds one whole run.
pub fn write(
    root: &Path,
    dir: &Path,
    inputs: &Inputs,
    command: &str,
    quick: bool,
    full: bool,
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let md = markdown(inputs);
    println!("{md}");
    let records = inputs.train.as_ref().map(train_records).unwrap_or_default();
    let report = json!({
        "command": command,
        "quick": quick,
        "records": records,
        "gemm": inputs.gemm.as_ref().map(|g| gemm_records(g).cloned().collect::<Vec<_>>()),
        "machine": inputs.train.as_ref().map(|t| t["machine"].clone()),
    });
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    if let Some(train) = &inputs.train {
        std::fs::write(dir.join("report.svg"), svg(train))?;
    }
    if full {
        let commit = std::process::Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .current_dir(root)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let machine = inputs
            .train
            .as_ref()
            .and_then(|t| t["machine"]["cpu"].as_str().map(String::from))
            .or_else(|| {
                inputs
                    .gemm
                    .as_ref()
                    .and_then(|g| g["machine"]["description"].as_str().map(String::from))
            })
            .unwrap_or_else(|| "unknown".into());
        let doc = format!(
            "# Benchmarks\n\nWritten by `{command}` (never edited by hand) at commit `{commit}` on {} UTC.\nMachine: {machine}.\n\n{md}",
            utc_date_time()
        );
        std::fs::write(root.join("BENCHMARKS.md"), doc)?;
    }
    eprintln!(
        "wrote {}{}",
        dir.join("report.json").display(),
        if full { " and BENCHMARKS.md" } else { "" }
    );
    Ok(())
}

/// The current UTC date and time, `YYYY-MM-DD HH:MM` (civil-from-days, no date crate).
fn utc_date_time() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Value {
        json!({
            "machine": {"cpu": "test cpu", "threads": 2, "fma_f32_peak_gflops": 200.0,
                        "dpbf16_peak_gflops": 400.0, "memory_bandwidth_gbps": 30.0},
            "model": {"units": 8}, "rounds": 5, "budget_bytes": 1u64 << 30,
            "records": [
                {"policy": "float32", "variant": "float32", "batch": 64, "ms_per_step": 2.0,
                 "samples_per_s": 32000.0, "speedup_vs_float32": 1.0, "fraction_of_peak": 0.5,
                 "peak_tensor_bytes": 1048576, "activation_bytes": 524288, "max_batch_in_budget": 100},
                {"policy": "mixed_float16", "variant": "mixed_float16", "gemm_path": "avx512-6x64", "batch": 64, "ms_per_step": 2.5,
                 "samples_per_s": 25600.0, "speedup_vs_float32": 0.8, "fraction_of_peak": 0.4,
                 "compat_reason": "float16 is emulated", "peak_tensor_bytes": 1048576,
                 "activation_bytes": 262144, "max_batch_in_budget": 200}
            ]
        })
    }

    #[test]
    fn slower_policies_are_flagged_with_the_reason() {
        let r = train_records(&sample());
        assert!(r[0].get("flag").is_none());
        assert!(
            r[1]["flag"]
                .as_str()
                .unwrap()
                .contains("float16 is emulated")
        );
        let md = markdown(&Inputs {
            gemm: None,
            train: Some(sample()),
            cnn: Some(json!({"markdown": "## The mnist_cnn network\n"})),
            vit: Some(json!({"markdown": "## The mnist_vit network\n"})),
            dp: Some(json!({"markdown": "## Data parallel\n"})),
        });
        assert!(md.contains("## Data parallel"), "{md}");
        assert!(md.contains("## The mnist_cnn network"), "{md}");
        let (cnn, vit, dp) = (
            md.find("## The mnist_cnn network").unwrap(),
            md.find("## The mnist_vit network").unwrap(),
            md.find("## Data parallel").unwrap(),
        );
        assert!(cnn < vit && vit < dp, "{md}");
        assert!(
            md.contains("| mixed_float16 | avx512-6x64 | 64 | 2.5 |"),
            "{md}"
        );
        assert!(md.contains("Flagged:"));
        let svg = svg(&sample());
        assert!(svg.starts_with("<svg") && svg.contains("0.80x"));
    }

    #[test]
    fn microkernel_rates_get_their_table() {
        let gemm = json!({
            "calibration": {},
            "results": [],
            "microkernel": [
                {"path": "avx512-6x64", "dtype": "float32", "depth": 128, "gflops": 226.4,
                 "peak_per_thread_gflops": 245.4, "fraction_of_peak": 0.9225}
            ]
        });
        let md = markdown(&Inputs {
            gemm: Some(gemm),
            train: None,
            cnn: None,
            vit: None,
            dp: None,
        });
        assert!(
            md.contains("## GEMM microkernels alone (one thread)"),
            "{md}"
        );
        assert!(
            md.contains("| avx512-6x64 | float32 | 128 | 226.4 | 245.4 | 92.2% |"),
            "{md}"
        );
    }

    #[test]
    fn date_format() {
        let d = utc_date_time();
        assert_eq!(d.len(), 16);
        assert!(d.starts_with("20"));
    }
}
