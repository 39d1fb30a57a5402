//! Files users take into their own tools: `embeddings.npy` (NumPy), `cells.tsv`, and an
//! `embeddings.h5ad` whose `obsm` holds the embedding and its layouts (scanpy reads it as is).
//! Every file is written to a temp name and renamed.

use std::path::Path;

use dataloader::frame::Frame;
use dataloader::h5write::{dict_group, encoding, frame};
use dataloader::source::h5::h5err;
use ndarray::Array2;

use crate::dataset::EvalData;
use crate::error::{EvalError, Result};
use crate::labels::{Labels, Split};
use crate::layout::Layout;
use crate::probe::ProbeResult;

/// Writes `bytes` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    common::atomic::write_bytes(path, bytes).map_err(|e| EvalError::io(path, e))
}

/// NumPy `.npy` v1.0 of a row-major float32 matrix (format spec: numpy.lib.format).
pub fn npy_f32(x: &Array2<f32>) -> Vec<u8> {
    let (n, d) = x.dim();
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({n}, {d}), }}");
    // Magic (6) + version (2) + length (2) + header, padded with spaces to a multiple of 64.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 4 * n * d);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in x.iter() {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Reads a 2-D little-endian float32/float64 C-order `.npy` (what NumPy writes by default).
pub fn read_npy(path: &Path) -> Result<Array2<f64>> {
    let b = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => EvalError::input(path, "no such file; give --input a .npy file (e.g. RUN/eval/embeddings.npy)"),
        _ => EvalError::io(path, e),
    })?;
    let bad = |why: &str| EvalError::input(path, format!("{why}; expected a 2-D float32/float64 .npy as numpy.save writes it"));
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy file"));
    }
    let (hlen, start) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 if b.len() >= 12 => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
        _ => return Err(bad("unknown .npy version")),
    };
    let header = b.get(start..start + hlen).and_then(|h| std::str::from_utf8(h).ok()).ok_or_else(|| bad("truncated header"))?;
    if header.contains("'fortran_order': True") {
        return Err(bad("Fortran order"));
    }
    let width = if header.contains("'<f4'") { 4 } else if header.contains("'<f8'") { 8 } else { return Err(bad("dtype is not <f4 or <f8")) };
    let shape = header.split("'shape': (").nth(1).and_then(|r| r.split(')').next()).ok_or_else(|| bad("no shape"))?;
    let dims: Vec<usize> = shape.split(',').map(str::trim).filter(|d| !d.is_empty()).map(|d| d.parse().map_err(|_| bad("bad shape"))).collect::<Result<_>>()?;
    let [n, d] = dims[..] else { return Err(bad("not 2-D")) };
    let data = &b[start + hlen..];
    if data.len() != n * d * width {
        return Err(bad("data size does not match the shape"));
    }
    let values: Vec<f64> = if width == 4 {
        data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect()
    } else {
        data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect()
    };
    Array2::from_shape_vec((n, d), values).map_err(|e| EvalError::Internal(e.to_string()))
}

/// Tab-separated text with a header line; tabs and newlines in values become spaces.
pub fn tsv(header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> Vec<u8> {
    let clean = |s: &str| s.replace(['\t', '\n', '\r'], " ");
    let mut out = header.join("\t");
    out.push('\n');
    for r in rows {
        out.push_str(&r.iter().map(|v| clean(v)).collect::<Vec<_>>().join("\t"));
        out.push('\n');
    }
    out.into_bytes()
}

/// CSV (RFC 4180: fields with commas, quotes or newlines are quoted).
pub fn csv(header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> Vec<u8> {
    let field = |s: &str| if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() };
    let mut out = header.iter().map(|h| field(h)).collect::<Vec<_>>().join(",");
    out.push('\n');
    for r in rows {
        out.push_str(&r.iter().map(|v| field(v)).collect::<Vec<_>>().join(","));
        out.push('\n');
    }
    out.into_bytes()
}

/// An AnnData file with `obs`, no genes (`X` absent, empty `var`) and `obsm` matrices.
pub fn h5ad(path: &Path, obs: &Frame, obsm: &[(&str, &Array2<f32>)]) -> Result<()> {
    common::atomic::write_via_temp(path, |tmp| write_h5ad(tmp, obs, obsm), EvalError::io)
}

/// `gene_embeddings.h5ad`: one row per model gene (obs names are the genes); `obsm['static']`
/// is the gene embedding table, `obsm['contextual_<class>']` each gene's token state averaged
/// over the cells of that class (NaN where none had it in its sequence), with the number of
/// cells in `obs['n_cells_<class>']`. Classes are named as given; anndata opens it as is.
pub fn gene_embeddings(path: &Path, genes: &[String], table: &Array2<f32>, classes: &[String], states: &ndarray::Array3<f32>, counts: &Array2<u32>) -> Result<()> {
    let mut obs = Frame { index_name: "_index".into(), index: genes.to_vec(), columns: Vec::new() };
    let mut mats: Vec<(String, Array2<f32>)> = vec![("static".into(), table.clone())];
    for (k, class) in classes.iter().enumerate() {
        let key: String = class.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).collect();
        obs.columns.push((format!("n_cells_{key}"), dataloader::frame::Column::Int(counts.row(k).iter().map(|&n| n as i64).collect())));
        mats.push((format!("contextual_{key}"), states.index_axis(ndarray::Axis(0), k).to_owned()));
    }
    let refs: Vec<(&str, &Array2<f32>)> = mats.iter().map(|(k, m)| (k.as_str(), m)).collect();
    h5ad(path, &obs, &refs)
}

