//! Structured output with a real instruction-tuned model (SmolLM2-135M,
//! byte-level BPE, 49k tokens): through the serving engine, greedy and
//! seeded sampling, the reply is JSON valid under a schema with a nested
//! object, an array, an enum and required fields; the token bytes the
//! grammar sees spell exactly what the tokenizer decodes.

use std::sync::Arc;

use attn_engine::{
    ConstraintFactory, EngineConfig, EngineRequest, FinishReason, GrammarSpec, LlmEngine, SamplingParams,
    SchedulerConfig,
};
use attn_models::chat::Message;
use attn_models::load::{load_model, AnyModel};
use attn_models::Tokenizer;
use serde_json::{json, Value};

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "role": {"enum": ["engineer", "artist", "doctor"]},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 24}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"],
                "additionalProperties": false
            },
            "skills": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 1, "maxItems": 3}
        },
        "required": ["name", "age", "role", "address", "skills"],
        "additionalProperties": false
    })
}

/// Checks `text` against [`schema`] field by field.
fn validate(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    let o = v.as_object().unwrap_or_else(|| panic!("not an object: {text}"));
    assert_eq!(o.len(), 5, "{text}");
    assert!(o["name"].as_str().is_some_and(|s| s.chars().count() <= 24), "{text}");
    assert!(o["age"].as_i64().is_some_and(|a| (0..=150).contains(&a)), "{text}");
    assert!(["engineer", "artist", "doctor"].contains(&o["role"].as_str().unwrap_or("")), "{text}");
    let a = o["address"].as_object().unwrap_or_else(|| panic!("address: {text}"));
    assert_eq!(a.len(), 2, "{text}");
    assert!(a["city"].is_string(), "{text}");
    let zip = a["zip"].as_str().unwrap_or("");
    assert!(zip.len() == 5 && zip.bytes().all(|b| b.is_ascii_digit()), "{text}");
    let skills = o["skills"].as_array().unwrap_or_else(|| panic!("skills: {text}"));
    assert!((1..=3).contains(&skills.len()) && skills.iter().all(Value::is_string), "{text}");
}

#[test]
fn smollm2_json_schema_output_validates_greedy_and_sampled() {
    let path = attn_test_support::real_model("smollm2-135m-instruct");
    let AnyModel::Generator(g) = load_model(&path, &candle_core::Device::Cpu).unwrap() else { panic!("a generator") };
    let tok = Arc::new(g.tokenizer);
    // Token bytes spell what decode spells (ASCII and multi-byte pieces).
    for text in ["{\"name\": \"Zoë\", \"city\": \"Zürich\"}\n", " hello world 123"] {
        let ids = tok.encode(text, false).unwrap();
        let bytes: Vec<u8> = ids.iter().flat_map(|&i| tok.token_bytes(i).unwrap()).collect();
        assert_eq!(String::from_utf8(bytes).unwrap(), text);
    }
    let im_end = tok.eos_ids()[0];
    assert!(tok.is_special(im_end) && !tok.is_special(tok.encode("a", false).unwrap()[0]));

    let factory = ConstraintFactory::new(&*tok).unwrap();
    let template = g.chat_template.as_ref().unwrap();
    let messages = [
        Message::new("system", "You reply with JSON only."),
        Message::new("user", "Describe a fictional person as JSON with name, age, role, address and skills."),
    ];
    let prompt = tok.encode(&template.render(&messages, true).unwrap(), false).unwrap();
    let cfg = EngineConfig {
        block_size: 16,
        num_blocks: 64,
        scheduler: SchedulerConfig { max_num_seqs: 4, max_batched_tokens: 256, max_logits_chunk: 8 },
    };
    let mut engine = LlmEngine::new(g.model, tok.clone(), cfg).unwrap();
    let spec = GrammarSpec::JsonSchema(schema());
    let greedy = SamplingParams { max_tokens: 160, ..SamplingParams::greedy() };
    let sampled =
        SamplingParams { temperature: 0.9, top_p: 0.95, seed: Some(11), max_tokens: 160, ..Default::default() };
    for params in [greedy, sampled] {
        let req = EngineRequest {
            constraint: Some(factory.compile(&spec).unwrap()),
            ..EngineRequest::new(prompt.clone(), params)
        };
        engine.add_request(req).unwrap();
    }
    let mut texts = vec![String::new(); 2];
    let mut finish = vec![None; 2];
    while engine.has_work() {
        for o in engine.step().map_err(|(e, _)| e).unwrap() {
            texts[o.request as usize].push_str(&o.text);
            if o.finish.is_some() {
                finish[o.request as usize] = o.finish;
            }
        }
    }
    for (t, f) in texts.iter().zip(&finish) {
        eprintln!("{f:?}: {t}");
        assert!(matches!(f, Some(FinishReason::Stop | FinishReason::Eos)), "{f:?}: {t}");
        validate(t);
    }
}
