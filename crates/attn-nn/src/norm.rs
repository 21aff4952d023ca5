//! LayerNorm, RMSNorm and the residual wirings around a sublayer.

use candle_core::{DType, Tensor, D};

use crate::error::Result;
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
}
