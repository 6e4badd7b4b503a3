// C (M, N) (=|+=) op(A) (M, K) . op(B) (K, N), batched over workgroup z.
// Strategy matmul_tiled_64x64_4x4: each 16x16 workgroup owns one 64x64 tile of C and each thread a
// 4x4 register block of it, so C is written by exactly one thread (no races). A/B tiles of depth
// BK go through workgroup memory. Reads outside op(A)/op(B) load 0, so ragged shapes are safe.

const TM: u32 = 64u;
const TN: u32 = 64u;
const BK: u32 = 16u;
const RM: u32 = 4u;
const RN: u32 = 4u;

struct Params {
    m: u32,
    k: u32,
    n: u32,
    trans_a: u32,
    trans_b: u32,
    accumulate: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> c: array<f32>; // (batch, M, N)
@group(0) @binding(2) var<storage, read> a: array<f32>;       // (batch, M, K) or (batch, K, M)
@group(0) @binding(3) var<storage, read> b: array<f32>;       // (batch, K, N) or (batch, N, K)

var<workgroup> a_tile: array<array<f32, TM>, BK>; // [p][i]
var<workgroup> b_tile: array<array<f32, TN>, BK>; // [p][j]

// Element (i, p) of op(A) in problem z, 0 outside.
fn a_at(z: u32, i: u32, q: u32) -> f32 {
    if (i >= p.m || q >= p.k) { return 0.0; }
    let base = z * p.m * p.k;
    if (p.trans_a != 0u) { return a[base + q * p.m + i]; }
    return a[base + i * p.k + q];
}

// Element (p, j) of op(B) in problem z, 0 outside.
fn b_at(z: u32, q: u32, j: u32) -> f32 {
    if (q >= p.k || j >= p.n) { return 0.0; }
    let base = z * p.k * p.n;
    if (p.trans_b != 0u) { return b[base + j * p.k + q]; }
    return b[base + q * p.n + j];
}

@compute @workgroup_size(16, 16, 1)
fn matmul_forward(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let z = wg.z;
    let row0 = wg.y * TM;
    let col0 = wg.x * TN;
    var acc: array<array<f32, RN>, RM>;
    for (var i = 0u; i < RM; i++) {
        for (var j = 0u; j < RN; j++) { acc[i][j] = 0.0; }
    }
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        // load tile: 256 threads x 4 elements cover each BK x 64 tile.
        for (var e = 0u; e < 4u; e++) {
            let idx = li + e * 256u;
            let q = idx / TM;
            let r = idx % TM;
            a_tile[q][r] = a_at(z, row0 + r, k0 + q);
            b_tile[q][r] = b_at(z, k0 + q, col0 + r);
        }
        workgroupBarrier();
        // compute: rank-1 updates of the 4x4 register block; rows strided by 16 so the
        // workgroup's reads of a_tile/b_tile hit consecutive banks.
        for (var q = 0u; q < BK; q++) {
            var av: array<f32, RM>;
            var bv: array<f32, RN>;
            for (var i = 0u; i < RM; i++) { av[i] = a_tile[q][lid.y + i * 16u]; }
            for (var j = 0u; j < RN; j++) { bv[j] = b_tile[q][lid.x + j * 16u]; }
            for (var i = 0u; i < RM; i++) {
                for (var j = 0u; j < RN; j++) { acc[i][j] = fma(av[i], bv[j], acc[i][j]); }
            }
        }
        workgroupBarrier();
    }
    // store: bounds-checked, = or +=.
    let cbase = z * p.m * p.n;
    for (var i = 0u; i < RM; i++) {
        let row = row0 + lid.y + i * 16u;
        if (row >= p.m) { continue; }
        for (var j = 0u; j < RN; j++) {
            let col = col0 + lid.x + j * 16u;
            if (col >= p.n) { continue; }
            let o = cbase + row * p.n + col;
            if (p.accumulate != 0u) { c[o] += acc[i][j]; } else { c[o] = acc[i][j]; }
        }
    }
}

// Strategy matmul_tiled_128x128_8x8: each 16x16 workgroup owns a 128x128 tile of C and each thread
// an 8x8 register block (rows ly + 16 i, columns lx + 16 j), so every value loaded from workgroup
// memory feeds 8 FMAs instead of 4; K slices of depth 8. Same bounds handling as above. Meant for
// large problems on real GPUs; the 64x64 kernel stays the default until the H100 says otherwise.
const TM2: u32 = 128u;
const TN2: u32 = 128u;
const BK2: u32 = 8u;

var<workgroup> a_tile2: array<array<f32, TM2>, BK2>; // [q][i]
var<workgroup> b_tile2: array<array<f32, TN2>, BK2>; // [q][j]

@compute @workgroup_size(16, 16, 1)
fn matmul_forward_128(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let z = wg.z;
    let row0 = wg.y * TM2;
    let col0 = wg.x * TN2;
    var acc: array<array<f32, 8>, 8>;
    for (var i = 0u; i < 8u; i++) {
        for (var j = 0u; j < 8u; j++) { acc[i][j] = 0.0; }
    }
    for (var k0 = 0u; k0 < p.k; k0 += BK2) {
        // load: 256 threads x 4 elements cover each BK2 x 128 tile.
        for (var e = 0u; e < 4u; e++) {
            let idx = li + e * 256u;
            let q = idx / TM2;
            let r = idx % TM2;
            a_tile2[q][r] = a_at(z, row0 + r, k0 + q);
            b_tile2[q][r] = b_at(z, k0 + q, col0 + r);
        }
        workgroupBarrier();
        for (var q = 0u; q < BK2; q++) {
            var av: array<f32, 8>;
            var bv: array<f32, 8>;
            for (var i = 0u; i < 8u; i++) { av[i] = a_tile2[q][lid.y + i * 16u]; }
            for (var j = 0u; j < 8u; j++) { bv[j] = b_tile2[q][lid.x + j * 16u]; }
            for (var i = 0u; i < 8u; i++) {
                for (var j = 0u; j < 8u; j++) { acc[i][j] = fma(av[i], bv[j], acc[i][j]); }
            }
        }
        workgroupBarrier();
    }
    let cbase = z * p.m * p.n;
    for (var i = 0u; i < 8u; i++) {
        let row = row0 + lid.y + i * 16u;
        if (row >= p.m) { continue; }
        for (var j = 0u; j < 8u; j++) {
            let col = col0 + lid.x + j * 16u;
            if (col >= p.n) { continue; }
            let o = cbase + row * p.n + col;
            if (p.accumulate != 0u) { c[o] += acc[i][j]; } else { c[o] = acc[i][j]; }
        }
    }
}
