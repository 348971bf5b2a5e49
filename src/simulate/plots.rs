//! The simulator's PNGs: predicted step time by GPU count (one line per placement, log-scale
//! GPUs) and the replica heat map (x: step, y: layer · E + expert, colour: replicas of that
//! expert). Font and colour scale are the training plots' (`train::plots`).

use std::path::Path;

use anyhow::{anyhow, bail};
use plotters::prelude::*;

use super::Outcome;
use crate::placement::PlacementKind;
use crate::train::plots::{register_font, viridis, FAMILY};

const KINDS: [(PlacementKind, RGBColor); 4] = [
    (PlacementKind::Static, RGBColor(31, 119, 180)),
    (PlacementKind::Capacity, RGBColor(255, 127, 14)),
    (PlacementKind::Rebalance, RGBColor(44, 160, 44)),
    (PlacementKind::Swift, RGBColor(214, 39, 40)),
];

/// Step time (ms) against GPU count, one line per placement in `outcomes`.
pub fn step_times(path: &Path, outcomes: &[Outcome], model: &str) -> anyhow::Result<()> {
    register_font();
    let err = |e: String| anyhow!("{}: cannot draw the plot: {e}", path.display());
    if outcomes.is_empty() {
        bail!("{}: nothing to plot", path.display());
    }
    let g_lo = outcomes.iter().map(|o| o.gpus).min().unwrap_or(1) as f64;
    let g_hi = outcomes.iter().map(|o| o.gpus).max().unwrap_or(1) as f64;
    let t_hi = outcomes.iter().map(|o| o.step_s * 1e3).fold(0.0, f64::max);
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("moe simulate: {model}, expert time per step"),
            (FAMILY, 20),
        )
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(
            (g_lo / 1.3..g_hi * 1.3).log_scale(),
            0.0..(t_hi * 1.15).max(1e-3),
        )
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("GPUs")
        .y_desc("step ms (MoE layers)")
        .x_label_formatter(&|g| format!("{g:.0}"))
        .label_style((FAMILY, 14))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for (kind, colour) in KINDS {
        let points: Vec<(f64, f64)> = outcomes
            .iter()
            .filter(|o| o.kind == kind)
            .map(|o| (o.gpus as f64, o.step_s * 1e3))
            .collect();
        if points.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label(kind.name())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
            });
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 4, colour.filled())),
            )
            .map_err(|e| err(e.to_string()))?;
    }
    chart
        .configure_series_labels()
        .label_font((FAMILY, 14))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))
}

/// Replicas `[step][layer][expert]` as a heat map; at most 400 step columns and 800 rows are
/// drawn (evenly sampled beyond that).
pub fn replica_heatmap(
    path: &Path,
    replicas: &[Vec<Vec<usize>>],
    title: &str,
) -> anyhow::Result<()> {
    register_font();
    let err = |e: String| anyhow!("{}: cannot draw the plot: {e}", path.display());
    let steps = replicas.len();
    let experts = replicas.first().and_then(|s| s.first()).map_or(0, Vec::len);
    let rows = replicas.first().map_or(0, Vec::len) * experts;
    if steps == 0 || rows == 0 {
        bail!("{}: no replicas to plot", path.display());
    }
    let max = replicas
        .iter()
        .flatten()
        .flatten()
        .copied()
        .max()
        .unwrap_or(1)
        .max(1);
    let cols: Vec<usize> = sample(steps, 400);
    let picked: Vec<usize> = sample(rows, 800);
    let cw = (860 / cols.len()).clamp(1, 40) as u32;
    let ch = (640 / picked.len()).clamp(1, 24) as u32;
    let (w, h) = (cw * cols.len() as u32 + 120, ch * picked.len() as u32 + 110);
    let root = BitMapBackend::new(path, (w.max(560), h.max(300))).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{title} (bright = {max})"), (FAMILY, 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..cols.len() as f64, 0.0..picked.len() as f64)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("step")
        .y_desc("layer.expert")
        .x_label_formatter(&|x| format!("{}", cols.get(*x as usize).copied().unwrap_or(steps)))
        .y_label_formatter(&|y| {
            let r = picked.get(*y as usize).copied().unwrap_or(rows);
            format!("{}.{}", r / experts, r % experts)
        })
        .label_style((FAMILY, 12))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    let cells = cols.iter().enumerate().flat_map(|(x, &s)| {
        picked.iter().enumerate().map(move |(y, &r)| {
            let n = replicas[s][r / experts][r % experts];
            Rectangle::new(
                [(x as f64, y as f64), (x as f64 + 1.0, y as f64 + 1.0)],
                viridis(n as f64 / max as f64).filled(),
            )
        })
    });
    chart.draw_series(cells).map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))
}

/// At most `limit` indices of 0..n, evenly spaced, first and order kept.
fn sample(n: usize, limit: usize) -> Vec<usize> {
    if n <= limit {
        return (0..n).collect();
    }
    (0..limit).map(|i| i * n / limit).collect()
}
