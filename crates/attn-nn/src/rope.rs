//! Rotary position embeddings (RoPE, Su et al. 2021).

use candle_core::{DType, Device, Tensor, D};

use crate::error::{Error, Result};

/// How the rotated pairs are laid out along the head dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Pairs are adjacent: `(x0, x1), (x2, x3), ...` (GPT-J, the original paper, GGML "normal").
    Interleaved,
    /// Pairs are split halves: `(x_i, x_{i + d/2})` (GPT-NeoX, Llama/Gemma in HF, GGML "neox").
    Halves,
}

/// Precomputed cos/sin tables for positions `0..max_positions`.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    cos: Tensor,
    sin: Tensor,
    head_dim: usize,
    layout: RopeLayout,
}

impl RotaryEmbedding {
    /// `theta_i = base^(-2i/head_dim)`; the angle at position `p` is `p * theta_i`.
    pub fn new(
        base: f64,
        head_dim: usize,
        max_positions: usize,
        layout: RopeLayout,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::new_scaled(base, 1.0, head_dim, max_positions, layout, dtype, device)
    }

    /// With linear position scaling: the angle at position `p` is
    /// `p / scale * theta_i` (HF `rope_scaling = {type: linear}`).
    pub fn new_scaled(
        base: f64,
        scale: f64,
        head_dim: usize,
        max_positions: usize,
        layout: RopeLayout,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if !(scale > 0.0) {
            return Err(Error::config("rope_scale", format!("must be positive, got {scale}")));
        }
        if head_dim % 2 != 0 || head_dim == 0 {
            return Err(Error::config("head_dim", format!("must be even and positive for RoPE, got {head_dim}")));
        }
        if !(base > 0.0) {
            return Err(Error::config("rope_base", format!("must be positive, got {base}")));
        }
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for i in 0..half {
                // Same rounding as the reference implementations: inverse
                // frequencies in f32, product in f32.
                let inv_freq = (1.0 / base.powf((2 * i) as f64 / head_dim as f64) / scale) as f32;
                let angle = p as f32 * inv_freq;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (max_positions, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (max_positions, half), device)?.to_dtype(dtype)?;
        Ok(RotaryEmbedding { cos, sin, head_dim, layout })
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    pub fn layout(&self) -> RopeLayout {
        self.layout
    }

    /// Rotates `x` `[batch, heads, seq, head_dim]` by the angles of
    /// `positions` `[batch, seq]` (u32). Each sequence of the batch may sit
    /// at its own positions (continuous batching, speculative decoding).
    pub fn forward(&self, x: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let (b, _h, t, d) = x.dims4()?;
        if d != self.head_dim {
            return Err(Error::input("rope", format!("head dim {d} != {}", self.head_dim)));
        }
        if positions.dims() != [b, t] {
            return Err(Error::input("rope", format!("positions shape {:?}, expected [{b}, {t}]", positions.dims())));
        }
        let flat = positions.to_dtype(DType::U32)?.flatten_all()?;
        if flat.elem_count() > 0 {
            let max = flat.max(0)?.to_scalar::<u32>()? as usize;
            if max >= self.max_positions() {
                return Err(Error::input(
                    "rope",
                    format!("position {max} beyond the {} positions of the rotary table", self.max_positions()),
                ));
            }
        }
        let half = d / 2;
        if crate::grad_ops::fusable(x) && self.cos.dtype() == DType::F32 {
            let cos = self.cos.index_select(&flat, 0)?.reshape((b, t, half))?;
            let sin = self.sin.index_select(&flat, 0)?.reshape((b, t, half))?;
            return crate::grad_ops::rope(x, &cos, &sin, self.layout == RopeLayout::Interleaved);
        }
        let cos = self.cos.index_select(&flat, 0)?.reshape((b, 1, t, half))?.to_dtype(x.dtype())?;
        let sin = self.sin.index_select(&flat, 0)?.reshape((b, 1, t, half))?.to_dtype(x.dtype())?;
        match self.layout {
            RopeLayout::Halves => {
                let x1 = x.narrow(D::Minus1, 0, half)?;
                let x2 = x.narrow(D::Minus1, half, half)?;
                let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
                let r2 = (x1.broadcast_mul(&sin)? + x2.broadcast_mul(&cos)?)?;
                Ok(Tensor::cat(&[r1, r2], D::Minus1)?)
            }
            RopeLayout::Interleaved => {
                let (_, h, _, _) = x.dims4()?;
                let pairs = x.reshape((b, h, t, half, 2))?;
                let x1 = pairs.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?;
                let x2 = pairs.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?;
                let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
                let r2 = (x1.broadcast_mul(&sin)? + x2.broadcast_mul(&cos)?)?;
                Ok(Tensor::stack(&[r1, r2], D::Minus1)?.reshape((b, h, t, d))?)
            }
        }
    }
}
