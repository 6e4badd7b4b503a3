// Embedding gather and its deterministic backward (no float atomics).
// Forward: one thread per output element, out (N, C) = weight[ids] (V, C).
// Backward: the host groups positions by id (CSR: rows (U) unique ids, offsets (U + 1),
// positions (N) in ascending order), so one thread per (unique id, channel) sums that id's
// gradient rows in a fixed order and is the only writer of dweight[id, c].

const WG: u32 = 256u;

struct Params {
    n: u32,  // forward: N * C outputs; backward: U * C sums
    c: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>; // (N, C) out or (V, C) dweight
@group(0) @binding(2) var<storage, read> w: array<f32>;         // (V, C) weight or (N, C) dout
@group(0) @binding(3) var<storage, read> ids: array<u32>;       // (N) ids or (U) unique ids
@group(0) @binding(4) var<storage, read> offsets: array<u32>;   // (U + 1)
@group(0) @binding(5) var<storage, read> positions: array<u32>; // (N)

fn flat(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.y * nwg.x * WG + gid.x;
}

@compute @workgroup_size(WG)
fn embedding_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    let row = i / p.c;
    let k = i % p.c;
    out[i] = w[ids[row] * p.c + k];
}

@compute @workgroup_size(WG)
fn embedding_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    let u = i / p.c;
    let k = i % p.c;
    var s = 0.0;
    for (var e = offsets[u]; e < offsets[u + 1u]; e++) { s += w[positions[e] * p.c + k]; }
    out[ids[u] * p.c + k] += s;
}
