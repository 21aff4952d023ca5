//! AdamW with state that can be saved, learning-rate schedules and global
//! gradient-norm clipping.
//!
//! Moments live on the host as plain `f32` vectors (float32 master state
//! whatever the compute precision), so a checkpoint writes them as they are
//! and a resumed run continues bit for bit.

use std::collections::HashMap;

use rayon::prelude::*;

use attn_nn::{Error, Result};
use candle_core::{Device, Tensor, Var};

use crate::config::{Schedule, TrainerConfig};

/// Learning rate at optimiser step `step` (0-based).
pub fn learning_rate(cfg: &TrainerConfig, step: usize) -> f64 {
    let s = step as f64 + 1.0;
    let w = cfg.warmup_steps as f64;
    let warm = if cfg.warmup_steps > 0 && s <= w { s / w } else { 1.0 };
    match cfg.schedule {
        Schedule::Constant => cfg.lr * warm,
        Schedule::Cosine => {
            if cfg.warmup_steps > 0 && s <= w {
                return cfg.lr * warm;
            }
            let span = (cfg.max_steps as f64 - w).max(1.0);
            let progress = ((s - w) / span).clamp(0.0, 1.0);
            let floor = cfg.lr * cfg.min_lr_ratio;
            floor + (cfg.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
        // lr * min(s / w, sqrt(w / s)): the paper's d^-0.5 * min(s^-0.5, s * w^-1.5)
        // with the peak (reached at s = w) set to lr.
        Schedule::InverseSqrt => cfg.lr * (s / w).min((w / s).sqrt()),
    }
}

/// Scales `grads` so their global L2 norm is at most `max_norm`; returns the
/// norm before clipping.
pub fn clip_grad_norm(grads: &mut [Vec<f32>], max_norm: Option<f64>) -> f64 {
    let norm = grads.iter().flat_map(|g| g.iter()).map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt();
    if let Some(max) = max_norm {
        if norm > max && norm.is_finite() {
            let s = (max / (norm + 1e-6)) as f32;
            for g in grads.iter_mut() {
                for x in g.iter_mut() {
                    *x *= s;
                }
            }
        }
    }
    norm
}

pub struct AdamW {
    params: Vec<(String, Var)>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    decay: Vec<bool>,
    /// Updates applied so far (bias correction uses it).
    pub t: u64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    /// Decay and the moving average of every parameter, when on.
    ema: Option<(f64, Vec<Vec<f32>>)>,
    /// Learning-rate multiplier of every parameter (layer-wise decay).
    lr_scale: Vec<f64>,
}

/// The number of the layer a parameter belongs to: the `i` of a
/// `layer.{i}.` or `layers.{i}.` segment of its name.
fn layer_index(name: &str) -> Option<usize> {
    let parts: Vec<&str> = name.split('.').collect();
    parts.windows(2).find(|w| w[0] == "layer" || w[0] == "layers").and_then(|w| w[1].parse().ok())
}

/// Learning-rate multipliers for layer-wise decay (see
/// `TrainerConfig::layer_lr_decay`): numbered layer `i` of `n` gets
/// `decay^(n - i)`, embeddings `decay^(n + 1)`, everything else 1.
pub fn layer_lr_scales(names: &[&str], decay: f64) -> Vec<f64> {
    let n = names.iter().filter_map(|n| layer_index(n)).max().map_or(0, |m| m + 1);
    names
        .iter()
        .map(|name| match layer_index(name) {
            Some(i) => decay.powi((n - i) as i32),
            None if name.contains("embed") => decay.powi(n as i32 + 1),
            None => 1.0,
        })
        .collect()
}

impl AdamW {
    /// Weight decay applies to matrices (rank >= 2), not to norms and biases.
    pub fn new(params: Vec<(String, Var)>, cfg: &TrainerConfig) -> Self {
        let m = params.iter().map(|(_, p)| vec![0f32; p.elem_count()]).collect();
        let v = params.iter().map(|(_, p)| vec![0f32; p.elem_count()]).collect();
        let decay = params.iter().map(|(_, p)| p.rank() >= 2).collect();
        let names: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
        let lr_scale = match cfg.layer_lr_decay {
            Some(d) => layer_lr_scales(&names, d),
            None => vec![1.0; params.len()],
        };
        AdamW {
            params,
            m,
            v,
            decay,
            t: 0,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
            ema: None,
            lr_scale,
        }
    }

    /// Keeps an exponential moving average of the weights, starting from
    /// their present values.
    pub fn with_ema(mut self, decay: Option<f64>) -> Result<Self> {
        self.ema = match decay {
            None => None,
            Some(d) => Some((
                d,
                self.params
                    .iter()
                    .map(|(_, v)| Ok(v.as_tensor().flatten_all()?.to_vec1::<f32>()?))
                    .collect::<Result<_>>()?,
            )),
        };
        Ok(self)
    }

    pub fn has_ema(&self) -> bool {
        self.ema.is_some()
    }

    /// Exchanges the model's weights and their moving average (a second
    /// call swaps them back, bit for bit). Does nothing without an average.
    pub fn swap_ema(&mut self) -> Result<()> {
        let Some((_, ema)) = &mut self.ema else { return Ok(()) };
        for ((_, var), avg) in self.params.iter().zip(ema.iter_mut()) {
            let now = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            var.set(&Tensor::from_slice(avg, var.shape(), var.device())?)?;
            *avg = now;
        }
        Ok(())
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// One update with host gradients (same order as the parameters).
    pub fn step(&mut self, grads: &[Vec<f32>], lr: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            return Err(Error::input(
                "adamw",
                format!("{} gradients for {} parameters", grads.len(), self.params.len()),
            ));
        }
        self.t += 1;
        let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        let bc2_sqrt = bc2.sqrt() as f32;
        let eps = self.eps as f32;
        for (i, (name, var)) in self.params.iter().enumerate() {
            if grads[i].len() != var.elem_count() {
                return Err(Error::input(
                    "adamw",
                    format!("gradient of `{name}` has {} values, not {}", grads[i].len(), var.elem_count()),
                ));
            }
        }
        // Every element is updated independently, so splitting the work over
        // threads changes nothing in the result.
        let weight_decay = self.weight_decay;
        let updated: Vec<Vec<f32>> = self
            .params
            .par_iter()
            .zip(grads.par_iter())
            .zip(self.m.par_iter_mut().zip(self.v.par_iter_mut()))
            .zip(self.decay.par_iter().zip(self.lr_scale.par_iter()))
            .map(|((((_, var), g), (m, v)), (&decays, &scale))| -> Result<Vec<f32>> {
                let mut p = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                let lr = lr * scale;
                let step = (lr / bc1) as f32;
                let decay = if decays { (lr * weight_decay) as f32 } else { 0.0 };
                for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    // Decoupled weight decay (Loshchilov & Hutter), then the Adam step.
                    *p -= decay * *p;
                    *p -= step * *m / (v.sqrt() / bc2_sqrt + eps);
                }
                Ok(p)
            })
            .collect::<Result<_>>()?;
        if let Some((d, ema)) = &mut self.ema {
            let t = self.t as f64;
            let d = d.min((1.0 + t) / (10.0 + t)) as f32;
            ema.par_iter_mut().zip(updated.par_iter()).for_each(|(a, p)| {
                for (a, &p) in a.iter_mut().zip(p) {
                    *a = d * *a + (1.0 - d) * p;
                }
            });
        }
        for ((_, var), p) in self.params.iter().zip(updated) {
            var.set(&Tensor::from_vec(p, var.shape().clone(), var.device())?)?;
        }
        Ok(())
    }

    /// Moments as named tensors (`m.{name}`, `v.{name}`, and `ema.{name}`
    /// with a weight average) for a checkpoint.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, (name, var)) in self.params.iter().enumerate() {
            out.insert(format!("m.{name}"), Tensor::from_slice(&self.m[i], var.shape(), &Device::Cpu)?);
            out.insert(format!("v.{name}"), Tensor::from_slice(&self.v[i], var.shape(), &Device::Cpu)?);
            if let Some((_, ema)) = &self.ema {
                out.insert(format!("ema.{name}"), Tensor::from_slice(&ema[i], var.shape(), &Device::Cpu)?);
            }
        }
        Ok(out)
    }

    /// Restores moments saved by [`AdamW::state_tensors`].
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, t: u64) -> Result<()> {
        let per_param = if self.ema.is_some() { 3 } else { 2 };
        for (i, (name, var)) in self.params.iter().enumerate() {
            let mut slots = vec![("m", &mut self.m[i]), ("v", &mut self.v[i])];
            if let Some((_, ema)) = &mut self.ema {
                slots.push(("ema", &mut ema[i]));
            }
            for (which, dst) in slots {
                let key = format!("{which}.{name}");
                let src = tensors.get(&key).ok_or_else(|| Error::MissingTensor { name: key.clone() })?;
                if src.dims() != var.dims() {
                    return Err(Error::TensorShape {
                        name: key,
                        expected: var.dims().to_vec(),
                        got: src.dims().to_vec(),
                    });
                }
                *dst = src.flatten_all()?.to_vec1::<f32>()?;
            }
        }
        if tensors.len() != per_param * self.params.len() {
            return Err(Error::input(
                "adamw",
                format!(
                    "optimiser state has {} tensors, the model needs {}{}",
                    tensors.len(),
                    per_param * self.params.len(),
                    if self.ema.is_some() { " (moments and weight averages)" } else { "" }
                ),
            ));
        }
        self.t = t;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Precision, TrainerConfig};

    fn cfg(schedule: Schedule) -> TrainerConfig {
        let text = "max_steps = 100\nlr = 1.0\nwarmup_steps = 10\n";
        let mut c: TrainerConfig = toml::from_str(text).unwrap();
        c.schedule = schedule;
        c.precision = Precision::F32;
        c
    }

    #[test]
    fn schedules_warm_up_then_decay() {
        let c = cfg(Schedule::Cosine);
        assert!((learning_rate(&c, 0) - 0.1).abs() < 1e-12);
        assert!((learning_rate(&c, 9) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&c, 99) - c.min_lr_ratio).abs() < 1e-9);
        let c = cfg(Schedule::InverseSqrt);
        assert!((learning_rate(&c, 9) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&c, 39) - 0.5).abs() < 1e-12); // sqrt(10/40)
    }

    #[test]
    fn adamw_matches_a_hand_computed_step() {
        let mut c = cfg(Schedule::Constant);
        c.weight_decay = 0.1;
        let p = Var::from_tensor(&Tensor::new(&[[1.0f32, -2.0]], &Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), p.clone())], &c);
        opt.step(&[vec![0.5, -0.25]], 0.01).unwrap();
        // First step: m_hat = g, v_hat = g^2, update = lr * sign(g) (eps aside).
        let got = p.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = [1.0 * (1.0 - 0.001) - 0.01, -2.0 * (1.0 - 0.001) + 0.01];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        let mut grads = vec![vec![3.0f32, 4.0]];
        let n = clip_grad_norm(&mut grads, Some(1.0));
        assert!((n - 5.0).abs() < 1e-9);
        assert!((grads[0][0] - 0.6).abs() < 1e-5 && (grads[0][1] - 0.8).abs() < 1e-5);
    }

    #[test]
    fn layer_wise_learning_rates() {
        let names = [
            "embeddings.word_embeddings.weight",
            "encoder.layer.0.dense.weight",
            "encoder.layer.2.dense.bias",
            "classifier.weight",
        ];
        let s = layer_lr_scales(&names, 0.5);
        assert_eq!(s, vec![0.0625, 0.125, 0.5, 1.0]);
        // In a step, a parameter with scale s moves as with learning rate lr * s.
        let mut c = cfg(Schedule::Constant);
        c.layer_lr_decay = Some(0.5);
        let vars: Vec<(String, Var)> = names
            .iter()
            .map(|n| (n.to_string(), Var::from_tensor(&Tensor::new(&[1.0f32], &Device::Cpu).unwrap()).unwrap()))
            .collect();
        let mut opt = AdamW::new(vars.clone(), &c);
        opt.step(&vec![vec![1.0f32]; 4], 0.1).unwrap();
        for ((_, v), want) in vars.iter().zip(s) {
            let got = v.as_tensor().to_vec1::<f32>().unwrap()[0];
            assert!((got - (1.0 - 0.1 * want as f32)).abs() < 1e-6, "{got} vs scale {want}");
        }
    }

    #[test]
    fn weight_average_follows_the_steps_and_swaps_back_exactly() {
        let c = cfg(Schedule::Constant);
        let p = Var::from_tensor(&Tensor::new(&[0.5f32, -1.5, 2.0], &Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), p.clone())], &c).with_ema(Some(0.9)).unwrap();
        let read = |p: &Var| p.as_tensor().to_vec1::<f32>().unwrap();
        let mut avg = read(&p);
        for t in 1..=30u64 {
            opt.step(&[vec![0.3, -0.2, 0.1]], 0.05).unwrap();
            let d = 0.9f64.min((1.0 + t as f64) / (10.0 + t as f64)) as f32;
            for (a, w) in avg.iter_mut().zip(read(&p)) {
                *a = d * *a + (1.0 - d) * w;
            }
        }
        let raw = read(&p);
        opt.swap_ema().unwrap();
        assert_eq!(read(&p), avg, "the swapped-in weights are the average");
        assert_ne!(read(&p), raw);
        opt.swap_ema().unwrap();
        assert_eq!(read(&p), raw, "a second swap restores the raw weights bit for bit");
        // The average travels with the optimiser state.
        let state = opt.state_tensors().unwrap();
        assert_eq!(state.len(), 3);
        let mut other = AdamW::new(vec![("w".into(), p.clone())], &c).with_ema(Some(0.9)).unwrap();
        other.load_state(&state, opt.t).unwrap();
        other.swap_ema().unwrap();
        assert_eq!(read(&p), avg);
        // A state without the average is refused when the average is on.
        let mut plain = state.clone();
        plain.remove("ema.w");
        let mut third = AdamW::new(vec![("w".into(), p)], &c).with_ema(Some(0.9)).unwrap();
        assert!(third.load_state(&plain, 1).is_err());
    }
}
