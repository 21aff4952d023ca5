//! A linear layer that hides the number format of its weight.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Module, Tensor};

use crate::error::{Error, Result};
use crate::kernels::fast;
use crate::weights::{Init, Weights};

fn check_bias(bias: Option<&Tensor>, out_features: usize) -> Result<()> {
    if let Some(b) = bias {
        if b.dims() != [out_features] {
            return Err(Error::input("linear", format!("bias shape {:?}, expected [{out_features}]", b.dims())));
        }
    }
    Ok(())
}

/// `y = x W^T + b` with `W` of shape `[out, in]`.
///
/// The weight is dense (f32/f16/bf16, differentiable) or quantized (a GGUF
/// block type, inference only); model code is the same for both.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    in_features: usize,
    out_features: usize,
}

#[derive(Debug, Clone)]
enum LinearWeight {
    Dense(candle_nn::Linear),
    Quantized(QMatMul),
    /// 8-bit blocks with a batched kernel (serving; see [`crate::kernels::q8`]).
    Q8(Arc<crate::kernels::q8::Q8Matrix>),
    /// bf16 AMX tiles (inference; see [`crate::kernels::amx`]).
    Bf16(Arc<crate::kernels::amx::Bf16Matrix>),
}

impl Linear {
    /// A dense layer from a `[out, in]` weight and an optional `[out]` bias.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight
            .dims2()
            .map_err(|_| Error::input("linear", format!("weight must be 2-D, got {:?}", weight.dims())))?;
        check_bias(bias.as_ref(), out_features)?;
        Ok(Linear {
            weight: LinearWeight::Dense(candle_nn::Linear::new(weight, None)),
            bias,
            in_features,
            out_features,
        })
    }

    /// A layer whose weight stays in a quantized block format.
    pub fn from_qtensor(weight: Arc<QTensor>, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight
            .shape()
            .dims2()
            .map_err(|_| Error::input("linear", format!("weight must be 2-D, got {:?}", weight.shape())))?;
        check_bias(bias.as_ref(), out_features)?;
        Ok(Linear { weight: LinearWeight::Quantized(QMatMul::from_arc(weight)?), bias, in_features, out_features })
    }

    /// Loads `{prefix}.weight` (and `{prefix}.bias` when `bias`), initialised
    /// Xavier-uniform / zeros when a trainable source creates them. A weight
    /// the source stores quantized (GGUF) stays quantized.
    pub fn load(w: &Weights, in_features: usize, out_features: usize, bias: bool) -> Result<Self> {
        if let Some(q) = w.get_quantized(&[out_features, in_features], "weight")? {
            let bias = if bias { Some(w.get_with_init(&[out_features], "bias", Init::Zeros)?) } else { None };
            return Self::from_qtensor(q, bias);
        }
        let weight =
            w.get_with_init(&[out_features, in_features], "weight", Init::xavier_uniform(out_features, in_features))?;
        let bias = if bias { Some(w.get_with_init(&[out_features], "bias", Init::Zeros)?) } else { None };
        Self::new(weight, bias)
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// The dense weight, if the layer is dense.
    pub fn weight(&self) -> Option<&Tensor> {
        match &self.weight {
            LinearWeight::Dense(l) => Some(l.weight()),
            LinearWeight::Quantized(_) | LinearWeight::Q8(_) | LinearWeight::Bf16(_) => None,
        }
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn is_quantized(&self) -> bool {
        matches!(self.weight, LinearWeight::Quantized(_) | LinearWeight::Q8(_))
    }

    /// The same layer with a dense f32 weight rounded to bf16 and packed
    /// for the AMX kernel of [`crate::kernels::amx`] (inference only; the
    /// products are summed in f32), where [`crate::kernels::amx::available`];
    /// elsewhere, and for a quantized weight, the layer unchanged.
    pub fn to_bf16(&self) -> Result<Linear> {
        match &self.weight {
            LinearWeight::Dense(l) if crate::kernels::amx::available() => {
                let bias = match &self.bias {
                    Some(b) => Some(fast::view_f32(b, |b| Ok(b.to_vec()))?),
                    None => None,
                };
                let w = fast::view_f32(l.weight(), |w| {
                    crate::kernels::amx::Bf16Matrix::new(w, self.out_features, self.in_features, bias.as_deref())
                })?;
                Ok(Linear { weight: LinearWeight::Bf16(Arc::new(w)), ..self.clone() })
            }
            _ => Ok(self.clone()),
        }
    }

    /// The same layer with its weight converted to 8-bit blocks and the
    /// batched kernel of [`crate::kernels::q8`]: each weight is read once per call
    /// however many rows the input has (continuous batching).
    pub fn to_q8(&self) -> Result<Linear> {
        let w = match &self.weight {
            LinearWeight::Dense(l) => l.weight().clone(),
            LinearWeight::Quantized(QMatMul::QTensor(q)) => q.dequantize(&candle_core::Device::Cpu)?,
            LinearWeight::Quantized(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => t.clone(),
            LinearWeight::Q8(_) => return Ok(self.clone()),
            LinearWeight::Bf16(_) => {
                return Err(Error::input("linear", "a bf16 layer has no float32 weight left to quantize"))
            }
        };
        Ok(Linear {
            weight: LinearWeight::Q8(Arc::new(crate::kernels::q8::Q8Matrix::from_tensor(&w)?)),
            ..self.clone()
        })
    }

    /// Inference on plain rows: `out[i * ld + j] = (x[i] · W[j] + b[j])` for
    /// the `m` rows of `x` (`[m, in]`, row-major), into columns `0..out` of
    /// rows `ld` apart (a block of columns of a wider buffer, e.g. q, k and
    /// v side by side). The kernel follows from the weight: `gemm` on a dense
    /// f32 weight (read in place), the 8-bit block matmul of [`crate::kernels::q8`]
    /// (activations quantized per row), or candle's quantized matmul. Split
    /// over rayon's threads when [`fast::may_split`]. No autograd.
    pub fn forward_rows(&self, x: &[f32], m: usize, out: &mut [f32], ld: usize) -> Result<()> {
        let (k, n) = (self.in_features, self.out_features);
        if x.len() < m * k || ld < n || (m > 0 && out.len() < (m - 1) * ld + n) {
            return Err(Error::input("linear", format!("buffers too small for [{m}, {k}] -> [{m}, {n}] (ld {ld})")));
        }
        if m == 0 {
            return Ok(());
        }
        let copy_rows = |y: &[f32], out: &mut [f32]| {
            for (dst, src) in out.chunks_mut(ld).zip(y.chunks_exact(n)) {
                dst[..n].copy_from_slice(src);
            }
        };
        match &self.weight {
            LinearWeight::Dense(l) => {
                fast::view_f32(l.weight(), |w| fast::matmul_xwt_par(x, (m, k), w, n, out, ld, fast::may_split()))?
            }
            LinearWeight::Q8(q) => copy_rows(&q.matmul(&x[..m * k], m)?, out),
            // The bias is inside the packed matrix.
            LinearWeight::Bf16(b) => return b.matmul(x, m, out, ld, fast::may_split()),
            LinearWeight::Quantized(q) => {
                let xt = Tensor::from_slice(&x[..m * k], (m, k), &candle_core::Device::Cpu)?;
                copy_rows(&q.forward(&xt)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?, out)
            }
        }
        if let Some(b) = &self.bias {
            fast::view_f32(b, |b| {
                fast::add_bias_rows(&mut out[..(m - 1) * ld + n], b, ld);
                Ok(())
            })?;
        }
        Ok(())
    }

    /// `x`: `[..., in]` -> `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let last = x.dims().last().copied().unwrap_or(0);
        if last != self.in_features {
            return Err(Error::input(
                "linear",
                format!("input last dim {last} != in_features {} (input shape {:?})", self.in_features, x.dims()),
            ));
        }
        let y = match &self.weight {
            LinearWeight::Dense(l) if crate::grad_ops::fusable(x) && crate::grad_ops::fusable(l.weight()) => {
                return crate::grad_ops::linear(x, l.weight(), self.bias.as_ref());
            }
            LinearWeight::Dense(l) => l.forward(x)?,
            LinearWeight::Quantized(q) => {
                // Quantized kernels take f32 activations.
                let dtype = x.dtype();
                let y = q.forward(&x.to_dtype(DType::F32)?)?;
                y.to_dtype(dtype)?
            }
            LinearWeight::Q8(q) => q.forward(x)?.to_dtype(x.dtype())?,
            LinearWeight::Bf16(b) => {
                let m = x.elem_count() / self.in_features;
                let mut y = vec![0f32; m * self.out_features];
                fast::view_f32(x, |v| b.matmul(v, m, &mut y, self.out_features, fast::may_split()))?;
                let mut dims = x.dims().to_vec();
                *dims.last_mut().expect("checked above") = self.out_features;
                // The bias is inside the packed matrix.
                return Ok(Tensor::from_vec(y, dims, x.device())?.to_dtype(x.dtype())?);
            }
        };
        match &self.bias {
            Some(b) => crate::grad_ops::bias_add(&y, b),
            None => Ok(y),
        }
    }
}
