// Block copies along one dim (narrow, cat and their backwards): a tensor is viewed as
// (outer, n, inner); dst[:, doff..doff+len, :] (=|+=) src[:, soff..soff+len, :].
// One thread per copied element, each destination element has one writer.

const WG: u32 = 256u;

struct Params {
    count: u32, // outer * len * inner
    len: u32,
    inner: u32,
    dst_n: u32,
    dst_off: u32,
    src_n: u32,
    src_off: u32,
    accumulate: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
@group(0) @binding(2) var<storage, read> src: array<f32>;

@compute @workgroup_size(WG)
fn copy_block(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = gid.y * nwg.x * WG + gid.x;
    if (e >= p.count) { return; }
    let i = e % p.inner;
    let l = (e / p.inner) % p.len;
    let o = e / (p.inner * p.len);
    let s = src[(o * p.src_n + p.src_off + l) * p.inner + i];
    let d = (o * p.dst_n + p.dst_off + l) * p.inner + i;
    if (p.accumulate != 0u) { dst[d] += s; } else { dst[d] = s; }
}
