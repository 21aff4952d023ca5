//! Running one model split over ranks in one process: each rank on its own
//! thread (see `attn_dist::local_group`).

use attn_models::{LanguageModel, Logits, SeqStep};

/// Runs `f` on each part at once, each on its own thread with its own
/// one-thread rayon pool: a rank waiting in a collective must not hold up
/// another rank's work, as it could on a shared pool.
pub fn on_ranks<P: Sync, T: Send>(parts: &[P], f: impl Fn(&P) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let hs: Vec<_> = parts
            .iter()
            .map(|p| {
                let f = &f;
                s.spawn(move || match rayon::ThreadPoolBuilder::new().num_threads(1).build() {
                    Ok(pool) => pool.install(|| f(p)),
                    Err(e) => panic!("a rank's thread pool: {e}"),
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("a rank panicked")).collect()
    })
}

/// `n` greedy tokens after `prompt`, one forward call per token.
pub fn greedy_tokens<M: LanguageModel>(m: &M, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut cache = m.new_cache().expect("a cache");
    let mut out = Vec::new();
    let mut next = prompt.to_vec();
    for _ in 0..n {
        let l = m.forward(&mut [SeqStep { tokens: &next, cache: &mut cache }], Logits::Last).expect("forward");
        let t = l[0].argmax(0).and_then(|t| t.to_scalar::<u32>()).expect("argmax");
        out.push(t);
        next = vec![t];
    }
    out
}
