//! nanochat's training schedules as functions of the step (docs/reference.md §6): the LR multiplier
//! (warmup, flat, linear warmdown), Muon momentum and Muon weight decay.

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub num_iterations: usize,
    pub warmup_steps: usize,
    /// Fraction of the run spent in the final linear warmdown.
    pub warmdown_ratio: f64,
    /// LR multiplier reached at the last step.
    pub final_lr_frac: f64,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            num_iterations: 1000,
            warmup_steps: 40,
            warmdown_ratio: 0.65,
            final_lr_frac: 0.05,
        }
    }
}

/// Muon momentum ramps 0.85 -> 0.97 over the first 400 steps, and falls to 0.90 in warmdown.
const MOMENTUM_RAMP_STEPS: f64 = 400.0;
const MOMENTUM_START: f64 = 0.85;
const MOMENTUM_PEAK: f64 = 0.97;
const MOMENTUM_END: f64 = 0.90;

impl Schedule {
    fn warmdown_steps(&self) -> usize {
        (self.warmdown_ratio * self.num_iterations as f64).round() as usize
    }

    /// Progress through the warmdown at step `it`: 0 before it starts, 1 at the end.
    fn warmdown_progress(&self, it: usize) -> f64 {
        let wd = self.warmdown_steps();
        let start = self.num_iterations.saturating_sub(wd);
        if wd == 0 || it <= start { 0.0 } else { ((it - start) as f64 / wd as f64).min(1.0) }
    }

    /// Multiplier of every group's initial learning rate at step `it` (0-based).
    pub fn lr_multiplier(&self, it: usize) -> f64 {
        if it < self.warmup_steps {
            return (it + 1) as f64 / self.warmup_steps as f64;
        }
        let p = self.warmdown_progress(it);
        (1.0 - p) + p * self.final_lr_frac
    }

    /// Muon momentum at step `it`. As in nanochat, the ramp wins over the warmdown: a run
    /// whose warmdown starts before step 400 keeps ramping until then.
    pub fn muon_momentum(&self, it: usize) -> f64 {
        if (it as f64) < MOMENTUM_RAMP_STEPS {
            let ramp = it as f64 / MOMENTUM_RAMP_STEPS;
            return MOMENTUM_START + (MOMENTUM_PEAK - MOMENTUM_START) * ramp;
        }
        let p = self.warmdown_progress(it);
        MOMENTUM_PEAK + (MOMENTUM_END - MOMENTUM_PEAK) * p
    }

    /// Muon weight decay at step `it`: cosine from `base` to 0 over the run.
    pub fn muon_weight_decay(&self, it: usize, base: f64) -> f64 {
        let frac = it as f64 / self.num_iterations.max(1) as f64;
        base * 0.5 * (1.0 + (std::f64::consts::PI * frac).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_points() {
        let s = Schedule::default(); // 1000 steps, warmdown from step 350
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(s.lr_multiplier(0), 1.0 / 40.0));
        assert!(close(s.lr_multiplier(39), 1.0));
        assert!(close(s.lr_multiplier(350), 1.0));
        assert!(close(s.lr_multiplier(675), 0.5 + 0.5 * 0.05));
        assert!(close(s.lr_multiplier(1000), 0.05));
        assert!(close(s.muon_momentum(0), 0.85));
        assert!(close(s.muon_momentum(200), 0.91));
        assert!(close(s.muon_momentum(1000), 0.90));
        let long = Schedule { num_iterations: 2000, ..s }; // warmdown from step 700
        assert!(close(long.muon_momentum(400), 0.97));
        assert!(close(long.muon_momentum(700), 0.97));
        assert!(close(long.muon_momentum(1350), 0.935));
        // A short run (warmdown from step 105) still ramps until step 400, as nanochat does.
        let short = Schedule { num_iterations: 300, ..s };
        assert!(close(short.muon_momentum(200), 0.91));
        assert!(close(short.muon_momentum(299), 0.85 + 0.12 * 299.0 / 400.0));
        assert!(close(s.muon_weight_decay(0, 0.2), 0.2));
        assert!(close(s.muon_weight_decay(500, 0.2), 0.1));
        assert!(s.muon_weight_decay(1000, 0.2).abs() < 1e-12);
    }

    #[test]
    fn lr_is_monotone_after_warmup() {
        let s = Schedule { num_iterations: 97, warmup_steps: 5, ..Default::default() };
        let lrs: Vec<f64> = (5..97).map(|i| s.lr_multiplier(i)).collect();
        assert!(lrs.windows(2).all(|w| w[1] <= w[0] + 1e-15));
    }
}
