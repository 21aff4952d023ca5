//! The three kinds of training, behind one interface: preparing the data,
//! building the model, the loss of a batch and the validation metrics.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use attn_models::{ConditionedDecoder, Transformer};
use attn_nn::{
    lengths_to_valid, load_balancing_loss, Error, ParamStore, Result, SafetensorsSource, WeightSource, Weights,
};
use candle_core::{DType, Device, Tensor, D};
use serde_json::json;

use crate::config::{CorpusFormat, ModelSpec, Precision, Task, TokenizerKind, TrainConfig, BOS_ID, EOS_ID, PAD_ID};
use crate::data::batch::{make_batch, plan_epoch, Batch, Cursor, Examples};
use crate::data::corpus;
use crate::data::split::{normalise_key, split, SplitSizes};
use crate::data::tokenize::TextTokenizer;

/// Raw units of the three splits (kept for references and reports).
pub enum RawSplits {
    Text { train: Vec<String>, valid: Vec<String>, test: Vec<String> },
    Pairs { train: Vec<(String, String)>, valid: Vec<(String, String)>, test: Vec<(String, String)> },
    Labeled { train: Vec<(String, u32)>, valid: Vec<(String, u32)>, test: Vec<(String, u32)> },
}

pub struct Prepared {
    pub tokenizer: TextTokenizer,
    pub train: Arc<Examples>,
    pub valid: Examples,
    pub test: Examples,
    pub raw: RawSplits,
    /// Counts for the run report.
    pub report: serde_json::Value,
}

fn sizes(cfg: &TrainConfig) -> SplitSizes {
    SplitSizes {
        valid_fraction: cfg.data.valid_fraction,
        test_fraction: cfg.data.test_fraction,
        valid_size: cfg.data.valid_size,
        test_size: cfg.data.test_size,
    }
}

/// Where the pretrained encoder of a classifier lives (a path relative to
/// the config, or a known model name, pulled on first use).
pub fn pretrained_dir(cfg: &TrainConfig, name: &str) -> Result<PathBuf> {
    let p = cfg.resolve(Path::new(name));
    if p.exists() {
        return Ok(p);
    }
    attn_models::registry::resolve_model(name, true)
}

fn tokenizer_source(cfg: &TrainConfig) -> Result<Option<PathBuf>> {
    if cfg.tokenizer.kind != TokenizerKind::Pretrained {
        return Ok(None);
    }
    match (&cfg.tokenizer.path, &cfg.model) {
        (Some(p), _) => Ok(Some(cfg.resolve(p))),
        (None, ModelSpec::BertClassifier(b)) => Ok(Some(pretrained_dir(cfg, &b.pretrained)?.join("tokenizer.json"))),
        (None, _) => Err(Error::config("tokenizer.path", "required for a pretrained tokenizer")),
    }
}

fn lm_windows(ids: &[u32], seq_len: usize) -> Vec<Vec<u32>> {
    if ids.len() < seq_len + 1 {
        return Vec::new();
    }
    (0..(ids.len() - 1) / seq_len).map(|i| ids[i * seq_len..i * seq_len + seq_len + 1].to_vec()).collect()
}

