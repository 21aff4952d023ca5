//! LayerNorm, RMSNorm and the residual wirings around a sublayer.

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};
use crate::fast;
use crate::weights::{Init, Weights};

/// Layer normalisation over the last dimension (Ba et al. 2016).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f64,
}

impl LayerNorm {
    pub fn new(weight: Tensor, bias: Option<Tensor>, eps: f64) -> Self {
        LayerNorm { weight, bias, eps }
    }

    pub fn load(w: &Weights, dim: usize, eps: f64, bias: bool) -> Result<Self> {
        let weight = w.get_with_init(&[dim], "weight", Init::Ones)?;
        let bias = if bias { Some(w.get_with_init(&[dim], "bias", Init::Zeros)?) } else { None };
        Ok(Self::new(weight, bias, eps))
    }

    /// Inference on plain rows: `x[r] = layer_norm(x[r] + residual[r])` for
    /// every row of `x` (`residual`, when given, has the shape of `x`: the
    /// post-norm residual add fused into the same pass). No autograd.
    pub fn forward_rows(&self, x: &mut [f32], residual: Option<&[f32]>) -> Result<()> {
        check_rows(x, residual, &self.weight)?;
        let eps = self.eps as f32;
        fast::view_f32(&self.weight, |w| match &self.bias {
            Some(b) => fast::view_f32(b, |b| {
                fast::layer_norm_rows(x, residual, w, Some(b), eps);
                Ok(())
            }),
            None => {
                fast::layer_norm_rows(x, residual, w, None, eps);
                Ok(())
            }
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Statistics in f32 whatever the activation dtype; written out with
        // differentiable ops (candle's fused layer_norm has no backward).
        let dtype = x.dtype();
        if crate::grad_ops::fusable(x) && crate::grad_ops::fusable(&self.weight) {
            return crate::grad_ops::layer_norm(x, &self.weight, self.bias.as_ref(), self.eps);
        }
        let x = x.to_dtype(DType::F32)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let mut y = xn.to_dtype(dtype)?.broadcast_mul(&self.weight.to_dtype(dtype)?)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.to_dtype(dtype)?)?;
        }
        Ok(y)
    }
}

/// Root-mean-square normalisation (Zhang & Sennrich 2019). With
/// `add_one`, the learned scale is `1 + weight` (Gemma stores it that way).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
    add_one: bool,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64, add_one: bool) -> Self {
        RmsNorm { weight, eps, add_one }
    }

    pub fn load(w: &Weights, dim: usize, eps: f64, add_one: bool) -> Result<Self> {
        let init = if add_one { Init::Zeros } else { Init::Ones };
        Ok(Self::new(w.get_with_init(&[dim], "weight", init)?, eps, add_one))
    }

    /// Inference on plain rows: `x[r] = rms_norm(x[r] + residual[r])` for
    /// every row of `x`. No autograd.
    pub fn forward_rows(&self, x: &mut [f32], residual: Option<&[f32]>) -> Result<()> {
        check_rows(x, residual, &self.weight)?;
        if let Some(r) = residual {
            for (v, rr) in x.iter_mut().zip(r) {
                *v += rr;
            }
        }
        let scale = if self.add_one { (&self.weight + 1.0)? } else { self.weight.clone() };
        fast::view_f32(&scale, |w| {
            fast::rms_norm_rows(x, w, self.eps as f32);
            Ok(())
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        if crate::grad_ops::fusable(x) && crate::grad_ops::fusable(&self.weight) {
            let scale = if self.add_one { (&self.weight + 1.0)? } else { self.weight.clone() };
            return crate::grad_ops::rms_norm(x, &scale, self.eps);
        }
        let xf = x.to_dtype(DType::F32)?;
        let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xf.broadcast_div(&(ms + self.eps)?.sqrt()?)?;
        let scale = self.weight.to_dtype(DType::F32)?;
        let scale = if self.add_one { (scale + 1.0)? } else { scale };
        Ok(xn.broadcast_mul(&scale)?.to_dtype(dtype)?)
    }
}

/// Either kind of normalisation, for models that choose by config.
#[derive(Debug, Clone)]
pub enum Norm {
    Layer(LayerNorm),
    Rms(RmsNorm),
}

impl Norm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Layer(n) => n.forward(x),
            Norm::Rms(n) => n.forward(x),
        }
    }

    /// [`LayerNorm::forward_rows`] or [`RmsNorm::forward_rows`].
    pub fn forward_rows(&self, x: &mut [f32], residual: Option<&[f32]>) -> Result<()> {
        match self {
            Norm::Layer(n) => n.forward_rows(x, residual),
            Norm::Rms(n) => n.forward_rows(x, residual),
        }
    }
}

fn check_rows(x: &[f32], residual: Option<&[f32]>, weight: &Tensor) -> Result<()> {
    let d = weight.elem_count();
    if d == 0 || x.len() % d != 0 || residual.is_some_and(|r| r.len() != x.len()) {
        return Err(Error::input(
            "norm",
            format!("{} values (residual {:?}) are not rows of {d}", x.len(), residual.map(<[f32]>::len)),
        ));
    }
    Ok(())
}

/// Where the normalisation sits around a residual sublayer `f`.
#[derive(Debug, Clone)]
pub enum Residual {
    /// `norm(x + f(x))`: the 2017 paper's "Add & Norm".
    Post(Norm),
    /// `x + f(norm(x))`: GPT-2, Llama and most models since.
    Pre(Norm),
    /// `x + post(f(pre(x)))`: Gemma 2/3.
    Sandwich { pre: Norm, post: Norm },
}

impl Residual {
    pub fn forward(&self, x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        match self {
            Residual::Post(n) => n.forward(&(x + f(x)?)?),
            Residual::Pre(n) => Ok((x + f(&n.forward(x)?)?)?),
            Residual::Sandwich { pre, post } => Ok((x + post.forward(&f(&pre.forward(x)?)?)?)?),
        }
    }

    /// [`Residual::forward`] on plain rows (inference): `f(input, out)`
    /// writes the sublayer's output for `input` into `out` (the shape of
    /// `x`). The post-norm's residual add runs inside the norm's pass.
    pub fn forward_rows(&self, x: &mut Vec<f32>, f: impl FnOnce(&[f32], &mut [f32]) -> Result<()>) -> Result<()> {
        let mut y = vec![0f32; x.len()];
        match self {
            Residual::Post(n) => {
                f(x, &mut y)?;
                n.forward_rows(&mut y, Some(x))?;
                *x = y;
            }
            Residual::Pre(n) => {
                let mut h = x.clone();
                n.forward_rows(&mut h, None)?;
                f(&h, &mut y)?;
                x.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
            }
            Residual::Sandwich { pre, post } => {
                let mut h = x.clone();
                pre.forward_rows(&mut h, None)?;
                f(&h, &mut y)?;
                post.forward_rows(&mut y, None)?;
                x.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
            }
        }
        Ok(())
    }
}
