// The MuonAdamW update on the GPU (SPEC.md §6), the twin of engine/src/optim/{adamw,muon}.rs.
// AdamW is one elementwise kernel. Muon is composed by the host from the kernels below plus the
// tiled matmul (Polar Express): every norm stays on the device as a one-element buffer that the
// next kernel reads, so a step needs no readback.
//
// Bindings (each entry point uses a subset):
//   1 p: parameter / x (in place)   2 g: gradient   3 m: momentum / first moment
//   4 v: second moment / NorMuon second buffer     5 s: a scalar or per-row/col vector (read)
//   6 out: a reduction result or a new matrix

const WG: u32 = 256u;

struct Params {
    n: u32,
    rows: u32,
    cols: u32,
    mode: u32,   // scale_by_norm: which formula; muon_apply: 1 when tall (rows >= cols)
    lr: f32,
    wd: f32,
    b1: f32,     // AdamW beta1 / Muon momentum
    b2: f32,     // AdamW beta2 / NorMuon beta2
    eps: f32,
    bias1: f32,
    bias2: f32,
    k: f32,      // scale_by_norm constant; axpby alpha
    beta: f32,   // axpby beta
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> g: array<f32>;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;
@group(0) @binding(5) var<storage, read> s: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;

var<workgroup> partial: array<f32, WG>;

fn flat(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.y * nwg.x * WG + gid.x;
}

// p *= 1 - lr wd; m = lerp(m, g, 1-b1); v = lerp(v, g^2, 1-b2);
// p -= lr / bias1 * m / (sqrt(v / bias2) + eps)
@compute @workgroup_size(WG)
fn adamw_step(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    let gi = g[i];
    let mi = m[i] + (1.0 - p.b1) * (gi - m[i]);
    let vi = v[i] + (1.0 - p.b2) * (gi * gi - v[i]);
    m[i] = mi;
    v[i] = vi;
    let denom = sqrt(vi / p.bias2) + p.eps;
    x[i] = x[i] * (1.0 - p.lr * p.wd) - (p.lr / p.bias1) * mi / denom;
}

// Nesterov: M = lerp(M, G, 1 - mom); out = lerp(G, M, mom).
@compute @workgroup_size(WG)
fn muon_nesterov(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    let gi = g[i];
    let mi = m[i] + (1.0 - p.b1) * (gi - m[i]);
    m[i] = mi;
    out[i] = gi + p.b1 * (mi - gi);
}

// out (rows) = sum over columns of x^2; one workgroup per row.
@compute @workgroup_size(WG)
fn sumsq_rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = wg.y * nwg.x + wg.x;
    if (r >= p.rows) { return; }
    let t = lid.x;
    var acc = 0.0;
    for (var c = t; c < p.cols; c += WG) { let e = x[r * p.cols + c]; acc = fma(e, e, acc); }
    partial[t] = acc;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if (t < k) { partial[t] += partial[t + k]; }
        workgroupBarrier();
    }
    if (t == 0u) { out[r] = partial[0]; }
}

// out (cols) = sum over rows of x^2; one thread per column (coalesced across threads).
@compute @workgroup_size(WG)
fn sumsq_cols(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = flat(gid, nwg);
    if (c >= p.cols) { return; }
    var acc = 0.0;
    for (var r = 0u; r < p.rows; r++) { let e = x[r * p.cols + c]; acc = fma(e, e, acc); }
    out[c] = acc;
}

// Row equilibration: row r scaled to norm ||X||_F / sqrt(rows). s[0] = ||X||_F^2 and
// out (rows) holds the rows' squared norms (from sumsq_rows).
@compute @workgroup_size(WG)
fn row_equilibrate(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    let r = i / p.cols;
    let goal = sqrt(s[0]) / sqrt(f32(p.rows));
    x[i] *= goal / max(sqrt(out[r]), 1e-6);
}

// x *= f(s[0]) with s[0] a squared Frobenius norm:
//   mode 0: 1 / (||X|| * 1.01 + 1e-6)  (before Polar Express)
//   mode 1: k / max(||X||, 1e-6)        (renormalise to k = sqrt(min(rows, cols)))
@compute @workgroup_size(WG)
fn scale_by_norm(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    let norm = sqrt(s[0]);
    var f = 0.0;
    if (p.mode == 0u) { f = 1.0 / (norm * 1.01 + 1e-6); } else { f = p.k / max(norm, 1e-6); }
    x[i] *= f;
}

// out = k * x + beta * g (Polar Express's B = bA + cA^2).
@compute @workgroup_size(WG)
fn axpby(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    out[i] = p.k * x[i] + p.beta * g[i];
}

// NorMuon over the reduced vector (length n = rows if tall else cols), one workgroup:
// s = per-row/col sums of squares; v = the second-moment buffer (updated);
// out_j = step_j * ratio with step_j = 1 / sqrt(max(v_j, 1e-10)) and ratio keeping ||X||_F.
@compute @workgroup_size(WG)
fn normuon_scales(@builtin(local_invocation_id) lid: vec3<u32>) {
    let t = lid.x;
    let red = f32(p.mode); // the reduced extent (cols if tall else rows), passed in `mode`
    var vs = 0.0;
    var ns = 0.0;
    for (var j = t; j < p.n; j += WG) {
        let mean = s[j] / red;
        let second = v[j] + (1.0 - p.b2) * (mean - v[j]);
        v[j] = second;
        let step = 1.0 / sqrt(max(second, 1e-10));
        out[j] = step;
        vs += mean;
        ns += mean * red * step * step;
    }
    partial[t] = vs;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if (t < k) { partial[t] += partial[t + k]; }
        workgroupBarrier();
    }
    let v_norm = sqrt(partial[0] * red);
    workgroupBarrier();
    partial[t] = ns;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if (t < k) { partial[t] += partial[t + k]; }
        workgroupBarrier();
    }
    let ratio = v_norm / max(sqrt(partial[0]), 1e-10);
    for (var j = t; j < p.n; j += WG) { out[j] *= ratio; }
}

// The update: u = g[i] * s[r or c] (the NorMuon-scaled orthogonalised matrix, in g);
// cautious weight decay where u and the weight agree in sign; shape-scaled lr in p.lr.
@compute @workgroup_size(WG)
fn muon_apply(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    var j = i % p.cols;
    if (p.mode == 1u) { j = i / p.cols; }
    let u = g[i] * s[j];
    let w = x[i];
    var mask = 0.0;
    if (u * w >= 0.0) { mask = 1.0; }
    x[i] = w - (p.lr * u + p.lr * p.wd * w * mask);
}
