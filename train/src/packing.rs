//! Best-fit packing of token sequences into rows of T + 1 tokens, nanochat's two ways:
//!
//! - [`Fill::Crop`] (pretraining, and mid-training's conversations): take the largest buffered
//!   sequence that fits whole in what is left of the row; when none fits, crop the shortest to
//!   fill the row exactly (its rest is dropped).
//! - [`Fill::Pad`] (SFT, `sft_data_generator_bos_bestfit`): the same best fit, but when none fits
//!   the rest of the row is padded with BOS whose targets are ignored; no sequence is ever cut.
//!
//! Every sequence starts with BOS, so every row does too. Ties go to the earliest buffered
//! sequence, as nanochat's scan does.

/// What to do when no buffered sequence fits in the rest of a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    Crop,
    Pad,
}

/// A sequence waiting in the buffer: its ids and per-token training mask (1 = learned).
#[derive(Clone, Debug, PartialEq)]
pub struct Seq {
    /// Where the sequence came from (document or conversation number), for loader state.
    pub id: u64,
    pub ids: Vec<u32>,
    pub mask: Vec<u8>,
}

/// One packed row: T + 1 ids, their masks, and how many leading tokens are content (the rest
/// is padding).
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub ids: Vec<u32>,
    pub mask: Vec<u8>,
    pub content: usize,
    /// Ids of the sequences placed whole, in order (a cropped one is not counted).
    pub whole: Vec<u64>,
}

/// Index of the largest buffered sequence of at most `room` tokens (earliest on ties).
fn best_fit(buffer: &[Seq], room: usize) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, s) in buffer.iter().enumerate() {
        if s.ids.len() <= room && best.is_none_or(|b| s.ids.len() > buffer[b].ids.len()) {
            best = Some(i);
        }
    }
    best
}

/// Fill one row of `len` tokens from `buffer`, calling `refill` before each placement (it tops
/// the buffer up and returns false once the source is dry). Returns None when the buffer is
/// empty before anything was placed.
pub fn pack_row(
    buffer: &mut Vec<Seq>,
    len: usize,
    fill: Fill,
    pad: u32,
    mut refill: impl FnMut(&mut Vec<Seq>) -> anyhow::Result<()>,
) -> anyhow::Result<Option<Row>> {
    let mut row = Row {
        ids: Vec::with_capacity(len),
        mask: Vec::with_capacity(len),
        content: 0,
        whole: Vec::new(),
    };
    while row.ids.len() < len {
        refill(buffer)?;
        if buffer.is_empty() {
            if row.ids.is_empty() {
                return Ok(None);
            }
            break;
        }
        let room = len - row.ids.len();
        match best_fit(buffer, room) {
            Some(i) => {
                let s = buffer.remove(i);
                row.ids.extend_from_slice(&s.ids);
                row.mask.extend_from_slice(&s.mask);
                row.whole.push(s.id);
            }
            None if fill == Fill::Crop => {
                let i = (0..buffer.len())
                    .min_by_key(|&i| buffer[i].ids.len())
                    .ok_or_else(|| anyhow::anyhow!("the buffer is not empty"))?;
                let s = buffer.remove(i);
                row.ids.extend_from_slice(&s.ids[..room]);
                row.mask.extend_from_slice(&s.mask[..room]);
            }
            None if row.ids.is_empty() => anyhow::bail!(
                "no buffered sequence fits an empty row of {len} tokens (sequences must be \
                 truncated to the row length before packing)"
            ),
            None => break,
        }
    }
    row.content = row.ids.len();
    row.mask.resize(len, 0);
    row.ids.resize(len, pad);
    Ok(Some(row))
}

impl Row {
    /// Inputs `ids[..T]` and targets `ids[1..]`, with -1 wherever the target is not learned:
    /// its mask is 0, or it lies in the padding (nanochat masks from `content - 1` on).
    pub fn inputs_targets(&self, masked: bool) -> (Vec<u32>, Vec<i32>) {
        let t = self.ids.len() - 1;
        let inputs = self.ids[..t].to_vec();
        let targets = (0..t)
            .map(|i| {
                let learned = (!masked || self.mask[i + 1] == 1) && i + 1 < self.content;
                if learned { self.ids[i + 1] as i32 } else { -1 }
            })
            .collect();
        (inputs, targets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(id: u64, n: usize) -> Seq {
        let mut ids = vec![0u32];
        ids.extend((1..n as u32).map(|k| 100 * id as u32 + k));
        let mask = (0..n).map(|k| (k % 2) as u8).collect();
        Seq { id, ids, mask }
    }

    fn no_refill(_: &mut Vec<Seq>) -> anyhow::Result<()> {
        Ok(())
    }

    #[test]
    fn pad_never_crops_and_pads_with_ignored_targets() {
        let mut buf = vec![seq(1, 6), seq(2, 4), seq(3, 9)];
        let row = pack_row(&mut buf, 11, Fill::Pad, 0, no_refill).unwrap().unwrap();
        // The largest that fits (9), then nothing fits in 2: padded.
        assert_eq!(row.whole, vec![3]);
        assert_eq!((row.content, row.ids.len()), (9, 11));
        assert_eq!(&row.ids[9..], &[0, 0]);
        let (inputs, targets) = row.inputs_targets(true);
        assert_eq!(inputs.len(), 10);
        assert_eq!(inputs[0], 0, "rows start with BOS");
        // Targets are learned where the next token's mask is 1 and inside the content.
        for (i, &t) in targets.iter().enumerate() {
            let want = if row.mask[i + 1] == 1 && i + 1 < 9 { row.ids[i + 1] as i32 } else { -1 };
            assert_eq!(t, want, "position {i}");
        }
        assert!(targets[8..].iter().all(|&t| t == -1), "padding is ignored");
        let row = pack_row(&mut buf, 11, Fill::Pad, 0, no_refill).unwrap().unwrap();
        assert_eq!((row.whole, row.content), (vec![1, 2], 10));
    }

    #[test]
    fn crop_fills_rows_exactly() {
        let mut buf = vec![seq(1, 6), seq(2, 9)];
        let row = pack_row(&mut buf, 11, Fill::Crop, 0, no_refill).unwrap().unwrap();
        assert_eq!((row.whole.clone(), row.content), (vec![2], 11));
        assert_eq!(&row.ids[9..], &seq(1, 6).ids[..2], "the shortest is cropped to fill");
        let (_, targets) = row.inputs_targets(false);
        assert!(targets.iter().all(|&t| t >= 0), "unmasked: every target is learned");
        assert!(buf.is_empty());
        assert!(pack_row(&mut buf, 11, Fill::Crop, 0, no_refill).unwrap().is_none());
    }
}
