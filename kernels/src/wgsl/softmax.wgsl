// Row-wise softmax, log-softmax and cross-entropy over the last dim V; rows are (N, V).
// One workgroup per row (dispatch folded into x/y for N > 65535), so every output row has one
// writer; reductions are tree sums/maxes in workgroup memory (deterministic, no atomics).
// Forward entry points write `=`; backward ones accumulate `dinp +=`.
//
// Bindings (each entry point uses a subset; the launcher binds exactly those):
//   1 out: out / dinp / losses / dlogits   2 lse: CE logsumexp (written fwd, read bwd)
//   3 x: inp / logits                       4 g: dout / dlosses
//   5 y: saved forward output               6 targets: CE targets (i32, -1 = ignore)

const WG: u32 = 256u;
const IGNORE: i32 = -1;

struct Params {
    n: u32,
    v: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read_write> lse: array<f32>;
@group(0) @binding(3) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read> g: array<f32>;
@group(0) @binding(5) var<storage, read> y: array<f32>;
@group(0) @binding(6) var<storage, read> targets: array<i32>;

var<workgroup> partial: array<f32, WG>;

fn wg_sum(t: u32, v: f32) -> f32 {
    partial[t] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (t < s) { partial[t] += partial[t + s]; }
        workgroupBarrier();
    }
    let total = partial[0];
    workgroupBarrier();
    return total;
}

fn wg_max(t: u32, v: f32) -> f32 {
    partial[t] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (t < s) { partial[t] = max(partial[t], partial[t + s]); }
        workgroupBarrier();
    }
    let total = partial[0];
    workgroupBarrier();
    return total;
}

// logsumexp of row `base` of x, computed by the whole workgroup.
fn row_lse(t: u32, base: u32) -> f32 {
    var m = -3.4e38;
    for (var j = t; j < p.v; j += WG) { m = max(m, x[base + j]); }
    m = wg_max(t, m);
    var s = 0.0;
    for (var j = t; j < p.v; j += WG) { s += exp(x[base + j] - m); }
    return m + log(wg_sum(t, s));
}

fn row_of(wg: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wg.y * nwg.x + wg.x;
}

@compute @workgroup_size(WG)
fn softmax_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = row_of(wg, nwg);
    if (r >= p.n) { return; }
    let t = lid.x;
    let base = r * p.v;
    let l = row_lse(t, base);
    for (var j = t; j < p.v; j += WG) { out[base + j] = exp(x[base + j] - l); }
}

// dx = y (dy - sum(dy y))
@compute @workgroup_size(WG)
fn softmax_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = row_of(wg, nwg);
    if (r >= p.n) { return; }
    let t = lid.x;
    let base = r * p.v;
    var d = 0.0;
    for (var j = t; j < p.v; j += WG) { d += g[base + j] * y[base + j]; }
    let dot = wg_sum(t, d);
    for (var j = t; j < p.v; j += WG) { out[base + j] += y[base + j] * (g[base + j] - dot); }
}

@compute @workgroup_size(WG)
fn log_softmax_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = row_of(wg, nwg);
    if (r >= p.n) { return; }
    let t = lid.x;
    let base = r * p.v;
    let l = row_lse(t, base);
    for (var j = t; j < p.v; j += WG) { out[base + j] = x[base + j] - l; }
}

// dx = dy - exp(y) sum(dy)
@compute @workgroup_size(WG)
fn log_softmax_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = row_of(wg, nwg);
    if (r >= p.n) { return; }
    let t = lid.x;
    let base = r * p.v;
    var d = 0.0;
    for (var j = t; j < p.v; j += WG) { d += g[base + j]; }
    let sum = wg_sum(t, d);
    for (var j = t; j < p.v; j += WG) { out[base + j] += g[base + j] - exp(y[base + j]) * sum; }
}

// losses_i = lse_i - x_i[t_i] (0 when t_i is ignored); lse saved for backward.
@compute @workgroup_size(WG)
fn cross_entropy_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = row_of(wg, nwg);
    if (r >= p.n) { return; }
    let t = lid.x;
    let base = r * p.v;
    let l = row_lse(t, base);
    if (t == 0u) {
        lse[r] = l;
        let tg = targets[r];
        if (tg == IGNORE) { out[r] = 0.0; } else { out[r] = l - x[base + u32(tg)]; }
    }
}

// dlogits_i += dlosses_i (softmax(x_i) - onehot(t_i)); ignored rows get nothing.
@compute @workgroup_size(WG)
fn cross_entropy_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = row_of(wg, nwg);
    if (r >= p.n) { return; }
    let tg = targets[r];
    if (tg == IGNORE) { return; }
    let t = lid.x;
    let base = r * p.v;
    let dl = g[r];
    let l = lse[r];
    for (var j = t; j < p.v; j += WG) {
        var d = dl * exp(x[base + j] - l);
        if (j == u32(tg)) { d -= dl; }
        out[base + j] += d;
    }
}
