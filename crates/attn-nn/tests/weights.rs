//! Loading weights: names, shapes and malformed files give errors that name
//! what was wrong.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use attn_nn::{Error, Linear, ParamStore, SafetensorsSource, Weights};
use attn_test_support::diff::*;
use attn_test_support::reference::*;
use attn_test_support::tempdir;
use candle_core::{DType, Device, Tensor};

/// Writes a small valid safetensors file and returns its path and bytes.
fn write_valid(dir: &std::path::Path) -> (PathBuf, Vec<u8>) {
    let mut tensors = HashMap::new();
    tensors.insert("layer.weight".to_string(), tensor(&[1., 2., 3., 4., 5., 6.], &[2, 3]));
    tensors.insert("layer.bias".to_string(), tensor(&[0.5, -0.5], &[2]));
    tensors.insert("ids".to_string(), Tensor::new(&[7i64, 8], &Device::Cpu).unwrap());
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    (path, bytes)
}

#[test]
fn loads_named_tensors_with_prefixes() {
    let dir = tempdir("nn-load");
    let (path, _) = write_valid(&dir);
    let w = Weights::from_safetensors(&[&path], DType::F32, &Device::Cpu).unwrap();
    let lin = Linear::load(&w.pp("layer"), 3, 2, true).unwrap();
    let y = lin.forward(&tensor(&[1., 0., -1.], &[1, 3])).unwrap();
    // [1 2 3] . [1 0 -1] + 0.5 = -1.5; [4 5 6] . [1 0 -1] - 0.5 = -2.5
    assert_eq!(to_vec(&y), vec![-1.5, -2.5]);
    assert!(w.contains("layer.bias") && w.pp("layer").contains("weight") && !w.contains("weight"));
    // Integer tensors convert to the requested dtype.
    assert_eq!(to_vec(&w.get(&[2], "ids").unwrap()), vec![7.0, 8.0]);
    let src = SafetensorsSource::open(&[&path]).unwrap();
    let mut names: Vec<&String> = src.names().collect();
    names.sort();
    assert_eq!(names, vec!["ids", "layer.bias", "layer.weight"]);
    assert_eq!(src.load_raw("ids", &Device::Cpu).unwrap().dtype(), DType::I64);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempdir("nn-missing");
    let (path, _) = write_valid(&dir);
    let w = Weights::from_safetensors(&[&path], DType::F32, &Device::Cpu).unwrap();
    match w.pp("layer").pp("proj").get(&[2, 3], "weight") {
        Err(Error::MissingTensor { name }) => assert_eq!(name, "layer.proj.weight"),
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    // A prefix that is a tensor, not a folder of tensors.
    match Linear::load(&w.pp("ids"), 3, 2, true) {
        Err(Error::MissingTensor { name }) => assert_eq!(name, "ids.weight"),
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    let src = SafetensorsSource::open(&[&path]).unwrap();
    assert!(matches!(src.load_raw("nope", &Device::Cpu), Err(Error::MissingTensor { name }) if name == "nope"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn wrong_shape_is_named() {
    let dir = tempdir("nn-shape");
    let (path, _) = write_valid(&dir);
    let w = Weights::from_safetensors(&[&path], DType::F32, &Device::Cpu).unwrap();
    match Linear::load(&w.pp("layer"), 2, 3, true) {
        Err(Error::TensorShape { name, expected, got }) => {
            assert_eq!(name, "layer.weight");
            assert_eq!(expected, vec![3, 2]);
            assert_eq!(got, vec![2, 3]);
        }
        other => panic!("expected TensorShape, got {other:?}"),
    }
    let e = w.get(&[2, 1], "layer.bias").unwrap_err();
    assert!(matches!(&e, Error::TensorShape { name, .. } if name == "layer.bias"), "{e:?}");
    assert!(e.to_string().contains("layer.bias"));
    // A trainable store holds a parameter at its first shape.
    let store = ParamStore::new();
    let ws = Weights::new(Arc::new(store), DType::F32, &Device::Cpu);
    ws.get(&[4], "p").unwrap();
    assert!(matches!(ws.get(&[5], "p"), Err(Error::TensorShape { name, .. }) if name == "p"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn corrupt_files_are_format_errors() {
    let dir = tempdir("nn-corrupt");
    let (_, bytes) = write_valid(&dir);
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("short header length", bytes[..5].to_vec()),
        ("truncated header", bytes[..8 + header_len / 2].to_vec()),
        ("truncated data", bytes[..bytes.len() - 4].to_vec()),
        ("garbage", (0..200u8).map(|i| i.wrapping_mul(37)).collect()),
    ];
    let mut huge = bytes.clone();
    huge[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    cases.push(("huge header length", huge));
    let mut bad_json = bytes.clone();
    bad_json[8] = b'!';
    cases.push(("bad json", bad_json));
    for (what, content) in cases {
        let path = dir.join(format!("{}.safetensors", what.replace(' ', "_")));
        std::fs::write(&path, &content).unwrap();
        match SafetensorsSource::open(&[&path]) {
            Err(Error::Format { path: p, .. }) => assert_eq!(p, path, "{what}"),
            Err(other) => panic!("{what}: expected a format error, got {other:?}"),
            Ok(_) => panic!("{what}: a corrupt file was accepted"),
        }
        assert!(matches!(Weights::from_safetensors(&[&path], DType::F32, &Device::Cpu), Err(Error::Format { .. })));
    }
    // A missing file is an I/O error naming it.
    let missing = dir.join("does-not-exist.safetensors");
    assert!(matches!(SafetensorsSource::open(&[&missing]), Err(Error::Io { path, .. }) if path == missing));
    let _ = std::fs::remove_dir_all(&dir);
}
