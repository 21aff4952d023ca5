//! LayerNorm, RMSNorm and the residual wirings around a sublayer.

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};
use crate::kernels::fast;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{AttentionConfig, MultiHeadAttention};
    use crate::ffn::{Activation, FeedForward};
    use crate::linear::Linear;
    use crate::Dropout;
    use candle_core::Device;
    use rand::{Rng, SeedableRng};

    fn rand_t(shape: &[usize], seed: u64, scale: f32, offset: f32) -> Tensor {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0) * scale + offset).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
    }

    /// Every residual wiring and both norms on plain rows against the
    /// tensor forward, with a linear layer (dense and 8-bit) as the sublayer,
    /// and a packed attention / FFN against their padded tensor forwards.
    #[test]
    fn row_paths_match_the_tensor_forward() {
        let (m, d) = (7, 16);
        let x = rand_t(&[m, d], 1, 2.0, 0.0);
        let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let ln = || Norm::Layer(LayerNorm::new(rand_t(&[d], 2, 0.5, 1.0), Some(rand_t(&[d], 3, 0.5, 0.0)), 1e-5));
        let rms = |add_one| Norm::Rms(RmsNorm::new(rand_t(&[d], 4, 0.5, 0.5), 1e-6, add_one));
        let dense = Linear::new(rand_t(&[d, d], 5, 0.3, 0.0), Some(rand_t(&[d], 6, 0.1, 0.0))).unwrap();
        for lin in [dense.clone(), dense.to_q8().unwrap()] {
            for res in
                [Residual::Post(ln()), Residual::Pre(rms(false)), Residual::Sandwich { pre: rms(true), post: ln() }]
            {
                let want =
                    res.forward(&x, |h| lin.forward(h)).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let mut got = xv.clone();
                res.forward_rows(&mut got, |h, y| lin.forward_rows(h, m, y, d)).unwrap();
                assert!(max_diff(&got, &want) < 1e-5, "{res:?}: {}", max_diff(&got, &want));
            }
        }
        // A projection into columns of a wider buffer (rows `ld` apart).
        let mut wide = vec![7f32; m * 3 * d];
        dense.forward_rows(&xv, m, &mut wide[d..], 3 * d).unwrap();
        let want = dense.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        for (r, w) in want.iter().enumerate() {
            assert!(max_diff(&wide[r * 3 * d + d..r * 3 * d + 2 * d], w) < 1e-5);
            assert!(wide[r * 3 * d..r * 3 * d + d].iter().all(|v| *v == 7.0));
        }
        // Packed attention and FFN against the padded tensor path: two sequences of 3 and 4.
        let lin = |s| Linear::new(rand_t(&[d, d], s, 0.3, 0.0), Some(rand_t(&[d], s + 10, 0.1, 0.0))).unwrap();
        let attn = MultiHeadAttention::new(AttentionConfig::mha(d, 4), lin(11), lin(12), lin(13), lin(14)).unwrap();
        let up = Linear::new(rand_t(&[32, d], 15, 0.3, 0.0), Some(rand_t(&[32], 16, 0.1, 0.0))).unwrap();
        let down = Linear::new(rand_t(&[d, 32], 17, 0.3, 0.0), None).unwrap();
        let ffn = FeedForward::new(None, up, down, Activation::GeluErf, Dropout::new(0.0).unwrap()).unwrap();
        let (lens, t) = ([3usize, 4], 4);
        let mut padded = vec![0f32; 2 * t * d];
        padded[..3 * d].copy_from_slice(&xv[..3 * d]);
        padded[t * d..].copy_from_slice(&xv[3 * d..]);
        let xp = Tensor::from_vec(padded, (2, t, d), &Device::Cpu).unwrap();
        let a = attn.forward_padded(&xp, &lens, false).unwrap().to_vec3::<f32>().unwrap();
        let f = ffn.forward(&xp, false).unwrap().to_vec3::<f32>().unwrap();
        let unpad = |v: Vec<Vec<Vec<f32>>>| -> Vec<f32> {
            v.into_iter().zip(lens).flat_map(|(s, l)| s.into_iter().take(l).flatten()).collect()
        };
        let mut got = vec![0f32; m * d];
        attn.forward_packed(&xv, &[0, 3, 7], &mut got).unwrap();
        assert!(max_diff(&got, &unpad(a)) < 1e-5);
        ffn.forward_rows(&xv, m, &mut got).unwrap();
        assert!(max_diff(&got, &unpad(f)) < 1e-5);
    }
}
