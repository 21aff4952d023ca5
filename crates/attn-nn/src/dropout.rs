//! Dropout that is active only in training mode.

use candle_core::Tensor;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    p: f32,
}

impl Dropout {
    pub fn new(p: f32) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::config("dropout", format!("must be in [0, 1), got {p}")));
        }
        Ok(Dropout { p })
    }

    pub fn p(&self) -> f32 {
        self.p
    }

    /// Zeroes each element with probability `p` and scales the rest by
    /// `1 / (1 - p)` when `train`; the identity otherwise.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train || self.p == 0.0 {
            return Ok(x.clone());
        }
        // The mask comes from attn's seeded stream so training runs are
        // reproducible (see `crate::rng`).
        if crate::grad_ops::fusable(x) {
            let (p, scale) = (self.p, 1.0 / (1.0 - self.p));
            let mask =
                crate::rng::uniform(x.elem_count()).into_iter().map(|u| if u >= p { scale } else { 0.0 }).collect();
            return crate::grad_ops::mask_mul(x, mask);
        }
        let u = Tensor::from_vec(crate::rng::uniform(x.elem_count()), x.shape(), x.device())?;
        let keep = u.ge(self.p as f64)?.to_dtype(x.dtype())?;
        Ok((x * (keep * (1.0 / (1.0 - self.p as f64)))?)?)
    }
}
