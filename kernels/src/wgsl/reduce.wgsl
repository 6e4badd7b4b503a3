// Reductions. Each output element has one writer and sums in a fixed order (deterministic).
//   sum_all:         per-workgroup partials (sum_partial) then one workgroup -> out[0] (=|+=) alpha * sum
//   sum_dim_forward: x (outer, n, inner) -> out (outer, inner), one thread per output
//   sum_dim_backward: dinp (outer, n, inner) += dout (outer, inner), one thread per input
//   sum_to_shape:    dst += alpha * src summed over the dims where dst was broadcast; one thread
//                    per dst element walks its kept coordinates, then every reduced coordinate.

const WG: u32 = 256u;
const MAX_RANK: u32 = 8u;

struct Params {
    n: u32,      // elements to produce (or to read, for sum_all)
    outer: u32,
    red: u32,    // the summed extent (sum_dim), or the reduced count R (sum_to_shape)
    inner: u32,
    alpha: f32,
    accumulate: u32,
    nkeep: u32,  // sum_to_shape: kept dims
    nred: u32,   // sum_to_shape: reduced dims
    // sum_to_shape: dims and src strides of kept and reduced dims, innermost last, 4 per vec4.
    keep_dims: array<vec4<u32>, 2>,
    keep_stride: array<vec4<u32>, 2>,
    red_dims: array<vec4<u32>, 2>,
    red_stride: array<vec4<u32>, 2>,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;

var<workgroup> partial: array<f32, WG>;

fn flat(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.y * nwg.x * WG + gid.x;
}

// Compensated (Kahan) running sum: a thread adds thousands of terms, and gradients of scalar
// parameters are small differences of large sums, so plain f32 accumulation loses them.
struct Kahan { s: f32, c: f32 }

fn kahan_add(k: Kahan, v: f32) -> Kahan {
    let y = v - k.c;
    let t = k.s + y;
    return Kahan(t, (t - k.s) - y);
}

fn tree_sum(t: u32, v: f32) -> f32 {
    partial[t] = v;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if (t < k) { partial[t] += partial[t + k]; }
        workgroupBarrier();
    }
    return partial[0];
}

// Stage 1 of sum_all: workgroup g sums the elements g*WG + t + k*(G*WG) into out[g].
@compute @workgroup_size(WG)
fn sum_partial(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = lid.x;
    var acc = Kahan(0.0, 0.0);
    for (var i = wg.x * WG + t; i < p.n; i += nwg.x * WG) { acc = kahan_add(acc, x[i]); }
    let total = tree_sum(t, acc.s);
    if (t == 0u) { out[wg.x] = total; }
}

// Stage 2 (or the only stage for small inputs): one workgroup, out[0] (=|+=) alpha * sum(x).
@compute @workgroup_size(WG)
fn sum_all(@builtin(local_invocation_id) lid: vec3<u32>) {
    let t = lid.x;
    var acc = Kahan(0.0, 0.0);
    for (var i = t; i < p.n; i += WG) { acc = kahan_add(acc, x[i]); }
    let total = tree_sum(t, acc.s);
    if (t == 0u) {
        let v = p.alpha * total;
        if (p.accumulate != 0u) { out[0] += v; } else { out[0] = v; }
    }
}

@compute @workgroup_size(WG)
fn sum_dim_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = flat(gid, nwg);
    if (e >= p.n) { return; }
    let o = e / p.inner;
    let i = e % p.inner;
    var acc = Kahan(0.0, 0.0);
    for (var j = 0u; j < p.red; j++) { acc = kahan_add(acc, x[(o * p.red + j) * p.inner + i]); }
    out[e] = acc.s;
}

@compute @workgroup_size(WG)
fn sum_dim_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = flat(gid, nwg);
    if (e >= p.n) { return; }
    let o = e / (p.red * p.inner);
    let i = e % p.inner;
    out[e] += x[o * p.inner + i];
}

@compute @workgroup_size(WG)
fn sum_to_shape(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = flat(gid, nwg);
    if (e >= p.n) { return; }
    // dst is contiguous over the kept dims: peel e into kept coordinates, innermost first.
    var rem = e;
    var base = 0u;
    for (var k = 0u; k < p.nkeep; k++) {
        let d = p.nkeep - 1u - k;
        let n = p.keep_dims[d / 4u][d % 4u];
        base += (rem % n) * p.keep_stride[d / 4u][d % 4u];
        rem = rem / n;
    }
    var acc = Kahan(0.0, 0.0);
    for (var r = 0u; r < p.red; r++) {
        var rr = r;
        var off = base;
        for (var k = 0u; k < p.nred; k++) {
            let d = p.nred - 1u - k;
            let n = p.red_dims[d / 4u][d % 4u];
            off += (rr % n) * p.red_stride[d / 4u][d % 4u];
            rr = rr / n;
        }
        acc = kahan_add(acc, x[off]);
    }
    out[e] += p.alpha * acc.s;
}
