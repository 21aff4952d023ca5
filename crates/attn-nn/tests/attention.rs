//! Masks, scaled dot-product attention and multi-head attention (MHA, MQA,
//! GQA, cross-attention, KV-cache decoding), against a naive loop reference.

#![allow(clippy::needless_range_loop)] // the references index on purpose

use std::sync::Arc;

use attn_nn::attention::MASK_VALUE;
use attn_nn::{
    causal_mask, combine_masks, lengths_to_valid, padding_mask, positions, scaled_dot_product_attention,
    AttentionConfig, ContiguousKvCache, Error, KvCache, MultiHeadAttention, ParamStore, RmsNorm, RopeLayout,
    RotaryEmbedding, SdpaOptions, Weights,
};
use attn_test_support::diff::*;
use attn_test_support::reference::*;
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;

const TOL: f32 = 1e-5;

/// Whether key `j` is inside the sliding window of the query at `pos`:
/// `pos - w < j` (no window: always).
fn in_window(window: Option<usize>, pos: usize, j: usize) -> bool {
    match window {
        Some(w) => j + w > pos,
        None => true,
    }
}

// ---------------------------------------------------------------- masks

#[test]
fn causal_mask_values() {
    for (tq, tk, window) in [(5, 5, None), (2, 6, None), (6, 6, Some(3)), (3, 7, Some(2)), (4, 4, Some(1))] {
        let m = causal_mask(tq, tk, window, &Device::Cpu).unwrap();
        assert_eq!(m.dims(), &[tq, tk]);
        let m = m.to_vec2::<f32>().unwrap();
        for i in 0..tq {
            let pos = (tk - tq + i) as i64;
            for j in 0..tk {
                let j = j as i64;
                let visible = j <= pos && in_window(window, pos as usize, j as usize);
                let want = if visible { 0.0 } else { MASK_VALUE };
                assert_eq!(m[i][j as usize], want, "tq {tq} tk {tk} window {window:?} at ({i}, {j})");
            }
        }
    }
    assert!(matches!(causal_mask(3, 2, None, &Device::Cpu), Err(Error::Input { .. })));
    // A zero-width window would mask every key of every row, and a fully
    // masked row attends uniformly to all keys, future ones included.
    assert!(matches!(causal_mask(2, 2, Some(0), &Device::Cpu), Err(Error::Input { .. })));
}

#[test]
fn padding_mask_values() {
    let valid = lengths_to_valid(&[3, 0, 4], 4, &Device::Cpu).unwrap();
    assert_eq!(valid.to_vec2::<u8>().unwrap(), vec![vec![1, 1, 1, 0], vec![0, 0, 0, 0], vec![1, 1, 1, 1]]);
    let m = padding_mask(&valid).unwrap();
    assert_eq!(m.dims(), &[3, 1, 1, 4]);
    let v = to_vec(&m);
    let want = [0.0, 0.0, 0.0, MASK_VALUE, MASK_VALUE, MASK_VALUE, MASK_VALUE, MASK_VALUE, 0.0, 0.0, 0.0, 0.0];
    assert_eq!(v, want);
    assert!(lengths_to_valid(&[5], 4, &Device::Cpu).is_err());
    // combine_masks adds with broadcasting and passes single masks through.
    let c = causal_mask(4, 4, None, &Device::Cpu).unwrap();
    let both = combine_masks(Some(&c), Some(&m)).unwrap().unwrap();
    assert_eq!(both.dims(), &[3, 1, 4, 4]);
    let b = both.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    // Batch row 0, query 3, key 3: padded (not future) -> masked; key 2 visible.
    assert_eq!(b[3 * 4 + 2], 0.0);
    assert!(b[3 * 4 + 3] <= MASK_VALUE);
    assert!(combine_masks(None, None).unwrap().is_none());
    assert_eq!(to_vec(&combine_masks(Some(&c), None).unwrap().unwrap()), to_vec(&c));
}

