//! attn-engine: turning a model's logits into text.
//!
//! Decoding is a pipeline that does not know which model produced the logits:
//! [`processors`] reshape one row of logits (penalties, temperature, top-k,
//! top-p, min-p), the [`sampler`] picks a token, [`generate()`] drives any
//! [`attn_models::LanguageModel`] through prefill and cached decode steps and
//! streams text through the UTF-8-safe [`detok`]enizer, and [`beam`] search
//! runs several hypotheses as one batched forward call; [`speculative`]
//! decoding verifies a drafter's proposals in one call of the target;
//! a [`constraint`] keeps the output within a grammar (JSON schema, Lark).

pub mod beam;
pub mod block_manager;
pub mod constraint;
pub mod detok;
pub mod generate;
pub mod llm_engine;
pub mod perplexity;
pub mod processors;
pub mod sampler;
pub mod scheduler;
pub mod speculative;

pub use beam::{beam_search, BeamParams, Hypothesis};
pub use block_manager::{BlockManager, BlockStats};
pub use constraint::{Constraint, ConstraintFactory, GrammarSpec};
pub use detok::Detokenizer;
pub use generate::{generate, generate_constrained, generate_from_ids, FinishReason, Generation, Timings};
pub use llm_engine::{EngineConfig, EngineLimits, EngineRequest, EngineStats, LlmEngine, SeqOutput, TokenLogprob};
pub use perplexity::{perplexity, Perplexity};
pub use processors::SamplingParams;
pub use sampler::Sampler;
pub use scheduler::SchedulerConfig;
pub use speculative::{
    generate_speculative, Draft, Drafter, ModelDrafter, NgramDrafter, SpecStats, SpeculativeGeneration,
    MAX_DRAFT_TOKENS,
};
