//! PNG plots of start time against the number of VMs, one colour per series (mode).
//!
//! Text is drawn with `ab_glyph` from a TrueType font found on the machine (DejaVu or
//! Liberation Sans, or the file `FAASNET_SIM_FONT` names), so no fontconfig or freetype
//! library is needed. Without a font the plot is drawn without text rather than not at all.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::error::{Result, SimError};

const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
];

/// Registers a font for "sans-serif" once; true when one was found.
fn font_available() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        let env = std::env::var("FAASNET_SIM_FONT").ok();
        let candidates = env
            .iter()
            .map(String::as_str)
            .chain(FONT_CANDIDATES.iter().copied());
        for path in candidates {
            if let Ok(bytes) = std::fs::read(path) {
                // plotters keeps fonts for the life of the process; one small leak per run.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// One plotted series: a label and `(n, p50_s, max_s)` points.
pub type Series = (String, Vec<(f64, f64, f64)>);

const COLORS: [RGBColor; 6] = [
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Writes a PNG (1000x600) of start time against N: for each series (a mode, say) a solid
/// line through the medians and a thin line through the maxima. `series` holds
/// `(label, [(n, p50_s, max_s), ...])`. The x axis is logarithmic when N spans 4x or more.
pub fn plot_start_times(path: &Path, series: &[Series], title: &str) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| SimError::Plot {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let points = || series.iter().flat_map(|(_, pts)| pts.iter());
    if points().next().is_none() {
        return Err(err(&"no data"));
    }
    let x_min = points()
        .map(|p| p.0)
        .fold(f64::INFINITY, f64::min)
        .max(1e-9);
    let x_max = points().map(|p| p.0).fold(0.0, f64::max).max(x_min * 1.01);
    let y_max = points().map(|p| p.1.max(p.2)).fold(0.0, f64::max).max(1e-9) * 1.08;
    let text = font_available();
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if text {
        builder
            .caption(title, ("sans-serif", 24))
            .x_label_area_size(45)
            .y_label_area_size(60);
    } else {
        builder.x_label_area_size(5).y_label_area_size(5);
    }
    // A log x axis is drawn as a linear axis over log2(N) with labels 2^k: plotters' own log
    // axis crowds its labels near each power of ten.
    let log_x = x_max / x_min >= 4.0;
    let fx = move |x: f64| if log_x { x.log2() } else { x };
    let (lo, hi) = if log_x {
        (x_min.log2().floor() - 0.3, x_max.log2().ceil() + 0.3)
    } else {
        (x_min.min(0.0), x_max * 1.02)
    };
    let mut chart = builder
        .build_cartesian_2d(lo..hi, 0.0..y_max)
        .map_err(|e| err(&e))?;
    let label_x = move |x: &f64| {
        if log_x {
            format!("{:.0}", 2f64.powf(*x))
        } else {
            format!("{x:.0}")
        }
    };
    let mut mesh = chart.configure_mesh();
    mesh.light_line_style(WHITE);
    if text {
        if log_x {
            mesh.x_labels((hi - lo).ceil() as usize + 1);
        }
        mesh.x_desc("VMs starting at once (N)")
            .y_desc("start time (s)")
            .x_label_formatter(&label_x)
            .label_style(("sans-serif", 16));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| err(&e))?;
    for (i, (label, pts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut pts: Vec<(f64, f64, f64)> = pts.iter().map(|p| (fx(p.0), p.1, p.2)).collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let p50 = chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.0, p.1)),
                color.stroke_width(3),
            ))
            .map_err(|e| err(&e))?;
        if text {
            p50.label(format!("{label} p50")).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        }
        chart
            .draw_series(
                pts.iter()
                    .map(|p| Circle::new((p.0, p.1), 4, color.filled())),
            )
            .map_err(|e| err(&e))?;
        let max_style = color.mix(0.6).stroke_width(1);
        let max = chart
            .draw_series(LineSeries::new(pts.iter().map(|p| (p.0, p.2)), max_style))
            .map_err(|e| err(&e))?;
        if text {
            max.label(format!("{label} max"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], max_style));
        }
        chart
            .draw_series(
                pts.iter()
                    .map(|p| Cross::new((p.0, p.2), 5, color.stroke_width(2))),
            )
            .map_err(|e| err(&e))?;
    }
    if text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 16))
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.png");
        let series = vec![
            (
                "baseline".to_string(),
                vec![(1.0, 5.0, 5.0), (16.0, 30.0, 40.0)],
            ),
            (
                "faasnet".to_string(),
                vec![(1.0, 3.0, 3.0), (16.0, 4.0, 5.0)],
            ),
        ];
        plot_start_times(&path, &series, "test").unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(plot_start_times(&path, &[], "empty").is_err());
    }
}
