//! End-of-run PNGs (plotters, bitmap backend): the loss curve (log scale) and the expert-load
//! heatmap (MoE layer × expert; colour = tokens routed to the expert over the layer's mean,
//! so 1.0 is perfect balance). Text uses an embedded ASCII subset of DejaVu Sans Mono
//! (`fonts/`, Bitstream Vera licence, see fonts/LICENSE-DejaVu.txt).

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{Error, Result};

const FONT: &[u8] = include_bytes!("fonts/DejaVuSansMono-ascii.ttf");
pub(crate) const FAMILY: &str = "sans-serif";

pub(crate) fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The embedded font is a fixed, valid file; if it were rejected plotters would only
        // lose its labels, so the result needs no handling.
        let _ = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT);
    });
}

fn plot_err(path: &Path) -> impl Fn(String) -> Error + '_ {
    move |msg| Error::Data {
        path: path.to_path_buf(),
        msg: format!("cannot draw the plot: {msg}"),
    }
}

/// The loss curve: `points` = (step, loss), drawn on a log-scale loss axis.
pub fn loss_curve(path: &Path, points: &[(u64, f32)], title: &str) -> Result<()> {
    register_font();
    let err = plot_err(path);
    let finite: Vec<(u64, f32)> = points
        .iter()
        .copied()
        .filter(|(_, l)| l.is_finite() && *l > 0.0)
        .collect();
    if finite.is_empty() {
        return Err(err("no finite loss values".into()));
    }
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let max_step = finite.iter().map(|p| p.0).max().unwrap_or(1).max(1);
    let min_step = finite
        .iter()
        .map(|p| p.0)
        .min()
        .unwrap_or(0)
        .min(max_step - 1);
    let lo = finite.iter().map(|p| p.1).fold(f32::INFINITY, f32::min);
    let hi = finite.iter().map(|p| p.1).fold(0.0, f32::max);
    let (lo, hi) = (lo * 0.8, hi * 1.25);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(min_step..max_step, (lo..hi).log_scale())
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .label_style((FAMILY, 14))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    chart
        .draw_series(LineSeries::new(finite, BLUE.stroke_width(2)))
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))
}

/// Viridis, five anchors linearly interpolated; `x` in [0, 1].
pub(crate) fn viridis(x: f64) -> RGBColor {
    const ANCHORS: [(f64, f64, f64); 5] = [
        (68.0, 1.0, 84.0),
        (59.0, 82.0, 139.0),
        (33.0, 145.0, 140.0),
        (94.0, 201.0, 98.0),
        (253.0, 231.0, 37.0),
    ];
    let x = x.clamp(0.0, 1.0) * 4.0;
    let i = (x.floor() as usize).min(3);
    let f = x - i as f64;
    let (a, b) = (ANCHORS[i], ANCHORS[i + 1]);
    let mix = |p: f64, q: f64| (p + (q - p) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// The expert-load heatmap: `load[layer][expert]` = tokens routed. Each cell shows the load
/// relative to the layer's mean: colour from 0 (dark) through 1 (balanced) to 2+ (bright).
pub fn expert_heatmap(path: &Path, load: &[Vec<u64>], title: &str) -> Result<()> {
    register_font();
    let err = plot_err(path);
    let layers = load.len();
    let experts = load.iter().map(Vec::len).max().unwrap_or(0);
    if layers == 0 || experts == 0 {
        return Err(err("no MoE layers".into()));
    }
    let cell_w = (860 / experts).clamp(6, 80) as u32;
    let cell_h = (480 / layers).clamp(10, 60) as u32;
    let (w, h) = (cell_w * experts as u32 + 110, cell_h * layers as u32 + 110);
    let root = BitMapBackend::new(path, (w.max(560), h)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (0..experts as i32 - 1).into_segmented(),
            (0..layers as i32 - 1).into_segmented(),
        )
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("expert")
        .y_desc("MoE layer")
        .x_labels(experts.min(16))
        .y_labels(layers.min(16))
        .label_style((FAMILY, 13))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    let mut cells = Vec::with_capacity(layers * experts);
    for (l, row) in load.iter().enumerate() {
        let mean = row.iter().sum::<u64>() as f64 / row.len().max(1) as f64;
        for (e, &n) in row.iter().enumerate() {
            let rel = if mean > 0.0 { n as f64 / mean } else { 0.0 };
            cells.push((e as i32, l as i32, rel));
        }
    }
    use plotters::coord::ranged1d::SegmentValue::{CenterOf, Exact};
    chart
        .draw_series(cells.iter().map(|&(e, l, rel)| {
            Rectangle::new(
                [(Exact(e), Exact(l)), (Exact(e + 1), Exact(l + 1))],
                viridis(rel / 2.0).filled(),
            )
        }))
        .map_err(|e| err(e.to_string()))?;
    if cell_w >= 40 && cell_h >= 18 {
        let centre = Pos::new(HPos::Center, VPos::Center);
        chart
            .draw_series(cells.iter().map(|&(e, l, rel)| {
                let ink = if rel > 1.2 { &BLACK } else { &WHITE };
                Text::new(
                    format!("{rel:.2}"),
                    (CenterOf(e), CenterOf(l)),
                    (FAMILY, 12).into_font().color(ink).pos(centre),
                )
            }))
            .map_err(|e| err(e.to_string()))?;
    }
    root.present().map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_pngs() {
        let dir = tempfile::tempdir().unwrap();
        let loss: Vec<(u64, f32)> = (1..100).map(|s| (s, 5.0 / (s as f32).sqrt())).collect();
        let p = dir.path().join("loss.png");
        loss_curve(&p, &loss, "loss").unwrap();
        let png = std::fs::read(&p).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        let load = vec![vec![10, 20, 30, 40, 50, 60, 70, 80]; 4];
        let h = dir.path().join("experts.png");
        expert_heatmap(&h, &load, "expert load").unwrap();
        assert_eq!(&std::fs::read(&h).unwrap()[1..4], b"PNG");
        expert_heatmap(&h, &[vec![5]], "one expert").unwrap();
        assert!(loss_curve(&p, &[(1, f32::NAN)], "x").is_err());
        assert!(expert_heatmap(&h, &[], "x").is_err());
    }

    #[test]
    fn colour_scale_ends() {
        assert_eq!(viridis(0.0), RGBColor(68, 1, 84));
        assert_eq!(viridis(1.0), RGBColor(253, 231, 37));
        assert_eq!(viridis(7.0), RGBColor(253, 231, 37));
    }
}
