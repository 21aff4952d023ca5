//! Norms, residual wirings, feed-forward networks, mixture of experts,
//! dropout, the output head and the cross-entropy loss, against nested-loop
//! references.

use attn_nn::moe::{expert_utilisation, top_k_indices};
use attn_nn::{
    cross_entropy, load_balancing_loss, Activation, Dropout, Error, FeedForward, FfnKind, LayerNorm, Linear,
    MoeFeedForward, Norm, OutputHead, Residual, RmsNorm,
};
use attn_test_support::diff::*;
use attn_test_support::reference::*;
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;

const TOL: f32 = 1e-5;

// ------------------------------------------------------------------ norms

#[test]
fn layer_norm_matches_reference() {
    let mut r = rng(100);
    let (rows, dim) = (6, 10);
    // Rows with an offset, so that mean subtraction matters.
    let x: Vec<f32> = rand_vec(&mut r, rows * dim, 2.0).iter().map(|v| v + 3.0).collect();
    let w = rand_vec(&mut r, dim, 1.0);
    let b = rand_vec(&mut r, dim, 1.0);
    for (bias, eps) in [(true, 1e-5), (false, 1e-5), (true, 0.5)] {
        let ln = LayerNorm::new(tensor(&w, &[dim]), bias.then(|| tensor(&b, &[dim])), eps);
        let got = ln.forward(&tensor(&x, &[2, 3, dim])).unwrap();
        let want = layer_norm_ref(&x, &w, bias.then_some(&b[..]), dim, eps);
        assert_tensor_close(&got, &want, &[2, 3, dim], TOL, &format!("layer norm bias {bias} eps {eps}"));
    }
}

#[test]
fn rms_norm_matches_reference() {
    let mut r = rng(101);
    let (rows, dim) = (5, 8);
    let x = rand_vec(&mut r, rows * dim, 2.0);
    let w = rand_vec(&mut r, dim, 1.0);
    for add_one in [false, true] {
        for eps in [1e-6, 0.3] {
            let n = RmsNorm::new(tensor(&w, &[dim]), eps, add_one);
            let got = n.forward(&tensor(&x, &[rows, dim])).unwrap();
            let want = rms_norm_ref(&x, &w, dim, eps, add_one);
            assert_tensor_close(&got, &want, &[rows, dim], TOL, &format!("rms norm add_one {add_one} eps {eps}"));
        }
    }
    // add_one really adds one: zero weight is the identity scale.
    let n = RmsNorm::new(tensor(&[0.0; 8], &[8]), 0.0, true);
    let got = to_vec(&n.forward(&tensor(&x[..8], &[1, 8])).unwrap());
    let want = rms_norm_ref(&x[..8], &[1.0; 8], 8, 0.0, false);
    assert_close(&got, &want, TOL, "rms norm add_one with zero weight");
}

#[test]
fn residual_wirings_match_hand_computation() {
    let mut r = rng(102);
    let (rows, dim) = (4, 6);
    let x = rand_vec(&mut r, rows * dim, 1.5);
    let w1 = rand_vec(&mut r, dim, 1.0);
    let b1 = rand_vec(&mut r, dim, 1.0);
    let w2 = rand_vec(&mut r, dim, 1.0);
    let f = rand_linear(&mut r, dim, dim, true);
    let ln = || Norm::Layer(LayerNorm::new(tensor(&w1, &[dim]), Some(tensor(&b1, &[dim])), 1e-5));
    let rms = || Norm::Rms(RmsNorm::new(tensor(&w2, &[dim]), 1e-6, false));
    let ln_ref = |v: &[f32]| layer_norm_ref(v, &w1, Some(&b1), dim, 1e-5);
    let rms_ref = |v: &[f32]| rms_norm_ref(v, &w2, dim, 1e-6, false);
    let add = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(p, q)| p + q).collect::<Vec<f32>>();
    let xt = tensor(&x, &[rows, dim]);
    let sub = |t: &Tensor| f.layer.forward(t);

    // Post: norm(x + f(x)).
    let got = Residual::Post(ln()).forward(&xt, sub).unwrap();
    assert_tensor_close(&got, &ln_ref(&add(&x, &f.apply(&x))), &[rows, dim], TOL, "post-norm");
    // Pre: x + f(norm(x)).
    let got = Residual::Pre(rms()).forward(&xt, sub).unwrap();
    assert_tensor_close(&got, &add(&x, &f.apply(&rms_ref(&x))), &[rows, dim], TOL, "pre-norm");
    // Sandwich: x + post(f(pre(x))).
    let got = Residual::Sandwich { pre: ln(), post: rms() }.forward(&xt, sub).unwrap();
    let want = add(&x, &rms_ref(&f.apply(&ln_ref(&x))));
    assert_tensor_close(&got, &want, &[rows, dim], TOL, "sandwich norm");
    // An error of the sublayer propagates.
    let failing = |_: &Tensor| -> attn_nn::Result<Tensor> { Err(Error::Unsupported("x".into())) };
    assert!(Residual::Pre(rms()).forward(&xt, failing).is_err());
}

