//! The encoder (DESIGN §4): gene + bin embeddings, pre-LayerNorm transformer layers with
//! `scaled_dot_product_attention`, GELU feed-forward, final norm, a linear head over bins (or,
//! for ranked sequences, over genes).
//!
//! Parameters live in a `VarStore` under stable names (`layers.3.attn.qkv.weight`, ...), which
//! become the tensor names of `model.safetensors`, so Python users can load them directly.
//! Every op uses tch's fallible `f_` form: a libtorch failure (out of memory) is an error,
//! not a panic.

use std::path::Path;

use tch::nn::{self, Init};
use tch::{Device, Kind, Reduction, Tensor};

use crate::config::ModelConfig;
use crate::error::{Result, TrainError};
use dataloader::mask::IGNORE;
use dataloader::tokenize::SPECIAL_TOKENS;

/// Vocabulary sizes the model is built for; with `ModelConfig`, its full shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Vocabulary {
    pub n_genes: usize,
    /// Bins (binned sequences) or rank positions (ranked sequences).
    pub n_bins: usize,
    /// Ranked sequences: the token head predicts masked genes instead of bins.
    #[serde(default)]
    pub ranked: bool,
}

impl Vocabulary {
    /// Classes of the token head: bins, or genes for ranked sequences.
    pub fn n_targets(&self) -> usize {
        if self.ranked { self.n_genes } else { self.n_bins }
    }
}

pub(crate) struct Norm {
    weight: Tensor,
    bias: Tensor,
}

impl Norm {
    pub(crate) fn new(p: nn::Path, d: usize) -> Result<Norm> {
        Ok(Norm { weight: p.f_var("weight", &[d as i64], Init::Const(1.0))?, bias: p.f_var("bias", &[d as i64], Init::Const(0.0))? })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let d = self.weight.size()[0];
        Ok(x.f_layer_norm([d], Some(&self.weight), Some(&self.bias), 1e-5, true)?)
    }

    fn numel(&self) -> usize {
        self.weight.numel() + self.bias.numel()
    }
}

pub(crate) struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    pub(crate) fn new(p: nn::Path, d_in: usize, d_out: usize) -> Result<Linear> {
        Ok(Linear {
            weight: p.f_var("weight", &[d_out as i64, d_in as i64], Init::Randn { mean: 0.0, stdev: 0.02 })?,
            bias: p.f_var("bias", &[d_out as i64], Init::Const(0.0))?,
        })
    }

    /// `x W^T + b` computed in `kind` (bf16: weights are cast from the fp32 masters, so
    /// gradients still reach them in fp32, as autocast does).
    pub(crate) fn forward(&self, x: &Tensor, kind: Kind) -> Result<Tensor> {
        if kind == Kind::Float {
            return Ok(x.f_linear(&self.weight, Some(&self.bias))?);
        }
        Ok(x.f_to_kind(kind)?.f_linear(&self.weight.f_to_kind(kind)?, Some(&self.bias.f_to_kind(kind)?))?)
    }

    fn numel(&self) -> usize {
        self.weight.numel() + self.bias.numel()
    }
}

struct Attention {
    qkv: Linear,
    out: Linear,
    heads: i64,
}

impl Attention {
    /// Self-attention over `x` `[b, l, d]`; `attend` (`[b, 1, 1, l]`, true where a key may be
    /// attended) is `None` without padding, which keeps the fused (flash) kernels eligible.
    fn forward(&self, x: &Tensor, attend: Option<&Tensor>, p_attn: f64, c: Kind) -> Result<Tensor> {
        let (b, l, d) = x.size3()?;
        let qkv = self.qkv.forward(x, c)?.f_view([b, l, 3, self.heads, d / self.heads])?.f_permute([2, 0, 3, 1, 4])?;
        let (q, k, v) = (qkv.f_get(0)?, qkv.f_get(1)?, qkv.f_get(2)?);
        let att = Tensor::f_scaled_dot_product_attention(&q, &k, &v, attend, p_attn, false, None, false)?.f_transpose(1, 2)?.f_reshape([b, l, d])?;
        self.out.forward(&att, c)
    }
}

struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor, c: Kind) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(x, c)?.f_gelu("none")?, c)
    }
}

struct Layer {
    norm1: Norm,
    attn: Attention,
    norm2: Norm,
    ff: Mlp,
}

impl Layer {
    fn new(p: nn::Path, cfg: &ModelConfig) -> Result<Layer> {
        let d = cfg.d_model;
        Ok(Layer {
            norm1: Norm::new(&p / "norm1", d)?,
            attn: Attention { qkv: Linear::new(&p / "attn" / "qkv", d, 3 * d)?, out: Linear::new(&p / "attn" / "out", d, d)?, heads: cfg.n_heads as i64 },
            norm2: Norm::new(&p / "norm2", d)?,
            ff: Mlp { fc1: Linear::new(&p / "ff" / "fc1", d, cfg.d_ff)?, fc2: Linear::new(&p / "ff" / "fc2", cfg.d_ff, d)? },
        })
    }

    fn forward(&self, x: &Tensor, attend: Option<&Tensor>, p: f64, p_attn: f64, train: bool, c: Kind) -> Result<Tensor> {
        let x = x.f_add(&self.attn.forward(&self.norm1.forward(x)?, attend, p_attn, c)?.f_dropout(p, train)?)?;
        Ok(x.f_add(&self.ff.forward(&self.norm2.forward(&x)?, c)?.f_dropout(p, train)?)?)
    }

    fn numel(&self) -> usize {
        self.norm1.numel() + self.attn.qkv.numel() + self.attn.out.numel() + self.norm2.numel() + self.ff.fc1.numel() + self.ff.fc2.numel()
    }
}

/// The encoder's inputs for one batch, on the device.
pub struct Tokens<'a> {
    pub genes: &'a Tensor,
    pub bins: &'a Tensor,
    /// `[batch, seq]`, true at padding; `None` when no position is padded.
    pub padding: Option<&'a Tensor>,
    /// `[batch, 2]`: log10 depth of the input view and of the full cell (depth-token models).
    pub depth: Option<&'a Tensor>,
}

/// The encoder.
///
/// Mixed precision is explicit rather than libtorch autocast (whose CUDA dtype tch cannot set
/// to bf16): matmuls and attention run in `compute` kind, while embeddings, the residual
/// stream, LayerNorms and the loss stay fp32, like autocast's bf16 policy.
pub struct Encoder {
    pub cfg: ModelConfig,
    pub vocab: Vocabulary,
    /// `Kind::Float`, or `Kind::BFloat16` for mixed precision.
    pub compute: Kind,
    pub(crate) gene_emb: Tensor,
    bin_emb: Tensor,
    /// scFoundation-style depth tokens: a projection of (input depth, full depth) added to `[CLS]`.
    depth_proj: Option<Linear>,
    layers: Vec<Layer>,
    final_norm: Norm,
    head: Linear,
}

/// Sums over the masked positions of a batch, kept on the device (read once per step).
pub struct MaskedLoss {
    /// Sum of cross-entropy over masked positions (a graph node for `backward`).
    pub loss_sum: Tensor,
    /// Masked positions whose top class is the true one (a device scalar, no gradient).
    pub n_correct: Tensor,
}

impl Encoder {
    /// Creates the parameters under `root` (seed libtorch first for a reproducible init).
    pub fn new(root: &nn::Path, cfg: &ModelConfig, vocab: Vocabulary) -> Result<Encoder> {
        let d = cfg.d_model as i64;
        let emb = Init::Randn { mean: 0.0, stdev: 0.02 };
        let layers = (0..cfg.n_layers).map(|i| Layer::new(root / "layers" / i, cfg)).collect::<Result<Vec<_>>>()?;
        Ok(Encoder {
            cfg: cfg.clone(),
            vocab,
            compute: Kind::Float,
            // Gene ids: genes, then [CLS], padding and [MASK] (`Tokenizer::gene_cls/pad/mask`).
            gene_emb: (root / "gene_embedding").f_var("weight", &[(vocab.n_genes + SPECIAL_TOKENS) as i64, d], emb)?,
            // Bin ids: bins, then [MASK], [PAD], [CLS] (`tokenize::Vocab`).
            bin_emb: (root / "bin_embedding").f_var("weight", &[(vocab.n_bins + SPECIAL_TOKENS) as i64, d], emb)?,
            depth_proj: if cfg.depth_tokens { Some(Linear::new(root / "depth_tokens", 2, cfg.d_model)?) } else { None },
            layers,
            final_norm: Norm::new(root / "final_norm", cfg.d_model)?,
            head: Linear::new(root / "head", cfg.d_model, vocab.n_targets())?,
        })
    }

