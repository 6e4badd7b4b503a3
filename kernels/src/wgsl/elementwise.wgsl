// Elementwise ops over flat buffers of N elements, one thread per element (each thread writes only
// its own index: no races). Forward entry points write `out =`; backward ones accumulate `dinp +=`.
// The dispatch may be 2-D for N > 65535 * 256; `idx` folds it back to a flat index.

const WG: u32 = 256u;

struct Params {
    n: u32,
    s: f32, // scale factor for scale_*, softcap c for softcap_*
    _pad0: u32,
    _pad1: u32,
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
