//! PNG charts for benchmark reports: grouped bar charts with min–max whiskers ([`BarChart`]) and
//! line charts ([`LineChart`]). Images are 900×500 px with the legend in a column on the right;
//! text uses the embedded DejaVu Sans (`assets/`), so no system fonts are needed.

use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail, ensure};
use plotters::coord::Shift;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::data::float::pretty_print_float;
use plotters::prelude::{
    BLACK, BitMapBackend, ChartBuilder, Color, DrawingArea, EmptyElement, IntoDrawingArea,
    IntoFont, IntoLogRange, PathElement, Rectangle, Text, WHITE,
};
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{FontStyle, RGBColor, TextStyle};

/// Image size in pixels.
const SIZE: (u32, u32) = (900, 500);
/// The font family name the embedded font is registered under.
const FONT: &str = "sans-serif";
/// Series colours in order (from Tableau 10); a seventh series reuses the first colour.
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),  // blue
    RGBColor(255, 127, 14),  // orange
    RGBColor(44, 160, 44),   // green
    RGBColor(214, 39, 40),   // red
    RGBColor(148, 103, 189), // purple
    RGBColor(140, 86, 75),   // brown
];

/// Whether `v`'s leading digit is 1, 2 or 5 (and the rest zeros), e.g. 200 or 0.5.
fn leads_with_1_2_or_5(v: f64) -> bool {
    let lead = v / 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0].iter().any(|d| (lead - d).abs() < 1e-6)
}

/// A figure with its spread over repeated rounds.
#[derive(Clone, Copy, Debug)]
pub struct Spread {
    /// The median over the rounds: the bar height.
    pub median: f64,
    /// The lowest round: the bottom of the whisker.
    pub min: f64,
    /// The highest round: the top of the whisker.
    pub max: f64,
}

impl Spread {
    /// The median, minimum and maximum of `values` (the median of an even count is the mean of the
    /// two middle values); `None` when `values` is empty.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let (min, max) = (*sorted.first()?, *sorted.last()?);
        // The two middle values; for an odd count both are the middle one.
        let n = sorted.len();
        let median = (sorted[(n - 1) / 2] + sorted[n / 2]) / 2.0;
        Some(Spread { median, min, max })
    }
}

/// Grouped bar chart: one group per x label (e.g. "p50", "p90", "p99"), one coloured bar per
/// series (e.g. route "direct", "HAProxy pair", "Weft") inside each group, the bar height = median,
/// a whisker from min to max. The y axis starts at 0, so values must not be negative.
pub struct BarChart {
    /// Drawn above the chart; also names the chart in errors.
    pub title: String,
    /// The y axis description, with the unit.
    pub y_label: String,
    /// The label under each group, left to right.
    pub groups: Vec<String>,
    /// One bar per group each, in legend order.
    pub series: Vec<BarSeries>,
}

/// One series of a [`BarChart`]: a bar per group, in the order of [`BarChart::groups`].
pub struct BarSeries {
    /// The legend entry.
    pub name: String,
    /// One per group; `None` = no bar in that group.
    pub values: Vec<Option<Spread>>,
}

impl BarChart {
    /// Renders the chart as a PNG at `path`, creating its parent directories.
    pub fn render_png(&self, path: &Path) -> Result<()> {
        let top = self
            .highest()
            .with_context(|| format!("bar chart {:?}", self.title))?;
        let names: Vec<&str> = self.series.iter().map(|s| s.name.as_str()).collect();
        render(path, &self.title, &names, |area| {
            let mut chart = ChartBuilder::on(area)
                .margin(15)
                .x_label_area_size(35)
                .y_label_area_size(80)
                .build_cartesian_2d(0.0..self.groups.len() as f64, 0.0..top * 1.1)?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(0) // group names are drawn below, centred under each group
                .y_desc(&self.y_label)
                .y_label_formatter(&|v| pretty_print_float(*v, false))
                .label_style(label_style())
                .light_line_style(BLACK.mix(0.04))
                .draw()?;
            // Each group spans one x unit: 10 % padding on each side, then one slot per series.
            let slot = 0.8 / self.series.len() as f64;
            for (i, (series, colour)) in self.series.iter().zip(PALETTE.iter().cycle()).enumerate()
            {
                for (group, spread) in series.values.iter().enumerate() {
                    let Some(Spread { median, min, max }) = *spread else {
                        continue;
                    };
                    let mid = group as f64 + 0.1 + (i as f64 + 0.5) * slot;
                    let (half_bar, half_cap) = (slot * 0.4, slot * 0.15);
                    let bar = Rectangle::new(
                        [(mid - half_bar, 0.0), (mid + half_bar, median)],
                        colour.filled(),
                    );
                    chart.draw_series([bar])?;
                    let whisker = [
                        vec![(mid, min), (mid, max)],
                        vec![(mid - half_cap, min), (mid + half_cap, min)],
                        vec![(mid - half_cap, max), (mid + half_cap, max)],
                    ];
                    chart.draw_series(
                        whisker.map(|line| PathElement::new(line, BLACK.stroke_width(2))),
                    )?;
                }
            }
            let style = label_style().pos(Pos::new(HPos::Center, VPos::Top));
            chart.draw_series(self.groups.iter().enumerate().map(|(group, name)| {
                EmptyElement::at((group as f64 + 0.5, 0.0))
                    + Text::new(name.clone(), (0, 8), &style)
            }))?;
            Ok(())
        })
    }

