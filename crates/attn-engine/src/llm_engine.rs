//! The serving engine: many requests, one batched forward call per step.
//!
//! Requests are added at any time; [`LlmEngine::step`] asks the
//! [`Scheduler`] which sequences run, performs the block copies it asks
//! for, runs the model once over every scheduled sequence (their new tokens
//! go through the projections and FFNs as one matrix; attention reads each
//! sequence's own blocks), samples a token for every sequence whose
//! prompt is complete, and reports what each request gained. Finished
//! sequences leave the batch at once and their blocks go back to the pool
//! (full prompt blocks stay findable by the prefix cache).
//!
//! A request with `n > 1` prefills once, then forks: the copies share the
//! prompt's blocks, and the first token each writes into the shared partial
//! block copies that block (copy-on-write).

use std::collections::HashMap;
use std::sync::Arc;

use attn_models::{Logits, PagedLanguageModel, SeqStep, Tokenizer};
use attn_nn::{Error, KvPool, PagedCache, Result};
use candle_core::{DType, Tensor};

use crate::block_manager::{BlockManager, BlockStats};
use crate::constraint::Constraint;
use crate::detok::Detokenizer;
use crate::generate::{FinishReason, StopFilter};
use crate::processors::SamplingParams;
use crate::sampler::Sampler;
use crate::scheduler::{Schedulable, Scheduler, SchedulerConfig, SeqId};

/// Sizes of the engine's KV pool and batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Positions per KV block.
    pub block_size: usize,
    pub num_blocks: usize,
    pub scheduler: SchedulerConfig,
}

/// One request: a prompt and how to continue it.
#[derive(Debug, Clone)]
pub struct EngineRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Completions to generate from the prompt (choices).
    pub n: usize,
    /// Report the chosen token's log-probability and this many alternatives.
    pub logprobs: Option<usize>,
    /// Also report the log-probability of every prompt token after the first.
    pub prompt_logprobs: bool,
    /// A grammar the output must follow (structured output): its mask is
    /// applied to the logits before any sampling processor, and the
    /// sequence stops with [`FinishReason::Stop`] once the grammar is complete.
    pub constraint: Option<Constraint>,
}

impl EngineRequest {
    pub fn new(prompt: Vec<u32>, params: SamplingParams) -> Self {
        EngineRequest { prompt, params, n: 1, logprobs: None, prompt_logprobs: false, constraint: None }
    }
}

/// A token's log-probability under the model (before any sampling
/// processor), and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// What one sequence gained in one step.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqOutput {
    pub request: u64,
    /// The choice index within the request (0..n).
    pub index: usize,
    /// The token sampled this step (`None` for the EOS token, which is not
    /// part of the output, and for steps that only report prompt logprobs).
    pub token: Option<u32>,
    /// Text that became final this step (may be empty).
    pub text: String,
    pub logprob: Option<TokenLogprob>,
    /// Log-probabilities of prompt tokens `1..` (with `prompt_logprobs`),
    /// in the step the prompt's last chunk ran.
    pub prompt_logprobs: Option<Vec<TokenLogprob>>,
    pub finish: Option<FinishReason>,
    /// Why this request failed (with [`FinishReason::Error`]): it alone
    /// ends, the other sequences of the step go on.
    pub error: Option<String>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// Counters and gauges for the metrics endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineStats {
    pub waiting: usize,
    pub running: usize,
    pub blocks: BlockStats,
    pub block_size: usize,
    /// Of the slots in blocks held by running sequences, the share holding
    /// no token (internal fragmentation: the unfilled ends of last blocks).
    pub fragmentation: f64,
    pub preemptions: u64,
    pub aborted: u64,
    /// Requests ended by a failure of their own (see [`SeqOutput::error`]).
    pub failed: u64,
    pub generated_tokens: u64,
    pub prompt_tokens: u64,
    pub steps: u64,
    /// Blocks given back because they fell outside a sliding window every
    /// layer shares.
    pub window_freed_blocks: u64,
}

/// The bounds a request must fit, known without the engine (an HTTP
/// front end checks requests with them before queueing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineLimits {
    pub context_length: usize,
    pub vocab_size: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub max_num_seqs: usize,
}