// ------------------------------------------------------------ feed-forward

fn act_ref(a: Activation) -> fn(f64) -> f64 {
    match a {
        Activation::Relu => relu_ref,
        Activation::GeluErf => gelu_erf_ref,
        Activation::GeluTanh => gelu_tanh_ref,
        Activation::Silu => silu_ref,
    }
}

#[test]
fn erf_reference_is_accurate() {
    // Known values of erf (Abramowitz & Stegun table 7.1).
    for (x, want) in [(0.0, 0.0), (0.5, 0.520_499_877_8), (1.0, 0.842_700_792_9), (2.0, 0.995_322_265_0)] {
        assert!((erf(x) - want).abs() < 1e-9, "erf({x}) = {}", erf(x));
        assert!((erf(-x) + want).abs() < 1e-9);
    }
    assert!((erf(3.5) - 0.999_999_256_9).abs() < 1e-9);
}

#[test]
fn activations_match_formulas() {
    let xs: Vec<f32> = (0..=160).map(|i| -4.0 + i as f32 * 0.05).collect();
    for a in [Activation::Relu, Activation::GeluErf, Activation::GeluTanh, Activation::Silu] {
        let got = to_vec(&a.forward(&tensor(&xs, &[xs.len()])).unwrap());
        let want: Vec<f32> = xs.iter().map(|&v| act_ref(a)(v as f64) as f32).collect();
        assert_close(&got, &want, 2e-6, &format!("{a:?}"));
    }
    // The two GELUs differ measurably, so each test above pins its own formula.
    let (e, t) = (gelu_erf_ref(-2.5), gelu_tanh_ref(-2.5));
    assert!((e - t).abs() > 1e-4);
    assert_eq!(Activation::from_name("gelu").unwrap(), Activation::GeluErf);
    assert_eq!(Activation::from_name("gelu_pytorch_tanh").unwrap(), Activation::GeluTanh);
    assert_eq!(Activation::from_name("swish").unwrap(), Activation::Silu);
    assert!(matches!(Activation::from_name("mish"), Err(Error::Config { .. })));
}

/// A random FFN with its reference weights.
struct RefFfn {
    gate: Option<RefLinear>,
    up: RefLinear,
    down: RefLinear,
    act: Activation,
    layer: FeedForward,
}

fn rand_ffn(r: &mut StdRng, d: usize, f: usize, kind: FfnKind, bias: bool) -> RefFfn {
    let (gated, act) = match kind {
        FfnKind::Plain(a) => (false, a),
        FfnKind::Gated(a) => (true, a),
    };
    let gate = gated.then(|| rand_linear(r, d, f, bias));
    let up = rand_linear(r, d, f, bias);
    let down = rand_linear(r, f, d, bias);
    let layer = FeedForward::new(
        gate.as_ref().map(|g| g.layer.clone()),
        up.layer.clone(),
        down.layer.clone(),
        act,
        Dropout::new(0.0).unwrap(),
    )
    .unwrap();
    RefFfn { gate, up, down, act, layer }
}

