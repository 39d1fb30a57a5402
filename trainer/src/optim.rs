//! AdamW over flat buffers whose state we own (tch's hides its moments), the learning-rate
//! schedule and global-norm clipping.
//!
//! Every parameter is a view into one flat fp32 buffer and every gradient a view into another
//! (PyTorch DDP's `gradient_as_bucket_view`), so a step is a handful of kernels over whole
//! buffers instead of ~11 per parameter, the gradient norm is one reduction read once, and
//! data parallelism all-reduces slices of the gradient buffer in place. Checkpoints still hold
//! the moments per parameter name, so a resumed run continues bit for bit on the CPU.

use std::path::Path;

use tch::{Kind, Tensor};

use crate::config::OptimConfig;
use crate::error::{Result, TrainError};

/// Decoupled-weight-decay Adam (Loshchilov & Hutter) over named parameters.
pub struct AdamW {
    cfg: OptimConfig,
    params: Vec<Param>,
    /// All parameters, decaying ones first: `params[i]` is `flat[offset..offset + numel]`.
    flat: Tensor,
    grads: Tensor,
    m: Tensor,
    v: Tensor,
    /// Elements of `flat` that decay (a prefix).
    n_decay: i64,
    /// Per-element learning-rate multipliers (fine-tuning's layer-wise decay); `None`: 1.
    lr_scale: Option<Tensor>,
    /// Scratch of the buffers' size: every step's intermediate is computed in place here, so a
    /// step allocates nothing (on the CPU a fresh multi-MB temporary costs page faults).
    scratch: Tensor,
    /// Optimizer steps taken (bias correction uses it).
    pub step: u64,
}

struct Param {
    name: String,
    value: Tensor,
    offset: i64,
}

impl AdamW {
    /// Takes every trainable variable of `vs`: matrices and embeddings decay and come first,
    /// biases and norm gains do not; each group in name order, the same on every rank. The
    /// variables become views of the flat buffer and their gradients views of the gradient
    /// buffer (filled with zeros).
    pub fn new(vs: &tch::nn::VarStore, cfg: &OptimConfig) -> Result<AdamW> {
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        named.sort_by(|a, b| (a.1.dim() < 2, &a.0).cmp(&(b.1.dim() < 2, &b.0)));
        let n_decay: i64 = named.iter().filter(|(_, t)| t.dim() >= 2).map(|(_, t)| t.numel() as i64).sum();
        let total: i64 = named.iter().map(|(_, t)| t.numel() as i64).sum();
        let device = vs.device();
        let flat = Tensor::f_zeros([total], (Kind::Float, device))?;
        let grads = Tensor::f_zeros([total], (Kind::Float, device))?;
        if named.iter().any(|(_, t)| t.kind() != Kind::Float) {
            return Err(TrainError::Internal("AdamW holds fp32 parameters only".into()));
        }
        // Give every parameter a gradient (zeros) so that it can be made a view.
        let zero = named.iter().try_fold(Tensor::f_zeros([], (Kind::Float, device))?, |acc, (_, t)| acc.f_add(&t.f_sum(Kind::Float)?.f_mul_scalar(0.0)?))?;
        zero.f_backward()?;
        let mut params = Vec::with_capacity(named.len());
        let mut offset = 0;
        tch::no_grad(|| -> Result<()> {
            for (name, mut value) in named {
                let n = value.numel() as i64;
                let shape = value.size();
                let view = flat.f_narrow(0, offset, n)?.f_view(shape.as_slice())?;
                view.shallow_clone().f_copy_(&value)?;
                value.f_set_data(&view)?;
                let mut g = value.f_grad()?;
                g.f_set_data(&grads.f_narrow(0, offset, n)?.f_view(shape.as_slice())?)?;
                params.push(Param { name, value, offset });
                offset += n;
            }
            Ok(())
        })?;
        let (m, v, scratch) = (flat.f_zeros_like()?, flat.f_zeros_like()?, flat.f_zeros_like()?);
        Ok(AdamW { cfg: cfg.clone(), params, flat, grads, m, v, n_decay, lr_scale: None, scratch, step: 0 })
    }

    /// Multiplies each parameter's learning rate, and with it its weight decay (decoupled decay
    /// is `lr × weight_decay`), by `scale(name)`: layer-wise learning-rate decay when
    /// fine-tuning (Clark et al. 2020, ELECTRA, appendix; Bao et al. 2022, BEiT §2.5). Scales
    /// must be positive and finite; a parameter that should not move is left out of the
    /// optimizer instead (`requires_grad = false` before `AdamW::new`).
    pub fn set_lr_scale(&mut self, scale: impl Fn(&str) -> f64) -> Result<()> {
        let s = self.flat.f_ones_like()?;
        for p in &self.params {
            let k = scale(&p.name);
            if !(k > 0.0 && k.is_finite()) {
                return Err(TrainError::Config(format!("learning-rate scale {k} for `{}` must be a positive number", p.name)));
            }
            let _ = s.f_narrow(0, p.offset, p.value.numel() as i64)?.f_fill_(k)?;
        }
        self.lr_scale = Some(s);
        Ok(())
    }