    /// Checks the input and returns the largest whisker top.
    fn highest(&self) -> Result<f64> {
        ensure!(
            !self.groups.is_empty() && !self.series.is_empty(),
            "no groups or no series"
        );
        let mut highest = None::<f64>;
        for series in &self.series {
            ensure!(
                series.values.len() == self.groups.len(),
                "series {:?} has {} values for {} groups",
                series.name,
                series.values.len(),
                self.groups.len()
            );
            for Spread { median, min, max } in series.values.iter().flatten() {
                ensure!(
                    [median, min, max]
                        .iter()
                        .all(|v| v.is_finite() && **v >= 0.0),
                    "series {:?} has a non-finite or negative value",
                    series.name
                );
                highest = Some(highest.map_or(*max, |h| h.max(*max)));
            }
        }
        match highest {
            Some(h) if h > 0.0 => Ok(h),
            Some(_) => Ok(1.0), // all zero: any positive scale will do
            None => bail!("no values"),
        }
    }
}

/// Line chart of y against x, one line with point markers per series, optional log-scale x axis.
pub struct LineChart {
    /// Drawn above the chart; also names the chart in errors.
    pub title: String,
    /// The x axis description, with the unit.
    pub x_label: String,
    /// The y axis description, with the unit.
    pub y_label: String,
    /// Logarithmic x axis (all x must then be > 0).
    pub log_x: bool,
    /// The lines, in legend order.
    pub series: Vec<LineSeries>,
}

/// One line of a [`LineChart`].
pub struct LineSeries {
    /// The legend entry.
    pub name: String,
    /// The `(x, y)` points, joined in this order.
    pub points: Vec<(f64, f64)>,
}

impl LineChart {
    /// Renders the chart as a PNG at `path`, creating its parent directories.
    pub fn render_png(&self, path: &Path) -> Result<()> {
        let (x, y) = self
            .ranges()
            .with_context(|| format!("line chart {:?}", self.title))?;
        let names: Vec<&str> = self.series.iter().map(|s| s.name.as_str()).collect();
        render(path, &self.title, &names, |area| {
            if self.log_x {
                self.plot(area, x.log_scale(), y)
            } else {
                self.plot(area, x, y)
            }
        })
    }

    /// Draws axes and lines on `area`; generic over the linear and the logarithmic x axis.
    fn plot<X>(&self, area: &Area, x: X, y: Range<f64>) -> Result<()>
    where
        X: AsRangedCoord<Value = f64>,
        X::CoordDescType: ValueFormatter<f64>,
    {
        let mut chart = ChartBuilder::on(area)
            .margin(15)
            .x_label_area_size(50)
            .y_label_area_size(80)
            .build_cartesian_2d(x, y)?;
        chart
            .configure_mesh()
            .x_desc(&self.x_label)
            .y_desc(&self.y_label)
            .x_label_formatter(&|v| {
                // A log axis ticks every 1..9 of a decade: label 1, 2 and 5 only.
                if self.log_x && !leads_with_1_2_or_5(*v) {
                    String::new()
                } else {
                    pretty_print_float(*v, false)
                }
            })
            .y_label_formatter(&|v| pretty_print_float(*v, false))
            .label_style(label_style())
            .light_line_style(BLACK.mix(0.04))
            .draw()?;
        for (series, colour) in self.series.iter().zip(PALETTE.iter().cycle()) {
            let style = colour.filled().stroke_width(2);
            chart.draw_series(
                plotters::series::LineSeries::new(series.points.clone(), style).point_size(4),
            )?;
        }
        Ok(())
    }

