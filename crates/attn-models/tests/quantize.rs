//! `attn quantize` round trips: a small random BERT folder and a synthetic
//! GGUF through quantize -> load, against the float model, with tolerances
//! derived from each type's rounding step; and the real MiniLM.

use std::collections::BTreeMap;
use std::path::Path;

use attn_models::bert::SentenceEncoder;
use attn_models::gguf::{write_gguf, GgufFile, TensorToWrite, TensorType, Value};
use attn_models::load::{load_model, AnyModel};
use attn_models::quantize::{quantize, QuantType};
use attn_test_support::diff::{cosine, quant_max_error, rel_rms};
use attn_test_support::{real_model, tempdir};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

/// Largest rounding error of one weight relative to its block's largest
/// magnitude (derived in [`attn_test_support::diff::quant_max_error`]).
fn max_error(ty: &str) -> f32 {
    quant_max_error(ty).unwrap_or_else(|| panic!("no bound for {ty}"))
}

const WORDS: &[&str] = &["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away", "quick", "brown", "fox"];

/// A WordPiece tokenizer.json over a handful of words.
fn tiny_tokenizer_json() -> String {
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"].iter().enumerate() {
        vocab.insert(t.to_string(), i.into());
    }
    for w in WORDS {
        let n = vocab.len();
        vocab.insert(w.to_string(), n.into());
        let n = vocab.len();
        vocab.insert(format!("##{w}"), n.into());
    }
    let special = |id: u32, c: &str| {
        serde_json::json!({"id": id, "content": c, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": true})
    };
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "[PAD]"), special(1, "[UNK]"), special(2, "[CLS]"), special(3, "[SEP]"),
            special(4, "[MASK]")],
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
            "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}},
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100, "vocab": vocab}
    })
    .to_string()
}

/// A random BERT in an HF folder: hidden 256 so Q4_K blocks fit the rows.
fn random_bert(dir: &Path) -> usize {
    let (vocab, d, ff, layers, pos) = (5 + 2 * WORDS.len(), 256usize, 512usize, 2usize, 64usize);
    let cfg = serde_json::json!({"model_type": "bert", "vocab_size": vocab, "hidden_size": d,
        "num_hidden_layers": layers, "num_attention_heads": 4, "intermediate_size": ff,
        "max_position_embeddings": pos, "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12});
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tiny_tokenizer_json()).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut t = std::collections::HashMap::new();
    let mut put = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| offset + scale * (rng.gen::<f32>() * 2.0 - 1.0)).collect();
        t.insert(name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap());
    };
    put("embeddings.word_embeddings.weight".into(), vec![vocab, d], 1.0, 0.0);
    put("embeddings.position_embeddings.weight".into(), vec![pos, d], 0.5, 0.0);
    put("embeddings.token_type_embeddings.weight".into(), vec![2, d], 0.5, 0.0);
    put("embeddings.LayerNorm.weight".into(), vec![d], 0.1, 1.0);
    put("embeddings.LayerNorm.bias".into(), vec![d], 0.1, 0.0);
    put("pooler.dense.weight".into(), vec![d, d], 0.1, 0.0);
    for i in 0..layers {
        let p = format!("encoder.layer.{i}");
        let s = (3.0 / d as f32).sqrt();
        for m in ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"] {
            put(format!("{p}.{m}.weight"), vec![d, d], s, 0.0);
            put(format!("{p}.{m}.bias"), vec![d], 0.1, 0.0);
        }
        put(format!("{p}.intermediate.dense.weight"), vec![ff, d], s, 0.0);
        put(format!("{p}.intermediate.dense.bias"), vec![ff], 0.1, 0.0);
        put(format!("{p}.output.dense.weight"), vec![d, ff], (3.0 / ff as f32).sqrt(), 0.0);
        put(format!("{p}.output.dense.bias"), vec![d], 0.1, 0.0);
        for n in ["attention.output.LayerNorm", "output.LayerNorm"] {
            put(format!("{p}.{n}.weight"), vec![d], 0.1, 1.0);
            put(format!("{p}.{n}.bias"), vec![d], 0.1, 0.0);
        }
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    layers
}

