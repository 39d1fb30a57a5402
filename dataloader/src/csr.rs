//! `CsrRows`: a block of cells as compressed sparse rows, the one in-memory currency of the crate.
//!
//! Every source layout (CSR, CSC, dense, loom) is turned into this shape as it is read, so
//! validation, statistics, gene selection and writing exist once.

/// A block of cells (rows) × genes (columns) in CSR form with block-local row offsets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CsrRows {
    /// `indptr[i]..indptr[i+1]` are row i's entries; `indptr[0] == 0`.
    pub indptr: Vec<u64>,
    /// Column (gene) index of each entry, strictly increasing within a row.
    pub indices: Vec<u32>,
    /// Value of each entry.
    pub values: Vec<f32>,
}

impl CsrRows {
    /// An empty block ready to receive rows.
    pub fn new() -> Self {
        CsrRows { indptr: vec![0], indices: Vec::new(), values: Vec::new() }
    }

    /// An empty block with room for `rows` rows and `nnz` entries.
    pub fn with_capacity(rows: usize, nnz: usize) -> Self {
        let mut indptr = Vec::with_capacity(rows + 1);
        indptr.push(0);
        CsrRows { indptr, indices: Vec::with_capacity(nnz), values: Vec::with_capacity(nnz) }
    }

    pub fn n_rows(&self) -> usize {
        self.indptr.len() - 1
    }

    pub fn nnz(&self) -> usize {
        self.indices.len()
    }

    /// Row `i` as parallel slices of gene indices and values.
    pub fn row(&self, i: usize) -> (&[u32], &[f32]) {
        let (a, b) = (self.indptr[i] as usize, self.indptr[i + 1] as usize);
        (&self.indices[a..b], &self.values[a..b])
    }

    /// Appends one row; entries must already be sorted by gene.
    pub fn push_row(&mut self, indices: &[u32], values: &[f32]) {
        self.indices.extend_from_slice(indices);
        self.values.extend_from_slice(values);
        self.indptr.push(self.indices.len() as u64);
    }

    /// Appends row `i` of `other`.
    pub fn push_row_from(&mut self, other: &CsrRows, i: usize) {
        let (idx, val) = other.row(i);
        self.push_row(idx, val);
    }

    /// Sum of each row's values (library size).
    pub fn row_totals(&self) -> Vec<f64> {
        (0..self.n_rows()).map(|i| self.row(i).1.iter().map(|&v| v as f64).sum()).collect()
    }

    /// Keeps only the genes with `new_index[g] = Some(j)`, renumbered to `j`.
    ///
    /// `new_index` must be monotone on kept genes so rows stay sorted.
    pub fn select_genes(&self, new_index: &[Option<u32>]) -> CsrRows {
        let mut out = CsrRows::with_capacity(self.n_rows(), self.nnz());
        for i in 0..self.n_rows() {
            let (idx, val) = self.row(i);
            for (&g, &v) in idx.iter().zip(val) {
                if let Some(j) = new_index[g as usize] {
                    out.indices.push(j);
                    out.values.push(v);
                }
            }
            out.indptr.push(out.indices.len() as u64);
        }
        out
    }

    /// Builds a block from a dense row-major `rows × cols` buffer, dropping zeros.
    pub fn from_dense(rows: usize, cols: usize, dense: &[f32]) -> CsrRows {
        let mut out = CsrRows::with_capacity(rows, dense.len() / 4);
        for r in 0..rows {
            for (c, &v) in dense[r * cols..(r + 1) * cols].iter().enumerate() {
                if v != 0.0 {
                    out.indices.push(c as u32);
                    out.values.push(v);
                }
            }
            out.indptr.push(out.indices.len() as u64);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_round_trip_drops_zeros_and_keeps_order() {
        let dense = [0.0, 2.0, 0.0, 1.0, 0.0, 0.0];
        let m = CsrRows::from_dense(2, 3, &dense);
        assert_eq!(m.indptr, vec![0, 1, 2]);
        assert_eq!(m.indices, vec![1, 0]);
        assert_eq!(m.row(0), (&[1u32][..], &[2.0f32][..]), "row 0 is [0, 2, 0]");
        assert_eq!(m.row_totals(), vec![2.0, 1.0]);
    }

    #[test]
    fn select_genes_renumbers_kept_columns() {
        let m = CsrRows::from_dense(1, 4, &[1.0, 2.0, 3.0, 4.0]);
        let s = m.select_genes(&[None, Some(0), None, Some(1)]);
        assert_eq!(s.indices, vec![0, 1]);
        assert_eq!(s.values, vec![2.0, 4.0]);
    }
}
