// RoPE in nanochat's half-split convention on x (B, T, H, D) at positions pos0..pos0+T:
// (x1, x2) -> (x1 cos + x2 sin, x2 cos - x1 sin) for the two halves of each head.
// One thread per (row, j < D/2) pair, so each output pair has one writer. Backward is the
// inverse rotation (sign = -1) accumulated into dinp.

const WG: u32 = 256u;

struct Params {
    n: u32,     // B * T * H * D/2 pairs
    t: u32,
    h: u32,
    d: u32,
    pos0: u32,
    sign: f32,  // 1 forward, -1 backward (R^T = R(-theta))
    accumulate: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>; // (B, T, H, D) out or dinp
@group(0) @binding(2) var<storage, read> x: array<f32>;         // (B, T, H, D) inp or dout
@group(0) @binding(3) var<storage, read> cos_t: array<f32>;     // (T_max, D/2)
@group(0) @binding(4) var<storage, read> sin_t: array<f32>;     // (T_max, D/2)

@compute @workgroup_size(WG)
fn rope_apply(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.y * nwg.x * WG + gid.x;
    if (i >= p.n) { return; }
    let half = p.d / 2u;
    let j = i % half;
    let row = i / half;                      // (b, t, h) flattened
    let pos = p.pos0 + (row / p.h) % p.t;
    let c = cos_t[pos * half + j];
    let s = p.sign * sin_t[pos * half + j];
    let base = row * p.d;
    let a = x[base + j];
    let b = x[base + half + j];
    let y1 = a * c + b * s;
    let y2 = b * c - a * s;
    if (p.accumulate != 0u) {
        out[base + j] += y1;
        out[base + half + j] += y2;
    } else {
        out[base + j] = y1;
        out[base + half + j] = y2;
    }
}
