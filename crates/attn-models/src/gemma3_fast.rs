//! Gemma 3's fused inference path: the same model as [`crate::gemma3`]'s
//! candle path, computed on plain `f32` buffers with the kernels of
//! [`attn_nn::fast`] and the 8-bit block matmul of [`attn_nn::q8`].
//!
//! - Matrices are 8-bit blocks of 32 ([`Q8Matrix`]): Q8_0 and Q5_0 tensors
//!   of the file convert exactly, the K-quants through f32. The token
//!   embedding, which is also the output projection, is read as stored.
//! - Few rows (decode, small batches): each weight is read once per step
//!   for all rows, activations quantized to 8 bits per block of 32 (what
//!   llama.cpp and candle do too).
//! - Many rows (prefill): the same 8-bit kernel where the CPU has AVX-512
//!   VNNI; otherwise each weight matrix is expanded to f32 once per call
//!   and multiplied with `gemm`. Attention goes through `gemm` in blocks of
//!   queries.
//! - The q/k/v projections share one quantized copy of their input, as do
//!   gate and up.

use attn_nn::fast::{self, AttnCall};
use attn_nn::q8::{Kernel, Q8Acts, Q8Matrix};
use attn_nn::{Error, Result, SdpaOptions};

use crate::gemma3::Gemma3Config;
use crate::gguf::GgufFile;

/// Without AVX-512 VNNI, from this many rows on a matmul expands the
/// weight to f32 and uses `gemm` (the AVX2 8-bit kernel's cost grows with
/// every row). With VNNI the 8-bit kernel is the faster one at any size
/// (Gemma 3 270M, 512-token prefill, 2 threads, one run under load: 527 and
/// 601 tok/s against 254 and 377 with the expansion), and every matmul is
/// then batch-invariant.
const GEMM_ROWS: usize = attn_nn::fast::BLOCKED_FROM;
/// Output rows of the (large) output projection expanded at a time.
const HEAD_CHUNK: usize = 4096;

#[derive(Debug)]
struct FastLayer {
    wq: Q8Matrix,
    wk: Q8Matrix,
    wv: Q8Matrix,
    wo: Q8Matrix,
    wg: Q8Matrix,
    wu: Q8Matrix,
    wd: Q8Matrix,
    attn_norm: Vec<f32>,
    post_attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    post_ffw_norm: Vec<f32>,
    q_norm: Vec<f32>,
    k_norm: Vec<f32>,
    global: bool,
}

/// The weights of the fused path.
#[derive(Debug)]
pub(crate) struct FastGemma3 {
    layers: Vec<FastLayer>,
    /// `[vocab, hidden]`: embedding rows and the output projection.
    embed: Q8Matrix,
    final_norm: Vec<f32>,
    /// Activation buffers of finished calls, reused by the next ones, so a
    /// decode step allocates nothing but the logits it returns (one set per
    /// concurrent caller).
    scratch: std::sync::Mutex<Vec<Scratch>>,
}

/// The buffers of one forward pass; grown as needed, never shrunk.
#[derive(Debug, Default)]
struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    o: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    hr: Vec<f32>,
    /// f32 weight rows, for the expansion path without VNNI.
    wide: Vec<f32>,
    positions: Vec<u32>,
    cos_l: Vec<f32>,
    sin_l: Vec<f32>,
    cos_g: Vec<f32>,
    sin_g: Vec<f32>,
    acts: Q8Acts,
}

/// `v` holding exactly `n` elements, reusing its allocation.
fn sized(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    v.resize(n, 0.0);
    &mut v[..n]
}

/// Where the fused path's attention keeps one sequence's keys and values.
pub trait SliceKvStore: Send {
    /// Stores `k`, `v` (`[t, n_kv_heads, head_dim]`) of the next `t`
    /// positions of `layer` and attends `q` (`[t, n_heads, head_dim]`) to
    /// every stored position; `call.past` is filled in by the store.
    #[allow(clippy::too_many_arguments)]
    fn attend_slices(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        t: usize,
        call: &AttnCall,
        out: &mut [f32],
    ) -> Result<()>;
}

/// One matmul input, quantized lazily and shared by the matrices reading it.
struct Input<'a> {
    x: &'a [f32],
    m: usize,
    cols: usize,
    acts: &'a mut Q8Acts,
    quantized: bool,
}

impl<'a> Input<'a> {
    fn new(x: &'a [f32], m: usize, cols: usize, acts: &'a mut Q8Acts) -> Self {
        Input { x, m, cols, acts, quantized: false }
    }