impl EngineLimits {
    /// Checks a request: the error names what is wrong.
    pub fn validate(&self, req: &EngineRequest) -> Result<()> {
        req.params.validate()?;
        let ctx = self.context_length;
        if req.prompt.is_empty() {
            return Err(Error::input("request", "the prompt has no tokens"));
        }
        if req.prompt.len() >= ctx {
            return Err(Error::input(
                "request",
                format!(
                    "the prompt has {} tokens; the model's context holds {ctx}, with room for at least one generated token",
                    req.prompt.len()
                ),
            ));
        }
        if let Some(&bad) = req.prompt.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(Error::input(
                "request",
                format!("token id {bad} is outside the vocabulary of {}", self.vocab_size),
            ));
        }
        if req.n == 0 || req.n > self.max_num_seqs {
            return Err(Error::config("n", format!("must be in 1..={}", self.max_num_seqs)));
        }
        let longest = (req.prompt.len() + req.params.max_tokens).min(ctx);
        let need = longest.div_ceil(self.block_size) * req.n;
        if need > self.num_blocks {
            return Err(Error::input(
                "request",
                format!(
                    "{longest} tokens x {} choices need {need} KV blocks but the pool holds {} (raise --kv-cache-memory or lower max_tokens)",
                    req.n, self.num_blocks
                ),
            ));
        }
        Ok(())
    }
}

struct Sequence {
    request: u64,
    index: usize,
    tokens: Vec<u32>,
    prompt_len: usize,
    cache: PagedCache,
    params: SamplingParams,
    sampler: Sampler,
    detok: Detokenizer,
    stop: StopFilter,
    logprobs: Option<usize>,
    /// Prompt logprobs still to report (positions `1..prompt_len`).
    prompt_logprobs: Option<Vec<TokenLogprob>>,
    /// Choices still to fork off after the prefill.
    forks: usize,
    max_tokens: usize,
    constraint: Option<Constraint>,
}

impl Schedulable for Sequence {
    fn tokens(&self) -> &[u32] {
        &self.tokens
    }
    fn cache(&self) -> &PagedCache {
        &self.cache
    }
    fn cache_mut(&mut self) -> &mut PagedCache {
        &mut self.cache
    }
    fn wants_all_logits(&self) -> bool {
        self.prompt_logprobs.is_some()
    }
    fn fork_count(&self) -> usize {
        self.forks
    }
}

impl Sequence {
    fn completion(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }
}

pub struct LlmEngine<M, T> {
    model: M,
    tokenizer: Arc<T>,
    pool: Arc<KvPool>,
    bm: BlockManager,
    scheduler: Scheduler,
    seqs: HashMap<SeqId, Sequence>,
    next_seq: SeqId,
    next_request: u64,
    eos: Vec<u32>,
    stats: EngineStats,
}

impl<M: PagedLanguageModel, T: Tokenizer> LlmEngine<M, T> {
    pub fn new(model: M, tokenizer: Arc<T>, cfg: EngineConfig) -> Result<Self> {
        let pool = Arc::new(KvPool::new(model.kv_shape(), cfg.block_size, cfg.num_blocks)?);
        let eos = tokenizer.eos_ids();
        Ok(LlmEngine {
            model,
            tokenizer,
            pool,
            bm: BlockManager::new(cfg.num_blocks, cfg.block_size),
            scheduler: Scheduler::new(cfg.scheduler)?,
            seqs: HashMap::new(),
            next_seq: 0,
            next_request: 0,
            eos,
            stats: EngineStats { block_size: cfg.block_size, ..Default::default() },
        })
    }

    pub fn model(&self) -> &M {
        &self.model
    }

    pub fn tokenizer(&self) -> &Arc<T> {
        &self.tokenizer
    }

    /// What requests are checked against.
    pub fn limits(&self) -> EngineLimits {
        EngineLimits {
            context_length: self.model.context_length(),
            vocab_size: self.model.vocab_size(),
            num_blocks: self.bm.num_blocks(),
            block_size: self.bm.block_size(),
            max_num_seqs: self.scheduler.config().max_num_seqs,
        }
    }

    /// Checks a request without adding it: the error names what is wrong.
    pub fn validate(&self, req: &EngineRequest) -> Result<()> {
        self.limits().validate(req)
    }

    /// Queues a request; returns its id.
    pub fn add_request(&mut self, req: EngineRequest) -> Result<u64> {
        self.validate(&req)?;
        let request = self.next_request;
        self.next_request += 1;
        let max_tokens = req.params.max_tokens.min(self.model.context_length() - req.prompt.len());
        let seq = Sequence {
            request,
            index: 0,
            prompt_len: req.prompt.len(),
            cache: PagedCache::new(self.pool.clone()),
            sampler: Sampler::new(&req.params)?,
            detok: Detokenizer::new(&req.prompt),
            stop: StopFilter::new(&req.params.stop),
            params: req.params,
            logprobs: req.logprobs,
            prompt_logprobs: req.prompt_logprobs.then(Vec::new),
            forks: req.n - 1,
            max_tokens,
            tokens: req.prompt,
            constraint: req.constraint,
        };
        self.stats.prompt_tokens += seq.prompt_len as u64;
        let id = self.next_seq;
        self.next_seq += 1;
        self.seqs.insert(id, seq);
        self.scheduler.add(id);
        Ok(request)
    }

