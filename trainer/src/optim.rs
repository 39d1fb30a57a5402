//! AdamW whose moment buffers we own (tch's hides them), so checkpoints hold them and a
//! resumed run continues bit for bit; the learning-rate schedule; global-norm clipping.

use std::path::Path;

use tch::{Kind, Tensor};

use crate::config::OptimConfig;
use crate::error::{Result, TrainError};

/// Decoupled-weight-decay Adam (Loshchilov & Hutter) over named parameters.
pub struct AdamW {
    cfg: OptimConfig,
    params: Vec<Param>,
    /// Optimizer steps taken (bias correction uses it).
    pub step: u64,
}

struct Param {
    name: String,
    value: Tensor,
    m: Tensor,
    v: Tensor,
    /// Matrices and embeddings decay; biases and norm gains do not.
    decay: bool,
}

impl AdamW {
    /// Tracks every trainable variable of `vs`, in name order.
    pub fn new(vs: &tch::nn::VarStore, cfg: &OptimConfig) -> Result<AdamW> {
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let params = named
            .into_iter()
            .map(|(name, value)| {
                let decay = value.dim() >= 2;
                Ok(Param { m: value.f_zeros_like()?, v: value.f_zeros_like()?, name, value, decay })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW { cfg: cfg.clone(), params, step: 0 })
    }

    /// Parameters in a fixed order (gradient all-reduce walks them identically on every rank).
    pub fn parameters(&self) -> impl Iterator<Item = &Tensor> {
        self.params.iter().map(|p| &p.value)
    }

    pub fn zero_grad(&mut self) -> Result<()> {
        for p in &mut self.params {
            let mut g = p.value.grad();
            if g.defined() {
                let _ = g.f_zero_()?;
            }
        }
        Ok(())
    }

    /// Multiplies every gradient by `factor` (averaging over masked tokens, clipping).
    pub fn scale_grads(&mut self, factor: f64) -> Result<()> {
        for p in &mut self.params {
            let mut g = p.value.grad();
            if g.defined() {
                let _ = g.f_mul_scalar_(factor)?;
            }
        }
        Ok(())
    }

    /// The global L2 norm of all gradients.
    pub fn grad_norm(&self) -> Result<f64> {
        let mut sq = 0.0;
        for p in &self.params {
            let g = p.value.grad();
            if g.defined() {
                sq += g.f_square()?.f_sum(Kind::Double)?.f_double_value(&[])?;
            }
        }
        Ok(sq.sqrt())
    }

    /// Clips to `max_norm` (0: off); returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64> {
        let norm = self.grad_norm()?;
        if max_norm > 0.0 && norm > max_norm {
            self.scale_grads(max_norm / (norm + 1e-6))?;
        }
        Ok(norm)
    }

    /// One update with learning rate `lr`.
    pub fn apply(&mut self, lr: f64) -> Result<()> {
        self.step += 1;
        let c = &self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        tch::no_grad(|| -> Result<()> {
            for p in &mut self.params {
                let g = p.value.grad();
                if !g.defined() {
                    continue;
                }
                let _ = p.m.f_lerp_(&g, 1.0 - c.beta1)?;
                let _ = p.v.f_mul_scalar_(c.beta2)?;
                let _ = p.v.f_add_(&g.f_square()?.f_mul_scalar(1.0 - c.beta2)?)?;
                if p.decay && c.weight_decay > 0.0 {
                    let _ = p.value.f_mul_scalar_(1.0 - lr * c.weight_decay)?;
                }
                let denom = p.v.f_div_scalar(bc2)?.f_sqrt()?.f_add_scalar(c.eps)?;
                let _ = p.value.f_add_(&p.m.f_div(&denom)?.f_mul_scalar(-lr / bc1)?)?;
            }
            Ok(())
        })
    }

