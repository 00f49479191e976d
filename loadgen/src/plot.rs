//! SVG plots with plotters (SVG backend only: no fonts or system libraries needed):
//! latency by percentile, throughput and p99 over time, and a sweep's latency-versus-load
//! curve.

use std::path::Path;

use hdrhistogram::Histogram;
use plotters::prelude::*;

use crate::collector::IntervalPoint;
use crate::sweep::SweepStep;

type PlotResult = Result<(), Box<dyn std::error::Error>>;

const COLORS: [RGBColor; 6] = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];

/// x = -log10(1 - q): 0 at the median's left end, 2 at p99, 4 at p99.99.
fn nines(q: f64) -> f64 {
    -(1.0 - q.min(0.999_999)).log10()
}

fn percentile_label(x: &f64) -> String {
    let q = 1.0 - 10f64.powf(-*x);
    let text = format!("{:.4}", 100.0 * q);
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text}%")
}

/// Latency by percentile (HdrHistogram's classic plot), one line per histogram.
pub fn percentiles(path: &Path, series: &[(&str, &Histogram<u64>)]) -> PlotResult {
    let mut points: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut y_max: f64 = 0.001;
    let mut x_max: f64 = 1.0;
    for (_, h) in series {
        let mut line = Vec::new();
        if !h.is_empty() {
            for v in h.iter_quantiles(2) {
                let q = v.quantile_iterated_to();
                let x = nines(q);
                let y = v.value_iterated_to() as f64 / 1e6;
                line.push((x, y));
                y_max = y_max.max(y);
                x_max = x_max.max(x);
            }
        }
        points.push(line);
    }
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("request latency by percentile", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max.ceil().min(6.0), 0.0..y_max * 1.05)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_labels(8)
        .x_label_formatter(&percentile_label)
        .draw()?;
    for (i, ((name, _), line)) in series.iter().zip(points).enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(line, color.stroke_width(2)))?
            .label(name.to_string())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Throughput (top) and p99 latency (bottom) per interval.
pub fn timeline(path: &Path, title: &str, points: &[IntervalPoint]) -> PlotResult {
    let root = SVGBackend::new(path, (900, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(320);
    let t_max = points.last().map_or(1.0, |p| p.t_s).max(0.001);
    let rate_max = points.iter().map(|p| p.invoices_per_s).fold(1.0, f64::max);
    let p99_max = points.iter().map(|p| p.p99_us / 1e3).fold(0.001, f64::max);
    let mut chart = ChartBuilder::on(&top)
        .caption(format!("{title}: throughput"), ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..t_max, 0.0..rate_max * 1.1)?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("invoices/s")
        .draw()?;
    chart.draw_series(LineSeries::new(
        points.iter().map(|p| (p.t_s, p.invoices_per_s)),
        BLUE.stroke_width(2),
    ))?;
    let mut chart = ChartBuilder::on(&bottom)
        .caption("p99 latency per interval", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..t_max, 0.0..p99_max * 1.1)?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("p99 (ms)")
        .draw()?;
    chart.draw_series(LineSeries::new(
        points.iter().map(|p| (p.t_s, p.p99_us / 1e3)),
        RED.stroke_width(2),
    ))?;
    root.present()?;
    Ok(())
}

/// Latency versus offered load: p50, p99 and p99.9 against the target rate, with the
/// objective's p99 bound as a dashed line.
pub fn sweep(path: &Path, steps: &[SweepStep], p99_bound_ms: f64) -> PlotResult {
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let x_max = steps
        .iter()
        .map(|s| s.target_invoices_per_s)
        .fold(1.0, f64::max);
    let y_max = steps
        .iter()
        .map(|s| s.latency.p999_us / 1e3)
        .fold(p99_bound_ms, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption("latency versus load", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max * 1.05, 0.0..y_max * 1.1)?;
    chart
        .configure_mesh()
        .x_desc("target rate (invoices/s)")
        .y_desc("latency (ms)")
        .draw()?;
    type Curve = (&'static str, fn(&SweepStep) -> f64, RGBColor);
    let curves: [Curve; 3] = [
        ("p50", |s| s.latency.p50_us / 1e3, GREEN),
        ("p99", |s| s.latency.p99_us / 1e3, BLUE),
        ("p99.9", |s| s.latency.p999_us / 1e3, MAGENTA),
    ];
    for (name, f, color) in curves {
        let line: Vec<(f64, f64)> = steps
            .iter()
            .map(|s| (s.target_invoices_per_s, f(s)))
            .collect();
        chart
            .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart.draw_series(line.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .draw_series(DashedLineSeries::new(
            vec![(0.0, p99_bound_ms), (x_max * 1.05, p99_bound_ms)],
            6,
            4,
            RED.stroke_width(1),
        ))?
        .label("p99 objective")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}
