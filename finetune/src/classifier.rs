//! The classifier: the pretrained encoder, its cell embedding (the pooling and layer the
//! pretraining run chose), and an MLP head, all in one `VarStore` so the trainer's flat AdamW
//! and data parallelism work on it unchanged.
//!
//! Head parameters live under `classifier.` (`classifier.fc1.weight`, ...); the encoder keeps
//! its pretraining names, so a fine-tuned `model.safetensors` also loads into `neurofm-eval`.
//! Parameters the classifier never uses (the masked-bin head, layers above the pooled one)
//! and, with a frozen encoder, the whole encoder are left out of the optimizer
//! (`requires_grad = false`), so they are neither decayed nor all-reduced.

use tch::nn::{self, Init};
use tch::{Device, Kind, Tensor};
use trainer::batch::DeviceView;
use trainer::model::{self, Encoder, Tokens, Vocabulary};
use trainer::pooling::pool;

use crate::error::{FinetuneError, Result};
use crate::pretrained::Architecture;

/// Prefix of the head's parameter names.
pub const HEAD_PREFIX: &str = "classifier.";

struct Dense {
    weight: Tensor,
    bias: Tensor,
}

impl Dense {
    /// LeCun-normal weights (std 1/√fan_in), zero bias.
    fn new(p: nn::Path, d_in: usize, d_out: usize) -> Result<Dense> {
        let stdev = 1.0 / (d_in.max(1) as f64).sqrt();
        Ok(Dense { weight: p.f_var("weight", &[d_out as i64, d_in as i64], Init::Randn { mean: 0.0, stdev })?, bias: p.f_var("bias", &[d_out as i64], Init::Const(0.0))? })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_linear(&self.weight, Some(&self.bias))?)
    }
}

/// dropout → linear → GELU → dropout → linear (or dropout → linear without a hidden layer).
struct Head {
    hidden: Option<Dense>,
    out: Dense,
    dropout: f64,
}

impl Head {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = x.f_dropout(self.dropout, train)?;
        let x = match &self.hidden {
            Some(h) => h.forward(&x)?.f_gelu("none")?.f_dropout(self.dropout, train)?,
            None => x,
        };
        self.out.forward(&x)
    }
}

/// Σ_i w[y_i] · CE(logits_i, y_i), the class-weighted cross-entropy of a batch summed (PyTorch's
/// `cross_entropy(weight=w, reduction="sum")`); the step divides by Σ_i w[y_i] over all ranks.
pub fn weighted_ce_sum(logits: &Tensor, y: &Tensor, weights: &Tensor) -> Result<Tensor> {
    Ok(logits.f_cross_entropy_loss(y, Some(weights), tch::Reduction::Sum, -100, 0.0)?)
}

/// Encoder + embedding + head, with the `VarStore` holding all of their parameters.
pub struct Classifier {
    pub vs: nn::VarStore,
    pub encoder: Encoder,
    head: Head,
    pub arch: Architecture,
    pub n_classes: usize,
    /// No encoder parameter trains: its forward pass keeps no graph.
    encoder_frozen: bool,
}

/// What a forward pass gives: the cell embeddings (the head's input) and the class logits.
pub struct Outputs {
    /// `[batch, dim]` fp32.
    pub embedding: Tensor,
    /// `[batch, n_classes]` fp32.
    pub logits: Tensor,
}

/// Where the encoder's weights come from.
pub enum EncoderInit<'a> {
    /// Random, from this seed: the from-scratch control, or before loading a fine-tune.
    Random(u64),
    /// A pretraining checkpoint's `model.safetensors` (its objective heads are skipped).
    Pretrained(&'a std::path::Path),
}

impl Classifier {
    /// The encoder from `init`, then a head for `n_classes` from `head_seed`. Fine-tuned
    /// weights are loaded afterwards with `trainer::model::load_weights` on `vs`.
    pub fn new(arch: &Architecture, n_classes: usize, device: Device, init: EncoderInit, head_seed: u64) -> Result<Classifier> {
        let seed = match init {
            EncoderInit::Random(s) => s,
            EncoderInit::Pretrained(_) => 0,
        };
        let (vs, mut encoder) = model::build(&arch.model, arch.vocab, device, seed)?;
        if let EncoderInit::Pretrained(weights) = init {
            // Before the head exists, so every variable of `vs` must be in the file.
            model::load_weights(&vs, weights)?;
        }
        encoder.cfg.dropout = arch.encoder_dropout;
        encoder.compute = arch.compute(device);
        tch::manual_seed(head_seed as i64 >> 1);
        let root = vs.root() / "classifier";
        let dim = arch.choice.pooling.dim(arch.model.d_model);
        let (hidden, out) = if arch.head_hidden > 0 {
            (Some(Dense::new(&root / "fc1", dim, arch.head_hidden)?), Dense::new(&root / "fc2", arch.head_hidden, n_classes)?)
        } else {
            (None, Dense::new(&root / "fc", dim, n_classes)?)
        };
        let head = Head { hidden, out, dropout: arch.head_dropout };
        Ok(Classifier { vs, encoder, head, arch: arch.clone(), n_classes, encoder_frozen: false })
    }

    /// Leaves out of the optimizer what does not train: the encoder parts the classifier never
    /// uses, and with `freeze_encoder` the whole encoder. Call before `AdamW::new`.
    pub fn freeze(&mut self, freeze_encoder: bool) {
        for (name, var) in self.vs.variables() {
            let trains = name.starts_with(HEAD_PREFIX) || (!freeze_encoder && self.encoder_scale(&name, 1.0).is_some());
            if !trains {
                let _ = var.set_requires_grad(false);
            }
        }
        self.encoder_frozen = freeze_encoder;
    }

