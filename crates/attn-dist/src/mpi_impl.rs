//! The MPI implementation (cargo feature `mpi`), over rsmpi.
//!
//! MPI is initialized with `MPI_THREAD_MULTIPLE` where the library offers
//! it (OpenMPI 4 does), at least `MPI_THREAD_SERIALIZED`: rsmpi's
//! communicator handle is not `Send`, so each call takes the world
//! communicator afresh on whatever thread makes it, and a lock keeps the
//! calls of one process in one order.

use std::sync::{Arc, Mutex};

use mpi::collective::{CommunicatorCollectives, Root};
use mpi::datatype::{Equivalence, Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::point_to_point::{Destination, Source};
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::Threading;

use crate::{Collective, Comm, Error, Launch, Result};

/// Finalizes MPI when dropped.
pub struct Guard {
    _universe: Universe,
}

struct MpiRank {
    rank: usize,
    size: usize,
    lock: Mutex<()>,
}

pub fn init(launch: &Launch) -> Result<(Guard, Comm)> {
    let (universe, provided) = mpi::initialize_with_threading(Threading::Multiple)
        .ok_or_else(|| Error::Launch("MPI was already initialized".into()))?;
    if provided < Threading::Serialized {
        return Err(Error::Launch(format!(
            "the MPI library offers only {provided:?} threading; attn needs at least MPI_THREAD_SERIALIZED"
        )));
    }
    let world = universe.world();
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    if size != launch.size {
        return Err(Error::Launch(format!(
            "the launcher announced {} ranks ({}) but MPI's world holds {size}",
            launch.size, launch.source
        )));
    }
    Ok((Guard { _universe: universe }, Arc::new(MpiRank { rank, size, lock: Mutex::new(()) })))
}

/// MPI counts are C ints: large buffers go in pieces.
const PIECE: usize = 1 << 26;

impl MpiRank {
    fn locked<T>(&self, f: impl FnOnce(&SimpleCommunicator) -> T) -> T {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        f(&SimpleCommunicator::world())
    }

    /// Reduce-scatter (each rank adds its chunk of every rank's buffer, in
    /// rank order) then all-gather: the same bits on every rank, whatever
    /// the message size.
    fn ordered_sum<T: Equivalence + Copy + Default + std::ops::AddAssign>(&self, buf: &mut [T]) {
        if self.size == 1 {
            return;
        }
        let n = self.size;
        for piece in buf.chunks_mut(PIECE) {
            let len = piece.len();
            let bounds: Vec<usize> = (0..=n).map(|j| len * j / n).collect();
            let counts: Vec<i32> = (0..n).map(|j| (bounds[j + 1] - bounds[j]) as i32).collect();
            let displs: Vec<i32> = bounds[..n].iter().map(|&b| b as i32).collect();
            let mine = counts[self.rank] as usize;
            let mut recv = vec![T::default(); mine * n];
            let rcounts = vec![mine as i32; n];
            let rdispls: Vec<i32> = (0..n).map(|i| (i * mine) as i32).collect();
            self.locked(|w| {
                w.all_to_all_varcount_into(
                    &Partition::new(&*piece, &counts[..], &displs[..]),
                    &mut PartitionMut::new(&mut recv[..], &rcounts[..], &rdispls[..]),
                );
            });
            let (first, rest) = recv.split_at_mut(mine);
            for i in 1..n {
                for (a, x) in first.iter_mut().zip(&rest[(i - 1) * mine..i * mine]) {
                    *a += *x;
                }
            }
            self.locked(|w| {
                w.all_gather_varcount_into(&*first, &mut PartitionMut::new(&mut *piece, &counts[..], &displs[..]));
            });
        }
    }
}

impl Collective for MpiRank {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) {
        self.ordered_sum(buf)
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) {
        self.ordered_sum(buf)
    }
    fn broadcast(&self, buf: &mut Vec<u8>, root: usize) {
        self.locked(|w| {
            let r = w.process_at_rank(root as i32);
            let mut len = buf.len() as u64;
            r.broadcast_into(&mut len);
            buf.resize(len as usize, 0);
            for piece in buf.chunks_mut(PIECE) {
                r.broadcast_into(piece);
            }
        })
    }
    fn all_gather(&self, mine: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; mine.len() * self.size];
        self.locked(|w| w.all_gather_into(mine, &mut out[..]));
        out
    }
    fn barrier(&self) {
        self.locked(|w| w.barrier())
    }
    fn send(&self, to: usize, data: &[f32]) {
        self.locked(|w| {
            for piece in data.chunks(PIECE) {
                w.process_at_rank(to as i32).send(piece);
            }
        })
    }
    fn recv(&self, from: usize, buf: &mut [f32]) {
        // Not under the lock: a blocking receive must not keep this
        // process's other calls (a send to the rank it waits on) out.
        let w = SimpleCommunicator::world();
        for piece in buf.chunks_mut(PIECE) {
            w.process_at_rank(from as i32).receive_into(piece);
        }
    }
    fn abort(&self, code: i32) -> ! {
        SimpleCommunicator::world().abort(code)
    }
}