/// Reads the corpus, splits it, trains (or, with `saved_tokenizer`, loads)
/// the tokenizer and tokenizes every split.
pub fn prepare(cfg: &TrainConfig, saved_tokenizer: Option<&Path>) -> Result<Prepared> {
    let path = cfg.resolve(&cfg.data.path);
    if !path.exists() {
        return Err(Error::format(
            &path,
            "corpus not found (the real corpora are fetched with `scripts/data/fetch.sh shakespeare|de-en|sentiment|all`)",
        ));
    }
    let seed = cfg.seed;
    let d = &cfg.data;
    let pretrained = tokenizer_source(cfg)?;
    let make_tok = |texts: &[&str]| -> Result<TextTokenizer> {
        match saved_tokenizer {
            Some(p) => TextTokenizer::load(p, cfg.tokenizer.kind),
            None => TextTokenizer::build(&cfg.tokenizer, pretrained.as_deref(), texts),
        }
    };
    match d.format {
        CorpusFormat::TextDir => {
            let units = corpus::load_text_dir(&path, &d.pattern)?;
            let n_units = units.len();
            let s = split(units, |u| normalise_key(u), seed, sizes(cfg))?;
            let train_text: Vec<&str> = s.train.iter().map(|u| u.as_str()).collect();
            let tok = make_tok(&train_text)?;
            let stream = |units: &[String]| -> Result<Vec<u32>> {
                let mut ids = Vec::new();
                for u in units {
                    ids.extend(tok.encode(u)?);
                }
                Ok(ids)
            };
            let (tr, va, te) = (stream(&s.train)?, stream(&s.valid)?, stream(&s.test)?);
            let report = json!({
                "units": n_units, "duplicates_removed": s.duplicates,
                "train_units": s.train.len(), "valid_units": s.valid.len(), "test_units": s.test.len(),
                "train_tokens": tr.len(), "valid_tokens": va.len(), "test_tokens": te.len(),
                "vocab_size": tok.vocab_size(),
            });
            let (train, valid, test) =
                (lm_windows(&tr, d.seq_len), lm_windows(&va, d.seq_len), lm_windows(&te, d.seq_len));
            if train.is_empty() || valid.is_empty() {
                return Err(Error::input(
                    "data",
                    format!(
                        "the corpus is too small for windows of {} tokens (train {}, valid {} tokens)",
                        d.seq_len,
                        tr.len(),
                        va.len()
                    ),
                ));
            }
            Ok(Prepared {
                tokenizer: tok,
                train: Arc::new(Examples::Lm(train)),
                valid: Examples::Lm(valid),
                test: Examples::Lm(test),
                raw: RawSplits::Text { train: s.train, valid: s.valid, test: s.test },
                report,
            })
        }
        CorpusFormat::Ding => {
            let pairs = corpus::load_ding(&path)?;
            let n_units = pairs.len();
            // Keyed by the source: the same German text never appears in two splits.
            let s = split(pairs, |(src, _)| normalise_key(src), seed, sizes(cfg))?;
            let mut texts: Vec<&str> = Vec::new();
            for (a, b) in &s.train {
                texts.push(a);
                texts.push(b);
            }
            let tok = make_tok(&texts)?;
            let max = d.max_len;
            let encode = |pairs: &[(String, String)]| -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
                let src: Vec<&str> = pairs.iter().map(|p| p.0.as_str()).collect();
                let tgt: Vec<&str> = pairs.iter().map(|p| p.1.as_str()).collect();
                let (src, tgt) = (tok.encode_many(&src)?, tok.encode_many(&tgt)?);
                Ok(src
                    .into_iter()
                    .zip(tgt)
                    .map(|(mut s, t)| {
                        s.truncate(max - 1);
                        s.push(EOS_ID);
                        let mut y = vec![BOS_ID];
                        y.extend(t.into_iter().take(max - 1));
                        y.push(EOS_ID);
                        (s, y)
                    })
                    .collect())
            };
            let (train, valid, test) = (encode(&s.train)?, encode(&s.valid)?, encode(&s.test)?);
            let report = json!({
                "pairs": n_units, "duplicates_removed": s.duplicates,
                "train_pairs": train.len(), "valid_pairs": valid.len(), "test_pairs": test.len(),
                "train_tokens": train.iter().map(|(a, b)| a.len() + b.len()).sum::<usize>(),
                "vocab_size": tok.vocab_size(),
            });
            Ok(Prepared {
                tokenizer: tok,
                train: Arc::new(Examples::Pairs(train)),
                valid: Examples::Pairs(valid),
                test: Examples::Pairs(test),
                raw: RawSplits::Pairs { train: s.train, valid: s.valid, test: s.test },
                report,
            })
        }
        CorpusFormat::SentimentTsv => {
            let rows = corpus::load_sentiment_tsv(&path)?;
            let n_units = rows.len();
            let s = split(rows, |(t, _)| normalise_key(t), seed, sizes(cfg))?;
            let tok = make_tok(&[])?;
            let max = d.max_len;
            let encode = |rows: &[(String, u32)]| -> Result<Vec<(Vec<u32>, u32)>> {
                let texts: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
                let ids = tok.encode_many(&texts)?;
                Ok(ids
                    .into_iter()
                    .zip(rows)
                    .map(|(mut ids, r)| {
                        if ids.len() > max {
                            // Keep the closing [SEP].
                            let last = ids[ids.len() - 1];
                            ids.truncate(max - 1);
                            ids.push(last);
                        }
                        (ids, r.1)
                    })
                    .collect())
            };
            let (train, valid, test) = (encode(&s.train)?, encode(&s.valid)?, encode(&s.test)?);
            let positive = |v: &[(Vec<u32>, u32)]| v.iter().filter(|x| x.1 == 1).count();
            let report = json!({
                "rows": n_units, "duplicates_removed": s.duplicates,
                "train": train.len(), "valid": valid.len(), "test": test.len(),
                "train_positive": positive(&train), "test_positive": positive(&test),
                "vocab_size": tok.vocab_size(),
            });
            Ok(Prepared {
                tokenizer: tok,
                train: Arc::new(Examples::Labeled(train)),
                valid: Examples::Labeled(valid),
                test: Examples::Labeled(test),
                raw: RawSplits::Labeled { train: s.train, valid: s.valid, test: s.test },
                report,
            })
        }
    }
}

