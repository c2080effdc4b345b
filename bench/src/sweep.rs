//! The scheduling sweep: exo-lb with no scheduling option set, against nginx (the seed's
//! configuration), exo-lb with static `model_switch_cost` values (multiples of the real switch
//! time; the best of them is what a perfect hand-tuning would reach) and a clairvoyant
//! reference (`offline::clairvoyant`), across switch times (as multiples of a mean generation), loads and seeds.

use crate::report::{init_font, percentile, RunResult};
use plotters::prelude::*;
use std::path::Path;

/// The percentiles of one system at one point, over every seed's requests together.
pub struct Point {
    pub system: String,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub switches: u64,
    pub errors: usize,
    pub max_concurrency: u64,
}

impl Point {
    /// A reference computed from a trace rather than run (no request fails).
    pub fn computed(system: &str, ttft: &[f64], switches: u64, max_concurrency: u64) -> Point {
        Point {
            system: system.into(),
            p50: percentile(ttft, 50.0),
            p95: percentile(ttft, 95.0),
            p99: percentile(ttft, 99.0),
            switches,
            errors: 0,
            max_concurrency,
        }
    }

    /// A failed request counts as never answered (an infinite time to first token): a system
    /// that drops a tenth of its requests has no finite p95, however fast the rest were.
    pub fn of(system: &str, runs: &[&RunResult]) -> Point {
        let ttft: Vec<f64> =
            runs.iter().flat_map(|r| r.outcomes.iter().map(|o| if o.ok { o.ttft } else { f64::INFINITY })).collect();
        Point {
            system: system.to_string(),
            p50: percentile(&ttft, 50.0),
            p95: percentile(&ttft, 95.0),
            p99: percentile(&ttft, 99.0),
            switches: runs.iter().map(|r| r.model_switches).sum(),
            errors: runs.iter().map(|r| r.errors()).sum(),
            max_concurrency: runs.iter().map(|r| r.max_node_concurrency).max().unwrap_or(0),
        }
    }
}

/// p95 TTFT against switch time (log-log), one line per system, for one load.
pub fn chart(path: &Path, title: &str, factors: &[f64], series: &[(String, Vec<f64>)]) -> Result<(), String> {
    init_font()?;
    let e = |e: &dyn std::fmt::Display| format!("chart {}: {e}", path.display());
    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let values = series.iter().flat_map(|s| s.1.iter().copied()).filter(|v| v.is_finite() && *v > 0.0);
    let (lo, hi) = values.fold((f64::MAX, 0.1f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (xlo, xhi) = factors.iter().fold((f64::MAX, 0.0f64), |(lo, hi), &f| (lo.min(f), hi.max(f)));
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d((xlo * 0.8..xhi * 1.25).log_scale(), ((lo * 0.7).max(0.01)..hi * 1.5).log_scale())
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("switch time / mean generation (log)")
        .y_desc("p95 TTFT (simulated s, log)")
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()
        .map_err(|x| e(&x))?;
    let colors = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK, RGBColor(230, 140, 0)];
    for (k, (name, ys)) in series.iter().enumerate() {
        let color = colors[k % colors.len()];
        let pts: Vec<(f64, f64)> =
            factors.iter().zip(ys).filter(|(_, y)| y.is_finite() && **y > 0.0).map(|(x, y)| (*x, *y)).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(3)))
            .map_err(|x| e(&x))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3)));
        chart.draw_series(pts.iter().map(|p| Circle::new(*p, 5, color.filled()))).map_err(|x| e(&x))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}
