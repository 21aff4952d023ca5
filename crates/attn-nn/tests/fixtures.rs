//! The building blocks against the committed PyTorch fixtures (see
//! scripts/fixtures/README.md for exactly what each file holds).

use std::sync::Arc;

use attn_nn::moe::top_k_indices;
use attn_nn::{
    causal_mask, combine_masks, cross_entropy, lengths_to_valid, load_balancing_loss, padding_mask, positions,
    AttentionConfig, FfnKind, MoeFeedForward, MultiHeadAttention, ParamStore, RopeLayout, RotaryEmbedding,
    SafetensorsSource, Weights,
};
use attn_test_support::diff::*;
use candle_core::{DType, Device, Tensor};

const MOE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/moe.safetensors");
const GQA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/gqa_attention.safetensors");
const T2017: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/transformer_2017.safetensors");

const TOL: f32 = 1e-5;

fn raw(src: &SafetensorsSource, name: &str) -> Tensor {
    src.load_raw(name, &Device::Cpu).unwrap_or_else(|e| panic!("fixture tensor `{name}`: {e}"))
}

#[test]
fn moe_matches_pytorch() {
    let src = Arc::new(SafetensorsSource::open(&[MOE]).unwrap());
    let store = Arc::new(ParamStore::from_source(src.clone()));
    let w = Weights::new(store.clone(), DType::F32, &Device::Cpu);
    let moe = MoeFeedForward::load(&w, 16, 32, 4, 2, FfnKind::SWIGLU).unwrap();
    let x = raw(&src, "input.x");
    assert_eq!(x.dims(), &[2, 5, 16]);
    let out = moe.forward(&x, true).unwrap();

    let want_hidden = to_vec(&raw(&src, "output.hidden"));
    assert_tensor_close(&out.hidden, &want_hidden, &[2, 5, 16], TOL, "moe hidden");
    let want_logits = to_vec(&raw(&src, "output.router_logits"));
    assert_tensor_close(&out.router_logits, &want_logits, &[10, 4], TOL, "router logits");

    // Expert selection, most probable first.
    let probs = candle_nn::ops::softmax(&out.router_logits, 1).unwrap();
    let (selected, counts) = top_k_indices(&probs, 2).unwrap();
    let want_sel: Vec<Vec<u32>> = raw(&src, "output.selected_experts")
        .to_vec2::<i64>()
        .unwrap()
        .iter()
        .map(|r| r.iter().map(|&v| v as u32).collect())
        .collect();
    assert_eq!(selected.to_vec2::<u32>().unwrap(), want_sel);
    assert_eq!(counts, vec![5, 7, 5, 3]);

    let aux = load_balancing_loss(&out.router_logits, 4, 2).unwrap().to_vec0::<f32>().unwrap();
    let want_aux = to_vec(&raw(&src, "output.aux_loss"))[0];
    assert!((aux - want_aux).abs() < TOL, "aux loss {aux} vs {want_aux}");

    // Gradients of mean(out^2).
    let objective = out.hidden.sqr().unwrap().mean_all().unwrap();
    assert!((objective.to_vec0::<f32>().unwrap() - 0.219_780_61).abs() < TOL);
    let grads = objective.backward().unwrap();
    for name in ["gate.weight", "experts.0.w1.weight"] {
        let var = store.get(name).unwrap_or_else(|| panic!("`{name}` not in the store"));
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for `{name}`"));
        let want = raw(&src, &format!("grad.{name}"));
        assert_tensor_close(g, &to_vec(&want), want.dims(), TOL, &format!("grad {name}"));
    }
    // Every expert is used, so every parameter is trained.
    assert_eq!(store.vars().len(), 1 + 4 * 3);
    for (name, var) in store.vars() {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for `{name}`"));
        assert!(to_vec(g).iter().any(|&v| v != 0.0), "`{name}` has a zero gradient");
    }
}

#[test]
fn gqa_attention_matches_pytorch() {
    let src = Arc::new(SafetensorsSource::open(&[GQA]).unwrap());
    let w = Weights::new(src.clone(), DType::F32, &Device::Cpu);
    let x = raw(&src, "input.x");
    let (b, t, d) = x.dims3().unwrap();
    assert_eq!((b, t, d), (2, 6, 32));
    let lengths: Vec<usize> =
        raw(&src, "input.lengths").to_vec1::<i64>().unwrap().iter().map(|&l| l as usize).collect();
    assert_eq!(lengths, vec![6, 4]);
    let pad = padding_mask(&lengths_to_valid(&lengths, t, &Device::Cpu).unwrap()).unwrap();
    let pos = positions(b, t, 0, &Device::Cpu).unwrap();
    for (variant, n_kv_heads, base, window) in
        [("gqa", 2, 10000.0, None), ("mqa", 1, 10000.0, None), ("swa", 2, 1000.0, Some(3))]
    {
        let cfg = AttentionConfig {
            d_model: 32,
            n_heads: 4,
            n_kv_heads,
            head_dim: 8,
            qkv_bias: false,
            out_bias: false,
            scale: None,
            softcap: None,
            dropout: 0.0,
        };
        let rope = RotaryEmbedding::new(base, 8, 16, RopeLayout::Halves, DType::F32, &Device::Cpu).unwrap();
        let attn = MultiHeadAttention::load(&w.pp(variant), cfg).unwrap().with_rope(rope);
        let mask = combine_masks(Some(&causal_mask(t, t, window, &Device::Cpu).unwrap()), Some(&pad)).unwrap();
        let y = attn.forward(&x, mask.as_ref(), Some(&pos), None, false).unwrap();
        assert_eq!(y.dims(), &[b, t, d]);
        let want = raw(&src, &format!("{variant}.output.y"));
        // Only the valid positions are meaningful.
        for (bi, &len) in lengths.iter().enumerate() {
            let got = to_vec(&y.get(bi).unwrap().narrow(0, 0, len).unwrap());
            let exp = to_vec(&want.get(bi).unwrap().narrow(0, 0, len).unwrap());
            assert_close(&got, &exp, TOL, &format!("{variant} sequence {bi}"));
        }
    }
}

#[test]
fn cross_entropy_matches_pytorch_loss() {
    // F.cross_entropy(logprobs, tgt_out, ignore_index=0, label_smoothing=0.1):
    // log_softmax of log-probabilities is the identity, so the stored
    // log-probabilities reproduce the stored loss.
    let src = SafetensorsSource::open(&[T2017]).unwrap();
    let logprobs = raw(&src, "output.logprobs").reshape(((), 19)).unwrap();
    let targets = raw(&src, "input.tgt_out").flatten_all().unwrap();
    let loss = cross_entropy(&logprobs, &targets, Some(0), 0.1).unwrap().to_vec0::<f32>().unwrap();
    let want = to_vec(&raw(&src, "output.loss"))[0];
    assert!((loss - want).abs() < TOL, "loss {loss} vs {want}");
    assert!((want - 3.817_810_5).abs() < 1e-6);
}
