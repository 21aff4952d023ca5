//! Training: every parameter of a small Transformer block built from a
//! `ParamStore` receives a gradient (nothing silently detaches it, see
//! DESIGN.md §7), and the gradients agree with finite differences.

use std::sync::Arc;

use attn_nn::{
    causal_mask, combine_masks, cross_entropy, lengths_to_valid, padding_mask, positions, AttentionConfig, FeedForward,
    FfnKind, FfnNames, Init, LayerNorm, Linear, MultiHeadAttention, OutputHead, ParamStore, Residual, RmsNorm,
    RopeLayout, RotaryEmbedding, TokenEmbedding, Weights,
};
use attn_test_support::diff::*;
use attn_test_support::reference::*;
use candle_core::{DType, Device, Tensor, Var};

const VOCAB: usize = 13;
const D: usize = 16;

struct Model {
    embed: TokenEmbedding,
    attn: MultiHeadAttention,
    attn_norm: Residual,
    ffn: FeedForward,
    ffn_norm: Residual,
    head: OutputHead,
}

fn build(w: &Weights) -> Model {
    let cfg = AttentionConfig {
        d_model: D,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 4,
        qkv_bias: true,
        out_bias: true,
        scale: None,
        softcap: None,
        dropout: 0.0,
    };
    // RoPE and q/k norms make the key bias matter (without them it adds a
    // per-query constant to the scores, which softmax ignores: its gradient
    // would be exactly zero).
    let rope = RotaryEmbedding::new(10000.0, 4, 32, RopeLayout::Halves, DType::F32, &Device::Cpu).unwrap();
    let attn = MultiHeadAttention::load(&w.pp("attn"), cfg).unwrap().with_rope(rope).with_qk_norm(
        RmsNorm::load(&w.pp("attn.q_norm"), 4, 1e-6, true).unwrap(),
        RmsNorm::load(&w.pp("attn.k_norm"), 4, 1e-6, false).unwrap(),
    );
    Model {
        embed: TokenEmbedding::load(&w.pp("embed"), VOCAB, D, true).unwrap(),
        attn,
        attn_norm: Residual::Pre(attn_nn::Norm::Layer(LayerNorm::load(&w.pp("ln1"), D, 1e-5, true).unwrap())),
        ffn: FeedForward::load(&w.pp("ffn"), D, 24, FfnKind::SWIGLU, FfnNames::HF, true, 0.0).unwrap(),
        ffn_norm: Residual::Post(attn_nn::Norm::Rms(RmsNorm::load(&w.pp("ln2"), D, 1e-6, false).unwrap())),
        head: OutputHead::new(Linear::load(&w.pp("lm_head"), D, VOCAB, true).unwrap()),
    }
}

const IDS: [u32; 12] = [1, 5, 7, 2, 9, 12, 3, 3, 8, 0, 0, 0];
const TARGETS: [u32; 12] = [5, 7, 2, 9, 12, 4, 3, 8, 6, 0, 0, 0];
const LENGTHS: [usize; 2] = [6, 3];

/// Mean label-smoothed cross-entropy of next-token prediction over a padded
/// batch of two sequences.
fn loss(m: &Model) -> Tensor {
    let (b, t) = (2, 6);
    let ids = u32_tensor(&IDS, &[b, t]);
    let x = m.embed.forward(&ids).unwrap();
    let mask = combine_masks(
        Some(&causal_mask(t, t, None, &Device::Cpu).unwrap()),
        Some(&padding_mask(&lengths_to_valid(&LENGTHS, t, &Device::Cpu).unwrap()).unwrap()),
    )
    .unwrap();
    let pos = positions(b, t, 0, &Device::Cpu).unwrap();
    let x = m.attn_norm.forward(&x, |h| m.attn.forward(h, mask.as_ref(), Some(&pos), None, true)).unwrap();
    let x = m.ffn_norm.forward(&x, |h| m.ffn.forward(h, true)).unwrap();
    let logits = m.head.logits(&x).unwrap().reshape((b * t, VOCAB)).unwrap();
    cross_entropy(&logits, &u32_tensor(&TARGETS, &[b * t]), Some(0), 0.1).unwrap()
}

fn grad_norm(g: &Tensor) -> f32 {
    g.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_vec0::<f32>().unwrap()
}

