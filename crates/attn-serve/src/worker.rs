//! The threads that run models. The HTTP side never computes: it validates,
//! submits, and forwards what the workers send back.
//!
//! A generation worker owns one [`LlmEngine`]. It sleeps while there is
//! nothing to do; otherwise it takes in every queued submission, aborts
//! requests whose client has gone (the receiving end of their channel was
//! dropped), runs one engine step and sends each request its outputs. New
//! requests therefore join the running batch at the next step.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use attn_engine::{EngineConfig, EngineLimits, EngineRequest, LlmEngine, SeqOutput};
use attn_models::bert::SentenceEncoder;
use attn_models::{PagedLanguageModel, Tokenizer};
use tokio::sync::{mpsc as tmpsc, oneshot};

use crate::metrics::Metrics;

/// What a request's stream receives.
#[derive(Debug)]
pub enum Event {
    Output(SeqOutput),
    Error(String),
}

pub struct Submission {
    pub request: EngineRequest,
    pub events: tmpsc::UnboundedSender<Event>,
    pub received: Instant,
}

enum Command {
    Submit(Submission),
    /// End every request now with this error, and go on serving (the
    /// drain deadline passed).
    AbortAll(String),
    /// Abort everything and exit (after the drain deadline).
    Stop,
}

/// Handle to a generation worker thread.
pub struct GenWorker {
    tx: Sender<Command>,
    limits: EngineLimits,
    /// Requests submitted and not finished (queued or running).
    pub outstanding: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

struct Live {
    events: tmpsc::UnboundedSender<Event>,
    received: Instant,
    /// Per choice: when its last token came.
    last_token: Vec<Option<Instant>>,
    open_choices: usize,
}

impl GenWorker {
    pub fn spawn<M, T>(
        name: String,
        model: M,
        tokenizer: Arc<T>,
        cfg: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> attn_nn::Result<Self>
    where
        M: PagedLanguageModel + Send + 'static,
        T: Tokenizer + Send + Sync + 'static,
    {
        let engine = LlmEngine::new(model, tokenizer, cfg)?;
        let limits = engine.limits();
        let (tx, rx) = mpsc::channel();
        let outstanding = Arc::new(AtomicUsize::new(0));
        let out2 = outstanding.clone();
        let thread = std::thread::Builder::new()
            .name(format!("engine-{name}"))
            .spawn(move || run(name, engine, rx, metrics, out2))
            .map_err(|e| attn_nn::Error::input("serve", format!("cannot start the engine thread: {e}")))?;
        Ok(GenWorker { tx, limits, outstanding, thread: Some(thread) })
    }

    pub fn limits(&self) -> EngineLimits {
        self.limits
    }

    /// Queues a validated request. Fails only if the worker has exited.
    pub fn submit(&self, s: Submission) -> Result<(), String> {
        self.outstanding.fetch_add(1, Ordering::SeqCst);
        self.tx.send(Command::Submit(s)).map_err(|_| {
            self.outstanding.fetch_sub(1, Ordering::SeqCst);
            "the model's engine has stopped".to_string()
        })
    }

    /// Ends every queued or running request with an error event saying
    /// `reason`; the worker keeps serving.
    pub fn abort_all(&self, reason: &str) {
        let _ = self.tx.send(Command::AbortAll(reason.to_string()));
    }

    /// Aborts what is left and waits for the thread.
    pub fn stop(&mut self) {
        let _ = self.tx.send(Command::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run<M: PagedLanguageModel, T: Tokenizer>(
    name: String,
    mut engine: LlmEngine<M, T>,
    rx: Receiver<Command>,
    metrics: Arc<Metrics>,
    outstanding: Arc<AtomicUsize>,
) {
    let mut live: HashMap<u64, Live> = HashMap::new();
    let done = |live: &mut HashMap<u64, Live>, id: u64| {
        if live.remove(&id).is_some() {
            outstanding.fetch_sub(1, Ordering::SeqCst);
        }
    };
    loop {
        // Sleep only when idle; otherwise take what has arrived and go on.
        let mut cmds = Vec::new();
        if !engine.has_work() {
            match rx.recv() {
                Ok(c) => cmds.push(c),
                Err(_) => return,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(c) => cmds.push(c),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    if !engine.has_work() && cmds.is_empty() {
                        return;
                    }
                    break;
                }
            }
        }
        for c in cmds {
            match c {
                Command::Stop => {
                    for (id, l) in live.drain() {
                        engine.abort(id);
                        let _ = l.events.send(Event::Error("the server is shutting down".into()));
                        outstanding.fetch_sub(1, Ordering::SeqCst);
                    }
                    return;
                }
                Command::AbortAll(reason) => {
                    for (id, l) in live.drain() {
                        engine.abort(id);
                        let _ = l.events.send(Event::Error(reason.clone()));
                        outstanding.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                Command::Submit(s) => {
                    let n = s.request.n;
                    match engine.add_request(s.request) {
                        Ok(id) => {
                            live.insert(
                                id,
                                Live {
                                    events: s.events,
                                    received: s.received,
                                    last_token: vec![None; n],
                                    open_choices: n,
                                },
                            );
                        }
                        Err(e) => {
                            let _ = s.events.send(Event::Error(e.to_string()));
                            outstanding.fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                }
            }
        }
        // Clients that went away: stop their sequences, free their blocks.
        let gone: Vec<u64> = live.iter().filter(|(_, l)| l.events.is_closed()).map(|(&id, _)| id).collect();
        for id in gone {
            engine.abort(id);
            done(&mut live, id);
            metrics.update(&name, |m| m.cancelled += 1);
        }
        let outs = match engine.step() {
            Ok(o) => o,
            Err((e, hit)) => {
                tracing::error!("engine step failed: {e}");
                for id in hit {
                    if let Some(l) = live.get(&id) {
                        let _ = l.events.send(Event::Error(format!("generation failed: {e}")));
                    }
                    done(&mut live, id);
                }
                Vec::new()
            }
        };
        // Metrics first, so that whoever sees a request finish also sees
        // the engine state after it.
        let now = Instant::now();
        let (mut ttft, mut itl, mut e2e) = (Vec::new(), Vec::new(), Vec::new());
        let mut closing = Vec::new();
        for o in &outs {
            if o.error.is_some() {
                continue;
            }
            let Some(l) = live.get_mut(&o.request) else { continue };
            if let Some(slot) = l.last_token.get_mut(o.index) {
                match slot.replace(now) {
                    None => ttft.push((now - l.received).as_secs_f64()),
                    Some(prev) => itl.push((now - prev).as_secs_f64()),
                }
            }
            if o.finish.is_some() {
                l.open_choices = l.open_choices.saturating_sub(1);
                if l.open_choices == 0 {
                    e2e.push((now - l.received).as_secs_f64());
                    closing.push(o.request);
                }
            }
        }
        let stats = engine.stats();
        metrics.update(&name, |m| {
            m.engine = stats;
            ttft.iter().for_each(|&v| m.ttft.observe(v));
            itl.iter().for_each(|&v| m.itl.observe(v));
            e2e.iter().for_each(|&v| m.e2e.observe(v));
        });
        for o in outs {
            let Some(l) = live.get(&o.request) else { continue };
            match o.error {
                // This request alone failed: its client hears why, once.
                Some(e) => {
                    let _ = l.events.send(Event::Error(e));
                    done(&mut live, o.request);
                }
                None => {
                    let _ = l.events.send(Event::Output(o));
                }
            }
        }
        for id in closing {
            done(&mut live, id);
        }
    }
}

/// A batch of texts to embed, and where the answer goes.
pub struct EmbedJob {
    pub texts: Vec<String>,
    /// The embeddings and the number of tokens the texts made (after truncation).
    pub reply: oneshot::Sender<EmbedResult>,
}

/// The result of embedding a batch: the vectors and the tokens they took.
pub type EmbedResult = Result<(Vec<Vec<f32>>, usize), String>;

/// Handle to the thread that runs an encoder model.
pub struct EmbedWorker {
    tx: Sender<EmbedJob>,
    pub max_seq_length: usize,
    /// Jobs submitted and not answered (queued or running).
    pub outstanding: Arc<AtomicUsize>,
}

impl EmbedWorker {
    pub fn spawn(name: String, enc: SentenceEncoder, metrics: Arc<Metrics>) -> attn_nn::Result<Self> {
        let max_seq_length = enc.max_seq_length;
        Self::spawn_fn(name, max_seq_length, metrics, move |refs: &[&str]| {
            let tokens = refs.iter().try_fold(0usize, |n, t| {
                Ok::<_, attn_nn::Error>(n + enc.tokenizer.encode(t, true)?.len().min(enc.max_seq_length))
            });
            tokens
                .and_then(|n| Ok((enc.embed(refs, 32)?.to_vec2::<f32>()?, n)))
                .map_err(|e| format!("embedding failed: {e}"))
        })
    }

    /// A worker thread that answers each job with `embed` (the encoder, or
    /// a test double).
    pub fn spawn_fn(
        name: String,
        max_seq_length: usize,
        metrics: Arc<Metrics>,
        mut embed: impl FnMut(&[&str]) -> EmbedResult + Send + 'static,
    ) -> attn_nn::Result<Self> {
        let (tx, rx) = mpsc::channel::<EmbedJob>();
        let outstanding = Arc::new(AtomicUsize::new(0));
        let out2 = outstanding.clone();
        std::thread::Builder::new()
            .name(format!("embed-{name}"))
            .spawn(move || {
                for job in rx {
                    if !job.reply.is_closed() {
                        let refs: Vec<&str> = job.texts.iter().map(String::as_str).collect();
                        let r = embed(&refs);
                        metrics.update(&name, |m| m.embedded_inputs += refs.len() as u64);
                        let _ = job.reply.send(r);
                    }
                    out2.fetch_sub(1, Ordering::SeqCst);
                }
            })
            .map_err(|e| attn_nn::Error::input("serve", format!("cannot start the embedding thread: {e}")))?;
        Ok(EmbedWorker { tx, max_seq_length, outstanding })
    }

    pub fn submit(&self, job: EmbedJob) -> Result<(), String> {
        self.outstanding.fetch_add(1, Ordering::SeqCst);
        self.tx.send(job).map_err(|_| {
            self.outstanding.fetch_sub(1, Ordering::SeqCst);
            "the embedding worker has stopped".to_string()
        })
    }
}
