//! Pretraining objectives, each a weighted term with its own logged loss.
//!
//! Masked-bin cross-entropy alone is dominated by count noise: the part of it that knowing a
//! cell's type removes is small, so it gives the encoder little reason to represent the cell.
//! The cell-level terms make the `[CLS]` vector carry the cell:
//! - *masked*: cross-entropy of the masked positions' bins (or, for ranked sequences, genes);
//! - *bottleneck* (scGPT's GEPC/MVC, Cui et al. 2024): every gene's bin of the unperturbed cell
//!   predicted from `[CLS]` and the gene's embedding alone, `logit[g, k] = ⟨W_k h, Q e_g⟩`, so
//!   the cell vector must encode the whole profile; optionally told the cell's depth, as
//!   scVI's decoder is told the library size, so `[CLS]` need not encode depth. For ranked
//!   sequences the profile is the set of the cell's top genes: a softmax over the vocabulary,
//!   `logit[g] = ⟨W h, Q e_g⟩`, scored at each gene of the view (masked ones included), the
//!   bag-of-words autoencoder of topic models;
//! - *contrastive* (SimCLR's NT-Xent, Chen et al. 2020; CLEAR, Han et al. 2022): InfoNCE
//!   between the projected `[CLS]` of two views of a cell (independently thinned and masked),
//!   against the other cells of the micro-batch, which teaches invariance to depth and masking;
//! - *decorrelation* (VICReg's variance and covariance terms, Bardes et al. 2022): the `[CLS]`
//!   dimensions of a micro-batch kept at unit spread and uncorrelated. Without it the cell
//!   vector collapses onto a few directions (participation ratio 2–4 of 32–64 on every
//!   dataset of `benches/README.md`), so the noise within a type lies on a low-dimensional
//!   sheet that a kNN graph cuts into many communities, though a linear probe still separates
//!   the types (Jing et al. 2022 describe the same collapse in contrastive learning). It
//!   raises Louvain agreement but lowers few-shot probes (the types become a small share of
//!   the variance), so it is off by default.
//!
//! Each term is a sum over its units (masked positions, gene positions, cells) divided by the
//! *global* number of units of the step (all micro-batches, all ranks), so W ranks with batch B
//! take the step of one rank with batch W·B; the contrastive and decorrelation terms are the
//! exceptions, since their statistics are those of one micro-batch on one rank.

use serde::{Deserialize, Serialize};
use tch::nn::{self, Init};
use tch::{Kind, Reduction, Tensor};

use crate::error::{Result, TrainError};
use crate::model::{Encoder, Linear};
use dataloader::mask::IGNORE;

/// Weights of the objectives (config `[objectives]`; 0 turns a term off).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectivesConfig {
    /// Masked-bin (binned sequences) or masked-gene (ranked sequences) cross-entropy.
    pub masked: f64,
    /// Cell bottleneck: the unperturbed cell's bins of every gene position (ranked sequences:
    /// the view's genes) from `[CLS]`.
    pub bottleneck: f64,
    /// Tell the bottleneck decoder the cell's log depth.
    pub bottleneck_depth: bool,
    /// InfoNCE between the two views' `[CLS]` (needs `views.count = 2`).
    pub contrastive: f64,
    /// Softmax temperature of the contrastive term.
    pub temperature: f64,
    /// Variance and covariance penalty on each view's `[CLS]` over the micro-batch.
    pub decorrelation: f64,
}

impl Default for ObjectivesConfig {
    /// The original recipe: masked bins only.
    fn default() -> Self {
        ObjectivesConfig { masked: 1.0, bottleneck: 0.0, bottleneck_depth: false, contrastive: 0.0, temperature: 0.1, decorrelation: 0.0 }
    }
}

