//! The encoder (DESIGN §4): gene + bin embeddings, pre-LayerNorm transformer layers with
//! `scaled_dot_product_attention`, GELU feed-forward, final norm, a linear head over bins.
//!
//! Parameters live in a `VarStore` under stable names (`layers.3.attn.qkv.weight`, ...), which
//! become the tensor names of `model.safetensors`, so Python users can load them directly.
//! Every op uses tch's fallible `f_` form: a libtorch failure (out of memory) is an error,
//! not a panic.

use tch::nn::{self, Init, Path};
use tch::{Device, Kind, Reduction, Tensor};

use crate::config::ModelConfig;
use crate::error::Result;
use dataloader::mask::IGNORE;

/// How a cell's token states become one vector (evaluation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Pooling {
    /// Mean over gene tokens (not `[CLS]`, not padding).
    Mean,
    Cls,
    /// Element-wise max over gene tokens.
    Max,
    /// `[mean, cls, max]` side by side.
    Concat,
}

/// Vocabulary sizes the model is built for; with `ModelConfig`, its full shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Vocabulary {
    pub n_genes: usize,
    pub n_bins: usize,
}

struct Norm {
    weight: Tensor,
    bias: Tensor,
}

impl Norm {
    fn new(p: Path, d: usize) -> Norm {
        Norm { weight: p.var("weight", &[d as i64], Init::Const(1.0)), bias: p.var("bias", &[d as i64], Init::Const(0.0)) }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let d = self.weight.size()[0];
        Ok(x.f_layer_norm([d], Some(&self.weight), Some(&self.bias), 1e-5, true)?)
    }
}

struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    fn new(p: Path, d_in: usize, d_out: usize) -> Linear {
        Linear {
            weight: p.var("weight", &[d_out as i64, d_in as i64], Init::Randn { mean: 0.0, stdev: 0.02 }),
            bias: p.var("bias", &[d_out as i64], Init::Const(0.0)),
        }
    }

    /// `x W^T + b` computed in `kind` (bf16: weights are cast from the fp32 masters, so
    /// gradients still reach them in fp32, as autocast does).
    fn forward(&self, x: &Tensor, kind: Kind) -> Result<Tensor> {
        if kind == Kind::Float {
            return Ok(x.f_linear(&self.weight, Some(&self.bias))?);
        }
        Ok(x.f_to_kind(kind)?.f_linear(&self.weight.f_to_kind(kind)?, Some(&self.bias.f_to_kind(kind)?))?)
    }
}

struct Layer {
    norm1: Norm,
    qkv: Linear,
    out: Linear,
    norm2: Norm,
    ff1: Linear,
    ff2: Linear,
}

/// The masked-bin encoder.
///
/// Mixed precision is explicit rather than libtorch autocast (whose CUDA dtype tch cannot set
/// to bf16): matmuls and attention run in `compute` kind, while embeddings, the residual
/// stream, LayerNorms and the loss stay fp32, like autocast's bf16 policy.
pub struct Encoder {
    pub cfg: ModelConfig,
    pub vocab: Vocabulary,
    /// `Kind::Float`, or `Kind::BFloat16` for mixed precision.
    pub compute: Kind,
    gene_emb: Tensor,
    bin_emb: Tensor,
    layers: Vec<Layer>,
    final_norm: Norm,
    head: Linear,
}

/// Sums over the masked positions of a batch, to be reduced across micro-batches and ranks.
pub struct MaskedLoss {
    /// Sum of cross-entropy over masked positions (a graph node for `backward`).
    pub loss_sum: Tensor,
    pub n_masked: usize,
    /// Masked positions whose top bin is the true bin.
    pub n_correct: i64,
}

impl Encoder {
    /// Creates the parameters under `root` (seed libtorch first for a reproducible init).
    pub fn new(root: &Path, cfg: &ModelConfig, vocab: Vocabulary) -> Encoder {
        let d = cfg.d_model;
        let emb = Init::Randn { mean: 0.0, stdev: 0.02 };
        let layers = (0..cfg.n_layers)
            .map(|i| {
                let p = root / "layers" / i;
                Layer {
                    norm1: Norm::new(&p / "norm1", d),
                    qkv: Linear::new(&p / "attn" / "qkv", d, 3 * d),
                    out: Linear::new(&p / "attn" / "out", d, d),
                    norm2: Norm::new(&p / "norm2", d),
                    ff1: Linear::new(&p / "ff" / "fc1", d, cfg.d_ff),
                    ff2: Linear::new(&p / "ff" / "fc2", cfg.d_ff, d),
                }
            })
            .collect();
        Encoder {
            cfg: cfg.clone(),
            vocab,
            compute: Kind::Float,
            // Gene ids: genes, then [CLS] (n_genes) and padding (n_genes + 1).
            gene_emb: (root / "gene_embedding").var("weight", &[vocab.n_genes as i64 + 2, d as i64], emb),
            // Bin ids: bins, then [MASK], [PAD], [CLS] (`tokenize::Vocab`).
            bin_emb: (root / "bin_embedding").var("weight", &[vocab.n_bins as i64 + 3, d as i64], emb),
            layers,
            final_norm: Norm::new(root / "final_norm", d),
            head: Linear::new(root / "head", d, vocab.n_bins),
        }
    }