    /// Checks the input and returns the x and y axis ranges: x spans the points with a little
    /// margin for the markers, y runs from 0 (or the lowest y) to 10 % above the highest y.
    fn ranges(&self) -> Result<(Range<f64>, Range<f64>)> {
        ensure!(!self.series.is_empty(), "no series");
        let (mut x, mut y) = ([f64::INFINITY, f64::NEG_INFINITY], [0.0_f64, 0.0]);
        for series in &self.series {
            ensure!(
                !series.points.is_empty(),
                "series {:?} has no points",
                series.name
            );
            for &(px, py) in &series.points {
                ensure!(
                    px.is_finite() && py.is_finite(),
                    "series {:?} has a non-finite value",
                    series.name
                );
                ensure!(
                    !self.log_x || px > 0.0,
                    "series {:?} has x <= 0 on a log axis",
                    series.name
                );
                x = [x[0].min(px), x[1].max(px)];
                y = [y[0].min(py), y[1].max(py)];
            }
        }
        let x = match (self.log_x, x[0] == x[1]) {
            (true, true) => x[0] / 2.0..x[1] * 2.0,
            (true, false) => {
                let f = (x[1] / x[0]).powf(0.03);
                x[0] / f..x[1] * f
            }
            (false, true) => x[0] - 1.0..x[1] + 1.0,
            (false, false) => {
                let d = (x[1] - x[0]) * 0.03;
                x[0] - d..x[1] + d
            }
        };
        let top = if y[1] > y[0] {
            y[1] + (y[1] - y[0]) * 0.1
        } else {
            1.0
        };
        Ok((x, y[0]..top))
    }
}

/// The drawing area a chart is plotted on.
type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// Draws the white canvas, the title and the legend of `names`, lets `plot` draw the chart in the
/// remaining area and writes the PNG to `path`.
fn render(
    path: &Path,
    title: &str,
    names: &[&str],
    plot: impl FnOnce(&Area) -> Result<()>,
) -> Result<()> {
    let context = || format!("render chart {title:?} to {}", path.display());
    register_font().with_context(context)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(context)?;
    }
    let draw = || -> Result<()> {
        let root = BitMapBackend::new(path, SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(title, (FONT, 24))?;
        let mut widest = 0;
        for name in names {
            widest = widest.max(root.estimate_text_size(name, &label_style())?.0);
        }
        let (chart, legend) = root.split_horizontally(SIZE.0 - widest - 45);
        for (i, (name, colour)) in names.iter().zip(PALETTE.iter().cycle()).enumerate() {
            let y = 25 + 26 * i as i32;
            legend.draw(&Rectangle::new([(0, y - 7), (14, y + 7)], colour.filled()))?;
            legend.draw(&Text::new(
                *name,
                (22, y),
                label_style().pos(Pos::new(HPos::Left, VPos::Center)),
            ))?;
        }
        plot(&chart)?;
        root.present()?;
        Ok(())
    };
    draw().with_context(context)
}

/// The style of tick labels, group labels and legend entries.
fn label_style() -> TextStyle<'static> {
    (FONT, 15).into_font().into()
}

