//! Data-parallel training without MPI: two ranks as threads of this
//! process ([`attn_dist::local_group`]) train the same bits as one process
//! that computes both shards of every micro-batch in turn. (The MPI runs,
//! `mpirun -np 2`, are in crates/attn-cli/tests/mpi.rs.)

mod common;

use attn_test_support::tempdir;
use attn_train::data::batch::{make_batch, Cursor, Examples};
use attn_train::{train, TrainOptions};
use common::ci_config;

fn weights(run: &std::path::Path) -> Vec<u8> {
    std::fs::read(run.join("checkpoints/step-00000010/model.safetensors")).unwrap()
}

#[test]
fn two_thread_ranks_equal_one_process_with_two_shards() {
    let dir = tempdir("dp-threads");
    // No dropout: the two thread-ranks share one rayon pool, and dropout's
    // per-thread streams are only defined for one rank per process.
    let over = [("max_steps", "10"), ("checkpoint_every", "5"), ("dropout", "0.0")];
    let cfg = ci_config("shakespeare-tiny", &dir.join("a"), &over);
    let ranks = dir.join("ranks");
    let handles: Vec<_> = attn_dist::local_group(2)
        .into_iter()
        .map(|comm| {
            let (cfg, ranks) = (cfg.clone(), ranks.clone());
            std::thread::spawn(move || {
                train(&TrainOptions { config: Some(cfg), run_dir: ranks, resume: false, progress: false, comm })
            })
        })
        .collect();
    let summaries: Vec<_> = handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect();
    assert_eq!(summaries[0].steps, 10);
    assert!(summaries[0].valid.is_some() && summaries[1].valid.is_none(), "rank 0 alone evaluates");

    let mut sharded = over.to_vec();
    sharded.push(("shards", "2"));
    let cfg1 = ci_config("shakespeare-tiny", &dir.join("b"), &sharded);
    let one = dir.join("one");
    train(&TrainOptions {
        config: Some(cfg1),
        run_dir: one.clone(),
        resume: false,
        progress: false,
        comm: attn_dist::single(),
    })
    .unwrap();
    assert!(weights(&ranks) == weights(&one));

    // The 2-rank run resumes in one process (from step 5, the newer
    // checkpoint removed) and ends on the same bits: the run keeps its 2
    // shards, computed in turn.
    let want = weights(&ranks);
    std::fs::remove_dir_all(ranks.join("checkpoints/step-00000010")).unwrap();
    std::fs::remove_dir_all(ranks.join("model")).unwrap();
    let resumed = train(&TrainOptions {
        config: None,
        run_dir: ranks.clone(),
        resume: true,
        progress: false,
        comm: attn_dist::single(),
    })
    .unwrap();
    assert_eq!(resumed.steps, 10);
    assert!(weights(&ranks) == want, "resumed in one process, the 2-rank run ended elsewhere");
}

#[test]
fn shards_split_the_rows_and_keep_every_token() {
    let ex = Examples::Lm((0..5).map(|i| (0..(3 + i)).map(|t| t as u32 + 1).collect()).collect());
    let b = make_batch(&ex, &[0, 1, 2, 3, 4], Cursor::default(), Cursor::default());
    for n in 1..=6 {
        let shards: Vec<_> = (0..n).filter_map(|i| b.shard(i, n)).collect();
        assert_eq!(shards.len(), n.min(5));
        assert_eq!(shards.iter().map(|s| s.a.rows).sum::<usize>(), 5);
        assert_eq!(shards.iter().map(|s| s.real_tokens).sum::<usize>(), b.real_tokens);
        // Rows in order, each re-padded to its shard's widest row.
        let rows: Vec<Vec<u32>> = shards
            .iter()
            .flat_map(|s| (0..s.a.rows).map(|r| s.a.ids[r * s.a.cols..r * s.a.cols + s.a.lengths[r]].to_vec()))
            .collect();
        let want: Vec<Vec<u32>> = (0..5).map(|i| (0..(3 + i)).map(|t| t as u32 + 1).collect()).collect();
        assert_eq!(rows, want);
        for s in &shards {
            assert_eq!(s.a.cols, *s.a.lengths.iter().max().unwrap());
        }
    }
}
