//! Gene identities across datasets: a run's vocabulary, and each dataset's genes mapped onto it.
//!
//! A store's genes are its `var` names, or the values of one `var` column (`gene_key`, e.g.
//! `gene_symbol` where the names are Ensembl ids). With `case_insensitive`, `Gad1` and `GAD1`
//! are one gene: the usual crude mouse-to-human ortholog map (it misses genes whose symbols
//! differ, and it matches a few that are not orthologs).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::csr::CsrRows;
use crate::error::{DataError, Result};
use crate::store::Store;

/// How gene names are compared (`data.gene_case` in configs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum GeneCase {
    /// `Gad1` ≠ `GAD1`.
    #[default]
    Exact,
    /// `Gad1` = `GAD1` (mouse and human symbols; see the module docs for what that misses).
    Insensitive,
}

impl GeneCase {
    fn key(self, name: &str) -> String {
        match self {
            GeneCase::Exact => name.to_string(),
            GeneCase::Insensitive => name.to_uppercase(),
        }
    }
}

/// Where a run's vocabulary comes from (`data.vocabulary`: `union` or `list:FILE`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum VocabularySpec {
    /// Every gene of every store, in the order first seen (store order, then `var` order).
    #[default]
    Union,
    /// One gene per line of a file (`#` comments and blank lines skipped).
    List(PathBuf),
}

impl std::str::FromStr for VocabularySpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "union" | "" => Ok(VocabularySpec::Union),
            _ => match s.strip_prefix("list:") {
                Some(p) if !p.is_empty() => Ok(VocabularySpec::List(PathBuf::from(p))),
                _ => Err(format!("vocabulary `{s}`: use `union` or `list:FILE`")),
            },
        }
    }
}

impl std::fmt::Display for VocabularySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VocabularySpec::Union => write!(f, "union"),
            VocabularySpec::List(p) => write!(f, "list:{}", p.display()),
        }
    }
}

impl Serialize for VocabularySpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for VocabularySpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// A store's gene names under `gene_key` (`None`: the `var` names).
pub fn store_genes(store: &Store, gene_key: Option<&str>) -> Result<Vec<String>> {
    match gene_key {
        None => store.var_names(),
        Some(col) => {
            let c = store.column("var", col)?;
            Ok((0..store.n_genes()).map(|i| c.text(i)).collect())
        }
    }
}

/// The vocabulary of a run over stores whose genes are `panels`.
pub fn build_vocabulary(spec: &VocabularySpec, panels: &[Vec<String>], case: GeneCase) -> Result<Vec<String>> {
    let mut genes = Vec::new();
    let mut seen = std::collections::HashSet::new();
    match spec {
        VocabularySpec::Union => {
            for g in panels.iter().flatten() {
                if !g.is_empty() && seen.insert(case.key(g)) {
                    genes.push(g.clone());
                }
            }
        }
        VocabularySpec::List(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
            for (line_no, line) in text.lines().enumerate() {
                let g = line.trim();
                if g.is_empty() || g.starts_with('#') {
                    continue;
                }
                if !seen.insert(case.key(g)) {
                    return Err(DataError::input(path, format!("line {}: gene `{g}` is listed twice; list each gene once", line_no + 1)));
                }
                genes.push(g.to_string());
            }
            if genes.is_empty() {
                return Err(DataError::input(path, "lists no genes; write one gene name per line"));
            }
        }
    }
    Ok(genes)
}

/// How a dataset's genes line up with a vocabulary.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneMap {
    /// For each data gene, its vocabulary index (`None`: not in the vocabulary, or a repeat).
    pub to_vocab: Vec<Option<u32>>,
    /// For each vocabulary gene, whether the data measures it.
    pub present: Vec<bool>,
    pub overlap: Overlap,
}

/// What a dataset shares with a vocabulary: reported in logs, `metrics.json` and reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Overlap {
    /// Vocabulary genes the data measures.
    pub shared: usize,
    /// Vocabulary genes the data lacks (absent from its cells' sequences, never read as zero).
    pub missing: usize,
    /// Data genes outside the vocabulary (left out), repeats of a gene included.
    pub unknown: usize,
    /// `shared` over the smaller of the two panels (1: one contains the other), the number
    /// zero-shot use is judged by.
    pub share: f64,
    /// A few of each, for messages.
    pub examples_missing: Vec<String>,
    pub examples_unknown: Vec<String>,
}

impl std::fmt::Display for Overlap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} genes in common ({:.0} % of the smaller panel), {} vocabulary genes missing", self.shared, 100.0 * self.share, self.missing)?;
        if !self.examples_missing.is_empty() {
            write!(f, " (e.g. {})", self.examples_missing.join(", "))?;
        }
        write!(f, ", {} data genes unknown", self.unknown)?;
        if !self.examples_unknown.is_empty() {
            write!(f, " (e.g. {})", self.examples_unknown.join(", "))?;
        }
        Ok(())
    }
}

