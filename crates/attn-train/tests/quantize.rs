//! A toy GPT (with MoE layers) trained by attn, through `attn quantize`
//! and back: the GGUF's logits stay within a bound derived from each
//! type's rounding error of the float model's.

mod common;

use attn_models::quantize::{quantize, QuantType};
use attn_test_support::tempdir;
use attn_train::task::Net;
use attn_train::trainer::load_exported;
use attn_train::{train, TrainOptions};
use candle_core::{Device, Tensor};
use common::ci_config;

/// Largest rounding error of one weight relative to its block's largest
/// magnitude (derived in [`attn_test_support::diff::quant_max_error`]); 0
/// for the types left unquantized.
fn max_error(ty: &str) -> f32 {
    attn_test_support::diff::quant_max_error(ty).unwrap_or(0.0)
}

fn logits(net: &Net, ids: &Tensor) -> Vec<f32> {
    match net {
        Net::Gpt(m) => m.forward(ids, false).unwrap().logits.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        _ => panic!("not a GPT"),
    }
}

#[test]
fn trained_gpt_round_trips_through_quantize() {
    let dir = tempdir("quantize-gpt");
    let cfg = ci_config(
        "shakespeare-moe-tiny",
        &dir,
        &[("max_steps", "6"), ("eval_every", "1000"), ("checkpoint_every", "1000")],
    );
    let run_dir = dir.join("run");
    train(&TrainOptions {
        config: Some(cfg),
        run_dir: run_dir.clone(),
        resume: false,
        progress: false,
        comm: attn_dist::single(),
    })
    .unwrap();
    let (float, tok) = load_exported(&run_dir.join("model"), &Device::Cpu).unwrap();
    let text = "ROMEO: But soft, what light";
    let ids = attn_models::Tokenizer::encode(&tok, text, false).unwrap();
    let ids = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let reference = logits(&float, &ids);
    let n_layers = 2;
    for ty in [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4K] {
        let out = dir.join(format!("gpt-{}.gguf", ty.name()));
        // The run directory itself: its exported model/ is found.
        let s = quantize(&run_dir, &out, ty).unwrap();
        assert_eq!(s.architecture, "attn-gpt");
        let routers = s.tensor_types.get("F32").copied().unwrap_or(0);
        // Per layer: 2 norms + the MoE router; plus the final norm.
        assert_eq!(routers, 3 * n_layers + 1, "{:?}", s.tensor_types);
        let coarsest = s.tensor_types.keys().map(|t| max_error(t)).fold(0f32, f32::max);
        let (q, qtok) = load_exported(&out, &Device::Cpu).unwrap();
        assert_eq!(
            attn_models::Tokenizer::encode(&qtok, text, false).unwrap(),
            ids.squeeze(0).unwrap().to_vec1::<u32>().unwrap()
        );
        let got = logits(&q, &ids);
        let num: f32 = got.iter().zip(&reference).map(|(a, b)| (a - b) * (a - b)).sum();
        let den: f32 = reference.iter().map(|b| b * b).sum();
        let err = (num / den).sqrt();
        // Each sublayer (attention, FFN) and the tied embedding/head adds
        // up to the weights' error plus 8-bit activations'; twice the sum.
        let tol = 2.0 * (2 * n_layers + 2) as f32 * (coarsest + 0.5 / 127.0);
        assert!(err > 0.0 && err <= tol, "{}: relative RMS logits error {err} (bound {tol})", ty.name());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
