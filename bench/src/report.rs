//! Statistics, markdown tables and PNG charts.

use crate::loadgen::Outcome;
use crate::trace::Bounds;
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

/// One system at one utilization.
pub struct RunResult {
    pub system: String,
    pub utilization: f64,
    pub outcomes: Vec<Outcome>,
    pub model_switches: u64,
    /// Highest `max_concurrent_requests` of any node.
    pub max_node_concurrency: u64,
}

pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

impl RunResult {
    pub fn ok(&self) -> impl Iterator<Item = &Outcome> {
        self.outcomes.iter().filter(|o| o.ok)
    }
    pub fn ttft(&self) -> Vec<f64> {
        self.ok().map(|o| o.ttft).collect()
    }
    pub fn e2e(&self) -> Vec<f64> {
        self.ok().map(|o| o.e2e).collect()
    }
    pub fn errors(&self) -> usize {
        self.outcomes.len() - self.ok().count()
    }
    pub fn error_kinds(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for o in self.outcomes.iter().filter(|o| !o.ok) {
            *m.entry(o.error.clone().unwrap_or_default()).or_default() += 1;
        }
        m
    }
    /// Completed requests per simulated minute, from the first arrival (0) to the last
    /// completion.
    pub fn throughput_per_min(&self) -> f64 {
        let last = self.ok().map(|o| o.end).fold(0.0, f64::max);
        if last > 0.0 {
            self.ok().count() as f64 / last * 60.0
        } else {
            0.0
        }
    }
}

fn fmt_s(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.1}")
    }
}

/// The latency table of one utilization (times in simulated seconds).
pub fn latency_table(results: &[&RunResult], bounds: &Bounds) -> String {
    let mut s = String::from(
        "| system | ok | errors | TTFT p50 | TTFT p95 | TTFT p99 | E2E p50 | E2E p95 | E2E p99 | throughput (req/min) | model switches | max node concurrency |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        let (t, e) = (r.ttft(), r.e2e());
        let kinds: Vec<String> = r.error_kinds().iter().map(|(k, n)| format!("{n}× {k}")).collect();
        s += &format!(
            "| {} | {} | {}{} | {} | {} | {} | {} | {} | {} | {:.2} | {} | {} |\n",
            r.system,
            r.ok().count(),
            r.errors(),
            if kinds.is_empty() { String::new() } else { format!(" ({})", kinds.join(", ")) },
            fmt_s(percentile(&t, 50.0)),
            fmt_s(percentile(&t, 95.0)),
            fmt_s(percentile(&t, 99.0)),
            fmt_s(percentile(&e, 50.0)),
            fmt_s(percentile(&e, 95.0)),
            fmt_s(percentile(&e, 99.0)),
            r.throughput_per_min(),
            r.model_switches,
            r.max_node_concurrency,
        );
    }
    let row = |name: &str, t: &[f64], e: &[f64], thr: String| {
        format!(
            "| {name} | | | {} | {} | {} | {} | {} | {} | {thr} | | |\n",
            fmt_s(percentile(t, 50.0)),
            fmt_s(percentile(t, 95.0)),
            fmt_s(percentile(t, 99.0)),
            fmt_s(percentile(e, 50.0)),
            fmt_s(percentile(e, 95.0)),
            fmt_s(percentile(e, 99.0)),
        )
    };
    s += &row(
        "*bound: no wait, no switch*",
        &bounds.min_ttft,
        &bounds.min_e2e,
        format!("≤ {:.2}", bounds.max_throughput_per_min),
    );
    s += &row("*reference: ideal FIFO, free switches*", &bounds.fifo_ttft, &bounds.fifo_e2e, String::new());
    s
}

static FONT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();

/// Registers a TrueType font for the charts (plotters' ab_glyph backend needs no system font
/// library, only the file): `$EXO_LB_BENCH_FONT`, or DejaVu Sans (Debian: fonts-dejavu-core).
pub fn init_font() -> Result<(), String> {
    FONT.get_or_init(|| {
        let candidates = [
            std::env::var("EXO_LB_BENCH_FONT").unwrap_or_default(),
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf".into(),
            "/usr/share/fonts/dejavu/DejaVuSans.ttf".into(),
            "/usr/share/fonts/TTF/DejaVuSans.ttf".into(),
        ];
        let path = candidates
            .iter()
            .find(|p| !p.is_empty() && Path::new(p).exists())
            .ok_or("no font for the charts: apt-get install fonts-dejavu-core (or set EXO_LB_BENCH_FONT)")?;
        let bytes: &'static [u8] =
            Box::leak(std::fs::read(path).map_err(|e| format!("{path}: {e}"))?.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{path}: not a usable font"))?;
        Ok(())
    })
    .clone()
}

const COLORS: [RGBColor; 8] = [
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(23, 190, 207),
    RGBColor(127, 127, 127),
];

/// The color of a chart's `k`-th series (every chart uses the same palette).
pub fn series_color(k: usize) -> RGBColor {
    COLORS[k % COLORS.len()]
}

/// A chart with `f64` on both axes (linear or log).
pub type Chart<'a, X, Y> = ChartContext<'a, BitMapBackend<'a>, Cartesian2d<X, Y>>;

/// One series: a line, a dot at each point where `dots`, and its legend entry.
pub fn draw_series<X, Y>(
    chart: &mut Chart<'_, X, Y>,
    points: Vec<(f64, f64)>,
    style: ShapeStyle,
    label: String,
    dots: bool,
) -> Result<(), String>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    chart
        .draw_series(LineSeries::new(points.iter().copied(), style))
        .map_err(|x| x.to_string())?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    if dots {
        let dot = ShapeStyle { filled: true, ..style };
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 5, dot))).map_err(|x| x.to_string())?;
    }
    Ok(())
}

