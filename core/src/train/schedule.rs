//! Learning-rate and lambda schedules, as functions of the step (so that a resumed run
//! needs nothing but the step to continue them).

use serde::{Deserialize, Serialize};

/// The shape of the learning rate after warmup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    Constant,
    Linear,
    /// The paper's.
    #[default]
    Cosine,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub peak: f64,
    pub warmup_steps: u64,
    pub decay: Decay,
    /// The floor the decay ends at, as a fraction of the peak.
    pub min_ratio: f64,
}

impl LrSchedule {
    /// The learning rate of step `step` (1-based, as the optimizer counts) of `total`:
    /// linear warmup to the peak over `warmup_steps`, then the decay to `min_ratio * peak`.
    pub fn at(&self, step: u64, total: u64) -> f64 {
        if step <= self.warmup_steps && self.warmup_steps > 0 {
            return self.peak * step as f64 / self.warmup_steps as f64;
        }
        let span = total.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps.min(step)) as f64 / span).min(1.0);
        let shape = match self.decay {
            Decay::Constant => 1.0,
            Decay::Linear => 1.0 - progress,
            Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        };
        self.peak * (self.min_ratio + (1.0 - self.min_ratio) * shape)
    }
}

/// The weight of the CLM part over training: constant (the paper: 0.9), or moving
/// linearly from `start` to `end`, as the paper's code offers.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LambdaSchedule {
    pub start: f64,
    pub end: f64,
}

impl LambdaSchedule {
    pub fn constant(lambda: f64) -> Self {
        Self { start: lambda, end: lambda }
    }

    pub fn at(&self, step: u64, total: u64) -> f64 {
        let progress = (step.saturating_sub(1) as f64 / total.saturating_sub(1).max(1) as f64).min(1.0);
        self.start + (self.end - self.start) * progress
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_reaches_the_floor() {
        let s = LrSchedule { peak: 1.0, warmup_steps: 10, decay: Decay::Cosine, min_ratio: 0.1 };
        assert_eq!(s.at(5, 110), 0.5);
        assert_eq!(s.at(10, 110), 1.0);
        assert!((s.at(60, 110) - 0.55).abs() < 1e-12);
        assert!((s.at(110, 110) - 0.1).abs() < 1e-12);
        let linear = LrSchedule { decay: Decay::Linear, min_ratio: 0.0, ..s };
        assert!((linear.at(35, 110) - 0.75).abs() < 1e-12);
        let lambda = LambdaSchedule { start: 1.0, end: 0.5 };
        assert_eq!((lambda.at(1, 11), lambda.at(6, 11), lambda.at(11, 11)), (1.0, 0.75, 0.5));
    }
}
