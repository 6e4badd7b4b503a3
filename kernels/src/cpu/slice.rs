//! Block copies along one dim, the kernels behind narrow and cat (and their backwards).
//!
//! A tensor is viewed as (outer, n, inner) around the dim; a block is `len` consecutive indices
//! of that dim. Parallelised over `outer` (each task owns one destination block row).
//! `accumulate` selects `dst +=` (gradients) over `dst =`.
use rayon::prelude::*;

use super::elementwise::CHUNK;

/// One side of a block copy: a buffer viewed as (outer, n, inner), block starting at `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockView {
    pub n: usize,
    pub off: usize,
}

/// dst (outer, dst.n, inner)[:, dst.off..+len, :] (=|+=) src (outer, src.n, inner)[:, src.off..+len, :]
#[allow(clippy::too_many_arguments)]
pub fn copy_block(
    dst: &mut [f32],
    dv: BlockView,
    src: &[f32],
    sv: BlockView,
    outer: usize,
    len: usize,
    inner: usize,
    accumulate: bool,
) {
    assert_eq!(dst.len(), outer * dv.n * inner);
    assert_eq!(src.len(), outer * sv.n * inner);
    assert!(dv.off + len <= dv.n && sv.off + len <= sv.n);
    let (drow, srow, blk) = (dv.n * inner, sv.n * inner, len * inner);
    if drow == 0 || blk == 0 {
        return;
    }
    let row = |o: usize, d: &mut [f32]| {
        let d = &mut d[dv.off * inner..dv.off * inner + blk];
        let s = &src[o * srow + sv.off * inner..][..blk];
        if accumulate {
            d.iter_mut().zip(s).for_each(|(d, &s)| *d += s);
        } else {
            d.copy_from_slice(s);
        }
    };
    if outer * blk <= CHUNK {
        dst.chunks_mut(drow).enumerate().for_each(|(o, d)| row(o, d));
    } else {
        dst.par_chunks_mut(drow).enumerate().for_each(|(o, d)| row(o, d));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrow_and_scatter_back() {
        // src (2, 4, 3) -> dst (2, 2, 3) = src[:, 1:3, :]
        let src: Vec<f32> = (0..24).map(|i| i as f32).collect();
        let mut dst = vec![0.0; 12];
        copy_block(
            &mut dst,
            BlockView { n: 2, off: 0 },
            &src,
            BlockView { n: 4, off: 1 },
            2,
            2,
            3,
            false,
        );
        assert_eq!(dst, vec![3., 4., 5., 6., 7., 8., 15., 16., 17., 18., 19., 20.]);
        let mut back = vec![1.0; 24];
        copy_block(
            &mut back,
            BlockView { n: 4, off: 1 },
            &dst,
            BlockView { n: 2, off: 0 },
            2,
            2,
            3,
            true,
        );
        assert_eq!(back[3], 4.0);
        assert_eq!(back[0], 1.0);
        assert_eq!(back[20], 21.0);
    }
}