    /// Token states `[batch, seq, d_model]` after the final norm. `padding` (`[batch, seq]`,
    /// true at padding) is `None` when no position is padded, which keeps the fused kernels.
    pub fn forward(&self, gene_ids: &Tensor, bins: &Tensor, padding: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let (b, l) = gene_ids.size2()?;
        let (d, h) = (self.cfg.d_model as i64, self.cfg.n_heads as i64);
        let p = if train { self.cfg.dropout } else { 0.0 };
        let p_attn = if train { self.cfg.attention_dropout } else { 0.0 };
        let c = self.compute;
        // SDPA's boolean mask: true where a query may attend to a key.
        let attend = match padding {
            Some(pad) => Some(pad.f_logical_not()?.f_view([b, 1, 1, l])?),
            None => None,
        };
        let mut x = Tensor::f_embedding(&self.gene_emb, gene_ids, -1, false, false)?
            .f_add(&Tensor::f_embedding(&self.bin_emb, bins, -1, false, false)?)?
            .f_dropout(p, train)?;
        for layer in &self.layers {
            let qkv = layer.qkv.forward(&layer.norm1.forward(&x)?, c)?.f_view([b, l, 3, h, d / h])?.f_permute([2, 0, 3, 1, 4])?;
            let (q, k, v) = (qkv.f_get(0)?, qkv.f_get(1)?, qkv.f_get(2)?);
            let att = Tensor::f_scaled_dot_product_attention(&q, &k, &v, attend.as_ref(), p_attn, false, None, false)?
                .f_transpose(1, 2)?
                .f_reshape([b, l, d])?;
            x = x.f_add(&layer.out.forward(&att, c)?.f_dropout(p, train)?)?;
            let ff = layer.ff2.forward(&layer.ff1.forward(&layer.norm2.forward(&x)?, c)?.f_gelu("none")?, c)?;
            x = x.f_add(&ff.f_dropout(p, train)?)?;
        }
        self.final_norm.forward(&x)
    }

    /// fp32 bin logits `[n, n_bins]` at flat positions (`batch × seq`) of token states; the
    /// head runs on those rows only.
    pub fn logits_at(&self, states: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let rows = states.f_reshape([-1, self.cfg.d_model as i64])?.f_index_select(0, positions)?;
        Ok(self.head.forward(&rows, self.compute)?.f_to_kind(Kind::Float)?)
    }

    /// Cross-entropy summed over masked positions. `masked` lists the flat positions whose
    /// `targets` are not `IGNORE`.
    pub fn masked_loss(&self, states: &Tensor, masked: &Tensor, targets: &Tensor) -> Result<MaskedLoss> {
        let logits = self.logits_at(states, masked)?;
        let loss_sum = logits.f_cross_entropy_loss::<Tensor>(targets, None, Reduction::Sum, IGNORE, 0.0)?;
        let n_correct = tch::no_grad(|| logits.f_argmax(-1, false)?.f_eq_tensor(targets)?.f_sum(Kind::Int64))?.f_int64_value(&[])?;
        Ok(MaskedLoss { loss_sum, n_masked: masked.size()[0] as usize, n_correct })
    }

    /// One vector per cell from token states (`[CLS]` is position 0).
    pub fn pool(&self, states: &Tensor, padding: &Tensor, how: Pooling) -> Result<Tensor> {
        let cls = states.f_select(1, 0)?;
        let genes = states.f_narrow(1, 1, states.size()[1] - 1)?;
        let keep = padding.f_narrow(1, 1, padding.size()[1] - 1)?.f_logical_not()?.f_unsqueeze(-1)?.f_to_kind(states.kind())?;
        let mean = || -> Result<Tensor> {
            let n = keep.f_sum_dim_intlist(1, false, Kind::Float)?.f_clamp_min(1.0)?;
            Ok(genes.f_mul(&keep)?.f_sum_dim_intlist(1, false, Kind::Float)?.f_div(&n)?)
        };
        let max = || -> Result<Tensor> {
            let neg = keep.f_logical_not()?.f_to_kind(Kind::Float)?.f_mul_scalar(-1e9)?;
            Ok(genes.f_to_kind(Kind::Float)?.f_add(&neg)?.f_amax([1], false)?)
        };
        Ok(match how {
            Pooling::Mean => mean()?,
            Pooling::Cls => cls.f_to_kind(Kind::Float)?,
            Pooling::Max => max()?,
            Pooling::Concat => Tensor::f_cat(&[mean()?, cls.f_to_kind(Kind::Float)?, max()?], 1)?,
        })
    }

