//! N ranks as threads of one process, over shared memory.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Barrier, Mutex};

use crate::{Collective, Comm};

enum Payload {
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bytes(Vec<u8>),
}

struct Shared {
    size: usize,
    slots: Mutex<Vec<Option<Arc<Payload>>>>,
    barrier: Barrier,
    /// `links[from * size + to]`.
    senders: Vec<Mutex<Sender<Vec<f32>>>>,
    receivers: Vec<Mutex<Receiver<Vec<f32>>>>,
}

struct LocalRank {
    rank: usize,
    shared: Arc<Shared>,
}

/// `size` handles to one group, rank 0 first; give each to its own thread.
pub fn local_group(size: usize) -> Vec<Comm> {
    let size = size.max(1);
    let (mut senders, mut receivers) = (Vec::new(), Vec::new());
    for _ in 0..size * size {
        let (tx, rx) = channel();
        senders.push(Mutex::new(tx));
        receivers.push(Mutex::new(rx));
    }
    let shared =
        Arc::new(Shared { size, slots: Mutex::new(vec![None; size]), barrier: Barrier::new(size), senders, receivers });
    (0..size).map(|rank| Arc::new(LocalRank { rank, shared: shared.clone() }) as Comm).collect()
}

impl LocalRank {
    /// Every rank's payload, in rank order.
    fn exchange(&self, p: Payload) -> Vec<Arc<Payload>> {
        let s = &self.shared;
        s.slots.lock().unwrap_or_else(|e| e.into_inner())[self.rank] = Some(Arc::new(p));
        s.barrier.wait();
        let all: Vec<Arc<Payload>> =
            s.slots.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|x| x.clone().expect("slot")).collect();
        // Nobody writes the next payload before everyone has read this one.
        s.barrier.wait();
        all
    }
}

impl Collective for LocalRank {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.shared.size
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) {
        let all = self.exchange(Payload::F32(buf.to_vec()));
        for (i, p) in all.iter().enumerate() {
            let Payload::F32(v) = &**p else { panic!("all_reduce_sum: ranks called different collectives") };
            assert_eq!(v.len(), buf.len(), "all_reduce_sum: ranks gave different lengths");
            if i == 0 {
                buf.copy_from_slice(v);
            } else {
                for (a, x) in buf.iter_mut().zip(v) {
                    *a += x;
                }
            }
        }
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) {
        let all = self.exchange(Payload::F64(buf.to_vec()));
        for (i, p) in all.iter().enumerate() {
            let Payload::F64(v) = &**p else { panic!("all_reduce_sum_f64: ranks called different collectives") };
            assert_eq!(v.len(), buf.len(), "all_reduce_sum_f64: ranks gave different lengths");
            if i == 0 {
                buf.copy_from_slice(v);
            } else {
                for (a, x) in buf.iter_mut().zip(v) {
                    *a += x;
                }
            }
        }
    }
    fn broadcast(&self, buf: &mut Vec<u8>, root: usize) {
        let all = self.exchange(Payload::Bytes(if self.rank == root { buf.clone() } else { Vec::new() }));
        let Payload::Bytes(v) = &*all[root] else { panic!("broadcast: ranks called different collectives") };
        *buf = v.clone();
    }
    fn all_gather(&self, mine: &[f32]) -> Vec<f32> {
        let all = self.exchange(Payload::F32(mine.to_vec()));
        let mut out = Vec::with_capacity(mine.len() * all.len());
        for p in &all {
            let Payload::F32(v) = &**p else { panic!("all_gather: ranks called different collectives") };
            assert_eq!(v.len(), mine.len(), "all_gather: ranks gave different lengths");
            out.extend_from_slice(v);
        }
        out
    }
    fn barrier(&self) {
        self.shared.barrier.wait();
    }
    fn send(&self, to: usize, data: &[f32]) {
        let s = &self.shared;
        let tx = s.senders[self.rank * s.size + to].lock().unwrap_or_else(|e| e.into_inner());
        tx.send(data.to_vec()).expect("send: the receiving rank is gone");
    }
    fn recv(&self, from: usize, buf: &mut [f32]) {
        let s = &self.shared;
        let rx = s.receivers[from * s.size + self.rank].lock().unwrap_or_else(|e| e.into_inner());
        let v = rx.recv().expect("recv: the sending rank is gone");
        assert_eq!(v.len(), buf.len(), "recv: message of {} values into a buffer of {}", v.len(), buf.len());
        buf.copy_from_slice(&v);
    }
    fn abort(&self, code: i32) -> ! {
        panic!("rank {} aborted the group with code {code}", self.rank)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<T: Send + 'static>(n: usize, f: impl Fn(Comm) -> T + Send + Sync + 'static) -> Vec<T> {
        let f = Arc::new(f);
        let hs: Vec<_> = local_group(n)
            .into_iter()
            .map(|c| {
                let f = f.clone();
                std::thread::spawn(move || f(c))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn all_reduce_adds_in_rank_order_and_every_rank_gets_the_same_bits() {
        // Values whose sum depends on the order: 1e8 + 1 - 1e8.
        let out = run(3, |c| {
            let x = [1e8f32, 1.0, -1e8][c.rank()];
            let mut v = vec![x, c.rank() as f32];
            c.all_reduce_sum(&mut v);
            v
        });
        let expect = vec![(1e8f32 + 1.0) + -1e8, 3.0];
        for v in &out {
            assert_eq!(
                v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                expect.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn gather_broadcast_and_point_to_point() {
        let out = run(3, |c| {
            let g = c.all_gather(&[c.rank() as f32, 10.0]);
            let mut b = if c.rank() == 1 { b"from one".to_vec() } else { Vec::new() };
            c.broadcast(&mut b, 1);
            // A ring: each rank sends to the next and receives from the previous.
            let n = c.size();
            c.send((c.rank() + 1) % n, &[c.rank() as f32; 4]);
            let mut r = [0f32; 4];
            c.recv((c.rank() + n - 1) % n, &mut r);
            c.barrier();
            (g, b, r[0])
        });
        for (rank, (g, b, r)) in out.into_iter().enumerate() {
            assert_eq!(g, vec![0.0, 10.0, 1.0, 10.0, 2.0, 10.0]);
            assert_eq!(b, b"from one");
            assert_eq!(r, ((rank + 2) % 3) as f32);
        }
    }
}
