//! Next-token sampling from a logits row (docs/reference.md §10): temperature 0 is argmax; otherwise
//! optional repetition penalties, then top-k, then temperature, softmax, top-p, and a draw from a
//! seeded RNG, so a fixed seed reproduces a generation exactly.
//!
//! The draw walks the tokens by rank, but never sorts the whole vocabulary: top-k is a selection
//! and the ranks a walk reaches are sorted on demand (`Ranking`). The full-sort sampler this
//! replaces stays in the tests as the oracle the draws are checked against.
use crate::error::{ModelError, Result};
use crate::rng::Rng;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens (None = all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches top_p (1.0 = all).
    pub top_p: f32,
    /// OpenAI semantics: logit -= presence * [count > 0] + frequency * count.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Invalid(m));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if self.top_k == Some(0) {
            return bad("top_k must be >= 1".into());
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        Ok(())
    }
}

/// A sampler: parameters plus its own RNG stream.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64) -> Result<Sampler> {
        params.validate()?;
        Ok(Sampler { params, rng: Rng::new(seed) })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Pick the next token from `logits` (V); `history` holds the tokens generated so far (for
    /// the repetition penalties).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(ModelError::Invalid("empty logits".into()));
        }
        if let Some(i) = logits.iter().position(|v| v.is_nan()) {
            return Err(ModelError::Invalid(format!("NaN logit at token {i}")));
        }
        let p = &self.params;
        let z = penalised(logits, history, p);
        if p.temperature == 0.0 {
            return Ok(argmax(&z));
        }
        let v = z.len();
        let mut ranks = Ranking::new(&z, p.top_k.map_or(v, |k| k.min(v)));
        let n = ranks.len();
        let max = z[ranks.get(0)];
        let weight = |i: usize| (((z[i] - max) / p.temperature) as f64).exp();
        // The normaliser: a top-k set is ranked anyway and summed in rank order; the whole
        // vocabulary is summed in id order, which needs no sort (the full-sort reference sums
        // in rank order, so the two may differ in the last bit of the total).
        let total: f64 = if n < v {
            (0..n).map(|r| weight(ranks.get(r))).sum()
        } else {
            (0..v).map(weight).sum()
        };
        // probs[r]: the probability of the token at rank r, filled in as far as the walks reach.
        let mut probs: Vec<f64> = Vec::new();
        let mut prob = |r: usize, ranks: &mut Ranking| -> f64 {
            while probs.len() <= r {
                probs.push(weight(ranks.get(probs.len())) / total);
            }
            probs[r]
        };
        let (mut keep, mut renorm) = (n, 1.0);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for r in 0..n {
                acc += prob(r, &mut ranks);
                if acc >= p.top_p as f64 {
                    keep = r + 1;
                    break;
                }
            }
            renorm = (0..keep).map(|r| prob(r, &mut ranks)).sum();
        }
        let u = self.rng.next_f64();
        let mut acc = 0.0;
        for r in 0..keep {
            let q = prob(r, &mut ranks);
            acc += if p.top_p < 1.0 { q / renorm } else { q };
            if u < acc {
                return Ok(ranks.get(r) as u32);
            }
        }
        // Rounding left u just above the last cumulative sum.
        Ok(ranks.get(keep - 1) as u32)
    }
}

/// The logits after the repetition penalties (OpenAI semantics).
fn penalised(logits: &[f32], history: &[u32], p: &SamplingParams) -> Vec<f32> {
    let mut z = logits.to_vec();
    if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
        let mut counts = std::collections::HashMap::<u32, u32>::new();
        for &t in history {
            *counts.entry(t).or_default() += 1;
        }
        for (t, c) in counts {
            if let Some(v) = z.get_mut(t as usize) {
                *v -= p.presence_penalty + p.frequency_penalty * c as f32;
            }
        }
    }
    z
}

/// Ranks sorted on demand.
const FIRST_RANKS: usize = 64;

