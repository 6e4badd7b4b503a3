// Tiled flash attention (forward and backward with recomputation), the WGSL twin of
// cpu/flash_attention.rs. Layout as attention.wgsl: q (B, Tq, H, D), k, v (B, Tk, Hkv, D); query row
// i sits at position pos0 + i and attends keys j in [pos0 + i - window, pos0 + i]; GQA reads kv head
// h / (H / Hkv); scale 1/sqrt(D). The T x T score matrix never exists: the softmax is online
// (running max and sum), the forward saves only the per-row logsumexp, and the backward recomputes
// probabilities from it in two passes, each the only writer of what it writes (no float atomics):
// a dQ pass over query blocks (which also writes delta = dout . out) and a dK/dV pass over key
// blocks that loops over the GQA group's query heads.
// Two families of kernels:
//   *_tiled (below, head dims that are multiples of 16 up to 128): matmul-style register tiles
//           spread over a 16 x 16 workgroup; the fast path.
//   flash_forward, flash_backward_dq, flash_backward_dkv (every head dim up to 256): one thread per
//           row, the row in private memory, key (or query) tiles of TILE_FLOATS floats per operand
//           staged in workgroup memory and shared by the BR rows (16 KiB for two operands,
//           WebGPU's guaranteed workgroup memory), so a tile has TILE_FLOATS / D rows.
// Decode (a few query rows, long cache) splits the keys instead: flash_decode_partial / _combine.

const BR: u32 = 64u;           // rows per workgroup (one per thread)
const MAX_D: u32 = 256u;
const TILE_FLOATS: u32 = 2048u;