// ------------------------------------------------------ scaled dot-product

struct SdpaCase {
    b: usize,
    h: usize,
    hkv: usize,
    tq: usize,
    tk: usize,
    d: usize,
    lengths: Option<Vec<usize>>,
    causal: bool,
    window: Option<usize>,
    scale: f64,
    softcap: Option<f64>,
}

fn run_sdpa_case(c: &SdpaCase, seed: u64) {
    let mut r = rng(seed);
    let q = rand_vec(&mut r, c.b * c.h * c.tq * c.d, 1.5);
    let k = rand_vec(&mut r, c.b * c.hkv * c.tk * c.d, 1.5);
    let v = rand_vec(&mut r, c.b * c.hkv * c.tk * c.d, 1.0);
    let pad = c.lengths.as_ref().map(|l| padding_mask(&lengths_to_valid(l, c.tk, &Device::Cpu).unwrap()).unwrap());
    let causal = c.causal.then(|| causal_mask(c.tq, c.tk, c.window, &Device::Cpu).unwrap());
    let mask = combine_masks(causal.as_ref(), pad.as_ref()).unwrap();
    let got = scaled_dot_product_attention(
        &tensor(&q, &[c.b, c.h, c.tq, c.d]),
        &tensor(&k, &[c.b, c.hkv, c.tk, c.d]),
        &tensor(&v, &[c.b, c.hkv, c.tk, c.d]),
        mask.as_ref(),
        SdpaOptions { scale: c.scale, softcap: c.softcap },
        None,
    )
    .unwrap();
    let offset = c.tk - c.tq;
    let allowed = |bi: usize, i: usize, j: usize| {
        let pos = offset + i;
        let in_len = match &c.lengths {
            Some(l) => j < l[bi],
            None => true,
        };
        let causal_ok = !c.causal || (j <= pos && in_window(c.window, pos, j));
        in_len && causal_ok
    };
    let want = attention_ref(&q, &k, &v, (c.b, c.h, c.hkv, c.tq, c.tk, c.d), c.scale, c.softcap, allowed);
    let what = format!(
        "sdpa h {} hkv {} tq {} tk {} lengths {:?} causal {} window {:?} softcap {:?}",
        c.h, c.hkv, c.tq, c.tk, c.lengths, c.causal, c.window, c.softcap
    );
    assert_tensor_close(&got, &want, &[c.b, c.h, c.tq, c.d], TOL, &what);
}

fn base_case(h: usize, hkv: usize) -> SdpaCase {
    SdpaCase { b: 2, h, hkv, tq: 5, tk: 5, d: 4, lengths: None, causal: false, window: None, scale: 0.5, softcap: None }
}

#[test]
fn sdpa_unmasked() {
    run_sdpa_case(&base_case(3, 3), 20);
}

#[test]
fn sdpa_padding_mask() {
    run_sdpa_case(&SdpaCase { lengths: Some(vec![5, 2]), ..base_case(2, 2) }, 21);
}

#[test]
fn sdpa_causal_mask() {
    run_sdpa_case(&SdpaCase { causal: true, ..base_case(2, 2) }, 22);
    // Queries that are the last 2 of 6 positions (a cached prefix).
    run_sdpa_case(&SdpaCase { causal: true, tq: 2, tk: 6, ..base_case(2, 2) }, 23);
}

#[test]
fn sdpa_sliding_window_mask() {
    run_sdpa_case(&SdpaCase { causal: true, window: Some(2), tq: 6, tk: 6, ..base_case(2, 2) }, 24);
    run_sdpa_case(&SdpaCase { causal: true, window: Some(3), tq: 3, tk: 7, ..base_case(2, 1) }, 25);
}

