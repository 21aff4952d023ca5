//! Structured output over HTTP (`response_format`) with the tiny random
//! GPT: whatever the model prefers, the text is JSON valid under the
//! schema, streamed or not; a schema the grammar engine refuses is a 400.

mod common;

use axum::http::StatusCode;
use common::{call, post, sse, state, Opts};
use serde_json::{json, Value};

/// Every string is an enum, so a random model finishes in a few dozen tokens.
fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "answer": {"enum": ["yes", "no"]},
            "detail": {"type": "object", "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 5}},
                "required": ["score"], "additionalProperties": false},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}
        },
        "required": ["answer", "detail", "tags"],
        "additionalProperties": false
    })
}

fn check(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    assert!(["yes", "no"].contains(&v["answer"].as_str().unwrap()), "{text}");
    assert!((1..=5).contains(&v["detail"]["score"].as_i64().unwrap()), "{text}");
    let tags = v["tags"].as_array().unwrap();
    assert!(tags.len() <= 2 && tags.iter().all(|t| t == "a" || t == "b"), "{text}");
    assert_eq!(v.as_object().unwrap().len(), 3, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_schema_output_validates_streamed_or_not() {
    let s = state(Opts::default());
    let format = json!({"type": "json_schema", "json_schema": {"name": "review", "schema": schema(), "strict": true}});
    let chat = json!({"model": "toy", "messages": [{"role": "user", "content": "review"}], "max_tokens": 64,
        "temperature": 0, "response_format": format});
    let (st, v) = post(&s, "/v1/chat/completions", chat.clone()).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    check(&text);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // Streamed: the same text, piece by piece.
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let (st, body) = call(&s, "POST", "/v1/chat/completions", &streamed.to_string()).await;
    assert_eq!(st, StatusCode::OK);
    let data = sse(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let joined: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(joined, text);

    // Sampled choices (n = 3, seeded, high temperature) and the completions endpoint.
    let sampled = json!({"model": "toy", "prompt": "json:", "max_tokens": 64, "temperature": 1.8, "seed": 7, "n": 3,
        "response_format": format});
    let (st, v) = post(&s, "/v1/completions", sampled).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    for c in v["choices"].as_array().unwrap() {
        check(c["text"].as_str().unwrap());
        assert_eq!(c["finish_reason"], "stop");
    }

    // json_object: any object.
    let obj = json!({"prompt": "x", "max_tokens": 64, "temperature": 0, "response_format": {"type": "json_object"}});
    let (st, v) = post(&s, "/v1/completions", obj).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert!(text.starts_with('{'), "{text}");
    if v["choices"][0]["finish_reason"] == "stop" {
        assert!(serde_json::from_str::<Value>(text).unwrap().is_object(), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_response_formats_are_400_naming_response_format() {
    let s = state(Opts::default());
    let with = |format: Value| json!({"messages": [{"role": "user", "content": "x"}], "response_format": format});
    let cases = [
        (json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}), ""),
        (json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/none"}}}), ""),
        (
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "minLength": 5, "maxLength": 2}}}),
            "",
        ),
        (json!({"type": "json_schema", "json_schema": {"name": "x"}}), "schema is missing"),
        (json!({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}), "name"),
        (json!({"type": "json_schema"}), "json_schema"),
        (json!({"type": "yaml"}), "unknown type"),
        (json!("json"), "type"),
    ];
    for (format, needle) in cases {
        let (st, v) = post(&s, "/v1/chat/completions", with(format.clone())).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{format}: {v}");
        assert_eq!(v["error"]["param"], "response_format", "{format}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(needle), "{format}: {v}");
    }
    // The server still answers afterwards, and text is plain text.
    let (st, _) = post(&s, "/v1/chat/completions", with(json!({"type": "text"}))).await;
    assert_eq!(st, StatusCode::OK);
}