struct Params {
    b: u32,
    tq: u32,
    tk: u32,
    h: u32,
    hkv: u32,
    d: u32,
    window: u32, // clamped to Tk by the host
    pos0: u32,
    scale: f32,
    blocks: u32, // row blocks per (b, head): ceil(Tq / BR) or ceil(Tk / BR)
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> o: array<f32>;     // out / dq / dk
@group(0) @binding(2) var<storage, read_write> lse: array<f32>;   // (B, Tq, H)
@group(0) @binding(3) var<storage, read> q: array<f32>;
@group(0) @binding(4) var<storage, read> k: array<f32>;
@group(0) @binding(5) var<storage, read> v: array<f32>;
@group(0) @binding(6) var<storage, read> dout: array<f32>;
@group(0) @binding(7) var<storage, read> saved: array<f32>;       // forward out
@group(0) @binding(8) var<storage, read_write> delta: array<f32>; // (B, Tq, H)
@group(0) @binding(9) var<storage, read_write> dv: array<f32>;

var<workgroup> tile_a: array<f32, TILE_FLOATS>; // K (fwd, dq) or Q (dkv)
var<workgroup> tile_b: array<f32, TILE_FLOATS>; // V (fwd, dq) or dOut (dkv)
var<workgroup> tile_s: array<f32, 2 * BR>;      // dkv: lse and delta of the staged query rows

fn q_off(bi: u32, i: u32, hh: u32) -> u32 { return ((bi * p.tq + i) * p.h + hh) * p.d; }
fn k_off(bi: u32, j: u32, kvh: u32) -> u32 { return ((bi * p.tk + j) * p.hkv + kvh) * p.d; }

// Keys [lo, hi] seen by some query of rows [r0, r1] (absolute positions pos0 + r).
fn key_span(r0: u32, r1: u32) -> vec2<u32> {
    let first = p.pos0 + r0;
    return vec2<u32>(first - min(p.window, first), p.pos0 + r1);
}

// The (batch, head, block of `rows` query rows) a query-block workgroup owns; `ok` is false for
// the padding workgroups past the grid (folded into 2-D past 65535 workgroups).
struct QBlock { ok: bool, bi: u32, hh: u32, kvh: u32, r0: u32, nr: u32 }

fn query_block(wg3: vec3<u32>, nwg: vec3<u32>, rows: u32) -> QBlock {
    let wg = wg3.y * nwg.x + wg3.x;
    let hh = (wg / p.blocks) % p.h;
    let r0 = (wg % p.blocks) * rows;
    let ok = wg < p.b * p.h * p.blocks;
    return QBlock(ok, wg / (p.blocks * p.h), hh, hh / (p.h / p.hkv), r0, min(rows, p.tq - r0));
}

// Stage rows [j0, j0 + n) of k and v (kv head kvh) into the tiles; rows past Tk load zeros.
fn stage_kv(bi: u32, kvh: u32, j0: u32, n: u32, t: u32) {
    for (var e = t; e < n * p.d; e += BR) {
        let r = e / p.d;
        let c = e % p.d;
        var kk = 0.0;
        var vv = 0.0;
        if (j0 + r < p.tk) {
            let off = k_off(bi, j0 + r, kvh) + c;
            kk = k[off];
            vv = v[off];
        }
        tile_a[e] = kk;
        tile_b[e] = vv;
    }
}

@compute @workgroup_size(BR)
fn flash_forward(@builtin(workgroup_id) wg3: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let qb = query_block(wg3, nwg, BR);
    if (!qb.ok) { return; }
    let bi = qb.bi;
    let hh = qb.hh;
    let t = lid.x;
    let r0 = qb.r0;
    let i = r0 + t;
    let live = i < p.tq;
    let kvh = qb.kvh;
    let bc = TILE_FLOATS / p.d;
    let span = key_span(r0, min(r0 + BR, p.tq) - 1u);
    let pos = p.pos0 + i;
    let lo = pos - min(p.window, pos);
    var qr: array<f32, MAX_D>;
    var acc: array<f32, MAX_D>;
    if (live) {
        let qo = q_off(bi, i, hh);
        for (var c = 0u; c < p.d; c++) { qr[c] = q[qo + c] * p.scale; acc[c] = 0.0; }
    }
    var m = -3.4e38;
    var l = 0.0;
    for (var j0 = span.x; j0 <= span.y; j0 += bc) {
        workgroupBarrier();
        stage_kv(bi, kvh, j0, bc, t);
        workgroupBarrier();
        if (live) {
            let jend = min(j0 + bc, pos + 1u);
            for (var j = max(j0, lo); j < jend; j++) {
                let base = (j - j0) * p.d;
                var s = 0.0;
                for (var c = 0u; c < p.d; c++) { s = fma(qr[c], tile_a[base + c], s); }
                let m_new = max(m, s);
                let corr = exp(m - m_new);
                let pj = exp(s - m_new);
                l = l * corr + pj;
                for (var c = 0u; c < p.d; c++) { acc[c] = fma(pj, tile_b[base + c], acc[c] * corr); }
                m = m_new;
            }
        }
    }
    if (live) {
        let qo = q_off(bi, i, hh);
        for (var c = 0u; c < p.d; c++) { o[qo + c] = acc[c] / l; }
        lse[(bi * p.tq + i) * p.h + hh] = m + log(l);
    }
}

// Kernels tiled like a matmul (FlashAttention-2's structure), for head dims that are multiples
// of 16 up to 128 (the model's 64 and 128; the launchers send others to the row-per-thread
// kernels above and below). A 16 x 16 workgroup owns R rows (queries, or keys in dK/dV) and walks
// C-wide tiles of the other side; R = 16 FT_RPT and C = 16 FT_CPT are pipeline constants (16, 32
// or 64 each; 64 x 32 by default), so the host tunes them per device without a new shader. Every
// product is either an (R, C) tile of A B^T over 16-wide head-dim slices staged in workgroup
// memory (`tile_abt`: thread (ty, tx) holds rows FT_RPT ty + r, columns tx + 16 c) or the (R, C)
// tile in t_p times C staged rows (`acc_tile_x`: the thread holds rows FT_RPT ty + r, columns
// tx + 16 c of an (R, D) accumulator), so no thread ever holds a whole row of length D, and every
// loop over a register array has a bound fixed at pipeline creation (D / 16 <= 8 is a guard), so
// the arrays stay in registers.
//   flash_forward_tiled:      per key tile S = (scale Q) K^T; thread r < R runs row r's online
//                             softmax (max, sum in its registers) on t_p and publishes the
//                             rescale factor; O = O * rescale + P V.
//   flash_backward_dq_tiled:  writes delta, then per key tile S, dP -> scale dS in t_p,
//                             dq += (scale dS) K.
//   flash_backward_dkv_tiled: per query head of the group and query tile S^T, dP^T -> P^T in
//                             t_p, dv += P^T dOut, then dS^T in t_p, dk += dS^T (scale Q).
// Workgroup memory: R C + 16 (R + C) + 128 floats: 14.5 KiB at 64 x 32 (24.5 KiB at 64 x 64,
// past WebGPU's guaranteed 16 KiB: the host checks the device's limit).
override FT_RPT: u32 = 4u;  // rows per thread
override FT_CPT: u32 = 2u;  // columns per thread
override FT_R: u32 = 16u * FT_RPT;
override FT_C: u32 = 16u * FT_CPT;
const FT_MAX_RPT: u32 = 4u;
const FT_MAX_CPT: u32 = 4u;
const FT_DS: u32 = 16u;     // head-dim slice of a tile_abt product
const FT_MAX_DC: u32 = 8u;  // accumulator columns per thread: D / 16 <= 8
const FT_MAX_RC: u32 = 64u; // largest R or C
const NEG: f32 = -3.4e38;   // masked score (finite: no inf - inf)

var<workgroup> t_p: array<f32, FT_R * FT_C>;             // [row * FT_C + col]: scores, P, dS
var<workgroup> t_stage: array<f32, FT_DS * (FT_R + FT_C)>; // A^T slice [dd * R + row] and B^T
                                          // slice [16 R + dd * C + row], or X rows [row * D + c]
var<workgroup> t_row: array<f32, FT_MAX_RC>;  // per row: rescale, then 1 / l (fwd); lse (bwd)
var<workgroup> t_row2: array<f32, FT_MAX_RC>; // bwd: delta of the tile's query rows

// Whether the query at absolute position pos sees key (causal, sliding window, inside Tk).
fn sees(pos: u32, key: u32) -> bool {
    return key < p.tk && key <= pos && pos - key <= p.window;
}

const OP_Q: u32 = 0u;    // q * scale, query head
const OP_DOUT: u32 = 1u; // dout, query head
const OP_K: u32 = 2u;    // k, kv head
const OP_V: u32 = 3u;    // v, kv head

// Element c of row `row` of an operand (0 past its valid rows: see callers).
fn operand(src: u32, bi: u32, row: u32, head: u32, c: u32) -> f32 {
    switch src {
        case 0u: { return q[q_off(bi, row, head) + c] * p.scale; }
        case 1u: { return dout[q_off(bi, row, head) + c]; }
        case 2u: { return k[k_off(bi, row, head) + c]; }
        default: { return v[k_off(bi, row, head) + c]; }
    }
}

// (R, C) = A B^T with A rows a0 + (0..R) of operand sa (the first na exist) and B rows
// b0 + (0..C) of sb (the first nb exist), over D in 16-wide slices staged transposed in
// t_stage; thread (ty, tx) returns rows FT_RPT ty + r, columns tx + 16 c. Starts with a barrier,
// so callers may rewrite what the previous readers of t_stage read before calling it.
fn tile_abt(sa: u32, ha: u32, a0: u32, na: u32, sb: u32, hb: u32, b0: u32, nb: u32, bi: u32, li: u32, tx: u32, ty: u32) -> array<array<f32, FT_MAX_CPT>, FT_MAX_RPT> {
    var acc: array<array<f32, FT_MAX_CPT>, FT_MAX_RPT>; // zero-initialized
    for (var d0 = 0u; d0 < p.d; d0 += FT_DS) {
        workgroupBarrier();
        for (var u = 0u; u < FT_RPT; u++) {
            let e = li + 256u * u;
            let row = e / FT_DS;
            var x = 0.0;
            if (row < na) { x = operand(sa, bi, a0 + row, ha, d0 + e % FT_DS); }
            t_stage[(e % FT_DS) * FT_R + row] = x;
        }
        for (var u = 0u; u < FT_CPT; u++) {
            let e = li + 256u * u;
            let row = e / FT_DS;
            var x = 0.0;
            if (row < nb) { x = operand(sb, bi, b0 + row, hb, d0 + e % FT_DS); }
            t_stage[FT_DS * FT_R + (e % FT_DS) * FT_C + row] = x;
        }
        workgroupBarrier();
        for (var dd = 0u; dd < FT_DS; dd++) {
            var y: array<f32, FT_MAX_CPT>;
            for (var c = 0u; c < FT_CPT; c++) { y[c] = t_stage[FT_DS * FT_R + dd * FT_C + tx + 16u * c]; }
            for (var r = 0u; r < FT_RPT; r++) {
                let x = t_stage[dd * FT_R + FT_RPT * ty + r];
                for (var c = 0u; c < FT_CPT; c++) { acc[r][c] = fma(x, y[c], acc[r][c]); }
            }
        }
    }
    return acc;
}

// acc (R, D) += t_p (R, C) X, X = rows x0 + (0..C) of operand sx (the first nx exist), staged
// in chunks of rows; thread (ty, tx) holds rows FT_RPT ty + r, columns tx + 16 c. Starts with a
// barrier, which also publishes the caller's writes to t_p.
fn acc_tile_x(acc: ptr<function, array<array<f32, FT_MAX_DC>, FT_MAX_RPT>>, sx: u32, hx: u32, x0: u32, nx: u32, bi: u32, li: u32, tx: u32, ty: u32) {
    let ndc = p.d / 16u;
    let vk = min(FT_C, FT_DS * (FT_R + FT_C) / p.d);
    for (var kc = 0u; kc < FT_C; kc += vk) {
        workgroupBarrier();
        let nk = min(vk, FT_C - kc);
        for (var e = li; e < nk * p.d; e += 256u) {
            let row = kc + e / p.d;
            var x = 0.0;
            if (row < nx) { x = operand(sx, bi, x0 + row, hx, e % p.d); }
            t_stage[e] = x;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < nk; kk++) {
            var xv: array<f32, FT_MAX_DC>;
            for (var c = 0u; c < FT_MAX_DC; c++) {
                xv[c] = 0.0;
                if (c < ndc) { xv[c] = t_stage[kk * p.d + tx + 16u * c]; }
            }
            for (var r = 0u; r < FT_RPT; r++) {
                let w = t_p[(FT_RPT * ty + r) * FT_C + kc + kk];
                for (var c = 0u; c < FT_MAX_DC; c++) { (*acc)[r][c] = fma(w, xv[c], (*acc)[r][c]); }
            }
        }
    }
}


@compute @workgroup_size(16, 16, 1)
fn flash_forward_tiled(@builtin(workgroup_id) wg3: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let qb = query_block(wg3, nwg, FT_R);
    if (!qb.ok) { return; }
    let bi = qb.bi;
    let hh = qb.hh;
    let kvh = qb.kvh;
    let r0 = qb.r0;
    let nr = qb.nr;
    let span = key_span(r0, r0 + nr - 1u);
    let tx = lid.x;
    let ty = lid.y;
    let ndc = p.d / 16u;
    var m = NEG; // row li's running max and sum (threads li < R)
    var l = 0.0;
    var acc: array<array<f32, FT_MAX_DC>, FT_MAX_RPT>; // WGSL zero-initializes function variables
    for (var j0 = span.x; j0 <= span.y; j0 += FT_C) {
        let nk = min(FT_C, p.tk - j0);
        let sc = tile_abt(OP_Q, hh, r0, nr, OP_K, kvh, j0, nk, bi, li, tx, ty);
        // Mask into t_p (its last readers, the previous tile's P V, passed tile_abt's barriers).
        for (var r = 0u; r < FT_RPT; r++) {
            let row = FT_RPT * ty + r;
            let pos = p.pos0 + r0 + row;
            for (var c = 0u; c < FT_CPT; c++) {
                let key = j0 + tx + 16u * c;
                let seen = row < nr && sees(pos, key);
                t_p[row * FT_C + tx + 16u * c] = select(NEG, sc[r][c], seen);
            }
        }
        workgroupBarrier();
        if (li < FT_R) {
            var mx = NEG;
            for (var c = 0u; c < FT_C; c++) { mx = max(mx, t_p[li * FT_C + c]); }
            let m_new = max(m, mx);
            var sum = 0.0;
            for (var c = 0u; c < FT_C; c++) {
                let x = t_p[li * FT_C + c];
                let pr = select(exp(x - m_new), 0.0, x <= NEG);
                t_p[li * FT_C + c] = pr;
                sum += pr;
            }
            // A row with nothing seen yet keeps m = NEG and acc = 0: its factor is irrelevant.
            let corr = select(exp(m - m_new), 1.0, m <= NEG);
            l = l * corr + sum;
            m = m_new;
            t_row[li] = corr;
        }
        workgroupBarrier();
        for (var r = 0u; r < FT_RPT; r++) {
            let corr = t_row[FT_RPT * ty + r];
            for (var c = 0u; c < FT_MAX_DC; c++) { acc[r][c] *= corr; }
        }
        acc_tile_x(&acc, OP_V, kvh, j0, nk, bi, li, tx, ty); // O += P V
    }
    workgroupBarrier();
    if (li < nr) {
        t_row[li] = 1.0 / l;
        lse[(bi * p.tq + r0 + li) * p.h + hh] = m + log(l);
    }
    workgroupBarrier();
    for (var r = 0u; r < FT_RPT; r++) {
        let row = FT_RPT * ty + r;
        if (row >= nr) { continue; }
        let qo = q_off(bi, r0 + row, hh);
        let inv = t_row[row];
        for (var c = 0u; c < FT_MAX_DC; c++) {
            if (c < ndc) { o[qo + tx + 16u * c] = acc[r][c] * inv; }
        }
    }
}

@compute @workgroup_size(16, 16, 1)
fn flash_backward_dq_tiled(@builtin(workgroup_id) wg3: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let qb = query_block(wg3, nwg, FT_R);
    if (!qb.ok) { return; }
    let bi = qb.bi;
    let hh = qb.hh;
    let kvh = qb.kvh;
    let r0 = qb.r0;
    let nr = qb.nr;
    let span = key_span(r0, r0 + nr - 1u);
    let tx = lid.x;
    let ty = lid.y;
    let ndc = p.d / 16u;
    // Row owners: lse and delta = dout . out of their row, for this pass and the dK/dV pass.
    if (li < nr) {
        let ri = (bi * p.tq + r0 + li) * p.h + hh;
        let qo = q_off(bi, r0 + li, hh);
        var dl = 0.0;
        for (var c = 0u; c < p.d; c++) { dl = fma(dout[qo + c], saved[qo + c], dl); }
        delta[ri] = dl;
        t_row[li] = lse[ri];
        t_row2[li] = dl;
    }
    var acc: array<array<f32, FT_MAX_DC>, FT_MAX_RPT>; // WGSL zero-initializes function variables
    for (var j0 = span.x; j0 <= span.y; j0 += FT_C) {
        let nk = min(FT_C, p.tk - j0);
        let s = tile_abt(OP_Q, hh, r0, nr, OP_K, kvh, j0, nk, bi, li, tx, ty);
        let dp = tile_abt(OP_DOUT, hh, r0, nr, OP_V, kvh, j0, nk, bi, li, tx, ty);
        // dS = P (dP - delta), times scale for dq = scale dS K; 0 at keys the row does not see.
        // (t_row, t_row2 were published by tile_abt's barriers; t_p's last readers passed them.)
        for (var r = 0u; r < FT_RPT; r++) {
            let row = FT_RPT * ty + r;
            let pos = p.pos0 + r0 + row;
            for (var c = 0u; c < FT_CPT; c++) {
                let key = j0 + tx + 16u * c;
                let seen = row < nr && sees(pos, key);
                var ds = 0.0;
                if (seen) { ds = exp(s[r][c] - t_row[row]) * (dp[r][c] - t_row2[row]) * p.scale; }
                t_p[row * FT_C + tx + 16u * c] = ds;
            }
        }
        acc_tile_x(&acc, OP_K, kvh, j0, nk, bi, li, tx, ty);
    }
    for (var r = 0u; r < FT_RPT; r++) {
        let row = FT_RPT * ty + r;
        if (row >= nr) { continue; }
        let qo = q_off(bi, r0 + row, hh);
        for (var c = 0u; c < FT_MAX_DC; c++) {
            if (c < ndc) { o[qo + tx + 16u * c] += acc[r][c]; }
        }
    }
}

@compute @workgroup_size(16, 16, 1)
fn flash_backward_dkv_tiled(@builtin(workgroup_id) wg3: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let wg = wg3.y * nwg.x + wg3.x; // folded into 2-D past 65535 workgroups
    if (wg >= p.b * p.hkv * p.blocks) { return; }
    let blk = wg % p.blocks;
    let kvh = (wg / p.blocks) % p.hkv;
    let bi = wg / (p.blocks * p.hkv);
    let group = p.h / p.hkv;
    let j0 = blk * FT_R;
    let nk = min(FT_R, p.tk - j0);
    let tx = lid.x;
    let ty = lid.y;
    let ndc = p.d / 16u;
    var acc_k: array<array<f32, FT_MAX_DC>, FT_MAX_RPT>; // zero-initialized
    var acc_v: array<array<f32, FT_MAX_DC>, FT_MAX_RPT>;
    // Query rows that see some key of this block: positions [j0, min(j_last + window, last)].
    let last = p.pos0 + p.tq - 1u;
    let first_pos = max(j0, p.pos0);
    let end_pos = min(j0 + nk - 1u + p.window, last);
    if (p.tq > 0u && first_pos <= end_pos) {
        let i_first = first_pos - p.pos0;
        let i_end = end_pos - p.pos0;
        for (var gi = 0u; gi < group; gi++) {
            let hh = kvh * group + gi;
            for (var i0 = i_first; i0 <= i_end; i0 += FT_C) {
                let nq = min(FT_C, i_end + 1u - i0);
                // S^T (keys, queries) = K (scale Q)^T, dP^T = V dOut^T.
                let st = tile_abt(OP_K, kvh, j0, nk, OP_Q, hh, i0, nq, bi, li, tx, ty);
                let dpt = tile_abt(OP_V, kvh, j0, nk, OP_DOUT, hh, i0, nq, bi, li, tx, ty);
                // The tile's lse and delta (their last readers passed tile_abt's barriers).
                if (li < nq) {
                    let ri = (bi * p.tq + i0 + li) * p.h + hh;
                    t_row[li] = lse[ri];
                    t_row2[li] = delta[ri];
                }
                workgroupBarrier();
                var ds: array<array<f32, FT_MAX_CPT>, FT_MAX_RPT>;
                for (var r = 0u; r < FT_RPT; r++) {
                    let key = j0 + FT_RPT * ty + r;
                    for (var c = 0u; c < FT_CPT; c++) {
                        let col = tx + 16u * c;
                        let pos = p.pos0 + i0 + col;
                        let seen = FT_RPT * ty + r < nk && col < nq && sees(pos, key);
                        var pr = 0.0;
                        if (seen) { pr = exp(st[r][c] - t_row[col]); }
                        ds[r][c] = pr * (dpt[r][c] - t_row2[col]);
                        t_p[(FT_RPT * ty + r) * FT_C + col] = pr;
                    }
                }
                acc_tile_x(&acc_v, OP_DOUT, hh, i0, nq, bi, li, tx, ty); // dv += P^T dOut
                workgroupBarrier(); // every read of P^T is done
                for (var r = 0u; r < FT_RPT; r++) {
                    for (var c = 0u; c < FT_CPT; c++) { t_p[(FT_RPT * ty + r) * FT_C + tx + 16u * c] = ds[r][c]; }
                }
                acc_tile_x(&acc_k, OP_Q, hh, i0, nq, bi, li, tx, ty); // dk += dS^T (scale Q)
            }
        }
    }
    for (var r = 0u; r < FT_RPT; r++) {
        let row = FT_RPT * ty + r;
        if (row >= nk) { continue; }
        let ko = k_off(bi, j0 + row, kvh);
        for (var c = 0u; c < FT_MAX_DC; c++) {
            if (c < ndc) {
                o[ko + tx + 16u * c] += acc_k[r][c];
                dv[ko + tx + 16u * c] += acc_v[r][c];
            }
        }
    }
}

@compute @workgroup_size(BR)
fn flash_backward_dq(@builtin(workgroup_id) wg3: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let qb = query_block(wg3, nwg, BR);
    if (!qb.ok) { return; }
    let bi = qb.bi;
    let hh = qb.hh;
    let t = lid.x;
    let r0 = qb.r0;
    let i = r0 + t;
    let live = i < p.tq;
    let kvh = qb.kvh;
    let bc = TILE_FLOATS / p.d;
    let span = key_span(r0, min(r0 + BR, p.tq) - 1u);
    let pos = p.pos0 + i;
    let lo = pos - min(p.window, pos);
    let qo = q_off(bi, i, hh);
    let ri = (bi * p.tq + i) * p.h + hh;
    var qr: array<f32, MAX_D>;
    var g: array<f32, MAX_D>;
    var dq: array<f32, MAX_D>;
    var dl = 0.0;
    var li = 0.0;
    if (live) {
        for (var c = 0u; c < p.d; c++) {
            qr[c] = q[qo + c] * p.scale;
            g[c] = dout[qo + c];
            dq[c] = 0.0;
            dl = fma(g[c], saved[qo + c], dl);
        }
        delta[ri] = dl;
        li = lse[ri];
    }
    for (var j0 = span.x; j0 <= span.y; j0 += bc) {
        workgroupBarrier();
        stage_kv(bi, kvh, j0, bc, t);
        workgroupBarrier();
        if (live) {
            let jend = min(j0 + bc, pos + 1u);
            for (var j = max(j0, lo); j < jend; j++) {
                let base = (j - j0) * p.d;
                var s = 0.0;
                var dp = 0.0;
                for (var c = 0u; c < p.d; c++) {
                    s = fma(qr[c], tile_a[base + c], s);
                    dp = fma(g[c], tile_b[base + c], dp);
                }
                let ds = exp(s - li) * (dp - dl) * p.scale;
                for (var c = 0u; c < p.d; c++) { dq[c] = fma(ds, tile_a[base + c], dq[c]); }
            }
        }
    }
    if (live) {
        for (var c = 0u; c < p.d; c++) { o[qo + c] += dq[c]; }
    }
}

@compute @workgroup_size(BR)
fn flash_backward_dkv(@builtin(workgroup_id) wg3: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let wg = wg3.y * nwg.x + wg3.x; // folded into 2-D past 65535 workgroups
    if (wg >= p.b * p.hkv * p.blocks) { return; }
    let blk = wg % p.blocks;
    let kvh = (wg / p.blocks) % p.hkv;
    let bi = wg / (p.blocks * p.hkv);
    let t = lid.x;
    let j0 = blk * BR;
    let j = j0 + t;
    let live = j < p.tk;
    let group = p.h / p.hkv;
    let bq = min(TILE_FLOATS / p.d, BR);
    let ko = k_off(bi, j, kvh);
    var kr: array<f32, MAX_D>;
    var vr: array<f32, MAX_D>;
    var dk: array<f32, MAX_D>;
    var dvv: array<f32, MAX_D>;
    if (live) {
        for (var c = 0u; c < p.d; c++) { kr[c] = k[ko + c]; vr[c] = v[ko + c]; dk[c] = 0.0; dvv[c] = 0.0; }
    }
    // Query rows that see some key of this block: positions [j0, min(j_last + window, last)].
    let last = p.pos0 + p.tq - 1u;
    let j_last = min(j0 + BR, p.tk) - 1u;
    let first_pos = max(j0, p.pos0);
    let end_pos = min(j_last + p.window, last);
    if (p.tq > 0u && first_pos <= end_pos) {
        let i_first = first_pos - p.pos0;
        let i_end = end_pos - p.pos0;
        for (var gi = 0u; gi < group; gi++) {
            let hh = kvh * group + gi;
            for (var i0 = i_first; i0 <= i_end; i0 += bq) {
                workgroupBarrier();
                // Stage q (pre-scaled) and dout rows [i0, i0 + bq), and their lse and delta.
                for (var e = t; e < bq * p.d; e += BR) {
                    let r = e / p.d;
                    let c = e % p.d;
                    var qq = 0.0;
                    var gg = 0.0;
                    if (i0 + r <= i_end) {
                        let off = q_off(bi, i0 + r, hh) + c;
                        qq = q[off] * p.scale;
                        gg = dout[off];
                    }
                    tile_a[e] = qq;
                    tile_b[e] = gg;
                }
                if (t < bq && i0 + t <= i_end) {
                    let ri = (bi * p.tq + i0 + t) * p.h + hh;
                    tile_s[t] = lse[ri];
                    tile_s[BR + t] = delta[ri];
                }
                workgroupBarrier();
                if (live) {
                    let iend = min(i0 + bq, i_end + 1u);
                    for (var i = i0; i < iend; i++) {
                        let pos = p.pos0 + i;
                        if (j > pos || pos - j > p.window) { continue; }
                        let base = (i - i0) * p.d;
                        var s = 0.0;
                        var dp = 0.0;
                        for (var c = 0u; c < p.d; c++) {
                            s = fma(tile_a[base + c], kr[c], s);
                            dp = fma(tile_b[base + c], vr[c], dp);
                        }
                        let pij = exp(s - tile_s[i - i0]);
                        let ds = pij * (dp - tile_s[BR + i - i0]);
                        for (var c = 0u; c < p.d; c++) {
                            dvv[c] = fma(pij, tile_b[base + c], dvv[c]);
                            dk[c] = fma(ds, tile_a[base + c], dk[c]);
                        }
                    }
                }
            }
        }
    }
    if (live) {
        for (var c = 0u; c < p.d; c++) { o[ko + c] += dk[c]; dv[ko + c] += dvv[c]; }
    }
}

// Decode (one or a few query rows against a long KV cache): a workgroup per query row alone
// would leave the GPU idle, so the keys are split into chunks of KC processed in parallel
// (split-K, "flash decoding"), each writing (max, sum, unnormalised output) of its chunk; then
// flash_decode_combine merges the chunks of a row with their statistics. `blocks` = chunks per row.
// Partial results: dv binding = (rows, chunks, D) outputs, delta binding = (rows, chunks, 2) max/sum.
const KC: u32 = 256u;

var<workgroup> red: array<f32, BR>;

fn wg_max(t: u32, x: f32) -> f32 {
    red[t] = x;
    workgroupBarrier();
    for (var s = BR / 2u; s > 0u; s >>= 1u) {
        if (t < s) { red[t] = max(red[t], red[t + s]); }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

fn wg_sum(t: u32, x: f32) -> f32 {
    red[t] = x;
    workgroupBarrier();
    for (var s = BR / 2u; s > 0u; s >>= 1u) {
        if (t < s) { red[t] += red[t + s]; }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(BR)
fn flash_decode_partial(@builtin(workgroup_id) wg3: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let wg = wg3.y * nwg.x + wg3.x;
    let rows = p.b * p.tq * p.h;
    if (wg >= rows * p.blocks) { return; }
    let chunk = wg % p.blocks;
    let r = wg / p.blocks;          // (b, i, h) flattened as lse
    let hh = r % p.h;
    let i = (r / p.h) % p.tq;
    let bi = r / (p.h * p.tq);
    let kvh = hh / (p.h / p.hkv);
    let t = lid.x;
    let pos = p.pos0 + i;
    let lo = max(pos - min(p.window, pos), chunk * KC);
    let hi = min(pos + 1u, (chunk + 1u) * KC); // keys [lo, hi)
    let qo = q_off(bi, i, hh);
    for (var c = t; c < p.d; c += BR) { tile_a[c] = q[qo + c] * p.scale; }
    workgroupBarrier();
    // Scores of this chunk's keys, KC / BR per thread, kept in tile_b.
    var m = -3.4e38;
    for (var j = lo + t; j < hi; j += BR) {
        let ko = k_off(bi, j, kvh);
        var s = 0.0;
        for (var c = 0u; c < p.d; c++) { s = fma(tile_a[c], k[ko + c], s); }
        tile_b[j - lo] = s;
        m = max(m, s);
    }
    m = wg_max(t, m);
    var l = 0.0;
    for (var j = lo + t; j < hi; j += BR) {
        let e = exp(tile_b[j - lo] - m);
        tile_b[j - lo] = e;
        l += e;
    }
    l = wg_sum(t, l); // its barriers also publish tile_b
    let po = (r * p.blocks + chunk) * p.d;
    for (var c = t; c < p.d; c += BR) {
        var acc = 0.0;
        for (var j = lo; j < hi; j++) { acc = fma(tile_b[j - lo], v[k_off(bi, j, kvh) + c], acc); }
        dv[po + c] = acc;
    }
    if (t == 0u) {
        delta[(r * p.blocks + chunk) * 2u] = m;
        delta[(r * p.blocks + chunk) * 2u + 1u] = l; // 0 for a chunk with no keys
    }
}

@compute @workgroup_size(BR)
fn flash_decode_combine(@builtin(workgroup_id) wg3: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = wg3.y * nwg.x + wg3.x;
    if (r >= p.b * p.tq * p.h) { return; }
    let hh = r % p.h;
    let i = (r / p.h) % p.tq;
    let bi = r / (p.h * p.tq);
    let t = lid.x;
    var mx = -3.4e38;
    for (var c = 0u; c < p.blocks; c++) {
        if (delta[(r * p.blocks + c) * 2u + 1u] > 0.0) { mx = max(mx, delta[(r * p.blocks + c) * 2u]); }
    }
    var l = 0.0;
    for (var c = 0u; c < p.blocks; c++) {
        let lc = delta[(r * p.blocks + c) * 2u + 1u];
        if (lc > 0.0) { l += lc * exp(delta[(r * p.blocks + c) * 2u] - mx); }
    }
    let qo = q_off(bi, i, hh);
    for (var d = t; d < p.d; d += BR) {
        var acc = 0.0;
        for (var c = 0u; c < p.blocks; c++) {
            let lc = delta[(r * p.blocks + c) * 2u + 1u];
            if (lc > 0.0) { acc += dv[(r * p.blocks + c) * p.d + d] * exp(delta[(r * p.blocks + c) * 2u] - mx); }
        }
        o[qo + d] = acc / l;
    }
    if (t == 0u) { lse[r] = mx + log(l); }
}
