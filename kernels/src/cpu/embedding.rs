//! Embedding: gather rows of a (V, C) table by u32 ids; backward scatter-adds into the table.
//!
//! Forward is parallelised over output rows. Backward is deterministic without float atomics:
//! positions are bucketed by id (a counting sort, in position order), then each task owns whole
//! rows of `dweight` and sums its positions in ascending order. Forward writes `out =`; backward
//! accumulates `dweight +=`. Ids must be < V (the caller validates them).
use rayon::prelude::*;

use super::elementwise::CHUNK;

/// out (N, C) = weight (V, C)[ids (N)]
pub fn embedding_forward(out: &mut [f32], weight: &[f32], ids: &[u32], c: usize) {
    assert_eq!(out.len(), ids.len() * c);
    assert!(
        c == 0 || weight.len().is_multiple_of(c),
        "embedding: table of {} floats, rows of {c}",
        weight.len()
    );
    if c == 0 {
        return;
    }
    let row = |(o, &id): (&mut [f32], &u32)| {
        let id = id as usize;
        o.copy_from_slice(&weight[id * c..(id + 1) * c]);
    };
    if out.len() <= CHUNK {
        out.chunks_mut(c).zip(ids).for_each(row);
    } else {
        out.par_chunks_mut(c).zip(ids.par_iter()).for_each(row);
    }
}

/// dweight (V, C) += sum over positions p with ids[p] == v of dout (N, C)[p]
pub fn embedding_backward(dweight: &mut [f32], dout: &[f32], ids: &[u32], c: usize) {
    assert_eq!(dout.len(), ids.len() * c);
    assert!(
        c == 0 || dweight.len().is_multiple_of(c),
        "embedding: table of {} floats, rows of {c}",
        dweight.len()
    );
    if c == 0 {
        return;
    }
    let v = dweight.len() / c;
    // Counting sort of positions by id: start[id]..start[id+1] indexes `order`.
    let mut start = vec![0usize; v + 1];
    for &id in ids {
        start[id as usize + 1] += 1;
    }
    for i in 0..v {
        start[i + 1] += start[i];
    }
    let mut fill = start.clone();
    let mut order = vec![0usize; ids.len()];
    for (p, &id) in ids.iter().enumerate() {
        order[fill[id as usize]] = p;
        fill[id as usize] += 1;
    }
    let row = |(id, d): (usize, &mut [f32])| {
        for &p in &order[start[id]..start[id + 1]] {
            d.iter_mut().zip(&dout[p * c..(p + 1) * c]).for_each(|(d, &g)| *d += g);
        }
    };
    if dout.len() <= CHUNK {
        dweight.chunks_mut(c).enumerate().for_each(row);
    } else {
        dweight.par_chunks_mut(c).enumerate().for_each(row);
    }
}

/// Reference backward: a serial scatter-add in position order.
pub fn embedding_backward_naive(dweight: &mut [f32], dout: &[f32], ids: &[u32], c: usize) {
    assert!(dout.len() == ids.len() * c && (c == 0 || dweight.len().is_multiple_of(c)));
    for (p, &id) in ids.iter().enumerate() {
        let id = id as usize;
        for k in 0..c {
            dweight[id * c + k] += dout[p * c + k];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn backward_matches_naive(
            v in 1usize..50,
            c in 1usize..40,
            raw in prop::collection::vec(any::<u32>(), 0..600),
        ) {
            let ids: Vec<u32> = raw.iter().map(|&r| r % v as u32).collect();
            let n = ids.len();
            let w: Vec<f32> = (0..v * c).map(|i| i as f32 * 0.5).collect();
            let mut out = vec![0.0; n * c];
            embedding_forward(&mut out, &w, &ids, c);
            for (p, &id) in ids.iter().enumerate() {
                prop_assert_eq!(&out[p * c..(p + 1) * c], &w[id as usize * c..(id as usize + 1) * c]);
            }
            let dout: Vec<f32> = (0..n * c).map(|i| ((i * 13) % 7) as f32 - 3.0).collect();
            let (mut fast, mut naive) = (vec![1.0; v * c], vec![1.0; v * c]);
            embedding_backward(&mut fast, &dout, &ids, c);
            embedding_backward_naive(&mut naive, &dout, &ids, c);
            // Same summation order per row, so bitwise equal.
            prop_assert_eq!(fast, naive);
        }
    }
}
