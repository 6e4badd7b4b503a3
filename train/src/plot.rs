//! The loss curve of a run, drawn from its metrics.jsonl into RUN_DIR/loss.svg, and several
//! named curves in one chart (a sweep's variants).
use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;

pub fn loss_curve(run_dir: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(run_dir.join("metrics.jsonl")).context("reading metrics.jsonl")?;
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for v in text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()) {
        let step = v["step"].as_f64().unwrap_or(0.0);
        if let Some(l) = v["loss"].as_f64() {
            train.push((step, l));
        }
        if let Some(b) = v["val_bpb"].as_f64() {
            val.push((step, b));
        }
    }
    if train.is_empty() {
        return Ok(());
    }
    let path = run_dir.join("loss.svg");
    let root = SVGBackend::new(&path, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_step = train.iter().map(|p| p.0).fold(1.0, f64::max);
    let ys = train.iter().map(|p| p.1).chain(val.iter().map(|p| p.1));
    let (lo, hi) = ys.fold((f64::MAX, f64::MIN), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let mut chart = ChartBuilder::on(&root)
        .caption("training loss (nats) and validation bits per byte", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(48)
        .build_cartesian_2d(0.0..max_step, (lo * 0.95)..(hi * 1.02))?;
    chart.configure_mesh().x_desc("step").draw()?;
    chart
        .draw_series(LineSeries::new(train, &BLUE))?
        .label("train loss")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
    if !val.is_empty() {
        chart
            .draw_series(LineSeries::new(val, &RED))?
            .label("val bpb")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw()?;
    root.present()?;
    Ok(())
}

/// One line per named curve, with a legend; nothing is drawn when every curve is empty.
pub fn curves(path: &Path, caption: &str, series: &[(String, Vec<(f64, f64)>)]) -> Result<()> {
    curves_over(path, caption, "step", series)
}

/// `curves` with another x axis (`x_desc`). Series of few points (evaluations, one value per
/// stage) also get a marker at each point, so a single value is visible, not an empty line.
pub fn curves_over(
    path: &Path,
    caption: &str,
    x_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    let points = || series.iter().flat_map(|(_, c)| c.iter());
    if points().next().is_none() {
        return Ok(());
    }
    let max_x = points().map(|p| p.0).fold(1.0, f64::max);
    let (lo, hi) = points().fold((f64::MAX, f64::MIN), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    let pad = ((hi - lo) * 0.05).max(1e-6);
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..max_x, (lo - pad)..(hi + pad))?;
    chart.configure_mesh().x_desc(x_desc).draw()?;
    for (i, (name, c)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(c.iter().copied(), color.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
        if c.len() <= 24 {
            chart.draw_series(c.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    root.present()?;
    Ok(())
}
