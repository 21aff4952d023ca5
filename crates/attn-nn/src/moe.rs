//! Mixture-of-Experts feed-forward layer with a softmax router and top-k
//! expert selection (Mixtral style).

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::ffn::{FeedForward, FfnKind, FfnNames};
use crate::linear::Linear;
use crate::weights::Weights;

/// What an MoE layer returns: the mixed expert outputs and the router
/// logits, which training needs for the load-balancing loss.
#[derive(Debug, Clone)]
pub struct MoeOutput {
    /// Same shape as the input.
    pub hidden: Tensor,
    /// `[tokens, n_experts]`, in f32.
    pub router_logits: Tensor,
}

#[derive(Debug, Clone)]
pub struct MoeFeedForward {
    router: Linear,
    experts: Vec<FeedForward>,
    top_k: usize,
    /// Renormalise the k selected probabilities to sum to 1 (Mixtral does).
    normalize_top_k: bool,
}

impl MoeFeedForward {
    pub fn new(router: Linear, experts: Vec<FeedForward>, top_k: usize, normalize_top_k: bool) -> Result<Self> {
        if experts.is_empty() {
            return Err(Error::config("n_experts", "must be at least 1"));
        }
        if top_k == 0 || top_k > experts.len() {
            return Err(Error::config("top_k", format!("must be in 1..={}, got {top_k}", experts.len())));
        }
        if router.out_features() != experts.len() {
            return Err(Error::config(
                "router",
                format!("has {} outputs for {} experts", router.out_features(), experts.len()),
            ));
        }
        Ok(MoeFeedForward { router, experts, top_k, normalize_top_k })
    }

    /// Loads Mixtral-named weights: `gate` (the router) and
    /// `experts.{i}.{w1,w2,w3}`.
    pub fn load(
        w: &Weights,
        d_model: usize,
        d_ff: usize,
        n_experts: usize,
        top_k: usize,
        kind: FfnKind,
    ) -> Result<Self> {
        let router = Linear::load(&w.pp("gate"), d_model, n_experts, false)?;
        let experts = (0..n_experts)
            .map(|i| FeedForward::load(&w.pp("experts").pp(i), d_model, d_ff, kind, FfnNames::MIXTRAL, false, 0.0))
            .collect::<Result<Vec<_>>>()?;
        Self::new(router, experts, top_k, true)
    }

    pub fn n_experts(&self) -> usize {
        self.experts.len()
    }

    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// Routes every token of `x` `[..., d_model]` to its top-k experts and
    /// sums their outputs weighted by the router probabilities.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<MoeOutput> {
        let dims = x.dims().to_vec();
        let d = *dims.last().ok_or_else(|| Error::input("moe", "input is a scalar"))?;
        let flat = x.reshape(((), d))?;
        let n = flat.dim(0)?;
        let router_logits = self.router.forward(&flat)?.to_dtype(DType::F32)?;
        let probs = candle_nn::ops::softmax(&router_logits, 1)?;
        let (selected, _) = top_k_indices(&probs, self.top_k)?;
        let mut weights = probs.gather(&selected, 1)?;
        if self.normalize_top_k {
            weights = weights.broadcast_div(&weights.sum_keepdim(1)?)?;
        }
        let weights = weights.flatten_all()?.to_dtype(x.dtype())?;

        // Host-side routing table: which tokens (and which of their k slots)
        // go to each expert.
        let sel = selected.to_vec2::<u32>()?;
        let mut rows: Vec<Vec<u32>> = vec![Vec::new(); self.experts.len()];
        let mut slots: Vec<Vec<u32>> = vec![Vec::new(); self.experts.len()];
        for (i, ks) in sel.iter().enumerate() {
            for (j, &e) in ks.iter().enumerate() {
                rows[e as usize].push(i as u32);
                slots[e as usize].push((i * self.top_k + j) as u32);
            }
        }
        let mut out = flat.zeros_like()?;
        for (e, expert) in self.experts.iter().enumerate() {
            if rows[e].is_empty() {
                continue;
            }
            let idx = Tensor::new(rows[e].as_slice(), x.device())?;
            let slot = Tensor::new(slots[e].as_slice(), x.device())?;
            let y = expert.forward(&flat.index_select(&idx, 0)?, train)?;
            let w = weights.index_select(&slot, 0)?.unsqueeze(1)?;
            out = out.index_add(&idx, &y.broadcast_mul(&w)?, 0)?;
        }
        let _ = n;
        Ok(MoeOutput { hidden: out.reshape(dims)?, router_logits })
    }
}

/// Indices `[n, k]` (u32) of the k largest entries of each row of `probs`
/// `[n, e]`, largest first, and the counts of how often each column was picked.
pub fn top_k_indices(probs: &Tensor, k: usize) -> Result<(Tensor, Vec<usize>)> {
    let (_, e) = probs.dims2()?;
    let order = probs.contiguous()?.arg_sort_last_dim(false)?;
    let selected = order.narrow(1, 0, k)?.contiguous()?;
    let mut counts = vec![0usize; e];
    for row in selected.to_vec2::<u32>()? {
        for c in row {
            counts[c as usize] += 1;
        }
    }
    Ok((selected, counts))
}

/// The auxiliary load-balancing loss of Switch Transformer / Mixtral, as HF
/// `load_balancing_loss_func`:
/// `n_experts * sum_{slot, e} (fraction of tokens whose slot-th choice is e) * (mean router prob of e)`,
/// summed (not averaged) over the k slots. A uniform router gives `top_k`.
pub fn load_balancing_loss(router_logits: &Tensor, n_experts: usize, top_k: usize) -> Result<Tensor> {
    let (n, e) = router_logits.dims2()?;
    if e != n_experts || top_k == 0 || top_k > e {
        return Err(Error::input(
            "load balancing loss",
            format!("logits {:?}, {n_experts} experts, top {top_k}", router_logits.dims()),
        ));
    }
    let probs = candle_nn::ops::softmax(&router_logits.to_dtype(DType::F32)?, 1)?;
    let (_, counts) = top_k_indices(&probs, top_k)?;
    // Fraction of tokens sent to each expert, summed over the k slots: a
    // constant (no gradient flows through the argmax).
    let frac: Vec<f32> = counts.iter().map(|&c| c as f32 / n as f32).collect();
    let frac = Tensor::from_vec(frac, e, &Device::Cpu)?.to_device(router_logits.device())?;
    let mean_prob = probs.mean(0)?;
    Ok(((frac * mean_prob)?.sum_all()? * n_experts as f64)?)
}

/// Fraction of routed (token, slot) pairs that went to each expert.
pub fn expert_utilisation(router_logits: &Tensor, top_k: usize) -> Result<Vec<f32>> {
    let (n, _) = router_logits.dims2()?;
    let probs = candle_nn::ops::softmax(&router_logits.to_dtype(DType::F32)?, 1)?;
    let (_, counts) = top_k_indices(&probs, top_k)?;
    Ok(counts.iter().map(|&c| c as f32 / (n * top_k).max(1) as f32).collect())
}
