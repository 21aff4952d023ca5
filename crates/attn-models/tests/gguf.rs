//! The GGUF reader: round trip through the writer, and every kind of
//! truncated or corrupt header is an error, never a panic.

use std::collections::BTreeMap;

use attn_models::gguf::{write_gguf, GgufFile, GgufHeader, TensorToWrite, TensorType, Value};
use attn_models::inspect::inspect;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use proptest::prelude::*;

const F32: TensorType = TensorType(0);
const F16: TensorType = TensorType(1);
const Q8_0: TensorType = TensorType(8);

fn metadata() -> BTreeMap<String, Value> {
    let mut m = BTreeMap::new();
    m.insert("general.architecture".into(), Value::String("llama".into()));
    m.insert("general.name".into(), Value::String("tiny ✓".into()));
    m.insert("llama.block_count".into(), Value::U32(2));
    m.insert("llama.rope.freq_base".into(), Value::F32(10000.0));
    m.insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(true));
    m.insert(
        "tokenizer.ggml.tokens".into(),
        Value::Array(vec![Value::String("<s>".into()), Value::String("▁a".into())]),
    );
    m.insert("tokenizer.ggml.scores".into(), Value::Array(vec![Value::F32(0.0), Value::F32(-1.5)]));
    m.insert("nested".into(), Value::Array(vec![Value::Array(vec![Value::I64(-3)]), Value::Array(vec![])]));
    m
}

struct Built {
    bytes: Vec<u8>,
    weight: Tensor,
}

fn build() -> Built {
    let dev = Device::Cpu;
    let weight = Tensor::randn(0f32, 1.0, (4, 64), &dev).unwrap();
    let q = QTensor::quantize(&weight, GgmlDType::Q8_0).unwrap();
    let q_bytes = q.data().unwrap().to_vec();
    let f32_bytes: Vec<u8> =
        weight.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect();
    let f16_bytes: Vec<u8> = weight
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    let tensors = [
        TensorToWrite { name: "w.f32", ty: F32, dims: vec![64, 4], data: &f32_bytes },
        TensorToWrite { name: "w.q8", ty: Q8_0, dims: vec![64, 4], data: &q_bytes },
        TensorToWrite { name: "w.f16", ty: F16, dims: vec![64, 4], data: &f16_bytes },
    ];
    Built { bytes: write_gguf(&metadata(), &tensors).unwrap(), weight }
}

fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = attn_test_support::process_temp_dir("gguf-test").join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn round_trip_metadata_and_tensors() {
    let b = build();
    let h = GgufHeader::parse(&b.bytes).unwrap();
    assert_eq!(h.version, 3);
    assert_eq!(h.metadata, metadata());
    assert_eq!(h.architecture(), Some("llama"));
    assert_eq!(h.tensors.len(), 3);
    assert_eq!(h.tensors[1].shape(), vec![4, 64]);
    assert_eq!(h.tensors[1].size, 4 * 2 * 34);

    let path = temp_file("roundtrip.gguf", &b.bytes);
    let f = GgufFile::open(&path).unwrap();
    for (name, tol) in [("w.f32", 0.0), ("w.f16", 2e-3), ("w.q8", 3e-2)] {
        let t = f.qtensor(name, &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap();
        let d = attn_test_support::tensor_max_abs_diff(&t, &b.weight);
        assert!(d <= tol, "{name}: {d}");
    }
    let e = f.qtensor("nope", &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("missing tensor `nope`"), "{e}");

    let s = inspect(&path).unwrap();
    assert_eq!(s.format, "gguf");
    assert_eq!(s.architecture.as_deref(), Some("llama"));
    assert_eq!(s.parameters, 3 * 256);
    assert_eq!(s.bytes, 256 * 4 + 8 * 34 + 256 * 2);
    assert_eq!(s.dtypes["Q8_0"].tensors, 1);
    assert_eq!(s.metadata["tokenizer.ggml.tokens"], "[2 items]");
}

#[test]
fn every_truncation_is_an_error() {
    let b = build();
    for n in 0..b.bytes.len() {
        let r = GgufHeader::parse(&b.bytes[..n]);
        assert!(r.is_err(), "prefix of {n} bytes parsed");
    }
    let path = temp_file("truncated.gguf", &b.bytes[..b.bytes.len() - 10]);
    let e = GgufFile::open(&path).err().unwrap().to_string();
    assert!(e.contains("truncated.gguf") && e.contains("w.f16"), "{e}");
}

fn header(version: u32, n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut v = b"GGUF".to_vec();
    v.extend_from_slice(&version.to_le_bytes());
    v.extend_from_slice(&n_tensors.to_le_bytes());
    v.extend_from_slice(&n_kv.to_le_bytes());
    v
}

fn kv(out: &mut Vec<u8>, key: &str, ty: u32, payload: &[u8]) {
    out.extend_from_slice(&(key.len() as u64).to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(&ty.to_le_bytes());
    out.extend_from_slice(payload);
}

fn err(bytes: &[u8]) -> String {
    GgufHeader::parse(bytes).unwrap_err()
}

#[test]
fn corrupt_headers_are_clear_errors() {
    let mut pad = vec![0u8; 256];
    assert!(err(b"GGML\x03\0\0\0").contains("not a GGUF file"));
    assert!(err(&header(1, 0, 0)).contains("version 1"));
    // Counts far beyond the file size are rejected before allocating.
    assert!(err(&header(3, u64::MAX, 0)).contains("tensors"));
    assert!(err(&header(3, 0, u64::MAX / 2)).contains("metadata"));

    let mut v = header(3, 0, 1);
    kv(&mut v, "k", 8, &u64::MAX.to_le_bytes());
    v.append(&mut pad.clone());
    assert!(err(&v).contains("value of `k`"), "{}", err(&v));

    let mut v = header(3, 0, 1);
    let mut arr = 4u32.to_le_bytes().to_vec();
    arr.extend_from_slice(&(1u64 << 40).to_le_bytes());
    kv(&mut v, "arr", 9, &arr);
    v.append(&mut pad.clone());
    assert!(err(&v).contains("array of"), "{}", err(&v));

    let mut v = header(3, 0, 1);
    kv(&mut v, "k", 42, &[]);
    v.append(&mut pad.clone());
    assert!(err(&v).contains("unknown value type 42"));

    let mut v = header(3, 0, 1);
    kv(&mut v, "b", 7, &[5]);
    v.append(&mut pad.clone());
    assert!(err(&v).contains("bool"));

    let mut v = header(3, 0, 1);
    kv(&mut v, "s", 8, &[2, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xfe]);
    v.append(&mut pad.clone());
    assert!(err(&v).contains("UTF-8"));

    // Nested arrays deeper than the limit.
    let mut v = header(3, 0, 1);
    let mut nested = Vec::new();
    for _ in 0..8 {
        nested.extend_from_slice(&9u32.to_le_bytes());
        nested.extend_from_slice(&1u64.to_le_bytes());
    }
    kv(&mut v, "deep", 9, &nested);
    v.append(&mut pad.clone());
    assert!(err(&v).contains("nested"), "{}", err(&v));

    // A tensor of rank 5, a misaligned offset, one past the end of the file.
    let tensor = |rank: u32, dims: &[u64], ty: u32, offset: u64| {
        let mut v = header(3, 1, 0);
        v.extend_from_slice(&1u64.to_le_bytes());
        v.push(b't');
        v.extend_from_slice(&rank.to_le_bytes());
        for d in dims {
            v.extend_from_slice(&d.to_le_bytes());
        }
        v.extend_from_slice(&ty.to_le_bytes());
        v.extend_from_slice(&offset.to_le_bytes());
        v.append(&mut pad.clone());
        v
    };
    assert!(err(&tensor(5, &[1, 1, 1, 1, 1], 0, 0)).contains("rank 5"));
    assert!(err(&tensor(1, &[4], 0, 3)).contains("not aligned"));
    assert!(err(&tensor(1, &[1 << 20], 0, 0)).contains("truncated"));
    assert!(err(&tensor(2, &[u64::MAX, 4], 0, 0)).contains("overflow"));
    assert!(err(&tensor(1, &[33], 8, 0)).contains("block size"));
    pad.clear();
}

#[test]
fn unsupported_tensor_type_is_listed_but_not_loadable() {
    let mut v = header(3, 1, 0);
    v.extend_from_slice(&1u64.to_le_bytes());
    v.push(b't');
    v.extend_from_slice(&1u32.to_le_bytes());
    v.extend_from_slice(&256u64.to_le_bytes());
    v.extend_from_slice(&16u32.to_le_bytes()); // IQ2_XXS
    v.extend_from_slice(&0u64.to_le_bytes());
    v.resize(64, 0);
    let path = temp_file("iq2.gguf", &v);
    let f = GgufFile::open(&path).unwrap();
    let e = f.qtensor("t", &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("type16") && e.contains("cannot compute"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random byte flips and truncations of a valid file never panic.
    #[test]
    fn mutated_headers_never_panic(flips in proptest::collection::vec((0usize..2048, any::<u8>()), 1..8), cut in 0usize..4096) {
        let mut bytes = build().bytes;
        for (pos, val) in flips {
            let n = bytes.len();
            bytes[pos % n] = val;
        }
        bytes.truncate(cut.max(4).min(bytes.len()));
        let _ = GgufHeader::parse(&bytes);
    }
}

#[test]
fn q5_0_repacks_to_q8_0_exactly() {
    use attn_models::gguf::repack_q5_0_as_q8_0;
    use candle_core::quantized::ggml_file::qtensor_from_ggml;
    let x = Tensor::randn(0f32, 1.0, (8, 256), &Device::Cpu).unwrap();
    let q5 = QTensor::quantize(&x, GgmlDType::Q5_0).unwrap();
    let bytes = q5.data().unwrap().to_vec();
    let q8 = qtensor_from_ggml(GgmlDType::Q8_0, &repack_q5_0_as_q8_0(&bytes), vec![8, 256], &Device::Cpu).unwrap();
    let a = q5.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = q8.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a, b);
    // And the values really are 5-bit: at most 32 distinct levels per block.
    let mut levels: Vec<i32> = b[..32].iter().map(|v| (v * 1e4) as i32).collect();
    levels.sort();
    levels.dedup();
    assert!(levels.len() <= 32 && levels.len() > 8);
}
