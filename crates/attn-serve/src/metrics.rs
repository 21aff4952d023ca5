//! Prometheus text-format metrics: the engine's gauges (queue, running
//! sequences, KV blocks, fragmentation), counters (tokens, prefix-cache
//! hits, preemptions, cancellations, requests by outcome) and latency
//! histograms (time to first token, inter-token latency, request time).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use attn_engine::EngineStats;

/// Bucket bounds in seconds.
const LATENCY_BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

#[derive(Debug, Clone, Default)]
pub struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn observe(&mut self, v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; LATENCY_BUCKETS.len()];
        }
        for (i, &b) in LATENCY_BUCKETS.iter().enumerate() {
            if v <= b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    fn render(&self, out: &mut String, name: &str, labels: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, &b) in LATENCY_BUCKETS.iter().enumerate() {
            let c = self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.count);
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

/// Everything one model's worker reports.
#[derive(Debug, Clone, Default)]
pub struct ModelMetrics {
    pub engine: EngineStats,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    /// Requests whose client went away before they finished.
    pub cancelled: u64,
    pub embedded_inputs: u64,
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub models: Mutex<BTreeMap<String, ModelMetrics>>,
    /// Responses by status class and endpoint.
    pub requests: Mutex<BTreeMap<(String, u16), u64>>,
}

impl Metrics {
    pub fn update(&self, model: &str, f: impl FnOnce(&mut ModelMetrics)) {
        let mut m = self.models.lock().unwrap_or_else(|p| p.into_inner());
        f(m.entry(model.to_string()).or_default());
    }

    pub fn count_request(&self, endpoint: &str, status: u16) {
        let mut r = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *r.entry((endpoint.to_string(), status)).or_default() += 1;
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let models = self.models.lock().unwrap_or_else(|p| p.into_inner()).clone();
        type Gauge = (&'static str, &'static str, &'static str, fn(&ModelMetrics) -> f64);
        let series: &[Gauge] = &[
            ("attn_queue_length", "gauge", "Sequences waiting to be scheduled", |m| m.engine.waiting as f64),
            ("attn_running_sequences", "gauge", "Sequences in the running batch", |m| m.engine.running as f64),
            ("attn_kv_blocks_total", "gauge", "KV cache blocks in the pool", |m| m.engine.blocks.num_blocks as f64),
            ("attn_kv_blocks_used", "gauge", "KV cache blocks referenced by sequences", |m| {
                m.engine.blocks.used as f64
            }),
            (
                "attn_kv_blocks_free",
                "gauge",
                "KV cache blocks free (including cached prefixes nobody references)",
                |m| (m.engine.blocks.num_blocks - m.engine.blocks.used) as f64,
            ),
            ("attn_kv_blocks_cached_free", "gauge", "Free KV blocks still holding a reusable cached prefix", |m| {
                m.engine.blocks.cached_free as f64
            }),
            ("attn_kv_block_size", "gauge", "Positions per KV block", |m| m.engine.block_size as f64),
            (
                "attn_kv_fragmentation_ratio",
                "gauge",
                "Share of slots in blocks held by running sequences that hold no token",
                |m| m.engine.fragmentation,
            ),
            ("attn_prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache", |m| {
                m.engine.blocks.prefix_queries as f64
            }),
            ("attn_prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache", |m| {
                m.engine.blocks.prefix_hits as f64
            }),
            ("attn_kv_copy_on_write_total", "counter", "KV blocks copied before a shared block was written", |m| {
                m.engine.blocks.copy_on_write as f64
            }),
            ("attn_preemptions_total", "counter", "Sequences preempted (recomputed) for lack of KV blocks", |m| {
                m.engine.preemptions as f64
            }),
            ("attn_generated_tokens_total", "counter", "Tokens generated", |m| m.engine.generated_tokens as f64),
            ("attn_prompt_tokens_total", "counter", "Prompt tokens received", |m| m.engine.prompt_tokens as f64),
            ("attn_engine_steps_total", "counter", "Batched forward steps", |m| m.engine.steps as f64),
            ("attn_requests_cancelled_total", "counter", "Requests cancelled because the client disconnected", |m| {
                m.cancelled as f64
            }),
            ("attn_requests_failed_total", "counter", "Requests ended by a generation failure of their own", |m| {
                m.engine.failed as f64
            }),
            ("attn_embedding_inputs_total", "counter", "Texts embedded", |m| m.embedded_inputs as f64),
        ];
        for (name, kind, help, get) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (model, m) in &models {
                let _ = writeln!(out, "{name}{{model=\"{}\"}} {}", escape(model), get(m));
            }
        }
        for (model, m) in &models {
            let l = format!("model=\"{}\"", escape(model));
            m.ttft.render(&mut out, "attn_time_to_first_token_seconds", &l, "Time from request to first token");
            m.itl.render(&mut out, "attn_inter_token_latency_seconds", &l, "Time between successive tokens");
            m.e2e.render(&mut out, "attn_request_duration_seconds", &l, "Time from request to its last token");
        }
        let _ = writeln!(out, "# HELP attn_http_requests_total HTTP responses by endpoint and status\n# TYPE attn_http_requests_total counter");
        for ((endpoint, status), n) in self.requests.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "attn_http_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}");
        }
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
