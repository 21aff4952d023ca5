//! The fused training ops of `attn_nn::grad_ops` against the same maths
//! written with candle's differentiable tensor ops: forward values and the
//! gradients of every input agree, over shapes that cross the ops' chunk
//! boundaries.

use attn_nn::grad_ops;
use attn_nn::{scaled_dot_product_attention, Dropout, SdpaOptions};
use attn_test_support::to_vec;
use candle_core::{DType, Device, Tensor, Var, D};

fn rand(shape: &[usize], seed: u64) -> Tensor {
    attn_nn::rng::seed(seed);
    let n = shape.iter().product();
    Tensor::from_vec(attn_nn::rng::normal(n, 0.0, 1.0), shape, &Device::Cpu).unwrap()
}

fn var(shape: &[usize], seed: u64) -> Var {
    Var::from_tensor(&rand(shape, seed)).unwrap()
}

fn assert_close(name: &str, got: &Tensor, want: &Tensor, tol: f32) {
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    let (g, w) = (to_vec(got), to_vec(want));
    let scale = w.iter().fold(1f32, |m, x| m.max(x.abs()));
    let worst = g.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst <= tol * scale, "{name}: max abs diff {worst} (scale {scale})");
}

/// Runs `f` on the inputs twice, fused and composed, and compares the
/// outputs and the gradients of `sum(out * r)` for a fixed random `r`.
fn check(name: &str, inputs: &[Var], fused: impl Fn(&[Tensor]) -> Tensor, composed: impl Fn(&[Tensor]) -> Tensor) {
    let xs: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
    let (a, b) = (fused(&xs), composed(&xs));
    assert_close(&format!("{name} forward"), &a, &b, 2e-5);
    let r = rand(a.dims(), 99);
    let ga = (&a * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let gb = (&b * &r).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, v) in inputs.iter().enumerate() {
        let want = gb.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: composed gives no gradient for input {i}"));
        let got = ga.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: fused gives no gradient for input {i}"));
        assert_close(&format!("{name} gradient of input {i}"), got, want, 2e-5);
    }
}

#[test]
fn layer_norm_matches_composition() {
    for rows in [1, 5, 70] {
        let vars = [var(&[rows, 3, 24], 1), var(&[24], 2), var(&[24], 3)];
        check(
            "layer norm",
            &vars,
            |x| grad_ops::layer_norm(&x[0], &x[1], Some(&x[2]), 1e-5).unwrap(),
            |x| {
                let mean = x[0].mean_keepdim(D::Minus1).unwrap();
                let xc = x[0].broadcast_sub(&mean).unwrap();
                let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
                let xn = xc.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap()).unwrap();
                xn.broadcast_mul(&x[1]).unwrap().broadcast_add(&x[2]).unwrap()
            },
        );
    }
}