impl ObjectivesConfig {
    pub fn validate(&self, views: usize) -> Result<()> {
        let bad = |key: &str, why: String| Err(TrainError::Config(format!("objectives.{key}: {why}")));
        for (key, w) in [("masked", self.masked), ("bottleneck", self.bottleneck), ("contrastive", self.contrastive), ("decorrelation", self.decorrelation)] {
            if !(w >= 0.0 && w.is_finite()) {
                return bad(key, format!("{w} must be a weight ≥ 0"));
            }
        }
        if self.masked + self.bottleneck + self.contrastive + self.decorrelation == 0.0 {
            return bad("masked", "every objective weight is 0: nothing would be trained".into());
        }
        if self.contrastive > 0.0 && views != 2 {
            return bad("contrastive", format!("needs two views of each cell; set views.count = 2 (it is {views})"));
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad("temperature", format!("{} must be > 0", self.temperature));
        }
        Ok(())
    }
}

/// The parameters the cell-level objectives add (under `objectives.` in the checkpoint; the
/// encoder alone is what evaluation and fine-tuning load).
pub struct Heads {
    bottleneck: Option<BottleneckHead>,
    projection: Option<(Linear, Linear)>,
}

struct BottleneckHead {
    /// Q: gene embedding → query.
    query: Linear,
    /// W: `[CLS]` → one key per bin (ranked sequences: one key).
    keys: Linear,
    /// Added to `[CLS]` in proportion to the cell's log depth (when told the depth).
    depth: Option<Tensor>,
}

/// One view's encoder output and the batch tensors its terms need.
pub struct ViewStates<'a> {
    pub states: &'a Tensor,
    pub genes: &'a Tensor,
    /// Flat positions with a masked target, and the targets.
    pub masked: &'a Tensor,
    pub targets: &'a Tensor,
}

/// A micro-batch's term sums, kept on the device (read once per step).
pub struct TermSums {
    pub masked: Tensor,
    pub correct: Tensor,
    pub bottleneck: Tensor,
    pub contrastive: Tensor,
    pub decorrelation: Tensor,
}

/// Units each term averages over in a whole step (all micro-batches and ranks).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TermCounts {
    pub masked: f64,
    pub bottleneck: f64,
    pub cells: f64,
}

impl TermCounts {
    pub fn add(&mut self, o: TermCounts) {
        self.masked += o.masked;
        self.bottleneck += o.bottleneck;
        self.cells += o.cells;
    }
}

impl Heads {
    /// Builds the heads the non-zero terms need, under `root`; `keys` is the bottleneck's
    /// number of keys (the bins, or 1 for ranked sequences).
    pub fn new(root: &nn::Path, cfg: &ObjectivesConfig, d: usize, keys: usize) -> Result<Heads> {
        let bottleneck = if cfg.bottleneck > 0.0 {
            let p = root / "bottleneck";
            Some(BottleneckHead {
                query: Linear::new(&p / "query", d, d)?,
                keys: Linear::new(&p / "keys", d, keys * d)?,
                depth: if cfg.bottleneck_depth { Some((&p / "depth").f_var("weight", &[d as i64], Init::Const(0.0))?) } else { None },
            })
        } else {
            None
        };
        let projection = if cfg.contrastive > 0.0 {
            let p = root / "projection";
            Some((Linear::new(&p / "fc1", d, d)?, Linear::new(&p / "fc2", d, d)?))
        } else {
            None
        };
        Ok(Heads { bottleneck, projection })
    }

