//! `atlas-plot`: the atlas's own 2-D coordinates (Allen `cell_metadata.csv`), the K largest
//! clusters colored and named from `cluster.csv` + `cluster_annotation_term.csv`, every other
//! cell grey, chosen clusters drawn again on top in black outline (what `s1_rawUmap.py` did).

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use dataloader::select::parse_csv_line;
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

/// A CSV read into columns by header name.
struct Table {
    path: PathBuf,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn read(path: &Path) -> Result<Table> {
        let f = std::fs::File::open(path).map_err(|e| EvalError::io(path, e))?;
        let mut lines = std::io::BufReader::new(f).lines();
        let header = parse_csv_line(&lines.next().transpose().map_err(|e| EvalError::io(path, e))?.unwrap_or_default());
        let mut rows = Vec::new();
        for (i, line) in lines.enumerate() {
            let fields = parse_csv_line(&line.map_err(|e| EvalError::io(path, e))?);
            if fields.len() != header.len() {
                return Err(EvalError::input(path, format!("line {}: {} fields, the header has {}", i + 2, fields.len(), header.len())));
            }
            rows.push(fields);
        }
        Ok(Table { path: path.to_path_buf(), header, rows })
    }

    fn col(&self, name: &str, flag: &str) -> Result<usize> {
        self.header.iter().position(|h| h == name).ok_or_else(|| EvalError::input(&self.path, format!("no column `{name}` ({flag}); the header has: {}", self.header.join(", "))))
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

/// Draws the plot; returns the number of cells drawn.
pub fn atlas_plot(cfg: &AtlasConfig) -> Result<usize> {
    let meta = Table::read(&cfg.cell_metadata)?;
    let (xi, yi, ci) = (meta.col(&cfg.x_col, "--x-col")?, meta.col(&cfg.y_col, "--y-col")?, meta.col(&cfg.cluster_col, "--cluster-col")?);
    let mut pts = Vec::with_capacity(meta.rows.len());
    for (i, r) in meta.rows.iter().enumerate() {
        let parse = |j: usize| r[j].parse::<f64>().map_err(|_| EvalError::input(&meta.path, format!("line {}: `{}` is not a number ({})", i + 2, r[j], meta.header[j])));
        pts.push((parse(xi)?, parse(yi)?, r[ci].clone()));
    }
    if pts.is_empty() {
        return Err(EvalError::input(&meta.path, "has no cells"));
    }
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for p in &pts {
        *counts.entry(p.2.as_str()).or_default() += 1;
    }
    let mut top: Vec<(&str, usize)> = counts.into_iter().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    top.truncate(cfg.top_k);
    let missing: Vec<&String> = cfg.highlight.iter().filter(|h| !pts.iter().any(|p| &p.2 == *h)).collect();
    if !missing.is_empty() {
        return Err(EvalError::input(&meta.path, format!("--highlight cluster(s) {} have no cells in `{}`", missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "), cfg.cluster_col)));
    }
    let names = cluster_names(cfg)?;
    let label = |id: &str| names.get(id).map(|n| format!("{id}: {n}")).unwrap_or_else(|| id.to_string());

    plots::figure(&cfg.out, |root| {
        let title = format!("{} cells, top {} clusters", pts.len(), top.len());
        let mut chart = plots::xy_chart(root, &title, plots::range(pts.iter().map(|p| p.0)), plots::range(pts.iter().map(|p| p.1)))?;
        chart.configure_mesh().disable_mesh().x_desc(&cfg.x_col).y_desc(&cfg.y_col).draw().map_err(|e| e.to_string())?;
        let r = if pts.len() > 100_000 { 1 } else { 2 };
        let rank: HashMap<&str, usize> = top.iter().enumerate().map(|(k, t)| (t.0, k)).collect();
        chart.draw_series(pts.iter().filter(|p| !rank.contains_key(p.2.as_str())).map(|p| Circle::new((p.0, p.1), r, RGBColor(215, 215, 215).filled()))).map_err(|e| e.to_string())?;
        for (k, (id, n)) in top.iter().enumerate() {
            let c = color(k);
            chart
                .draw_series(pts.iter().filter(|p| p.2 == *id).map(|p| Circle::new((p.0, p.1), r, c.filled())))
                .map_err(|e| e.to_string())?
                .label(format!("{} ({n})", label(id)))
                .legend(move |(x, y)| Circle::new((x, y), 4, c.filled()));
        }
        for h in &cfg.highlight {
            chart
                .draw_series(pts.iter().filter(|p| &p.2 == h).map(|p| Circle::new((p.0, p.1), r + 2, BLACK.stroke_width(1))))
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