#[test]
fn sdpa_gqa_and_mqa() {
    // n_kv_heads dividing n_heads, with every mask kind combined.
    for (h, hkv) in [(4, 2), (6, 3), (4, 1), (6, 2)] {
        run_sdpa_case(
            &SdpaCase { causal: true, window: Some(3), lengths: Some(vec![6, 4]), tq: 6, tk: 6, ..base_case(h, hkv) },
            30 + h as u64 * 10 + hkv as u64,
        );
        run_sdpa_case(&SdpaCase { lengths: Some(vec![3, 5]), ..base_case(h, hkv) }, 31 + h as u64 + hkv as u64);
    }
}

#[test]
fn sdpa_softcap() {
    run_sdpa_case(&SdpaCase { softcap: Some(2.0), scale: 1.0, causal: true, ..base_case(4, 2) }, 40);
}

#[test]
fn sdpa_gqa_equals_repeated_kv() {
    // GQA must equal MHA with each kv head repeated to its query group.
    let mut r = rng(41);
    let (b, h, hkv, t, d) = (1, 4, 2, 3, 4);
    let q = tensor(&rand_vec(&mut r, b * h * t * d, 1.0), &[b, h, t, d]);
    let k = tensor(&rand_vec(&mut r, b * hkv * t * d, 1.0), &[b, hkv, t, d]);
    let v = tensor(&rand_vec(&mut r, b * hkv * t * d, 1.0), &[b, hkv, t, d]);
    let opts = SdpaOptions { scale: 0.5, softcap: None };
    let gqa = scaled_dot_product_attention(&q, &k, &v, None, opts, None).unwrap();
    let idx = u32_tensor(&[0, 0, 1, 1], &[4]);
    let k4 = k.index_select(&idx, 1).unwrap();
    let v4 = v.index_select(&idx, 1).unwrap();
    let mha = scaled_dot_product_attention(&q, &k4, &v4, None, opts, None).unwrap();
    assert_close(&to_vec(&gqa), &to_vec(&mha), 1e-6, "gqa vs repeated kv");
}

#[test]
fn sdpa_bad_shapes_are_errors() {
    let opts = SdpaOptions { scale: 1.0, softcap: None };
    let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap();
    // kv heads not dividing query heads.
    let e = scaled_dot_product_attention(&z(&[1, 4, 2, 8]), &z(&[1, 3, 2, 8]), &z(&[1, 3, 2, 8]), None, opts, None);
    assert!(matches!(e, Err(Error::Input { .. })), "{e:?}");
    // head_dim mismatch.
    let e = scaled_dot_product_attention(&z(&[1, 2, 2, 8]), &z(&[1, 2, 2, 4]), &z(&[1, 2, 2, 4]), None, opts, None);
    assert!(matches!(e, Err(Error::Input { .. })), "{e:?}");
    // k and v differ.
    let e = scaled_dot_product_attention(&z(&[1, 2, 2, 8]), &z(&[1, 2, 2, 8]), &z(&[1, 2, 3, 8]), None, opts, None);
    assert!(matches!(e, Err(Error::Input { .. })), "{e:?}");
    // batch mismatch.
    let e = scaled_dot_product_attention(&z(&[2, 2, 2, 8]), &z(&[1, 2, 2, 8]), &z(&[1, 2, 2, 8]), None, opts, None);
    assert!(matches!(e, Err(Error::Input { .. })), "{e:?}");
    // Not 4-D.
    let e = scaled_dot_product_attention(&z(&[2, 2, 8]), &z(&[1, 2, 2, 8]), &z(&[1, 2, 2, 8]), None, opts, None);
    assert!(e.is_err());
    // A mask that does not broadcast.
    let m = z(&[3, 3]);
    let e = scaled_dot_product_attention(&z(&[1, 2, 2, 8]), &z(&[1, 2, 2, 8]), &z(&[1, 2, 2, 8]), Some(&m), opts, None);
    assert!(e.is_err());
}

// ------------------------------------------------------ multi-head attention