impl GeneMap {
    /// Matches `data_genes` against `vocab`; no gene in common is an error naming both sides.
    pub fn new(data_genes: &[String], vocab: &[String], case: GeneCase, data: &Path) -> Result<GeneMap> {
        let pos: HashMap<String, u32> = vocab.iter().enumerate().map(|(i, g)| (case.key(g), i as u32)).collect();
        let mut present = vec![false; vocab.len()];
        let mut unknown = Vec::new();
        let to_vocab: Vec<Option<u32>> = data_genes
            .iter()
            .map(|g| match pos.get(&case.key(g)) {
                Some(&j) if !present[j as usize] => {
                    present[j as usize] = true;
                    Some(j)
                }
                _ => {
                    unknown.push(g.clone());
                    None
                }
            })
            .collect();
        let shared = present.iter().filter(|&&p| p).count();
        if shared == 0 {
            return Err(DataError::input(
                data,
                format!(
                    "none of its {} genes (e.g. {}) is in the vocabulary of {} genes (e.g. {}); use the same gene identifiers (a `gene_key` column, or `gene_case = \"insensitive\"` for mouse vs human symbols)",
                    data_genes.len(),
                    data_genes.iter().take(3).cloned().collect::<Vec<_>>().join(", "),
                    vocab.len(),
                    vocab.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        let missing: Vec<&String> = vocab.iter().zip(&present).filter(|(_, &p)| !p).map(|(g, _)| g).collect();
        let overlap = Overlap {
            shared,
            missing: missing.len(),
            unknown: unknown.len(),
            share: shared as f64 / vocab.len().min(data_genes.len()).max(1) as f64,
            examples_missing: missing.iter().take(5).map(|g| g.to_string()).collect(),
            examples_unknown: unknown.into_iter().take(5).collect(),
        };
        Ok(GeneMap { to_vocab, present, overlap })
    }

    /// Whether data gene i is vocabulary gene i for every gene (no re-indexing needed).
    pub fn is_identity(&self) -> bool {
        self.to_vocab.len() == self.present.len() && self.to_vocab.iter().enumerate().all(|(i, j)| *j == Some(i as u32))
    }

    /// Rows re-indexed to vocabulary genes (ascending), dropping genes outside it.
    pub fn remap(&self, rows: &CsrRows) -> CsrRows {
        let mut out = CsrRows::with_capacity(rows.n_rows(), rows.nnz());
        let mut pairs: Vec<(u32, f32)> = Vec::new();
        let (mut idx, mut val) = (Vec::new(), Vec::new());
        for i in 0..rows.n_rows() {
            let (ri, rv) = rows.row(i);
            pairs.clear();
            pairs.extend(ri.iter().zip(rv).filter_map(|(&g, &v)| self.to_vocab[g as usize].map(|j| (j, v))));
            pairs.sort_unstable_by_key(|p| p.0);
            idx.clear();
            val.clear();
            for &(g, v) in &pairs {
                idx.push(g);
                val.push(v);
            }
            out.push_row(&idx, &val);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn union_keeps_first_spelling_and_order() {
        let v = build_vocabulary(&VocabularySpec::Union, &[s(&["GAD1", "SNAP25"]), s(&["Gad1", "Pvalb"])], GeneCase::Insensitive).unwrap();
        assert_eq!(v, s(&["GAD1", "SNAP25", "Pvalb"]));
        let exact = build_vocabulary(&VocabularySpec::Union, &[s(&["GAD1"]), s(&["Gad1"])], GeneCase::Exact).unwrap();
        assert_eq!(exact, s(&["GAD1", "Gad1"]));
    }

    #[test]
    fn list_vocabulary_refuses_repeats_and_empty_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("v.txt");
        std::fs::write(&f, "# genes\nA\n\nB\n").unwrap();
        assert_eq!(build_vocabulary(&VocabularySpec::List(f.clone()), &[], GeneCase::Exact).unwrap(), s(&["A", "B"]));
        std::fs::write(&f, "A\na\n").unwrap();
        let e = build_vocabulary(&VocabularySpec::List(f.clone()), &[], GeneCase::Insensitive).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("twice"), "{e}");
        std::fs::write(&f, "# nothing\n").unwrap();
        assert!(build_vocabulary(&VocabularySpec::List(f), &[], GeneCase::Exact).is_err());
        assert_eq!("list:/x/v.txt".parse::<VocabularySpec>().unwrap(), VocabularySpec::List("/x/v.txt".into()));
        assert!("lists:x".parse::<VocabularySpec>().is_err());
    }

    #[test]
    fn gene_map_counts_shared_missing_and_unknown() {
        let vocab = s(&["A", "B", "C", "D"]);
        let m = GeneMap::new(&s(&["c", "X", "a", "A"]), &vocab, GeneCase::Insensitive, Path::new("d.zarr")).unwrap();
        assert_eq!(m.to_vocab, vec![Some(2), None, Some(0), None], "a repeat of A is left out");
        assert_eq!(m.present, vec![true, false, true, false]);
        assert_eq!((m.overlap.shared, m.overlap.missing, m.overlap.unknown), (2, 2, 2));
        assert_eq!(m.overlap.share, 0.5);
        let rows = CsrRows::from_dense(1, 4, &[5.0, 9.0, 1.0, 2.0]);
        let r = m.remap(&rows);
        assert_eq!(r.row(0), (&[0u32, 2][..], &[1.0f32, 5.0][..]));
        assert!(GeneMap::new(&s(&["Z"]), &vocab, GeneCase::Exact, Path::new("d.zarr")).is_err());
        assert!(GeneMap::new(&vocab, &vocab, GeneCase::Exact, Path::new("d.zarr")).unwrap().is_identity());
    }
}
