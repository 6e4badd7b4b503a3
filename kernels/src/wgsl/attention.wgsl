// Straightforward causal sliding-window attention with GQA, nanochat layout:
// q (B, Tq, H, D), k, v (B, Tk, Hkv, D); query row i sits at position pos0 + i and attends keys
// j in [pos0 + i - window, pos0 + i]; query head h reads kv head h / (H / Hkv); scale 1/sqrt(D).
// This is the reference the tiled flash kernel is checked against: one thread per query row
// (forward, backward pass 1) or per key row (backward pass 2), head dim in private arrays.
// Forward saves lse (B, Tq, H); backward recomputes probabilities from it, without atomics:
//   pass 1 (per query row):  delta_i = dout_i . out_i, dq_i += scale sum_j p_ij (dp_ij - delta_i) k_j
//   pass 2 (per key row):    dv_j += sum_i p_ij dout_i, dk_j += scale sum_i p_ij (dp_ij - delta_i) q_i
// where dp_ij = dout_i . v_j and pass 2 loops over every query head of the kv head's group.

const WG: u32 = 64u;
const MAX_D: u32 = 256u;

struct Params {
    b: u32,
    tq: u32,
    tk: u32,
    h: u32,
    hkv: u32,
    d: u32,
    window: u32, // clamped to Tk by the host (usize::MAX = plain causal)
    pos0: u32,
    scale: f32,
    _blocks: u32, // used by flash_attention.wgsl, which shares this layout
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> o: array<f32>;     // out (fwd) / dq (bwd 1) / dk (bwd 2)
@group(0) @binding(2) var<storage, read_write> lse: array<f32>;   // (B, Tq, H), written fwd
@group(0) @binding(3) var<storage, read> q: array<f32>;
@group(0) @binding(4) var<storage, read> k: array<f32>;
@group(0) @binding(5) var<storage, read> v: array<f32>;
@group(0) @binding(6) var<storage, read> dout: array<f32>;        // (B, Tq, H, D)
@group(0) @binding(7) var<storage, read> saved: array<f32>;       // forward out (B, Tq, H, D)
@group(0) @binding(8) var<storage, read_write> delta: array<f32>; // (B, Tq, H), written bwd 1
@group(0) @binding(9) var<storage, read_write> dv: array<f32>;    // (B, Tk, Hkv, D)

fn flat(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.y * nwg.x * WG + gid.x;
}

// Offsets of query row (bi, i, hh) and key row (bi, j, kvh).
fn q_off(bi: u32, i: u32, hh: u32) -> u32 { return ((bi * p.tq + i) * p.h + hh) * p.d; }
fn k_off(bi: u32, j: u32, kvh: u32) -> u32 { return ((bi * p.tk + j) * p.hkv + kvh) * p.d; }

fn score(qo: u32, ko: u32) -> f32 {
    var s = 0.0;
    for (var c = 0u; c < p.d; c++) { s = fma(q[qo + c], k[ko + c], s); }
    return s * p.scale;
}

fn dot_dout_v(go: u32, vo: u32) -> f32 {
    var s = 0.0;
    for (var c = 0u; c < p.d; c++) { s = fma(dout[go + c], v[vo + c], s); }
    return s;
}

@compute @workgroup_size(WG)
fn attention_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = flat(gid, nwg); // (b, i, h) flattened
    if (r >= p.b * p.tq * p.h) { return; }
    let hh = r % p.h;
    let i = (r / p.h) % p.tq;
    let bi = r / (p.h * p.tq);
    let kvh = hh / (p.h / p.hkv);
    let pos = p.pos0 + i;
    let lo = pos - min(p.window, pos);
    let qo = q_off(bi, i, hh);
    // Online softmax: running max m, running sum l, rescaled accumulator.
    var acc: array<f32, MAX_D>;
    for (var c = 0u; c < p.d; c++) { acc[c] = 0.0; }
    var m = -3.4e38;
    var l = 0.0;
    for (var j = lo; j <= pos; j++) {
        let ko = k_off(bi, j, kvh);
        let s = score(qo, ko);
        let m_new = max(m, s);
        let corr = exp(m - m_new);
        let pj = exp(s - m_new);
        l = l * corr + pj;
        for (var c = 0u; c < p.d; c++) { acc[c] = fma(pj, v[ko + c], acc[c] * corr); }
        m = m_new;
    }
    for (var c = 0u; c < p.d; c++) { o[qo + c] = acc[c] / l; }
    lse[r] = m + log(l);
}

@compute @workgroup_size(WG)
fn attention_backward_dq(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = flat(gid, nwg);
    if (r >= p.b * p.tq * p.h) { return; }
    let hh = r % p.h;
    let i = (r / p.h) % p.tq;
    let bi = r / (p.h * p.tq);
    let kvh = hh / (p.h / p.hkv);
    let pos = p.pos0 + i;
    let lo = pos - min(p.window, pos);
    let qo = q_off(bi, i, hh);
    var dl = 0.0;
    for (var c = 0u; c < p.d; c++) { dl = fma(dout[qo + c], saved[qo + c], dl); }
    delta[r] = dl;
    let li = lse[r];
    var dq: array<f32, MAX_D>;
    for (var c = 0u; c < p.d; c++) { dq[c] = 0.0; }
    for (var j = lo; j <= pos; j++) {
        let ko = k_off(bi, j, kvh);
        let pij = exp(score(qo, ko) - li);
        let ds = pij * (dot_dout_v(qo, ko) - dl) * p.scale;
        for (var c = 0u; c < p.d; c++) { dq[c] = fma(ds, k[ko + c], dq[c]); }
    }
    for (var c = 0u; c < p.d; c++) { o[qo + c] += dq[c]; }
}

@compute @workgroup_size(WG)
fn attention_backward_dkv(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = flat(gid, nwg); // (b, j, kvh) flattened
    if (r >= p.b * p.tk * p.hkv) { return; }
    let kvh = r % p.hkv;
    let j = (r / p.hkv) % p.tk;
    let bi = r / (p.hkv * p.tk);
    let ko = k_off(bi, j, kvh);
    let group = p.h / p.hkv;
    var dk: array<f32, MAX_D>;
    var dvv: array<f32, MAX_D>;
    for (var c = 0u; c < p.d; c++) { dk[c] = 0.0; dvv[c] = 0.0; }
    // Queries that see key j: positions max(j, pos0) ..= min(j + window, pos0 + Tq - 1).
    let last = p.pos0 + p.tq - 1u;
    let first = max(j, p.pos0);
    let end = min(j + p.window, last); // the host clamps window to Tk: no overflow
    if (p.tq > 0u && first <= end) {
        for (var g = 0u; g < group; g++) {
            let hh = kvh * group + g;
            for (var pos = first; pos <= end; pos++) {
                let i = pos - p.pos0;
                let qo = q_off(bi, i, hh);
                let ri = (bi * p.tq + i) * p.h + hh;
                let pij = exp(score(qo, ko) - lse[ri]);
                let ds = pij * (dot_dout_v(qo, ko) - delta[ri]) * p.scale;
                for (var c = 0u; c < p.d; c++) {
                    dvv[c] = fma(pij, dout[qo + c], dvv[c]);
                    dk[c] = fma(ds, q[qo + c], dk[c]);
                }
            }
        }
    }
    for (var c = 0u; c < p.d; c++) {
        o[ko + c] += dk[c];
        dv[ko + c] += dvv[c];
    }
}
