//! The output head (projection to the vocabulary) and the training loss.

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};
use crate::linear::Linear;

/// A linear projection to vocabulary logits, with softmax / log-softmax.
#[derive(Debug, Clone)]
pub struct OutputHead {
    proj: Linear,
}

impl OutputHead {
    pub fn new(proj: Linear) -> Self {
        OutputHead { proj }
    }

    pub fn vocab_size(&self) -> usize {
        self.proj.out_features()
    }

    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.proj.forward(x)
    }

    /// Log-probabilities over the vocabulary, computed in f32.
    pub fn log_probs(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::log_softmax(&self.logits(x)?.to_dtype(DType::F32)?, D::Minus1)?)
    }

    pub fn probs(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::softmax(&self.logits(x)?.to_dtype(DType::F32)?, D::Minus1)?)
    }
}

/// Mean cross-entropy over the non-ignored targets with label smoothing, as
/// PyTorch's `F.cross_entropy(logits, targets, ignore_index, label_smoothing)`:
/// per token `(1 - eps) * -log p[y] + eps * mean_c(-log p[c])`.
///
/// `logits`: `[n, vocab]`; `targets`: `[n]` (integer ids).
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: Option<u32>,
    label_smoothing: f64,
) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    if targets.dims() != [n] {
        return Err(Error::input(
            "cross entropy",
            format!("targets {:?} for logits {:?}", targets.dims(), logits.dims()),
        ));
    }
    if !(0.0..1.0).contains(&label_smoothing) {
        return Err(Error::config("label_smoothing", format!("must be in [0, 1), got {label_smoothing}")));
    }
    let targets = targets.to_dtype(DType::U32)?;
    let ids = targets.to_vec1::<u32>()?;
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= v && Some(t) != ignore_index) {
        return Err(Error::input("cross entropy", format!("target id {bad} outside a vocabulary of {v}")));
    }
    let keep: Vec<f32> = ids.iter().map(|&t| if Some(t) == ignore_index { 0.0 } else { 1.0 }).collect();
    let count: f32 = keep.iter().sum();
    if count == 0.0 {
        return Err(Error::input("cross entropy", "every target is ignored"));
    }
    if crate::grad_ops::fusable(logits) {
        let rows = ids.iter().map(|&t| (Some(t) != ignore_index).then_some(t)).collect();
        let per_token = crate::grad_ops::cross_entropy_rows(logits, rows, label_smoothing)?;
        return Ok((per_token.sum_all()? / count as f64)?);
    }
    // Ignored positions gather a valid index (0) and are then zeroed.
    let safe: Vec<u32> = ids.iter().map(|&t| if (t as usize) < v { t } else { 0 }).collect();
    let safe = Tensor::from_vec(safe, (n, 1), logits.device())?;
    let keep = Tensor::from_vec(keep, n, logits.device())?;
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let nll = logp.gather(&safe, 1)?.squeeze(1)?.neg()?;
    let smooth = logp.mean(D::Minus1)?.neg()?;
    let per_token = ((nll * (1.0 - label_smoothing))? + (smooth * label_smoothing)?)?;
    Ok(((per_token * keep)?.sum_all()? / count as f64)?)
}
