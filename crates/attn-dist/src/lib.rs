//! Collective communication for attn: the few operations that data-,
//! tensor- and pipeline-parallel work need (rank, size, all-reduce sum,
//! broadcast, all-gather, barrier, point-to-point), behind one trait.
//!
//! Three implementations:
//! - [`Single`]: one process; every collective is the identity.
//! - [`local_group`]: N ranks as threads of one process, over shared
//!   memory. Tests run the distributed code paths with it, and it defines
//!   the results an MPI run must reproduce bit for bit.
//! - `Mpi` (cargo feature `mpi`): ranks started by `mpirun`/`srun`, over
//!   the MPI library the cluster already has. attn has no protocol of its
//!   own.
//!
//! **Sums are ordered.** [`Collective::all_reduce_sum`] adds the ranks'
//! contributions in rank order, `((x0 + x1) + x2) + ...`, element by
//! element, on every implementation, and every rank gets the same bits.
//! MPI's own `MPI_Allreduce` picks its algorithm (and so the order of the
//! additions) by message size and rank count, so different ranks or
//! different runs could see different roundings; a data-parallel run
//! whose ranks drift apart by one bit no longer trains one model. The MPI
//! implementation therefore reduces by a reduce-scatter (each rank sums
//! its chunk of every rank's buffer, in rank order) and an all-gather,
//! which moves the same bytes as a ring all-reduce.

use std::sync::Arc;

mod local;
#[cfg(feature = "mpi")]
mod mpi_impl;

pub use local::local_group;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Launch(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// The operations every rank calls together (collectives: every rank of
/// the group must call the same ones in the same order) and point-to-point
/// transfers between two ranks.
///
/// Failures of the transport are fatal (MPI aborts the job, as its default
/// error handler does), so the calls return nothing to check.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Element-wise sum over ranks, added in rank order; every rank ends
    /// with the same bits. Buffers must have the same length on every rank.
    fn all_reduce_sum(&self, buf: &mut [f32]);
    /// [`Collective::all_reduce_sum`] in double precision (loss sums, counts).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]);
    /// Rank `root`'s bytes to every rank (`buf` is replaced on the others;
    /// its length may differ between ranks).
    fn broadcast(&self, buf: &mut Vec<u8>, root: usize);
    /// Every rank's `mine` (same length on every rank), concatenated in
    /// rank order.
    fn all_gather(&self, mine: &[f32]) -> Vec<f32>;
    fn barrier(&self);
    /// Sends `data` to rank `to`, which must call [`Collective::recv`] with
    /// a buffer of the same length.
    fn send(&self, to: usize, data: &[f32]);
    fn recv(&self, from: usize, buf: &mut [f32]);
    /// Ends every rank of the job (after this one printed why).
    fn abort(&self, code: i32) -> !;
}

/// One process: rank 0 of 1.
#[derive(Debug, Default, Clone, Copy)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &mut [f32]) {}
    fn all_reduce_sum_f64(&self, _: &mut [f64]) {}
    fn broadcast(&self, _: &mut Vec<u8>, _: usize) {}
    fn all_gather(&self, mine: &[f32]) -> Vec<f32> {
        mine.to_vec()
    }
    fn barrier(&self) {}
    fn send(&self, _: usize, _: &[f32]) {
        panic!("send: a single process has no other rank")
    }
    fn recv(&self, _: usize, _: &mut [f32]) {
        panic!("recv: a single process has no other rank")
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// A shared handle to the process group.
pub type Comm = Arc<dyn Collective>;

/// The single-process group.
pub fn single() -> Comm {
    Arc::new(Single)
}

/// How this process was started: by an MPI launcher (and as which rank of
/// how many), or on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub size: usize,
    /// Ranks on this node (for the default thread count).
    pub local_size: usize,
    /// The variable that told (for messages).
    pub source: &'static str,
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok()?.trim().parse().ok()
}

/// Reads the launcher's environment: OpenMPI's `mpirun` (`OMPI_COMM_WORLD_*`),
/// MPICH/Hydra, Intel MPI and Slurm's PMI2 (`PMI_SIZE`/`PMI_RANK`), Slurm's
/// `srun --mpi=pmix` (`PMIX_RANK` with `SLURM_STEP_NUM_TASKS`).
pub fn detect_launch() -> Option<Launch> {
    let local = env_usize("OMPI_COMM_WORLD_LOCAL_SIZE")
        .or_else(|| env_usize("MPI_LOCALNRANKS"))
        .or_else(|| env_usize("SLURM_STEP_TASKS_PER_NODE"))
        .unwrap_or(1)
        .max(1);
    if let (Some(size), Some(rank)) = (env_usize("OMPI_COMM_WORLD_SIZE"), env_usize("OMPI_COMM_WORLD_RANK")) {
        return Some(Launch { rank, size, local_size: local, source: "OMPI_COMM_WORLD_SIZE" });
    }
    if let (Some(size), Some(rank)) = (env_usize("PMI_SIZE"), env_usize("PMI_RANK")) {
        return Some(Launch { rank, size, local_size: local, source: "PMI_SIZE" });
    }
    if let Some(rank) = env_usize("PMIX_RANK") {
        let size = env_usize("SLURM_STEP_NUM_TASKS").or_else(|| env_usize("SLURM_NTASKS")).unwrap_or(rank + 1);
        return Some(Launch { rank, size, local_size: local, source: "PMIX_RANK" });
    }
    None
}

