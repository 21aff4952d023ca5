//! The 2017 encoder-decoder against `torch.nn.Transformer`
//! (fixture: scripts/fixtures/transformer_2017.py).

use std::collections::HashMap;
use std::sync::Arc;

use attn_models::{Transformer, TransformerConfig};
use attn_nn::{cross_entropy, lengths_to_valid, ParamStore, SafetensorsSource, Weights};
use attn_test_support::tensor_max_abs_diff;
use candle_core::{DType, Device, IndexOp, Tensor};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/transformer_2017.safetensors");

struct Fixture {
    source: Arc<SafetensorsSource>,
    cfg: TransformerConfig,
    src: Tensor,
    tgt: Tensor,
    tgt_out: Tensor,
    src_len: Vec<usize>,
    tgt_len: Vec<usize>,
}

fn meta() -> HashMap<String, String> {
    let bytes = std::fs::read(FIXTURE).unwrap();
    let (_, m) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    m.metadata().clone().unwrap()
}

fn fixture() -> Fixture {
    let source = Arc::new(SafetensorsSource::open(&[FIXTURE]).unwrap());
    let m = meta();
    let n = |k: &str| m[k].parse::<usize>().unwrap();
    let cfg = TransformerConfig {
        dropout: 0.0,
        layer_norm_eps: m["layer_norm_eps"].parse().unwrap(),
        pad_id: n("pad_id") as u32,
        bos_id: n("bos_id") as u32,
        eos_id: n("eos_id") as u32,
        n_encoder_layers: n("n_encoder_layers"),
        n_decoder_layers: n("n_decoder_layers"),
        d_ff: n("d_ff"),
        ..TransformerConfig::base(n("src_vocab"), n("tgt_vocab"))
    };
    let cfg = TransformerConfig { d_model: n("d_model"), n_heads: n("n_heads"), ..cfg };
    let dev = Device::Cpu;
    let ids = |name: &str| source.load_raw(name, &dev).unwrap().to_dtype(DType::U32).unwrap();
    let lens = |name: &str| -> Vec<usize> {
        source.load_raw(name, &dev).unwrap().to_vec1::<i64>().unwrap().iter().map(|&v| v as usize).collect()
    };
    Fixture {
        cfg,
        src: ids("input.src"),
        tgt: ids("input.tgt"),
        tgt_out: ids("input.tgt_out"),
        src_len: lens("input.src_lengths"),
        tgt_len: lens("input.tgt_lengths"),
        source,
    }
}

#[test]
fn log_probs_match_pytorch_with_padding_and_causal_masks() {
    let f = fixture();
    let w = Weights::new(f.source.clone(), DType::F32, &Device::Cpu);
    let model = Transformer::load(&w, &f.cfg).unwrap();
    let (s, t) = (f.src.dim(1).unwrap(), f.tgt.dim(1).unwrap());
    let src_valid = lengths_to_valid(&f.src_len, s, &Device::Cpu).unwrap();
    let tgt_valid = lengths_to_valid(&f.tgt_len, t, &Device::Cpu).unwrap();
    let logits = model.forward(&f.src, &f.tgt, Some(&src_valid), Some(&tgt_valid), false).unwrap();
    let ours = Transformer::log_softmax(&logits).unwrap();
    let reference = f.source.load_raw("output.logprobs", &Device::Cpu).unwrap();
    let mut worst = 0f32;
    for (b, &len) in f.tgt_len.iter().enumerate() {
        let d = tensor_max_abs_diff(&ours.i((b, ..len)).unwrap(), &reference.i((b, ..len)).unwrap());
        worst = worst.max(d);
    }
    assert!(worst < 1e-4, "max abs error {worst}");
    // Padding must matter: without the source mask the result changes.
    let unmasked =
        Transformer::log_softmax(&model.forward(&f.src, &f.tgt, None, Some(&tgt_valid), false).unwrap()).unwrap();
    let d = tensor_max_abs_diff(&unmasked.i((2, ..f.tgt_len[2])).unwrap(), &reference.i((2, ..f.tgt_len[2])).unwrap());
    assert!(d > 1e-3, "source padding mask had no effect ({d})");
}