    /// The learning-rate factor of parameter `name` under layer-wise decay `decay`: 1 for the
    /// head and the top pooled layer (and the final norm when it is used), one more factor of
    /// `decay` per layer below, `decay^k` for the embeddings under `k` pooled layers (Clark et
    /// al. 2020, ELECTRA; Bao et al. 2022, BEiT).
    pub fn lr_scale(&self, name: &str, decay: f64) -> f64 {
        if name.starts_with(HEAD_PREFIX) {
            return 1.0;
        }
        self.encoder_scale(name, decay).unwrap_or(1.0)
    }

    /// `None` for encoder parameters the classifier never uses.
    fn encoder_scale(&self, name: &str, decay: f64) -> Option<f64> {
        let k = self.arch.choice.layer;
        let mut parts = name.split('.');
        match parts.next()? {
            "gene_embedding" | "bin_embedding" | "depth_tokens" => Some(decay.powi(k as i32)),
            "final_norm" if k == self.arch.model.n_layers => Some(1.0),
            "layers" => {
                let i: usize = parts.next()?.parse().ok()?;
                (i < k).then(|| decay.powi((k - 1 - i) as i32))
            }
            _ => None,
        }
    }

    /// Embeddings and logits of one view of a batch (`train`: dropout on).
    pub fn forward(&self, v: &DeviceView, train: bool) -> Result<Outputs> {
        let depth = self.arch.model.depth_tokens.then_some(&v.depth);
        let tokens = Tokens { genes: &v.genes, bins: &v.bins, padding: v.padding.as_ref(), depth };
        let run = || self.encoder.forward_layers(&tokens, train, self.arch.choice.layer);
        let states = if self.encoder_frozen { tch::no_grad(run)? } else { run()? };
        let states = states.last().ok_or_else(|| FinetuneError::Internal("the encoder returned no layer".into()))?;
        let padding = match &v.padding {
            Some(p) => p.shallow_clone(),
            None => Tensor::f_zeros(v.genes.size(), (Kind::Bool, v.genes.device()))?,
        };
        let vocab: Vocabulary = self.arch.vocab;
        let embedding = pool(states, &v.bins, &padding, vocab.n_bins, vocab.ranked, self.arch.choice.pooling)?;
        let logits = self.head.forward(&embedding, train)?.f_to_kind(Kind::Float)?;
        Ok(Outputs { embedding, logits })
    }

    /// Parameters: (all, trained by the optimizer).
    pub fn param_counts(&self) -> (usize, usize) {
        let vars = self.vs.variables();
        (vars.values().map(Tensor::numel).sum(), vars.values().filter(|v| v.requires_grad()).map(Tensor::numel).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataloader::mask::SequenceMode;
    use evaluation::embed::EmbeddingChoice;
    use trainer::config::{ModelConfig, Precision};
    use trainer::pooling::Pooling;

    fn arch(layer: usize) -> Architecture {
        Architecture {
            model: ModelConfig { d_model: 8, n_heads: 2, n_layers: 3, d_ff: 16, dropout: 0.0, attention_dropout: 0.0, depth_tokens: false },
            vocab: Vocabulary { n_genes: 5, n_bins: 4, ranked: false },
            choice: EmbeddingChoice { pooling: Pooling::Mean, layer },
            sequence: SequenceMode::FullPanel,
            encoder_dropout: 0.0,
            head_hidden: 6,
            head_dropout: 0.0,
            precision: Precision::Fp32,
        }
    }

    #[test]
    fn weighted_cross_entropy_is_the_weighted_sum() {
        let logits = Tensor::from_slice(&[2.0f32, 0.0, 0.0, 1.0]).view([2, 2]);
        let y = Tensor::from_slice(&[0i64, 1]);
        let w = Tensor::from_slice(&[1.0f32, 3.0]);
        let got = weighted_ce_sum(&logits, &y, &w).unwrap().double_value(&[]);
        let want = (1.0 + (-2.0f64).exp()).ln() + 3.0 * (1.0 + (-1.0f64).exp()).ln();
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }

    /// Layer-wise decay: 1 at the top pooled layer and the head, one factor per layer below,
    /// the embeddings lowest; what the classifier never uses (the masked-bin head, layers above
    /// the pooled one) leaves the optimizer, and a frozen encoder leaves it entirely.
    #[test]
    fn lr_scales_follow_depth_and_unused_parameters_do_not_train() {
        let mut c = Classifier::new(&arch(2), 3, Device::Cpu, EncoderInit::Random(1), 2).unwrap();
        let scale = |n: &str| c.lr_scale(n, 0.5);
        assert_eq!(scale("classifier.fc2.weight"), 1.0);
        assert_eq!(scale("layers.1.attn.qkv.weight"), 1.0);
        assert_eq!(scale("layers.0.ff.fc1.bias"), 0.5);
        assert_eq!(scale("gene_embedding.weight"), 0.25);
        c.freeze(false);
        let trains: std::collections::BTreeMap<String, bool> = c.vs.variables().into_iter().map(|(n, v)| (n, v.requires_grad())).collect();
        assert!(trains["layers.1.attn.qkv.weight"] && trains["gene_embedding.weight"] && trains["classifier.fc1.weight"]);
        assert!(!trains["layers.2.attn.qkv.weight"] && !trains["head.weight"] && !trains["final_norm.weight"], "{trains:?}");
        let mut frozen = Classifier::new(&arch(3), 3, Device::Cpu, EncoderInit::Random(1), 2).unwrap();
        frozen.freeze(true);
        let trained: Vec<String> = frozen.vs.variables().into_iter().filter(|(_, v)| v.requires_grad()).map(|(n, _)| n).collect();
        assert!(trained.iter().all(|n| n.starts_with(HEAD_PREFIX)) && trained.len() == 4, "{trained:?}");
    }
}
