//! No request body can panic the server or get anything but a well-formed
//! answer: random bytes, random JSON, and valid requests with random values
//! in every field (a bounded property-test run).

mod common;

use axum::http::StatusCode;
use proptest::prelude::*;
use serde_json::{json, Value};

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        (-1e6f64..1e6).prop_map(|f| json!(f)),
        prop_oneof![Just(f64::MAX), Just(-0.0), Just(1e-300)].prop_map(|f| json!(f)),
        "[a-z \\n\\u{e9}\\u{1F980}]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const FIELDS: &[&str] = &[
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "stop",
    "seed",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logprobs",
    "top_logprobs",
    "echo",
    "stream",
    "stream_options",
    "input",
    "encoding_format",
];

fn arb_request() -> impl Strategy<Value = (usize, Value)> {
    let base = prop_oneof![
        Just(json!({"prompt": "ab", "max_tokens": 2})),
        Just(json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})),
        Just(json!({"input": "ab"})),
    ];
    (0usize..3, base, prop::collection::vec((0..FIELDS.len(), arb_json()), 0..3)).prop_map(|(ep, mut b, muts)| {
        for (f, v) in muts {
            b[FIELDS[f]] = v;
        }
        // Keep the work per case small whatever the mutation did.
        if b.get("max_tokens").and_then(Value::as_u64).is_some_and(|m| m > 4) {
            b["max_tokens"] = json!(4);
        }
        (ep, b)
    })
}

const ENDPOINTS: &[&str] = &["/v1/completions", "/v1/chat/completions", "/v1/embeddings"];

fn check(status: StatusCode, body: &str) -> Result<(), TestCaseError> {
    prop_assert!(
        // 404: an unknown model (and this server has no embedding model).
        [StatusCode::OK, StatusCode::BAD_REQUEST, StatusCode::NOT_FOUND, StatusCode::PAYLOAD_TOO_LARGE]
            .contains(&status),
        "status {status}: {body}"
    );
    if status == StatusCode::OK {
        prop_assert!(body.contains("\"choices\"") || body.starts_with("data: "), "{body}");
    } else {
        let v: Value = serde_json::from_str(body).map_err(|e| TestCaseError::fail(format!("{e}: {body}")))?;
        prop_assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bodies_get_a_clean_answer(ep in 0usize..3, bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let s = STATE.with(|s| s.clone());
        let (status, body) = rt.block_on(common::call(&s, "POST", ENDPOINTS[ep], &String::from_utf8_lossy(&bytes)));
        check(status, &body)?;
    }

    #[test]
    fn mutated_requests_get_a_clean_answer((ep, body) in arb_request()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let s = STATE.with(|s| s.clone());
        let (status, text) = rt.block_on(common::call(&s, "POST", ENDPOINTS[ep], &body.to_string()));
        check(status, &text)?;
    }
}

thread_local! {
    static STATE: std::sync::Arc<attn_serve::AppState> = common::state(common::Opts::default());
}
