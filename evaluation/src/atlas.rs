//! `atlas-plot`: the atlas's own 2-D coordinates (Allen `cell_metadata.csv`), the K largest
//! clusters colored and named from `cluster.csv` + `cluster_annotation_term.csv`, every other
//! cell grey, chosen clusters drawn again on top in black outline (what `s1_rawUmap.py` did).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use dataloader::select::CsvRows;
use plotters::prelude::*;

use crate::error::{EvalError, Result};
use crate::plots::{self, color};

/// `neurofm-eval atlas-plot` settings.
#[derive(Debug, Clone, clap::Args)]
pub struct AtlasConfig {
    /// Per-cell CSV with coordinates and a cluster id (Allen `cell_metadata.csv`).
    #[arg(long)]
    pub cell_metadata: PathBuf,
    /// Cluster table mapping the id to a term label (Allen `cluster.csv`).
    #[arg(long)]
    pub cluster: Option<PathBuf>,
    /// Term labels to names (Allen `cluster_annotation_term.csv`).
    #[arg(long)]
    pub annotation: Option<PathBuf>,
    #[arg(long, default_value = "cluster_alias")]
    pub cluster_col: String,
    #[arg(long, default_value = "x")]
    pub x_col: String,
    #[arg(long, default_value = "y")]
    pub y_col: String,
    /// Column of the annotation CSV shown in the legend.
    #[arg(long, default_value = "name")]
    pub name_col: String,
    /// Clusters colored (the largest); the rest are grey.
    #[arg(long, default_value_t = 10)]
    pub top_k: usize,
    /// Cluster ids drawn on top with a black outline (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub highlight: Vec<String>,
    #[arg(long, default_value = "atlas.png")]
    pub out: PathBuf,
}

/// A small CSV (the cluster tables) held whole, its columns found by header name.
struct Table {
    csv: CsvRows,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn read(path: &Path) -> Result<Table> {
        let mut csv = CsvRows::open(path)?;
        let rows = csv.by_ref().map(|r| r.map(|(_, fields)| fields)).collect::<dataloader::Result<_>>()?;
        Ok(Table { csv, rows })
    }

    fn col(&self, name: &str, flag: &str) -> Result<usize> {
        Ok(self.csv.column(name, flag)?)
    }
}

/// Cluster id → display name through the two Allen tables (id → term label → name).
fn cluster_names(cfg: &AtlasConfig) -> Result<HashMap<String, String>> {
    let (Some(cluster), Some(annotation)) = (&cfg.cluster, &cfg.annotation) else { return Ok(HashMap::new()) };
    let c = Table::read(cluster)?;
    let a = Table::read(annotation)?;
    let (c_id, c_label) = (c.col(&cfg.cluster_col, "--cluster-col")?, c.col("label", "cluster label")?);
    let (a_label, a_name) = (a.col("label", "term label")?, a.col(&cfg.name_col, "--name-col")?);
    let names: HashMap<&str, &str> = a.rows.iter().map(|r| (r[a_label].as_str(), r[a_name].as_str())).collect();
    Ok(c.rows.iter().filter_map(|r| names.get(r[c_label].as_str()).map(|n| (r[c_id].clone(), n.to_string()))).collect())
}

/// The atlas's cells as the plot needs them, streamed from the metadata CSV (the Allen one is
/// ~1 GB for 3 M cells): 12 bytes per cell, cluster ids dictionary-encoded.
struct Points {
    x: Vec<f32>,
    y: Vec<f32>,
    cluster: Vec<u32>,
    /// Cluster id of each code.
    ids: Vec<String>,
}

impl Points {
    fn read(cfg: &AtlasConfig) -> Result<Points> {
        let path = &cfg.cell_metadata;
        let rows = CsvRows::open(path)?;
        let (xi, yi, ci) = (rows.column(&cfg.x_col, "--x-col")?, rows.column(&cfg.y_col, "--y-col")?, rows.column(&cfg.cluster_col, "--cluster-col")?);
        let header = rows.header.clone();
        let mut pts = Points { x: Vec::new(), y: Vec::new(), cluster: Vec::new(), ids: Vec::new() };
        let mut code_of: HashMap<String, u32> = HashMap::new();
        for row in rows {
            let (line, r) = row?;
            let num = |j: usize| r[j].parse::<f32>().map_err(|_| EvalError::input(path, format!("line {line}: `{}` is not a number ({})", r[j], header[j])));
            pts.x.push(num(xi)?);
            pts.y.push(num(yi)?);
            let next = pts.ids.len() as u32;
            let code = *code_of.entry(r[ci].clone()).or_insert_with(|| {
                pts.ids.push(r[ci].clone());
                next
            });
            pts.cluster.push(code);
        }
        if pts.x.is_empty() {
            return Err(EvalError::input(path, "has no cells"));
        }
        Ok(pts)
    }

    fn len(&self) -> usize {
        self.x.len()
    }

