//! PNG figures: 2-D layouts colored by label, ROC curves, confusion matrices and training
//! curves. Every figure has a fixed pixel size so reports and tests can rely on it.

use std::path::Path;

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{EvalError, Result};
use crate::metrics::Confusion;

/// Pixel size of every figure.
pub const SIZE: (u32, u32) = (960, 720);

/// Tableau-10, then its lighter companions: distinct for up to 20 classes, then repeating.
const PALETTE: [(u8, u8, u8); 20] = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
];

pub fn color(i: usize) -> RGBColor {
    let (r, g, b) = PALETTE[i % PALETTE.len()];
    RGBColor(r, g, b)
}

fn plot_err(path: &Path) -> impl Fn(String) -> EvalError + '_ {
    move |e| EvalError::input(path, format!("cannot draw the figure: {e}"))
}

/// Draws into a PNG at `path` (written to a temp name, then renamed).
pub(crate) fn figure(path: &Path, draw: impl FnOnce(&DrawingArea<BitMapBackend, Shift>) -> Result<(), String>) -> Result<()> {
    // BitMapBackend picks the encoder from the extension, which the temp name keeps.
    let render = |tmp: &Path| {
        let root = BitMapBackend::new(tmp, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(path)(e.to_string()))?;
        draw(&root).map_err(plot_err(path))?;
        root.present().map_err(|e| plot_err(path)(e.to_string()))
    };
    common::atomic::write_via_temp(path, render, EvalError::io)
}

/// An axis range covering `v` with 5 % padding (non-finite values ignored).
pub(crate) fn range(v: impl Iterator<Item = f64> + Clone) -> std::ops::Range<f64> {
    let lo = v.clone().fold(f64::INFINITY, f64::min);
    let hi = v.fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() || !hi.is_finite() {
        return 0.0..1.0;
    }
    // A flat series still gets a readable axis: at least 1 % of its value either side.
    let pad = ((hi - lo) * 0.05).max(0.01 * lo.abs().max(hi.abs())).max(1e-9);
    (lo - pad)..(hi + pad)
}

/// A titled chart with numeric axes, the frame every scatter and curve figure shares.
pub(crate) fn xy_chart<'a, 'b>(
    root: &'a DrawingArea<BitMapBackend<'b>, Shift>,
    title: &str,
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
) -> Result<ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>, String> {
    ChartBuilder::on(root).caption(title, ("sans-serif", 24)).margin(12).x_label_area_size(40).y_label_area_size(50).build_cartesian_2d(x, y).map_err(|e| e.to_string())
}

/// Points `xy` colored by class, with a legend (grey for `None`, drawn first).
pub fn scatter(path: &Path, title: &str, xy: &[(f64, f64)], class: &[Option<usize>], names: &[String], axes: (&str, &str)) -> Result<()> {
    figure(path, |root| {
        let mut chart = xy_chart(root, title, range(xy.iter().map(|p| p.0)), range(xy.iter().map(|p| p.1)))?;
        chart.configure_mesh().x_desc(axes.0).y_desc(axes.1).light_line_style(WHITE).draw().map_err(|e| e.to_string())?;
        let radius = if xy.len() > 20_000 { 1 } else if xy.len() > 3_000 { 2 } else { 3 };
        let grey: Vec<(f64, f64)> = xy.iter().zip(class).filter(|(_, c)| c.is_none()).map(|(p, _)| *p).collect();
        if !grey.is_empty() {
            chart.draw_series(grey.iter().map(|&p| Circle::new(p, radius, RGBColor(210, 210, 210).filled()))).map_err(|e| e.to_string())?;
        }
        for (k, name) in names.iter().enumerate() {
            let pts: Vec<(f64, f64)> = xy.iter().zip(class).filter(|(_, c)| **c == Some(k)).map(|(p, _)| *p).collect();
            let c = color(k);
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, radius, c.mix(0.8).filled())))
                .map_err(|e| e.to_string())?
                .label(truncate(name, 28))
                .legend(move |(x, y)| Circle::new((x, y), 4, c.filled()));
        }
        if names.len() <= 24 {
            chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).position(SeriesLabelPosition::UpperRight).draw().map_err(|e| e.to_string())?;
        }
        Ok(())
    })
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n { s.to_string() } else { format!("{}…", s.chars().take(n - 1).collect::<String>()) }
}