    /// Token states `[batch, seq, d_model]` after the final norm.
    pub fn forward(&self, t: &Tokens, train: bool) -> Result<Tensor> {
        let mut all = self.forward_layers(t, train, self.cfg.n_layers)?;
        all.pop().ok_or_else(|| TrainError::Internal("the encoder has no layers".into()))
    }

    /// The residual stream after each of the first `upto` layers; the last entry (layer
    /// `n_layers`) has the final norm applied. Middle layers often carry more cell state than
    /// the last one, which the reconstruction head shapes.
    pub fn forward_layers(&self, t: &Tokens, train: bool, upto: usize) -> Result<Vec<Tensor>> {
        let (b, l) = t.genes.size2()?;
        let p = if train { self.cfg.dropout } else { 0.0 };
        let p_attn = if train { self.cfg.attention_dropout } else { 0.0 };
        // SDPA's boolean mask: true where a query may attend to a key.
        let attend = match t.padding {
            Some(pad) => Some(pad.f_logical_not()?.f_view([b, 1, 1, l])?),
            None => None,
        };
        let mut x = Tensor::f_embedding(&self.gene_emb, t.genes, -1, false, false)?.f_add(&Tensor::f_embedding(&self.bin_emb, t.bins, -1, false, false)?)?;
        if let (Some(proj), Some(depth)) = (&self.depth_proj, t.depth) {
            let cls = x.f_narrow(1, 0, 1)?.f_add(&proj.forward(depth, Kind::Float)?.f_unsqueeze(1)?)?;
            x = Tensor::f_cat(&[cls, x.f_narrow(1, 1, l - 1)?], 1)?;
        }
        x = x.f_dropout(p, train)?;
        let upto = upto.clamp(1, self.layers.len());
        let mut out = Vec::with_capacity(upto);
        for (i, layer) in self.layers.iter().enumerate().take(upto) {
            x = layer.forward(&x, attend.as_ref(), p, p_attn, train, self.compute)?;
            out.push(if i + 1 == self.layers.len() { self.final_norm.forward(&x)? } else { x.shallow_clone() });
        }
        Ok(out)
    }

    /// fp32 logits `[n, n_targets]` at flat positions (`batch × seq`) of token states; the
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
        let n_correct = tch::no_grad(|| logits.f_argmax(-1, false)?.f_eq_tensor(targets)?.f_sum(Kind::Float))?;
        Ok(MaskedLoss { loss_sum, n_correct })
    }

    /// The gene embedding table (genes only, no special tokens), `[n_genes, d_model]`.
    pub fn gene_table(&self) -> Result<Tensor> {
        Ok(self.gene_emb.f_narrow(0, 0, self.vocab.n_genes as i64)?)
    }

    /// Parameter counts: (all, the body that runs on every token, the head).
    pub fn param_counts(&self) -> (usize, usize, usize) {
        let emb = self.gene_emb.numel() + self.bin_emb.numel() + self.depth_proj.as_ref().map_or(0, Linear::numel);
        let head = self.head.numel();
        let body: usize = self.layers.iter().map(Layer::numel).sum::<usize>() + self.final_norm.numel();
        (emb + body + head, body, head)
    }

    /// Training FLOPs (forward + backward) of one view of a micro-batch: 6 × body params ×
    /// tokens, 6 × head params × masked tokens, and 12 × layers × d_model × Σ (non-pad
    /// length)² for attention scores and values.
    pub fn train_flops(&self, seq_lens: &[usize], n_masked: usize) -> f64 {
        let (_, body, head) = self.param_counts();
        let tokens: usize = seq_lens.iter().sum();
        let sq: f64 = seq_lens.iter().map(|&t| (t * t) as f64).sum();
        6.0 * body as f64 * tokens as f64 + 6.0 * head as f64 * n_masked as f64 + 12.0 * (self.cfg.n_layers * self.cfg.d_model) as f64 * sq
    }
}

