//! Token embeddings and absolute positional encodings.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::weights::{Init, Weights};

/// Looks up `ids` (any shape of u32) in a table of rows. Rows out of range
/// are an error, not a panic.
fn lookup(table: &Tensor, ids: &Tensor, what: &'static str) -> Result<Tensor> {
    let rows = table.dim(0)?;
    let ids = ids.to_dtype(DType::U32)?;
    let flat = ids.flatten_all()?;
    let max = if flat.elem_count() == 0 { 0 } else { flat.max(0)?.to_scalar::<u32>()? as usize };
    if flat.elem_count() > 0 && max >= rows {
        return Err(Error::input(what, format!("index {max} out of range for a table of {rows} rows")));
    }
    let out = table.index_select(&flat, 0)?;
    let mut shape = ids.dims().to_vec();
    shape.push(table.dim(1)?);
    Ok(out.reshape(shape)?)
}

/// Token embedding table `[vocab, d_model]`, optionally scaled by
/// `sqrt(d_model)` as in the 2017 paper (and Gemma).
#[derive(Debug, Clone)]
pub struct TokenEmbedding {
    table: Tensor,
    scale: Option<f64>,
}

impl TokenEmbedding {
    pub fn new(table: Tensor, scale_by_sqrt_d: bool) -> Result<Self> {
        let (_, d) = table.dims2()?;
        Ok(TokenEmbedding { table, scale: scale_by_sqrt_d.then(|| (d as f64).sqrt()) })
    }

    pub fn load(w: &Weights, vocab: usize, d_model: usize, scale_by_sqrt_d: bool) -> Result<Self> {
        let table =
            w.get_with_init(&[vocab, d_model], "weight", Init::Normal { std: 1.0 / (d_model as f64).sqrt() })?;
        Self::new(table, scale_by_sqrt_d)
    }

    pub fn table(&self) -> &Tensor {
        &self.table
    }

    pub fn vocab_size(&self) -> usize {
        self.table.dims()[0]
    }

    /// Inference on plain rows: adds row `ids[i]` of the table (scaled as
    /// [`TokenEmbedding::forward`] scales it) to row `i` of `out`
    /// (`[ids.len(), d_model]`).
    pub fn add_rows(&self, ids: &[u32], out: &mut [f32]) -> Result<()> {
        let (n, d) = self.table.dims2()?;
        if out.len() != ids.len() * d {
            return Err(Error::input("token embedding", format!("{} values for {} rows of {d}", out.len(), ids.len())));
        }
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= n) {
            return Err(Error::input("token embedding", format!("token id {id} outside the vocabulary of {n}")));
        }
        let scale = self.scale.unwrap_or(1.0) as f32;
        crate::kernels::fast::view_f32(&self.table, |t| {
            for (row, &id) in out.chunks_exact_mut(d).zip(ids) {
                let src = &t[id as usize * d..(id as usize + 1) * d];
                row.iter_mut().zip(src).for_each(|(o, v)| *o += v * scale);
            }
            Ok(())
        })
    }

    /// `ids` `[...]` -> `[..., d_model]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let x = lookup(&self.table, ids, "token embedding")?;
        match self.scale {
            Some(s) => Ok((x * s)?),
            None => Ok(x),
        }
    }
}

/// Fixed sinusoidal positional encoding (Vaswani et al. 2017, section 3.5):
/// `PE[pos, 2i] = sin(pos / 10000^(2i/d))`, `PE[pos, 2i+1] = cos(pos / 10000^(2i/d))`.
#[derive(Debug, Clone)]
pub struct SinusoidalPositionalEncoding {
    table: Tensor,
}

impl SinusoidalPositionalEncoding {
    pub fn new(max_len: usize, d_model: usize, dtype: DType, device: &Device) -> Result<Self> {
        if d_model % 2 != 0 {
            return Err(Error::config("d_model", format!("must be even for sinusoidal positions, got {d_model}")));
        }
        let mut pe = vec![0f32; max_len * d_model];
        for pos in 0..max_len {
            for i in 0..d_model / 2 {
                // Computed in f64 then rounded, so the table is exact to f32.
                let angle = pos as f64 / 10000f64.powf((2 * i) as f64 / d_model as f64);
                pe[pos * d_model + 2 * i] = angle.sin() as f32;
                pe[pos * d_model + 2 * i + 1] = angle.cos() as f32;
            }
        }
        let table = Tensor::from_vec(pe, (max_len, d_model), device)?.to_dtype(dtype)?;
        Ok(SinusoidalPositionalEncoding { table })
    }

    pub fn max_len(&self) -> usize {
        self.table.dims()[0]
    }

    /// Encodings for `positions` (u32, any shape) -> `[..., d_model]`.
    pub fn forward(&self, positions: &Tensor) -> Result<Tensor> {
        lookup(&self.table, positions, "sinusoidal positions")
    }
}

/// Learned absolute position embeddings (BERT, GPT-2) `[max_len, d_model]`.
#[derive(Debug, Clone)]
pub struct LearnedPositionalEmbedding {
    table: Tensor,
}

impl LearnedPositionalEmbedding {
    pub fn new(table: Tensor) -> Result<Self> {
        table.dims2()?;
        Ok(LearnedPositionalEmbedding { table })
    }

    pub fn load(w: &Weights, max_len: usize, d_model: usize) -> Result<Self> {
        Self::new(w.get_with_init(&[max_len, d_model], "weight", Init::Normal { std: 0.02 })?)
    }

    pub fn max_len(&self) -> usize {
        self.table.dims()[0]
    }

    pub fn forward(&self, positions: &Tensor) -> Result<Tensor> {
        lookup(&self.table, positions, "learned positions")
    }
}

/// Positions `offset .. offset + len` for each of `batch` rows, as u32 `[batch, len]`.
pub fn positions(batch: usize, len: usize, offset: usize, device: &Device) -> Result<Tensor> {
    let row = Tensor::arange(offset as u32, (offset + len) as u32, device)?;
    Ok(row.unsqueeze(0)?.repeat((batch, 1))?)
}
