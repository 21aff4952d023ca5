//! Position-wise feed-forward networks, plain and gated.

use candle_core::Tensor;

use crate::dropout::Dropout;
use crate::error::{Error, Result};
use crate::linear::Linear;
use crate::weights::Weights;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Relu,
    /// Exact GELU, `x * Phi(x)` with the erf.
    GeluErf,
    /// GELU with the tanh approximation (GPT-2, Gemma's `gelu_pytorch_tanh`).
    GeluTanh,
    /// `x * sigmoid(x)`, a.k.a. swish.
    Silu,
}

impl Activation {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.track_op() && crate::grad_ops::fusable(x) {
            // Training: one node with its own backward.
            return crate::grad_ops::activation(x, *self);
        }
        Ok(match self {
            Activation::Relu => x.relu()?,
            Activation::GeluErf => x.gelu_erf()?,
            Activation::GeluTanh => x.gelu()?,
            Activation::Silu => x.silu()?,
        })
    }

    /// Parses the names used by HF configs and GGUF metadata.
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "relu" => Activation::Relu,
            "gelu" | "gelu_erf" => Activation::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_tanh" => Activation::GeluTanh,
            "silu" | "swish" => Activation::Silu,
            other => return Err(Error::config("activation", format!("unknown activation `{other}`"))),
        })
    }
}

/// The shape of an FFN: `act(up x)` or gated `act(gate x) * up x`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfnKind {
    Plain(Activation),
    Gated(Activation),
}

impl FfnKind {
    pub const SWIGLU: FfnKind = FfnKind::Gated(Activation::Silu);
    pub const GEGLU: FfnKind = FfnKind::Gated(Activation::GeluTanh);
}

/// Parameter names of the projections under the FFN's prefix.
#[derive(Debug, Clone, Copy)]
pub struct FfnNames {
    pub gate: &'static str,
    pub up: &'static str,
    pub down: &'static str,
}

impl FfnNames {
    /// HF Llama/Gemma naming.
    pub const HF: FfnNames = FfnNames { gate: "gate_proj", up: "up_proj", down: "down_proj" };
    /// PyTorch `nn.TransformerEncoderLayer` naming (no gate).
    pub const TORCH: FfnNames = FfnNames { gate: "", up: "linear1", down: "linear2" };
    /// Mixtral expert naming: `w2(act(w1 x) * w3 x)`.
    pub const MIXTRAL: FfnNames = FfnNames { gate: "w1", up: "w3", down: "w2" };
}

/// `down(dropout(act(up x)))`, or `down(dropout(act(gate x) * up x))` when gated.
#[derive(Debug, Clone)]
pub struct FeedForward {
    gate: Option<Linear>,
    up: Linear,
    down: Linear,
    act: Activation,
    dropout: Dropout,
}

impl FeedForward {
    /// The same FFN with every projection replaced by `f(projection)`.
    pub fn map_linears(&self, f: &impl Fn(&Linear) -> Result<Linear>) -> Result<Self> {
        Ok(FeedForward {
            gate: self.gate.as_ref().map(f).transpose()?,
            up: f(&self.up)?,
            down: f(&self.down)?,
            act: self.act,
            dropout: self.dropout.clone(),
        })
    }

    pub fn new(gate: Option<Linear>, up: Linear, down: Linear, act: Activation, dropout: Dropout) -> Result<Self> {
        let (d, f) = (up.in_features(), up.out_features());
        if down.in_features() != f || down.out_features() != d {
            return Err(Error::config(
                "ffn",
                format!("down projection {}->{} does not invert up {d}->{f}", down.in_features(), down.out_features()),
            ));
        }
        if let Some(g) = &gate {
            if g.in_features() != d || g.out_features() != f {
                return Err(Error::config(
                    "ffn",
                    format!("gate {}->{} != up {d}->{f}", g.in_features(), g.out_features()),
                ));
            }
        }
        Ok(FeedForward { gate, up, down, act, dropout })
    }

    pub fn load(
        w: &Weights,
        d_model: usize,
        d_ff: usize,
        kind: FfnKind,
        names: FfnNames,
        bias: bool,
        dropout: f32,
    ) -> Result<Self> {
        let (gated, act) = match kind {
            FfnKind::Plain(a) => (false, a),
            FfnKind::Gated(a) => (true, a),
        };
        let gate = if gated { Some(Linear::load(&w.pp(names.gate), d_model, d_ff, bias)?) } else { None };
        let up = Linear::load(&w.pp(names.up), d_model, d_ff, bias)?;
        let down = Linear::load(&w.pp(names.down), d_ff, d_model, bias)?;
        Self::new(gate, up, down, act, Dropout::new(dropout)?)
    }

    /// Inference on plain rows: `out` (`[m, d_model]`) = the FFN of the `m`
    /// rows of `x`. The projections pick their kernels
    /// ([`Linear::forward_rows`]); the activation runs as one pass. No
    /// dropout, no autograd.
    pub fn forward_rows(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        let f = self.up.out_features();
        let mut h = vec![0f32; m * f];
        self.up.forward_rows(x, m, &mut h, f)?;
        match &self.gate {
            Some(g) => {
                let mut gh = vec![0f32; m * f];
                g.forward_rows(x, m, &mut gh, f)?;
                match self.act {
                    Activation::GeluTanh => crate::kernels::fast::gelu_tanh_mul(&mut gh, &h),
                    Activation::Silu => crate::kernels::fast::silu_mul(&mut gh, &h),
                    act => {
                        crate::kernels::fast::activation_in_place(&mut gh, act);
                        gh.iter_mut().zip(&h).for_each(|(a, b)| *a *= b);
                    }
                }
                h = gh;
            }
            None => crate::kernels::fast::activation_in_place(&mut h, self.act),
        }
        self.down.forward_rows(&h, m, out, self.down.out_features())
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = match &self.gate {
            Some(g) => (self.act.forward(&g.forward(x)?)? * self.up.forward(x)?)?,
            None => self.act.forward(&self.up.forward(x)?)?,
        };
        self.down.forward(&self.dropout.forward(&h, train)?)
    }
}
