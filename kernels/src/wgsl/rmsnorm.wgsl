// RMSNorm over the last dim, no weight: out = x * rstd, rstd = 1 / sqrt(mean(x^2) + eps).
// One workgroup per row (dispatch x = N), so each row of out/dinp and its rstd has one writer.
// Forward writes `out =` and `rstd =` (saved for backward); backward accumulates `dinp +=`.

const WG: u32 = 256u;

struct Params {
    n: u32,
    c: u32,
    eps: f32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;  // (N, C) out or dinp
@group(0) @binding(2) var<storage, read_write> rstd: array<f32>; // (N) written fwd, read bwd
@group(0) @binding(3) var<storage, read> x: array<f32>;          // (N, C) inp
@group(0) @binding(4) var<storage, read> g: array<f32>;          // (N, C) dout (backward only)

var<workgroup> partial: array<f32, WG>;

// Tree sum of every thread's `v` over the workgroup; all threads get the total.
fn wg_sum(t: u32, v: f32) -> f32 {
    partial[t] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (t < s) { partial[t] += partial[t + s]; }
        workgroupBarrier();
    }
    let total = partial[0];
    workgroupBarrier(); // partial is reused by the caller's next reduction
    return total;
}

@compute @workgroup_size(WG)
fn rmsnorm_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = wg.x;
    let t = lid.x;
    let base = r * p.c;
    // compute: strided partial sums of squares, then the workgroup tree.
    var ss = 0.0;
    for (var j = t; j < p.c; j += WG) { let v = x[base + j]; ss += v * v; }
    let s = 1.0 / sqrt(wg_sum(t, ss) / f32(p.c) + p.eps);
    // store
    for (var j = t; j < p.c; j += WG) { out[base + j] = x[base + j] * s; }
    if (t == 0u) { rstd[r] = s; }
}

// dx_k = r (dy_k - x_k r^2 mean(dy . x))
@compute @workgroup_size(WG)
fn rmsnorm_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = wg.x;
    let t = lid.x;
    let base = r * p.c;
    let s = rstd[r];
    var d = 0.0;
    for (var j = t; j < p.c; j += WG) { d += g[base + j] * x[base + j]; }
    let k = s * s * wg_sum(t, d) / f32(p.c);
    for (var j = t; j < p.c; j += WG) { out[base + j] += s * (g[base + j] - x[base + j] * k); }
}
