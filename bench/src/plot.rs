//! The SVG plot of a bench: completed sagas/s (top) and latency p50/p99 (bottom, log scale)
//! against the offered load, for Sagaflow and, when measured, the baseline.
//!
//! The offered load of an open-loop point is its rate; a closed-loop point has no fixed
//! offered rate, so it is placed at the throughput it reached.

use std::path::Path;

use plotters::element::DashedPathElement;
use plotters::prelude::*;

use super::report::{Point, RunReport};

/// Why the plot could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw {path}: {message}")]
pub struct Error {
    /// The file.
    pub path: String,
    /// Cause.
    pub message: String,
}

const SAGAFLOW: RGBColor = RGBColor(31, 119, 180);
const BASELINE: RGBColor = RGBColor(255, 127, 14);

fn offered(r: &RunReport) -> f64 {
    r.offered_per_sec.unwrap_or(r.sagas_per_sec)
}

/// Series `(x, y)` sorted by x.
fn series(points: &[Point], pick: impl Fn(&Point) -> Option<(f64, f64)>) -> Vec<(f64, f64)> {
    let mut v: Vec<(f64, f64)> = points.iter().filter_map(pick).collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v
}

/// Draws `points` into `path` (SVG), titled with `title`.
pub fn draw(path: &Path, title: &str, points: &[Point]) -> Result<(), Error> {
    let fail = |e: &dyn std::fmt::Display| Error {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let sf_rate = series(points, |p| {
        Some((offered(&p.sagaflow), p.sagaflow.sagas_per_sec))
    });
    let bl_rate = series(points, |p| {
        p.baseline.as_ref().map(|b| (offered(b), b.sagas_per_sec))
    });
    let lat = |pick: fn(&RunReport) -> f64, base: bool| {
        series(points, move |p| {
            let r = if base {
                p.baseline.as_ref()?
            } else {
                &p.sagaflow
            };
            Some((offered(r), pick(r).max(0.01)))
        })
    };
    let (sf_p50, sf_p99) = (lat(|r| r.p50_ms, false), lat(|r| r.p99_ms, false));
    let (bl_p50, bl_p99) = (lat(|r| r.p50_ms, true), lat(|r| r.p99_ms, true));

    let all_x = sf_rate.iter().chain(&bl_rate).map(|p| p.0);
    let x_max = all_x.fold(1.0f64, f64::max) * 1.1;
    let y_max = sf_rate
        .iter()
        .chain(&bl_rate)
        .map(|p| p.1)
        .fold(x_max / 1.1, f64::max)
        * 1.1;
    let lat_values = sf_p50.iter().chain(&sf_p99).chain(&bl_p50).chain(&bl_p99);
    let (lat_min, lat_max) = lat_values.fold((f64::MAX, 0.01f64), |(lo, hi), p| {
        (lo.min(p.1), hi.max(p.1))
    });
    let lat_min = if lat_min == f64::MAX {
        0.1
    } else {
        (lat_min / 2.0).max(0.01)
    };
    let lat_max = (lat_max * 2.0).max(lat_min * 10.0);

    let root = SVGBackend::new(path, (900, 760)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let (top, bottom) = root.split_vertically(380);

    let mut chart = ChartBuilder::on(&top)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc("offered load (sagas/s)")
        .y_desc("completed sagas/s")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(|e| fail(&e))?;
    chart
        .draw_series(LineSeries::new(
            [(0.0, 0.0), (x_max, x_max)],
            ShapeStyle::from(&BLACK.mix(0.25)).stroke_width(1),
        ))
        .map_err(|e| fail(&e))?
        .label("offered = completed")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.mix(0.25)));
    for (data, color, name) in [
        (&sf_rate, SAGAFLOW, "sagaflow"),
        (&bl_rate, BASELINE, "baseline (bare JetStream)"),
    ] {
        if data.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(data.iter().copied(), color.stroke_width(2)))
            .map_err(|e| fail(&e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        chart
            .draw_series(data.iter().map(|p| Circle::new(*p, 4, color.filled())))
            .map_err(|e| fail(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(|e| fail(&e))?;

    let mut chart = ChartBuilder::on(&bottom)
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, (lat_min..lat_max).log_scale())
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc("offered load (sagas/s)")
        .y_desc("end-to-end latency, ms (log)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| trim_ms(*v))
        .draw()
        .map_err(|e| fail(&e))?;
    for (data, color, name, dashed) in [
        (&sf_p50, SAGAFLOW, "sagaflow p50", false),
        (&sf_p99, SAGAFLOW, "sagaflow p99", true),
        (&bl_p50, BASELINE, "baseline p50", false),
        (&bl_p99, BASELINE, "baseline p99", true),
    ] {
        if data.is_empty() {
            continue;
        }
        let style = color.stroke_width(2);
        if dashed {
            chart
                .draw_series(DashedLineSeries::new(data.iter().copied(), 6, 4, style))
                .map_err(|e| fail(&e))?
                .label(name)
                .legend(move |(x, y)| DashedPathElement::new([(x, y), (x + 20, y)], 6, 4, style));
        } else {
            chart
                .draw_series(LineSeries::new(data.iter().copied(), style))
                .map_err(|e| fail(&e))?
                .label(name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
        }
        let marker = data
            .iter()
            .map(move |p| -> DynElement<'static, SVGBackend, (f64, f64)> {
                if dashed {
                    Cross::new(*p, 4, color.stroke_width(2)).into_dyn()
                } else {
                    Circle::new(*p, 4, color.filled()).into_dyn()
                }
            });
        chart.draw_series(marker).map_err(|e| fail(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))?;
    Ok(())
}

/// A latency tick label: `0.5`, `3`, `1000`.
fn trim_ms(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::load::{Samples, Shape};

    fn run(system: &'static str, rate: f64, got: f64, p50: u64, p99: u64) -> RunReport {
        let t0 = tokio::time::Instant::now();
        let n = got as u64;
        let mut lat: Vec<u64> = vec![p50 * 1000; n as usize];
        if let Some(last) = lat.last_mut() {
            *last = p99 * 1000;
        }
        let s = Samples {
            attempted: n,
            latencies_us: lat,
            first_due: Some(t0),
            last_done: Some(t0 + std::time::Duration::from_secs(1)),
            ..Default::default()
        };
        RunReport::new(system, Shape::Open { rate }, &s)
    }

    #[test]
    fn plot_draws_an_svg() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bench.svg");
        let points = vec![
            Point::new(
                run("sagaflow", 100.0, 100.0, 3, 8),
                Some(run("baseline", 100.0, 100.0, 1, 2)),
            ),
            Point::new(
                run("sagaflow", 1000.0, 900.0, 40, 300),
                Some(run("baseline", 1000.0, 1000.0, 2, 5)),
            ),
        ];
        draw(&path, "test", &points).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        assert!(svg.contains("completed sagas/s"));
        assert!(svg.contains("baseline p99"));
        assert_eq!(
            (trim_ms(1000.0), trim_ms(2.5), trim_ms(1.0)),
            ("1000".into(), "2.5".into(), "1".into())
        );
        // One point only (a single run) draws too.
        draw(&path, "one", &points[..1]).unwrap();
    }
}