    /// Drops a request (a client went away): its sequences stop and their
    /// blocks are freed. Returns whether anything was running or queued.
    pub fn abort(&mut self, request: u64) -> bool {
        let ids: Vec<SeqId> = self.seqs.iter().filter(|(_, s)| s.request == request).map(|(&id, _)| id).collect();
        for &id in &ids {
            self.finish(id);
        }
        if !ids.is_empty() {
            self.stats.aborted += 1;
        }
        !ids.is_empty()
    }

    fn finish(&mut self, id: SeqId) {
        if let Some(s) = self.seqs.remove(&id) {
            self.bm.free(s.cache.block_table());
        }
        self.scheduler.remove(id);
    }

    pub fn has_work(&self) -> bool {
        !self.scheduler.is_idle()
    }

    pub fn stats(&self) -> EngineStats {
        let (mut held, mut used) = (0usize, 0usize);
        for s in self.seqs.values() {
            held += s.cache.capacity();
            used += s.cache.len();
        }
        EngineStats {
            waiting: self.scheduler.num_waiting(),
            running: self.scheduler.num_running(),
            blocks: self.bm.stats(),
            fragmentation: if held == 0 { 0.0 } else { 1.0 - used as f64 / held as f64 },
            preemptions: self.scheduler.preemptions(),
            ..self.stats
        }
    }

    /// Runs one step. A failure that belongs to one request (its logits
    /// are not finite, sampling or detokenizing fails) ends that request
    /// alone: it gets outputs with [`FinishReason::Error`] and the rest of
    /// the batch goes on. A failure of the batched forward call itself has
    /// no single culprit: every sequence of the step is finished and the
    /// error returned with the requests it hit.
    pub fn step(&mut self) -> std::result::Result<Vec<SeqOutput>, (Error, Vec<u64>)> {
        let plan = self.scheduler.schedule(&mut self.seqs, &mut self.bm);
        if plan.batch.is_empty() {
            return Ok(Vec::new());
        }
        self.stats.steps += 1;
        let hit: Vec<u64> = plan.batch.iter().filter_map(|(id, _)| self.seqs.get(id).map(|s| s.request)).collect();
        match self.run(&plan.batch, &plan.copies) {
            Ok(out) => Ok(out),
            Err(e) => {
                for &(id, _) in &plan.batch {
                    self.finish(id);
                }
                Err((e, hit))
            }
        }
    }

    fn run(&mut self, batch: &[(SeqId, usize)], copies: &[(u32, u32)]) -> Result<Vec<SeqOutput>> {
        if !copies.is_empty() {
            self.model.copy_blocks(&self.pool, copies)?;
        }
        // Sequences that need every position's logits run in their own call.
        let (all, last): (Vec<(SeqId, usize)>, Vec<(SeqId, usize)>) =
            batch.iter().partition(|(id, _)| self.seqs[id].wants_all_logits());
        let mut logits: HashMap<SeqId, Tensor> = HashMap::new();
        for (group, mode) in [(last, Logits::Last), (all, Logits::All)] {
            if group.is_empty() {
                continue;
            }
            let out = self.forward(&group, mode)?;
            for (&(id, _), t) in group.iter().zip(out) {
                logits.insert(id, t);
            }
        }
        let mut outputs = Vec::new();
        for &(id, n) in batch {
            let Some(t) = logits.remove(&id) else { continue };
            let Some(request) = self.seqs.get(&id).map(|s| s.request) else { continue };
            if let Err(e) = self.advance(id, n, &t, &mut outputs) {
                // This request alone ends; the rest of the batch goes on.
                self.fail_request(request, &e, &mut outputs);
            }
        }
        Ok(outputs)
    }

    /// Ends every sequence of `request` with [`FinishReason::Error`] and an
    /// output per choice that says why.
    fn fail_request(&mut self, request: u64, e: &Error, outputs: &mut Vec<SeqOutput>) {
        let mut ids: Vec<SeqId> = self.seqs.iter().filter(|(_, s)| s.request == request).map(|(&id, _)| id).collect();
        ids.sort_unstable();
        for id in ids {
            if let Some(s) = self.seqs.get(&id) {
                outputs.push(SeqOutput {
                    request,
                    index: s.index,
                    token: None,
                    text: String::new(),
                    logprob: None,
                    prompt_logprobs: None,
                    finish: Some(FinishReason::Error),
                    error: Some(format!("generation failed: {e}")),
                    prompt_tokens: s.prompt_len,
                    completion_tokens: s.completion().len(),
                });
            }
            self.finish(id);
        }
        self.stats.failed += 1;
    }