/// A random [`MultiHeadAttention`] with plain copies of its weights.
struct RefMha {
    cfg: AttentionConfig,
    q: RefLinear,
    k: RefLinear,
    v: RefLinear,
    o: RefLinear,
    /// RoPE base and whether the layout is interleaved.
    rope: Option<(f64, bool)>,
    /// Per-head RMSNorm scales of queries (`1 + w`) and keys (`w`), eps 1e-6.
    qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    layer: MultiHeadAttention,
}

fn cfg(d_model: usize, n_heads: usize, n_kv_heads: usize, head_dim: usize, bias: bool) -> AttentionConfig {
    AttentionConfig {
        d_model,
        n_heads,
        n_kv_heads,
        head_dim,
        qkv_bias: bias,
        out_bias: bias,
        scale: None,
        softcap: None,
        dropout: 0.0,
    }
}

fn rand_mha(r: &mut StdRng, cfg: AttentionConfig, rope: Option<(f64, RopeLayout)>) -> RefMha {
    let q = rand_linear(r, cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.qkv_bias);
    let k = rand_linear(r, cfg.d_model, cfg.n_kv_heads * cfg.head_dim, cfg.qkv_bias);
    let v = rand_linear(r, cfg.d_model, cfg.n_kv_heads * cfg.head_dim, cfg.qkv_bias);
    let o = rand_linear(r, cfg.n_heads * cfg.head_dim, cfg.d_model, cfg.out_bias);
    let mut layer =
        MultiHeadAttention::new(cfg, q.layer.clone(), k.layer.clone(), v.layer.clone(), o.layer.clone()).unwrap();
    if let Some((base, layout)) = rope {
        layer =
            layer.with_rope(RotaryEmbedding::new(base, cfg.head_dim, 64, layout, DType::F32, &Device::Cpu).unwrap());
    }
    RefMha { cfg, q, k, v, o, rope: rope.map(|(b, l)| (b, l == RopeLayout::Interleaved)), qk_norm: None, layer }
}

/// Adds random per-head q/k RMSNorms (Gemma 3 style) to `m`.
fn add_qk_norm(r: &mut StdRng, m: &mut RefMha) {
    let hd = m.cfg.head_dim;
    let qw = rand_vec(r, hd, 0.5);
    let kw: Vec<f32> = rand_vec(r, hd, 0.5).iter().map(|v| v + 1.0).collect();
    m.layer = m
        .layer
        .clone()
        .with_qk_norm(RmsNorm::new(tensor(&qw, &[hd]), 1e-6, true), RmsNorm::new(tensor(&kw, &[hd]), 1e-6, false));
    m.qk_norm = Some((qw, kw));
}

impl RefMha {
    /// Projects `x` `[b, t, d_model]` with `lin` into `[b, n, t, head_dim]`
    /// heads, RMS-normalises each head vector with `norm` (scale, add_one)
    /// and rotates it at `pos[b][t]` when RoPE is on.
    #[allow(clippy::too_many_arguments)]
    fn heads(
        &self,
        lin: &RefLinear,
        x: &[f32],
        b: usize,
        t: usize,
        n: usize,
        norm: Option<(&[f32], bool)>,
        pos: Option<&[Vec<usize>]>,
    ) -> Vec<f32> {
        let hd = self.cfg.head_dim;
        let mut hs = split_heads_ref(&lin.apply(x), b, t, n, hd);
        if let Some((w, add_one)) = norm {
            hs = rms_norm_ref(&hs, w, hd, 1e-6, add_one);
        }
        if let (Some((base, inter)), Some(pos)) = (self.rope, pos) {
            for bi in 0..b {
                for hi in 0..n {
                    for ti in 0..t {
                        let off = ((bi * n + hi) * t + ti) * hd;
                        let rot = rope_ref(&hs[off..off + hd], pos[bi][ti], base, inter);
                        hs[off..off + hd].copy_from_slice(&rot);
                    }
                }
            }
        }
        hs
    }

