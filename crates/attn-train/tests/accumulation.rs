//! Gradient accumulation: k micro-batches give the same gradients and the
//! same AdamW update as one batch holding all their examples (to float
//! tolerance), with padding and variable lengths (translation).

mod common;

use attn_test_support::tempdir;
use attn_train::config::Precision;
use attn_train::data::batch::{make_batch, plan_epoch, Cursor, Examples};
use attn_train::optim::AdamW;
use attn_train::task::{prepare, Model};
use attn_train::trainer::accumulate_gradients;
use attn_train::TrainConfig;
use candle_core::Device;
use common::ci_config;

fn setup(dir: &std::path::Path) -> (TrainConfig, attn_train::task::Prepared) {
    let p = ci_config("de-en-tiny", dir, &[("dropout", "0.0"), ("label_smoothing", "0.1")]);
    let cfg = TrainConfig::load(&p).unwrap();
    let prepared = prepare(&cfg, None).unwrap();
    (cfg, prepared)
}

fn model(cfg: &TrainConfig, vocab: usize) -> Model {
    Model::new(attn_train::task::model_kind(cfg, vocab).unwrap(), cfg, Precision::F32, &Device::Cpu).unwrap()
}

#[test]
fn k_micro_batches_equal_one_big_batch() {
    let dir = tempdir("accum");
    let (cfg, prepared) = setup(&dir);
    let ex: &Examples = &prepared.train;
    let plan = plan_epoch(ex, 1, 0, cfg.data.batch_tokens, 0, true);
    let micro: Vec<Vec<usize>> = plan[..4].to_vec();
    let union: Vec<usize> = micro.iter().flatten().copied().collect();
    let c = Cursor::default();
    let micro_batches: Vec<_> = micro.iter().map(|idx| make_batch(ex, idx, c, c)).collect();
    let big = vec![make_batch(ex, &union, c, c)];
    assert!(
        big[0].padded_tokens > micro_batches.iter().map(|b| b.padded_tokens).sum::<usize>(),
        "the big batch pads more"
    );

    let vocab = prepared.tokenizer.vocab_size();
    let units = prepared.tokenizer.unit_lengths().to_vec();
    let (m1, m2) = (model(&cfg, vocab), model(&cfg, vocab));
    let a = accumulate_gradients(&m1, &micro_batches, &cfg, 0, 1.0, &units).unwrap();
    let b = accumulate_gradients(&m2, &big, &cfg, 0, 1.0, &units).unwrap();
    assert_eq!(a.targets, b.targets);
    assert!((a.nll_sum - b.nll_sum).abs() < 1e-3 * b.nll_sum.abs().max(1.0), "{} vs {}", a.nll_sum, b.nll_sum);
    let mut worst = 0f32;
    let mut scale = 0f32;
    for (ga, gb) in a.grads.iter().zip(&b.grads) {
        for (x, y) in ga.iter().zip(gb) {
            worst = worst.max((x - y).abs());
            scale = scale.max(y.abs());
        }
    }
    assert!(scale > 0.0);
    assert!(worst <= 1e-5 + 1e-4 * scale, "max |diff| {worst} (max |g| {scale})");

    // The same AdamW update follows.
    let mut o1 = AdamW::new(m1.store.vars(), &cfg.train);
    let mut o2 = AdamW::new(m2.store.vars(), &cfg.train);
    o1.step(&a.grads, 1e-3).unwrap();
    o2.step(&b.grads, 1e-3).unwrap();
    let (v1, v2) = (m1.store.vars(), m2.store.vars());
    let mut worst = 0f32;
    for ((_, x), (_, y)) in v1.iter().zip(&v2) {
        let x = x.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let y = y.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (p, q) in x.iter().zip(&y) {
            worst = worst.max((p - q).abs());
        }
    }
    // Adam normalises by sqrt(v): tiny gradient differences can move a
    // weight by at most about lr.
    assert!(worst < 1e-4, "weights after one step differ by {worst}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn a_model_built_with_the_same_seed_is_the_same() {
    let dir = tempdir("seed");
    let (cfg, prepared) = setup(&dir);
    let vocab = prepared.tokenizer.vocab_size();
    let (m1, m2) = (model(&cfg, vocab), model(&cfg, vocab));
    for ((n, a), (_, b)) in m1.store.vars().iter().zip(m2.store.vars().iter()) {
        let a = a.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a, b, "{n}");
    }
    std::fs::remove_dir_all(dir).ok();
}
