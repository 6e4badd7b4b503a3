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

// Strategy matmul_tiled_128x128_8x8_vec4: the 128x128 / 8x8 tiling with 128-bit memory traffic
// and a prefetched K slice. Global loads are vec4 along each operand's contiguous dimension (K for
// A and for B^T, M for A^T, N for B), so the launcher only picks it when those extents are
// multiples of 4: a vec4 then lies wholly inside or wholly outside the matrix, and the 0 loaded
// outside keeps ragged M, N, K safe. Workgroup tiles hold a K slice as [q][i] vec4 rows, so each
// thread reads its 8 A values and 8 B values as 2 + 2 vec4 (rows 4 ty.. and 64 + 4 ty.., columns
// 4 tx.. and 64 + 4 tx..) and does 64 FMAs per 4 workgroup loads. The next slice is read from
// global memory into registers before the current one is multiplied, so its latency hides
// behind MM_BK x 64 FMAs. Pipeline constants (tuned per device by the host, without another
// shader): MM_BK, the slice depth (8, 16 or 32), and MM_STAGES, the workgroup buffers: 1 (the
// slice is stored after everyone has read the last one: two barriers per slice) or 2 (ping-pong:
// the next slice goes to the other buffer, one barrier per slice). Workgroup memory:
// MM_STAGES x MM_BK KiB; the default 16 x 1 is 16 KiB, WebGPU's guaranteed minimum.
override MM_BK: u32 = 16u;
override MM_STAGES: u32 = 1u;
const MM_MAX_LOADS: u32 = 4u; // vec4 loads per thread, operand and slice: MM_BK / 8

@group(0) @binding(4) var<storage, read> a4: array<vec4<f32>>; // a, viewed as vec4
@group(0) @binding(5) var<storage, read> b4: array<vec4<f32>>; // b, viewed as vec4

var<workgroup> a_s4: array<vec4<f32>, MM_STAGES * MM_BK * 32u>; // [stage][q][i / 4], K-major
var<workgroup> b_s4: array<vec4<f32>, MM_STAGES * MM_BK * 32u>; // [stage][q][j / 4], K-major

// The vec4 this thread loads of op(A)'s slice at k0 (idx = li + 256 e). A (M, K): 128 rows x
// MM_BK / 4 vec4 of K; A^T (K, M): MM_BK rows of K x 32 vec4 of M.
fn load_a4(z: u32, row0: u32, k0: u32, li: u32) -> array<vec4<f32>, MM_MAX_LOADS> {
    var r: array<vec4<f32>, MM_MAX_LOADS>;
    let per_row = MM_BK / 4u;
    for (var e = 0u; e < MM_BK / 8u; e++) {
        let idx = li + e * 256u;
        if (p.trans_a == 0u) {
            let row = row0 + idx / per_row;
            let q = k0 + 4u * (idx % per_row);
            if (row < p.m && q < p.k) { r[e] = a4[(z * p.m * p.k + row * p.k + q) / 4u]; }
        } else {
            let q = k0 + idx / 32u;
            let col = row0 + 4u * (idx % 32u);
            if (q < p.k && col < p.m) { r[e] = a4[(z * p.m * p.k + q * p.m + col) / 4u]; }
        }
    }
    return r;
}

// Same for op(B)'s slice: B (K, N) is read like A^T, B^T (N, K) like A.
fn load_b4(z: u32, col0: u32, k0: u32, li: u32) -> array<vec4<f32>, MM_MAX_LOADS> {
    var r: array<vec4<f32>, MM_MAX_LOADS>;
    let per_row = MM_BK / 4u;
    for (var e = 0u; e < MM_BK / 8u; e++) {
        let idx = li + e * 256u;
        if (p.trans_b == 0u) {
            let q = k0 + idx / 32u;
            let col = col0 + 4u * (idx % 32u);
            if (q < p.k && col < p.n) { r[e] = b4[(z * p.k * p.n + q * p.n + col) / 4u]; }
        } else {
            let col = col0 + idx / per_row;
            let q = k0 + 4u * (idx % per_row);
            if (col < p.n && q < p.k) { r[e] = b4[(z * p.k * p.n + col * p.k + q) / 4u]; }
        }
    }
    return r;
}