    /// Attention of queries from `x` `[b, tq, d]` over keys/values from
    /// `kv_x` `[b, tk, d]`.
    #[allow(clippy::too_many_arguments)]
    fn forward_ref(
        &self,
        x: &[f32],
        kv_x: &[f32],
        b: usize,
        tq: usize,
        tk: usize,
        q_pos: Option<&[Vec<usize>]>,
        k_pos: Option<&[Vec<usize>]>,
        allowed: impl Fn(usize, usize, usize) -> bool,
    ) -> Vec<f32> {
        let c = &self.cfg;
        let qn = self.qk_norm.as_ref().map(|(q, _)| (&q[..], true));
        let kn = self.qk_norm.as_ref().map(|(_, k)| (&k[..], false));
        let q = self.heads(&self.q, x, b, tq, c.n_heads, qn, q_pos);
        let k = self.heads(&self.k, kv_x, b, tk, c.n_kv_heads, kn, k_pos);
        let v = self.heads(&self.v, kv_x, b, tk, c.n_kv_heads, None, None);
        let scale = c.scale.unwrap_or(1.0 / (c.head_dim as f64).sqrt());
        let att =
            attention_ref(&q, &k, &v, (b, c.n_heads, c.n_kv_heads, tq, tk, c.head_dim), scale, c.softcap, allowed);
        self.o.apply(&merge_heads_ref(&att, b, tq, c.n_heads, c.head_dim))
    }
}

fn seq_positions(b: usize, t: usize) -> Vec<Vec<usize>> {
    vec![(0..t).collect(); b]
}

fn check_self_attention(cfg: AttentionConfig, rope: Option<(f64, RopeLayout)>, seed: u64) {
    check_self_attention_with(cfg, rope, false, seed)
}

fn check_self_attention_with(cfg: AttentionConfig, rope: Option<(f64, RopeLayout)>, qk_norm: bool, seed: u64) {
    let mut r = rng(seed);
    let mut m = rand_mha(&mut r, cfg, rope);
    if qk_norm {
        add_qk_norm(&mut r, &mut m);
    }
    let (b, t) = (2, 6);
    let lengths = [6usize, 4];
    let x = rand_vec(&mut r, b * t * cfg.d_model, 1.0);
    let mask = combine_masks(
        Some(&causal_mask(t, t, None, &Device::Cpu).unwrap()),
        Some(&padding_mask(&lengths_to_valid(&lengths, t, &Device::Cpu).unwrap()).unwrap()),
    )
    .unwrap();
    let pos = positions(b, t, 0, &Device::Cpu).unwrap();
    let got = m.layer.forward(&tensor(&x, &[b, t, cfg.d_model]), mask.as_ref(), Some(&pos), None, false).unwrap();
    let p = seq_positions(b, t);
    let want = m.forward_ref(&x, &x, b, t, t, Some(&p), Some(&p), |bi, i, j| j <= i && j < lengths[bi]);
    let what = format!("self-attention {cfg:?} rope {rope:?}");
    assert_tensor_close(&got, &want, &[b, t, cfg.d_model], TOL, &what);
}

#[test]
fn mha_self_attention() {
    check_self_attention(AttentionConfig::mha(16, 4), None, 50);
    check_self_attention(AttentionConfig::mha(16, 2), Some((10000.0, RopeLayout::Interleaved)), 51);
}

#[test]
fn mqa_self_attention() {
    check_self_attention(cfg(16, 4, 1, 4, false), None, 52);
    check_self_attention(cfg(16, 4, 1, 4, true), Some((10000.0, RopeLayout::Halves)), 53);
}

#[test]
fn gqa_self_attention() {
    check_self_attention(cfg(16, 4, 2, 4, true), None, 54);
    check_self_attention(cfg(12, 6, 3, 4, false), Some((500.0, RopeLayout::Halves)), 55);
    // head_dim independent of d_model / n_heads, and a custom scale.
    check_self_attention(
        AttentionConfig { scale: Some(0.2), ..cfg(12, 4, 2, 6, true) },
        Some((10000.0, RopeLayout::Interleaved)),
        56,
    );
}

