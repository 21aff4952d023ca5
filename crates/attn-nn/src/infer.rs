//! Inference blocks on plain `f32` buffers that pick their own kernel.
//!
//! A model says *what* it multiplies; [`Linear`] decides *how*, from the
//! weights' storage and the CPU, as [`crate::grad_ops`] is chosen inside the
//! training blocks:
//!
//! - block-quantized weights ([`Q8Matrix`]: Q8_0, Q5_0, Q4_0 and the other
//!   GGUF block types at their own width) use the batched block matmul of
//!   [`crate::kernels::q8`] (AVX-512 VNNI, AVX2 or portable, picked at run time);
//!   with the portable kernel, a call with many rows (prefill) expands the
//!   weight to f32 a chunk of rows at a time and multiplies with `gemm`;
//! - float weights (a GGUF opened dequantized, for reference comparisons)
//!   use `gemm`;
//! - candle's own quantized matmul (`ATTN_KERNELS=candle`, the reference
//!   kernels) goes through tensors.
//!
//! The activation side of a block matmul is quantized once per input and
//! shared by every matrix that reads it ([`Input`]): q/k/v share one copy,
//! as do gate and up.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use crate::error::{Error, Result};
use crate::kernels::fast;
use crate::kernels::q8::{Kernel, Q8Acts, Q8Matrix};

/// With the portable block kernel (no AVX2), from this many rows a
/// block-quantized matmul expands the weight to f32 and uses `gemm`. The
/// AVX2 and AVX-512 VNNI block kernels are the faster ones at any size
/// (AVX2, 2 threads, 512-token prefill: Gemma 3 270M 503 against 355 tok/s
/// with the expansion, Qwen2.5-Coder-0.5B 155 against 108), and every
/// matmul is then batch-invariant.
const GEMM_ROWS: usize = fast::BLOCKED_FROM;
/// Whether many-row block matmuls expand the weight to f32 and keep the
/// activations in f32 on every kernel (`ATTN_PREFILL=f32`): slower, but a
/// prefill's logits are then those of the dequantized model in float32
/// (HF transformers' reference) up to summation order. By default prefill
/// quantizes activations to 8 bits per block of 32, as decode does (and as
/// llama.cpp does).
fn prefill_f32() -> bool {
    static F32: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *F32.get_or_init(|| std::env::var("ATTN_PREFILL").is_ok_and(|v| v == "f32"))
}

/// Whether a block matmul of `m` rows expands the weight to f32 and uses
/// `gemm`.
fn expands(m: usize) -> bool {
    m >= GEMM_ROWS && (Kernel::detected() == Kernel::Portable || prefill_f32())
}

/// Output rows of a (large) matrix expanded to f32 at a time.
const EXPAND_CHUNK: usize = 4096;

/// How a [`Linear`]'s weight is stored, which decides its kernel.
#[derive(Debug, Clone)]
pub enum Weight {
    /// Block-quantized panels: attn's block matmul.
    Blocks(Arc<Q8Matrix>),
    /// `[rows, cols]` f32, row-major: `gemm`.
    Dense { w: Arc<Vec<f32>>, rows: usize, cols: usize },
    /// candle's quantized matmul (the reference kernels).
    Candle(Arc<QTensor>),
}

/// `y = x · Wᵀ (+ b)` on plain buffers, `W` `[rows (out), cols (in)]`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Vec<f32>>,
    rows: usize,
    cols: usize,
}

impl Linear {
    pub fn new(weight: Weight, bias: Option<Vec<f32>>) -> Result<Self> {
        let (rows, cols) = match &weight {
            Weight::Blocks(m) => (m.rows(), m.cols()),
            Weight::Dense { w, rows, cols } => {
                if w.len() != rows * cols {
                    return Err(Error::input("linear", format!("{} weights for [{rows}, {cols}]", w.len())));
                }
                (*rows, *cols)
            }
            Weight::Candle(q) => match q.shape().dims() {
                &[r, c] => (r, c),
                d => return Err(Error::input("linear", format!("weight of shape {d:?} is not a matrix"))),
            },
        };
        if let Some(b) = &bias {
            if b.len() != rows {
                return Err(Error::input("linear", format!("bias of {} for {rows} outputs", b.len())));
            }
        }
        Ok(Linear { weight, bias, rows, cols })
    }