pub use attn_models::trained::{ModelKind, Net};

/// The model a training config describes, for a tokenizer of `vocab_size` tokens.
pub fn model_kind(cfg: &TrainConfig, vocab_size: usize) -> Result<ModelKind> {
    Ok(match &cfg.model {
        ModelSpec::Gpt(_) => ModelKind::Gpt(cfg.gpt_config(vocab_size)?),
        ModelSpec::Transformer(_) => ModelKind::Transformer(cfg.transformer_config(vocab_size)?),
        ModelSpec::BertClassifier(b) => {
            let dir = pretrained_dir(cfg, &b.pretrained)?;
            let bert = crate::config::read_bert_config(&dir)?;
            if bert.vocab_size != vocab_size {
                return Err(Error::config(
                    "tokenizer",
                    format!("has {vocab_size} tokens but the pretrained encoder has {}", bert.vocab_size),
                ));
            }
            ModelKind::Classifier { bert, num_labels: b.num_labels, dropout: b.dropout }
        }
    })
}

/// Trainable parameters and the model built from them.
pub struct Model {
    pub kind: ModelKind,
    pub store: Arc<ParamStore>,
    pub compute: DType,
    pub device: Device,
    net: Option<Net>,
}

impl Model {
    /// Creates (or, for a classifier, loads the pretrained) parameters.
    /// Initial values come from attn's seeded stream seeded with `seed`.
    pub fn new(kind: ModelKind, cfg: &TrainConfig, precision: Precision, device: &Device) -> Result<Self> {
        let store = match &cfg.model {
            ModelSpec::BertClassifier(b) => {
                let dir = pretrained_dir(cfg, &b.pretrained)?;
                let files = attn_models::inspect::safetensors_files(&dir)?;
                let base: Arc<dyn WeightSource> = Arc::new(SafetensorsSource::open(&files)?);
                Arc::new(ParamStore::from_source(base))
            }
            _ => Arc::new(ParamStore::new()),
        };
        let compute = match precision {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::F16 => DType::F16,
        };
        attn_nn::rng::seed(attn_nn::rng::derive(&[cfg.seed, 0x1417]));
        let mut m = Model { kind, store, compute, device: device.clone(), net: None };
        // Building registers every parameter in the store.
        let net = m.build()?;
        if compute == DType::F32 {
            m.net = Some(net);
        }
        Ok(m)
    }

    fn build(&self) -> Result<Net> {
        let w = Weights::new(self.store.clone(), self.compute, &self.device);
        Net::build(&self.kind, &w)
    }

    /// The model over the current parameter values. In float32 the model
    /// shares the parameters' storage and is built once; in mixed precision
    /// it is rebuilt from fresh casts of the float32 master weights.
    pub fn net(&self) -> Result<std::borrow::Cow<'_, Net>> {
        match &self.net {
            Some(n) => Ok(std::borrow::Cow::Borrowed(n)),
            None => Ok(std::borrow::Cow::Owned(self.build()?)),
        }
    }

    /// A float32 model for evaluation and export.
    pub fn eval_net(&self) -> Result<Net> {
        let w = Weights::new(self.store.clone(), DType::F32, &self.device);
        Net::build(&self.kind, &w)
    }
}

