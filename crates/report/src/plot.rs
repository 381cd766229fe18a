//! SVG plots (plotters).

use plotters::prelude::*;

use crate::aggregate::{Aggregate, WorkloadAnalysis};
use crate::model::PEERS;

const WIDTH: u32 = 960;

/// A CDF plot line: legend label, color, `(µs, fraction)` points.
type CdfLine = (String, RGBColor, Vec<(f64, f64)>);
/// How many dvma configurations the CDF plot shows (the best ones).
const CDF_DVMA_LINES: usize = 3;

fn err<E: std::fmt::Debug>(e: E) -> String {
    format!("{e:?}")
}

fn peer_color(server: &str) -> RGBColor {
    match PEERS.iter().position(|p| *p == server) {
        Some(0) => RGBColor(90, 90, 90),
        Some(_) => RGBColor(160, 160, 160),
        None => RGBColor(200, 160, 60),
    }
}

/// A horizontal bar chart of the workload's metric (median, with a min–max
/// whisker) for every configuration, dvma first, then the peers; a dashed
/// line marks the first peer of [`PEERS`] that has runs. Returns the SVG
/// text, or plotters' error message.
pub fn plot_bars(w: &WorkloadAnalysis) -> Result<String, String> {
    let mut items: Vec<&Aggregate> = w.dvma().collect();
    items.extend(w.aggregates.iter().filter(|a| !a.key.is_dvma()));
    let n = items.len().max(1);
    let labels: Vec<String> = items.iter().map(|a| w.label(&a.key)).collect();
    let best = w.best_dvma().map(|b| b.key.clone());
    let xmax = items
        .iter()
        .map(|a| a.value().max)
        .fold(0.0f64, f64::max)
        .max(f64::MIN_POSITIVE)
        * 1.12;
    let label_w = labels.iter().map(|l| l.len()).max().unwrap_or(8) as u32 * 7 + 16;
    let height = 110 + 22 * n as u32;
    let unit = w.metric.unit();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                match PEERS.iter().find(|p| w.peer(p).is_some()) {
                    Some(p) => format!(
                        "{}: {unit} (median, min–max whiskers; dashed: {p})",
                        w.workload
                    ),
                    None => format!("{}: {unit} (median, min–max whiskers)", w.workload),
                },
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(label_w.min(WIDTH / 2))
            .build_cartesian_2d(0f64..xmax, (0usize..n).into_segmented())
            .map_err(err)?;
        // Row i is drawn at segment n-1-i so that the first item is on top.
        let row = |i: usize| n - 1 - i;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(n)
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(s) if *s < n => labels[n - 1 - *s].clone(),
                _ => String::new(),
            })
            .x_label_formatter(&|x| w.metric.format(*x))
            .x_desc(unit)
            .draw()
            .map_err(err)?;
        chart
            .draw_series(items.iter().enumerate().map(|(i, a)| {
                let color = if a.key.is_dvma() {
                    if Some(&a.key) == best.as_ref() {
                        RGBColor(200, 80, 20)
                    } else {
                        RGBColor(70, 120, 190)
                    }
                } else {
                    peer_color(&a.key.server)
                };
                let mut bar = Rectangle::new(
                    [
                        (0.0, SegmentValue::Exact(row(i))),
                        (a.value().median, SegmentValue::Exact(row(i) + 1)),
                    ],
                    color.filled(),
                );
                bar.set_margin(3, 3, 0, 0);
                bar
            }))
            .map_err(err)?;
        chart
            .draw_series(
                items
                    .iter()
                    .enumerate()
                    .filter(|(_, a)| a.value().n > 1)
                    .map(|(i, a)| {
                        PathElement::new(
                            vec![
                                (a.value().min, SegmentValue::CenterOf(row(i))),
                                (a.value().max, SegmentValue::CenterOf(row(i))),
                            ],
                            BLACK.stroke_width(2),
                        )
                    }),
            )
            .map_err(err)?;
        if let Some(p) = PEERS.iter().find_map(|p| w.peer(p)) {
            let x = p.value().median;
            chart
                .draw_series(DashedLineSeries::new(
                    [(x, SegmentValue::Exact(0)), (x, SegmentValue::Exact(n))],
                    6,
                    4,
                    BLACK.stroke_width(1),
                ))
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// The latency CDFs (total latency where fio reported it, else completion latency; log-scale µs) of the best
/// dvma configurations and of each peer's best configuration, from each
/// configuration's median run. Returns the SVG text, or plotters' error
/// message.
pub fn plot_cdf(w: &WorkloadAnalysis) -> Result<String, String> {
    let mut lines: Vec<CdfLine> = Vec::new();
    let dvma_colors = [
        RGBColor(200, 80, 20),
        RGBColor(70, 120, 190),
        RGBColor(60, 160, 90),
    ];
    for (a, color) in w
        .ranked_dvma()
        .into_iter()
        .take(CDF_DVMA_LINES)
        .zip(dvma_colors)
    {
        lines.push((format!("dvma {}", w.label(&a.key)), color, points(a)));
    }
    for a in w.peers() {
        lines.push((w.label(&a.key), peer_color(&a.key.server), points(a)));
    }
    lines.retain(|(_, _, p)| !p.is_empty());
    let lo = lines
        .iter()
        .flat_map(|(_, _, p)| p.iter().map(|&(x, _)| x))
        .fold(f64::INFINITY, f64::min);
    let hi = lines
        .iter()
        .flat_map(|(_, _, p)| p.iter().map(|&(x, _)| x))
        .fold(0.0f64, f64::max);
    let (lo, hi) = if lines.is_empty() {
        (1.0, 1000.0)
    } else {
        (lo * 0.8, (hi * 1.25).max(lo * 2.0))
    };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let caption = if lines.is_empty() {
            format!("{}: latency CDF (no latency data)", w.workload)
        } else {
            format!("{}: latency CDF", w.workload)
        };
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d((lo..hi).log_scale(), 0f64..1f64)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("latency, µs (log scale)")
            .y_desc("fraction of I/Os")
            .x_label_formatter(&|x| {
                if *x >= 10.0 {
                    format!("{x:.0}")
                } else {
                    format!("{x:.1}")
                }
            })
            .draw()
            .map_err(err)?;
        for (label, color, pts) in &lines {
            let color = *color;
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(err)?
                .label(label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        if !lines.is_empty() {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// The CDF points usable on a log scale.
fn points(a: &Aggregate) -> Vec<(f64, f64)> {
    a.latency_cdf
        .iter()
        .copied()
        .filter(|&(x, f)| x > 0.0 && x.is_finite() && f.is_finite())
        .collect()
}

/// One bar of [`plot_stacked`]: its label and a value per part (the parts'
/// order is the plot's).
#[derive(Clone, Debug, PartialEq)]
pub struct StackedBar {
    /// The bar's label (a configuration).
    pub label: String,
    /// One value per part, each ≥ 0 (negative or NaN values draw nothing).
    pub values: Vec<f64>,
}

/// One line of [`plot_curves`]: its label and `(x, median, min, max)`
/// points.
#[derive(Clone, Debug, PartialEq)]
pub struct Curve {
    /// Legend label.
    pub label: String,
    /// `(x, median, min, max)`, in x order.
    pub points: Vec<(f64, f64, f64, f64)>,
}

/// A color per series, distinguishable in print.
fn series_color(i: usize) -> RGBColor {
    const C: [RGBColor; 10] = [
        RGBColor(70, 120, 190),
        RGBColor(200, 80, 20),
        RGBColor(60, 160, 90),
        RGBColor(150, 90, 180),
        RGBColor(210, 170, 40),
        RGBColor(120, 120, 120),
        RGBColor(40, 170, 190),
        RGBColor(190, 60, 120),
        RGBColor(140, 100, 60),
        RGBColor(200, 200, 200),
    ];
    C[i % C.len()]
}

/// Horizontal stacked bars: one bar per item, its segments the parts (in
/// `parts` order, colors by part, a legend of the parts), in `unit`.
/// Returns the SVG text, or plotters' error message.
pub fn plot_stacked(
    title: &str,
    unit: &str,
    parts: &[&str],
    bars: &[StackedBar],
) -> Result<String, String> {
    let n = bars.len().max(1);
    let clean = |v: f64| if v.is_finite() && v > 0.0 { v } else { 0.0 };
    let xmax = bars
        .iter()
        .map(|b| b.values.iter().copied().map(clean).sum::<f64>())
        .fold(0.0f64, f64::max)
        .max(f64::MIN_POSITIVE)
        * 1.25;
    let label_w = bars.iter().map(|b| b.label.len()).max().unwrap_or(8) as u32 * 7 + 16;
    let height = 130 + 22 * n as u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(label_w.min(WIDTH / 2))
            .build_cartesian_2d(0f64..xmax, (0usize..n).into_segmented())
            .map_err(err)?;
        let row = |i: usize| n - 1 - i;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(n)
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(s) if *s < bars.len() => bars[n - 1 - *s].label.clone(),
                _ => String::new(),
            })
            .x_desc(unit)
            .draw()
            .map_err(err)?;
        for (pi, part) in parts.iter().enumerate() {
            let color = series_color(pi);
            chart
                .draw_series(bars.iter().enumerate().map(|(i, b)| {
                    let x0: f64 = b.values.iter().take(pi).copied().map(clean).sum();
                    let w = b.values.get(pi).copied().map_or(0.0, clean);
                    let mut r = Rectangle::new(
                        [
                            (x0, SegmentValue::Exact(row(i))),
                            (x0 + w, SegmentValue::Exact(row(i) + 1)),
                        ],
                        color.filled(),
                    );
                    r.set_margin(3, 3, 0, 0);
                    r
                }))
                .map_err(err)?
                .label(*part)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// Lines of medians with min–max whiskers over a log2 x axis (say, I/Os
/// per second against the queue depth). Returns the SVG text, or plotters'
/// error message.
pub fn plot_curves(
    title: &str,
    x_desc: &str,
    y_desc: &str,
    curves: &[Curve],
) -> Result<String, String> {
    let xs = curves
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.0))
        .filter(|x| x.is_finite() && *x > 0.0);
    let (xlo, xhi) = xs.fold((f64::INFINITY, 0.0f64), |(lo, hi), x| {
        (lo.min(x), hi.max(x))
    });
    let (xlo, xhi) = if xhi > 0.0 {
        (xlo / 1.5, xhi * 1.5)
    } else {
        (0.5, 64.0)
    };
    let ymax = curves
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.3))
        .filter(|y| y.is_finite())
        .fold(0.0f64, f64::max)
        .max(f64::MIN_POSITIVE)
        * 1.15;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((xlo..xhi).log_scale().base(2.0), 0f64..ymax)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()
            .map_err(err)?;
        for (i, c) in curves.iter().enumerate() {
            let color = series_color(i);
            chart
                .draw_series(LineSeries::new(
                    c.points.iter().map(|p| (p.0, p.1)),
                    color.stroke_width(2),
                ))
                .map_err(err)?
                .label(c.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(
                    c.points.iter().map(|p| {
                        PathElement::new(vec![(p.0, p.2), (p.0, p.3)], color.stroke_width(1))
                    }),
                )
                .map_err(err)?;
            chart
                .draw_series(
                    c.points
                        .iter()
                        .map(|p| Circle::new((p.0, p.1), 3, color.filled())),
                )
                .map_err(err)?;
        }
        if !curves.is_empty() {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod stacked_tests {
    use super::*;

    #[test]
    fn stacked_bars_and_curves_draw_every_series() {
        let parts = ["spl", "bus_dma", "driver"];
        let bars = vec![
            StackedBar {
                label: "permanent/intr".into(),
                values: vec![10.0, 20.0, 30.0],
            },
            StackedBar {
                label: "strict/thread".into(),
                values: vec![5.0, f64::NAN, 3000.0],
            },
        ];
        let svg = plot_stacked("CPU ns per I/O by part", "ns", &parts, &bars).expect("svg");
        assert!(svg.starts_with("<svg"), "{svg}");
        for l in [
            "permanent/intr",
            "strict/thread",
            "spl",
            "bus_dma",
            "driver",
        ] {
            assert!(svg.contains(l), "{l} missing");
        }
        let curves = vec![Curve {
            label: "slots/intr".into(),
            points: vec![(1.0, 10.0, 9.0, 11.0), (32.0, 40.0, 35.0, 42.0)],
        }];
        let svg = plot_curves("IOPS vs depth", "queue depth", "IOPS", &curves).expect("svg");
        assert!(svg.contains("slots/intr"));
        // Nothing to draw is still a plot.
        assert!(plot_curves("empty", "x", "y", &[]).is_ok());
        assert!(plot_stacked("empty", "ns", &parts, &[]).is_ok());
    }
}