impl RefFfn {
    fn apply(&self, x: &[f32]) -> Vec<f32> {
        let act = act_ref(self.act);
        let u = self.up.apply(x);
        let h: Vec<f32> = match &self.gate {
            Some(g) => g.apply(x).iter().zip(&u).map(|(&gv, &uv)| (act(gv as f64) * uv as f64) as f32).collect(),
            None => u.iter().map(|&v| act(v as f64) as f32).collect(),
        };
        self.down.apply(&h)
    }
}

#[test]
fn feed_forward_variants_match_reference() {
    let mut r = rng(110);
    let (b, t, d, f) = (2, 3, 8, 20);
    let kinds = [
        FfnKind::Plain(Activation::Relu),
        FfnKind::Plain(Activation::GeluErf),
        FfnKind::Plain(Activation::GeluTanh),
        FfnKind::Plain(Activation::Silu),
        FfnKind::SWIGLU,
        FfnKind::GEGLU,
        FfnKind::Gated(Activation::GeluErf),
    ];
    assert_eq!(FfnKind::SWIGLU, FfnKind::Gated(Activation::Silu));
    for kind in kinds {
        for bias in [true, false] {
            let ffn = rand_ffn(&mut r, d, f, kind, bias);
            // Large inputs so that activations are exercised well past their knee.
            let x = rand_vec(&mut r, b * t * d, 3.0);
            let got = ffn.layer.forward(&tensor(&x, &[b, t, d]), false).unwrap();
            assert_tensor_close(&got, &ffn.apply(&x), &[b, t, d], TOL, &format!("ffn {kind:?} bias {bias}"));
        }
    }
}

#[test]
fn feed_forward_shape_errors() {
    let mut r = rng(111);
    let up = rand_linear(&mut r, 8, 16, false).layer;
    let down = rand_linear(&mut r, 16, 8, false).layer;
    let bad_down = rand_linear(&mut r, 16, 6, false).layer;
    let bad_gate = rand_linear(&mut r, 8, 12, false).layer;
    let drop = Dropout::new(0.0).unwrap();
    assert!(FeedForward::new(None, up.clone(), down.clone(), Activation::Relu, drop).is_ok());
    let e = FeedForward::new(None, up.clone(), bad_down, Activation::Relu, drop).unwrap_err();
    assert!(matches!(e, Error::Config { .. }), "{e:?}");
    let e = FeedForward::new(Some(bad_gate), up, down, Activation::Silu, drop).unwrap_err();
    assert!(matches!(e, Error::Config { .. }), "{e:?}");
    let ffn = rand_ffn(&mut r, 8, 16, FfnKind::SWIGLU, false);
    assert!(matches!(ffn.layer.forward(&tensor(&[0.0; 6], &[1, 6]), false), Err(Error::Input { .. })));
}

// ------------------------------------------------------------------ linear

