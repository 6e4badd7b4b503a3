// Reductions. Each output element has one writer and sums in a fixed order (deterministic).
//   sum_all:         one workgroup, strided partial sums + tree -> out[0] (=|+=) alpha * sum
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

@compute @workgroup_size(WG)
fn sum_all(@builtin(local_invocation_id) lid: vec3<u32>) {
    let t = lid.x;
    var s = 0.0;
    for (var i = t; i < p.n; i += WG) { s += x[i]; }
    partial[t] = s;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if (t < k) { partial[t] += partial[t + k]; }
        workgroupBarrier();
    }
    if (t == 0u) {
        let v = p.alpha * partial[0];
        if (p.accumulate != 0u) { out[0] += v; } else { out[0] = v; }
    }
}

@compute @workgroup_size(WG)
fn sum_dim_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = flat(gid, nwg);
    if (e >= p.n) { return; }
    let o = e / p.inner;
    let i = e % p.inner;
    var s = 0.0;
    for (var j = 0u; j < p.red; j++) { s += x[(o * p.red + j) * p.inner + i]; }
    out[e] = s;
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
    var s = 0.0;
    for (var r = 0u; r < p.red; r++) {
        var rr = r;
        var off = base;
        for (var k = 0u; k < p.nred; k++) {
            let d = p.nred - 1u - k;
            let n = p.red_dims[d / 4u][d % 4u];
            off += (rr % n) * p.red_stride[d / 4u][d % 4u];
            rr = rr / n;
        }
        s += x[off];
    }
    out[e] += p.alpha * s;
}