fn write_h5ad(path: &Path, obs: &Frame, obsm: &[(&str, &Array2<f32>)]) -> Result<()> {
    let file = hdf5::File::create(path).map_err(h5err(path, "/"))?;
    encoding(&file, "anndata", "0.1.0", path)?;
    frame(&file, "obs", obs, path)?;
    let var = Frame { index_name: "_index".into(), index: Vec::new(), columns: Vec::new() };
    frame(&file, "var", &var, path)?;
    let m = dict_group(&file, "obsm", path)?;
    for (key, x) in obsm {
        let (n, d) = x.dim();
        let a = ndarray17::Array2::from_shape_vec((n, d), x.iter().copied().collect()).map_err(|e| EvalError::Internal(e.to_string()))?;
        let ds = m.new_dataset_builder().with_data(&a).create(*key).map_err(h5err(path, key))?;
        encoding(&ds, "array", "0.2.0", path)?;
    }
    for g in ["layers", "obsp", "varm", "varp", "uns"] {
        dict_group(&file, g, path)?;
    }
    file.close().map_err(h5err(path, "/"))?;
    Ok(())
}

/// The per-cell files of an evaluation: `embeddings.npy`, `cells.tsv` (label, split, cluster),
/// `predictions.tsv` (test-set probabilities, so anyone can recompute the scores) and
/// `embeddings.h5ad` (obs plus the embedding and its layouts in `obsm`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_eval_files(out: &Path, data: &EvalData, labels: &Labels, split: &Split, x: &Array2<f32>, layout: &Layout, clusters: &[usize], probe: &ProbeResult) -> Result<()> {
    write_atomic(&out.join("embeddings.npy"), &npy_f32(x))?;
    let names = &data.obs.index;
    let mut part = vec!["train"; labels.cells.len()];
    for &t in &split.test {
        part[t] = "test";
    }
    let rows = (0..labels.cells.len()).map(|i| {
        vec![names[labels.cells[i]].clone(), labels.cells[i].to_string(), labels.classes[labels.y[i]].clone(), part[i].to_string(), clusters[i].to_string()]
    });
    write_atomic(&out.join("cells.tsv"), &tsv(&["cell", "store_row", "label", "split", "cluster"], rows))?;

    // Test-set predictions, so anyone can recompute the scores (CI does, with scikit-learn).
    let mut head: Vec<String> = vec!["cell".into(), "truth".into(), "pred".into()];
    head.extend(labels.classes.iter().map(|c| format!("p_{c}")));
    let head_ref: Vec<&str> = head.iter().map(String::as_str).collect();
    let rows = split.test.iter().enumerate().map(|(r, &t)| {
        let mut v = vec![names[labels.cells[t]].clone(), labels.y[t].to_string(), probe.pred[r].to_string()];
        v.extend(probe.proba.row(r).iter().map(|p| format!("{p:.17e}")));
        v
    });
    write_atomic(&out.join("predictions.tsv"), &tsv(&head_ref, rows))?;

    let mut obs = data.obs.take(&labels.cells);
    obs.columns.push(("neurofm_class".into(), dataloader::frame::Column::categorical_from_text(labels.y.iter().map(|&k| labels.classes[k].clone()).collect())));
    obs.columns.push(("neurofm_split".into(), dataloader::frame::Column::categorical_from_text(part.iter().map(|s| s.to_string()).collect())));
    obs.columns.push(("neurofm_cluster".into(), dataloader::frame::Column::categorical_from_text(clusters.iter().map(|c| c.to_string()).collect())));
    let spread = |coords: &Array2<f64>| -> Array2<f32> {
        let mut full = Array2::<f32>::from_elem((labels.cells.len(), 2), f32::NAN);
        for (r, &c) in layout.cells.iter().enumerate() {
            full[[c, 0]] = coords[[r, 0]] as f32;
            full[[c, 1]] = coords[[r, 1]] as f32;
        }
        full
    };
    let (tsne, umap, pca) = (spread(&layout.tsne), spread(&layout.umap), layout.pca.mapv(|v| v as f32));
    h5ad(&out.join("embeddings.h5ad"), &obs, &[("X_neurofm", x), ("X_pca", &pca), ("X_tsne", &tsne), ("X_umap", &umap)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::exit::ExitStatus;

    #[test]
    fn npy_header_is_aligned_and_data_follows() {
        let x = Array2::from_shape_vec((2, 3), vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let b = npy_f32(&x);
        let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        let header = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
        assert!(header.contains("'shape': (2, 3)") && header.ends_with('\n'));
        assert_eq!(b.len(), 10 + hlen + 24);
        assert_eq!(f32::from_le_bytes(b[10 + hlen + 20..].try_into().unwrap()), 6.0);
    }

    #[test]
    fn npy_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.npy");
        let x = Array2::from_shape_vec((2, 3), vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.5]).unwrap();
        std::fs::write(&p, npy_f32(&x)).unwrap();
        assert_eq!(read_npy(&p).unwrap(), x.mapv(f64::from));
        std::fs::write(&p, b"nope").unwrap();
        assert_eq!(read_npy(&p).unwrap_err().exit_code(), 2);
    }

    #[test]
    fn tsv_escapes_separators() {
        let t = tsv(&["a", "b"], vec![vec!["x\ty".to_string(), "z".to_string()]].into_iter());
        assert_eq!(String::from_utf8(t).unwrap(), "a\tb\nx y\tz\n");
        let c = csv(&["a", "b"], vec![vec!["x,y".to_string(), "q\"".to_string()]].into_iter());
        assert_eq!(String::from_utf8(c).unwrap(), "a,b\n\"x,y\",\"q\"\"\"\n");
    }
}