#[test]
fn linear_dense_and_quantized() {
    use candle_core::quantized::{GgmlDType, QTensor};
    let mut r = rng(115);
    let (in_f, out_f) = (64, 5);
    let lin = rand_linear(&mut r, in_f, out_f, true);
    assert!(!lin.layer.is_quantized());
    assert_eq!((lin.layer.in_features(), lin.layer.out_features()), (in_f, out_f));
    let x = rand_vec(&mut r, 2 * 3 * in_f, 1.0);
    let want = lin.apply(&x);
    let got = lin.layer.forward(&tensor(&x, &[2, 3, in_f])).unwrap();
    assert_tensor_close(&got, &want, &[2, 3, out_f], TOL, "dense linear");
    // Q8_0: the same layer within quantization error.
    let q = QTensor::quantize(&tensor(&lin.w, &[out_f, in_f]), GgmlDType::Q8_0).unwrap();
    let bias = tensor(lin.b.as_ref().unwrap(), &[out_f]);
    let ql = Linear::from_qtensor(std::sync::Arc::new(q), Some(bias)).unwrap();
    assert!(ql.is_quantized() && ql.weight().is_none());
    assert_eq!((ql.in_features(), ql.out_features()), (in_f, out_f));
    let got = ql.forward(&tensor(&x, &[2, 3, in_f])).unwrap();
    assert_tensor_close(&got, &want, &[2, 3, out_f], 2e-2, "q8_0 linear");
    assert!(max_abs_diff(&to_vec(&got), &want) > 0.0, "quantization should perturb the output");
    // Shape errors, dense and quantized alike.
    assert!(matches!(lin.layer.forward(&tensor(&[0.0; 8], &[1, 8])), Err(Error::Input { .. })));
    assert!(matches!(ql.forward(&tensor(&[0.0; 8], &[1, 8])), Err(Error::Input { .. })));
    let w = tensor(&lin.w, &[out_f, in_f]);
    assert!(matches!(Linear::new(w.clone(), Some(tensor(&[0.0], &[1]))), Err(Error::Input { .. })));
    assert!(matches!(Linear::new(tensor(&lin.w, &[out_f * in_f]), None), Err(Error::Input { .. })));
    let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
    let e = Linear::from_qtensor(std::sync::Arc::new(q), Some(tensor(&[0.0], &[1])));
    assert!(matches!(e, Err(Error::Input { .. })), "a [1] bias must not be broadcast silently: {e:?}");
}

// -------------------------------------------------------- mixture of experts

struct RefMoe {
    router: RefLinear,
    experts: Vec<RefFfn>,
    top_k: usize,
    normalize: bool,
    layer: MoeFeedForward,
}

fn rand_moe(r: &mut StdRng, d: usize, f: usize, n_experts: usize, top_k: usize, normalize: bool) -> RefMoe {
    let mut router = rand_linear(r, d, n_experts, false);
    // A sharper router so that routing varies from token to token.
    router.w.iter_mut().for_each(|w| *w *= 4.0);
    router.layer = Linear::new(tensor(&router.w, &[n_experts, d]), None).unwrap();
    let experts: Vec<RefFfn> = (0..n_experts).map(|_| rand_ffn(r, d, f, FfnKind::SWIGLU, false)).collect();
    let layer =
        MoeFeedForward::new(router.layer.clone(), experts.iter().map(|e| e.layer.clone()).collect(), top_k, normalize)
            .unwrap();
    RefMoe { router, experts, top_k, normalize, layer }
}

impl RefMoe {
    /// Per token: router softmax, the k most probable experts (ties to the
    /// lower index), optionally renormalised weights, weighted sum of expert
    /// outputs. Returns (output, selected experts per token, router logits).
    fn apply(&self, x: &[f32], d: usize) -> (Vec<f32>, Vec<Vec<usize>>, Vec<f32>) {
        let logits = self.router.apply(x);
        let e = self.experts.len();
        let mut out = vec![0f32; x.len()];
        let mut selected = Vec::new();
        for (ti, tok) in x.chunks(d).enumerate() {
            let row: Vec<f64> = logits[ti * e..(ti + 1) * e].iter().map(|&v| v as f64).collect();
            let p = softmax_ref(&row);
            let mut order: Vec<usize> = (0..e).collect();
            order.sort_by(|&a, &b| p[b].partial_cmp(&p[a]).unwrap().then(a.cmp(&b)));
            let chosen = order[..self.top_k].to_vec();
            let total: f64 = chosen.iter().map(|&c| p[c]).sum();
            for &c in &chosen {
                let wgt = if self.normalize { p[c] / total } else { p[c] };
                let y = self.experts[c].apply(tok);
                for j in 0..d {
                    out[ti * d + j] += (wgt * y[j] as f64) as f32;
                }
            }
            selected.push(chosen);
        }
        (out, selected, logits)
    }
}