// Write loaded vec4 into stage `st` of the K-major tiles: K-contiguous loads scatter their 4
// components over 4 slice rows, the others land as one vec4.
fn store_tiles4(ra: array<vec4<f32>, MM_MAX_LOADS>, rb: array<vec4<f32>, MM_MAX_LOADS>, li: u32, st: u32) {
    let base = st * MM_BK * 32u;
    let per_row = MM_BK / 4u;
    for (var e = 0u; e < MM_BK / 8u; e++) {
        let idx = li + e * 256u;
        if (p.trans_a == 0u) {
            let i = idx / per_row;
            let q = 4u * (idx % per_row);
            for (var u = 0u; u < 4u; u++) { a_s4[base + (q + u) * 32u + i / 4u][i % 4u] = ra[e][u]; }
        } else {
            a_s4[base + idx] = ra[e];
        }
        if (p.trans_b == 0u) {
            b_s4[base + idx] = rb[e];
        } else {
            let j = idx / per_row;
            let q = 4u * (idx % per_row);
            for (var u = 0u; u < 4u; u++) { b_s4[base + (q + u) * 32u + j / 4u][j % 4u] = rb[e][u]; }
        }
    }
}

@compute @workgroup_size(16, 16, 1)
fn matmul_forward_v4(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let z = wg.z;
    let row0 = wg.y * TM2;
    let col0 = wg.x * TN2;
    // acc[2 i + h]: row i of the thread's 8 (4 ty + i, then 64 + 4 ty + i - 4), column half h.
    var acc: array<vec4<f32>, 16>; // WGSL zero-initializes function variables
    var ra = load_a4(z, row0, 0u, li);
    var rb = load_b4(z, col0, 0u, li);
    store_tiles4(ra, rb, li, 0u);
    workgroupBarrier();
    var st = 0u;
    for (var k0 = 0u; k0 < p.k; k0 += MM_BK) {
        let more = k0 + MM_BK < p.k;
        if (more) {
            ra = load_a4(z, row0, k0 + MM_BK, li);
            rb = load_b4(z, col0, k0 + MM_BK, li);
        }
        let base = st * MM_BK * 32u;
        for (var q = 0u; q < MM_BK; q++) {
            let a_lo = a_s4[base + q * 32u + lid.y];
            let a_hi = a_s4[base + q * 32u + 16u + lid.y];
            let b_lo = b_s4[base + q * 32u + lid.x];
            let b_hi = b_s4[base + q * 32u + 16u + lid.x];
            for (var i = 0u; i < 4u; i++) {
                acc[2u * i] = fma(vec4<f32>(a_lo[i]), b_lo, acc[2u * i]);
                acc[2u * i + 1u] = fma(vec4<f32>(a_lo[i]), b_hi, acc[2u * i + 1u]);
                acc[8u + 2u * i] = fma(vec4<f32>(a_hi[i]), b_lo, acc[8u + 2u * i]);
                acc[9u + 2u * i] = fma(vec4<f32>(a_hi[i]), b_hi, acc[9u + 2u * i]);
            }
        }
        if (MM_STAGES == 1u) {
            workgroupBarrier(); // everyone is done reading before the slice is overwritten
            if (more) {
                store_tiles4(ra, rb, li, 0u);
                workgroupBarrier();
            }
        } else {
            // The other buffer's last readers finished before the previous barrier.
            if (more) {
                st = 1u - st;
                store_tiles4(ra, rb, li, st);
            }
            workgroupBarrier();
        }
    }
    let cbase = z * p.m * p.n;
    for (var i = 0u; i < 8u; i++) {
        let row = row0 + 64u * (i / 4u) + 4u * lid.y + i % 4u;
        if (row >= p.m) { continue; }
        for (var h = 0u; h < 2u; h++) {
            let v = acc[2u * i + h];
            let col = col0 + 64u * h + 4u * lid.x;
            for (var u = 0u; u < 4u; u++) {
                if (col + u >= p.n) { break; }
                let o = cbase + row * p.n + col + u;
                if (p.accumulate != 0u) { c[o] += v[u]; } else { c[o] = v[u]; }
            }
        }
    }
}
