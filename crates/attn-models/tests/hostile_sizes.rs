//! Sizes a file declares (GGUF metadata, `config.json`) are checked against
//! sane limits and against the tensors the file holds before anything is
//! allocated from them: a hostile value is an error naming the key and the
//! value, never an abort, and `check_model` (what `attn info` runs) refuses
//! the file with the same message as loading it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use attn_models::gguf::{GgufFile, Value};
use attn_models::gpt::{Gpt, GptConfig};
use attn_models::load::{check_model, load_model};
use attn_models::Decoder;
use attn_nn::{ParamStore, Weights};
use attn_test_support::tempdir;
use attn_test_support::tiny_gguf::{gguf_bytes, tiny_gemma3_gguf, tiny_gemma3_metadata, tiny_gemma3_tensors};
use candle_core::{DType, Device, Tensor};

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Loading `path` fails with a message holding every one of `needles`, and
/// `check_model` fails with the same message.
fn refused(path: &Path, needles: &[&str]) {
    let load = match load_model(path, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    };
    for n in needles {
        assert!(load.contains(n), "`{n}` not in: {load}");
    }
    let check = check_model(path).expect_err("check_model accepted the file").to_string();
    assert_eq!(check, load, "check_model and loading disagree");
}

#[test]
fn the_tiny_gemma3_loads_and_passes_the_checks() {
    let dir = tempdir("sizes-ok");
    let p = write(&dir, "tiny.gguf", &tiny_gemma3_gguf(&[]));
    check_model(&p).unwrap();
    let d = Decoder::from_gguf(&GgufFile::open(&p).unwrap()).unwrap();
    assert_eq!(d.spec().n_layers(), 2);
}

#[test]
fn hostile_gguf_metadata_is_refused_naming_the_key_and_value() {
    let dir = tempdir("sizes-gguf");
    let u = |v: u32| Value::U32(v);
    for (key, value, needles) in [
        ("gemma3.block_count", u(1_000_000_000), vec!["`gemma3.block_count` = 1000000000", "outside"]),
        ("gemma3.block_count", Value::U64(1 << 40), vec!["`gemma3.block_count` = 1099511627776"]),
        // Fewer or more layers than the file's blocks (one fewer loaded silently before).
        ("gemma3.block_count", u(1), vec!["`gemma3.block_count` = 1", "holds 2 layer groups"]),
        ("gemma3.block_count", u(3), vec!["`gemma3.block_count` = 3", "holds 2 layer groups"]),
        ("gemma3.embedding_length", u(1_000_000_000), vec!["`gemma3.embedding_length` = 1000000000"]),
        ("gemma3.embedding_length", u(128), vec!["`gemma3.embedding_length` = 128", "token_embd.weight"]),
        ("gemma3.feed_forward_length", u(1_000_000_000), vec!["`gemma3.feed_forward_length` = 1000000000"]),
        ("gemma3.feed_forward_length", u(4096), vec!["`gemma3.feed_forward_length` = 4096", "ffn_up"]),
        ("gemma3.attention.head_count", u(1_000_000_000), vec!["`gemma3.attention.head_count` = 1000000000"]),
        ("gemma3.attention.head_count", u(4), vec!["`gemma3.attention.head_count` = 4", "attn_q.weight"]),
        ("gemma3.attention.head_count_kv", u(2), vec!["`gemma3.attention.head_count_kv` = 2", "attn_k.weight"]),
        ("gemma3.attention.key_length", u(1_000_000_000), vec!["`gemma3.attention.key_length` = 1000000000"]),
        ("gemma3.attention.key_length", u(64), vec!["`gemma3.attention.key_length` = 64"]),
        ("gemma3.context_length", u(1_000_000_000), vec!["`gemma3.context_length` = 1000000000"]),
        ("gemma3.attention.sliding_window", u(0), vec!["`gemma3.attention.sliding_window` = 0"]),
    ] {
        let p = write(&dir, "hostile.gguf", &tiny_gemma3_gguf(&[(key, value)]));
        refused(&p, &needles);
    }
}

#[test]
fn layer_groups_must_run_from_zero_without_gaps() {
    let dir = tempdir("sizes-groups");
    // A stray block beyond the declared ones.
    let mut tensors = tiny_gemma3_tensors();
    tensors.push(("blk.7.attn_norm.weight".into(), vec![64]));
    let p = write(&dir, "gap.gguf", &gguf_bytes(&tiny_gemma3_metadata(), &tensors));
    refused(&p, &["`gemma3.block_count` = 2", "holds 3 layer groups", "blk.0 to blk.7"]);
    // Block 1 missing entirely, block 2 present.
    let tensors: Vec<_> = tiny_gemma3_tensors().into_iter().map(|(n, s)| (n.replace("blk.1.", "blk.2."), s)).collect();
    let p = write(&dir, "renumbered.gguf", &gguf_bytes(&tiny_gemma3_metadata(), &tensors));
    refused(&p, &["`gemma3.block_count` = 2", "gaps"]);
}

