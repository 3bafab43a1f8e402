//! Latency samples of one measurement, kept sorted so any percentile is an
//! index.

use std::time::Duration;

pub struct Latencies {
    sorted: Vec<Duration>,
}

impl Latencies {
    pub fn new(mut samples: Vec<Duration>) -> Latencies {
        samples.sort_unstable();
        Latencies { sorted: samples }
    }

    /// Nearest-rank percentile, `p` in 0..=100; zero when there are no samples.
    pub fn percentile(&self, p: f64) -> Duration {
        let count = self.sorted.len();
        if count == 0 {
            return Duration::ZERO;
        }
        let rank = (p / 100.0 * count as f64).ceil() as usize;
        self.sorted[rank.clamp(1, count) - 1]
    }
}
