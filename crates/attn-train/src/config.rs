//! `attn train` configs: TOML, validated on load with messages that name
//! the field.
//!
//! ```toml
//! seed = 1
//! [data]       # task, corpus format and location, splits, batching
//! [tokenizer]  # char | bpe (trained on the training split) | pretrained
//! [model]      # arch = "gpt" | "transformer" | "bert_classifier" + its fields
//! [train]      # steps, optimiser, schedule, precision, evaluation, checkpoints
//! ```
//!
//! Relative paths are relative to the directory of the config file.

use std::path::{Path, PathBuf};

use attn_models::bert::BertConfig;
use attn_models::gpt::GptConfig;
use attn_models::TransformerConfig;
use attn_nn::{Error, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Next-token prediction over a text stream (decoder-only model).
    Lm,
    /// Source -> target pairs (encoder-decoder model).
    Translation,
    /// Text -> label (encoder with a classification head).
    Classification,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CorpusFormat {
    /// Text files in a directory (`pattern` picks them); paragraphs are the units.
    TextDir,
    /// The TU Chemnitz "Ding" German-English dictionary.
    Ding,
    /// `id \t score \t text` rows; the sign of the score is the label.
    SentimentTsv,
}

fn d_fraction() -> f64 {
    0.05
}
fn d_seq_len() -> usize {
    128
}
fn d_max_len() -> usize {
    128
}
fn d_batch_tokens() -> usize {
    4096
}
fn d_prefetch() -> usize {
    8
}
fn d_pattern() -> String {
    "*".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub task: Task,
    pub format: CorpusFormat,
    /// Corpus file or directory.
    pub path: PathBuf,
    /// File-name pattern with one `*` (text_dir).
    #[serde(default = "d_pattern")]
    pub pattern: String,
    /// Share of the units held out for validation / test (after duplicates are removed).
    #[serde(default = "d_fraction")]
    pub valid_fraction: f64,
    #[serde(default = "d_fraction")]
    pub test_fraction: f64,
    /// Exact sizes instead of fractions.
    #[serde(default)]
    pub valid_size: Option<usize>,
    #[serde(default)]
    pub test_size: Option<usize>,
    /// Training window in tokens (lm).
    #[serde(default = "d_seq_len")]
    pub seq_len: usize,
    /// Longest example in tokens (translation, classification); longer ones are truncated.
    #[serde(default = "d_max_len")]
    pub max_len: usize,
    /// Token budget of one micro-batch, padding included.
    #[serde(default = "d_batch_tokens")]
    pub batch_tokens: usize,
    /// Most rows in a micro-batch (0 = no limit).
    #[serde(default)]
    pub max_rows: usize,
    /// Batches prepared ahead by the loader thread.
    #[serde(default = "d_prefetch")]
    pub prefetch: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenizerKind {
    Char,
    Bpe,
    Pretrained,
}

fn d_min_frequency() -> u64 {
    2
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerConfig {
    pub kind: TokenizerKind,
    /// Target vocabulary size (bpe).
    #[serde(default)]
    pub vocab_size: Option<usize>,
    #[serde(default = "d_min_frequency")]
    pub min_frequency: u64,
    /// `tokenizer.json` (pretrained).
    #[serde(default)]
    pub path: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    /// Linear warmup, then cosine decay to `min_lr_ratio * lr` at `max_steps`.
    Cosine,
    /// The 2017 paper's: linear warmup, then `lr * sqrt(warmup / step)`.
    InverseSqrt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    F32,
    /// bf16 compute, float32 master weights.
    Bf16,
    /// f16 compute, float32 master weights, dynamic loss scaling.
    F16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Loss,
    Bleu,
    Accuracy,
}

impl Metric {
    pub fn higher_is_better(self) -> bool {
        !matches!(self, Metric::Loss)
    }
}

fn d_accumulate() -> usize {
    1
}
fn d_min_lr() -> f64 {
    0.1
}
fn d_wd() -> f64 {
    0.01
}
fn d_b1() -> f64 {
    0.9
}
fn d_b2() -> f64 {
    0.999
}
fn d_eps() -> f64 {
    1e-8
}
fn d_clip() -> Option<f64> {
    Some(1.0)
}
fn d_eval_every() -> usize {
    200
}
fn d_ckpt_every() -> usize {
    500
}
fn d_keep() -> usize {
    3
}
fn d_log_every() -> usize {
    10
}
fn d_eval_decode() -> usize {
    100
}
fn d_beam() -> usize {
    4
}
fn d_precision() -> Precision {
    Precision::F32
}
fn d_schedule() -> Schedule {
    Schedule::Cosine
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerConfig {
    /// Optimiser steps (each of `accumulate` micro-batches).
    pub max_steps: usize,
    /// Stop early (with a final evaluation and checkpoint) after this much training time.
    #[serde(default)]
    pub max_minutes: Option<f64>,
    #[serde(default = "d_accumulate")]
    pub accumulate: usize,
    /// Data parallelism: each micro-batch's rows are split into this many
    /// contiguous shards, each shard's gradients are computed on their own
    /// and the shards' sums are added in shard order. N ranks
    /// (`mpirun -np N attn train`) each compute one shard; one process
    /// computes all of them in turn and gets the same bits. Absent = the
    /// number of ranks of a new run, or the run's own count on resume.
    #[serde(default)]
    pub shards: Option<usize>,
    pub lr: f64,
    #[serde(default = "d_schedule")]
    pub schedule: Schedule,
    #[serde(default)]
    pub warmup_steps: usize,
    /// Floor of the cosine schedule as a fraction of `lr`.
    #[serde(default = "d_min_lr")]
    pub min_lr_ratio: f64,
    #[serde(default = "d_wd")]
    pub weight_decay: f64,
    #[serde(default = "d_b1")]
    pub beta1: f64,
    #[serde(default = "d_b2")]
    pub beta2: f64,
    #[serde(default = "d_eps")]
    pub eps: f64,
    /// Global gradient-norm clipping (absent = off).
    #[serde(default = "d_clip")]
    pub clip_grad_norm: Option<f64>,
    #[serde(default)]
    pub label_smoothing: f64,
    /// Keep an exponential moving average of the weights with this decay
    /// (warmed up as `min(decay, (1 + t) / (10 + t))`); evaluation and the
    /// exported model then use the averaged weights. Absent = off.
    #[serde(default)]
    pub ema_decay: Option<f64>,
    /// Layer-wise learning-rate decay for fine-tuning: a parameter of
    /// numbered layer `i` of `n` (a `layer.{i}.` or `layers.{i}.` segment of
    /// its name) trains at `lr * decay^(n - i)`, the embeddings at
    /// `lr * decay^(n + 1)`, the rest (heads, final norms) at `lr`. Absent = off.
    #[serde(default)]
    pub layer_lr_decay: Option<f64>,
    #[serde(default = "d_precision")]
    pub precision: Precision,
    #[serde(default = "d_eval_every")]
    pub eval_every: usize,
    /// Validation batches per evaluation during training (absent = all).
    #[serde(default)]
    pub eval_batches: Option<usize>,
    /// Validation sentences decoded for BLEU at each evaluation (translation).
    #[serde(default = "d_eval_decode")]
    pub eval_decode: usize,
    /// The validation metric for early stopping and the best model (default per task).
    #[serde(default)]
    pub metric: Option<Metric>,
    /// Stop after this many evaluations without improvement.
    #[serde(default)]
    pub early_stopping_patience: Option<usize>,
    #[serde(default = "d_ckpt_every")]
    pub checkpoint_every: usize,
    #[serde(default = "d_keep")]
    pub keep_checkpoints: usize,
    #[serde(default = "d_log_every")]
    pub log_every: usize,
    /// Beam width of the final test decoding (translation).
    #[serde(default = "d_beam")]
    pub beam_size: usize,
}

/// The `[model]` table: `arch` plus the fields of that architecture's
/// config (vocabulary sizes and special ids come from the tokenizer).
#[derive(Debug, Clone)]
pub enum ModelSpec {
    Gpt(toml::Table),
    Transformer(toml::Table),
    BertClassifier(BertClassifierSpec),
}

fn d_num_labels() -> usize {
    2
}
fn d_cls_dropout() -> f32 {
    0.1
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BertClassifierSpec {
    /// HF folder of the pretrained encoder (or a known model name such as all-minilm-l6-v2).
    pub pretrained: String,
    #[serde(default = "d_num_labels")]
    pub num_labels: usize,
    #[serde(default = "d_cls_dropout")]
    pub dropout: f32,
}

#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub seed: u64,
    pub data: DataConfig,
    pub tokenizer: TokenizerConfig,
    pub model: ModelSpec,
    pub train: TrainerConfig,
    /// Directory relative paths are resolved against.
    pub base_dir: PathBuf,
    /// The TOML text as written (copied into the run directory).
    pub source: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    seed: u64,
    data: DataConfig,
    tokenizer: TokenizerConfig,
    model: toml::Table,
    train: TrainerConfig,
}

/// The special tokens every tokenizer attn trains starts with, in id order.
pub const SPECIALS: [&str; 4] = ["<pad>", "<s>", "</s>", "<unk>"];
pub use attn_models::trained::{BOS_ID, EOS_ID, PAD_ID};

impl TrainConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::parse(&text, &base).map_err(|e| match e {
            Error::Config { field, reason } => Error::format(path, format!("{field}: {reason}")),
            other => other,
        })
    }

    pub fn parse(text: &str, base_dir: &Path) -> Result<Self> {
        let raw: Raw = toml::from_str(text).map_err(|e| Error::config("config", e.to_string().trim().to_string()))?;
        let mut table = raw.model;
        let arch = match table.remove("arch") {
            Some(toml::Value::String(s)) => s,
            Some(_) => return Err(Error::config("model.arch", "must be a string")),
            None => return Err(Error::config("model.arch", "missing (gpt, transformer or bert_classifier)")),
        };
        let model = match arch.as_str() {
            "gpt" => ModelSpec::Gpt(table),
            "transformer" => ModelSpec::Transformer(table),
            "bert_classifier" => ModelSpec::BertClassifier(
                toml::Value::Table(table)
                    .try_into()
                    .map_err(|e: toml::de::Error| Error::config("model", e.to_string()))?,
            ),
            other => {
                return Err(Error::config(
                    "model.arch",
                    format!("unknown architecture `{other}` (gpt, transformer or bert_classifier)"),
                ))
            }
        };
        let cfg = TrainConfig {
            seed: raw.seed,
            data: raw.data,
            tokenizer: raw.tokenizer,
            model,
            train: raw.train,
            base_dir: base_dir.to_path_buf(),
            source: text.to_string(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    pub fn metric(&self) -> Metric {
        self.train.metric.unwrap_or(match self.data.task {
            Task::Lm => Metric::Loss,
            Task::Translation => Metric::Bleu,
            Task::Classification => Metric::Accuracy,
        })
    }

    /// The GPT config with the tokenizer's vocabulary filled in.
    pub fn gpt_config(&self, vocab_size: usize) -> Result<GptConfig> {
        let ModelSpec::Gpt(t) = &self.model else {
            return Err(Error::config("model.arch", "not gpt"));
        };
        let mut t = t.clone();
        reject_derived(&t, &["vocab_size", "bos_id", "eos_id"])?;
        t.insert("vocab_size".into(), toml::Value::Integer(vocab_size as i64));
        let c: GptConfig =
            toml::Value::Table(t).try_into().map_err(|e: toml::de::Error| Error::config("model", e.to_string()))?;
        c.validate().map_err(prefix_model)?;
        Ok(c)
    }

    pub fn transformer_config(&self, vocab_size: usize) -> Result<TransformerConfig> {
        let ModelSpec::Transformer(t) = &self.model else {
            return Err(Error::config("model.arch", "not transformer"));
        };
        let mut t = t.clone();
        reject_derived(&t, &["src_vocab_size", "tgt_vocab_size", "pad_id", "bos_id", "eos_id"])?;
        for k in ["src_vocab_size", "tgt_vocab_size"] {
            t.insert(k.into(), toml::Value::Integer(vocab_size as i64));
        }
        t.insert("pad_id".into(), toml::Value::Integer(PAD_ID as i64));
        t.insert("bos_id".into(), toml::Value::Integer(BOS_ID as i64));
        t.insert("eos_id".into(), toml::Value::Integer(EOS_ID as i64));
        let c: TransformerConfig =
            toml::Value::Table(t).try_into().map_err(|e: toml::de::Error| Error::config("model", e.to_string()))?;
        c.validate().map_err(prefix_model)?;
        Ok(c)
    }

    fn validate(&self) -> Result<()> {
        let d = &self.data;
        let t = &self.train;
        let frac = |f: &str, v: f64| -> Result<()> {
            if !(0.0..0.5).contains(&v) {
                return Err(Error::config(f, format!("must be in [0, 0.5), got {v}")));
            }
            Ok(())
        };
        frac("data.valid_fraction", d.valid_fraction)?;
        frac("data.test_fraction", d.test_fraction)?;
        let pos = |f: &str, v: usize| -> Result<()> {
            if v == 0 {
                return Err(Error::config(f, "must be at least 1"));
            }
            Ok(())
        };
        pos("data.seq_len", d.seq_len)?;
        pos("data.max_len", d.max_len)?;
        pos("data.batch_tokens", d.batch_tokens)?;
        pos("data.prefetch", d.prefetch)?;
        let longest = if d.task == Task::Lm { d.seq_len } else { d.max_len };
        if d.batch_tokens < longest {
            return Err(Error::config(
                "data.batch_tokens",
                format!("{} cannot hold one example of {longest} tokens", d.batch_tokens),
            ));
        }
        let fmt_ok = matches!(
            (d.task, d.format),
            (Task::Lm, CorpusFormat::TextDir)
                | (Task::Translation, CorpusFormat::Ding)
                | (Task::Classification, CorpusFormat::SentimentTsv)
        );
        if !fmt_ok {
            return Err(Error::config(
                "data.format",
                format!("{:?} data does not fit the {:?} task", d.format, d.task),
            ));
        }
        let arch_ok = matches!(
            (d.task, &self.model),
            (Task::Lm, ModelSpec::Gpt(_))
                | (Task::Translation, ModelSpec::Transformer(_))
                | (Task::Classification, ModelSpec::BertClassifier(_))
        );
        if !arch_ok {
            return Err(Error::config(
                "model.arch",
                format!(
                    "the {:?} task trains {}",
                    d.task,
                    match d.task {
                        Task::Lm => "gpt",
                        Task::Translation => "transformer",
                        Task::Classification => "bert_classifier",
                    }
                ),
            ));
        }
        match self.tokenizer.kind {
            TokenizerKind::Bpe => match self.tokenizer.vocab_size {
                Some(v) if v >= 300 => {}
                Some(v) => {
                    return Err(Error::config(
                        "tokenizer.vocab_size",
                        format!("must be at least 300 for byte-level BPE, got {v}"),
                    ))
                }
                None => return Err(Error::config("tokenizer.vocab_size", "required for bpe")),
            },
            TokenizerKind::Char => {
                if self.tokenizer.vocab_size.is_some() {
                    return Err(Error::config(
                        "tokenizer.vocab_size",
                        "a char tokenizer takes its vocabulary from the data",
                    ));
                }
            }
            TokenizerKind::Pretrained => {
                if self.tokenizer.path.is_none() && !matches!(self.model, ModelSpec::BertClassifier(_)) {
                    return Err(Error::config("tokenizer.path", "required for a pretrained tokenizer"));
                }
            }
        }
        if matches!(self.model, ModelSpec::BertClassifier(_)) && self.tokenizer.kind != TokenizerKind::Pretrained {
            return Err(Error::config("tokenizer.kind", "a pretrained encoder needs its own (pretrained) tokenizer"));
        }
        pos("train.max_steps", t.max_steps)?;
        pos("train.accumulate", t.accumulate)?;
        if let Some(n) = t.shards {
            pos("train.shards", n)?;
        }
        pos("train.eval_every", t.eval_every)?;
        pos("train.checkpoint_every", t.checkpoint_every)?;
        pos("train.keep_checkpoints", t.keep_checkpoints)?;
        pos("train.log_every", t.log_every)?;
        pos("train.beam_size", t.beam_size)?;
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            return Err(Error::config("train.lr", format!("must be positive, got {}", t.lr)));
        }
        if !(0.0..=1.0).contains(&t.min_lr_ratio) {
            return Err(Error::config("train.min_lr_ratio", "must be in [0, 1]"));
        }
        if t.schedule == Schedule::InverseSqrt && t.warmup_steps == 0 {
            return Err(Error::config("train.warmup_steps", "the inverse_sqrt schedule needs warmup steps"));
        }
        if !(t.weight_decay >= 0.0) {
            return Err(Error::config("train.weight_decay", "must be >= 0"));
        }
        for (f, b) in [("train.beta1", t.beta1), ("train.beta2", t.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(Error::config(f, format!("must be in [0, 1), got {b}")));
            }
        }
        if !(t.eps > 0.0) {
            return Err(Error::config("train.eps", "must be positive"));
        }
        if let Some(c) = t.clip_grad_norm {
            if !(c > 0.0) {
                return Err(Error::config("train.clip_grad_norm", "must be positive"));
            }
        }
        if let Some(d) = t.layer_lr_decay {
            if !(d > 0.0 && d <= 1.0) {
                return Err(Error::config("train.layer_lr_decay", format!("must be in (0, 1], got {d}")));
            }
        }
        if let Some(d) = t.ema_decay {
            if !(d > 0.0 && d < 1.0) {
                return Err(Error::config("train.ema_decay", format!("must be in (0, 1), got {d}")));
            }
        }
        if !(0.0..1.0).contains(&t.label_smoothing) {
            return Err(Error::config("train.label_smoothing", "must be in [0, 1)"));
        }
        if let Some(m) = t.max_minutes {
            if !(m > 0.0) {
                return Err(Error::config("train.max_minutes", "must be positive"));
            }
        }
        if let Some(0) = t.early_stopping_patience {
            return Err(Error::config("train.early_stopping_patience", "must be at least 1"));
        }
        let metric_ok = match self.metric() {
            Metric::Loss => true,
            Metric::Bleu => d.task == Task::Translation,
            Metric::Accuracy => d.task == Task::Classification,
        };
        if !metric_ok {
            return Err(Error::config("train.metric", format!("{:?} is not measured for {:?}", self.metric(), d.task)));
        }
        // The architecture's own fields, checked now (with a stand-in
        // vocabulary) so a typo fails before any data is read.
        match &self.model {
            ModelSpec::Gpt(_) => {
                let c = self.gpt_config(256)?;
                if c.max_len < d.seq_len {
                    return Err(Error::config(
                        "model.max_len",
                        format!("({}) must cover data.seq_len ({})", c.max_len, d.seq_len),
                    ));
                }
            }
            ModelSpec::Transformer(_) => {
                let c = self.transformer_config(256)?;
                if c.max_len < d.max_len + 1 {
                    return Err(Error::config(
                        "model.max_len",
                        format!("({}) must exceed data.max_len ({}) for the BOS/EOS token", c.max_len, d.max_len),
                    ));
                }
            }
            ModelSpec::BertClassifier(b) => {
                if b.num_labels < 2 {
                    return Err(Error::config("model.num_labels", "must be at least 2"));
                }
                attn_nn::Dropout::new(b.dropout).map_err(prefix_model)?;
            }
        }
        Ok(())
    }
}

fn reject_derived(t: &toml::Table, keys: &[&str]) -> Result<()> {
    for k in keys {
        if t.contains_key(*k) {
            return Err(Error::config(format!("model.{k}"), "is set from the tokenizer; remove it from the config"));
        }
    }
    Ok(())
}

fn prefix_model(e: Error) -> Error {
    match e {
        Error::Config { field, reason } => Error::Config { field: format!("model.{field}"), reason },
        other => other,
    }
}

/// Reads a BERT config.json (for the classifier's pretrained encoder).
pub fn read_bert_config(dir: &Path) -> Result<BertConfig> {
    let p = dir.join("config.json");
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    serde_json::from_str(&text).map_err(|e| Error::format(&p, format!("invalid BERT config: {e}")))
}