/// Every matrix of a random BERT quantized to each type: the loaded GGUF's
/// hidden states stay within a bound derived from the type's rounding step
/// (the weights' relative error, grown through the layers), its sentence
/// embeddings stay close, and the tokenizer stored in the file tokenizes
/// as the folder's does.
#[test]
fn random_bert_folder_round_trips_within_the_quantization_error() {
    let dir = tempdir("bert");
    let layers = random_bert(&dir);
    let float = SentenceEncoder::load(&dir, &Device::Cpu).unwrap();
    let texts = ["the quick brown fox ran far away", "a cat sat on the mat", "dog"];
    let ids = float.tokenizer.encode_batch(&texts).unwrap();
    let lengths: Vec<usize> = ids.iter().map(Vec::len).collect();
    let t = *lengths.iter().max().unwrap();
    let flat: Vec<u32> =
        ids.iter().flat_map(|r| r.iter().copied().chain(std::iter::repeat(0).take(t - r.len()))).collect();
    let ids_t = Tensor::from_vec(flat, (texts.len(), t), &Device::Cpu).unwrap();
    let valid = |h: Tensor| -> Vec<f32> {
        let h = h.to_vec3::<f32>().unwrap();
        h.iter().zip(&lengths).flat_map(|(r, &n)| r[..n].iter().flatten().copied().collect::<Vec<_>>()).collect()
    };
    let reference = valid(float.model.forward(&ids_t, &lengths).unwrap());
    let ref_emb = float.embed(&texts, 8).unwrap().to_vec2::<f32>().unwrap();
    // The float folder embeds on the packed path: its packed hidden states and
    // embeddings against candle's padded forward.
    assert!(float.is_packed());
    let (packed, offsets) = float.model.forward_packed(&ids).unwrap();
    assert_eq!(offsets.last(), Some(&lengths.iter().sum::<usize>()));
    let hidden_diff = packed.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert_eq!(packed.len(), reference.len());
    assert!(hidden_diff < 2e-5, "packed vs candle hidden states: max diff {hidden_diff}");
    let candle_emb = float.embed_candle(&texts, 8).unwrap().to_vec2::<f32>().unwrap();
    let emb_diff =
        ref_emb.iter().flatten().zip(candle_emb.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(emb_diff < 1e-6, "packed vs candle embeddings: max diff {emb_diff}");
    for ty in [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4K] {
        let out = dir.join(format!("bert-{}.gguf", ty.name()));
        let s = quantize(&dir, &out, ty).unwrap();
        assert!(s.fallbacks.is_empty(), "{:?}", s.fallbacks);
        assert_eq!(s.dropped, vec!["pooler.dense.weight".to_string()]);
        // 2 layers x 6 matrices + the token embedding; position and
        // token-type embeddings stay F32 as in llama.cpp.
        assert_eq!(s.tensor_types.get(&format!("{:?}", ty.dtype())), Some(&(6 * layers + 1)), "{:?}", s.tensor_types);
        let q = match load_model(&out, &Device::Cpu).unwrap() {
            AnyModel::Encoder(e) => e,
            _ => panic!("not an encoder"),
        };
        assert_eq!(q.tokenizer.encode_batch(&texts).unwrap(), ids);
        let got = valid(q.model.forward(&ids_t, &lengths).unwrap());
        let err = rel_rms(&got, &reference);
        // Relative to the weights' size, a weight moves by at most
        // max_error (and the activations by Q8's, rounded before each
        // quantized matmul); each of the 2*layers sublayers adds that much.
        // Allow twice the sum.
        let tol = 2.0 * (2 * layers) as f32 * (max_error(&format!("{:?}", ty.dtype())) + 0.5 / 127.0);
        assert!(err <= tol, "{}: relative RMS error {err} > {tol}", ty.name());
        assert!(err > 0.0, "{}: no quantization error at all: weights not quantized?", ty.name());
        let emb = q.embed(&texts, 8).unwrap().to_vec2::<f32>().unwrap();
        for (a, b) in emb.iter().zip(&ref_emb) {
            let c = cosine(a, b);
            assert!(1.0 - c <= tol, "{}: embedding cosine {c}", ty.name());
        }
    }
    // Weight-only int8 of the float model: Q8_0-sized error.
    let int8 = SentenceEncoder::load(&dir, &Device::Cpu).unwrap().into_q8().unwrap();
    let got = valid(int8.model.forward(&ids_t, &lengths).unwrap());
    let err = rel_rms(&got, &reference);
    let tol = 2.0 * (2 * layers) as f32 * 2.0 * (0.5 / 127.0);
    assert!(err <= tol && err > 0.0, "int8: relative RMS error {err} (bound {tol})");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Re-quantizing a GGUF keeps every metadata key and the F32 vectors
/// byte for byte, quantizes matrices (Q4_K where rows fill 256-blocks,
/// llama.cpp's Q5_0 fallback where they fill 32-blocks, F16 otherwise),
/// keeps MoE routers F32, and every value stays within half a step of the
/// original.
#[test]
fn gguf_requantization_keeps_metadata_and_bounds_every_value() {
    let dir = tempdir("gguf");
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut gen = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen::<f32>() * 2.0 - 1.0).collect() };
    // (name, GGML dims innermost first, values)
    let tensors: Vec<(&str, Vec<u64>, Vec<f32>)> = vec![
        ("blk.0.attn_q.weight", vec![256, 8], gen(256 * 8)),
        ("blk.0.ffn_up.weight", vec![96, 16], gen(96 * 16)),
        ("blk.0.odd.weight", vec![48, 4], gen(48 * 4)),
        ("blk.0.moe.gate.weight", vec![32, 4], gen(32 * 4)),
        ("blk.0.attn_norm.weight", vec![96], gen(96)),
    ];
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, v)| f32_bytes(v)).collect();
    let mut meta = BTreeMap::new();
    meta.insert("general.architecture".to_string(), Value::String("attn-gpt".into()));
    meta.insert("general.file_type".to_string(), Value::U32(0));
    meta.insert("attn.config".to_string(), Value::String("{}".into()));
    meta.insert("x.tokens".to_string(), Value::Array(vec![Value::String("a".into()), Value::String("b".into())]));
    meta.insert("x.eps".to_string(), Value::F32(1e-6));
    let tw: Vec<TensorToWrite> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, d, _), b)| TensorToWrite { name: n, ty: TensorType(0), dims: d.clone(), data: b })
        .collect();
    let input = dir.join("in.gguf");
    std::fs::write(&input, write_gguf(&meta, &tw).unwrap()).unwrap();
    let output = dir.join("out.gguf");
    let s = quantize(&input, &output, QuantType::Q4K).unwrap();
    assert_eq!(s.fallbacks.len(), 2, "{:?}", s.fallbacks);
    let f = GgufFile::open(&output).unwrap();
    for (k, v) in &meta {
        if k != "general.file_type" {
            assert_eq!(f.meta_opt(k), Some(v), "metadata `{k}`");
        }
    }
    assert_eq!(f.meta_opt("general.file_type"), Some(&Value::U32(14)));
    let expected = ["Q4_K", "Q5_0", "F16", "F32", "F32"];
    for ((name, dims, values), want) in tensors.iter().zip(expected) {
        let info = f.tensor_info(name).unwrap();
        assert_eq!(&info.dims, dims, "{name}");
        assert_eq!(info.ty.name(), want, "{name}");
        if want == "F32" {
            assert_eq!(f.tensor_data(info), f32_bytes(values).as_slice(), "{name} not kept as it was");
            continue;
        }
        let got = f.qtensor(name, &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap();
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let block = if want == "Q4_K" { 32 } else { 32.min(values.len()) };
        let bound = max_error(match want {
            "Q4_K" => "Q4K",
            w => w,
        });
        for (b, (g, v)) in got.chunks(block).zip(values.chunks(block)).enumerate() {
            let amax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (x, y) in g.iter().zip(v) {
                assert!((x - y).abs() <= bound * amax + 1e-6, "{name} block {b}: {x} vs {y} (amax {amax})");
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Bad input: one clear error each, and no output file left behind.
#[test]
fn quantize_rejects_bad_input() {
    let dir = tempdir("bad");
    let out = dir.join("out.gguf");
    let e = quantize(&dir.join("missing"), &out, QuantType::Q8_0).unwrap_err().to_string();
    assert!(e.contains("no such file"), "{e}");
    let e = QuantType::parse("q3_k").unwrap_err().to_string();
    assert!(e.contains("unknown type `q3_k`") && e.contains("q8_0, q4_0, q4_k"), "{e}");
    std::fs::write(dir.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    let e = quantize(&dir, &out, QuantType::Q8_0).unwrap_err().to_string();
    assert!(e.contains("model_type `llama`"), "{e}");
    let f = dir.join("same.gguf");
    std::fs::write(&f, b"GGUF").unwrap();
    let e = quantize(&f, &f, QuantType::Q8_0).unwrap_err().to_string();
    assert!(e.contains("same path as IN"), "{e}");
    let e = quantize(&f, &dir.join("x.gguf"), QuantType::Q8_0).unwrap_err().to_string();
    assert!(e.contains("GGUF"), "{e}");
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 2, "files left behind: {left:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// all-MiniLM-L6-v2 to Q8_0: embeddings of the committed sentences keep a
/// cosine above 0.99 to the float model's.
#[test]
fn minilm_q8_0_embeddings_stay_close_to_float() {
    let path = real_model("all-minilm-l6-v2");
    let v = attn_test_support::fixture_json("minilm_reference.json");
    let texts: Vec<&str> = v["sentences"].as_array().unwrap().iter().map(|s| s["text"].as_str().unwrap()).collect();
    let float = SentenceEncoder::load(&path, &Device::Cpu).unwrap();
    let reference = float.embed(&texts, 32).unwrap().to_vec2::<f32>().unwrap();
    let dir = tempdir("minilm");
    let out = dir.join("minilm-q8_0.gguf");
    quantize(&path, &out, QuantType::Q8_0).unwrap();
    let q = match load_model(&out, &Device::Cpu).unwrap() {
        AnyModel::Encoder(e) => e,
        _ => panic!("not an encoder"),
    };
    assert_eq!(q.max_seq_length, 256);
    let emb = q.embed(&texts, 32).unwrap().to_vec2::<f32>().unwrap();
    for ((a, b), t) in emb.iter().zip(&reference).zip(&texts) {
        let c = cosine(a, b);
        assert!(c > 0.99, "cosine {c} for {t:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