    /// Parameter counts: (all, the body that runs on every token, the head).
    pub fn param_counts(&self) -> (usize, usize, usize) {
        let numel = |t: &Tensor| t.numel();
        let emb = numel(&self.gene_emb) + numel(&self.bin_emb);
        let head = numel(&self.head.weight) + numel(&self.head.bias);
        let body: usize = self
            .layers
            .iter()
            .flat_map(|l| [&l.norm1.weight, &l.norm1.bias, &l.qkv.weight, &l.qkv.bias, &l.out.weight, &l.out.bias, &l.norm2.weight, &l.norm2.bias, &l.ff1.weight, &l.ff1.bias, &l.ff2.weight, &l.ff2.bias])
            .map(numel)
            .sum::<usize>()
            + numel(&self.final_norm.weight)
            + numel(&self.final_norm.bias);
        (emb + body + head, body, head)
    }

    /// Training FLOPs (forward + backward) of one micro-batch: 6 × body params × tokens,
    /// 6 × head params × masked tokens, and 12 × layers × d_model × Σ (non-pad length)² for
    /// attention scores and values.
    pub fn train_flops(&self, seq_lens: &[usize], n_masked: usize) -> f64 {
        let (_, body, head) = self.param_counts();
        let tokens: usize = seq_lens.iter().sum();
        let sq: f64 = seq_lens.iter().map(|&t| (t * t) as f64).sum();
        6.0 * body as f64 * tokens as f64 + 6.0 * head as f64 * n_masked as f64 + 12.0 * (self.cfg.n_layers * self.cfg.d_model) as f64 * sq
    }
}

/// A `VarStore` on `device` with an encoder built from `seed`.
pub fn build(cfg: &ModelConfig, vocab: Vocabulary, device: Device, seed: u64) -> (nn::VarStore, Encoder) {
    tch::manual_seed(seed as i64);
    let vs = nn::VarStore::new(device);
    let enc = Encoder::new(&vs.root(), cfg, vocab);
    (vs, enc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> (nn::VarStore, Encoder) {
        let cfg = ModelConfig { d_model: 16, n_heads: 2, n_layers: 2, d_ff: 32, dropout: 0.0, attention_dropout: 0.0 };
        build(&cfg, Vocabulary { n_genes: 10, n_bins: 5 }, Device::Cpu, 1)
    }

    #[test]
    fn padding_does_not_change_real_tokens() {
        let (_vs, enc) = tiny();
        let genes = Tensor::from_slice(&[10i64, 0, 1, 2]).view([1, 4]);
        let bins = Tensor::from_slice(&[7i64, 1, 2, 5]).view([1, 4]);
        let short = enc.forward(&genes, &bins, None, false).unwrap();
        let genes_p = Tensor::from_slice(&[10i64, 0, 1, 2, 11, 11]).view([1, 6]);
        let bins_p = Tensor::from_slice(&[7i64, 1, 2, 5, 6, 6]).view([1, 6]);
        let pad = Tensor::from_slice(&[false, false, false, false, true, true]).view([1, 6]);
        let long = enc.forward(&genes_p, &bins_p, Some(&pad), false).unwrap();
        let diff = long.narrow(1, 0, 4).f_sub(&short).unwrap().abs().max().double_value(&[]);
        assert!(diff < 1e-5, "padding leaked into real tokens: {diff}");
        let pooled = enc.pool(&long, &pad, Pooling::Mean).unwrap();
        let expect = short.narrow(1, 1, 3).mean_dim(1, false, Kind::Float);
        assert!(pooled.f_sub(&expect).unwrap().abs().max().double_value(&[]) < 1e-5);
        assert_eq!(enc.pool(&long, &pad, Pooling::Concat).unwrap().size(), vec![1, 48]);
    }

    #[test]
    fn masked_loss_counts_only_masked_positions() {
        let (_vs, enc) = tiny();
        let genes = Tensor::from_slice(&[10i64, 0, 1, 2]).view([1, 4]);
        let bins = Tensor::from_slice(&[7i64, 5, 2, 5]).view([1, 4]);
        let states = enc.forward(&genes, &bins, None, false).unwrap();
        let masked = Tensor::from_slice(&[1i64, 3]);
        let targets = Tensor::from_slice(&[4i64, 0]);
        let l = enc.masked_loss(&states, &masked, &targets).unwrap();
        assert_eq!(l.n_masked, 2);
        // Near-uniform logits at init: each position costs about ln(5).
        let per = l.loss_sum.double_value(&[]) / 2.0;
        assert!((per - 5f64.ln()).abs() < 0.2, "{per}");
        let (all, body, head) = enc.param_counts();
        assert_eq!(head, 16 * 5 + 5);
        assert_eq!(all, body + head + 12 * 16 + 8 * 16);
    }

    #[test]
    fn bf16_compute_stays_close_to_fp32() {
        let (_vs, mut enc) = tiny();
        let genes = Tensor::from_slice(&[10i64, 0, 1, 2, 3, 4]).view([2, 3]);
        let bins = Tensor::from_slice(&[7i64, 1, 5, 7, 3, 0]).view([2, 3]);
        let full = enc.forward(&genes, &bins, None, false).unwrap();
        enc.compute = Kind::BFloat16;
        let half = enc.forward(&genes, &bins, None, false).unwrap();
        assert_eq!(half.kind(), Kind::Float, "residual stream stays fp32");
        let diff = half.f_sub(&full).unwrap().abs().max().double_value(&[]);
        assert!(diff > 0.0 && diff < 0.05, "{diff}");
    }
}
