//! The tables and plots of a sweep (see sweep.rs): summary.csv, summary.jsonl, summary.md,
//! loss.svg and val.svg, all rebuilt from the finished runs' rows and metrics on every sweep.
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use femtochat_model::checkpoint::write_atomic;
use serde_json::Value;

/// The columns after the grid's axes (the axes come after `variant`).
const COLUMNS: [&str; 11] = [
    "seed",
    "params",
    "steps",
    "tokens",
    "seconds",
    "tok_per_s",
    "final_loss",
    "val_loss",
    "val_bpb",
    "commit",
    "run_dir",
];

/// EMA factor of the plotted training loss (minibatch losses are noisy).
const SMOOTHING: f64 = 0.9;

fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) if s.contains([',', '"', '\n']) => {
            format!("\"{}\"", s.replace('"', "\"\""))
        }
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Mean and sample standard deviation (0 for one value).
fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 {
        xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (m, var.sqrt())
}

fn pm(xs: &[f64], digits: usize) -> String {
    if xs.is_empty() {
        return "-".into();
    }
    let (m, s) = mean_std(xs);
    if xs.len() > 1 { format!("{m:.digits$} ± {s:.digits$}") } else { format!("{m:.digits$}") }
}

/// (step, value) of `key` in a run's metrics.jsonl.
fn series(run_dir: &Path, key: &str) -> Vec<(f64, f64)> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_f64()?, v[key].as_f64()?)))
        .collect()
}

/// Debiased EMA of a curve.
fn smooth(xs: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut ema = 0.0;
    xs.iter()
        .enumerate()
        .map(|(i, &(s, y))| {
            ema = SMOOTHING * ema + (1.0 - SMOOTHING) * y;
            (s, ema / (1.0 - SMOOTHING.powi(i as i32 + 1)))
        })
        .collect()
}

/// Pointwise mean over seeds of curves sampled at the same steps (cut to the shortest).
fn mean_curve(curves: &[Vec<(f64, f64)>]) -> Vec<(f64, f64)> {
    let n = curves.iter().map(Vec::len).min().unwrap_or(0);
    (0..n)
        .map(|i| {
            let ys: Vec<f64> = curves.iter().map(|c| c[i].1).collect();
            (curves[0][i].0, mean_std(&ys).0)
        })
        .collect()
}

pub fn write(out: &Path, axes: &[String], rows: &[Value]) -> Result<()> {
    let mut header = vec!["variant".to_string()];
    header.extend(axes.iter().cloned());
    header.extend(COLUMNS.iter().map(|c| c.to_string()));
    let mut csv = header.join(",") + "\n";
    let mut jsonl = String::new();
    for r in rows {
        csv += &(header.iter().map(|k| cell(&r[k])).collect::<Vec<_>>().join(",") + "\n");
        jsonl += &(r.to_string() + "\n");
    }
    write_atomic(&out.join("summary.csv"), csv.as_bytes())?;
    write_atomic(&out.join("summary.jsonl"), jsonl.as_bytes())?;

    // Variants in first-seen order, their rows grouped.
    let mut order: Vec<String> = Vec::new();
    let mut by_variant: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for r in rows {
        let v = r["variant"].as_str().unwrap_or_default().to_string();
        if !by_variant.contains_key(&v) {
            order.push(v.clone());
        }
        by_variant.entry(v).or_default().push(r);
    }
    let col =
        |rs: &[&Value], k: &str| -> Vec<f64> { rs.iter().filter_map(|r| r[k].as_f64()).collect() };
    let mut ranked: Vec<&String> = order.iter().collect();
    let key = |v: &String| mean_std(&col(&by_variant[v], "val_bpb")).0;
    ranked.sort_by(|a, b| key(a).partial_cmp(&key(b)).unwrap_or(std::cmp::Ordering::Equal));
    let mut md = String::from("| rank | ");
    md += &axes.join(" | ");
    md += " | params | seeds | val bpb | val loss | final train loss | tok/s |\n|---:|";
    md += &"---|".repeat(axes.len());
    md += "---:|---:|---:|---:|---:|---:|\n";
    for (i, v) in ranked.iter().enumerate() {
        let rs = &by_variant[*v];
        let axis_cells: Vec<String> = axes.iter().map(|a| cell(&rs[0][a])).collect();
        md += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            i + 1,
            axis_cells.join(" | "),
            rs[0]["params"],
            rs.len(),
            pm(&col(rs, "val_bpb"), 4),
            pm(&col(rs, "val_loss"), 4),
            pm(&col(rs, "final_loss"), 4),
            pm(&col(rs, "tok_per_s"), 0),
        );
    }
    md += "\nMean ± sample standard deviation over seeds; ranked by mean validation bits per byte. \
           Two variants whose means differ by less than about two standard deviations are not \
           told apart by this many seeds.\n";
    write_atomic(&out.join("summary.md"), md.as_bytes())?;

    let curves = |key: &str, smoothed: bool| -> Vec<(String, Vec<(f64, f64)>)> {
        order
            .iter()
            .map(|v| {
                let per_seed: Vec<Vec<(f64, f64)>> = by_variant[v]
                    .iter()
                    .filter_map(|r| r["run_dir"].as_str())
                    .map(|d| {
                        let s = series(Path::new(d), key);
                        if smoothed { smooth(&s) } else { s }
                    })
                    .collect();
                (v.clone(), mean_curve(&per_seed))
            })
            .collect()
    };
    crate::plot::curves(
        &out.join("loss.svg"),
        "training loss (nats, EMA 0.9, mean over seeds)",
        &curves("loss", true),
    )?;
    crate::plot::curves(
        &out.join("val.svg"),
        "validation bits per byte (mean over seeds)",
        &curves("val_bpb", false),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0]);
        assert!((m - 2.0).abs() < 1e-12 && (s - 1.0).abs() < 1e-12);
        assert_eq!(pm(&[1.5], 2), "1.50");
        assert_eq!(cell(&Value::String("a,b".into())), "\"a,b\"");
        let sm = smooth(&[(0.0, 2.0), (1.0, 2.0)]);
        assert!(sm.iter().all(|p| (p.1 - 2.0).abs() < 1e-12), "debiased EMA of a constant");
        let c = mean_curve(&[vec![(0.0, 1.0), (1.0, 3.0)], vec![(0.0, 3.0)]]);
        assert_eq!(c, vec![(0.0, 2.0)]);
    }
}
