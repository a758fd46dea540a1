//! Smooth weighted round-robin, lock-free.
//!
//! nginx's smooth weighted algorithm needs a lock around its running counters. Its output is a
//! fixed cycle of length `sum(weights)`, so that cycle is computed once when the snapshot is built
//! and requests walk it with one atomic increment. Equal weights give plain round-robin.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Longest cycle kept; weights are scaled down by their gcd first, and are at most 1000 each.
const MAX_CYCLE: usize = 64 * 1024;

#[derive(Debug)]
pub struct SmoothRoundRobin {
    cycle: Vec<u32>,
    next: AtomicUsize,
    weights: Vec<u32>,
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl SmoothRoundRobin {
    pub fn new(weights: &[u32]) -> Self {
        let g = weights
            .iter()
            .copied()
            .filter(|w| *w > 0)
            .fold(0, gcd)
            .max(1);
        let mut w: Vec<i64> = weights.iter().map(|x| i64::from(*x / g)).collect();
        let mut total: i64 = w.iter().sum();
        if total as usize > MAX_CYCLE {
            // Keep proportions approximately; never drop a backend to zero.
            let scale = total as f64 / MAX_CYCLE as f64;
            for x in w.iter_mut() {
                *x = ((*x as f64 / scale).round() as i64).max(1);
            }
            total = w.iter().sum();
        }
        let mut current = vec![0i64; w.len()];
        let mut cycle = Vec::with_capacity(total as usize);
        for _ in 0..total {
            let mut best = 0;
            for i in 0..w.len() {
                current[i] += w[i];
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            cycle.push(best as u32);
        }
        SmoothRoundRobin {
            cycle,
            next: AtomicUsize::new(0),
            weights: weights.to_vec(),
        }
    }

    /// The weights it was made with, in backend order.
    pub fn weights(&self) -> &[u32] {
        &self.weights
    }

    /// The next backend index, or `None` for an empty pool.
    pub fn next(&self) -> Option<usize> {
        self.next_where(|_| true)
    }

    /// The next backend index for which `usable` holds, walking at most one cycle. One atomic
    /// increment picks the starting point; the walk from there is this caller's own, so
    /// concurrent callers cannot make each other skip a usable backend.
    pub fn next_where(&self, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let len = self.cycle.len();
        if len == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % len;
        (0..len)
            .map(|k| self.cycle[(start + k) % len] as usize)
            .find(|b| usable(*b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(rr: &SmoothRoundRobin, n: usize, k: usize) -> Vec<usize> {
        let mut c = vec![0; k];
        for _ in 0..n {
            c[rr.next().expect("pick")] += 1;
        }
        c
    }

    #[test]
    fn equal_weights_alternate() {
        let rr = SmoothRoundRobin::new(&[1, 1]);
        let picks: Vec<_> = (0..4).map(|_| rr.next().expect("pick")).collect();
        assert_eq!(picks, vec![0, 1, 0, 1]);
    }

    #[test]
    fn smooth_weights() {
        // nginx's example: weights 5,1,1 give a a b a c a a, not a a a a a b c
        let rr = SmoothRoundRobin::new(&[5, 1, 1]);
        let picks: Vec<_> = (0..7).map(|_| rr.next().expect("pick")).collect();
        assert_eq!(picks, vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(counts(&rr, 700, 3), vec![500, 100, 100]);
    }

    #[test]
    fn large_weights_are_reduced() {
        let rr = SmoothRoundRobin::new(&[1000, 500]);
        assert_eq!(counts(&rr, 300, 2), vec![200, 100]);
    }

    #[test]
    fn concurrent_callers_always_find_a_usable_backend() {
        let rr = std::sync::Arc::new(SmoothRoundRobin::new(&[1, 1]));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let rr = rr.clone();
                std::thread::spawn(move || {
                    (0..100_000).all(|_| rr.next_where(|b| b == 0) == Some(0))
                })
            })
            .collect();
        assert!(threads.into_iter().all(|t| t.join().expect("thread")));
    }

    #[test]
    fn skips_unusable_and_empty() {
        let rr = SmoothRoundRobin::new(&[1, 1, 1]);
        for _ in 0..6 {
            assert_ne!(rr.next_where(|b| b != 1), Some(1));
        }
        assert_eq!(rr.next_where(|_| false), None);
        assert_eq!(SmoothRoundRobin::new(&[]).next(), None);
    }
}