#[test]
fn incremental_decoding_with_kv_cache_matches_full_forward() {
    let f = fixture();
    let w = Weights::new(f.source.clone(), DType::F32, &Device::Cpu);
    let model = Transformer::load(&w, &f.cfg).unwrap();
    let dev = Device::Cpu;
    let reference = f.source.load_raw("output.logprobs", &dev).unwrap();
    for b in 0..3 {
        let src = f.src.i((b..b + 1, ..f.src_len[b])).unwrap();
        let enc = model.encode(&src, None, false).unwrap();

        // Teacher-forced, one token at a time: same as PyTorch's full pass.
        let mut state = model.start_decoding(&enc).unwrap();
        for pos in 0..f.tgt_len[b] {
            let tok = f.tgt.i((b..b + 1, pos..pos + 1)).unwrap();
            let lp = Transformer::log_softmax(&model.decode_step(&tok, &mut state).unwrap()).unwrap();
            let d = tensor_max_abs_diff(&lp.i((0, 0)).unwrap(), &reference.i((b, pos)).unwrap());
            assert!(d < 1e-4, "row {b} position {pos}: {d}");
        }

        // Greedy decoding with the cache, then the full forward pass over
        // the greedy output: identical log-probabilities at every step.
        let mut state = model.start_decoding(&enc).unwrap();
        let mut tokens = vec![f.cfg.bos_id];
        let mut step_lps = Vec::new();
        for _ in 0..8 {
            let last = Tensor::new(&[[*tokens.last().unwrap()]], &dev).unwrap();
            let lp =
                Transformer::log_softmax(&model.decode_step(&last, &mut state).unwrap()).unwrap().i((0, 0)).unwrap();
            let next = lp.argmax(0).unwrap().to_scalar::<u32>().unwrap();
            step_lps.push(lp);
            tokens.push(next);
        }
        assert_eq!(state.len(), 8);
        let tgt = Tensor::new(&tokens[..8], &dev).unwrap().unsqueeze(0).unwrap();
        let full = Transformer::log_softmax(&model.decode(&tgt, &enc, None, false).unwrap()).unwrap();
        for (pos, lp) in step_lps.iter().enumerate() {
            let d = tensor_max_abs_diff(lp, &full.i((0, pos)).unwrap());
            assert!(d < 1e-5, "greedy row {b} step {pos}: {d}");
        }
    }
}

#[test]
fn label_smoothed_loss_and_gradients_match_pytorch() {
    let f = fixture();
    let store = Arc::new(ParamStore::from_source(f.source.clone()));
    let w = Weights::new(store.clone(), DType::F32, &Device::Cpu);
    let model = Transformer::load(&w, &f.cfg).unwrap();
    let (s, t) = (f.src.dim(1).unwrap(), f.tgt.dim(1).unwrap());
    let src_valid = lengths_to_valid(&f.src_len, s, &Device::Cpu).unwrap();
    let tgt_valid = lengths_to_valid(&f.tgt_len, t, &Device::Cpu).unwrap();
    let logits = model.forward(&f.src, &f.tgt, Some(&src_valid), Some(&tgt_valid), true).unwrap();
    let v = logits.dim(2).unwrap();
    let loss =
        cross_entropy(&logits.reshape(((), v)).unwrap(), &f.tgt_out.flatten_all().unwrap(), Some(f.cfg.pad_id), 0.1)
            .unwrap();
    let ref_loss = f.source.load_raw("output.loss", &Device::Cpu).unwrap().to_vec1::<f32>().unwrap()[0];
    let ours = loss.to_scalar::<f32>().unwrap();
    assert!((ours - ref_loss).abs() < 1e-5, "loss {ours} vs {ref_loss}");

    let grads = loss.backward().unwrap();
    let vars = store.vars();
    assert_eq!(vars.len(), 68, "every PyTorch parameter is a trainable variable");
    let mut checked = 0;
    for (name, var) in &vars {
        let ours = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        let theirs = f.source.load_raw(&format!("grad.{name}"), &Device::Cpu).unwrap();
        let scale = theirs.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let d = tensor_max_abs_diff(ours, &theirs);
        assert!(d < 1e-5 + 1e-4 * scale, "gradient of {name}: max abs diff {d} (max |grad| {scale})");
        checked += 1;
    }
    assert_eq!(checked, 68);
}