    /// `out[m, w.rows] = x · wᵀ`.
    fn times(&mut self, w: &Q8Matrix, out: &mut [f32], scratch: &mut Vec<f32>) -> Result<()> {
        let (m, n, k) = (self.m, w.rows(), self.cols);
        if m >= GEMM_ROWS && Kernel::detected() != Kernel::Vnni {
            let chunk = HEAD_CHUNK.min(n);
            scratch.resize(chunk * k, 0.0);
            let mut r0 = 0;
            while r0 < n {
                let rows = chunk.min(n - r0);
                w.dequantize_rows(r0, rows, scratch)?;
                fast::matmul_xwt_ld(self.x, m, k, &scratch[..rows * k], rows, &mut out[r0..], n)?;
                r0 += rows;
            }
            return Ok(());
        }
        if !self.quantized {
            self.acts.quantize(self.x, m, k)?;
            self.quantized = true;
        }
        w.matmul_acts(self.acts, &mut out[..m * n])
    }
}

impl FastGemma3 {
    pub(crate) fn from_gguf(f: &GgufFile, cfg: &Gemma3Config) -> Result<Self> {
        let (d, h, ff) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = |s: &str| format!("blk.{i}.{s}");
            layers.push(FastLayer {
                wq: f.q8_matrix(&p("attn_q.weight"), cfg.n_heads * h, d)?,
                wk: f.q8_matrix(&p("attn_k.weight"), cfg.n_kv_heads * h, d)?,
                wv: f.q8_matrix(&p("attn_v.weight"), cfg.n_kv_heads * h, d)?,
                wo: f.q8_matrix(&p("attn_output.weight"), d, cfg.n_heads * h)?,
                wg: f.q8_matrix(&p("ffn_gate.weight"), ff, d)?,
                wu: f.q8_matrix(&p("ffn_up.weight"), ff, d)?,
                wd: f.q8_matrix(&p("ffn_down.weight"), d, ff)?,
                attn_norm: f.vector(&p("attn_norm.weight"), d)?,
                post_attn_norm: f.vector(&p("post_attention_norm.weight"), d)?,
                ffn_norm: f.vector(&p("ffn_norm.weight"), d)?,
                post_ffw_norm: f.vector(&p("post_ffw_norm.weight"), d)?,
                q_norm: f.vector(&p("attn_q_norm.weight"), h)?,
                k_norm: f.vector(&p("attn_k_norm.weight"), h)?,
                global: cfg.is_global(i),
            });
        }
        if f.tensor_info("output.weight").is_some() {
            return Err(Error::Unsupported(
                "the fused Gemma 3 path needs the output projection tied to the embedding".into(),
            ));
        }
        Ok(FastGemma3 {
            layers,
            embed: f.q8_matrix("token_embd.weight", cfg.vocab_size, d)?,
            final_norm: f.vector("output_norm.weight", d)?,
            scratch: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Bytes of weights one decode step reads (every matrix once).
    pub(crate) fn weight_bytes(&self) -> usize {
        let l: usize = self
            .layers
            .iter()
            .map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.wg, &l.wu, &l.wd].iter().map(|m| m.bytes()).sum::<usize>())
            .sum();
        l + self.embed.bytes()
    }

    /// The forward pass over `ids` (all sequences' new tokens, `spans` =
    /// (start, len, past) per sequence) returning the logits of `rows`.
    ///
    /// It runs on a worker thread of rayon's pool, so that the hundred-odd
    /// parallel kernels of a step hand work to the other workers directly
    /// instead of each waking the pool from outside and putting the caller
    /// to sleep (perf, decode: 12% of the time was in the scheduler).
    pub(crate) fn forward<C: SliceKvStore>(
        &self,
        cfg: &Gemma3Config,
        ids: &[u32],
        spans: &[(usize, usize, usize)],
        caches: &mut [&mut C],
        rows: &[usize],
    ) -> Result<Vec<f32>> {
        if rayon::current_thread_index().is_some() {
            self.forward_here(cfg, ids, spans, caches, rows)
        } else {
            rayon::scope(|_| self.forward_here(cfg, ids, spans, caches, rows))
        }
    }

    fn forward_here<C: SliceKvStore>(
        &self,
        cfg: &Gemma3Config,
        ids: &[u32],
        spans: &[(usize, usize, usize)],
        caches: &mut [&mut C],
        rows: &[usize],
    ) -> Result<Vec<f32>> {
        let mut sc = self.scratch.lock().ok().and_then(|mut pool| pool.pop()).unwrap_or_default();
        let logits = self.forward_with(cfg, ids, spans, caches, rows, &mut sc)?;
        if let Ok(mut pool) = self.scratch.lock() {
            pool.push(sc);
        }
        Ok(logits)
    }