/// Loss and counts of one batch.
pub struct BatchLoss {
    /// Sum over targets of the (label-smoothed) cross-entropy: differentiable.
    pub loss_sum: Tensor,
    /// Load-balancing loss (MoE), mean over MoE layers: differentiable.
    pub aux: Option<Tensor>,
    /// Sum of the plain negative log-likelihoods.
    pub nll_sum: f64,
    pub targets: usize,
    pub correct: usize,
    /// Characters (or bytes) the targets stand for (language models).
    pub units: u64,
    /// Per MoE layer, the share of routed tokens each expert received.
    pub expert_util: Vec<Vec<f32>>,
}

/// Cross-entropy pieces for `logits` `[n, v]` and `targets` (ignoring `ignore`).
fn token_losses(
    logits: &Tensor,
    targets: &[u32],
    ignore: Option<u32>,
    smoothing: f64,
) -> Result<(Tensor, f64, usize, usize)> {
    let (n, v) = logits.dims2()?;
    if targets.len() != n {
        return Err(Error::input("loss", format!("{} targets for {n} rows of logits", targets.len())));
    }
    let keep: Vec<f32> = targets.iter().map(|&t| if Some(t) == ignore { 0.0 } else { 1.0 }).collect();
    let count = keep.iter().filter(|&&k| k > 0.0).count();
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= v && Some(t) != ignore) {
        return Err(Error::input("loss", format!("target id {bad} outside a vocabulary of {v}")));
    }
    let rows = targets.iter().map(|&t| (Some(t) != ignore).then_some(t)).collect();
    let (per, stats) = attn_nn::grad_ops::cross_entropy_rows_with_stats(logits, rows, smoothing)?;
    let loss_sum = per.sum_all()?;
    let nll_sum = stats.nll.iter().map(|&x| x as f64).sum();
    let correct = stats.argmax.iter().zip(targets).zip(&keep).filter(|((p, t), k)| **k > 0.0 && p == t).count();
    Ok((loss_sum, nll_sum, count, correct))
}

/// Loss of one batch (training when `train`: dropout on).
pub fn batch_loss(
    net: &Net,
    b: &Batch,
    device: &Device,
    train: bool,
    smoothing: f64,
    units: &[u32],
) -> Result<BatchLoss> {
    let a = &b.a;
    let ids = Tensor::from_slice(&a.ids, (a.rows, a.cols), device)?;
    match net {
        Net::Gpt(m) => {
            let c = a.cols;
            let inputs = ids.narrow(1, 0, c - 1)?;
            let targets: Vec<u32> = (0..a.rows).flat_map(|r| a.ids[r * c + 1..(r + 1) * c].to_vec()).collect();
            let out = m.forward(&inputs, train)?;
            let v = out.logits.dim(2)?;
            let logits = out.logits.reshape((a.rows * (c - 1), v))?;
            let (loss_sum, nll_sum, n, correct) = token_losses(&logits, &targets, None, smoothing)?;
            let units = targets.iter().map(|&t| units.get(t as usize).copied().unwrap_or(0) as u64).sum();
            let (aux, expert_util) = if let (Some(moe), false) = (&m.config().moe, out.router_logits.is_empty()) {
                let mut losses = Vec::new();
                let mut util = Vec::new();
                for r in &out.router_logits {
                    losses.push(load_balancing_loss(r, moe.n_experts, moe.top_k)?);
                    util.push(attn_nn::moe::expert_utilisation(&r.detach(), moe.top_k)?);
                }
                let k = losses.len() as f64;
                (Some((Tensor::stack(&losses, 0)?.sum_all()? / k)?), util)
            } else {
                (None, vec![])
            };
            Ok(BatchLoss { loss_sum, aux, nll_sum, targets: n, correct, units, expert_util })
        }
        Net::Transformer(m) => {
            let tb = b.b.as_ref().ok_or_else(|| Error::input("loss", "translation batch without targets"))?;
            let src_valid = lengths_to_valid(&a.lengths, a.cols, device)?;
            let tgt = Tensor::from_slice(&tb.ids, (tb.rows, tb.cols), device)?;
            let t = tb.cols - 1;
            let tgt_in = tgt.narrow(1, 0, t)?;
            let in_lens: Vec<usize> = tb.lengths.iter().map(|&l| l.saturating_sub(1)).collect();
            let tgt_valid = lengths_to_valid(&in_lens, t, device)?;
            let targets: Vec<u32> =
                (0..tb.rows).flat_map(|r| tb.ids[r * tb.cols + 1..(r + 1) * tb.cols].to_vec()).collect();
            let logits = m.forward(&ids, &tgt_in, Some(&src_valid), Some(&tgt_valid), train)?;
            let v = logits.dim(2)?;
            let logits = logits.reshape((tb.rows * t, v))?;
            let (loss_sum, nll_sum, n, correct) = token_losses(&logits, &targets, Some(PAD_ID), smoothing)?;
            Ok(BatchLoss { loss_sum, aux: None, nll_sum, targets: n, correct, units: 0, expert_util: vec![] })
        }
        Net::Classifier(m) => {
            let logits = m.forward(&ids, &a.lengths, train)?;
            let (loss_sum, nll_sum, n, correct) = token_losses(&logits, &b.labels, None, smoothing)?;
            Ok(BatchLoss { loss_sum, aux: None, nll_sum, targets: n, correct, units: 0, expert_util: vec![] })
        }
    }
}

