//! Token embeddings, absolute positional encodings (sinusoidal, learned) and
//! rotary embeddings, against nested-loop references.

#![allow(clippy::needless_range_loop)] // the references index on purpose

use attn_nn::{
    positions, Error, LearnedPositionalEmbedding, RopeLayout, RotaryEmbedding, SinusoidalPositionalEncoding,
    TokenEmbedding,
};
use attn_test_support::diff::*;
use attn_test_support::reference::*;
use candle_core::{DType, Device};

const TOL: f32 = 1e-5;

fn embedding_ref(table: &[f32], d: usize, ids: &[u32], scale: f32) -> Vec<f32> {
    let mut out = Vec::new();
    for &id in ids {
        for c in 0..d {
            out.push(table[id as usize * d + c] * scale);
        }
    }
    out
}

#[test]
fn token_embedding_looks_up_rows() {
    let mut r = rng(1);
    let (vocab, d) = (11, 6);
    let table = rand_vec(&mut r, vocab * d, 1.0);
    let ids = [3u32, 0, 10, 3, 7, 1];
    let emb = TokenEmbedding::new(tensor(&table, &[vocab, d]), false).unwrap();
    assert_eq!(emb.vocab_size(), vocab);
    let y = emb.forward(&u32_tensor(&ids, &[2, 3])).unwrap();
    assert_tensor_close(&y, &embedding_ref(&table, d, &ids, 1.0), &[2, 3, d], 0.0, "embedding");
}

#[test]
fn token_embedding_scaled_by_sqrt_d() {
    let mut r = rng(2);
    let (vocab, d) = (9, 16);
    let table = rand_vec(&mut r, vocab * d, 1.0);
    let ids = [8u32, 2, 5];
    let emb = TokenEmbedding::new(tensor(&table, &[vocab, d]), true).unwrap();
    let y = emb.forward(&u32_tensor(&ids, &[3])).unwrap();
    assert_tensor_close(&y, &embedding_ref(&table, d, &ids, 4.0), &[3, d], TOL, "scaled embedding");
}

#[test]
fn token_embedding_out_of_range_is_an_error() {
    let emb = TokenEmbedding::new(tensor(&[0.0; 12], &[4, 3]), false).unwrap();
    let err = emb.forward(&u32_tensor(&[1, 4], &[2])).unwrap_err();
    assert!(matches!(err, Error::Input { .. }), "got {err:?}");
    assert!(emb.forward(&u32_tensor(&[3], &[1])).is_ok());
}