    fn forward_with<C: SliceKvStore>(
        &self,
        cfg: &Gemma3Config,
        ids: &[u32],
        spans: &[(usize, usize, usize)],
        caches: &mut [&mut C],
        rows: &[usize],
        sc: &mut Scratch,
    ) -> Result<Vec<f32>> {
        let (d, hd, nh, nkv, ff) = (cfg.hidden_size, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.intermediate_size);
        let t = ids.len();
        let eps = cfg.rms_norm_eps as f32;
        let Scratch { x, h, q, k, v, att, o, g, u, hr, wide, positions, cos_l, sin_l, cos_g, sin_g, acts } = sc;
        let x = sized(x, t * d);
        let scale = (d as f32).sqrt();
        for (i, &id) in ids.iter().enumerate() {
            let row = &mut x[i * d..(i + 1) * d];
            self.embed.dequantize_rows(id as usize, 1, row)?;
            for v in row.iter_mut() {
                *v *= scale;
            }
        }
        positions.clear();
        positions.extend(spans.iter().flat_map(|&(_, len, past)| (past as u32)..((past + len) as u32)));
        fast::rope_tables_into(cfg.rope_local_base, 1.0, hd, positions, cos_l, sin_l);
        fast::rope_tables_into(cfg.rope_global_base, cfg.rope_global_scale, hd, positions, cos_g, sin_g);
        let sdpa = SdpaOptions { scale: cfg.query_pre_attn_scalar.powf(-0.5), softcap: cfg.attn_logit_softcap };

        let h = sized(h, t * d);
        let q = sized(q, t * nh * hd);
        let k = sized(k, t * nkv * hd);
        let v = sized(v, t * nkv * hd);
        let att = sized(att, t * nh * hd);
        let o = sized(o, t * d);
        let g = sized(g, t * ff);
        let u = sized(u, t * ff);
        for (li, l) in self.layers.iter().enumerate() {
            fast::rms_norm_rows_to(x, &l.attn_norm, eps, h);
            let mut inp = Input::new(h, t, d, acts);
            inp.times(&l.wq, q, wide)?;
            inp.times(&l.wk, k, wide)?;
            inp.times(&l.wv, v, wide)?;
            fast::rms_norm_rows(q, &l.q_norm, eps);
            fast::rms_norm_rows(k, &l.k_norm, eps);
            let (cos, sin) = if l.global { (&*cos_g, &*sin_g) } else { (&*cos_l, &*sin_l) };
            fast::rope_halves(q, nh, hd, cos, sin);
            fast::rope_halves(k, nkv, hd, cos, sin);
            let window = (!l.global).then_some(cfg.sliding_window);
            let call = AttnCall { n_heads: nh, n_kv_heads: nkv, head_dim: hd, past: 0, sdpa, window };
            for (c, &(s, len, _)) in caches.iter_mut().zip(spans) {
                c.attend_slices(
                    li,
                    &q[s * nh * hd..(s + len) * nh * hd],
                    &k[s * nkv * hd..(s + len) * nkv * hd],
                    &v[s * nkv * hd..(s + len) * nkv * hd],
                    len,
                    &call,
                    &mut att[s * nh * hd..(s + len) * nh * hd],
                )?;
            }
            Input::new(att, t, nh * hd, acts).times(&l.wo, o, wide)?;
            fast::add_rms_normed(x, o, &l.post_attn_norm, eps);

            fast::rms_norm_rows_to(x, &l.ffn_norm, eps, h);
            let mut inp = Input::new(h, t, d, acts);
            inp.times(&l.wg, g, wide)?;
            inp.times(&l.wu, u, wide)?;
            fast::gelu_tanh_mul(g, u);
            Input::new(g, t, ff, acts).times(&l.wd, o, wide)?;
            fast::add_rms_normed(x, o, &l.post_ffw_norm, eps);
        }
        // Only the wanted rows go through the final norm and the head.
        hr.clear();
        for &r in rows {
            hr.extend_from_slice(&x[r * d..(r + 1) * d]);
        }
        fast::rms_norm_rows(hr, &self.final_norm, eps);
        let vocab = self.embed.rows();
        let mut logits = vec![0f32; rows.len() * vocab];
        Input::new(hr, rows.len(), d, acts).times(&self.embed, &mut logits, wide)?;
        if let Some(cap) = cfg.final_logit_softcap {
            let cap = cap as f32;
            for z in &mut logits {
                *z = (*z / cap).tanh() * cap;
            }
        }
        Ok(logits)
    }
}