    /// The cells of cluster `code` as plot points.
    fn of(&self, code: u32) -> impl Iterator<Item = (f64, f64)> + '_ {
        (0..self.len()).filter(move |&i| self.cluster[i] == code).map(|i| (self.x[i] as f64, self.y[i] as f64))
    }
}

/// Draws the plot; returns the number of cells drawn.
pub fn atlas_plot(cfg: &AtlasConfig) -> Result<usize> {
    let pts = Points::read(cfg)?;
    let mut counts = vec![0usize; pts.ids.len()];
    for &c in &pts.cluster {
        counts[c as usize] += 1;
    }
    let mut top: Vec<u32> = (0..pts.ids.len() as u32).collect();
    top.sort_by(|&a, &b| counts[b as usize].cmp(&counts[a as usize]).then(pts.ids[a as usize].cmp(&pts.ids[b as usize])));
    top.truncate(cfg.top_k);
    let code_of = |id: &str| pts.ids.iter().position(|i| i == id).map(|c| c as u32);
    let missing: Vec<&str> = cfg.highlight.iter().filter(|h| code_of(h).is_none()).map(String::as_str).collect();
    if !missing.is_empty() {
        return Err(EvalError::input(&cfg.cell_metadata, format!("--highlight cluster(s) {} have no cells in `{}`", missing.join(", "), cfg.cluster_col)));
    }
    let names = cluster_names(cfg)?;
    let label = |id: &str| names.get(id).map(|n| format!("{id}: {n}")).unwrap_or_else(|| id.to_string());

    plots::figure(&cfg.out, |root| {
        let title = format!("{} cells, top {} clusters", pts.len(), top.len());
        let xs = plots::range(pts.x.iter().map(|&v| v as f64));
        let ys = plots::range(pts.y.iter().map(|&v| v as f64));
        let mut chart = plots::xy_chart(root, &title, xs, ys)?;
        chart.configure_mesh().disable_mesh().x_desc(&cfg.x_col).y_desc(&cfg.y_col).draw().map_err(|e| e.to_string())?;
        let r = if pts.len() > 100_000 { 1 } else { 2 };
        let mut colored = vec![false; pts.ids.len()];
        for &c in &top {
            colored[c as usize] = true;
        }
        let grey = (0..pts.len()).filter(|&i| !colored[pts.cluster[i] as usize]).map(|i| (pts.x[i] as f64, pts.y[i] as f64));
        chart.draw_series(grey.map(|p| Circle::new(p, r, RGBColor(215, 215, 215).filled()))).map_err(|e| e.to_string())?;
        for (k, &code) in top.iter().enumerate() {
            let c = color(k);
            chart
                .draw_series(pts.of(code).map(|p| Circle::new(p, r, c.filled())))
                .map_err(|e| e.to_string())?
                .label(format!("{} ({})", label(&pts.ids[code as usize]), counts[code as usize]))
                .legend(move |(x, y)| Circle::new((x, y), 4, c.filled()));
        }
        for h in &cfg.highlight {
            let code = code_of(h).unwrap_or(u32::MAX);
            chart
                .draw_series(pts.of(code).map(|p| Circle::new(p, r + 2, BLACK.stroke_width(1))))
                .map_err(|e| e.to_string())?
                .label(format!("highlighted: {}", label(h)))
                .legend(|(x, y)| Circle::new((x, y), 5, BLACK.stroke_width(1)));
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).label_font(("sans-serif", 12)).draw().map_err(|e| e.to_string())
    })?;
    Ok(pts.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::exit::ExitStatus;

    #[test]
    fn atlas_plot_names_clusters_and_refuses_unknown_highlights() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut meta = String::from("cell_label,cluster_alias,x,y\n");
        for i in 0..60 {
            meta.push_str(&format!("c{i},{},{},{}\n", [7, 7, 7, 9, 9, 11][i % 6], i as f64 * 0.1, (i % 7) as f64));
        }
        std::fs::write(d.join("meta.csv"), meta).unwrap();
        std::fs::write(d.join("cluster.csv"), "cluster_alias,label\n7,CS_7\n9,CS_9\n11,CS_11\n").unwrap();
        std::fs::write(d.join("ann.csv"), "label,name,description\nCS_7,\"MGE interneuron, 5\",x\nCS_9,L5 IT,y\n").unwrap();
        let mut cfg = AtlasConfig {
            cell_metadata: d.join("meta.csv"),
            cluster: Some(d.join("cluster.csv")),
            annotation: Some(d.join("ann.csv")),
            cluster_col: "cluster_alias".into(),
            x_col: "x".into(),
            y_col: "y".into(),
            name_col: "name".into(),
            top_k: 2,
            highlight: vec!["11".into()],
            out: d.join("atlas.png"),
        };
        assert_eq!(cluster_names(&cfg).unwrap()["7"], "MGE interneuron, 5");
        assert_eq!(atlas_plot(&cfg).unwrap(), 60);
        assert_eq!(&std::fs::read(&cfg.out).unwrap()[..4], b"\x89PNG");
        cfg.highlight = vec!["404".into()];
        let e = atlas_plot(&cfg).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("404"), "{e}");
    }
}