    /// Takes one sequence's logits from this step: records prompt
    /// logprobs, and once the prompt is in, forks its choices and samples.
    fn advance(&mut self, id: SeqId, n: usize, t: &Tensor, outputs: &mut Vec<SeqOutput>) -> Result<()> {
        let s = self.seqs.get_mut(&id).expect("scheduled sequences exist");
        let len = s.cache.len();
        self.bm.register_full_blocks(s.cache.block_table(), &s.tokens, len);
        if let Some(w) = self.pool.shape().window {
            // The next query (at `len`) sees `len + 1 - w..`: blocks before it go back.
            let freed = self.bm.release_outside_window(s.cache.block_table_mut(), (len + 1).saturating_sub(w));
            self.stats.window_freed_blocks += freed as u64;
        }
        let mut prompt_lp = None;
        let last_row = if s.prompt_logprobs.is_some() {
            // Row i holds the distribution of position (len - n + i + 1).
            let rows = t.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            let top = s.logprobs.unwrap_or(0);
            let start = len - n;
            let lps = s.prompt_logprobs.as_mut().expect("checked");
            for (i, row) in rows.iter().enumerate() {
                let next = start + i + 1;
                // (A recomputed chunk after preemption is reported once.)
                if next < s.prompt_len && lps.len() == next - 1 {
                    lps.push(token_logprob(row, s.tokens[next], top));
                }
            }
            if len >= s.prompt_len {
                prompt_lp = s.prompt_logprobs.take();
            }
            rows.into_iter().last().unwrap_or_default()
        } else {
            t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?
        };
        if len < s.tokens.len() {
            // Mid-prefill: nothing to sample yet.
            return Ok(());
        }
        let forks = std::mem::take(&mut s.forks);
        let mut group = vec![id];
        for i in 1..=forks {
            group.push(self.fork(id, i)?);
        }
        for (k, sid) in group.into_iter().enumerate() {
            let mut o = self.sample(sid, &last_row)?;
            if k == 0 {
                o.prompt_logprobs = prompt_lp.clone();
            }
            outputs.push(o);
        }
        Ok(())
    }

    fn forward(&mut self, group: &[(SeqId, usize)], mode: Logits) -> Result<Vec<Tensor>> {
        // Take the sequences out of the map to borrow their caches mutably together.
        let mut taken: Vec<(SeqId, Sequence, usize)> =
            group.iter().map(|&(id, n)| (id, self.seqs.remove(&id).expect("scheduled"), n)).collect();
        let result = {
            let mut steps: Vec<SeqStep<'_, PagedCache>> = taken
                .iter_mut()
                .map(|(_, s, n)| {
                    let len = s.cache.len();
                    SeqStep { tokens: &s.tokens[len..len + *n], cache: &mut s.cache }
                })
                .collect();
            self.model.forward_paged(&mut steps, mode)
        };
        for (id, s, _) in taken {
            self.seqs.insert(id, s);
        }
        result
    }

    fn fork(&mut self, id: SeqId, index: usize) -> Result<SeqId> {
        let parent = &self.seqs[&id];
        let mut params = parent.params.clone();
        // Each choice gets its own stream: seed + index.
        params.seed = Some(parent.sampler.seed().wrapping_add(index as u64));
        let child = Sequence {
            request: parent.request,
            index,
            tokens: parent.tokens.clone(),
            prompt_len: parent.prompt_len,
            cache: parent.cache.clone(),
            sampler: Sampler::new(&params)?,
            detok: Detokenizer::new(&parent.tokens),
            stop: StopFilter::new(&params.stop),
            params,
            logprobs: parent.logprobs,
            prompt_logprobs: None,
            forks: 0,
            max_tokens: parent.max_tokens,
            constraint: parent.constraint.clone(),
        };
        self.bm.fork(child.cache.block_table());
        let cid = self.next_seq;
        self.next_seq += 1;
        self.seqs.insert(cid, child);
        self.scheduler.add_running(cid);
        Ok(cid)
    }

    /// Samples the next token of a sequence whose cache holds all its tokens.
    fn sample(&mut self, id: SeqId, logits: &[f32]) -> Result<SeqOutput> {
        let s = self.seqs.get_mut(&id).expect("sampled sequences exist");
        let lp_top = s.logprobs;
        let mut row = logits.to_vec();
        if let Some(c) = s.constraint.as_mut() {
            c.mask(&mut row)?;
        }
        let prompt = &s.tokens[..s.prompt_len];
        let tok = s.sampler.sample(&mut row, prompt, &s.tokens[s.prompt_len..])?;
        let logprob = lp_top.map(|k| token_logprob(logits, tok, k));
        let mut text = String::new();
        let mut finish = None;
        let mut token = None;
        let mut grammar_done = false;
        if self.eos.contains(&tok) {
            finish = Some(FinishReason::Eos);
        } else {
            token = Some(tok);
            s.tokens.push(tok);
            self.stats.generated_tokens += 1;
            if let Some(c) = s.constraint.as_mut() {
                c.consume(tok)?;
            }
            let piece = s.detok.push(&*self.tokenizer, tok)?;
            if s.stop.push(&piece, &mut |p: &str| text.push_str(p)) {
                finish = Some(FinishReason::Stop);
            } else if s.constraint.as_ref().is_some_and(Constraint::is_finished) {
                // The grammar is complete: what it held back is final.
                grammar_done = true;
                finish = Some(FinishReason::Stop);
            } else if s.completion().len() >= s.max_tokens {
                finish = Some(FinishReason::Length);
            }
        }
        if matches!(finish, Some(FinishReason::Eos | FinishReason::Length)) || grammar_done {
            let tail = s.detok.flush(&*self.tokenizer)?;
            if s.stop.push(&tail, &mut |p: &str| text.push_str(p)) {
                finish = Some(FinishReason::Stop);
            } else {
                s.stop.finish(&mut |p: &str| text.push_str(p));
            }
        }
        let out = SeqOutput {
            request: s.request,
            index: s.index,
            token,
            text,
            logprob,
            prompt_logprobs: None,
            finish,
            error: None,
            prompt_tokens: s.prompt_len,
            completion_tokens: s.completion().len(),
        };
        if finish.is_some() {
            self.finish(id);
        }
        Ok(out)
    }
}