#[test]
fn moe_matches_per_token_loop() {
    let mut r = rng(120);
    let (b, t, d, f) = (3, 5, 8, 12);
    for (n_experts, top_k, normalize) in [(4, 2, true), (4, 2, false), (5, 1, true), (3, 3, true), (6, 2, true)] {
        let moe = rand_moe(&mut r, d, f, n_experts, top_k, normalize);
        assert_eq!(moe.layer.n_experts(), n_experts);
        assert_eq!(moe.layer.top_k(), top_k);
        let x = rand_vec(&mut r, b * t * d, 1.0);
        let out = moe.layer.forward(&tensor(&x, &[b, t, d]), false).unwrap();
        let (want, selected, logits) = moe.apply(&x, d);
        let what = format!("moe e {n_experts} k {top_k} normalize {normalize}");
        assert_tensor_close(&out.hidden, &want, &[b, t, d], TOL, &what);
        assert_tensor_close(&out.router_logits, &logits, &[b * t, n_experts], TOL, "router logits");
        let probs = candle_nn::ops::softmax(&out.router_logits, 1).unwrap();
        let (sel, counts) = top_k_indices(&probs, top_k).unwrap();
        let sel: Vec<Vec<usize>> =
            sel.to_vec2::<u32>().unwrap().iter().map(|r| r.iter().map(|&c| c as usize).collect()).collect();
        assert_eq!(sel, selected, "{what}: selected experts");
        let mut want_counts = vec![0usize; n_experts];
        selected.iter().flatten().for_each(|&c| want_counts[c] += 1);
        assert_eq!(counts, want_counts);
        if top_k < n_experts {
            assert!(want_counts.iter().filter(|&&c| c > 0).count() > top_k, "{what}: routing should vary");
        }
    }
}

