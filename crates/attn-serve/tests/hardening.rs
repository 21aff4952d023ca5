//! One client cannot hurt the others: sampling values that would overflow,
//! a request whose generation fails in a full batch, CPU-heavy prompts,
//! full queues, idle and surplus connections, draining; and who may call:
//! API keys, content types, CORS, unknown models.

mod common;

use std::sync::Arc;
use std::time::Duration;

use attn_serve::metrics::Metrics;
use attn_serve::worker::EmbedWorker;
use attn_serve::{router, AppState, EmbedModel, HttpOptions, ServerLimits};
use attn_test_support::doubles::Gate;
use attn_test_support::toy::EOS;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{call, call_with, post, sse, state, Opts};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

/// Guards a wait that would otherwise hang forever when the behaviour under
/// test is broken; never a speed requirement.
const HANG: Duration = Duration::from_secs(120);

async fn wait_until(mut cond: impl FnMut() -> bool) {
    tokio::time::timeout(HANG, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("the condition never held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_temperatures_and_penalties_cannot_overflow_the_logits() {
    let s = state(Opts::default());
    // 1 / 1e-45 is inf in f32: this request used to get a 500.
    for t in [1e-45, 1e-30, 1e-6, 0.009] {
        let (st, v) =
            post(&s, "/v1/completions", json!({"prompt": "hello", "max_tokens": 8, "temperature": t, "seed": 1})).await;
        assert_eq!(st, StatusCode::OK, "temperature {t}: {v}");
        assert_eq!(v["usage"]["completion_tokens"], 8, "{v}");
    }
    // A repetition penalty small enough to overflow a logit is refused.
    let (st, v) = post(&s, "/v1/completions", json!({"prompt": "hello", "repetition_penalty": 1e-40})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["param"], "repetition_penalty");
}

/// Runs `n` requests at once; returns their status and body.
async fn together(s: &Arc<AppState>, bodies: Vec<Value>) -> Vec<(StatusCode, Value)> {
    let tasks: Vec<_> = bodies
        .into_iter()
        .map(|b| {
            let s = s.clone();
            let path = if b.get("messages").is_some() { "/v1/chat/completions" } else { "/v1/completions" };
            tokio::spawn(async move {
                if b["stream"] == true {
                    let (st, text) = call(&s, "POST", path, &b.to_string()).await;
                    (st, Value::String(text))
                } else {
                    post(&s, path, b).await
                }
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_fails_while_generating_ends_alone_in_a_full_batch() {
    // Prompts as token ids; the poisoned ones end with EOS, which the model
    // double answers with NaN logits.
    let s = state(Opts { poison: Some(EOS), ..Opts::default() });
    let ids = |i: u32| -> Vec<u32> { (0..3 + i % 5).map(|j| 97 + (i * 7 + j * 3) % 26).collect() };
    let body = |i: u32| json!({"model": "toy", "prompt": ids(i), "max_tokens": 16, "temperature": 0});
    let mut alone = Vec::new();
    for i in 0..16 {
        let (st, v) = post(&s, "/v1/completions", body(i)).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        alone.push(v["choices"][0]["text"].clone());
    }
    let mut bodies: Vec<Value> = (0..16).map(body).collect();
    let mut bad = ids(3);
    bad.push(EOS);
    bodies[3] = json!({"model": "toy", "prompt": bad, "max_tokens": 16, "temperature": 0});
    let mut streamed = ids(9);
    streamed.push(EOS);
    bodies[9] = json!({"model": "toy", "prompt": streamed, "max_tokens": 16, "temperature": 0, "stream": true});
    let got = together(&s, bodies).await;
    for (i, (st, v)) in got.iter().enumerate() {
        match i {
            3 => {
                assert_eq!(*st, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
                assert_eq!(v["error"]["type"], "server_error");
                assert!(v["error"]["message"].as_str().unwrap().contains("NaN"), "{v}");
            }
            9 => {
                // The stream: an error event, a finish_reason, then [DONE].
                assert_eq!(*st, StatusCode::OK);
                let data = sse(v.as_str().unwrap());
                assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
                let events: Vec<Value> =
                    data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
                let err = events.iter().position(|e| e.get("error").is_some()).expect("an error event");
                assert!(events[err]["error"]["message"].as_str().unwrap().contains("NaN"));
                let fin: Vec<&Value> = events.iter().filter(|e| !e["choices"][0]["finish_reason"].is_null()).collect();
                assert_eq!(fin.len(), 1, "{events:?}");
                assert_eq!(fin[0]["choices"][0]["finish_reason"], "error");
            }
            _ => {
                assert_eq!(*st, StatusCode::OK, "request {i}: {v}");
                assert_eq!(v["choices"][0]["text"], alone[i], "request {i}");
            }
        }
    }
    let m = s.metrics.render();
    assert!(m.contains("attn_requests_failed_total{model=\"toy\"} 2"), "{m}");
    assert!(m.contains("attn_kv_blocks_used{model=\"toy\"} 0"), "{m}");
    assert_eq!(s.outstanding(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_while_prompts_are_being_tokenized() {
    let gate = Gate::new();
    let http = HttpOptions { cpu_jobs: 2, ..HttpOptions::default() };
    let s = state(Opts { slow_tokenizer: Some(gate.clone()), http, ..Opts::default() });
    // Three prompts whose tokenization blocks (as 400k characters would
    // keep a core busy); the test runtime has two worker threads.
    let slow: Vec<_> = (0..3)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { post(&s, "/v1/completions", json!({"prompt": "SLOW", "max_tokens": 2})).await })
        })
        .collect();
    wait_until(|| gate.waiting() == 2).await;
    // On a runtime thread, as a connection's task would be.
    let s2 = s.clone();
    let health = tokio::spawn(async move { call(&s2, "GET", "/health", "").await });
    let (st, _) = tokio::time::timeout(HANG, health).await.expect("/health answered").unwrap();
    assert_eq!(st, StatusCode::OK);
    // At most cpu_jobs tokenizations at once: the third waits for a slot.
    assert_eq!(gate.waiting(), 2);
    gate.open();
    for t in slow {
        assert_eq!(t.await.unwrap().0, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_embeddings_queue_answers_429_with_retry_after() {
    let gate = Gate::new();
    let g2 = gate.clone();
    let metrics = Arc::new(Metrics::default());
    let worker = EmbedWorker::spawn_fn("enc".into(), 16, metrics.clone(), move |texts: &[&str]| {
        if texts.contains(&"SLOW") {
            g2.pass();
        }
        Ok((texts.iter().map(|_| vec![1.0, 0.0]).collect(), texts.len()))
    })
    .unwrap();
    let limits = ServerLimits { max_embedding_queue: 1, ..ServerLimits::default() };
    let s = Arc::new(AppState::new(vec![], vec![EmbedModel { name: "enc".into(), worker }], metrics, limits));
    let s2 = s.clone();
    let first = tokio::spawn(async move { post(&s2, "/v1/embeddings", json!({"input": "SLOW"})).await });
    wait_until(|| gate.waiting() == 1).await;
    let req = Request::builder()
        .method("POST")
        .uri("/v1/embeddings")
        .header("content-type", "application/json")
        .body(Body::from(json!({"input": "b"}).to_string()))
        .unwrap();
    let resp = router(s.clone()).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["retry-after"], "1");
    let v: Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    gate.open();
    let (st, v) = first.await.unwrap();
    assert_eq!(st, StatusCode::OK, "{v}");
    // The slot is free again.
    let (st, _) = post(&s, "/v1/embeddings", json!({"input": "c"})).await;
    assert_eq!(st, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_guards_v1_but_not_health_or_metrics() {
    let http = HttpOptions { api_key: Some("sekrit".into()), ..HttpOptions::default() };
    let s = state(Opts { http, ..Opts::default() });
    let body = json!({"prompt": "hi", "max_tokens": 2}).to_string();
    let ct = ("content-type", "application/json");
    for auth in [None, Some("Bearer wrong"), Some("Bearer sekri"), Some("Bearer sekrit2"), Some("sekrit")] {
        let mut h = vec![ct];
        if let Some(a) = auth {
            h.push(("authorization", a));
        }
        for (method, path) in [("POST", "/v1/completions"), ("GET", "/v1/models")] {
            let (st, text) = call_with(&s, method, path, &body, &h).await;
            assert_eq!(st, StatusCode::UNAUTHORIZED, "{auth:?} {path}: {text}");
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["error"]["code"], "invalid_api_key", "{v}");
            assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        }
    }
    let ok = [ct, ("authorization", "Bearer sekrit")];
    let (st, text) = call_with(&s, "POST", "/v1/completions", &body, &ok).await;
    assert_eq!(st, StatusCode::OK, "{text}");
    let (st, _) = call_with(&s, "GET", "/v1/models", "", &ok).await;
    assert_eq!(st, StatusCode::OK);
    for path in ["/health", "/metrics"] {
        let (st, _) = call_with(&s, "GET", path, "", &[]).await;
        assert_eq!(st, StatusCode::OK, "{path}");
    }
}

#[test]
fn binding_beyond_loopback_without_a_key_warns() {
    let open = HttpOptions::default();
    let keyed = HttpOptions { api_key: Some("k".into()), ..HttpOptions::default() };
    let any: std::net::IpAddr = "0.0.0.0".parse().unwrap();
    let lo: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    assert!(attn_serve::exposure_warning(any, &open).unwrap().contains("WARNING"));
    assert!(attn_serve::exposure_warning(any, &keyed).is_none());
    assert!(attn_serve::exposure_warning(lo, &open).is_none());
    assert!(attn_serve::exposure_warning("::1".parse().unwrap(), &open).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_bodies_must_be_json() {
    let s = state(Opts::default());
    let body = json!({"prompt": "hi", "max_tokens": 2}).to_string();
    for ct in
        [None, Some("text/plain"), Some("application/x-www-form-urlencoded"), Some("application/json; charset=latin1")]
    {
        let h: Vec<(&str, &str)> = ct.map(|c| ("content-type", c)).into_iter().collect();
        let (st, text) = call_with(&s, "POST", "/v1/completions", &body, &h).await;
        assert_eq!(st, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct:?}: {text}");
        assert!(text.contains("application/json"), "{text}");
    }
    for ct in ["application/json", "application/json; charset=utf-8", "Application/JSON;charset=\"UTF-8\""] {
        let (st, text) = call_with(&s, "POST", "/v1/completions", &body, &[("content-type", ct)]).await;
        assert_eq!(st, StatusCode::OK, "{ct}: {text}");
    }
}

async fn preflight(s: &Arc<AppState>, origin: &str) -> axum::http::Response<Body> {
    let req = Request::builder()
        .method("OPTIONS")
        .uri("/v1/completions")
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type,authorization")
        .body(Body::empty())
        .unwrap();
    router(s.clone()).oneshot(req).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_is_off_unless_origins_are_named() {
    let s = state(Opts::default());
    let r = preflight(&s, "https://evil.example").await;
    assert!(r.headers().get("access-control-allow-origin").is_none(), "{:?}", r.headers());

    let http = HttpOptions {
        api_key: Some("k".into()),
        allowed_origins: vec!["https://app.example".into()],
        ..HttpOptions::default()
    };
    let s = state(Opts { http, ..Opts::default() });
    // The preflight carries no key; it is answered before the key check.
    let r = preflight(&s, "https://app.example").await;
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(r.headers()["access-control-allow-origin"], "https://app.example");
    let r = preflight(&s, "https://evil.example").await;
    assert!(r.headers().get("access-control-allow-origin").is_none(), "{:?}", r.headers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_model_is_404_model_not_found() {
    let s = state(Opts::default());
    for (path, body) in [
        ("/v1/completions", json!({"model": "nope", "prompt": "x"})),
        ("/v1/chat/completions", json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]})),
        ("/v1/embeddings", json!({"model": "nope", "input": "x"})),
        ("/v1/embeddings", json!({"input": "x"})),
    ] {
        let (st, v) = post(&s, path, body).await;
        assert_eq!(st, StatusCode::NOT_FOUND, "{path}: {v}");
        assert_eq!(v["error"]["code"], "model_not_found", "{v}");
        assert_eq!(v["error"]["param"], "model", "{v}");
    }
}

/// Starts `serve` on a free port; returns the address and the stop signal.
async fn start(
    s: &Arc<AppState>,
    drain: Duration,
) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<std::io::Result<()>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(attn_serve::serve(
        s.clone(),
        listener,
        async move {
            let _ = rx.await;
        },
        drain,
    ));
    (addr, tx, server)
}

/// Reads until the server closes the connection.
async fn read_to_close(c: &mut tokio::net::TcpStream) -> String {
    let mut out = Vec::new();
    tokio::time::timeout(HANG, c.read_to_end(&mut out)).await.expect("the server closed the connection").ok();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_surplus_connections_are_closed() {
    let http = HttpOptions { max_connections: 2, header_timeout: Duration::from_secs(1), ..HttpOptions::default() };
    let s = state(Opts { http, ..Opts::default() });
    let (addr, stop, server) = start(&s, Duration::from_secs(5)).await;
    // Two slow clients: one silent, one that never finishes its head.
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut trickle = tokio::net::TcpStream::connect(addr).await.unwrap();
    trickle.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    // A third beyond the cap is closed at once, without an answer.
    let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = third.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(!read_to_close(&mut third).await.contains("200 OK"));
    // The header timeout closes both slow clients.
    read_to_close(&mut silent).await;
    read_to_close(&mut trickle).await;
    // Their slots are free again.
    let mut ok = None;
    for _ in 0..100 {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
        let out = read_to_close(&mut c).await;
        if out.starts_with("HTTP/1.1 200") {
            ok = Some(out);
            break;
        }
        // The slow clients' tasks may not have ended yet.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok.is_some(), "a new connection is served once the slow ones are gone");
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_cut_by_the_drain_deadline_end_with_an_error_finish_and_done() {
    // The prompt's first step waits at the gate until the server drains.
    let gate = Gate::new();
    let s = state(Opts { stall: Some((EOS, gate.clone())), ..Opts::default() });
    let (addr, stop, server) = start(&s, Duration::ZERO).await;
    let client = tokio::spawn(async move {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let body = json!({"prompt": [104, 105, EOS], "max_tokens": 60, "temperature": 0, "stream": true}).to_string();
        let req = format!(
            "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        c.write_all(req.as_bytes()).await.unwrap();
        read_to_close(&mut c).await
    });
    wait_until(|| gate.waiting() == 1).await;
    let _ = stop.send(());
    wait_until(|| s.is_draining()).await;
    gate.open();
    let out = client.await.unwrap();
    server.await.unwrap().unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let data = sse(&out);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{out}");
    let events: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let err = events.iter().find(|e| e.get("error").is_some()).expect("an error event");
    assert!(err["error"]["message"].as_str().unwrap().contains("shutting down"), "{err}");
    let fin: Vec<&Value> = events.iter().filter(|e| !e["choices"][0]["finish_reason"].is_null()).collect();
    assert_eq!(fin.len(), 1, "{events:?}");
    assert_eq!(fin[0]["choices"][0]["finish_reason"], "error");
}