#[test]
fn every_parameter_receives_a_gradient() {
    let store = Arc::new(ParamStore::from_source(Arc::new(SeededSource)));
    let w = Weights::new(store.clone(), DType::F32, &Device::Cpu);
    let model = build(&w);
    let l = loss(&model);
    assert!(l.to_vec0::<f32>().unwrap().is_finite());
    let grads = l.backward().unwrap();
    let vars = store.vars();
    let mut names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    let mut expected = vec![
        "embed.weight",
        "attn.q_proj.weight",
        "attn.q_proj.bias",
        "attn.k_proj.weight",
        "attn.k_proj.bias",
        "attn.v_proj.weight",
        "attn.v_proj.bias",
        "attn.o_proj.weight",
        "attn.o_proj.bias",
        "attn.q_norm.weight",
        "attn.k_norm.weight",
        "ln1.weight",
        "ln1.bias",
        "ffn.gate_proj.weight",
        "ffn.gate_proj.bias",
        "ffn.up_proj.weight",
        "ffn.up_proj.bias",
        "ffn.down_proj.weight",
        "ffn.down_proj.bias",
        "ln2.weight",
        "lm_head.weight",
        "lm_head.bias",
    ];
    expected.sort_unstable();
    assert_eq!(names, expected);
    for (name, var) in &vars {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("`{name}` received no gradient"));
        assert_eq!(g.dims(), var.as_tensor().dims(), "{name}");
        let norm = grad_norm(g);
        assert!(norm.is_finite() && norm > 1e-6, "`{name}` has gradient norm {norm}");
    }
}

#[test]
fn no_gradient_without_variables() {
    // The same model from plain tensors: the loss must not track anything
    // (the fused, non-differentiable kernels may then be used).
    let store = Arc::new(ParamStore::from_source(Arc::new(SeededSource)));
    let w = Weights::new(store.clone(), DType::F32, &Device::Cpu);
    let trained = loss(&build(&w)).to_vec0::<f32>().unwrap();
    let plain = Weights::new(Arc::new(SeededSource), DType::F32, &Device::Cpu);
    let l = loss(&build(&plain));
    assert!(!l.track_op());
    // ...and compute the same value.
    assert!((l.to_vec0::<f32>().unwrap() - trained).abs() < 1e-5);
}

fn set_element(var: &Var, flat_index: usize, value: f32) {
    let t = var.as_tensor();
    let mut v = to_vec(t);
    v[flat_index] = value;
    var.set(&Tensor::from_vec(v, t.dims(), t.device()).unwrap()).unwrap();
}

#[test]
fn gradients_match_finite_differences() {
    let store = Arc::new(ParamStore::from_source(Arc::new(SeededSource)));
    let w = Weights::new(store.clone(), DType::F32, &Device::Cpu);
    let model = build(&w);
    let grads = loss(&model).backward().unwrap();
    let h = 1e-2f32;
    let mut checked = 0;
    for name in [
        "attn.k_proj.weight",
        "attn.k_proj.bias",
        "attn.q_norm.weight",
        "ln1.weight",
        "ffn.gate_proj.weight",
        "embed.weight",
        "lm_head.bias",
    ] {
        let var = store.get(name).unwrap();
        let g = to_vec(grads.get(var.as_tensor()).unwrap());
        // The element with the largest gradient, so the check is meaningful.
        let (idx, &gi) = g.iter().enumerate().max_by(|a, b| a.1.abs().total_cmp(&b.1.abs())).unwrap();
        let orig = to_vec(var.as_tensor())[idx];
        set_element(&var, idx, orig + h);
        let up = loss(&model).to_vec0::<f32>().unwrap() as f64;
        set_element(&var, idx, orig - h);
        let down = loss(&model).to_vec0::<f32>().unwrap() as f64;
        set_element(&var, idx, orig);
        let fd = (up - down) / (2.0 * h as f64);
        let err = (fd - gi as f64).abs();
        assert!(err <= 2e-3 + 2e-2 * fd.abs(), "`{name}`[{idx}]: backward {gi}, finite difference {fd}");
        assert!(gi.abs() > 1e-3, "`{name}`: gradient {gi} too small to check");
        checked += 1;
    }
    assert_eq!(checked, 7);
}

#[test]
fn param_store_initialises_and_reuses_parameters() {
    let store = Arc::new(ParamStore::new());
    let w = Weights::new(store.clone(), DType::F32, &Device::Cpu);
    let ones = w.get_with_init(&[3], "ones", Init::Ones).unwrap();
    assert_eq!(to_vec(&ones), vec![1.0; 3]);
    let zeros = w.pp("a").get_with_init(&[2, 2], "zeros", Init::Zeros).unwrap();
    assert_eq!(to_vec(&zeros), vec![0.0; 4]);
    let u = w.get_with_init(&[40, 50], "u", Init::xavier_uniform(40, 50)).unwrap();
    let bound = (6.0f32 / 90.0).sqrt();
    let uv = to_vec(&u);
    assert!(uv.iter().all(|x| x.abs() <= bound));
    assert!(uv.iter().any(|x| x.abs() > bound / 2.0));
    // A second request returns the same variable, whatever its init.
    let again = w.get_with_init(&[3], "ones", Init::Zeros).unwrap();
    assert_eq!(to_vec(&again), vec![1.0; 3]);
    assert!(w.contains("a.zeros") && !w.contains("nope"));
    assert_eq!(store.vars().len(), 3);
    assert!(store.get("a.zeros").is_some());
    assert!(ones.is_variable());
}