#[test]
fn sinusoidal_matches_the_2017_formula() {
    let (max_len, d) = (50, 10);
    let pe = SinusoidalPositionalEncoding::new(max_len, d, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(pe.max_len(), max_len);
    let pos: Vec<u32> = (0..max_len as u32).collect();
    let got = pe.forward(&u32_tensor(&pos, &[max_len])).unwrap();
    let mut want = vec![0f32; max_len * d];
    for p in 0..max_len {
        for c in 0..d {
            // Column c belongs to the pair i = c / 2; even columns sin, odd cos.
            let i = c / 2;
            let angle = p as f64 / 10000f64.powf((2 * i) as f64 / d as f64);
            want[p * d + c] = if c % 2 == 0 { angle.sin() } else { angle.cos() } as f32;
        }
    }
    assert_tensor_close(&got, &want, &[max_len, d], 1e-6, "sinusoidal");
    // Spot values: pe[0] = (0, 1, 0, 1, ...), pe[1, 0] = sin(1).
    let v = to_vec(&got);
    assert_eq!(&v[..4], &[0.0, 1.0, 0.0, 1.0]);
    assert!((v[d] - 1f32.sin()).abs() < 1e-7);
    // Any shape of positions, and an error past the table.
    let y = pe.forward(&u32_tensor(&[3, 1, 4, 1], &[2, 2])).unwrap();
    assert_eq!(y.dims(), &[2, 2, d]);
    assert_close(&to_vec(&y)[..d], &want[3 * d..4 * d], 0.0, "sinusoidal [2,2]");
    assert!(pe.forward(&u32_tensor(&[max_len as u32], &[1])).is_err());
}

#[test]
fn sinusoidal_odd_d_model_is_a_config_error() {
    let err = SinusoidalPositionalEncoding::new(8, 7, DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(&err, Error::Config { field, .. } if field == "d_model"), "got {err:?}");
}

#[test]
fn learned_positions_look_up_rows() {
    let mut r = rng(3);
    let (max_len, d) = (7, 5);
    let table = rand_vec(&mut r, max_len * d, 1.0);
    let pe = LearnedPositionalEmbedding::new(tensor(&table, &[max_len, d])).unwrap();
    assert_eq!(pe.max_len(), max_len);
    let pos = [0u32, 1, 2, 6, 5, 4];
    let y = pe.forward(&u32_tensor(&pos, &[2, 3])).unwrap();
    assert_tensor_close(&y, &embedding_ref(&table, d, &pos, 1.0), &[2, 3, d], 0.0, "learned positions");
    assert!(matches!(pe.forward(&u32_tensor(&[7], &[1])), Err(Error::Input { .. })));
    assert!(LearnedPositionalEmbedding::new(tensor(&table, &[max_len * d])).is_err());
}

#[test]
fn positions_helper() {
    let p = positions(2, 3, 5, &Device::Cpu).unwrap();
    assert_eq!(p.dims(), &[2, 3]);
    assert_eq!(p.to_vec2::<u32>().unwrap(), vec![vec![5, 6, 7], vec![5, 6, 7]]);
}

/// Checks `RotaryEmbedding::forward` on `[b, h, t, d]` input against
/// [`rope_ref`] with per-row positions.
fn check_rope(layout: RopeLayout, base: f64, seed: u64) {
    let mut r = rng(seed);
    let (b, h, t, d) = (2, 3, 4, 8);
    let max_pos = 40;
    let rope = RotaryEmbedding::new(base, d, max_pos, layout, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(rope.max_positions(), max_pos);
    assert_eq!(rope.layout(), layout);
    let x = rand_vec(&mut r, b * h * t * d, 1.0);
    // Each batch row sits at its own, non-contiguous positions.
    let pos: [[u32; 4]; 2] = [[0, 1, 2, 3], [17, 18, 30, 39]];
    let pos_flat: Vec<u32> = pos.iter().flatten().copied().collect();
    let got = rope.forward(&tensor(&x, &[b, h, t, d]), &u32_tensor(&pos_flat, &[b, t])).unwrap();
    let mut want = vec![0f32; x.len()];
    for bi in 0..b {
        for hi in 0..h {
            for ti in 0..t {
                let off = ((bi * h + hi) * t + ti) * d;
                let rot = rope_ref(&x[off..off + d], pos[bi][ti] as usize, base, layout == RopeLayout::Interleaved);
                want[off..off + d].copy_from_slice(&rot);
            }
        }
    }
    assert_tensor_close(&got, &want, &[b, h, t, d], TOL, &format!("rope {layout:?} base {base}"));
}

#[test]
fn rope_interleaved_matches_reference() {
    check_rope(RopeLayout::Interleaved, 10000.0, 10);
    check_rope(RopeLayout::Interleaved, 100.0, 11);
}

#[test]
fn rope_halves_matches_reference() {
    check_rope(RopeLayout::Halves, 10000.0, 12);
    check_rope(RopeLayout::Halves, 500.0, 13);
}

#[test]
fn rope_layouts_differ_and_position_zero_is_identity() {
    let mut r = rng(14);
    let (h, t, d) = (1, 2, 6);
    let x = rand_vec(&mut r, h * t * d, 1.0);
    let xt = tensor(&x, &[1, h, t, d]);
    let inter = RotaryEmbedding::new(10.0, d, 8, RopeLayout::Interleaved, DType::F32, &Device::Cpu).unwrap();
    let halves = RotaryEmbedding::new(10.0, d, 8, RopeLayout::Halves, DType::F32, &Device::Cpu).unwrap();
    let zero = u32_tensor(&[0, 0], &[1, t]);
    assert_close(&to_vec(&inter.forward(&xt, &zero).unwrap()), &x, 1e-7, "interleaved at 0");
    assert_close(&to_vec(&halves.forward(&xt, &zero).unwrap()), &x, 1e-7, "halves at 0");
    let pos = u32_tensor(&[1, 5], &[1, t]);
    let a = to_vec(&inter.forward(&xt, &pos).unwrap());
    let b = to_vec(&halves.forward(&xt, &pos).unwrap());
    assert!(max_abs_diff(&a, &b) > 1e-2, "layouts should rotate different pairs");
}

#[test]
fn rope_linear_scaling_divides_positions() {
    let mut r = rng(15);
    let (b, h, t, d) = (1, 2, 3, 8);
    let scale = 4.0;
    let x = rand_vec(&mut r, b * h * t * d, 1.0);
    let pos = [0u32, 5, 30];
    for layout in [RopeLayout::Halves, RopeLayout::Interleaved] {
        let rope = RotaryEmbedding::new_scaled(10000.0, scale, d, 32, layout, DType::F32, &Device::Cpu).unwrap();
        let got = rope.forward(&tensor(&x, &[b, h, t, d]), &u32_tensor(&pos, &[b, t])).unwrap();
        let mut want = vec![0f32; x.len()];
        for hi in 0..h {
            for ti in 0..t {
                let off = (hi * t + ti) * d;
                let p = pos[ti] as f64 / scale;
                let rot = rope_ref_at(&x[off..off + d], p, 10000.0, layout == RopeLayout::Interleaved);
                want[off..off + d].copy_from_slice(&rot);
            }
        }
        assert_tensor_close(&got, &want, &[b, h, t, d], TOL, &format!("scaled rope {layout:?}"));
    }
    for bad in [0.0, -2.0, f64::NAN] {
        let e = RotaryEmbedding::new_scaled(10000.0, bad, d, 8, RopeLayout::Halves, DType::F32, &Device::Cpu);
        assert!(matches!(e, Err(Error::Config { .. })), "scale {bad}");
    }
}

#[test]
fn rope_errors() {
    let rope = RotaryEmbedding::new(10000.0, 4, 5, RopeLayout::Halves, DType::F32, &Device::Cpu).unwrap();
    let x = tensor(&[0.5; 2 * 4], &[1, 1, 2, 4]);
    // Position 5 is beyond a 5-position table.
    let err = rope.forward(&x, &u32_tensor(&[4, 5], &[1, 2])).unwrap_err();
    assert!(matches!(err, Error::Input { .. }), "got {err:?}");
    assert!(rope.forward(&x, &u32_tensor(&[3, 4], &[1, 2])).is_ok());
    // Positions of the wrong shape, wrong head dim.
    assert!(rope.forward(&x, &u32_tensor(&[0, 1], &[2, 1])).is_err());
    assert!(rope.forward(&tensor(&[0.5; 6], &[1, 1, 1, 6]), &u32_tensor(&[0], &[1, 1])).is_err());
    // Config errors.
    for (base, d) in [(10000.0, 5), (10000.0, 0), (0.0, 4), (-1.0, 4), (f64::NAN, 4)] {
        let err = RotaryEmbedding::new(base, d, 4, RopeLayout::Interleaved, DType::F32, &Device::Cpu).unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "base {base} d {d}: got {err:?}");
    }
}
