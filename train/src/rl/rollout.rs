//! The arithmetic of nanochat's `chat_rl.py` on one question's rollouts, apart from the model:
//! which tokens the policy sampled (the calculator's forced tokens are not), the padded rows,
//! the advantages and the per-token weights of the policy-gradient loss, and pass@k.
use anyhow::{Result, bail};
use femtochat_model::tokenizer::Tokenizer;
use femtochat_model::tool::ToolState;

/// One question's rollouts: each sample's full token sequence (prompt, then the completion
/// without its final `<|assistant_end|>`, as nanochat's `Engine.generate_batch` returns them),
/// which of those tokens the policy sampled, and the sample's reward.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    pub seqs: Vec<Vec<u32>>,
    /// Per sequence, per token: 1 = sampled by the policy, 0 = prompt or forced by the tool.
    pub masks: Vec<Vec<u8>>,
    pub rewards: Vec<f32>,
}

/// Which generated tokens the policy sampled: replays the calculator over `generated` (the
/// tokens after a prompt), marking each token the tool had queued, when it came, as forced (0).
/// The tool is deterministic in the token stream, so this is exactly the engine's mask.
pub fn sampled_mask(tok: &Tokenizer, generated: &[u32]) -> Result<Vec<u8>> {
    let mut tool = ToolState::new(tok)?;
    Ok(generated
        .iter()
        .map(|&t| {
            let forced = tool.has_forced();
            tool.next(t, tok);
            u8::from(!forced)
        })
        .collect())
}

/// nanochat's advantages: the reward minus the mean reward of the question's samples (no
/// division by the standard deviation).
pub fn advantages(rewards: &[f32]) -> Vec<f32> {
    if rewards.is_empty() {
        return Vec::new();
    }
    let mean = rewards.iter().sum::<f32>() / rewards.len() as f32;
    rewards.iter().map(|r| r - mean).collect()
}

/// A group's rows padded to the longest (with `pad`, mask 0) and shifted into next-token
/// inputs and targets, both (rows, t) row-major; targets are -1 wherever the token was not
/// sampled by the policy (prompt, tool output, padding).
#[derive(Clone, Debug, PartialEq)]
pub struct PgRows {
    pub rows: usize,
    pub t: usize,
    pub inputs: Vec<u32>,
    pub targets: Vec<i32>,
}

impl PgRows {
    pub fn new(group: &Group, pad: u32) -> Result<PgRows> {
        let rows = group.seqs.len();
        if rows == 0 || group.masks.len() != rows {
            bail!("a group needs as many masks as sequences, and at least one");
        }
        let longest = group.seqs.iter().map(Vec::len).max().unwrap_or(0);
        if longest < 2 {
            bail!("rollout sequences need at least two tokens");
        }
        let t = longest - 1;
        let (mut inputs, mut targets) =
            (Vec::with_capacity(rows * t), Vec::with_capacity(rows * t));
        for (seq, mask) in group.seqs.iter().zip(&group.masks) {
            if seq.len() != mask.len() {
                bail!("a sequence of {} tokens has a mask of {}", seq.len(), mask.len());
            }
            let id = |i: usize| seq.get(i).copied().unwrap_or(pad);
            let learned = |i: usize| mask.get(i).copied().unwrap_or(0) == 1;
            for i in 0..t {
                inputs.push(id(i));
                targets.push(if learned(i + 1) { id(i + 1) as i32 } else { -1 });
            }
        }
        Ok(PgRows { rows, t, inputs, targets })
    }

    /// Rows `r0..r1` (one device batch).
    pub fn slice(&self, r0: usize, r1: usize) -> (Vec<u32>, Vec<i32>) {
        let (a, b) = (r0 * self.t, r1 * self.t);
        (self.inputs[a..b].to_vec(), self.targets[a..b].to_vec())
    }
}

/// The weight of each token's negative log-likelihood in one pass's loss, so that
/// `loss = sum(nll * w)` is nanochat's `-sum(logp * advantage) / (num_valid * num_passes *
/// examples_per_step)`: the advantage of the token's row over the pass's count of learned
/// targets (at least 1), the passes and the examples; 0 where the target is ignored.
pub fn pg_weights(
    targets: &[i32],
    t: usize,
    advantages: &[f32],
    num_passes: usize,
    examples_per_step: usize,
) -> Vec<f32> {
    let valid = targets.iter().filter(|&&y| y >= 0).count().max(1);
    let denom = (valid * num_passes.max(1) * examples_per_step.max(1)) as f32;
    targets
        .iter()
        .enumerate()
        .map(|(i, &y)| if y >= 0 { advantages[i / t.max(1)] / denom } else { 0.0 })
        .collect()
}

/// pass@k for k = 1..=samples: the fraction of problems with a correct sample among their
/// first k (each inner list is one problem's outcomes in sampling order).
pub fn pass_at_k(outcomes: &[Vec<bool>]) -> Vec<f64> {
    let k_max = outcomes.iter().map(Vec::len).max().unwrap_or(0);
    (1..=k_max)
        .map(|k| {
            let solved = outcomes.iter().filter(|o| o.iter().take(k).any(|&c| c)).count();
            solved as f64 / outcomes.len().max(1) as f64
        })
        .collect()
}