/// Validation / test numbers.
#[derive(Debug, Clone, Default)]
pub struct EvalResult {
    pub loss: f64,
    pub targets: usize,
    pub accuracy: Option<f64>,
    pub bleu: Option<f64>,
    pub bleu_greedy: Option<f64>,
    /// Nats per character (char tokenizer) or bits per byte (byte-level BPE).
    pub per_unit: Option<(String, f64)>,
}

impl EvalResult {
    pub fn to_json(&self, step: usize, split: &str) -> serde_json::Value {
        let mut v = json!({"kind": "eval", "step": step, "split": split, "loss": self.loss,
            "ppl": self.loss.exp(), "targets": self.targets});
        if let Some(a) = self.accuracy {
            v["accuracy"] = json!(a);
        }
        if let Some(b) = self.bleu {
            v["bleu"] = json!(b);
        }
        if let Some(b) = self.bleu_greedy {
            v["bleu_greedy"] = json!(b);
        }
        if let Some((k, x)) = &self.per_unit {
            v[k.as_str()] = json!(x);
        }
        v
    }
}

/// Teacher-forced loss (and accuracy for classification) over `ex`, at most
/// `limit` batches.
pub fn evaluate_loss(
    net: &Net,
    ex: &Examples,
    budget: usize,
    limit: Option<usize>,
    device: &Device,
    tok: &TextTokenizer,
) -> Result<EvalResult> {
    let plan = plan_epoch(ex, 0, 0, budget, 0, false);
    let take = limit.unwrap_or(plan.len()).min(plan.len());
    // Spread a limited evaluation over all lengths.
    let stride = (plan.len() / take.max(1)).max(1);
    let (mut nll, mut n, mut correct, mut units) = (0.0, 0usize, 0usize, 0u64);
    for idx in plan.iter().step_by(stride).take(take) {
        let b = make_batch(ex, idx, Cursor::default(), Cursor::default());
        let l = batch_loss(net, &b, device, false, 0.0, tok.unit_lengths())?;
        nll += l.nll_sum;
        n += l.targets;
        correct += l.correct;
        units += l.units;
    }
    if n == 0 {
        return Err(Error::input("evaluate", "the evaluation split is empty"));
    }
    let mut r = EvalResult { loss: nll / n as f64, targets: n, ..Default::default() };
    match net {
        Net::Classifier(_) => r.accuracy = Some(correct as f64 / n as f64),
        Net::Gpt(_) if units > 0 => {
            r.per_unit = Some(match tok.kind() {
                TokenizerKind::Char => ("nats_per_char".into(), nll / units as f64),
                _ => ("bits_per_byte".into(), nll / units as f64 / std::f64::consts::LN_2),
            })
        }
        _ => {}
    }
    Ok(r)
}

