//! A sliding window of request and failure counts, recorded lock-free on the request path and
//! read by the shift controller to judge a color.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The window is kept as this many buckets; the oldest bucket drops out as time moves on, so
/// the window is exact to within one bucket (`window / BUCKETS`).
const BUCKETS: u64 = 20;
const EMPTY: u64 = u64::MAX;

pub struct Window {
    base: Instant,
    bucket_ms: AtomicU64,
    slots: [Slot; BUCKETS as usize],
}

struct Slot {
    /// Which bucket (time / bucket_ms) the counts belong to; `EMPTY` if none.
    epoch: AtomicU64,
    /// Requests in the low 32 bits, failures in the high 32 bits: one atomic add per request.
    counts: AtomicU64,
}

/// Requests and failures in the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Totals {
    pub requests: u64,
    pub failures: u64,
}

impl Totals {
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.failures as f64 / self.requests as f64
        }
    }
}

impl Window {
    pub fn new(window: Duration) -> Window {
        Window {
            base: Instant::now(),
            bucket_ms: AtomicU64::new(bucket_ms(window)),
            slots: std::array::from_fn(|_| Slot {
                epoch: AtomicU64::new(EMPTY),
                counts: AtomicU64::new(0),
            }),
        }
    }

    /// Changes the window length; the counts start afresh when it differs.
    pub fn set_window(&self, window: Duration) {
        let ms = bucket_ms(window);
        if self.bucket_ms.swap(ms, Ordering::AcqRel) != ms {
            self.reset();
        }
    }

    pub fn reset(&self) {
        for s in &self.slots {
            s.epoch.store(EMPTY, Ordering::Release);
            s.counts.store(0, Ordering::Release);
        }
    }

    pub fn record(&self, failed: bool) {
        self.record_at(self.now_ms(), failed);
    }

    pub fn totals(&self) -> Totals {
        self.totals_at(self.now_ms())
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    fn record_at(&self, now_ms: u64, failed: bool) {
        let epoch = now_ms / self.bucket_ms.load(Ordering::Relaxed);
        let slot = &self.slots[(epoch % BUCKETS) as usize];
        let seen = slot.epoch.load(Ordering::Acquire);
        if seen != epoch
            && slot
                .epoch
                .compare_exchange(seen, epoch, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // This thread moved the slot to a new bucket. A request recorded by another thread
            // between the exchange and this store is lost: one count, once per bucket turn.
            slot.counts.store(0, Ordering::Release);
        }
        slot.counts
            .fetch_add(1 | (u64::from(failed) << 32), Ordering::AcqRel);
    }

    fn totals_at(&self, now_ms: u64) -> Totals {
        let current = now_ms / self.bucket_ms.load(Ordering::Relaxed);
        let mut t = Totals::default();
        for s in &self.slots {
            let e = s.epoch.load(Ordering::Acquire);
            if e != EMPTY && e <= current && current - e < BUCKETS {
                let c = s.counts.load(Ordering::Acquire);
                t.requests += c & 0xffff_ffff;
                t.failures += c >> 32;
            }
        }
        t
    }
}

fn bucket_ms(window: Duration) -> u64 {
    (window.as_millis() as u64 / BUCKETS).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_slide_out_of_the_window() {
        let w = Window::new(Duration::from_secs(2)); // 100 ms buckets
        for t in 0..10 {
            w.record_at(t * 10, t % 2 == 0);
        }
        assert_eq!(
            w.totals_at(99),
            Totals {
                requests: 10,
                failures: 5
            }
        );
        w.record_at(1500, false);
        assert_eq!(w.totals_at(1500).requests, 11);
        // 2.05 s later the first bucket (0..100 ms) is out, the one at 1.5 s is in
        assert_eq!(
            w.totals_at(2050),
            Totals {
                requests: 1,
                failures: 0
            }
        );
        assert_eq!(w.totals_at(3600), Totals::default());
        // a slot reused for a later bucket starts from zero
        w.record_at(4000, true);
        assert_eq!(
            w.totals_at(4000),
            Totals {
                requests: 1,
                failures: 1
            }
        );
        assert!((w.totals_at(4000).error_rate() - 1.0).abs() < f64::EPSILON);
    }

    #[test]
    fn a_new_length_starts_afresh() {
        let w = Window::new(Duration::from_secs(2));
        w.record(true);
        assert_eq!(w.totals().requests, 1);
        w.set_window(Duration::from_secs(2));
        assert_eq!(w.totals().requests, 1);
        w.set_window(Duration::from_secs(30));
        assert_eq!(w.totals(), Totals::default());
    }
}