/// A `VarStore` on `device` with an encoder built from `seed`.
pub fn build(cfg: &ModelConfig, vocab: Vocabulary, device: Device, seed: u64) -> Result<(nn::VarStore, Encoder)> {
    tch::manual_seed(seed as i64);
    let vs = nn::VarStore::new(device);
    let enc = Encoder::new(&vs.root(), cfg, vocab)?;
    Ok((vs, enc))
}

/// Copies the tensors of `path` into `vs`'s variables in place. Unlike `VarStore::load`, which
/// swaps each variable's storage, this keeps variables that are views of the optimizer's flat
/// buffer aliased. Tensors of the file that `vs` lacks (another objective's heads) are ignored.
pub fn load_weights(vs: &nn::VarStore, path: &Path) -> Result<()> {
    let stored: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(path)
        .map_err(|e| TrainError::BadInput { path: path.to_path_buf(), problem: format!("cannot read the weights: {e}") })?
        .into_iter()
        .collect();
    for (name, mut var) in vs.variables() {
        let t = stored.get(&name).ok_or_else(|| TrainError::BadInput { path: path.to_path_buf(), problem: format!("lacks `{name}`: it belongs to another model") })?;
        if t.size() != var.size() {
            return Err(TrainError::BadInput { path: path.to_path_buf(), problem: format!("`{name}` has shape {:?}, the model needs {:?}", t.size(), var.size()) });
        }
        tch::no_grad(|| var.f_copy_(t))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn tiny() -> (nn::VarStore, Encoder) {
        let cfg = ModelConfig { d_model: 16, n_heads: 2, n_layers: 2, d_ff: 32, dropout: 0.0, attention_dropout: 0.0, depth_tokens: false };
        build(&cfg, Vocabulary { n_genes: 10, n_bins: 5, ranked: false }, Device::Cpu, 1).unwrap()
    }

    fn tokens<'a>(genes: &'a Tensor, bins: &'a Tensor, padding: Option<&'a Tensor>) -> Tokens<'a> {
        Tokens { genes, bins, padding, depth: None }
    }

    #[test]
    fn padding_does_not_change_real_tokens() {
        let (_vs, enc) = tiny();
        let genes = Tensor::from_slice(&[10i64, 0, 1, 2]).view([1, 4]);
        let bins = Tensor::from_slice(&[7i64, 1, 2, 5]).view([1, 4]);
        let short = enc.forward(&tokens(&genes, &bins, None), false).unwrap();
        let genes_p = Tensor::from_slice(&[10i64, 0, 1, 2, 11, 11]).view([1, 6]);
        let bins_p = Tensor::from_slice(&[7i64, 1, 2, 5, 6, 6]).view([1, 6]);
        let pad = Tensor::from_slice(&[false, false, false, false, true, true]).view([1, 6]);
        let long = enc.forward(&tokens(&genes_p, &bins_p, Some(&pad)), false).unwrap();
        let diff = long.narrow(1, 0, 4).f_sub(&short).unwrap().abs().max().double_value(&[]);
        assert!(diff < 1e-5, "padding leaked into real tokens: {diff}");
    }

    #[test]
    fn masked_loss_counts_only_masked_positions() {
        let (_vs, enc) = tiny();
        let genes = Tensor::from_slice(&[10i64, 0, 1, 2]).view([1, 4]);
        let bins = Tensor::from_slice(&[7i64, 5, 2, 5]).view([1, 4]);
        let states = enc.forward(&tokens(&genes, &bins, None), false).unwrap();
        let masked = Tensor::from_slice(&[1i64, 3]);
        let targets = Tensor::from_slice(&[4i64, 0]);
        let l = enc.masked_loss(&states, &masked, &targets).unwrap();
        // Near-uniform logits at init: each position costs about ln(5).
        let per = l.loss_sum.double_value(&[]) / 2.0;
        assert!((per - 5f64.ln()).abs() < 0.2, "{per}");
        let (all, body, head) = enc.param_counts();
        assert_eq!(head, 16 * 5 + 5);
        assert_eq!(all, body + head + 13 * 16 + 8 * 16);
    }

    #[test]
    fn every_layer_is_available_and_the_last_is_normed() {
        let (_vs, enc) = tiny();
        let genes = Tensor::from_slice(&[10i64, 0, 1, 2]).view([1, 4]);
        let bins = Tensor::from_slice(&[7i64, 1, 2, 5]).view([1, 4]);
        let t = tokens(&genes, &bins, None);
        let layers = enc.forward_layers(&t, false, 2).unwrap();
        assert_eq!(layers.len(), 2);
        assert!(layers[1].equal(&enc.forward(&t, false).unwrap()));
        assert!(!layers[0].equal(&layers[1]));
        assert_eq!(enc.forward_layers(&t, false, 1).unwrap().len(), 1);
    }

    #[test]
    fn depth_tokens_change_only_through_cls() {
        let cfg = ModelConfig { d_model: 16, n_heads: 2, n_layers: 1, d_ff: 32, dropout: 0.0, attention_dropout: 0.0, depth_tokens: true };
        let (_vs, enc) = build(&cfg, Vocabulary { n_genes: 10, n_bins: 5, ranked: false }, Device::Cpu, 1).unwrap();
        let genes = Tensor::from_slice(&[10i64, 0, 1]).view([1, 3]);
        let bins = Tensor::from_slice(&[7i64, 1, 2]).view([1, 3]);
        let shallow = Tensor::from_slice(&[2.0f32, 3.0]).view([1, 2]);
        let deep = Tensor::from_slice(&[3.0f32, 3.0]).view([1, 2]);
        let a = enc.forward(&Tokens { genes: &genes, bins: &bins, padding: None, depth: Some(&shallow) }, false).unwrap();
        let b = enc.forward(&Tokens { genes: &genes, bins: &bins, padding: None, depth: Some(&deep) }, false).unwrap();
        assert!(!a.equal(&b), "the depth reaches the states");
    }

    #[test]
    fn bf16_compute_stays_close_to_fp32() {
        let (_vs, mut enc) = tiny();
        let genes = Tensor::from_slice(&[10i64, 0, 1, 2, 3, 4]).view([2, 3]);
        let bins = Tensor::from_slice(&[7i64, 1, 5, 7, 3, 0]).view([2, 3]);
        let full = enc.forward(&tokens(&genes, &bins, None), false).unwrap();
        enc.compute = Kind::BFloat16;
        let half = enc.forward(&tokens(&genes, &bins, None), false).unwrap();
        assert_eq!(half.kind(), Kind::Float, "residual stream stays fp32");
        let diff = half.f_sub(&full).unwrap().abs().max().double_value(&[]);
        assert!(diff > 0.0 && diff < 0.05, "{diff}");
    }

    #[test]
    fn loading_weights_keeps_views_aliased() {
        let (vs, _enc) = tiny();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        vs.save(&path).unwrap();
        let (vs2, _enc2) = build(&ModelConfig { d_model: 16, n_heads: 2, n_layers: 2, d_ff: 32, dropout: 0.0, attention_dropout: 0.0, depth_tokens: false }, Vocabulary { n_genes: 10, n_bins: 5, ranked: false }, Device::Cpu, 9).unwrap();
        let mut head = vs2.variables().remove("head.bias").unwrap();
        let view_base = Tensor::zeros([5], (Kind::Float, Device::Cpu));
        tch::no_grad(|| head.set_data(&view_base));
        load_weights(&vs2, &path).unwrap();
        let original = vs.variables().remove("head.bias").unwrap();
        assert!(view_base.equal(&original), "the copy landed in the aliased buffer");
    }
}