/// Greedy translation of many sources at once (one batched decoder step
/// per position for all of them).
pub fn translate_greedy(m: &Transformer, srcs: &[Vec<u32>], max_len: usize, device: &Device) -> Result<Vec<Vec<u32>>> {
    let mut out = Vec::with_capacity(srcs.len());
    for chunk in srcs.chunks(64) {
        let refs: Vec<&[u32]> = chunk.iter().map(|s| s.as_slice()).collect();
        let cols = refs.iter().map(|r| r.len()).max().unwrap_or(1).max(1);
        let mut flat = vec![PAD_ID; refs.len() * cols];
        for (i, r) in refs.iter().enumerate() {
            flat[i * cols..i * cols + r.len()].copy_from_slice(r);
        }
        let lens: Vec<usize> = refs.iter().map(|r| r.len()).collect();
        let src = Tensor::from_vec(flat, (refs.len(), cols), device)?;
        let enc = m.encode(&src, Some(&lengths_to_valid(&lens, cols, device)?), false)?;
        let mut state = m.start_decoding(&enc)?;
        let b = refs.len();
        let mut cur = vec![BOS_ID; b];
        let mut done = vec![false; b];
        let mut hyps: Vec<Vec<u32>> = vec![Vec::new(); b];
        for _ in 0..max_len {
            let t = Tensor::from_vec(cur.clone(), (b, 1), device)?;
            let logits = m.decode_step(&t, &mut state)?.squeeze(1)?;
            let next = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
            for i in 0..b {
                if !done[i] {
                    if next[i] == EOS_ID {
                        done[i] = true;
                    } else {
                        hyps[i].push(next[i]);
                    }
                }
            }
            cur = next;
            if done.iter().all(|&d| d) {
                break;
            }
        }
        out.extend(hyps);
    }
    Ok(out)
}

/// Beam-search translation of one source through the engine.
pub fn translate_beam(m: &Transformer, src: &[u32], beam: usize, max_len: usize, device: &Device) -> Result<Vec<u32>> {
    let ids = Tensor::new(src, device)?.unsqueeze(0)?;
    let enc = m.encode(&ids, None, false)?;
    let dec = ConditionedDecoder::new(m, enc)?;
    let params = attn_engine::beam::BeamParams {
        width: beam,
        length_penalty: 1.0,
        early_stopping: true,
        max_tokens: max_len,
        n_best: 1,
    };
    let hyps = attn_engine::beam::beam_search(&dec, &[BOS_ID], &[EOS_ID], &params)?;
    Ok(hyps.into_iter().next().map(|h| h.tokens).unwrap_or_default())
}

/// BLEU of translating `pairs` (raw text) with greedy decoding, or beam
/// search when `beam > 1`.
pub fn bleu_of(
    m: &Transformer,
    pairs: &[(String, String)],
    tok: &TextTokenizer,
    max_len: usize,
    beam: usize,
    device: &Device,
) -> Result<(f64, Vec<String>)> {
    let srcs: Vec<Vec<u32>> = pairs
        .iter()
        .map(|(s, _)| {
            let mut ids = tok.encode(s)?;
            ids.truncate(max_len - 1);
            ids.push(EOS_ID);
            Ok(ids)
        })
        .collect::<Result<_>>()?;
    let limit = m.config().max_len - 1;
    let hyps_ids = if beam <= 1 {
        translate_greedy(m, &srcs, limit, device)?
    } else {
        srcs.iter().map(|s| translate_beam(m, s, beam, limit, device)).collect::<Result<Vec<_>>>()?
    };
    let hyps: Vec<String> = hyps_ids.iter().map(|h| tok.decode(h)).collect::<Result<_>>()?;
    let refs: Vec<String> = pairs.iter().map(|p| p.1.clone()).collect();
    let score = crate::bleu::corpus_bleu(&hyps, &refs).map_err(|e| Error::input("bleu", e))?;
    Ok((score.score, hyps))
}

impl Task {
    pub fn name(self) -> &'static str {
        match self {
            Task::Lm => "language modelling",
            Task::Translation => "translation",
            Task::Classification => "classification",
        }
    }
}