    /// The terms of one micro-batch. `full_bins` `[b, l]` are the unperturbed cell's bins at
    /// the views' gene positions, `depth` `[b]` its log10 depth.
    pub fn sums(&self, enc: &Encoder, cfg: &ObjectivesConfig, views: &[ViewStates], full_bins: Option<&Tensor>, depth: &Tensor) -> Result<TermSums> {
        let device = depth.device();
        let zero = || Tensor::f_zeros([], (Kind::Float, device));
        let (mut masked, mut correct) = (zero()?, zero()?);
        if cfg.masked > 0.0 {
            for v in views {
                let l = enc.masked_loss(v.states, v.masked, v.targets)?;
                masked = masked.f_add(&l.loss_sum)?;
                correct = correct.f_add(&l.n_correct)?;
            }
        }
        let mut bottleneck = zero()?;
        if let Some(head) = &self.bottleneck {
            for v in views {
                let l = match (enc.vocab.ranked, full_bins) {
                    (true, _) => head.genes_loss_sum(enc, v, depth)?,
                    (false, Some(full)) => head.bins_loss_sum(enc, v, full, depth)?,
                    (false, None) => return Err(TrainError::Internal("the cell bottleneck needs the full cell's bins in the batch".into())),
                };
                bottleneck = bottleneck.f_add(&l)?;
            }
        }
        let contrastive = match (&self.projection, views) {
            (Some(proj), [a, b]) => info_nce(proj, enc.compute, a.states, b.states, cfg.temperature)?,
            _ => zero()?,
        };
        let mut decorrelation = zero()?;
        if cfg.decorrelation > 0.0 {
            for v in views {
                decorrelation = decorrelation.f_add(&variance_covariance(&v.states.f_select(1, 0)?.f_to_kind(Kind::Float)?)?)?;
            }
            // A micro-batch statistic, weighted by its cells like the contrastive term.
            decorrelation = decorrelation.f_mul_scalar(depth.size()[0] as f64 / views.len().max(1) as f64)?;
        }
        Ok(TermSums { masked, correct, bottleneck, contrastive, decorrelation })
    }

    /// The weighted loss to differentiate: each term's sum over the step's global units.
    pub fn loss(cfg: &ObjectivesConfig, s: &TermSums, n: &TermCounts) -> Result<Tensor> {
        let mut loss = s.masked.f_mul_scalar(cfg.masked / n.masked.max(1.0))?;
        if cfg.bottleneck > 0.0 {
            loss = loss.f_add(&s.bottleneck.f_mul_scalar(cfg.bottleneck / n.bottleneck.max(1.0))?)?;
        }
        if cfg.contrastive > 0.0 {
            loss = loss.f_add(&s.contrastive.f_mul_scalar(cfg.contrastive / n.cells.max(1.0))?)?;
        }
        if cfg.decorrelation > 0.0 {
            loss = loss.f_add(&s.decorrelation.f_mul_scalar(cfg.decorrelation / n.cells.max(1.0))?)?;
        }
        Ok(loss)
    }
}

impl BottleneckHead {
    /// `[CLS]` of a view, shifted by the depth when the decoder is told it.
    fn cell(&self, v: &ViewStates, depth: &Tensor) -> Result<Tensor> {
        let h = v.states.f_select(1, 0)?;
        Ok(match &self.depth {
            Some(u) => h.f_add(&depth.f_unsqueeze(1)?.f_mul(u)?)?,
            None => h,
        })
    }

    /// Ranked sequences: −log p(gene | `[CLS]`) summed over the view's genes, masked positions
    /// scored at the gene they hide.
    fn genes_loss_sum(&self, enc: &Encoder, v: &ViewStates, depth: &Tensor) -> Result<Tensor> {
        let c = enc.compute;
        let n_genes = enc.vocab.n_genes as i64;
        let (b, l) = v.genes.size2()?;
        let genes = v.genes.f_view([-1])?.f_index_put(&[Some(v.masked.shallow_clone())], v.targets, false)?.f_view([b, l])?;
        let keys = self.keys.forward(&self.cell(v, depth)?, c)?; // [b, d]
        let queries = self.query.forward(&enc.gene_table()?, c)?; // [genes, d]
        let logp = keys.f_matmul(&queries.f_transpose(0, 1)?)?.f_to_kind(Kind::Float)?.f_log_softmax(1, Kind::Float)?;
        // [CLS], padding and other special ids are ≥ n_genes and score nothing.
        let is_gene = genes.f_lt(n_genes)?;
        let picked = logp.f_gather(1, &genes.f_clamp_max(n_genes - 1)?, false)?;
        Ok(picked.f_where_scalarother(&is_gene, 0.0)?.f_sum(Kind::Float)?.f_neg()?)
    }