#[test]
fn qk_norm_self_attention() {
    check_self_attention_with(cfg(16, 4, 2, 4, true), Some((10000.0, RopeLayout::Halves)), true, 57);
    check_self_attention_with(
        AttentionConfig { softcap: Some(3.0), ..cfg(16, 4, 1, 4, false) },
        Some((10000.0, RopeLayout::Interleaved)),
        true,
        58,
    );
}

#[test]
fn cross_attention() {
    let mut r = rng(60);
    for c in [AttentionConfig::mha(16, 4), cfg(16, 4, 2, 4, false)] {
        let m = rand_mha(&mut r, c, None);
        let (b, tq, tk) = (2, 3, 5);
        let mem_lengths = [5usize, 2];
        let x = rand_vec(&mut r, b * tq * c.d_model, 1.0);
        let memory = rand_vec(&mut r, b * tk * c.d_model, 1.0);
        let mask = padding_mask(&lengths_to_valid(&mem_lengths, tk, &Device::Cpu).unwrap()).unwrap();
        let kv = m.layer.cross_kv(&tensor(&memory, &[b, tk, c.d_model])).unwrap();
        assert_eq!(kv.k.dims(), &[b, c.n_kv_heads, tk, c.head_dim]);
        let got = m.layer.forward_cross(&tensor(&x, &[b, tq, c.d_model]), &kv, Some(&mask), false).unwrap();
        let want = m.forward_ref(&x, &memory, b, tq, tk, None, None, |bi, _, j| j < mem_lengths[bi]);
        assert_tensor_close(&got, &want, &[b, tq, c.d_model], TOL, &format!("cross-attention {c:?}"));
        // The same projected memory serves a second query batch.
        let x2 = rand_vec(&mut r, b * c.d_model, 1.0);
        let got2 = m.layer.forward_cross(&tensor(&x2, &[b, 1, c.d_model]), &kv, Some(&mask), false).unwrap();
        let want2 = m.forward_ref(&x2, &memory, b, 1, tk, None, None, |bi, _, j| j < mem_lengths[bi]);
        assert_tensor_close(&got2, &want2, &[b, 1, c.d_model], TOL, "cross-attention, reused memory");
    }
}

/// Feeds `x` to `layer` in chunks through a KV cache and concatenates the
/// outputs.
fn forward_chunked(
    layer: &MultiHeadAttention,
    x: &Tensor,
    chunks: &[usize],
    window: Option<usize>,
    cache: &mut ContiguousKvCache,
) -> Tensor {
    let b = x.dim(0).unwrap();
    let mut outs = Vec::new();
    let mut start = 0;
    for &n in chunks {
        let xs = x.narrow(1, start, n).unwrap();
        let mask = causal_mask(n, cache.len() + n, window, &Device::Cpu).unwrap();
        let pos = positions(b, n, cache.len(), &Device::Cpu).unwrap();
        outs.push(layer.forward(&xs, Some(&mask), Some(&pos), Some(cache), false).unwrap());
        start += n;
        assert_eq!(cache.len(), start);
    }
    Tensor::cat(&outs, 1).unwrap()
}