    /// The same weight with `other`'s bias.
    pub fn with_bias_of(mut self, other: &Linear) -> Self {
        self.bias = other.bias.clone();
        self
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn weight(&self) -> &Weight {
        &self.weight
    }

    /// Bytes of weight data one pass over the matrix reads.
    pub fn bytes(&self) -> usize {
        let b = match &self.weight {
            Weight::Blocks(m) => m.bytes(),
            Weight::Dense { w, .. } => w.len() * 4,
            Weight::Candle(q) => q.storage_size_in_bytes(),
        };
        b + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }

    /// `out[m, rows] = input · Wᵀ (+ b)`; `scratch` holds expanded weight
    /// rows where the kernel needs them (kept by the caller for reuse).
    pub fn forward(&self, input: &mut Input<'_>, out: &mut [f32], scratch: &mut Vec<f32>) -> Result<()> {
        let (m, n, k) = (input.m, self.rows, self.cols);
        if input.cols != k {
            return Err(Error::input("linear", format!("input of {} features for a weight of {k}", input.cols)));
        }
        if out.len() < m * n {
            return Err(Error::input("linear", format!("output buffer of {} for [{m}, {n}]", out.len())));
        }
        let out = &mut out[..m * n];
        match &self.weight {
            Weight::Blocks(w) if expands(m) => {
                let chunk = EXPAND_CHUNK.min(n);
                scratch.resize(chunk * k, 0.0);
                let mut r0 = 0;
                while r0 < n {
                    let rows = chunk.min(n - r0);
                    w.dequantize_rows(r0, rows, scratch)?;
                    fast::matmul_xwt_ld(input.x, m, k, &scratch[..rows * k], rows, &mut out[r0..], n)?;
                    r0 += rows;
                }
            }
            Weight::Blocks(w) => {
                if !input.quantized {
                    input.acts.quantize(input.x, m, k)?;
                    input.quantized = true;
                }
                w.matmul_acts(input.acts, out)?;
            }
            Weight::Dense { w, .. } => fast::matmul_xwt(input.x, m, k, w, n, out)?,
            Weight::Candle(q) => {
                let x = Tensor::from_slice(&input.x[..m * k], (m, k), &Device::Cpu)?;
                let y = QMatMul::from_arc(q.clone())?.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
                out.copy_from_slice(&y);
            }
        }
        self.add_bias(out);
        Ok(())
    }

    /// Adds the bias (if any) to each row of `out` (`[m, rows]`).
    fn add_bias(&self, out: &mut [f32]) {
        if let Some(b) = &self.bias {
            for row in out.chunks_exact_mut(self.rows) {
                for (v, bi) in row.iter_mut().zip(b) {
                    *v += bi;
                }
            }
        }
    }
}

/// `out_i[m, rows_i] = input · W_iᵀ (+ b_i)` for several linears of the same
/// input (q, k and v; gate and up). Block-quantized weights share one
/// parallel call ([`Q8Matrix::matmul_acts_many`]); each output is exactly
/// what [`Linear::forward`] gives.
pub fn forward_many(input: &mut Input<'_>, parts: &mut [(&Linear, &mut [f32])], scratch: &mut Vec<f32>) -> Result<()> {
    let (m, k) = (input.m, input.cols);
    let blocks =
        parts.iter().all(|(l, out)| matches!(l.weight, Weight::Blocks(_)) && l.cols == k && out.len() >= m * l.rows);
    if !blocks || expands(m) {
        for (l, out) in parts.iter_mut() {
            l.forward(input, out, scratch)?;
        }
        return Ok(());
    }
    if !input.quantized {
        input.acts.quantize(input.x, m, k)?;
        input.quantized = true;
    }
    let mut mats: Vec<(&Q8Matrix, &mut [f32])> = parts
        .iter_mut()
        .map(|(l, out)| match &l.weight {
            Weight::Blocks(w) => (&**w, &mut out[..m * l.rows]),
            _ => unreachable!("checked above: every weight is block-quantized"),
        })
        .collect();
    Q8Matrix::matmul_acts_many(&mut mats, input.acts)?;
    for (l, out) in parts.iter_mut() {
        l.add_bias(&mut out[..m * l.rows]);
    }
    Ok(())
}

/// Rows of an embedding table, looked up by id.
#[derive(Debug, Clone)]
pub enum Table {
    Blocks(Arc<Q8Matrix>),
    Dense { w: Arc<Vec<f32>>, rows: usize, cols: usize },
}

impl Table {
    pub fn rows(&self) -> usize {
        match self {
            Table::Blocks(m) => m.rows(),
            Table::Dense { rows, .. } => *rows,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Table::Blocks(m) => m.cols(),
            Table::Dense { cols, .. } => *cols,
        }
    }

    /// Row `id` as f32 into `out` (`cols` values).
    pub fn row_into(&self, id: usize, out: &mut [f32]) -> Result<()> {
        if id >= self.rows() {
            return Err(Error::input("embedding", format!("token id {id} outside the table of {}", self.rows())));
        }
        match self {
            Table::Blocks(m) => m.dequantize_rows(id, 1, out),
            Table::Dense { w, cols, .. } => {
                out[..*cols].copy_from_slice(&w[id * cols..(id + 1) * cols]);
                Ok(())
            }
        }
    }

    /// The table read as a projection (a tied output head).
    pub fn as_linear(&self) -> Result<Linear> {
        match self {
            Table::Blocks(m) => Linear::new(Weight::Blocks(m.clone()), None),
            Table::Dense { w, rows, cols } => {
                Linear::new(Weight::Dense { w: w.clone(), rows: *rows, cols: *cols }, None)
            }
        }
    }
}

/// One matmul input, quantized lazily and shared by the matrices reading it.
pub struct Input<'a> {
    x: &'a [f32],
    m: usize,
    cols: usize,
    acts: &'a mut Q8Acts,
    quantized: bool,
}

impl<'a> Input<'a> {
    /// `m` rows of `cols` values; `acts` is the caller's reusable buffer
    /// for the quantized copy.
    pub fn new(x: &'a [f32], m: usize, cols: usize, acts: &'a mut Q8Acts) -> Self {
        Input { x: &x[..m * cols], m, cols, acts, quantized: false }
    }
}
