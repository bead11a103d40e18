//! How long each step of something took (a sandbox's start, in the agent and in its
//! supervisor), for its log line: what grows with the number of sandboxes shows there first
//! (bench/density averages the steps over the first and the last tenth of its starts).

use std::fmt;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Timeline {
    last: Instant,
    steps: Vec<(&'static str, Duration)>,
}

impl Timeline {
    pub fn start() -> Self {
        Self {
            last: Instant::now(),
            steps: Vec::with_capacity(8),
        }
    }

    /// A step that ended before this timeline began (measured by another process, see
    /// [`monotonic_ns`]).
    pub fn push(&mut self, step: &'static str, took: Duration) {
        self.steps.push((step, took));
    }

    /// Another timeline's steps, as steps that ended before this one's.
    pub fn push_all(&mut self, earlier: &Timeline) {
        self.steps.extend(earlier.steps.iter().cloned());
    }

    /// Ends the step named `step` now; the next one starts here.
    pub fn mark(&mut self, step: &'static str) {
        let now = Instant::now();
        self.steps.push((step, now - self.last));
        self.last = now;
    }
}

/// Nanoseconds on `CLOCK_MONOTONIC`: the same clock in every process of the host, so one
/// process can time a step that another began.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| (t.tv_sec() as u64).saturating_mul(1_000_000_000) + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// `row=0.31 image=0.05 ...` in milliseconds, in the order the steps ended.
impl fmt::Display for Timeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (step, took)) in self.steps.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{step}={:.2}", took.as_secs_f64() * 1e3)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_listed_in_order_in_milliseconds() {
        let mut t = Timeline::start();
        t.mark("a");
        std::thread::sleep(Duration::from_millis(2));
        t.mark("b");
        let text = t.to_string();
        let (a, b) = text.split_once(' ').expect("two steps");
        assert!(a.starts_with("a="), "{text}");
        let b_ms: f64 = b.trim_start_matches("b=").parse().expect("a number");
        assert!(b_ms >= 2.0, "{text}");
    }

    #[test]
    fn the_monotonic_clock_moves_forward() {
        let a = monotonic_ns();
        std::thread::sleep(Duration::from_millis(1));
        assert!(monotonic_ns() >= a + 1_000_000);
    }
}
