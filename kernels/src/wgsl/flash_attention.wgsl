// Tiled flash attention (forward and backward with recomputation), the WGSL twin of
// cpu/flash_attention.rs. Layout as attention.wgsl: q (B, Tq, H, D), k, v (B, Tk, Hkv, D); query row
// i sits at position pos0 + i and attends keys j in [pos0 + i - window, pos0 + i]; GQA reads kv head
// h / (H / Hkv); scale 1/sqrt(D). The T x T score matrix never exists: key (or query) tiles are
// staged in workgroup memory and shared by the BR rows of a workgroup, scores live one at a time in
// registers, the softmax is online (running max and sum), and the forward saves only the per-row
// logsumexp. Backward recomputes probabilities from it in two passes, each the only writer of
// what it writes (no float atomics):
//   flash_backward_dq:  a workgroup per (b, h, query block); thread = query row; writes delta, dq
//   flash_backward_dkv: a workgroup per (b, kv head, key block); thread = key row; loops over
//                       the group's query heads and the query tiles that see its block.
// Tiles hold TILE_FLOATS floats per operand (16 KiB for two operands, WebGPU's guaranteed
// workgroup memory), so a tile has TILE_FLOATS / D rows.

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
    let wg = wg3.y * nwg.x + wg3.x; // folded into 2-D past 65535 workgroups
    if (wg >= p.b * p.h * p.blocks) { return; }
    let blk = wg % p.blocks;
    let hh = (wg / p.blocks) % p.h;
    let bi = wg / (p.blocks * p.h);
    let t = lid.x;
    let r0 = blk * BR;
    let i = r0 + t;
    let live = i < p.tq;
    let kvh = hh / (p.h / p.hkv);
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

@compute @workgroup_size(BR)
fn flash_backward_dq(@builtin(workgroup_id) wg3: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let wg = wg3.y * nwg.x + wg3.x; // folded into 2-D past 65535 workgroups
    if (wg >= p.b * p.h * p.blocks) { return; }
    let blk = wg % p.blocks;
    let hh = (wg / p.blocks) % p.h;
    let bi = wg / (p.blocks * p.h);
    let t = lid.x;
    let r0 = blk * BR;
    let i = r0 + t;
    let live = i < p.tq;
    let kvh = hh / (p.h / p.hkv);
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