#[test]
fn kv_cache_decoding_matches_full_forward() {
    let mut r = rng(70);
    let (b, t) = (2, 7);
    for (c, window) in
        [(cfg(16, 4, 2, 4, true), None), (cfg(16, 4, 1, 4, false), None), (AttentionConfig::mha(16, 4), Some(3))]
    {
        let m = rand_mha(&mut r, c, Some((10000.0, RopeLayout::Halves)));
        let x = tensor(&rand_vec(&mut r, b * t * c.d_model, 1.0), &[b, t, c.d_model]);
        let mask = causal_mask(t, t, window, &Device::Cpu).unwrap();
        let pos = positions(b, t, 0, &Device::Cpu).unwrap();
        let full = m.layer.forward(&x, Some(&mask), Some(&pos), None, false).unwrap();
        // The full forward itself agrees with the reference.
        let xv = to_vec(&x);
        let p = seq_positions(b, t);
        let want = m.forward_ref(&xv, &xv, b, t, t, Some(&p), Some(&p), |_, i, j| j <= i && in_window(window, i, j));
        assert_tensor_close(&full, &want, &[b, t, c.d_model], TOL, "full causal forward");
        for chunks in [vec![1; t], vec![3, 2, 2], vec![4, 1, 2], vec![t]] {
            let mut cache = ContiguousKvCache::new();
            let inc = forward_chunked(&m.layer, &x, &chunks, window, &mut cache);
            let what = format!("{c:?} window {window:?} chunks {chunks:?}");
            assert_tensor_close(&inc, &to_vec(&full), &[b, t, c.d_model], TOL, &what);
            assert_eq!(cache.keys().unwrap().dims(), &[b, c.n_kv_heads, t, c.head_dim]);
            assert_eq!(cache.values().unwrap().dims(), &[b, c.n_kv_heads, t, c.head_dim]);
        }
    }
}

#[test]
fn kv_cache_truncate_and_rollback() {
    let mut r = rng(71);
    let c = cfg(16, 4, 2, 4, true);
    let m = rand_mha(&mut r, c, Some((10000.0, RopeLayout::Interleaved)));
    let (b, t) = (1, 6);
    let x = tensor(&rand_vec(&mut r, b * t * c.d_model, 1.0), &[b, t, c.d_model]);
    let mut cache = ContiguousKvCache::new();
    assert!(cache.is_empty());
    forward_chunked(&m.layer, &x, &[5], None, &mut cache);
    let keys5 = to_vec(cache.keys().unwrap());
    cache.truncate(7).unwrap(); // beyond the end: a no-op
    assert_eq!(cache.len(), 5);
    cache.truncate(3).unwrap();
    assert_eq!(cache.len(), 3);
    // The kept positions are the first 3 of what was cached.
    let keys3 = to_vec(cache.keys().unwrap());
    let per_pos = c.head_dim;
    for h in 0..c.n_kv_heads {
        for p in 0..3 {
            let a = &keys3[(h * 3 + p) * per_pos..][..per_pos];
            let bb = &keys5[(h * 5 + p) * per_pos..][..per_pos];
            assert_eq!(a, bb, "kv head {h} position {p}");
        }
    }
    // Speculative rollback: replace positions 3.. by different tokens; the
    // result equals a full forward over the corrected sequence.
    let alt = tensor(&rand_vec(&mut r, b * 3 * c.d_model, 1.0), &[b, 3, c.d_model]);
    let mask = causal_mask(3, 6, None, &Device::Cpu).unwrap();
    let pos = positions(b, 3, 3, &Device::Cpu).unwrap();
    let after = m.layer.forward(&alt, Some(&mask), Some(&pos), Some(&mut cache), false).unwrap();
    assert_eq!(cache.len(), 6);
    let corrected = Tensor::cat(&[&x.narrow(1, 0, 3).unwrap(), &alt], 1).unwrap();
    let full = m
        .layer
        .forward(
            &corrected,
            Some(&causal_mask(6, 6, None, &Device::Cpu).unwrap()),
            Some(&positions(b, 6, 0, &Device::Cpu).unwrap()),
            None,
            false,
        )
        .unwrap();
    assert_close(&to_vec(&after), &to_vec(&full.narrow(1, 3, 3).unwrap()), TOL, "after rollback");
    cache.truncate(0).unwrap();
    assert!(cache.is_empty());
    assert!(cache.keys().is_none());
}