    /// Binned sequences: cross-entropy of the full cell's bins summed over the gene positions.
    fn bins_loss_sum(&self, enc: &Encoder, v: &ViewStates, full_bins: &Tensor, depth: &Tensor) -> Result<Tensor> {
        let (b, l) = v.genes.size2()?;
        let c = enc.compute;
        let d = enc.cfg.d_model as i64;
        let n_bins = enc.vocab.n_bins as i64;
        let h = self.cell(v, depth)?;
        // Genes' own embeddings (special tokens' rows give queries the targets ignore).
        let q = self.query.forward(&Tensor::f_embedding(&enc.gene_emb, v.genes, -1, false, false)?, c)?; // [b, l, d]
        let keys = self.keys.forward(&h, c)?.f_view([b, n_bins, d])?; // [b, k, d]
        let logits = q.f_bmm(&keys.f_transpose(1, 2)?)?.f_to_kind(Kind::Float)?; // [b, l, k]
        // Targets: bins at gene positions; [CLS] and padding carry special ids ≥ n_bins.
        let targets = full_bins.f_where_scalarother(&full_bins.f_lt(n_bins)?, IGNORE)?;
        Ok(logits.f_view([b * l, n_bins])?.f_cross_entropy_loss::<Tensor>(&targets.f_view([b * l])?, None, Reduction::Sum, IGNORE, 0.0)?)
    }
}

/// Symmetric InfoNCE between the `[CLS]` of two views, summed over cells (positives on the
/// diagonal, the micro-batch's other cells as negatives).
fn info_nce(proj: &(Linear, Linear), c: Kind, a: &Tensor, b: &Tensor, temperature: f64) -> Result<Tensor> {
    let z = |s: &Tensor| -> Result<Tensor> {
        let h = proj.1.forward(&proj.0.forward(&s.f_select(1, 0)?, c)?.f_gelu("none")?, c)?.f_to_kind(Kind::Float)?;
        let norm = h.f_norm_scalaropt_dim(2, [1], true)?.f_clamp_min(1e-8)?;
        Ok(h.f_div(&norm)?)
    };
    let (za, zb) = (z(a)?, z(b)?);
    let logits = za.f_matmul(&zb.f_transpose(0, 1)?)?.f_div_scalar(temperature)?;
    let n = logits.size()[0];
    let diagonal = Tensor::f_arange(n, (Kind::Int64, logits.device()))?;
    let ab = logits.f_cross_entropy_loss::<Tensor>(&diagonal, None, Reduction::Sum, IGNORE, 0.0)?;
    let ba = logits.f_transpose(0, 1)?.f_cross_entropy_loss::<Tensor>(&diagonal, None, Reduction::Sum, IGNORE, 0.0)?;
    Ok(ab.f_add(&ba)?.f_mul_scalar(0.5)?)
}