#[test]
fn every_tensor_shape_is_checked_before_loading() {
    let dir = tempdir("sizes-shape");
    let tensors: Vec<_> = tiny_gemma3_tensors()
        .into_iter()
        .map(|(n, s)| if n == "blk.1.ffn_down.weight" { (n, vec![64, 32]) } else { (n, s) })
        .collect();
    let p = write(&dir, "shape.gguf", &gguf_bytes(&tiny_gemma3_metadata(), &tensors));
    refused(&p, &["blk.1.ffn_down.weight", "[64, 32]", "expected [64, 64]"]);
}

/// A tiny BERT in an HF folder (no tokenizer: the checks run first).
fn tiny_bert(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let (vocab, d, ff, layers, pos) = (16usize, 32usize, 64usize, 2usize, 16usize);
    let mut cfg = serde_json::json!({"model_type": "bert", "vocab_size": vocab, "hidden_size": d,
        "num_hidden_layers": layers, "num_attention_heads": 4, "intermediate_size": ff,
        "max_position_embeddings": pos, "type_vocab_size": 2});
    edit(&mut cfg);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let mut t = HashMap::new();
    let mut put = |name: String, shape: Vec<usize>| {
        t.insert(name, Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap());
    };
    put("embeddings.word_embeddings.weight".into(), vec![vocab, d]);
    put("embeddings.position_embeddings.weight".into(), vec![pos, d]);
    put("embeddings.token_type_embeddings.weight".into(), vec![2, d]);
    for i in 0..layers {
        put(format!("encoder.layer.{i}.intermediate.dense.weight"), vec![ff, d]);
        put(format!("encoder.layer.{i}.output.dense.weight"), vec![d, ff]);
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
}

#[test]
fn hostile_bert_config_is_refused_naming_the_field_and_value() {
    let dir = tempdir("sizes-bert");
    for (field, value, needles) in [
        ("num_hidden_layers", 1_000_000_000u64, vec!["`num_hidden_layers` = 1000000000", "outside"]),
        ("num_hidden_layers", 3, vec!["`num_hidden_layers` = 3", "holds 2 layer groups `encoder.layer.N`"]),
        ("hidden_size", 1_000_000_000, vec!["`hidden_size` = 1000000000"]),
        ("hidden_size", 64, vec!["`hidden_size` = 64", "word_embeddings"]),
        ("intermediate_size", 1_000_000_000, vec!["`intermediate_size` = 1000000000"]),
        ("max_position_embeddings", 1_000_000_000, vec!["`max_position_embeddings` = 1000000000"]),
        ("max_position_embeddings", 512, vec!["`max_position_embeddings` = 512", "position_embeddings"]),
        ("vocab_size", 1_000_000_000, vec!["`vocab_size` = 1000000000"]),
        ("num_attention_heads", 1_000_000_000, vec!["`num_attention_heads` = 1000000000"]),
    ] {
        tiny_bert(&dir, |c| c[field] = value.into());
        let mut needles = needles;
        needles.push("config.json");
        refused(&dir, &needles);
    }
}

/// A tiny GPT exported as `attn train` does (no tokenizer: the checks run
/// first).
fn tiny_trained_gpt(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let cfg = serde_json::json!({"vocab_size": 16, "d_model": 32, "n_layers": 2, "n_heads": 4,
        "d_ff": 64, "max_len": 32});
    let store = Arc::new(ParamStore::new());
    let w = Weights::new(store.clone(), DType::F32, &Device::Cpu);
    Gpt::load(&w, &serde_json::from_value::<GptConfig>(cfg.clone()).unwrap()).unwrap();
    let t: HashMap<String, Tensor> = store.vars().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    let mut cj = serde_json::json!({"model_type": "attn-gpt", "config": cfg});
    edit(&mut cj["config"]);
    std::fs::write(dir.join("config.json"), cj.to_string()).unwrap();
}

#[test]
fn hostile_trained_model_config_is_refused_naming_the_field_and_value() {
    let dir = tempdir("sizes-trained");
    for (field, value, needles) in [
        ("n_layers", 1_000_000_000u64, vec!["`n_layers` = 1000000000", "outside"]),
        ("n_layers", 3, vec!["`n_layers` = 3", "holds 2 layer groups `layers.N`"]),
        ("d_model", 1_000_000_000, vec!["`d_model` = 1000000000"]),
        ("d_model", 64, vec!["`d_model` = 64", "embed.weight"]),
        ("vocab_size", 17, vec!["`vocab_size` = 17", "embed.weight"]),
        ("max_len", 1_000_000_000, vec!["`max_len` = 1000000000"]),
        ("d_ff", 1_000_000_000, vec!["`d_ff` = 1000000000"]),
    ] {
        tiny_trained_gpt(&dir, |c| c[field] = value.into());
        let mut needles = needles;
        needles.push("config.json");
        refused(&dir, &needles);
    }
}