#[test]
fn kv_cache_reorder_rows() {
    let mut cache = ContiguousKvCache::new();
    let k = tensor(&[0., 1., 2., 3., 4., 5.], &[3, 1, 1, 2]);
    cache.append(&k, &k).unwrap();
    cache.reorder(&u32_tensor(&[2, 2, 0], &[3])).unwrap();
    assert_eq!(to_vec(cache.keys().unwrap()), vec![4., 5., 4., 5., 0., 1.]);
    assert_eq!(to_vec(cache.values().unwrap()), vec![4., 5., 4., 5., 0., 1.]);
}

fn store_weights() -> Weights {
    Weights::new(Arc::new(ParamStore::new()), DType::F32, &Device::Cpu)
}

#[test]
fn attention_config_errors() {
    let w = store_weights();
    let field_of = |e: Error| match e {
        Error::Config { field, .. } => field,
        other => panic!("expected a config error, got {other:?}"),
    };
    let bad_kv = cfg(16, 4, 3, 4, false);
    assert_eq!(field_of(MultiHeadAttention::load(&w.pp("a"), bad_kv).unwrap_err()), "n_kv_heads");
    assert_eq!(field_of(bad_kv.validate().unwrap_err()), "n_kv_heads");
    assert_eq!(field_of(cfg(16, 4, 0, 4, false).validate().unwrap_err()), "n_kv_heads");
    assert_eq!(field_of(cfg(16, 4, 8, 4, false).validate().unwrap_err()), "n_kv_heads");
    assert_eq!(field_of(MultiHeadAttention::load(&w.pp("b"), AttentionConfig::mha(16, 0)).unwrap_err()), "n_heads");
    assert_eq!(field_of(cfg(16, 0, 0, 4, false).validate().unwrap_err()), "n_heads");
    assert_eq!(field_of(cfg(16, 4, 4, 0, false).validate().unwrap_err()), "head_dim");
    assert_eq!(
        field_of(AttentionConfig { dropout: 1.0, ..cfg(16, 4, 4, 4, false) }.validate().unwrap_err()),
        "dropout"
    );
    assert!(cfg(16, 4, 2, 4, false).validate().is_ok());
    // Projections that do not fit the config.
    let mut r = rng(80);
    let c = cfg(16, 4, 2, 4, false);
    let q = rand_linear(&mut r, 16, 16, false).layer;
    let kv = rand_linear(&mut r, 16, 8, false).layer;
    let o = rand_linear(&mut r, 16, 16, false).layer;
    assert!(MultiHeadAttention::new(c, q.clone(), kv.clone(), kv.clone(), o.clone()).is_ok());
    assert_eq!(
        field_of(MultiHeadAttention::new(c, q.clone(), q.clone(), kv.clone(), o.clone()).unwrap_err()),
        "k_proj"
    );
    assert_eq!(field_of(MultiHeadAttention::new(c, kv.clone(), kv.clone(), kv.clone(), o).unwrap_err()), "q_proj");
}

#[test]
fn attention_input_errors() {
    let mut r = rng(81);
    let plain = rand_mha(&mut r, cfg(16, 4, 2, 4, false), None);
    let x = Tensor::zeros((1, 3, 12), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(plain.layer.forward(&x, None, None, None, false), Err(Error::Input { .. })));
    let x2 = Tensor::zeros((3, 16), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(plain.layer.forward(&x2, None, None, None, false), Err(Error::Input { .. })));
    let roped = rand_mha(&mut r, cfg(16, 4, 2, 4, false), Some((10000.0, RopeLayout::Halves)));
    let x = Tensor::zeros((1, 3, 16), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(roped.layer.forward(&x, None, None, None, false), Err(Error::Input { .. })));
    // Positions beyond the 64-position rotary table.
    let pos = positions(1, 3, 62, &Device::Cpu).unwrap();
    assert!(matches!(roped.layer.forward(&x, None, Some(&pos), None, false), Err(Error::Input { .. })));
}