/// A ROC curve's points (false positive rate, true positive rate), thresholds at every score.
pub fn roc_points(positive: &[bool], score: &[f64]) -> Vec<(f64, f64)> {
    let mut order: Vec<usize> = (0..score.len()).collect();
    order.sort_by(|&a, &b| score[b].total_cmp(&score[a]));
    let p = positive.iter().filter(|&&x| x).count().max(1) as f64;
    let n = positive.iter().filter(|&&x| !x).count().max(1) as f64;
    let (mut tp, mut fp) = (0.0, 0.0);
    let mut pts = vec![(0.0, 0.0)];
    for (r, &i) in order.iter().enumerate() {
        if positive[i] { tp += 1.0 } else { fp += 1.0 }
        let last_of_tie = r + 1 == order.len() || score[order[r + 1]] != score[i];
        if last_of_tie {
            pts.push((fp / n, tp / p));
        }
    }
    pts
}

/// Several ROC curves on one chart, labelled with their AUC.
pub fn roc(path: &Path, title: &str, curves: &[(String, Vec<(f64, f64)>)]) -> Result<()> {
    figure(path, |root| {
        let mut chart = xy_chart(root, title, 0.0..1.0, 0.0..1.0)?;
        chart.configure_mesh().x_desc("false positive rate").y_desc("true positive rate").draw().map_err(|e| e.to_string())?;
        chart.draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], RGBColor(180, 180, 180))).map_err(|e| e.to_string())?;
        for (k, (name, pts)) in curves.iter().enumerate() {
            let c = color(k);
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(2)));
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.9)).border_style(BLACK).position(SeriesLabelPosition::LowerRight).draw().map_err(|e| e.to_string())?;
        Ok(())
    })
}

/// Row-normalized confusion matrix as a heat map with the counts written in the cells; true
/// classes run down from the top (the layout of plotters' `matshow` example).
pub fn confusion(path: &Path, title: &str, cm: &Confusion, names: &[String]) -> Result<()> {
    let k = cm.n_classes as i32;
    let (x_area, y_area, margin, caption) = (if k > 6 { 140 } else { 50 }, 180, 12, 40);
    // Tick labels sit at cell edges; shift them by half a cell to centre them.
    let half_w = (SIZE.0 as i32 - 2 * margin - y_area) / (2 * k.max(1));
    let half_h = (SIZE.1 as i32 - 2 * margin - caption - x_area) / (2 * k.max(1));
    figure(path, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 24))
            .margin(margin)
            .x_label_area_size(x_area)
            .y_label_area_size(y_area)
            .build_cartesian_2d(0..k, k..0)
            .map_err(|e| e.to_string())?;
        let name_of = |v: &i32| names.get(*v as usize).filter(|_| *v < k).map(|n| truncate(n, 22)).unwrap_or_default();
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("predicted")
            .y_desc("true")
            .x_labels(k as usize + 1)
            .y_labels(k as usize + 1)
            .x_label_offset(half_w)
            .y_label_offset(half_h)
            .x_label_formatter(&name_of)
            .y_label_formatter(&name_of)
            .x_label_style(("sans-serif", 13).into_font().transform(if k > 6 { FontTransform::Rotate90 } else { FontTransform::None }))
            .draw()
            .map_err(|e| e.to_string())?;
        for (t, row) in cm.rows().iter().enumerate() {
            let total = row.iter().sum::<u64>().max(1) as f64;
            for (p, &n) in row.iter().enumerate() {
                let f = n as f64 / total;
                let shade = RGBColor((255.0 - 224.0 * f) as u8, (255.0 - 136.0 * f) as u8, (255.0 - 75.0 * f) as u8);
                let (x, y) = (p as i32, t as i32);
                chart.draw_series([Rectangle::new([(x, y), (x + 1, y + 1)], shade.filled())]).map_err(|e| e.to_string())?;
                if k <= 12 {
                    let text_color = if f > 0.6 { WHITE } else { BLACK };
                    let style = ("sans-serif", 18).into_font().color(&text_color).pos(Pos::new(HPos::Center, VPos::Center));
                    let centre = chart.backend_coord(&(x, y));
                    let (w, h) = (half_w, half_h);
                    root.draw(&Text::new(n.to_string(), (centre.0 + w, centre.1 + h), style)).map_err(|e| e.to_string())?;
                }
            }
        }
        Ok(())
    })
}