#[test]
fn load_balancing_loss_matches_hand_formula() {
    let mut r = rng(121);
    for (n, e, k) in [(10, 4, 2), (7, 3, 1), (12, 8, 2), (5, 4, 4)] {
        let logits = rand_vec(&mut r, n * e, 3.0);
        let lt = tensor(&logits, &[n, e]);
        let got = load_balancing_loss(&lt, e, k).unwrap().to_vec0::<f32>().unwrap();
        // HF Mixtral `load_balancing_loss_func`:
        //   E * sum_{slot, e} (fraction of tokens whose slot-th choice is e) * mean_t p[t, e].
        let mut mean_p = vec![0f64; e];
        let mut per_slot = vec![vec![0f64; e]; k];
        for t in 0..n {
            let row: Vec<f64> = logits[t * e..(t + 1) * e].iter().map(|&v| v as f64).collect();
            let p = softmax_ref(&row);
            for c in 0..e {
                mean_p[c] += p[c] / n as f64;
            }
            let mut order: Vec<usize> = (0..e).collect();
            order.sort_by(|&a, &b| p[b].partial_cmp(&p[a]).unwrap());
            for s in 0..k {
                per_slot[s][order[s]] += 1.0 / n as f64;
            }
        }
        let mut want = 0f64;
        for slot in &per_slot {
            for c in 0..e {
                want += slot[c] * mean_p[c];
            }
        }
        want *= e as f64;
        assert!((got as f64 - want).abs() < 1e-5, "n {n} e {e} k {k}: {got} vs {want}");
        // Utilisation: fraction of routed slots per expert.
        let util = expert_utilisation(&lt, k).unwrap();
        assert!((util.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
    // A perfectly uniform router gives top_k (HF's convention: slots are
    // summed, not averaged).
    let uniform = Tensor::zeros((8, 4), DType::F32, &Device::Cpu).unwrap();
    for k in 1..=4 {
        let v = load_balancing_loss(&uniform, 4, k).unwrap().to_vec0::<f32>().unwrap();
        assert!((v - k as f32).abs() < 1e-6, "uniform router, top {k}: {v}");
    }
    // Errors.
    let lt = tensor(&[0.0; 12], &[3, 4]);
    assert!(load_balancing_loss(&lt, 5, 2).is_err());
    assert!(load_balancing_loss(&lt, 4, 5).is_err());
    assert!(load_balancing_loss(&lt, 4, 0).is_err());
}

#[test]
fn moe_config_errors() {
    let mut r = rng(122);
    let moe = rand_moe(&mut r, 4, 6, 3, 1, true);
    let router = moe.router.layer.clone();
    let experts: Vec<FeedForward> = moe.experts.iter().map(|e| e.layer.clone()).collect();
    let field_of = |e: Error| match e {
        Error::Config { field, .. } => field,
        other => panic!("expected a config error, got {other:?}"),
    };
    assert_eq!(field_of(MoeFeedForward::new(router.clone(), experts.clone(), 4, true).unwrap_err()), "top_k");
    assert_eq!(field_of(MoeFeedForward::new(router.clone(), experts.clone(), 0, true).unwrap_err()), "top_k");
    assert_eq!(field_of(MoeFeedForward::new(router.clone(), vec![], 1, true).unwrap_err()), "n_experts");
    assert_eq!(field_of(MoeFeedForward::new(router, experts[..2].to_vec(), 1, true).unwrap_err()), "router");
    let w = attn_nn::Weights::new(std::sync::Arc::new(attn_nn::ParamStore::new()), DType::F32, &Device::Cpu);
    assert_eq!(field_of(MoeFeedForward::load(&w, 4, 6, 2, 3, FfnKind::SWIGLU).unwrap_err()), "top_k");
}

// ------------------------------------------------------------------ dropout

#[test]
fn dropout_is_identity_when_not_training() {
    let mut r = rng(130);
    let x = rand_vec(&mut r, 64, 1.0);
    let d = Dropout::new(0.5).unwrap();
    assert_eq!(d.p(), 0.5);
    assert_eq!(to_vec(&d.forward(&tensor(&x, &[8, 8]), false).unwrap()), x);
    // p = 0 in training is also the identity.
    assert_eq!(to_vec(&Dropout::new(0.0).unwrap().forward(&tensor(&x, &[8, 8]), true).unwrap()), x);
}

#[test]
fn dropout_in_training_zeroes_about_p_and_rescales() {
    let n = 20_000;
    let x = Tensor::ones(n, DType::F32, &Device::Cpu).unwrap();
    let y = to_vec(&Dropout::new(0.5).unwrap().forward(&x, true).unwrap());
    let zeros = y.iter().filter(|&&v| v == 0.0).count();
    assert!(y.iter().all(|&v| v == 0.0 || v == 2.0), "survivors must be scaled by 1/(1-p) = 2");
    let frac = zeros as f64 / n as f64;
    // Binomial(20000, 0.5): sd 0.0035; 0.47..0.53 is over 8 sd.
    assert!((0.47..0.53).contains(&frac), "fraction dropped {frac}");
    let y = to_vec(&Dropout::new(0.2).unwrap().forward(&x, true).unwrap());
    let frac = y.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
    assert!((0.17..0.23).contains(&frac), "fraction dropped {frac}");
    assert!(y.iter().all(|&v| v == 0.0 || (v - 1.25).abs() < 1e-6));
}

#[test]
fn dropout_bad_probability_is_a_config_error() {
    for p in [1.0, 1.5, -0.1, f32::NAN] {
        let e = Dropout::new(p).unwrap_err();
        assert!(matches!(&e, Error::Config { field, .. } if field == "dropout"), "p {p}: {e:?}");
    }
}

// ------------------------------------------------------- output head, loss

fn log_softmax_ref(row: &[f32]) -> Vec<f64> {
    let max = row.iter().map(|&v| v as f64).fold(f64::NEG_INFINITY, f64::max);
    let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
    row.iter().map(|&v| v as f64 - lse).collect()
}

#[test]
fn output_head_log_probs_and_probs() {
    let mut r = rng(140);
    let (b, t, d, v) = (2, 3, 8, 11);
    let proj = rand_linear(&mut r, d, v, true);
    let head = OutputHead::new(proj.layer.clone());
    assert_eq!(head.vocab_size(), v);
    let x = rand_vec(&mut r, b * t * d, 2.0);
    let xt = tensor(&x, &[b, t, d]);
    let logits = proj.apply(&x);
    assert_tensor_close(&head.logits(&xt).unwrap(), &logits, &[b, t, v], TOL, "logits");
    let want_lp: Vec<f32> = logits.chunks(v).flat_map(log_softmax_ref).map(|x| x as f32).collect();
    let lp = head.log_probs(&xt).unwrap();
    assert_tensor_close(&lp, &want_lp, &[b, t, v], TOL, "log probs");
    let p = to_vec(&head.probs(&xt).unwrap());
    let want_p: Vec<f32> = want_lp.iter().map(|x| x.exp()).collect();
    assert_close(&p, &want_p, 1e-6, "probs");
    for row in p.chunks(v) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert!(row.iter().all(|&q| q > 0.0));
    }
    // exp(log_probs) == probs.
    let exp_lp: Vec<f32> = to_vec(&lp).iter().map(|x| x.exp()).collect();
    assert_close(&exp_lp, &p, 1e-6, "exp(log_probs) vs probs");
}

/// PyTorch's `F.cross_entropy(logits, y, ignore_index, label_smoothing)`, by
/// hand.
fn cross_entropy_ref(logits: &[f32], v: usize, targets: &[u32], ignore: Option<u32>, eps: f64) -> f64 {
    let mut total = 0f64;
    let mut count = 0usize;
    for (row, &y) in logits.chunks(v).zip(targets) {
        if Some(y) == ignore {
            continue;
        }
        let lp = log_softmax_ref(row);
        let nll = -lp[y as usize];
        let smooth = -lp.iter().sum::<f64>() / v as f64;
        total += (1.0 - eps) * nll + eps * smooth;
        count += 1;
    }
    total / count as f64
}

#[test]
fn cross_entropy_matches_hand_computation() {
    let mut r = rng(150);
    let (n, v) = (9, 7);
    let logits = rand_vec(&mut r, n * v, 3.0);
    let lt = tensor(&logits, &[n, v]);
    let targets = [3u32, 0, 6, 0, 1, 2, 5, 0, 4];
    let tt = u32_tensor(&targets, &[n]);
    for (ignore, eps) in [(None, 0.0), (None, 0.1), (Some(0), 0.0), (Some(0), 0.1), (Some(5), 0.3)] {
        let got = cross_entropy(&lt, &tt, ignore, eps).unwrap().to_vec0::<f32>().unwrap();
        let want = cross_entropy_ref(&logits, v, &targets, ignore, eps);
        assert!((got as f64 - want).abs() < 1e-5, "ignore {ignore:?} eps {eps}: {got} vs {want}");
    }
    // An ignore index outside the vocabulary (a padding id like u32::MAX).
    let t2 = [3u32, u32::MAX, 6, 1, u32::MAX, 2, 5, 0, 4];
    let got = cross_entropy(&lt, &u32_tensor(&t2, &[n]), Some(u32::MAX), 0.1).unwrap().to_vec0::<f32>().unwrap();
    let want = cross_entropy_ref(&logits, v, &t2, Some(u32::MAX), 0.1);
    assert!((got as f64 - want).abs() < 1e-5, "{got} vs {want}");
}

#[test]
fn cross_entropy_errors() {
    let lt = tensor(&[0.0; 6], &[2, 3]);
    // Target out of the vocabulary.
    assert!(matches!(cross_entropy(&lt, &u32_tensor(&[1, 3], &[2]), None, 0.0), Err(Error::Input { .. })));
    // Everything ignored.
    assert!(matches!(cross_entropy(&lt, &u32_tensor(&[0, 0], &[2]), Some(0), 0.0), Err(Error::Input { .. })));
    // Targets of the wrong shape.
    assert!(matches!(cross_entropy(&lt, &u32_tensor(&[0, 1, 2], &[3]), None, 0.0), Err(Error::Input { .. })));
    // Smoothing out of range.
    assert!(matches!(cross_entropy(&lt, &u32_tensor(&[0, 1], &[2]), None, 1.0), Err(Error::Config { .. })));
    assert!(matches!(cross_entropy(&lt, &u32_tensor(&[0, 1], &[2]), None, -0.1), Err(Error::Config { .. })));
}

// --------------------------------------------------------- low precision

/// The same blocks in f16 / bf16 (weights and activations) agree with f32
/// to within the format's precision, and keep the activation dtype.
#[test]
fn half_precision_blocks_follow_f32() {
    use attn_nn::{
        causal_mask, combine_masks, lengths_to_valid, padding_mask, positions, AttentionConfig, FfnNames,
        MultiHeadAttention, RopeLayout, RotaryEmbedding, Weights,
    };
    use std::sync::Arc;
    let mut r = rng(160);
    let (b, t, d) = (2, 5, 16);
    let x = rand_vec(&mut r, b * t * d, 1.0);
    let run = |dtype: DType| -> (Vec<f32>, Vec<f32>) {
        let w = Weights::new(Arc::new(SeededSource), dtype, &Device::Cpu);
        let cfg = AttentionConfig {
            d_model: d,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 4,
            qkv_bias: true,
            out_bias: true,
            scale: None,
            softcap: Some(5.0),
            dropout: 0.0,
        };
        let rope = RotaryEmbedding::new(10000.0, 4, 16, RopeLayout::Halves, dtype, &Device::Cpu).unwrap();
        let attn = MultiHeadAttention::load(&w.pp("attn"), cfg).unwrap().with_rope(rope).with_qk_norm(
            RmsNorm::load(&w.pp("attn.q_norm"), 4, 1e-6, true).unwrap(),
            RmsNorm::load(&w.pp("attn.k_norm"), 4, 1e-6, false).unwrap(),
        );
        let ln = Residual::Pre(Norm::Layer(LayerNorm::load(&w.pp("ln1"), d, 1e-5, true).unwrap()));
        let ffn = FeedForward::load(&w.pp("ffn"), d, 24, FfnKind::Gated(Activation::GeluErf), FfnNames::HF, true, 0.0)
            .unwrap();
        let rms = Residual::Sandwich {
            pre: Norm::Rms(RmsNorm::load(&w.pp("ln2"), d, 1e-6, false).unwrap()),
            post: Norm::Rms(RmsNorm::load(&w.pp("ln3"), d, 1e-6, false).unwrap()),
        };
        let xt = tensor(&x, &[b, t, d]).to_dtype(dtype).unwrap();
        let mask = combine_masks(
            Some(&causal_mask(t, t, Some(3), &Device::Cpu).unwrap()),
            Some(&padding_mask(&lengths_to_valid(&[5, 3], t, &Device::Cpu).unwrap()).unwrap()),
        )
        .unwrap();
        let pos = positions(b, t, 0, &Device::Cpu).unwrap();
        let h = ln.forward(&xt, |h| attn.forward(h, mask.as_ref(), Some(&pos), None, false)).unwrap();
        let h = rms.forward(&h, |h| ffn.forward(h, false)).unwrap();
        assert_eq!(h.dtype(), dtype);
        let moe = MoeFeedForward::load(&w.pp("moe"), d, 8, 4, 2, FfnKind::SWIGLU).unwrap();
        let m = moe.forward(&xt, false).unwrap();
        assert_eq!(m.hidden.dtype(), dtype);
        assert_eq!(m.router_logits.dtype(), DType::F32);
        (to_vec(&h), to_vec(&m.hidden))
    };
    let (block32, moe32) = run(DType::F32);
    for (dtype, tol) in [(DType::F16, 5e-3), (DType::BF16, 4e-2)] {
        let (block, moe) = run(dtype);
        let scale = block32.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.5, "degenerate test output");
        assert_close(&block, &block32, tol * scale, &format!("{dtype:?} block"));
        let scale = moe32.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert_close(&moe, &moe32, tol * scale.max(0.1), &format!("{dtype:?} moe"));
    }
}
