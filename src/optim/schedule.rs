//! Learning-rate schedules.

use crate::{Error, Result};

/// Linear warmup, then cosine decay to a floor.
///
/// For the 0-based step `s` (the value of [`AdamW::step_count`](crate::optim::AdamW::step_count)
/// before the step), with `W = warmup_steps` and `T = total_steps`:
///
/// ```text
/// s < W:        lr = max_lr · ((s + 1) / W)                     lr(0) = max_lr/W, lr(W−1) = max_lr
/// W ≤ s < T:    p  = (s − W) / (T − W)                          lr(W) = max_lr
///               lr = min_lr + (max_lr − min_lr) · (1 + cos(π·p)) / 2
/// s ≥ T:        lr = min_lr                                     lr(T) = min_lr
/// ```
///
/// The warmup counts from the first step, so no step is wasted at `lr = 0`; with `W = 0`
/// the schedule starts at `max_lr`.
///
/// ```
/// use lorafuse::optim::WarmupCosine;
/// let s = WarmupCosine::new(1e-3, 1e-4, 10, 110)?;
/// assert!((s.lr(0) - 1e-4).abs() < 1e-18);
/// assert_eq!(s.lr(9), 1e-3);
/// assert!((s.lr(60) - 5.5e-4).abs() < 1e-15); // halfway through the cosine
/// assert_eq!(s.lr(110), 1e-4);
/// # Ok::<(), lorafuse::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WarmupCosine {
    max_lr: f64,
    min_lr: f64,
    warmup_steps: u64,
    total_steps: u64,
}

impl WarmupCosine {
    /// A schedule; requires `0 ≤ min_lr ≤ max_lr` (finite), `warmup_steps ≤ total_steps`
    /// and `total_steps ≥ 1`.
    pub fn new(max_lr: f64, min_lr: f64, warmup_steps: u64, total_steps: u64) -> Result<Self> {
        if !(max_lr.is_finite() && min_lr.is_finite() && 0.0 <= min_lr && min_lr <= max_lr) {
            return Err(Error::invalid(format!(
                "warmup-cosine: need finite 0 <= min_lr <= max_lr, got min_lr {min_lr}, max_lr {max_lr}"
            )));
        }
        if total_steps == 0 || warmup_steps > total_steps {
            return Err(Error::invalid(format!(
                "warmup-cosine: need 1 <= total_steps and warmup_steps <= total_steps, got {warmup_steps} warmup of {total_steps}"
            )));
        }
        Ok(WarmupCosine {
            max_lr,
            min_lr,
            warmup_steps,
            total_steps,
        })
    }

    /// The learning rate of 0-based step `step`.
    pub fn lr(&self, step: u64) -> f64 {
        let (w, t) = (self.warmup_steps, self.total_steps);
        if step >= t {
            self.min_lr
        } else if step < w {
            self.max_lr * ((step + 1) as f64 / w as f64)
        } else {
            let p = (step - w) as f64 / (t - w) as f64;
            self.min_lr
                + (self.max_lr - self.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
        }
    }

    /// The peak learning rate.
    pub fn max_lr(&self) -> f64 {
        self.max_lr
    }

    /// The floor reached at `total_steps`.
    pub fn min_lr(&self) -> f64 {
        self.min_lr
    }

    /// Steps of linear warmup.
    pub fn warmup_steps(&self) -> u64 {
        self.warmup_steps
    }

    /// The step at which the cosine reaches `min_lr`.
    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_at_the_landmarks() {
        let s = WarmupCosine::new(3e-4, 3e-5, 100, 1100).unwrap();
        // Warmup: linear from max/W at step 0 to max at step W−1.
        assert!((s.lr(0) - 3e-6).abs() < 1e-20);
        assert_eq!(s.lr(49), 3e-4 * 0.5);
        assert_eq!(s.lr(99), 3e-4);
        // Cosine: max at W, the midpoint halfway, a quarter of the way (1 + cos(π/4))/2.
        assert_eq!(s.lr(100), 3e-4);
        let mid = 3e-5 + (3e-4 - 3e-5) * 0.5;
        assert!((s.lr(600) - mid).abs() < 1e-18, "{} vs {mid}", s.lr(600));
        let q = 3e-5 + (3e-4 - 3e-5) * (1.0 + std::f64::consts::FRAC_1_SQRT_2) / 2.0;
        assert!((s.lr(350) - q).abs() < 1e-18, "{} vs {q}", s.lr(350));
        // The end and after.
        assert!((s.lr(1099) - 3e-5).abs() < 1e-9 && s.lr(1099) > 3e-5);
        assert_eq!(s.lr(1100), 3e-5);
        assert_eq!(s.lr(u64::MAX), 3e-5);
        // Monotone: up during warmup, down after.
        for k in 1..100 {
            assert!(s.lr(k) > s.lr(k - 1));
        }
        for k in 101..=1100 {
            assert!(s.lr(k) < s.lr(k - 1), "step {k}");
        }
    }

    #[test]
    fn edge_cases() {
        let no_warmup = WarmupCosine::new(1.0, 0.0, 0, 4).unwrap();
        assert_eq!(no_warmup.lr(0), 1.0);
        assert!((no_warmup.lr(2) - 0.5).abs() < 1e-15);
        assert_eq!(no_warmup.lr(4), 0.0);
        let all_warmup = WarmupCosine::new(1.0, 0.1, 4, 4).unwrap();
        assert_eq!(
            [all_warmup.lr(0), all_warmup.lr(3), all_warmup.lr(4)],
            [0.25, 1.0, 0.1]
        );
        let constant = WarmupCosine::new(0.5, 0.5, 0, 10).unwrap();
        assert!((0..20).all(|k| constant.lr(k) == 0.5));
        assert_eq!(
            (
                constant.max_lr(),
                constant.min_lr(),
                constant.warmup_steps(),
                constant.total_steps()
            ),
            (0.5, 0.5, 0, 10)
        );
    }

    #[test]
    fn invalid_settings() {
        assert!(WarmupCosine::new(1e-3, 1e-2, 0, 10).is_err(), "min > max");
        assert!(WarmupCosine::new(1e-3, -1.0, 0, 10).is_err());
        assert!(WarmupCosine::new(f64::NAN, 0.0, 0, 10).is_err());
        assert!(WarmupCosine::new(f64::INFINITY, 0.0, 0, 10).is_err());
        assert!(
            WarmupCosine::new(1e-3, 0.0, 11, 10).is_err(),
            "warmup > total"
        );
        assert!(WarmupCosine::new(1e-3, 0.0, 0, 0).is_err());
    }
}