#[test]
fn rms_norm_matches_composition() {
    for rows in [1, 5, 70] {
        let vars = [var(&[rows, 3, 24], 4), var(&[24], 5)];
        check(
            "rms norm",
            &vars,
            |x| grad_ops::rms_norm(&x[0], &x[1], 1e-6).unwrap(),
            |x| {
                let ms = x[0].sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
                let xn = x[0].broadcast_div(&(ms + 1e-6).unwrap().sqrt().unwrap()).unwrap();
                xn.broadcast_mul(&x[1]).unwrap()
            },
        );
    }
    // The module (the fused path for f32) keeps Gemma's `1 + w`, and the
    // weight's gradient flows through it.
    for add_one in [false, true] {
        let vars = [var(&[4, 16], 6), var(&[16], 7)];
        check(
            "RmsNorm module",
            &vars,
            |x| attn_nn::RmsNorm::new(x[1].clone(), 1e-6, add_one).forward(&x[0]).unwrap(),
            |x| {
                let scale = if add_one { (&x[1] + 1.0).unwrap() } else { x[1].clone() };
                let ms = x[0].sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
                x[0].broadcast_div(&(ms + 1e-6).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(&scale).unwrap()
            },
        );
    }
}

#[test]
fn rope_matches_composition() {
    use attn_nn::{RopeLayout, RotaryEmbedding};
    let (b, h, t, d) = (2, 3, 5, 8);
    let half = d / 2;
    // Positions that differ per row, as in a batch with offsets.
    let pos: Vec<u32> = (0..b * t).map(|i| (i * 3 % 11) as u32).collect();
    let positions = Tensor::from_vec(pos.clone(), (b, t), &Device::Cpu).unwrap();
    let angles = |p: u32, i: usize| p as f32 / 10000f32.powf((2 * i) as f32 / d as f32);
    let table = |f: fn(f32) -> f32| {
        let v: Vec<f32> = pos.iter().flat_map(|&p| (0..half).map(move |i| f(angles(p, i)))).collect();
        Tensor::from_vec(v, (b, 1, t, half), &Device::Cpu).unwrap()
    };
    let (cos, sin) = (table(f32::cos), table(f32::sin));
    for layout in [RopeLayout::Halves, RopeLayout::Interleaved] {
        let rot = RotaryEmbedding::new(10000.0, d, 16, layout, DType::F32, &Device::Cpu).unwrap();
        // No positions: an empty result, not an error.
        let empty = Tensor::zeros((b, h, 0, d), DType::F32, &Device::Cpu).unwrap();
        let none = Tensor::zeros((b, 0), DType::U32, &Device::Cpu).unwrap();
        assert_eq!(rot.forward(&empty, &none).unwrap().dims(), [b, h, 0, d]);
        let vars = [var(&[b, h, t, d], 8)];
        check(
            "rope",
            &vars,
            |x| rot.forward(&x[0], &positions).unwrap(),
            |x| {
                // The rotation written with tensor ops on the two halves of each pair.
                let (x1, x2) = match layout {
                    RopeLayout::Halves => (x[0].narrow(3, 0, half).unwrap(), x[0].narrow(3, half, half).unwrap()),
                    RopeLayout::Interleaved => {
                        let p = x[0].reshape((b, h, t, half, 2)).unwrap();
                        (p.narrow(4, 0, 1).unwrap().squeeze(4).unwrap(), p.narrow(4, 1, 1).unwrap().squeeze(4).unwrap())
                    }
                };
                let r1 = (x1.broadcast_mul(&cos).unwrap() - x2.broadcast_mul(&sin).unwrap()).unwrap();
                let r2 = (x1.broadcast_mul(&sin).unwrap() + x2.broadcast_mul(&cos).unwrap()).unwrap();
                match layout {
                    RopeLayout::Halves => Tensor::cat(&[r1, r2], 3).unwrap(),
                    RopeLayout::Interleaved => Tensor::stack(&[r1, r2], 4).unwrap().reshape((b, h, t, d)).unwrap(),
                }
            },
        );
    }
}

#[test]
fn linear_and_bias_add_match_composition() {
    for rows in [1, 7, 65] {
        let vars = [var(&[rows, 2, 20], 4), var(&[12, 20], 5), var(&[12], 6)];
        let composed = |x: &[Tensor]| x[0].broadcast_matmul(&x[1].t().unwrap()).unwrap().broadcast_add(&x[2]).unwrap();
        check("linear with bias", &vars, |x| grad_ops::linear(&x[0], &x[1], Some(&x[2])).unwrap(), composed);
        check(
            "linear without bias",
            &vars[..2],
            |x| grad_ops::linear(&x[0], &x[1], None).unwrap(),
            |x| x[0].broadcast_matmul(&x[1].t().unwrap()).unwrap(),
        );
        check(
            "bias add",
            &[vars[0].clone(), var(&[20], 7)],
            |x| grad_ops::bias_add(&x[0], &x[1]).unwrap(),
            |x| x[0].broadcast_add(&x[1]).unwrap(),
        );
    }
    // Shape errors are errors, not panics.
    let x = rand(&[3, 5], 1);
    assert!(grad_ops::linear(&x, &rand(&[4, 6], 2), None).is_err());
    assert!(grad_ops::linear(&x, &rand(&[4, 5], 2), Some(&rand(&[3], 3))).is_err());
    assert!(grad_ops::bias_add(&x, &rand(&[4], 3)).is_err());
}

#[test]
fn softmax_matches_composition() {
    let vars = [var(&[9, 4, 37], 8)];
    check(
        "softmax",
        &vars,
        |x| grad_ops::softmax_last_dim(&x[0]).unwrap(),
        |x| candle_nn::ops::softmax(&x[0], D::Minus1).unwrap(),
    );
}

#[test]
fn cross_entropy_matches_composition() {
    let (n, v) = (70, 33);
    let targets: Vec<Option<u32>> = (0..n).map(|i| if i % 9 == 4 { None } else { Some((i * 7 % v) as u32) }).collect();
    for smoothing in [0.0, 0.1] {
        let vars = [var(&[n, v], 9)];
        let t2 = targets.clone();
        check(
            "cross entropy",
            &vars,
            move |x| grad_ops::cross_entropy_rows(&x[0], t2.clone(), smoothing).unwrap(),
            |x| {
                let logp = candle_nn::ops::log_softmax(&x[0], D::Minus1).unwrap();
                let safe: Vec<u32> = targets.iter().map(|t| t.unwrap_or(0)).collect();
                let keep: Vec<f32> = targets.iter().map(|t| if t.is_some() { 1.0 } else { 0.0 }).collect();
                let ids = Tensor::from_vec(safe, (n, 1), &Device::Cpu).unwrap();
                let nll = logp.gather(&ids, 1).unwrap().squeeze(1).unwrap().neg().unwrap();
                let smooth = logp.mean(D::Minus1).unwrap().neg().unwrap();
                let per = ((nll * (1.0 - smoothing)).unwrap() + (smooth * smoothing).unwrap()).unwrap();
                (per * Tensor::from_vec(keep, n, &Device::Cpu).unwrap()).unwrap()
            },
        );
    }
    // The side results: unsmoothed loss and arg-max per row.
    let logits = rand(&[n, v], 10);
    let (_, stats) = grad_ops::cross_entropy_rows_with_stats(&logits, targets.clone(), 0.1).unwrap();
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap().to_vec2::<f32>().unwrap();
    let argmax = logits.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap();
    for i in 0..n {
        let want = targets[i].map_or(0.0, |t| -logp[i][t as usize]);
        assert!((stats.nll[i] - want).abs() < 1e-5, "row {i}: nll {} vs {want}", stats.nll[i]);
    }
    assert_eq!(stats.argmax, argmax);
    assert!(grad_ops::cross_entropy_rows(&logits, vec![Some(v as u32); n], 0.0).is_err());
    assert!(grad_ops::cross_entropy_rows(&logits, vec![Some(0); n - 1], 0.0).is_err());
}

#[test]
fn attention_matches_composition() {
    let (b, h, hkv, tq, tk, d) = (3, 4, 2, 5, 7, 8);
    // Padding of the keys per batch row and a causal-style band.
    let mut m = vec![0f32; b * tq * tk];
    for bi in 0..b {
        for i in 0..tq {
            for j in 0..tk {
                if j >= tk - bi || j > i + 2 {
                    m[(bi * tq + i) * tk + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    let mask = Tensor::from_vec(m, (b, 1, tq, tk), &Device::Cpu).unwrap();
    let opts = SdpaOptions { scale: 0.3, softcap: None };
    for p in [0.0f32, 0.25] {
        let vars = [var(&[b, h, tq, d], 11), var(&[b, hkv, tk, d], 12), var(&[b, hkv, tk, d], 13)];
        let mask2 = mask.clone();
        check(
            "attention",
            &vars,
            move |x| {
                attn_nn::rng::seed(5);
                grad_ops::attention(&x[0], &x[1], &x[2], Some(&mask2), 0.3, p).unwrap()
            },
            |x| {
                // The composed path draws the same dropout stream.
                attn_nn::rng::seed(5);
                let drop = Dropout::new(p).unwrap();
                let out =
                    scaled_dot_product_attention(&x[0], &x[1], &x[2], Some(&mask), opts, Some((&drop, true))).unwrap();
                out.transpose(1, 2).unwrap().reshape((b, tq, h * d)).unwrap()
            },
        );
    }
}

#[test]
fn dropout_mask_is_its_own_backward() {
    let vars = [var(&[6, 50], 14)];
    let mask: Vec<f32> = (0..300).map(|i| if i % 3 == 0 { 0.0 } else { 1.5 }).collect();
    let m2 = mask.clone();
    check(
        "dropout",
        &vars,
        move |x| grad_ops::mask_mul(&x[0], m2.clone()).unwrap(),
        |x| (&x[0] * Tensor::from_vec(mask.clone(), (6, 50), &Device::Cpu).unwrap()).unwrap(),
    );
}

#[test]
fn activations_match_candle() {
    use attn_nn::Activation::*;
    for act in [Relu, GeluErf, GeluTanh, Silu] {
        let vars = [var(&[5, 300], 15)];
        check(
            &format!("{act:?}"),
            &vars,
            |x| grad_ops::activation(&x[0], act).unwrap(),
            |x| match act {
                Relu => x[0].relu().unwrap(),
                GeluErf => x[0].gelu_erf().unwrap(),
                GeluTanh => x[0].gelu().unwrap(),
                Silu => x[0].silu().unwrap(),
            },
        );
    }
}
