// Elementwise ops over flat buffers of N elements, one thread per element (each thread writes only
// its own index: no races). Forward entry points write `out =`; backward ones accumulate `dinp +=`.
// The dispatch may be 2-D for N > 65535 * 256; `idx` folds it back to a flat index.

const WG: u32 = 256u;

// One parameter block for every entry point; the broadcast fields are read only by the binary
// ops. Collapsed broadcast dims (at most MAX_RANK, innermost last) sit four to a vec4 because
// uniform arrays need a 16-byte element stride.
const MAX_RANK: u32 = 8u;

struct Params {
    n: u32,
    s: f32, // scale factor for scale_*, softcap c for softcap_*
    rank: u32, // collapsed broadcast rank (binary ops)
    accumulate: u32, // binary ops: out += instead of out =
    dims: array<vec4<u32>, 2>,
    stride_a: array<vec4<u32>, 2>, // 0 where a is broadcast
    stride_b: array<vec4<u32>, 2>,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>; // (N) out or dinp
@group(0) @binding(2) var<storage, read> x: array<f32>;         // (N) inp or dout
@group(0) @binding(3) var<storage, read> y: array<f32>;         // (N) saved inp/out (backward)

fn idx(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.y * nwg.x * WG + gid.x;
}

@compute @workgroup_size(WG)
fn scale_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = idx(gid, nwg);
    if (i >= p.n) { return; }
    out[i] = p.s * x[i];
}

// d (s x) = s
@compute @workgroup_size(WG)
fn scale_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = idx(gid, nwg);
    if (i >= p.n) { return; }
    out[i] += p.s * x[i];
}

@compute @workgroup_size(WG)
fn relu2_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = idx(gid, nwg);
    if (i >= p.n) { return; }
    let r = max(x[i], 0.0);
    out[i] = r * r;
}

// d relu(x)^2 = 2 relu(x); y is the saved input.
@compute @workgroup_size(WG)
fn relu2_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = idx(gid, nwg);
    if (i >= p.n) { return; }
    out[i] += x[i] * 2.0 * max(y[i], 0.0);
}

// Clamped so tanh's exp never overflows to inf/inf on drivers that expand it naively.
fn tanh_safe(v: f32) -> f32 {
    return tanh(clamp(v, -15.0, 15.0));
}

@compute @workgroup_size(WG)
fn softcap_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = idx(gid, nwg);
    if (i >= p.n) { return; }
    out[i] = p.s * tanh_safe(x[i] / p.s);
}

// d c tanh(x/c) = 1 - (y/c)^2; y is the saved output.
@compute @workgroup_size(WG)
fn softcap_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = idx(gid, nwg);
    if (i >= p.n) { return; }
    let t = y[i] / p.s;
    out[i] += x[i] * (1.0 - t * t);
}

@compute @workgroup_size(WG)
fn sigmoid_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = idx(gid, nwg);
    if (i >= p.n) { return; }
    out[i] = 1.0 / (1.0 + exp(-clamp(x[i], -80.0, 80.0)));
}

// d sigmoid = y (1 - y); y is the saved output.
@compute @workgroup_size(WG)
fn sigmoid_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = idx(gid, nwg);
    if (i >= p.n) { return; }
    out[i] += x[i] * y[i] * (1.0 - y[i]);
}

@compute @workgroup_size(WG)
fn tanh_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = idx(gid, nwg);
    if (i >= p.n) { return; }
    out[i] = tanh_safe(x[i]);
}

// d tanh = 1 - y^2; y is the saved output.
@compute @workgroup_size(WG)
fn tanh_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = idx(gid, nwg);
    if (i >= p.n) { return; }
    out[i] += x[i] * (1.0 - y[i] * y[i]);
}


// Offsets into a (x) and b (y) of flat output index i, walking the collapsed dims innermost first.
fn bcast_offsets(i: u32) -> vec2<u32> {
    var rem = i;
    var off = vec2<u32>(0u, 0u);
    for (var k = 0u; k < p.rank; k++) {
        let d = p.rank - 1u - k;
        let n = p.dims[d / 4u][d % 4u];
        let c = rem % n;
        rem = rem / n;
        off += c * vec2<u32>(p.stride_a[d / 4u][d % 4u], p.stride_b[d / 4u][d % 4u]);
    }
    return off;
}

fn store_binary(i: u32, v: f32) {
    if (p.accumulate != 0u) { out[i] += v; } else { out[i] = v; }
}

// out (=|+=) a + b, numpy broadcasting (a in x, b in y).
@compute @workgroup_size(WG)
fn add_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = idx(gid, nwg);
    if (i >= p.n) { return; }
    let o = bcast_offsets(i);
    store_binary(i, x[o.x] + y[o.y]);
}

@compute @workgroup_size(WG)
fn sub_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = idx(gid, nwg);
    if (i >= p.n) { return; }
    let o = bcast_offsets(i);
    store_binary(i, x[o.x] - y[o.y]);
}

@compute @workgroup_size(WG)
fn mul_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = idx(gid, nwg);
    if (i >= p.n) { return; }
    let o = bcast_offsets(i);
    store_binary(i, x[o.x] * y[o.y]);
}