/// One panel of line series: (name, points) each.
pub struct Panel {
    pub title: String,
    pub y_desc: String,
    pub series: Vec<(String, Vec<(f64, f64)>)>,
}

/// Panels side by side, sharing the x description (training curves).
pub fn panels(path: &Path, title: &str, x_desc: &str, panels: &[Panel]) -> Result<()> {
    figure(path, |root| {
        let root = root.titled(title, ("sans-serif", 24)).map_err(|e| e.to_string())?;
        let areas = root.split_evenly((1, panels.len().max(1)));
        for (area, p) in areas.iter().zip(panels) {
            let pts = p.series.iter().flat_map(|s| s.1.iter().copied());
            let mut chart = ChartBuilder::on(area)
                .caption(&p.title, ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(40)
                .y_label_area_size(55)
                .build_cartesian_2d(range(pts.clone().map(|q| q.0)), range(pts.map(|q| q.1)))
                .map_err(|e| e.to_string())?;
            chart.configure_mesh().x_desc(x_desc).y_desc(&p.y_desc).x_labels(5).draw().map_err(|e| e.to_string())?;
            for (k, (name, s)) in p.series.iter().enumerate() {
                let c = color(k);
                chart
                    .draw_series(LineSeries::new(s.iter().copied(), c.stroke_width(2)))
                    .map_err(|e| e.to_string())?
                    .label(name.clone())
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(2)));
                if s.len() <= 60 {
                    chart.draw_series(s.iter().map(|&q| Circle::new(q, 3, c.filled()))).map_err(|e| e.to_string())?;
                }
            }
            chart.configure_series_labels().background_style(WHITE.mix(0.9)).border_style(BLACK).draw().map_err(|e| e.to_string())?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roc_points_run_from_origin_to_one_one() {
        let pts = roc_points(&[true, false, true, false], &[0.9, 0.8, 0.7, 0.1]);
        assert_eq!(pts, vec![(0.0, 0.0), (0.0, 0.5), (0.5, 0.5), (0.5, 1.0), (1.0, 1.0)]);
    }

    #[test]
    fn figures_are_pngs_of_the_fixed_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.png");
        let xy = vec![(0.0, 0.0), (1.0, 1.0), (2.0, 0.5)];
        scatter(&p, "t", &xy, &[Some(0), Some(1), None], &["a".into(), "b".into()], ("x", "y")).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
        let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        assert_eq!((w, h), SIZE);
        let cm = Confusion::new(&[0, 1, 1], &[0, 1, 0], 2);
        confusion(&dir.path().join("c.png"), "cm", &cm, &["a".into(), "b".into()]).unwrap();
        roc(&dir.path().join("r.png"), "roc", &[("m".into(), roc_points(&[true, false], &[0.9, 0.1]))]).unwrap();
        let hidden = std::fs::read_dir(dir.path()).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with('.')).count();
        assert_eq!(hidden, 0, "no temporary file left");
    }
}
