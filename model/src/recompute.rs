//! What the training forward recomputes in the backward instead of keeping (activation
//! checkpointing, `--recompute`): the memory-for-compute trade of the engine's
//! `Tensor::checkpoint`, applied to the GPT's blocks and lm head.
use std::fmt;
use std::str::FromStr;

use crate::error::ModelError;

/// Which parts of the training forward are checkpointed segments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Recompute {
    /// Keep every activation (fastest, most memory).
    #[default]
    None,
    /// Every block is a segment: the forward keeps one (B, T, C) input per block; the backward
    /// recomputes one block at a time.
    Blocks,
    /// Groups of k consecutive blocks are segments: the forward keeps every k-th block input;
    /// the backward recomputes k blocks at once (less kept, more alive during the backward).
    Every(usize),
    /// `Blocks`, and the lm head and loss too (in row chunks), whose (rows, vocab) logits are the
    /// largest activations of small-width models.
    All,
    /// `All` at half-block grain: the attention and the MLP sublayer of every block are
    /// segments of their own (two kept (B, T, C) inputs per block), so the backward rebuilds
    /// half a block at a time — the largest rebuilt segment sets the peak once the rest is
    /// recomputed.
    Sublayers,
}

impl Recompute {
    /// Block ranges start..end that are segments, covering 0..n_layer; empty for `None`.
    /// `cut_after` (the backout layer, whose output the trunk reads again) always ends a
    /// segment, so that output is a segment output rather than an activation inside one.
    pub fn segments(self, n_layer: usize, cut_after: usize) -> Vec<(usize, usize)> {
        let k = match self {
            Recompute::None => return Vec::new(),
            Recompute::Blocks | Recompute::All | Recompute::Sublayers => 1,
            Recompute::Every(k) => k.max(1),
        };
        let mut out = Vec::new();
        let mut start = 0;
        while start < n_layer {
            let mut end = (start + k).min(n_layer);
            if start <= cut_after && cut_after < end {
                end = cut_after + 1;
            }
            out.push((start, end));
            start = end;
        }
        out
    }

    /// Whether the lm head and loss are recomputed.
    pub fn head(self) -> bool {
        matches!(self, Recompute::All | Recompute::Sublayers)
    }

    /// Whether each block's attention and MLP halves are separate segments.
    pub fn sublayers(self) -> bool {
        self == Recompute::Sublayers
    }
}

impl fmt::Display for Recompute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Recompute::None => f.write_str("none"),
            Recompute::Blocks => f.write_str("blocks"),
            Recompute::Every(k) => write!(f, "every-{k}"),
            Recompute::All => f.write_str("all"),
            Recompute::Sublayers => f.write_str("sublayers"),
        }
    }
}

impl FromStr for Recompute {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Recompute, ModelError> {
        let bad = || {
            ModelError::Invalid(format!(
                "unknown recompute mode `{s}` (expected none, blocks, every-K with K >= 1, all or sublayers)"
            ))
        };
        match s {
            "none" => Ok(Recompute::None),
            "blocks" => Ok(Recompute::Blocks),
            "all" => Ok(Recompute::All),
            "sublayers" => Ok(Recompute::Sublayers),
            _ => {
                let k: usize =
                    s.strip_prefix("every-").ok_or_else(bad)?.parse().map_err(|_| bad())?;
                if k == 0 {
                    return Err(bad());
                }
                Ok(Recompute::Every(k))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_every_mode() {
        for s in ["none", "blocks", "every-3", "all"] {
            assert_eq!(s.parse::<Recompute>().unwrap().to_string(), s);
        }
        for s in ["", "every-0", "every-", "every-x", "block"] {
            assert!(s.parse::<Recompute>().is_err(), "{s}");
        }
    }

    #[test]
    fn segments_cover_the_layers_and_cut_at_the_backout_layer() {
        assert!(Recompute::None.segments(4, 2).is_empty());
        assert_eq!(Recompute::Blocks.segments(3, 1), vec![(0, 1), (1, 2), (2, 3)]);
        // d8, backout after layer 4: groups of 3 are 0..3, 3..5 (cut), 5..8.
        assert_eq!(Recompute::Every(3).segments(8, 4), vec![(0, 3), (3, 5), (5, 8)]);
        assert_eq!(Recompute::Every(10).segments(4, 2), vec![(0, 3), (3, 4)]);
    }
}