/// The legend of the series drawn with [`draw_series`], in a framed box at `position`.
pub fn draw_legend<X, Y>(chart: &mut Chart<'_, X, Y>, position: SeriesLabelPosition) -> Result<(), String>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|x| x.to_string())
}

fn cdf(values: &[f64]) -> Vec<(f64, f64)> {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len() as f64;
    v.iter().enumerate().map(|(i, x)| (x.max(0.05), (i + 1) as f64 / n * 100.0)).collect()
}

/// Two panels (TTFT and end-to-end latency), the distribution of each system as a CDF on a log
/// time axis, with the no-wait bound.
pub fn latency_chart(path: &Path, title: &str, results: &[&RunResult], bounds: &Bounds) -> Result<(), String> {
    init_font()?;
    let e = |e: &dyn std::fmt::Display| format!("chart {}: {e}", path.display());
    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let root = root.titled(title, ("sans-serif", 24)).map_err(|x| e(&x))?;
    let panels = root.split_evenly((1, 2));
    for (k, panel) in panels.iter().enumerate() {
        let pick = |r: &RunResult| if k == 0 { r.ttft() } else { r.e2e() };
        let bound = if k == 0 { &bounds.min_ttft } else { &bounds.min_e2e };
        let max = results.iter().flat_map(|r| pick(r)).chain(bound.iter().copied()).fold(1.0, f64::max) * 1.3;
        let min = bound.iter().copied().fold(f64::MAX, f64::min).clamp(0.05, 1.0) * 0.7;
        let mut chart = ChartBuilder::on(panel)
            .caption(
                if k == 0 { "time to first token (simulated s)" } else { "end-to-end latency (simulated s)" },
                ("sans-serif", 20),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d((min..max).log_scale(), 0f64..100f64)
            .map_err(|x| e(&x))?;
        chart
            .configure_mesh()
            .x_desc("seconds (log scale)")
            .y_desc("% of completed requests")
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 16))
            .draw()
            .map_err(|x| e(&x))?;
        for (i, r) in results.iter().enumerate() {
            let label = format!("{} ({} errors)", r.system, r.errors());
            draw_series(&mut chart, cdf(&pick(r)), series_color(i).stroke_width(3), label, false).map_err(|x| e(&x))?;
        }
        let label = "bound: no wait, no switch".to_string();
        draw_series(&mut chart, cdf(bound), BLACK.stroke_width(1), label, false).map_err(|x| e(&x))?;
        draw_legend(&mut chart, SeriesLabelPosition::LowerRight).map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

/// p95 TTFT per system across utilizations.
pub fn summary_chart(path: &Path, systems: &[String], utils: &[f64], results: &[RunResult]) -> Result<(), String> {
    init_font()?;
    let e = |e: &dyn std::fmt::Display| format!("chart {}: {e}", path.display());
    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let get = |s: &str, u: f64| {
        results.iter().find(|r| r.system == s && r.utilization == u).map(|r| percentile(&r.ttft(), 95.0))
    };
    let max = results.iter().map(|r| percentile(&r.ttft(), 95.0)).filter(|v| v.is_finite()).fold(1.0, f64::max) * 1.5;
    let mut chart = ChartBuilder::on(&root)
        .caption("p95 time to first token vs utilization", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(0.4f64..1.0f64, (0.1f64..max).log_scale())
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("offered utilization")
        .y_desc("p95 TTFT (simulated s, log)")
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()
        .map_err(|x| e(&x))?;
    for (i, s) in systems.iter().enumerate() {
        let pts: Vec<(f64, f64)> =
            utils.iter().filter_map(|u| get(s, *u).filter(|v| v.is_finite()).map(|v| (*u, v))).collect();
        draw_series(&mut chart, pts, series_color(i).stroke_width(3), s.clone(), true).map_err(|x| e(&x))?;
    }
    draw_legend(&mut chart, SeriesLabelPosition::UpperLeft).map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}
