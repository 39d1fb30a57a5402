//! How a cell's token states become one vector (evaluation, fine-tuning).
//!
//! With a full panel every cell has the same genes, so a plain mean over token states is, to
//! first order, a histogram of bins, blind to *which* gene holds which bin. `expressed` and
//! `weighted` average over the genes the cell expresses, so the set of genes (their
//! embeddings) enters the vector; `cls` is the `[CLS]` state the cell-level objectives shape.

use tch::{Kind, Tensor};

use crate::error::Result;

/// A pooling of token states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Pooling {
    /// The `[CLS]` state (position 0).
    Cls,
    /// Mean over gene tokens (not `[CLS]`, not padding).
    Mean,
    /// Mean over the genes the cell expresses (input bin > 0; every gene of a ranked sequence).
    Expressed,
    /// Mean over expressed genes weighted by their bin (higher expression counts more).
    Weighted,
    /// Element-wise max over gene tokens.
    Max,
    /// `[mean, cls, max]` side by side.
    Concat,
}

impl Pooling {
    /// The name configs and the command line use (`expressed`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Pooling::Cls => "cls",
            Pooling::Mean => "mean",
            Pooling::Expressed => "expressed",
            Pooling::Weighted => "weighted",
            Pooling::Max => "max",
            Pooling::Concat => "concat",
        }
    }

    /// Width of the pooled vector for states of width `d`.
    pub fn dim(self, d: usize) -> usize {
        if self == Pooling::Concat { 3 * d } else { d }
    }
}

/// One fp32 vector per cell from `states` `[b, l, d]`; `bins` `[b, l]` are the input bin
/// tokens and `padding` `[b, l]` is true at padding; `n_bins` bins are expression levels
/// (ids above are special tokens); `ranked`: every gene position counts as expressed.
pub fn pool(states: &Tensor, bins: &Tensor, padding: &Tensor, n_bins: usize, ranked: bool, how: Pooling) -> Result<Tensor> {
    let l = states.size()[1];
    let genes = states.f_narrow(1, 1, l - 1)?.f_to_kind(Kind::Float)?;
    let real = padding.f_narrow(1, 1, l - 1)?.f_logical_not()?;
    let gene_bins = bins.f_narrow(1, 1, l - 1)?;
    let level = gene_bins.f_lt(n_bins as i64)?.f_logical_and(&real)?;
    let weighted_mean = |w: Tensor| -> Result<Tensor> {
        let w = w.f_unsqueeze(-1)?;
        let n = w.f_sum_dim_intlist(1, false, Kind::Float)?.f_clamp_min(1e-6)?;
        Ok(genes.f_mul(&w)?.f_sum_dim_intlist(1, false, Kind::Float)?.f_div(&n)?)
    };
    let mean = || weighted_mean(real.f_to_kind(Kind::Float)?);
    let max = || -> Result<Tensor> {
        let neg = real.f_logical_not()?.f_to_kind(Kind::Float)?.f_mul_scalar(-1e9)?.f_unsqueeze(-1)?;
        Ok(genes.f_add(&neg)?.f_amax([1], false)?)
    };
    let cls = || -> Result<Tensor> { Ok(states.f_select(1, 0)?.f_to_kind(Kind::Float)?) };
    let expressed = || -> Result<Tensor> {
        if ranked {
            return mean();
        }
        Ok(level.f_logical_and(&gene_bins.f_gt(0)?)?.f_to_kind(Kind::Float)?)
    };
    Ok(match how {
        Pooling::Cls => cls()?,
        Pooling::Mean => mean()?,
        Pooling::Max => max()?,
        Pooling::Concat => Tensor::f_cat(&[mean()?, cls()?, max()?], 1)?,
        Pooling::Expressed if ranked => mean()?,
        Pooling::Expressed => weighted_mean(expressed()?)?,
        Pooling::Weighted if ranked => mean()?,
        Pooling::Weighted => weighted_mean(gene_bins.f_to_kind(Kind::Float)?.f_mul(&level.f_to_kind(Kind::Float)?)?)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two cells with the same histogram of bins (one gene at bin 2, one at 0) but different
    /// genes expressed: `mean` of gene-identity-free states cannot tell them apart, `expressed`
    /// and `weighted` can.
    #[test]
    fn expressed_pooling_sees_which_gene_is_expressed() {
        // States: [CLS], gene A, gene B; each gene's state is its one-hot identity (d = 2).
        let states = Tensor::from_slice(&[0.0f32, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]).view([2, 3, 2]);
        let bins = Tensor::from_slice(&[9i64, 2, 0, 9, 0, 2]).view([2, 3]);
        let padding = Tensor::from_slice(&[false; 6]).view([2, 3]);
        let of = |how| Vec::<f32>::try_from(pool(&states, &bins, &padding, 5, false, how).unwrap().reshape([-1])).unwrap();
        assert_eq!(of(Pooling::Mean), vec![0.5, 0.5, 0.5, 0.5], "mean is blind to which gene is expressed");
        assert_eq!(of(Pooling::Expressed), vec![1.0, 0.0, 0.0, 1.0]);
        assert_eq!(of(Pooling::Weighted), vec![1.0, 0.0, 0.0, 1.0]);
        assert_eq!(of(Pooling::Cls), vec![0.0, 0.0, 0.0, 0.0]);
        assert_eq!(of(Pooling::Max), vec![1.0, 1.0, 1.0, 1.0]);
        assert_eq!(pool(&states, &bins, &padding, 5, false, Pooling::Concat).unwrap().size(), vec![2, 6]);
    }

    #[test]
    fn padding_and_special_tokens_never_count() {
        let states = Tensor::from_slice(&[0.0f32, 7.0, 1.0, 3.0, 100.0]).view([1, 5, 1]);
        let bins = Tensor::from_slice(&[9i64, 1, 3, 5, 6]).view([1, 5]);
        let padding = Tensor::from_slice(&[false, false, false, false, true]).view([1, 5]);
        let of = |how| pool(&states, &bins, &padding, 5, false, how).unwrap().double_value(&[0, 0]);
        let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        close(of(Pooling::Mean), (7.0 + 1.0 + 3.0) / 3.0);
        // Bin 5 is [MASK] for 5 bins: not an expression level.
        close(of(Pooling::Weighted), (7.0 * 1.0 + 1.0 * 3.0) / 4.0);
        close(of(Pooling::Max), 7.0);
    }
}