/// Token ids by rank (logit descending, ties by the smaller id), sorted lazily: a draw walks the
/// ranks from the top and usually stops after a few, so only the ranks it reaches are sorted
/// instead of the whole vocabulary. `order[..sorted]` is in rank order and outranks the rest.
struct Ranking<'a> {
    z: &'a [f32],
    order: Vec<usize>,
    sorted: usize,
}

impl<'a> Ranking<'a> {
    /// The `n` best-ranked ids (n >= 1) of `z`, with nothing sorted yet.
    fn new(z: &'a [f32], n: usize) -> Ranking<'a> {
        let mut order: Vec<usize> = (0..z.len()).collect();
        if n < order.len() {
            order.select_nth_unstable_by(n - 1, |&a, &b| rank_cmp(z, a, b));
            order.truncate(n);
        }
        Ranking { z, order, sorted: 0 }
    }

    fn len(&self) -> usize {
        self.order.len()
    }

    /// The id at rank `r` (< len).
    fn get(&mut self, r: usize) -> usize {
        if r >= self.sorted {
            // Grow geometrically: a long walk then costs a few selections, not one per rank.
            let m = (r + 1).max(2 * self.sorted).max(FIRST_RANKS).min(self.order.len());
            let z = self.z;
            let rest = &mut self.order[self.sorted..];
            let k = m - self.sorted;
            if k < rest.len() {
                rest.select_nth_unstable_by(k - 1, |&a, &b| rank_cmp(z, a, b));
            }
            rest[..k].sort_unstable_by(|&a, &b| rank_cmp(z, a, b));
            self.sorted = m;
        }
        self.order[r]
    }
}

/// Rank order: larger logit first, then smaller id (a strict total order, so partial and full
/// sorts agree).
fn rank_cmp(z: &[f32], a: usize, b: usize) -> std::cmp::Ordering {
    z[b].total_cmp(&z[a]).then(a.cmp(&b))
}

/// Index of the largest value (the first one on ties).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(p: SamplingParams, seed: u64) -> Sampler {
        Sampler::new(p, seed).unwrap()
    }

    const LOGITS: [f32; 5] = [1.0, 3.0, 0.5, 2.9, -1.0];

    #[test]
    fn greedy_and_its_limits() {
        let greedy = SamplingParams { temperature: 0.0, ..Default::default() };
        assert_eq!(sampler(greedy, 0).sample(&LOGITS, &[]).unwrap(), 1);
        for seed in 0..20 {
            let top1 = SamplingParams { top_k: Some(1), ..Default::default() };
            assert_eq!(sampler(top1, seed).sample(&LOGITS, &[]).unwrap(), 1);
            let tiny_p = SamplingParams { top_p: 1e-6, ..Default::default() };
            assert_eq!(sampler(tiny_p, seed).sample(&LOGITS, &[]).unwrap(), 1);
        }
    }

    #[test]
    fn seeded_runs_repeat() {
        let draw = |seed| {
            let mut s = sampler(SamplingParams::default(), seed);
            (0..50).map(|_| s.sample(&LOGITS, &[]).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(draw(4), draw(4));
        assert_ne!(draw(4), draw(5));
    }

    /// Empirical frequencies match softmax(logits / T) within a few standard errors.
    #[test]
    fn frequencies_match_softmax() {
        let t = 0.7;
        let mut s = sampler(SamplingParams { temperature: t, ..Default::default() }, 11);
        let n = 40_000;
        let mut counts = [0usize; 5];
        for _ in 0..n {
            counts[s.sample(&LOGITS, &[]).unwrap() as usize] += 1;
        }
        let e: Vec<f64> = LOGITS.iter().map(|&l| ((l / t) as f64).exp()).collect();
        let z: f64 = e.iter().sum();
        for (i, &c) in counts.iter().enumerate() {
            let p = e[i] / z;
            let se = (p * (1.0 - p) / n as f64).sqrt();
            let got = c as f64 / n as f64;
            assert!((got - p).abs() < 5.0 * se + 1e-4, "token {i}: {got} vs {p}");
        }
    }

    #[test]
    fn top_k_and_penalties() {
        let mut s = sampler(SamplingParams { top_k: Some(2), ..Default::default() }, 3);
        for _ in 0..200 {
            assert!(matches!(s.sample(&LOGITS, &[]).unwrap(), 1 | 3));
        }
        // A strong frequency penalty on token 1 makes greedy pick token 3.
        let p = SamplingParams { temperature: 0.0, frequency_penalty: 1.0, ..Default::default() };
        assert_eq!(sampler(p, 0).sample(&LOGITS, &[1]).unwrap(), 3);
    }

    /// The sampler before partial ranking: sort every token, then walk. The oracle.
    fn full_sort_sample(p: &SamplingParams, rng: &mut Rng, logits: &[f32], history: &[u32]) -> u32 {
        let z = penalised(logits, history, p);
        if p.temperature == 0.0 {
            return argmax(&z);
        }
        let mut order: Vec<usize> = (0..z.len()).collect();
        order.sort_by(|&a, &b| z[b].total_cmp(&z[a]).then(a.cmp(&b)));
        if let Some(k) = p.top_k {
            order.truncate(k.min(order.len()));
        }
        let max = z[order[0]];
        let mut probs: Vec<f64> =
            order.iter().map(|&i| (((z[i] - max) / p.temperature) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|&q| {
                    acc += q;
                    acc >= p.top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            order.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|q| *q /= total);
        }
        let u = rng.next_f64();
        let mut acc = 0.0;
        for (q, &i) in probs.iter().zip(&order) {
            acc += q;
            if u < acc {
                return i as u32;
            }
        }
        order[probs.len() - 1] as u32
    }

    /// Partial ranking draws exactly the tokens the full sort draws, seed for seed: top-k sizes
    /// below, at and above the first sorted block and the vocabulary, top-p from tight to loose,
    /// penalties, tied logits (ties go to the smaller id in both), and flat and peaked rows.
    #[test]
    fn partial_ranking_draws_what_the_full_sort_draws() {
        let v = 1024;
        let mut rng = Rng::new(1);
        // Peaked (a language model's usual row) and flat, both rounded to quarters for ties.
        let rows: Vec<Vec<f32>> = [6.0f32, 0.5]
            .iter()
            .map(|&scale| (0..v).map(|_| (rng.normal() * scale * 4.0).round() / 4.0).collect())
            .collect();
        let mut draws = 0;
        for row in &rows {
            for top_k in [None, Some(1), Some(2), Some(50), Some(300), Some(v), Some(v + 5)] {
                for top_p in [1.0, 0.99, 0.9, 0.5, 0.05] {
                    for (temperature, pen) in [(1.0, 0.0), (0.3, 0.0), (1.7, 0.5)] {
                        let p = SamplingParams {
                            temperature,
                            top_k,
                            top_p,
                            presence_penalty: pen,
                            frequency_penalty: pen,
                        };
                        for seed in 0..3 {
                            let mut fast = sampler(p.clone(), seed);
                            let mut oracle = Rng::new(seed);
                            let mut history = Vec::new();
                            for _ in 0..20 {
                                let want = full_sort_sample(&p, &mut oracle, row, &history);
                                let got = fast.sample(row, &history).unwrap();
                                assert_eq!(got, want, "{p:?} seed {seed} after {history:?}");
                                history.push(got);
                                draws += 1;
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(draws, 2 * 7 * 5 * 3 * 3 * 20);
    }

    #[test]
    fn bad_arguments_are_errors() {
        for p in [
            SamplingParams { temperature: -1.0, ..Default::default() },
            SamplingParams { top_p: 0.0, ..Default::default() },
            SamplingParams { top_p: 1.5, ..Default::default() },
            SamplingParams { top_k: Some(0), ..Default::default() },
            SamplingParams { presence_penalty: 3.0, ..Default::default() },
        ] {
            assert!(Sampler::new(p, 0).is_err());
        }
        let mut s = sampler(SamplingParams::default(), 0);
        assert!(s.sample(&[1.0, f32::NAN], &[]).is_err());
        assert!(s.sample(&[], &[]).is_err());
    }
}
