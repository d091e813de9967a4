//! SVG charts drawn with plotters: throughput against concurrency, latency percentiles
//! against concurrency, and the drain timeline.

use crate::scenarios::{DrainBench, RetryBench};
use plotters::prelude::*;
use std::path::Path;

const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("chart: {e}")
}

/// Requests/s against connections, one line per backend, plus the ceilings as flat lines.
pub fn throughput(
    path: &Path,
    runs: &[RetryBench],
    ceilings: &[(&str, f64)],
) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let max_rps = runs
        .iter()
        .flat_map(|r| r.closed.iter().map(|c| c.rps))
        .chain(ceilings.iter().map(|c| c.1))
        .fold(1.0f64, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "POST /payments/retry: throughput vs connections",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d((1u32..64u32).log_scale(), 0f64..max_rps)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("connections (closed loop)")
        .y_desc("requests/s")
        .draw()
        .map_err(err)?;
    for (i, run) in runs.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<(u32, f64)> = run
            .closed
            .iter()
            .map(|c| (c.concurrency as u32, c.rps))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(format!("payretry on {}", run.backend))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        chart
            .draw_series(points.iter().map(|p| Circle::new(*p, 4, color.filled())))
            .map_err(err)?;
    }
    for (i, (name, value)) in ceilings.iter().enumerate() {
        let color = COLORS[(runs.len() + i) % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                vec![(1u32, *value), (64u32, *value)],
                color.stroke_width(1),
            ))
            .map_err(err)?
            .label(name.to_string())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// p50 / p99 / max latency against connections for one backend (log scale).
pub fn latency(path: &Path, run: &RetryBench) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let max = run.closed.iter().map(|c| c.max_ms).fold(1.0f64, f64::max) * 1.5;
    let min = run
        .closed
        .iter()
        .map(|c| c.p50_ms)
        .fold(f64::MAX, f64::min)
        .max(0.01)
        * 0.7;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "POST /payments/retry on {}: latency percentiles",
                run.backend
            ),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d((1u32..64u32).log_scale(), (min..max).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("connections (closed loop)")
        .y_desc("latency (ms)")
        .draw()
        .map_err(err)?;
    type Pick = fn(&crate::load::LoadResult) -> f64;
    let series: [(&str, Pick); 4] = [
        ("p50", |c| c.p50_ms),
        ("p90", |c| c.p90_ms),
        ("p99", |c| c.p99_ms),
        ("max", |c| c.max_ms),
    ];
    for (i, (name, pick)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<(u32, f64)> = run
            .closed
            .iter()
            .map(|c| (c.concurrency as u32, pick(c).max(min)))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        chart
            .draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled())))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Checkouts created per second over the drain, payretry and apalis side by side.
pub fn drain(path: &Path, runs: &[&DrainBench]) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let max_t = runs
        .iter()
        .map(|r| r.timeline.len())
        .max()
        .unwrap_or(1)
        .max(2) as u32;
    let max_v = runs
        .iter()
        .flat_map(|r| r.timeline.iter().copied())
        .max()
        .unwrap_or(1)
        .max(1) as f64
        * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Worker drain: checkouts created per second",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0u32..max_t, 0f64..max_v)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("seconds since start")
        .y_desc("checkouts/s")
        .draw()
        .map_err(err)?;
    for (i, run) in runs.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<(u32, f64)> = run
            .timeline
            .iter()
            .enumerate()
            .map(|(t, v)| (t as u32, f64::from(*v)))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(err)?
            .label(format!("{} ({} claimers)", run.backend, run.claimers))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}