/// The process group of this run, and what must live as long as it (MPI
/// is finalized when the `World` is dropped).
pub struct World {
    pub comm: Comm,
    pub launch: Option<Launch>,
    #[cfg(feature = "mpi")]
    _mpi: Option<mpi_impl::Guard>,
}

impl World {
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }
    pub fn size(&self) -> usize {
        self.comm.size()
    }
    /// Threads this rank should use when the user gave none: the CPUs this
    /// process may run on, shared among the ranks of its node when they
    /// share them (`mpirun --bind-to none`); a rank bound to one core
    /// (OpenMPI's default for two ranks) sees one CPU and takes one.
    pub fn default_threads(&self) -> usize {
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let local = self.launch.as_ref().map_or(1, |l| l.local_size);
        if let Some(node_cpus) = node_cpus() {
            if cpus >= node_cpus {
                // Not bound: the ranks of this node share every CPU.
                return (cpus / local).max(1);
            }
        }
        cpus.max(1)
    }
}

fn node_cpus() -> Option<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?;
    let mut n = 0;
    for part in text.trim().split(',') {
        let mut it = part.split('-');
        let a: usize = it.next()?.parse().ok()?;
        let b: usize = it.next().map(|b| b.parse().ok()).unwrap_or(Some(a))?;
        n += b + 1 - a;
    }
    Some(n)
}

/// Whether this build can run as MPI ranks.
pub const MPI_ENABLED: bool = cfg!(feature = "mpi");

/// Starts the process group: MPI when an MPI launcher started this
/// process (and this build has the `mpi` feature), else a single process.
/// A build without MPI started as one of several ranks is an error: each
/// rank would otherwise do the whole job alone and they would overwrite
/// each other's files.
pub fn init() -> Result<World> {
    let launch = detect_launch();
    match &launch {
        None => Ok(World {
            comm: single(),
            launch,
            #[cfg(feature = "mpi")]
            _mpi: None,
        }),
        #[cfg(feature = "mpi")]
        Some(l) => {
            let (guard, comm) = mpi_impl::init(l)?;
            Ok(World { comm, launch, _mpi: Some(guard) })
        }
        #[cfg(not(feature = "mpi"))]
        Some(l) if l.size > 1 => Err(Error::Launch(format!(
            "this attn was built without MPI support, but it was started as rank {} of {} ranks ({} is set): \
             rebuild it with `cargo build --release --features mpi` (needs the MPI development files: \
             Debian's libopenmpi-dev openmpi-bin libclang-dev), or run it without mpirun",
            l.rank, l.size, l.source
        ))),
        #[cfg(not(feature = "mpi"))]
        Some(_) => Ok(World { comm: single(), launch }),
    }
}

/// Splits `n` items into `parts` contiguous ranges as evenly as possible
/// (the first ones one longer), in multiples of `align`.
pub fn split_even(n: usize, parts: usize, align: usize) -> Vec<std::ops::Range<usize>> {
    let align = align.max(1);
    let units = n.div_ceil(align);
    let parts = parts.max(1);
    let mut out = Vec::with_capacity(parts);
    let mut start = 0;
    for p in 0..parts {
        let take = units / parts + usize::from(p < units % parts);
        let end = ((start / align + take) * align).min(n);
        out.push(start..end);
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_even_covers_everything_in_aligned_pieces() {
        assert_eq!(split_even(10, 2, 1), vec![0..5, 5..10]);
        assert_eq!(split_even(11, 2, 1), vec![0..6, 6..11]);
        // 4864 columns in 256-wide quantization blocks: 10 and 9 blocks.
        assert_eq!(split_even(4864, 2, 256), vec![0..2560, 2560..4864]);
        // Fewer units than parts: some parts are empty.
        assert_eq!(split_even(3, 4, 1), vec![0..1, 1..2, 2..3, 3..3]);
        for (n, p, a) in [(896, 2, 64), (100, 3, 32), (7, 7, 1), (0, 2, 1)] {
            let r = split_even(n, p, a);
            assert_eq!(r.len(), p);
            assert_eq!(r.first().map(|x| x.start), Some(0));
            assert_eq!(r.last().map(|x| x.end), Some(n));
            for w in r.windows(2) {
                assert_eq!(w[0].end, w[1].start);
                assert_eq!(w[0].end % a, 0);
            }
        }
    }

    #[test]
    fn single_process_collectives_are_the_identity() {
        let c = single();
        let mut v = vec![1.5f32, -2.0];
        c.all_reduce_sum(&mut v);
        assert_eq!(v, vec![1.5, -2.0]);
        assert_eq!(c.all_gather(&v), v);
        let mut b = b"x".to_vec();
        c.broadcast(&mut b, 0);
        assert_eq!(b, b"x");
        assert_eq!((c.rank(), c.size()), (0, 1));
    }
}