    /// Writes the moments (`m.<param>`, `v.<param>`) as safetensors.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut named: Vec<(String, &Tensor)> = Vec::with_capacity(2 * self.params.len());
        for p in &self.params {
            named.push((format!("m.{}", p.name), &p.m));
            named.push((format!("v.{}", p.name), &p.v));
        }
        Ok(Tensor::write_safetensors(&named, path)?)
    }

    /// Restores moments written by `save`; every parameter must be there with its shape.
    pub fn load(&mut self, path: &Path, step: u64) -> Result<()> {
        let stored: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(path)?.into_iter().collect();
        for p in &mut self.params {
            for (prefix, buf) in [("m", &mut p.m), ("v", &mut p.v)] {
                let key = format!("{prefix}.{}", p.name);
                let t = stored.get(&key).ok_or_else(|| TrainError::input(path, format!("optimizer state lacks `{key}`: it belongs to another model")))?;
                if t.size() != buf.size() {
                    return Err(TrainError::input(path, format!("optimizer state `{key}` has shape {:?}, the model needs {:?}", t.size(), buf.size())));
                }
                tch::no_grad(|| buf.f_copy_(t))?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Linear warmup to `lr`, then cosine decay to `lr × min_lr_ratio` at `total` steps.
pub fn learning_rate(cfg: &OptimConfig, step: u64, total: u64) -> f64 {
    if step < cfg.warmup_steps {
        return cfg.lr * (step + 1) as f64 / cfg.warmup_steps as f64;
    }
    let span = total.saturating_sub(cfg.warmup_steps).max(1) as f64;
    let t = ((step - cfg.warmup_steps) as f64 / span).min(1.0);
    let floor = cfg.lr * cfg.min_lr_ratio;
    floor + (cfg.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{Init, VarStore};
    use tch::Device;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let cfg = OptimConfig { lr: 1.0, warmup_steps: 10, min_lr_ratio: 0.1, ..OptimConfig::default() };
        assert!((learning_rate(&cfg, 0, 100) - 0.1).abs() < 1e-12);
        assert!((learning_rate(&cfg, 9, 100) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&cfg, 10, 100) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&cfg, 55, 100) - 0.55).abs() < 1e-12);
        assert!((learning_rate(&cfg, 100, 100) - 0.1).abs() < 1e-12);
    }

    /// Matches the AdamW update written out by hand for two steps.
    #[test]
    fn update_matches_the_formula() {
        let vs = VarStore::new(Device::Cpu);
        let w = vs.root().var("w", &[2, 1], Init::Const(1.0));
        let cfg = OptimConfig { lr: 0.1, weight_decay: 0.5, beta1: 0.9, beta2: 0.99, eps: 1e-8, ..OptimConfig::default() };
        let mut opt = AdamW::new(&vs, &cfg).unwrap();
        let (mut x, mut m, mut v) = (1.0f64, 0.0, 0.0);
        for (t, grad) in [(1, 2.0f64), (2, -1.0)] {
            opt.zero_grad().unwrap();
            (w.sum(Kind::Float) * grad).backward();
            opt.apply(0.1).unwrap();
            m = 0.9 * m + 0.1 * grad;
            v = 0.99 * v + 0.01 * grad * grad;
            x *= 1.0 - 0.1 * 0.5;
            x -= 0.1 * (m / (1.0 - 0.9f64.powi(t))) / ((v / (1.0 - 0.99f64.powi(t))).sqrt() + 1e-8);
        }
        let got = w.double_value(&[0, 0]);
        assert!((got - x).abs() < 1e-6, "{got} vs {x}");
    }

    #[test]
    fn clipping_bounds_the_norm_and_state_round_trips() {
        let vs = VarStore::new(Device::Cpu);
        let w = vs.root().var("w", &[4], Init::Const(0.0));
        let mut opt = AdamW::new(&vs, &OptimConfig::default()).unwrap();
        (w.sum(Kind::Float) * 3.0).backward();
        assert!((opt.clip_grad_norm(1.0).unwrap() - 6.0).abs() < 1e-9);
        assert!((opt.grad_norm().unwrap() - 1.0).abs() < 1e-5);
        opt.apply(0.01).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("opt.safetensors");
        opt.save(&path).unwrap();
        let vs2 = VarStore::new(Device::Cpu);
        let _w2 = vs2.root().var("w", &[4], Init::Const(0.0));
        let mut opt2 = AdamW::new(&vs2, &OptimConfig::default()).unwrap();
        opt2.load(&path, 1).unwrap();
        assert!(opt2.params[0].m.equal(&opt.params[0].m) && opt2.params[0].v.equal(&opt.params[0].v));
        let vs3 = VarStore::new(Device::Cpu);
        let _w3 = vs3.root().var("w", &[5], Init::Const(0.0));
        let mut opt3 = AdamW::new(&vs3, &OptimConfig::default()).unwrap();
        assert!(opt3.load(&path, 1).unwrap_err().to_string().contains("shape"));
    }
}