    /// The flat parameter buffer (broadcast and sync checks read it).
    pub fn flat_params(&self) -> &Tensor {
        &self.flat
    }

    /// The flat gradient buffer (data parallelism all-reduces it in place).
    pub fn flat_grads(&self) -> &Tensor {
        &self.grads
    }

    pub fn zero_grad(&mut self) -> Result<()> {
        let _ = self.grads.f_zero_()?;
        Ok(())
    }

    /// The global L2 norm of the gradients, as a device scalar.
    pub fn grad_norm(&self) -> Result<Tensor> {
        Ok(self.grads.f_norm()?)
    }

    /// Scales the gradients so their norm is at most `max_norm` (0: off), on the device; returns
    /// the norm before clipping as a device scalar.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Result<Tensor> {
        let norm = self.grad_norm()?;
        if max_norm > 0.0 {
            let coef = norm.f_add_scalar(1e-6)?.f_reciprocal()?.f_mul_scalar(max_norm)?.f_clamp_max(1.0)?;
            let _ = self.grads.f_mul_(&coef)?;
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
            let (g, scratch) = (&self.grads, &mut self.scratch);
            let _ = self.m.f_lerp_(g, 1.0 - c.beta1)?;
            scratch.f_copy_(g)?;
            let _ = scratch.f_mul_scalar_(1.0 - c.beta2)?;
            let _ = self.v.f_mul_scalar_(c.beta2)?.f_addcmul_(g, scratch)?;
            if c.weight_decay > 0.0 && self.n_decay > 0 {
                let mut decaying = self.flat.f_narrow(0, 0, self.n_decay)?;
                let _ = match &self.lr_scale {
                    None => decaying.f_mul_scalar_(1.0 - lr * c.weight_decay)?,
                    Some(s) => {
                        let mut factor = scratch.f_narrow(0, 0, self.n_decay)?;
                        factor.f_copy_(&s.f_narrow(0, 0, self.n_decay)?)?;
                        let _ = factor.f_mul_scalar_(-lr * c.weight_decay)?.f_add_scalar_(1.0)?;
                        decaying.f_mul_(&factor)?
                    }
                };
            }
            // p -= lr / bc1 · m / (sqrt(v / bc2) + eps), with the factor folded into the divisor.
            scratch.f_copy_(&self.v)?;
            let _ = scratch.f_div_scalar_(bc2)?.f_sqrt_()?.f_add_scalar_(c.eps)?.f_mul_scalar_(-bc1 / lr)?;
            if let Some(s) = &self.lr_scale {
                let _ = scratch.f_div_(s)?;
            }
            let _ = self.flat.f_addcdiv_(&self.m, scratch)?;
            Ok(())
        })
    }

    /// Writes the moments (`m.<param>`, `v.<param>`) as safetensors.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut named: Vec<(String, Tensor)> = Vec::with_capacity(2 * self.params.len());
        for p in &self.params {
            let (n, shape) = (p.value.numel() as i64, p.value.size());
            named.push((format!("m.{}", p.name), self.m.f_narrow(0, p.offset, n)?.f_view(shape.as_slice())?));
            named.push((format!("v.{}", p.name), self.v.f_narrow(0, p.offset, n)?.f_view(shape.as_slice())?));
        }
        Ok(Tensor::write_safetensors(&named, path)?)
    }

    /// Restores moments written by `save`; every parameter must be there with its shape.
    pub fn load(&mut self, path: &Path, step: u64) -> Result<()> {
        let stored: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(path)?.into_iter().collect();
        for p in &self.params {
            let (n, shape) = (p.value.numel() as i64, p.value.size());
            for (prefix, buf) in [("m", &self.m), ("v", &self.v)] {
                let key = format!("{prefix}.{}", p.name);
                let t = stored.get(&key).ok_or_else(|| TrainError::input(path, format!("optimizer state lacks `{key}`: it belongs to another model")))?;
                if t.size() != shape {
                    return Err(TrainError::input(path, format!("optimizer state `{key}` has shape {:?}, the model needs {shape:?}", t.size())));
                }
                tch::no_grad(|| buf.f_narrow(0, p.offset, n)?.f_copy_(&t.f_reshape([-1])?))?;
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

    /// Matches the AdamW update written out by hand for two steps; the bias does not decay.
    #[test]
    fn update_matches_the_formula() {
        let vs = VarStore::new(Device::Cpu);
        let w = vs.root().var("w", &[2, 1], Init::Const(1.0));
        let b = vs.root().var("b", &[1], Init::Const(1.0));
        let cfg = OptimConfig { lr: 0.1, weight_decay: 0.5, beta1: 0.9, beta2: 0.99, eps: 1e-8, ..OptimConfig::default() };
        let mut opt = AdamW::new(&vs, &cfg).unwrap();
        let (mut x, mut y, mut m, mut v) = (1.0f64, 1.0f64, 0.0, 0.0);
        for (t, grad) in [(1, 2.0f64), (2, -1.0)] {
            opt.zero_grad().unwrap();
            ((w.sum(Kind::Float) + b.sum(Kind::Float)) * grad).backward();
            opt.apply(0.1).unwrap();
            m = 0.9 * m + 0.1 * grad;
            v = 0.99 * v + 0.01 * grad * grad;
            let step = 0.1 * (m / (1.0 - 0.9f64.powi(t))) / ((v / (1.0 - 0.99f64.powi(t))).sqrt() + 1e-8);
            x = x * (1.0 - 0.1 * 0.5) - step;
            y -= step;
        }
        let got = w.double_value(&[0, 0]);
        assert!((got - x).abs() < 1e-6, "{got} vs {x}");
        assert!((b.double_value(&[0]) - y).abs() < 1e-6, "biases do not decay: {} vs {y}", b.double_value(&[0]));
    }

    /// A parameter whose learning rate is scaled by ½ takes exactly the steps of a run at half
    /// the rate (weight decay included); the others are untouched.
    #[test]
    fn lr_scale_is_a_per_parameter_learning_rate() {
        let cfg = OptimConfig { lr: 0.1, weight_decay: 0.5, ..OptimConfig::default() };
        let run = |lr: f64, scaled: bool| -> (f64, f64) {
            let vs = VarStore::new(Device::Cpu);
            let w = (vs.root() / "layers" / "0").var("w", &[2, 1], Init::Const(1.0));
            let h = (vs.root() / "head").var("w", &[2, 1], Init::Const(1.0));
            let mut opt = AdamW::new(&vs, &cfg).unwrap();
            if scaled {
                opt.set_lr_scale(|name| if name.starts_with("layers.") { 0.5 } else { 1.0 }).unwrap();
            }
            for grad in [2.0, -1.0, 0.5] {
                opt.zero_grad().unwrap();
                ((w.sum(Kind::Float) + h.sum(Kind::Float)) * grad).backward();
                opt.apply(lr).unwrap();
            }
            (w.double_value(&[0, 0]), h.double_value(&[0, 0]))
        };
        let (full, half, scaled) = (run(0.1, false), run(0.05, false), run(0.1, true));
        assert!((scaled.0 - half.0).abs() < 1e-7, "scaled layer {} vs half-rate run {}", scaled.0, half.0);
        assert!((scaled.1 - full.1).abs() < 1e-7, "the unscaled parameter moves as before: {} vs {}", scaled.1, full.1);
        assert!((full.0 - half.0).abs() > 1e-3, "the scale matters");
        let vs = VarStore::new(Device::Cpu);
        let _w = vs.root().var("w", &[1], Init::Const(1.0));
        assert!(AdamW::new(&vs, &cfg).unwrap().set_lr_scale(|_| 0.0).is_err());
    }

    /// The point of the flat buffers: backward writes into them, so a step never gathers.
    #[test]
    fn gradients_land_in_the_flat_buffer() {
        let vs = VarStore::new(Device::Cpu);
        let w = vs.root().var("w", &[3, 2], Init::Const(1.0));
        let b = vs.root().var("b", &[2], Init::Const(0.0));
        let opt = AdamW::new(&vs, &OptimConfig::default()).unwrap();
        for _ in 0..2 {
            ((&w * 2.0).sum(Kind::Float) + (&b * 3.0).sum(Kind::Float)).backward();
        }
        assert_eq!(Vec::<f32>::try_from(opt.flat_grads()).unwrap(), vec![4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 6.0, 6.0], "accumulated in place, matrices first");
        assert_eq!(Vec::<f32>::try_from(opt.flat_params()).unwrap(), vec![1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn clipping_bounds_the_norm_and_state_round_trips() {
        let vs = VarStore::new(Device::Cpu);
        let w = vs.root().var("w", &[4], Init::Const(0.0));
        let mut opt = AdamW::new(&vs, &OptimConfig::default()).unwrap();
        (w.sum(Kind::Float) * 3.0).backward();
        assert!((opt.clip_grad_norm(1.0).unwrap().double_value(&[]) - 6.0).abs() < 1e-9);
        assert!((opt.grad_norm().unwrap().double_value(&[]) - 1.0).abs() < 1e-5);
        opt.apply(0.01).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("opt.safetensors");
        opt.save(&path).unwrap();
        let vs2 = VarStore::new(Device::Cpu);
        let _w2 = vs2.root().var("w", &[4], Init::Const(0.0));
        let mut opt2 = AdamW::new(&vs2, &OptimConfig::default()).unwrap();
        opt2.load(&path, 1).unwrap();
        assert!(opt2.m.equal(&opt.m) && opt2.v.equal(&opt.v));
        let vs3 = VarStore::new(Device::Cpu);
        let _w3 = vs3.root().var("w", &[5], Init::Const(0.0));
        let mut opt3 = AdamW::new(&vs3, &OptimConfig::default()).unwrap();
        assert!(opt3.load(&path, 1).unwrap_err().to_string().contains("shape"));
    }
}