/// Registers the embedded DejaVu Sans as [`FONT`]; only the first call does the work.
fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let registered = REGISTERED.get_or_init(|| {
        let font = include_bytes!("../assets/DejaVuSans.ttf");
        plotters::style::register_font(FONT, FontStyle::Normal, font).is_ok()
    });
    ensure!(
        *registered,
        "the embedded font assets/DejaVuSans.ttf is not a valid font"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks the PNG signature and returns the width and height from the IHDR chunk.
    fn png_size(path: &Path) -> (u32, u32) {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
        assert_eq!(&bytes[12..16], b"IHDR", "first chunk");
        let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
        (be(16), be(20))
    }

    fn bar_chart() -> BarChart {
        let series = |name: &str, scale: f64| BarSeries {
            name: name.into(),
            values: [1.0, 2.0, 4.0]
                .iter()
                .map(|p| Spread::of(&[p * scale, p * scale * 1.1, p * scale * 1.3]))
                .collect(),
        };
        BarChart {
            title: "Request latency".into(),
            y_label: "latency (µs)".into(),
            groups: vec!["p50".into(), "p90".into(), "p99".into()],
            series: vec![
                series("direct", 50.0),
                series("HAProxy pair", 90.0),
                series("Weft", 80.0),
            ],
        }
    }

    fn line_chart(log_x: bool) -> LineChart {
        let series = |name: &str, slope: f64| LineSeries {
            name: name.into(),
            points: [1.0, 10.0, 100.0, 1000.0]
                .iter()
                .map(|&x: &f64| (x, slope * x.ln() + 20.0))
                .collect(),
        };
        LineChart {
            title: "Throughput by payload".into(),
            x_label: "payload (KiB)".into(),
            y_label: "throughput (MB/s)".into(),
            log_x,
            series: vec![series("direct", 30.0), series("Weft", 22.0)],
        }
    }

    /// The error message of a render that must fail; it names the chart.
    fn render_error(render: impl FnOnce(&Path) -> Result<()>, title: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let message = format!("{:#}", render(&dir.path().join("chart.png")).unwrap_err());
        assert!(message.contains(title), "{message}");
        message
    }

    #[test]
    fn spread_takes_median_min_and_max() {
        let odd = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((odd.median, odd.min, odd.max), (2.0, 1.0, 3.0));
        let even = Spread::of(&[4.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!((even.median, even.min, even.max), (3.0, 1.0, 10.0));
        assert!(Spread::of(&[]).is_none());
    }

    #[test]
    fn renders_bar_chart_png() {
        let dir = tempfile::tempdir().unwrap();
        let full = dir.path().join("nested/dir/full.png");
        bar_chart().render_png(&full).unwrap();
        assert_eq!(png_size(&full), (900, 500));

        // Dropping the smallest bar keeps the axes and legend, so only that bar can differ.
        let mut fewer = bar_chart();
        fewer.series[0].values[0] = None;
        let fewer_path = dir.path().join("fewer.png");
        fewer.render_png(&fewer_path).unwrap();
        assert_eq!(png_size(&fewer_path), (900, 500));
        assert_ne!(
            std::fs::read(&full).unwrap(),
            std::fs::read(&fewer_path).unwrap()
        );
    }

    #[test]
    fn renders_line_chart_png() {
        let dir = tempfile::tempdir().unwrap();
        for log_x in [false, true] {
            let path = dir.path().join(format!("line-{log_x}.png"));
            line_chart(log_x).render_png(&path).unwrap();
            assert_eq!(png_size(&path), (900, 500));
        }
    }

    #[test]
    fn rejects_bad_bar_charts() {
        let mut no_groups = bar_chart();
        no_groups.groups.clear();
        render_error(|p| no_groups.render_png(p), "Request latency");

        let mut no_series = bar_chart();
        no_series.series.clear();
        render_error(|p| no_series.render_png(p), "Request latency");

        let mut mismatched = bar_chart();
        mismatched.series[1].values.pop();
        let message = render_error(|p| mismatched.render_png(p), "Request latency");
        assert!(message.contains("2 values for 3 groups"), "{message}");

        let mut not_finite = bar_chart();
        not_finite.series[2].values[1] = Some(Spread {
            median: f64::NAN,
            min: 1.0,
            max: 2.0,
        });
        let message = render_error(|p| not_finite.render_png(p), "Request latency");
        assert!(message.contains("non-finite"), "{message}");
    }

    #[test]
    fn rejects_bad_line_charts() {
        let mut no_series = line_chart(false);
        no_series.series.clear();
        render_error(|p| no_series.render_png(p), "Throughput by payload");

        let mut no_points = line_chart(false);
        no_points.series[0].points.clear();
        render_error(|p| no_points.render_png(p), "Throughput by payload");

        let mut not_finite = line_chart(false);
        not_finite.series[1].points[2].1 = f64::INFINITY;
        let message = render_error(|p| not_finite.render_png(p), "Throughput by payload");
        assert!(message.contains("non-finite"), "{message}");

        let mut zero_on_log = line_chart(true);
        zero_on_log.series[0].points[0].0 = 0.0;
        render_error(|p| zero_on_log.render_png(p), "Throughput by payload");
    }
}