/// VICReg's variance hinge (each dimension's standard deviation over the cells at least 1)
/// plus its covariance term (squared off-diagonal covariances over the dimension count), for
/// `h` `[cells, d]`: 0 for whitened vectors, large for vectors on a few directions.
fn variance_covariance(h: &Tensor) -> Result<Tensor> {
    let (n, d) = h.size2()?;
    if n < 2 {
        return Ok(Tensor::f_zeros([], (Kind::Float, h.device()))?);
    }
    let centred = h.f_sub(&h.f_mean_dim(0, true, Kind::Float)?)?;
    let cov = centred.f_transpose(0, 1)?.f_matmul(&centred)?.f_div_scalar((n - 1) as f64)?;
    let var = cov.f_diagonal(0, 0, 1)?;
    let spread = var.f_add_scalar(1e-4)?.f_sqrt()?.f_neg()?.f_add_scalar(1.0)?.f_relu()?.f_mean(Kind::Float)?;
    let off = cov.f_pow_tensor_scalar(2)?.f_sum(Kind::Float)?.f_sub(&var.f_pow_tensor_scalar(2)?.f_sum(Kind::Float)?)?;
    Ok(spread.f_add(&off.f_div_scalar(d as f64)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::model::{build, Tokens, Vocabulary};
    use tch::Device;

    #[test]
    fn info_nce_rewards_matching_views() {
        let vs = nn::VarStore::new(Device::Cpu);
        let proj = (Linear::new(vs.root() / "a", 4, 4).unwrap(), Linear::new(vs.root() / "b", 4, 4).unwrap());
        let a = Tensor::randn([8, 3, 4], (Kind::Float, Device::Cpu)) * 10.0;
        let same = info_nce(&proj, Kind::Float, &a, &a, 0.1).unwrap().double_value(&[]);
        let other = info_nce(&proj, Kind::Float, &a, &a.roll([1], [0]), 0.1).unwrap().double_value(&[]);
        assert!(same < other, "matched views cost less: {same} vs {other}");
    }

    #[test]
    fn variance_covariance_is_zero_for_whitened_vectors_and_large_for_collapsed_ones() {
        let white = Tensor::randn([4096, 8], (Kind::Float, tch::Device::Cpu));
        let w = variance_covariance(&white).unwrap().double_value(&[]);
        assert!(w < 0.05, "whitened: {w}");
        // Eight dimensions that are all one direction: zero spread along the other seven.
        let collapsed = Tensor::randn([4096, 1], (Kind::Float, tch::Device::Cpu)).repeat([1, 8]);
        let c = variance_covariance(&collapsed).unwrap().double_value(&[]);
        assert!(c > 5.0, "collapsed: {c}");
        let tiny = Tensor::randn([4096, 8], (Kind::Float, tch::Device::Cpu)) * 0.01;
        assert!(variance_covariance(&tiny).unwrap().double_value(&[]) > 0.9, "no spread costs the hinge");
    }

    /// The bottleneck scores the bins of gene positions only (not `[CLS]`, not padding), about
    /// ln(bins) each at initialization, and its loss divides by the step's gene positions.
    #[test]
    fn bottleneck_predicts_bins_from_cls_and_ignores_special_positions() {
        let cfg = ModelConfig { d_model: 8, n_heads: 2, n_layers: 1, d_ff: 16, dropout: 0.0, attention_dropout: 0.0, depth_tokens: false };
        let (vs, enc) = build(&cfg, Vocabulary { n_genes: 3, n_bins: 4, ranked: false }, Device::Cpu, 1).unwrap();
        let ocfg = ObjectivesConfig { bottleneck: 1.0, ..ObjectivesConfig::default() };
        let heads = Heads::new(&(vs.root() / "objectives"), &ocfg, 8, 4).unwrap();
        let genes = Tensor::from_slice(&[3i64, 0, 1, 2, 4]).view([1, 5]);
        let bins = Tensor::from_slice(&[6i64, 1, 2, 3, 5]).view([1, 5]);
        let states = enc.forward(&Tokens { genes: &genes, bins: &bins, padding: None, depth: None }, false).unwrap();
        let full = Tensor::from_slice(&[6i64, 1, 2, 3, 5]).view([1, 5]);
        let masked = Tensor::zeros([0], (Kind::Int64, Device::Cpu));
        let view = ViewStates { states: &states, genes: &genes, masked: &masked, targets: &masked };
        let s = heads.sums(&enc, &ocfg, &[view], Some(&full), &Tensor::zeros([1], (Kind::Float, Device::Cpu))).unwrap();
        // Three gene positions count ([CLS] id 6 and padding id 5 are not bins); ~ln 4 each.
        let per = s.bottleneck.double_value(&[]) / 3.0;
        assert!((per - 4f64.ln()).abs() < 0.1, "{per}");
        let loss = Heads::loss(&ocfg, &s, &TermCounts { masked: 0.0, bottleneck: 3.0, cells: 1.0 }).unwrap();
        assert!((loss.double_value(&[]) - per).abs() < 1e-6);
    }

    /// For ranked sequences the bottleneck is −log p(gene | `[CLS]`) over the view's genes,
    /// the masked one scored at the gene it hides, `[CLS]` and padding not at all.
    #[test]
    fn ranked_bottleneck_scores_the_cells_genes_masked_ones_included() {
        let cfg = ModelConfig { d_model: 8, n_heads: 2, n_layers: 1, d_ff: 16, dropout: 0.0, attention_dropout: 0.0, depth_tokens: false };
        let (vs, enc) = build(&cfg, Vocabulary { n_genes: 5, n_bins: 4, ranked: true }, Device::Cpu, 1).unwrap();
        let ocfg = ObjectivesConfig { bottleneck: 1.0, ..ObjectivesConfig::default() };
        let heads = Heads::new(&(vs.root() / "objectives"), &ocfg, 8, 1).unwrap();
        // [CLS] = 5, padding = 6, mask = 7: genes 3, (masked 1), 0, then padding.
        let genes = Tensor::from_slice(&[5i64, 3, 7, 0, 6]).view([1, 5]);
        let bins = Tensor::from_slice(&[4i64, 0, 1, 2, 5]).view([1, 5]);
        let states = enc.forward(&Tokens { genes: &genes, bins: &bins, padding: None, depth: None }, false).unwrap();
        let (masked, targets) = (Tensor::from_slice(&[2i64]), Tensor::from_slice(&[1i64]));
        let view = ViewStates { states: &states, genes: &genes, masked: &masked, targets: &targets };
        let depth = Tensor::zeros([1], (Kind::Float, Device::Cpu));
        let s = heads.sums(&enc, &ocfg, &[view], None, &depth).unwrap();
        let head = heads.bottleneck.as_ref().unwrap();
        let keys = head.keys.forward(&states.select(1, 0), Kind::Float);
        let logp = keys.unwrap().matmul(&head.query.forward(&enc.gene_table().unwrap(), Kind::Float).unwrap().tr()).log_softmax(1, Kind::Float);
        let expect = -[3i64, 1, 0].iter().map(|&g| logp.double_value(&[0, g])).sum::<f64>();
        assert!((s.bottleneck.double_value(&[]) - expect).abs() < 1e-4, "{} vs {expect}", s.bottleneck.double_value(&[]));
    }

    /// The decorrelation term reaches the loss, weighted per cell like the contrastive term.
    #[test]
    fn decorrelation_is_a_term_of_the_loss() {
        let cfg = ModelConfig { d_model: 8, n_heads: 2, n_layers: 1, d_ff: 16, dropout: 0.0, attention_dropout: 0.0, depth_tokens: false };
        let (vs, enc) = build(&cfg, Vocabulary { n_genes: 3, n_bins: 4, ranked: false }, Device::Cpu, 1).unwrap();
        let ocfg = ObjectivesConfig { masked: 0.0, decorrelation: 2.0, ..ObjectivesConfig::default() };
        let heads = Heads::new(&(vs.root() / "objectives"), &ocfg, 8, 4).unwrap();
        // Three cells whose `[CLS]` barely differ: the variance hinge costs ~1.
        let states = Tensor::randn([3, 2, 8], (Kind::Float, Device::Cpu)) * 1e-3;
        let none = Tensor::zeros([0], (Kind::Int64, Device::Cpu));
        let genes = Tensor::zeros([3, 2], (Kind::Int64, Device::Cpu));
        let view = ViewStates { states: &states, genes: &genes, masked: &none, targets: &none };
        let s = heads.sums(&enc, &ocfg, &[view], None, &Tensor::zeros([3], (Kind::Float, Device::Cpu))).unwrap();
        let per_cell = s.decorrelation.double_value(&[]) / 3.0;
        assert!((per_cell - 1.0).abs() < 0.05, "{per_cell}");
        let loss = Heads::loss(&ocfg, &s, &TermCounts { masked: 0.0, bottleneck: 0.0, cells: 3.0 }).unwrap().double_value(&[]);
        assert!((loss - 2.0 * per_cell).abs() < 1e-5, "{loss}");
    }

    #[test]
    fn objectives_that_cannot_run_are_refused() {
        let c = ObjectivesConfig { contrastive: 1.0, ..ObjectivesConfig::default() };
        assert!(c.validate(1).unwrap_err().to_string().contains("views.count = 2"));
        assert!(c.validate(2).is_ok());
        let none = ObjectivesConfig { masked: 0.0, ..ObjectivesConfig::default() };
        assert!(none.validate(1).is_err());
        let negative = ObjectivesConfig { decorrelation: -1.0, ..ObjectivesConfig::default() };
        assert!(negative.validate(1).unwrap_err().to_string().contains("decorrelation"));
    }
}
