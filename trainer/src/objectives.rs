//! Pretraining objectives, each a weighted term with its own logged loss.
//!
//! Masked-bin cross-entropy alone is dominated by count noise: the part of it that knowing a
//! cell's type removes is small, so it gives the encoder little reason to represent the cell.
//! The cell-level terms make the `[CLS]` vector carry the cell:
//! - *masked*: cross-entropy of the masked positions' bins (or, for ranked sequences, genes);
//! - *bottleneck* (scGPT's GEPC/MVC, Cui et al. 2024): every gene's bin of the unperturbed cell
//!   predicted from `[CLS]` and the gene's embedding alone, `logit[g, k] = ⟨W_k h, Q e_g⟩`, so
//!   the cell vector must encode the whole profile; optionally told the cell's depth, as
//!   scVI's decoder is told the library size, so `[CLS]` need not encode depth;
//! - *contrastive* (SimCLR's NT-Xent, Chen et al. 2020; CLEAR, Han et al. 2022): InfoNCE
//!   between the projected `[CLS]` of two views of a cell (independently thinned and masked),
//!   against the other cells of the micro-batch, which teaches invariance to depth and masking.
//!
//! Each term is a sum over its units (masked positions, gene positions, cells) divided by the
//! *global* number of units of the step (all micro-batches, all ranks), so W ranks with batch B
//! take the step of one rank with batch W·B; the contrastive term is the exception, since its
//! negatives are the cells of one micro-batch on one rank.

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
    /// Cell bottleneck: the unperturbed cell's bins of every gene position from `[CLS]`.
    pub bottleneck: f64,
    /// Tell the bottleneck decoder the cell's log depth.
    pub bottleneck_depth: bool,
    /// InfoNCE between the two views' `[CLS]` (needs `views.count = 2`).
    pub contrastive: f64,
    /// Softmax temperature of the contrastive term.
    pub temperature: f64,
}

impl Default for ObjectivesConfig {
    /// The original recipe: masked bins only.
    fn default() -> Self {
        ObjectivesConfig { masked: 1.0, bottleneck: 0.0, bottleneck_depth: false, contrastive: 0.0, temperature: 0.1 }
    }
}

impl ObjectivesConfig {
    pub fn validate(&self, views: usize, ranked: bool) -> Result<()> {
        let bad = |key: &str, why: String| Err(TrainError::Config(format!("objectives.{key}: {why}")));
        for (key, w) in [("masked", self.masked), ("bottleneck", self.bottleneck), ("contrastive", self.contrastive)] {
            if !(w >= 0.0 && w.is_finite()) {
                return bad(key, format!("{w} must be a weight ≥ 0"));
            }
        }
        if self.masked + self.bottleneck + self.contrastive == 0.0 {
            return bad("masked", "every objective weight is 0: nothing would be trained".into());
        }
        if self.contrastive > 0.0 && views != 2 {
            return bad("contrastive", format!("needs two views of each cell; set views.count = 2 (it is {views})"));
        }
        if self.bottleneck > 0.0 && ranked {
            return bad("bottleneck", "predicts bins, which ranked (rank-value) sequences do not have; set it to 0 with tokenizer.kind = \"rank-value\"".into());
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
    /// W: `[CLS]` → one key per bin.
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
    /// Builds the heads the non-zero terms need, under `root`.
    pub fn new(root: &nn::Path, cfg: &ObjectivesConfig, d: usize, n_bins: usize) -> Result<Heads> {
        let bottleneck = if cfg.bottleneck > 0.0 {
            let p = root / "bottleneck";
            Some(BottleneckHead {
                query: Linear::new(&p / "query", d, d)?,
                keys: Linear::new(&p / "keys", d, n_bins * d)?,
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
        if let (Some(head), Some(full)) = (&self.bottleneck, full_bins) {
            for v in views {
                bottleneck = bottleneck.f_add(&head.loss_sum(enc, v, full, depth)?)?;
            }
        }
        let contrastive = match (&self.projection, views) {
            (Some(proj), [a, b]) => info_nce(proj, enc.compute, a.states, b.states, cfg.temperature)?,
            _ => zero()?,
        };
        Ok(TermSums { masked, correct, bottleneck, contrastive })
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
        Ok(loss)
    }
}

impl BottleneckHead {
    /// Cross-entropy summed over the gene positions of one view.
    fn loss_sum(&self, enc: &Encoder, v: &ViewStates, full_bins: &Tensor, depth: &Tensor) -> Result<Tensor> {
        let (b, l) = v.genes.size2()?;
        let c = enc.compute;
        let d = enc.cfg.d_model as i64;
        let n_bins = enc.vocab.n_bins as i64;
        let mut h = v.states.f_select(1, 0)?;
        if let Some(u) = &self.depth {
            h = h.f_add(&depth.f_unsqueeze(1)?.f_mul(u)?)?;
        }
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

    #[test]
    fn objectives_that_cannot_run_are_refused() {
        let c = ObjectivesConfig { contrastive: 1.0, ..ObjectivesConfig::default() };
        assert!(c.validate(1, false).unwrap_err().to_string().contains("views.count = 2"));
        assert!(c.validate(2, false).is_ok());
        let c = ObjectivesConfig { bottleneck: 1.0, ..ObjectivesConfig::default() };
        assert!(c.validate(1, true).unwrap_err().to_string().contains("rank-value"));
        let none = ObjectivesConfig { masked: 0.0, ..ObjectivesConfig::default() };
        assert!(none.validate(1, false).is_err());
    }
}
