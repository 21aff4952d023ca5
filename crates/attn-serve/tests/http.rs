//! The HTTP server end to end on a small random GPT over a byte tokenizer:
//! response shapes, streaming, batching invariance, errors, limits,
//! cancellation and draining. (The real models and the official `openai`
//! client are exercised by crates/attn-cli/tests/openai_client.rs.)

mod common;

use std::time::Duration;

use attn_serve::router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{call, post, sse, state, Opts};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

fn prompt(i: usize) -> String {
    (0..3 + (i * 5) % 17).map(|j| (b'a' + ((i * 7 + j * 3) % 26) as u8) as char).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_output_is_the_same_alone_and_among_fifteen_others() {
    let s = state(Opts::default());
    let body = |i: usize| json!({"model": "toy", "prompt": prompt(i), "max_tokens": 16, "temperature": 0});
    let mut alone = Vec::new();
    for i in 0..16 {
        let (st, v) = post(&s, "/v1/completions", body(i)).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        alone.push(v["choices"][0]["text"].as_str().unwrap().to_string());
    }
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move { post(&s, "/v1/completions", body(i)).await })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let (st, v) = t.await.unwrap();
        assert_eq!(st, StatusCode::OK);
        assert_eq!(v["choices"][0]["text"].as_str().unwrap(), alone[i], "request {i}");
        let u = &v["usage"];
        assert_eq!(u["prompt_tokens"], json!(prompt(i).len() + 1));
        assert_eq!(
            u["total_tokens"].as_u64(),
            Some(u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap())
        );
    }
    // The batch really ran together: fewer steps than 16 requests one by one.
    let m = s.metrics.render();
    assert!(m.contains("attn_generated_tokens_total{model=\"toy\"}"), "{m}");
    assert!(m.contains("attn_kv_blocks_used{model=\"toy\"} 0"), "all blocks returned: {m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_equals_non_streaming_and_ends_with_done() {
    let s = state(Opts::default());
    let req = json!({"model": "toy", "prompt": "hello", "max_tokens": 12, "temperature": 0});
    let (_, full) = post(&s, "/v1/completions", req.clone()).await;
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let (st, body) = call(&s, "POST", "/v1/completions", &sreq.to_string()).await;
    assert_eq!(st, StatusCode::OK);
    let data = sse(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(data.iter().filter(|d| *d == "[DONE]").count(), 1);
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(text, full["choices"][0]["text"].as_str().unwrap());
    let finishes: Vec<&Value> = chunks.iter().filter(|c| !c["choices"][0]["finish_reason"].is_null()).collect();
    assert_eq!(finishes.len(), 1);
    assert_eq!(finishes[0]["usage"], full["usage"], "usage rides on the last chunk");
    assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"] && c["object"] == "text_completion"));

    // Chat streaming with include_usage: role first, usage chunk with no choices at the end.
    let chat = json!({"model": "toy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
        "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
    let (_, body) = call(&s, "POST", "/v1/chat/completions", &chat.to_string()).await;
    let data = sse(&body);
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], json!(6));
    let mut non_stream = chat.clone();
    non_stream["stream"] = json!(false);
    let (_, v) = post(&s, "/v1/chat/completions", non_stream).await;
    let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(streamed, v["choices"][0]["message"]["content"].as_str().unwrap());
    assert_eq!(v["object"], "chat.completion");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_echo_n_and_seed() {
    let s = state(Opts::default());
    let (st, v) = post(
        &s,
        "/v1/completions",
        json!({"model": "toy", "prompt": "abcabc", "max_tokens": 3, "temperature": 0, "logprobs": 2, "echo": true}),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let c = &v["choices"][0];
    assert!(c["text"].as_str().unwrap().starts_with("abcabc"));
    let lp = &c["logprobs"];
    // BOS + 6 prompt bytes + 3 generated.
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 10);
    assert_eq!(lp["token_logprobs"][0], Value::Null);
    assert!(lp["token_logprobs"].as_array().unwrap()[1..].iter().all(|x| x.as_f64().is_some_and(|f| f <= 0.0)));
    assert_eq!(lp["top_logprobs"][5].as_object().unwrap().len(), 2);
    // Scoring only: max_tokens 0 with echo gives the prompt's logprobs and no completion.
    let (st, v) = post(
        &s,
        "/v1/completions",
        json!({"model": "toy", "prompt": "abcabc", "max_tokens": 0, "logprobs": 1, "echo": true}),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["text"], "abcabc");
    assert_eq!(v["usage"]["completion_tokens"], 0);
    assert_eq!(v["choices"][0]["logprobs"]["tokens"].as_array().unwrap().len(), 7);
    // n choices with a seed are reproducible.
    let req = json!({"model": "toy", "prompt": "xyz", "max_tokens": 8, "temperature": 1.0, "seed": 3, "n": 3});
    let (_, a) = post(&s, "/v1/completions", req.clone()).await;
    let (_, b) = post(&s, "/v1/completions", req).await;
    assert_eq!(a["choices"].as_array().unwrap().len(), 3);
    assert_eq!(a["choices"], b["choices"]);
    // Chat logprobs.
    let (_, v) = post(
        &s,
        "/v1/chat/completions",
        json!({"model": "toy", "messages": [{"role": "user", "content": "q"}], "max_tokens": 2, "temperature": 0,
            "logprobs": true, "top_logprobs": 2}),
    )
    .await;
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 2);
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_that_name_the_problem() {
    let s = state(Opts::default());
    let cases: Vec<(&str, &str, Option<&str>, &str)> = vec![
        ("/v1/completions", r#"{"prompt": "x""#, None, "malformed JSON"),
        ("/v1/completions", "", None, "empty"),
        ("/v1/completions", r#"{"prompt": "x", "temperature": "hot"}"#, Some("temperature"), "invalid type"),
        ("/v1/completions", r#"{"prompt": "x", "top_p": 1.5}"#, Some("top_p"), "(0, 1]"),
        ("/v1/completions", r#"{"prompt": "x", "max_tokens": 100000}"#, Some("max_tokens"), "at most 64"),
        ("/v1/completions", r#"{"prompt": "x", "n": 99}"#, Some("n"), "n must be"),
        ("/v1/completions", r#"{"prompt": "x", "logprobs": 50}"#, Some("logprobs"), "at most"),
        ("/v1/completions", r#"{"prompt": ["a", "b"]}"#, Some("prompt"), "one prompt"),
        ("/v1/completions", r#"{"prompt": [1, 2, 999]}"#, None, "outside the vocabulary"),
        ("/v1/completions", r#"{"prompt": 5}"#, Some("prompt"), "prompt"),
        ("/v1/chat/completions", r#"{"messages": []}"#, Some("messages"), "empty"),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "robot", "content": "x"}]}"#,
            Some("messages[0].role"),
            "unknown role",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}"#,
            Some("top_logprobs"),
            "logprobs: true",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}"#,
            Some("tools[0].function"),
            "must be an object",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}]}"#,
            Some("tools"),
            "does not render tools",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}"#,
            Some("response_format"),
            "unknown type",
        ),
        ("/v1/completions", r#"{"prompt": "x", "logit_bias": {"5": 10}}"#, Some("logit_bias"), "not supported"),
    ];
    for (path, body, param, needle) in cases {
        let (st, text) = call(&s, "POST", path, body).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{path} {body}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        let e = &v["error"];
        assert_eq!(e["type"], "invalid_request_error");
        assert!(e["message"].as_str().unwrap().contains(needle), "{body}: {e}");
        if let Some(p) = param {
            assert_eq!(e["param"], p, "{body}: {e}");
        }
    }
    // A prompt longer than the context (128 tokens).
    let long = "z".repeat(200);
    let (st, v) = post(&s, "/v1/completions", json!({"prompt": long})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(v["error"]["message"].as_str().unwrap().contains("context holds 128"), "{v}");
    // Too large a body, an unknown path.
    let (st, text) = call(&s, "POST", "/v1/completions", &format!(r#"{{"prompt": "{}"}}"#, "a".repeat(70_000))).await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "{text}");
    assert!(text.contains("larger than"));
    let (st, _) = call(&s, "GET", "/v1/nothing", "").await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, text) = call(&s, "GET", "/v1/models", "").await;
    assert_eq!(st, StatusCode::OK);
    assert!(text.contains("\"toy\""));
    let (st, _) = call(&s, "GET", "/health", "").await;
    assert_eq!(st, StatusCode::OK);
    let m = s.metrics.render();
    assert!(m.contains("attn_http_requests_total{endpoint=\"completions\",status=\"400\"}"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_with_retry_after() {
    let s = state(Opts { max_num_seqs: 1, max_queue: 0, ..Opts::default() });
    // One long request occupies the only place.
    let s2 = s.clone();
    let first = tokio::spawn(async move {
        post(&s2, "/v1/completions", json!({"prompt": "a", "max_tokens": 64, "temperature": 0})).await
    });
    while s.outstanding() == 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let req = Request::builder()
        .method("POST")
        .uri("/v1/completions")
        .header("content-type", "application/json")
        .body(Body::from(json!({"prompt": "b", "max_tokens": 4}).to_string()))
        .unwrap();
    let resp = router(s.clone()).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(first.await.unwrap().0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_frees_its_blocks() {
    let s = state(Opts::default());
    let req = Request::builder()
        .method("POST")
        .uri("/v1/completions")
        .header("content-type", "application/json")
        .body(Body::from(json!({"prompt": "abc", "max_tokens": 64, "temperature": 0, "stream": true}).to_string()))
        .unwrap();
    let resp = router(s.clone()).oneshot(req).await.unwrap();
    let mut body = resp.into_body();
    // Read the first chunk, then hang up.
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    drop(body);
    let mut waited = 0;
    while s.outstanding() > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        waited += 1;
        assert!(waited < 2000, "the request was not cancelled");
    }
    let m = s.metrics.render();
    assert!(m.contains("attn_requests_cancelled_total{model=\"toy\"} 1"), "{m}");
    assert!(m.contains("attn_kv_blocks_used{model=\"toy\"} 0"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_requests_and_refuses_new_ones() {
    let s = state(Opts::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(attn_serve::serve(
        s.clone(),
        listener,
        async move {
            let _ = stop_rx.await;
        },
        Duration::from_secs(20),
    ));
    // A raw HTTP/1.1 request in flight when the signal comes. The toy model
    // can answer within a millisecond, so poll without sleeping and, should
    // a request finish before it is seen in flight, send another (bounded).
    let send = move || {
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            let body = json!({"prompt": "abc", "max_tokens": 48, "temperature": 0}).to_string();
            let req = format!(
                "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            c.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).await.unwrap();
            out
        })
    };
    let mut attempts = 0;
    let client = loop {
        attempts += 1;
        let client = send();
        let caught = loop {
            if s.outstanding() > 0 {
                break true;
            }
            if client.is_finished() {
                break false;
            }
            tokio::task::yield_now().await;
        };
        if caught {
            break client;
        }
        assert!(client.await.unwrap().starts_with("HTTP/1.1 200"));
        assert!(attempts < 50, "no request was seen in flight in {attempts} attempts");
    };
    let _ = stop_tx.send(());
    tokio::time::sleep(Duration::from_millis(20)).await;
    // New work is refused while draining.
    let (st, _) = post(&s, "/v1/completions", json!({"prompt": "x"})).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
    let out = client.await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("\"finish_reason\""), "the in-flight request finished: {out}");
    server.await.unwrap().unwrap();
}
