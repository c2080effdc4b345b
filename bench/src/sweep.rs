//! The scheduling sweep: exo-lb with no scheduling option set, against nginx (the seed's
//! configuration), exo-lb with static `model_switch_cost` values (multiples of the real switch
//! time; the best of them is what a perfect hand-tuning would reach) and a clairvoyant
//! reference (`offline::clairvoyant`), across switch times (as multiples of a mean generation), loads and seeds.

use crate::report::{draw_legend, draw_series, init_font, percentile, series_color, RunResult};
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
        .build_cartesian_2d(
            (xlo * 0.8..xhi * 1.25).log_scale().with_key_points(factors.to_vec()),
            ((lo * 0.7).max(0.01)..hi * 1.5).log_scale(),
        )
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("switch time / mean generation (log)")
        .y_desc("p95 TTFT (simulated s, log)")
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()
        .map_err(|x| e(&x))?;
    for (k, (name, ys)) in series.iter().enumerate() {
        let pts: Vec<(f64, f64)> =
            factors.iter().zip(ys).filter(|(_, y)| y.is_finite() && **y > 0.0).map(|(x, y)| (*x, *y)).collect();
        draw_series(&mut chart, pts, series_color(k).stroke_width(3), name.clone(), true).map_err(|x| e(&x))?;
    }
    draw_legend(&mut chart, SeriesLabelPosition::UpperLeft).map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The PNG's width and height, from its IHDR chunk.
    fn png_size(bytes: &[u8]) -> Option<(u32, u32)> {
        let word = |at: usize| bytes.get(at..at + 4).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes);
        (bytes.starts_with(b"\x89PNG\r\n\x1a\n")).then_some(())?;
        Some((word(16)?, word(20)?))
    }

    #[test]
    fn the_sweep_chart_draws_more_series_than_the_palette_has_colors() {
        let dir = std::env::temp_dir().join(format!("exo-lb-bench-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sweep.png");
        let factors = [0.2, 1.0, 2.5, 8.0];
        // Ten series, one with a gap (NaN) and one with nothing to draw.
        let mut series: Vec<(String, Vec<f64>)> =
            (0..9).map(|k| (format!("system {k}"), factors.iter().map(|f| f * (k + 1) as f64).collect())).collect();
        series[3].1[1] = f64::NAN;
        series.push(("none".into(), vec![f64::NAN; 4]));
        let drawn = chart(&path, "p95 against switch time", &factors, &series);
        let bytes = std::fs::read(&path).unwrap_or_default();
        std::fs::remove_dir_all(&dir).unwrap();
        drawn.unwrap();
        assert_eq!(png_size(&bytes), Some((900, 520)));
    }
}