/// The log-probability of `token` under `softmax(logits)` and the `top`
/// most likely tokens.
pub fn token_logprob(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().filter(|x| x.is_finite()).fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&x| (x - max).exp()).sum::<f32>().ln();
    let lp = |i: usize| logits[i] - lse;
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &x) in logits.iter().enumerate() {
            if best.len() < top || x > best[best.len() - 1].1 {
                let at = best.partition_point(|&(_, y)| y >= x);
                best.insert(at, (i as u32, x));
                best.truncate(top);
            }
        }
    }
    TokenLogprob {
        token,
        logprob: logits.get(token as usize).map_or(f32::NEG_INFINITY, |_| lp(token as usize)),
        top: best.into_iter().map(|(i, _)| (i, lp(i as usize))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::generate_from_ids;
    use attn_models::gpt::Gpt;
    use attn_models::LanguageModel;
    use attn_test_support::toy::ByteTokenizer;

    /// A small random GPT over the byte tokenizer's vocabulary.
    fn model(seed: u64) -> Gpt {
        attn_test_support::tiny_gpt(seed, 96)
    }

    fn engine(num_blocks: usize, max_batched_tokens: usize) -> LlmEngine<Gpt, ByteTokenizer> {
        let cfg = EngineConfig {
            block_size: 4,
            num_blocks,
            scheduler: SchedulerConfig { max_num_seqs: 16, max_batched_tokens, max_logits_chunk: 5 },
        };
        LlmEngine::new(model(7), Arc::new(ByteTokenizer::new()), cfg).unwrap()
    }

    fn prompts() -> Vec<Vec<u32>> {
        (0..16).map(|i| (0..3 + (i * 7) % 23).map(|j| ((i * 31 + j * 17) % 250) as u32).collect()).collect()
    }

    fn greedy(max_tokens: usize) -> SamplingParams {
        SamplingParams { max_tokens, ..SamplingParams::greedy() }
    }

    /// Runs to completion; returns each request's tokens per choice and the outputs seen.
    fn drain<M: PagedLanguageModel>(e: &mut LlmEngine<M, ByteTokenizer>) -> HashMap<(u64, usize), Vec<u32>> {
        let mut got: HashMap<(u64, usize), Vec<u32>> = HashMap::new();
        let mut finished = HashMap::new();
        let mut steps = 0;
        while e.has_work() {
            for o in e.step().map_err(|(e, _)| e).unwrap() {
                let toks = got.entry((o.request, o.index)).or_default();
                toks.extend(o.token);
                assert_eq!(toks.len(), o.completion_tokens);
                if o.finish.is_some() {
                    assert!(finished.insert((o.request, o.index), ()).is_none(), "finished twice");
                }
            }
            steps += 1;
            assert!(steps < 10_000, "no progress");
        }
        assert_eq!(finished.len(), got.len(), "every sequence finished");
        e.bm.check(&[]).unwrap();
        got
    }

    #[test]
    fn greedy_output_is_the_same_alone_batched_chunked_and_preempted() {
        let prompts = prompts();
        // Reference: plain generation over a contiguous cache, one at a time.
        let m = model(7);
        let tok = ByteTokenizer::new();
        let want: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| generate_from_ids(&m, &tok, p.clone(), &greedy(12), |_| {}).unwrap().completion_ids)
            .collect();
        // Each request alone in the engine.
        for (p, w) in prompts.iter().zip(&want) {
            let mut e = engine(64, 64);
            let id = e.add_request(EngineRequest::new(p.clone(), greedy(12))).unwrap();
            assert_eq!(&drain(&mut e)[&(id, 0)], w);
        }
        // All 16 together: chunked prefill (budget 24 tokens per step), and
        // then a pool so small that sequences must be preempted.
        for (blocks, budget) in [(200, 24), (24, 16)] {
            let mut e = engine(blocks, budget);
            let ids: Vec<u64> =
                prompts.iter().map(|p| e.add_request(EngineRequest::new(p.clone(), greedy(12))).unwrap()).collect();
            let got = drain(&mut e);
            for (id, w) in ids.iter().zip(&want) {
                assert_eq!(&got[&(*id, 0)], w, "request {id} with {blocks} blocks");
            }
            let s = e.stats();
            if blocks == 24 {
                assert!(s.preemptions > 0, "the small pool preempted: {s:?}");
            }
            assert_eq!(s.blocks.used, 0);
            assert_eq!((s.running, s.waiting), (0, 0));
        }
    }

    /// One request whose logits turn NaN in a full batch of 16 ends alone
    /// with an error; the other 15 get exactly the tokens they get alone.
    #[test]
    fn a_poisoned_request_fails_alone_and_the_batch_goes_on() {
        use attn_test_support::doubles::Poisoned;
        use attn_test_support::toy::EOS;
        let prompts = prompts();
        let mut alone = Vec::new();
        for p in &prompts {
            let mut e = engine(64, 64);
            let id = e.add_request(EngineRequest::new(p.clone(), greedy(12))).unwrap();
            alone.push(drain(&mut e).remove(&(id, 0)).unwrap());
        }
        let cfg = EngineConfig {
            block_size: 4,
            num_blocks: 200,
            scheduler: SchedulerConfig { max_num_seqs: 16, max_batched_tokens: 512, max_logits_chunk: 5 },
        };
        let mut e = LlmEngine::new(Poisoned::new(model(7), EOS), Arc::new(ByteTokenizer::new()), cfg).unwrap();
        let bad = 5;
        let ids: Vec<u64> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut p = p.clone();
                if i == bad {
                    // The poison token is the prompt's last: its logits are the ones sampled.
                    p.push(EOS);
                }
                let n = if i == bad { 2 } else { 1 };
                e.add_request(EngineRequest { n, ..EngineRequest::new(p, greedy(12)) }).unwrap()
            })
            .collect();
        let mut errors = Vec::new();
        let mut got: HashMap<(u64, usize), Vec<u32>> = HashMap::new();
        let mut steps = 0;
        while e.has_work() {
            let outs = e.step().map_err(|(e, _)| e).expect("a per-request failure does not fail the step");
            // All 16 ran in the poisoned step.
            if steps == 0 {
                let requests: std::collections::HashSet<u64> = outs.iter().map(|o| o.request).collect();
                assert_eq!(requests.len(), 16, "{outs:?}");
            }
            for o in outs {
                if o.finish == Some(FinishReason::Error) {
                    errors.push(o);
                } else {
                    assert!(o.error.is_none());
                    got.entry((o.request, o.index)).or_default().extend(o.token);
                }
            }
            steps += 1;
            assert!(steps < 1000, "no progress");
        }
        // Both choices of the poisoned request end, with the reason.
        assert_eq!(errors.iter().map(|o| (o.request, o.index)).collect::<Vec<_>>(), [(ids[bad], 0), (ids[bad], 1)]);
        assert!(errors.iter().all(|o| o.token.is_none() && o.error.as_deref().unwrap().contains("NaN")), "{errors:?}");
        for (i, want) in alone.iter().enumerate() {
            if i != bad {
                assert_eq!(&got[&(ids[i], 0)], want, "request {i}");
            }
        }
        assert!(!got.contains_key(&(ids[bad], 0)));
        let s = e.stats();
        assert_eq!((s.failed, s.blocks.used, s.running, s.waiting), (1, 0, 0, 0));
        e.bm.check(&[]).unwrap();
    }

    /// A tiny temperature acts as the smallest one applied: the row stays
    /// finite and sampling goes on (1 / 1e-45 would overflow to inf).
    #[test]
    fn a_tiny_temperature_does_not_overflow() {
        let mut e = engine(64, 64);
        let params = SamplingParams { temperature: 1e-45, seed: Some(3), max_tokens: 8, ..SamplingParams::default() };
        let id = e.add_request(EngineRequest::new(vec![5, 6, 7], params)).unwrap();
        let got = drain(&mut e);
        assert_eq!(got[&(id, 0)].len(), 8);
    }

    #[test]
    fn prefix_cache_hits_and_n_choices_share_blocks() {
        let prompt: Vec<u32> = (0..22).map(|i| (i * 11 % 250) as u32).collect();
        let mut e = engine(64, 64);
        let a = e.add_request(EngineRequest::new(prompt.clone(), greedy(6))).unwrap();
        let first = drain(&mut e);
        assert_eq!(e.stats().blocks.prefix_hits, 0);
        let b = e.add_request(EngineRequest::new(prompt.clone(), greedy(6))).unwrap();
        let second = drain(&mut e);
        // 22 tokens: 5 full blocks, all usable (the last token is computed).
        assert_eq!(e.stats().blocks.prefix_hits, 20);
        assert_eq!(first[&(a, 0)], second[&(b, 0)]);

        // n = 3 sampled choices: one prefill, forks copy the shared partial
        // block on their first write, each choice equals a single request
        // with its seed.
        let params = SamplingParams { temperature: 1.0, seed: Some(5), max_tokens: 8, ..SamplingParams::default() };
        let req = EngineRequest { n: 3, ..EngineRequest::new(prompt.clone(), params.clone()) };
        let cows = e.stats().blocks.copy_on_write;
        let r = e.add_request(req).unwrap();
        let got = drain(&mut e);
        assert!(e.stats().blocks.copy_on_write >= cows + 2, "{:?}", e.stats());
        for i in 0..3 {
            let mut alone = engine(64, 64);
            let p = SamplingParams { seed: Some(5 + i as u64), ..params.clone() };
            let id = alone.add_request(EngineRequest::new(prompt.clone(), p)).unwrap();
            assert_eq!(drain(&mut alone)[&(id, 0)], got[&(r, i)], "choice {i}");
        }
    }

    #[test]
    fn abort_frees_blocks_and_bad_requests_are_refused() {
        let mut e = engine(16, 16);
        let r = e.add_request(EngineRequest::new(vec![1, 2, 3, 4, 5, 6], greedy(20))).unwrap();
        e.step().unwrap();
        e.step().unwrap();
        assert!(e.stats().blocks.used > 0);
        assert!(e.abort(r));
        assert!(!e.abort(r));
        assert_eq!(e.stats().blocks.used, 0);
        assert_eq!(e.stats().aborted, 1);
        assert!(!e.has_work());
        e.bm.check(&[]).unwrap();

        let bad = |req: EngineRequest| e.validate(&req).unwrap_err().to_string();
        assert!(bad(EngineRequest::new(vec![], greedy(4))).contains("no tokens"));
        assert!(bad(EngineRequest::new(vec![1; 96], greedy(4))).contains("context holds 96"));
        assert!(bad(EngineRequest::new(vec![300], greedy(4))).contains("outside the vocabulary"));
        assert!(bad(EngineRequest::new(vec![1; 80], greedy(10))).contains("KV blocks"));
        assert!(bad(EngineRequest { n: 0, ..EngineRequest::new(vec![1], greedy(4)) }).contains("n"));
        assert!(bad(EngineRequest::new(vec![1], SamplingParams { top_p: 0.0, ..greedy(4) })).contains("top_p"));
    }

    #[test]
    fn logprobs_match_a_full_forward() {
        let prompt: Vec<u32> = (0..13).map(|i| (i * 7 % 250) as u32).collect();
        let mut e = engine(64, 64);
        let req =
            EngineRequest { logprobs: Some(3), prompt_logprobs: true, ..EngineRequest::new(prompt.clone(), greedy(4)) };
        let id = e.add_request(req).unwrap();
        let mut outs = Vec::new();
        while e.has_work() {
            outs.extend(e.step().map_err(|(e, _)| e).unwrap());
        }
        let outs: Vec<SeqOutput> = outs.into_iter().filter(|o| o.request == id).collect();
        let prompt_lps = outs[0].prompt_logprobs.clone().expect("reported with the first token");
        assert_eq!(prompt_lps.len(), prompt.len() - 1);
        assert!(outs[1..].iter().all(|o| o.prompt_logprobs.is_none()));
        // Reference: one forward over prompt + completion with every logit.
        let completion: Vec<u32> = outs.iter().filter_map(|o| o.token).collect();
        let all: Vec<u32> = prompt.iter().chain(&completion).copied().collect();
        let m = model(7);
        let mut cache = m.new_cache().unwrap();
        let rows = LanguageModel::forward(&m, &mut [SeqStep { tokens: &all, cache: &mut cache }], Logits::All).unwrap()
            [0]
        .to_vec2::<f32>()
        .unwrap();
        for (i, lp) in prompt_lps.iter().enumerate() {
            let want = token_logprob(&rows[i], prompt[i + 1], 3);
            assert_eq!(lp.token, prompt[i + 1]);
            assert!((lp.logprob - want.logprob).abs() < 1e-4, "prompt position {}", i + 1);
            assert_eq!(
                lp.top.iter().map(|t| t.0).collect::<Vec<_>>(),
                want.top.iter().map(|t| t.0).collect::<Vec<_>>()
            );
        }
        for (k, o) in outs.iter().enumerate() {
            let lp = o.logprob.as_ref().expect("asked for logprobs");
            let want = token_logprob(&rows[prompt.len() - 1 + k], lp.token, 3);
            assert!((lp.logprob - want.logprob).abs() < 1e-4);
            // Greedy: the chosen token is the most likely.
            assert_eq!(lp.top[0].0, lp.token);
            assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
        }
    }

    /// A schema whose strings are all enums: a random model completes it
    /// within 72 byte tokens.
    pub(crate) fn toy_schema() -> serde_json::Value {
        serde_json::json!({
            "type": "object",
            "properties": {
                "ok": {"type": "boolean"},
                "size": {"enum": ["s", "m", "l"]},
                "inner": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
                    "required": ["n"], "additionalProperties": false},
                "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "minItems": 1, "maxItems": 3}
            },
            "required": ["ok", "size", "inner", "tags"],
            "additionalProperties": false
        })
    }

    /// Checks `text` against [`toy_schema`] field by field.
    pub(crate) fn check_toy_json(text: &str) {
        let v: serde_json::Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        let o = v.as_object().unwrap();
        assert_eq!(o.len(), 4, "{text}");
        assert!(o["ok"].is_boolean(), "{text}");
        assert!(["s", "m", "l"].contains(&o["size"].as_str().unwrap()), "{text}");
        let n = o["inner"]["n"].as_i64().unwrap();
        assert!((0..=9).contains(&n) && o["inner"].as_object().unwrap().len() == 1, "{text}");
        let tags = o["tags"].as_array().unwrap();
        assert!((1..=3).contains(&tags.len()) && tags.iter().all(|t| t == "x" || t == "y"), "{text}");
    }

    #[test]
    fn constrained_output_follows_the_schema_greedy_sampled_and_forked() {
        use crate::constraint::{ConstraintFactory, GrammarSpec};
        let tok = ByteTokenizer::new();
        let factory = ConstraintFactory::new(&tok).unwrap();
        let c = factory.compile(&GrammarSpec::JsonSchema(toy_schema())).unwrap();
        let prompt: Vec<u32> = b"JSON:".iter().map(|&b| b as u32).collect();
        let mut e = engine(256, 64);
        let mut ids = Vec::new();
        let greedy_req =
            EngineRequest { constraint: Some(c.clone()), ..EngineRequest::new(prompt.clone(), greedy(88)) };
        ids.push(e.add_request(greedy_req).unwrap());
        // Sampling at a high temperature with top-k and a repetition
        // penalty: the mask comes first, so no processor lets a
        // disallowed token back in; n = 3 forks the grammar state.
        let params = SamplingParams {
            temperature: 1.5,
            top_k: 40,
            repetition_penalty: 1.3,
            seed: Some(9),
            max_tokens: 88,
            ..SamplingParams::default()
        };
        let sampled = EngineRequest { n: 3, constraint: Some(c.clone()), ..EngineRequest::new(prompt.clone(), params) };
        ids.push(e.add_request(sampled).unwrap());
        let mut texts: HashMap<(u64, usize), String> = HashMap::new();
        let mut finishes = Vec::new();
        while e.has_work() {
            for o in e.step().map_err(|(e, _)| e).unwrap() {
                texts.entry((o.request, o.index)).or_default().push_str(&o.text);
                finishes.extend(o.finish);
            }
        }
        assert_eq!(texts.len(), 4);
        assert!(finishes.iter().all(|&f| f == FinishReason::Stop), "{finishes:?}");
        for t in texts.values() {
            check_toy_json(t);
        }
        // Without the constraint the same greedy request is not JSON.
        let plain = generate_from_ids(&model(7), &tok, prompt, &greedy(88), |_| {}).unwrap();
        assert!(serde_json::from_str::<serde_json::Value>(&plain.text).is_err(), "{:?}", plain.text);
    }

    /// Logits through the paged cache (scattered blocks) equal those of
    /// the contiguous cache, chunk by chunk.
    #[test]
    fn gpt_paged_logits_equal_contiguous() {
        use attn_models::PagedLanguageModel;
        let m = model(7);
        let pool = Arc::new(KvPool::new(m.kv_shape(), 4, 64).unwrap());
        let mut paged = PagedCache::new(pool);
        paged.block_table_mut().extend((0..20u32).map(|i| (i * 7 + 3) % 64));
        let mut cont = m.new_cache().unwrap();
        let toks: Vec<u32> = (0..30).map(|i| (i * 13 % 250) as u32).collect();
        let mut at = 0;
        for n in [10usize, 1, 1, 9, 1] {
            let s = &toks[at..at + n];
            let a = LanguageModel::forward(&m, &mut [SeqStep { tokens: s, cache: &mut cont }], Logits::All).unwrap();
            let b = m.forward_paged(&mut [SeqStep { tokens: s, cache: &mut paged }], Logits::All).unwrap();
            let d = attn_test_support::tensor_max_abs_diff(&a[0], &b[0]);
            assert!(d < 1e-5, "chunk {n} at {at}: {d}");
            at += n;
        }
    }
}