#[test]
fn inconsistent_configs_and_missing_weights_are_clear_errors() {
    let f = fixture();
    let w = Weights::new(f.source.clone(), DType::F32, &Device::Cpu);
    let bad = TransformerConfig { n_heads: 5, ..f.cfg.clone() };
    let e = Transformer::load(&w, &bad).unwrap_err().to_string();
    assert!(e.contains("d_model") && e.contains("n_heads"), "{e}");
    let bad = TransformerConfig { share_embeddings: true, ..f.cfg.clone() };
    assert!(Transformer::load(&w, &bad).unwrap_err().to_string().contains("share_embeddings"));
    let bad = TransformerConfig { n_encoder_layers: 3, ..f.cfg.clone() };
    let e = Transformer::load(&w, &bad).unwrap_err().to_string();
    assert!(e.contains("transformer.encoder.layers.2."), "{e}");
    let bad = TransformerConfig { d_ff: 128, ..f.cfg.clone() };
    let e = Transformer::load(&w, &bad).unwrap_err().to_string();
    assert!(e.contains("linear1.weight") && e.contains("[128, 32]"), "{e}");
    let bad = TransformerConfig { activation: "tanhh".into(), ..f.cfg.clone() };
    assert!(Transformer::load(&w, &bad).unwrap_err().to_string().contains("activation"));
    let model = Transformer::load(&w, &f.cfg).unwrap();
    // Token id outside the vocabulary: an error, not a panic.
    let src = Tensor::new(&[[3u32, 99]], &Device::Cpu).unwrap();
    assert!(model.encode(&src, None, false).unwrap_err().to_string().contains("out of range"));
}

#[test]
fn config_parses_from_json_with_defaults_and_rejects_unknown_fields() {
    let cfg: TransformerConfig = serde_json::from_str(
        r#"{"src_vocab_size": 10, "tgt_vocab_size": 12, "d_model": 16, "n_heads": 4,
            "n_encoder_layers": 1, "n_decoder_layers": 1, "d_ff": 32}"#,
    )
    .unwrap();
    assert_eq!(cfg.dropout, 0.1);
    assert!(!cfg.norm_first && cfg.final_norms);
    cfg.validate().unwrap();
    let e = serde_json::from_str::<TransformerConfig>(r#"{"src_vocab_size": 10, "n_layers": 3}"#).unwrap_err();
    assert!(e.to_string().contains("n_layers"), "{e}");
}

#[test]
fn fresh_model_trains_every_parameter() {
    // A freshly initialised model: every parameter receives a gradient.
    let cfg = TransformerConfig {
        d_model: 16,
        n_heads: 2,
        n_encoder_layers: 1,
        n_decoder_layers: 1,
        d_ff: 32,
        dropout: 0.1,
        share_embeddings: true,
        tie_output: true,
        norm_first: true,
        ..TransformerConfig::base(11, 11)
    };
    let store = Arc::new(ParamStore::new());
    let w = Weights::new(store.clone(), DType::F32, &Device::Cpu);
    let model = Transformer::load(&w, &cfg).unwrap();
    let src = Tensor::new(&[[3u32, 4, 5, 6], [7, 8, 0, 0]], &Device::Cpu).unwrap();
    let tgt = Tensor::new(&[[1u32, 5, 6], [1, 9, 0]], &Device::Cpu).unwrap();
    let out = Tensor::new(&[5u32, 6, 2, 9, 2, 0], &Device::Cpu).unwrap();
    let sv = lengths_to_valid(&[4, 2], 4, &Device::Cpu).unwrap();
    let tv = lengths_to_valid(&[3, 2], 3, &Device::Cpu).unwrap();
    let logits = model.forward(&src, &tgt, Some(&sv), Some(&tv), true).unwrap();
    let loss = cross_entropy(&logits.reshape((6, 11)).unwrap(), &out, Some(0), 0.1).unwrap();
    let grads = loss.backward().unwrap();
    // Shared embeddings and the tied generator are one parameter.
    assert!(store.get("tgt_embed.weight").is_none() && store.get("generator.weight").is_none());
    for (name, var) in store.vars() {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm > 0.0, "zero gradient for {name}");
    }
}
