//! Every public CPU kernel refuses buffers shorter than its shape with a panic (an `assert!`
//! that runs in release builds too) before it writes anything, instead of writing past the end
//! of a slice through a raw pointer; and a source scan makes sure each `pub fn` under
//! `kernels/src/cpu` keeps such a check, so a new kernel cannot skip it.
use std::panic::{AssertUnwindSafe, catch_unwind};

use femtochat_kernels::cpu::attention::{
    AttnShape, attention_backward, attention_forward, attention_forward_naive,
};
use femtochat_kernels::cpu::attention_decode::{
    DecodeAttnShape, attention_decode, attention_decode_naive, dot,
};
use femtochat_kernels::cpu::elementwise::*;
use femtochat_kernels::cpu::embedding::*;
use femtochat_kernels::cpu::flash_attention::*;
use femtochat_kernels::cpu::isa::Isa;
use femtochat_kernels::cpu::matmul::*;
use femtochat_kernels::cpu::matvec::{matvec_nt, matvec_nt_naive, matvec_nt_with};
use femtochat_kernels::cpu::reduce::*;
use femtochat_kernels::cpu::rmsnorm::*;
use femtochat_kernels::cpu::rope::*;
use femtochat_kernels::cpu::slice::*;
use femtochat_kernels::cpu::softmax::*;

/// Buffers of the given lengths, the `short`-th one a float short (none when out of range).
fn bufs<const N: usize>(lens: [usize; N], short: usize) -> [Vec<f32>; N] {
    std::array::from_fn(|i| vec![0.25; lens[i] - usize::from(i == short)])
}

/// A kernel call whose `f32` buffers have the lengths `lens` except that buffer `short` is one
/// float short.
struct Case {
    name: String,
    buffers: usize,
    run: Box<dyn Fn(usize)>,
}

fn case<const N: usize>(name: &str, lens: [usize; N], f: impl Fn([Vec<f32>; N]) + 'static) -> Case {
    Case { name: name.into(), buffers: N, run: Box::new(move |short| f(bufs(lens, short))) }
}

const MATMUL: usize = 64; // 64^3 multiply-adds: past the small-problem path, on the packed one

fn attn(tq: usize) -> AttnShape {
    AttnShape { b: 2, tq, tk: 9, h: 4, hkv: 2, d: 16, window: usize::MAX, pos0: 9 - tq }
}

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    let mm = MatmulShape::new(MATMUL, MATMUL, MATMUL, false, true);
    let n2 = MATMUL * MATMUL;
    v.push(case("matmul", [n2, n2, n2], move |[mut c, a, b]| matmul(&mut c, &a, &b, mm, false)));
    v.push(case("matmul_naive", [n2, n2, n2], move |[mut c, a, b]| {
        matmul_naive(&mut c, &a, &b, mm, true)
    }));
    for isa in
        [Isa::Avx512, Isa::Avx2, Isa::Neon, Isa::Portable].into_iter().filter(|i| i.supported())
    {
        v.push(case(&format!("matmul_with {isa:?}"), [n2, n2, n2], move |[mut c, a, b]| {
            matmul_with(isa, &mut c, &a, &b, mm, true)
        }));
    }
    v.push(case("matmul_batched", [2 * n2, 2 * n2, 2 * n2], move |[mut c, a, b]| {
        matmul_batched(&mut c, &a, &b, 2, mm, false)
    }));
    v.push(case("matmul_batched small", [2 * 12, 2 * 12, 2 * 9], |[mut c, a, b]| {
        matmul_batched(&mut c, &a, &b, 2, MatmulShape::new(4, 3, 3, false, false), false)
    }));

    // Skinny matmuls: out (M 3, N 40) = x (3, K 50) W (40, 50)^T.
    v.push(case("matvec_nt", [120, 150, 2000], |[mut o, x, w]| {
        matvec_nt(&mut o, &x, &w, 3, 50, 40)
    }));
    v.push(case("matvec_nt_naive", [120, 150, 2000], |[mut o, x, w]| {
        matvec_nt_naive(&mut o, &x, &w, 3, 50, 40)
    }));
    for isa in [Isa::Avx512, Isa::Avx2, Isa::Portable].into_iter().filter(|i| i.supported()) {
        v.push(case(&format!("matvec_nt_with {isa:?}"), [120, 150, 2000], move |[mut o, x, w]| {
            matvec_nt_with(isa, &mut o, &x, &w, 3, 50, 40)
        }));
    }
    // Decode attention: q, out (H 4, D 8); cache (pos + 1 = 6, Hkv 2, D 8); scores (window + 1).
    let ds = DecodeAttnShape { h: 4, hkv: 2, d: 8, window: 3, pos: 5 };
    v.push(case("attention_decode", [32, 32, 96, 96, 4], move |[mut o, q, k, vv, mut sc]| {
        attention_decode(&mut o, &q, &k, &vv, ds, &mut sc)
    }));
    v.push(case("attention_decode_naive", [32, 32, 96, 96], move |[mut o, q, k, vv]| {
        attention_decode_naive(&mut o, &q, &k, &vv, ds)
    }));
    v.push(case("dot", [19, 19], |[a, b]| {
        std::hint::black_box(dot(&a, &b));
    }));

    // Attention: q, out (B, Tq, H, D); k, v (B, Tk, Hkv, D); lse (B, Tq, H).
    for tq in [7, 2] {
        let s = attn(tq);
        let (nq, nk, nl) = (s.b * s.tq * s.h * s.d, s.b * s.tk * s.hkv * s.d, s.b * s.tq * s.h);
        let bl = FlashBlocks { br: 4, bc: 4 };
        v.push(case(
            &format!("attention_forward tq {tq}"),
            [nq, nl, nq, nk, nk],
            move |[mut o, mut l, q, k, vv]| attention_forward(&mut o, &mut l, &q, &k, &vv, s),
        ));
        v.push(case(
            &format!("attention_forward_naive tq {tq}"),
            [nq, nk, nk],
            move |[q, k, vv]| {
                attention_forward_naive(&q, &k, &vv, s);
            },
        ));
        v.push(case(
            &format!("attention_backward tq {tq}"),
            [nq, nk, nk, nq, nq, nk, nk, nq, nl],
            move |[mut dq, mut dk, mut dv, dout, q, k, vv, out, lse]| {
                attention_backward(&mut dq, &mut dk, &mut dv, &dout, &q, &k, &vv, &out, &lse, s)
            },
        ));
        v.push(case(
            &format!("flash_attention_forward tq {tq}"),
            [nq, nl, nq, nk, nk],
            move |[mut o, mut l, q, k, vv]| {
                flash_attention_forward(&mut o, &mut l, &q, &k, &vv, s, bl)
            },
        ));
        v.push(case(
            &format!("flash_attention_backward tq {tq}"),
            [nq, nk, nk, nq, nq, nk, nk, nq, nl],
            move |[mut dq, mut dk, mut dv, dout, q, k, vv, out, lse]| {
                flash_attention_backward(
                    &mut dq, &mut dk, &mut dv, &dout, &q, &k, &vv, &out, &lse, s, bl,
                )
            },
        ));
        for isa in [Isa::Avx512, Isa::Avx2, Isa::Portable].into_iter().filter(|i| i.supported()) {
            v.push(case(
                &format!("flash_forward_with {isa:?} tq {tq}"),
                [nq, nl, nq, nk, nk],
                move |[mut o, mut l, q, k, vv]| {
                    flash_forward_with(isa, &mut o, &mut l, &q, &k, &vv, s, bl)
                },
            ));
            v.push(case(
                &format!("flash_decode_with {isa:?} tq {tq}"),
                [nq, nl, nq, nk, nk],
                move |[mut o, mut l, q, k, vv]| {
                    flash_decode_with(isa, &mut o, &mut l, &q, &k, &vv, s, bl)
                },
            ));
            v.push(case(
                &format!("flash_backward_with {isa:?} tq {tq}"),
                [nq, nk, nk, nq, nq, nk, nk, nq, nl],
                move |[mut dq, mut dk, mut dv, dout, q, k, vv, out, lse]| {
                    flash_backward_with(
                        isa, &mut dq, &mut dk, &mut dv, &dout, &q, &k, &vv, &out, &lse, s, bl,
                    )
                },
            ));
        }
    }

    // Elementwise, over 3 x CHUNK elements so the parallel paths run too.
    let n = 3 * CHUNK + 5;
    v.push(case("scale_forward", [n, n], |[mut o, x]| scale_forward(&mut o, &x, 2.0)));
    v.push(case("scale_backward", [n, n], |[mut d, g]| scale_backward(&mut d, &g, 2.0)));
    v.push(case("relu2_forward", [n, n], |[mut o, x]| relu2_forward(&mut o, &x)));
    v.push(case("relu2_backward", [n, n, n], |[mut d, g, x]| relu2_backward(&mut d, &g, &x)));
    v.push(case("sigmoid_forward", [n, n], |[mut o, x]| sigmoid_forward(&mut o, &x)));
    v.push(case("sigmoid_backward", [n, n, n], |[mut d, g, y]| sigmoid_backward(&mut d, &g, &y)));
    v.push(case("tanh_forward", [n, n], |[mut o, x]| tanh_forward(&mut o, &x)));
    v.push(case("tanh_backward", [n, n, n], |[mut d, g, y]| tanh_backward(&mut d, &g, &y)));
    v.push(case("softcap_forward", [n, n], |[mut o, x]| softcap_forward(&mut o, &x, 15.0)));
    v.push(case("softcap_backward", [n, n, n], |[mut d, g, y]| {
        softcap_backward(&mut d, &g, &y, 15.0)
    }));
    // Broadcast (3, 1, 5) against (4, 5): out (3, 4, 5).
    let bc = Broadcast::new(&[3, 1, 5], &[4, 5]).unwrap();
    type Binary = fn(&mut [f32], &[f32], &[f32], &Broadcast, bool);
    let binaries: [(&str, Binary); 3] =
        [("add_forward", add_forward), ("sub_forward", sub_forward), ("mul_forward", mul_forward)];
    for (name, f) in binaries {
        let bc = bc.clone();
        v.push(case(name, [60, 15, 20], move |[mut o, a, b]| f(&mut o, &a, &b, &bc, true)));
    }
    v.push(case("mul_naive", [60, 15, 20], |[mut o, a, b]| {
        mul_naive(&mut o, &a, &[3, 1, 5], &b, &[4, 5]);
    }));

    // Embedding: weight (V 7, C 5), 4 ids.
    let ids = [0u32, 6, 3, 3];
    v.push(case("embedding_forward", [20, 35], move |[mut o, w]| {
        embedding_forward(&mut o, &w, &ids, 5)
    }));
    v.push(case("embedding_backward", [35, 20], move |[mut dw, g]| {
        embedding_backward(&mut dw, &g, &ids, 5)
    }));
    v.push(case("embedding_backward_naive", [35, 20], move |[mut dw, g]| {
        embedding_backward_naive(&mut dw, &g, &ids, 5)
    }));

    // Reductions.
    v.push(case("dot_all", [n, n], |[a, b]| {
        dot_all(&a, &b);
    }));
    v.push(case("sum_forward", [1], |[mut o]| sum_forward(&mut o, &[1.0, 2.0])));
    v.push(case("sum_dim_forward", [12, 60], |[mut o, x]| sum_dim_forward(&mut o, &x, 3, 5, 4)));
    v.push(case("sum_dim_backward", [60, 12], |[mut d, g]| sum_dim_backward(&mut d, &g, 3, 5, 4)));
    v.push(case("sum_to_shape", [4, 12], |[mut d, s]| {
        sum_to_shape(&mut d, &[4], &s, &[3, 4], 1.0)
    }));
    v.push(case("sum_to_shape_naive", [4, 12], |[mut d, s]| {
        sum_to_shape_naive(&mut d, &[4], &s, &[3, 4], 1.0)
    }));

    // RMSNorm (N 6, C 40), rope (B 2, T 3, H 2, D 8; tables T_max 5, D/2), block copies.
    v.push(case("rmsnorm_forward", [240, 6, 240], |[mut o, mut r, x]| {
        rmsnorm_forward(&mut o, &mut r, &x, 6, 40, RMSNORM_EPS)
    }));
    v.push(case("rmsnorm_backward", [240, 240, 240, 6], |[mut d, g, x, r]| {
        rmsnorm_backward(&mut d, &g, &x, &r, 6, 40)
    }));
    v.push(case("rmsnorm_forward_naive", [240], |[x]| {
        rmsnorm_forward_naive(&x, 6, 40, RMSNORM_EPS);
    }));
    v.push(case("rope_tables", [20, 20], |[mut c, mut s]| rope_tables(&mut c, &mut s, 5, 8, 1e4)));
    let rs = RopeShape { b: 2, t: 3, h: 2, d: 8, pos0: 2 };
    v.push(case("rope_forward", [96, 96, 20, 20], move |[mut o, x, c, s]| {
        rope_forward(&mut o, &x, &c, &s, rs)
    }));
    v.push(case("rope_backward", [96, 96, 20, 20], move |[mut d, g, c, s]| {
        rope_backward(&mut d, &g, &c, &s, rs)
    }));
    v.push(case("copy_block", [3 * 5 * 2, 3 * 4 * 2], |[mut d, s]| {
        copy_block(
            &mut d,
            BlockView { n: 5, off: 1 },
            &s,
            BlockView { n: 4, off: 0 },
            3,
            4,
            2,
            true,
        )
    }));

    // Softmax family (N 5, V 30); cross-entropy with targets (N).
    let targets = [1i32, IGNORE_INDEX, 29, 0, 7];
    v.push(case("softmax_forward", [150, 150], |[mut o, x]| softmax_forward(&mut o, &x, 5, 30)));
    v.push(case("softmax_backward", [150, 150, 150], |[mut d, g, y]| {
        softmax_backward(&mut d, &g, &y, 5, 30)
    }));
    v.push(case("log_softmax_forward", [150, 150], |[mut o, x]| {
        log_softmax_forward(&mut o, &x, 5, 30)
    }));
    v.push(case("log_softmax_backward", [150, 150, 150], |[mut d, g, y]| {
        log_softmax_backward(&mut d, &g, &y, 5, 30)
    }));
    v.push(case("cross_entropy_forward", [5, 5, 150], move |[mut l, mut m, x]| {
        cross_entropy_forward(&mut l, &mut m, &x, &targets, 5, 30)
    }));
    v.push(case("cross_entropy_backward", [150, 5, 150, 5], move |[mut d, g, x, m]| {
        cross_entropy_backward(&mut d, &g, &x, &m, &targets, 5, 30)
    }));
    v.push(case("cross_entropy_naive", [150], move |[x]| {
        cross_entropy_naive(&x, &targets, 5, 30);
    }));
    v
}

/// Held while the panic hook is silenced, so the other test's failure message is not lost.
static HOOK: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn every_kernel_refuses_a_short_buffer() {
    let _quiet = HOOK.lock().unwrap_or_else(|e| e.into_inner());
    // The expected panics would print one message each.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failures = Vec::new();
    for c in cases() {
        // Full-length buffers run: the shapes above are valid, so a panic below is the check.
        if catch_unwind(AssertUnwindSafe(|| (c.run)(usize::MAX))).is_err() {
            failures.push(format!("{}: panics with full-length buffers", c.name));
        }
        for short in 0..c.buffers {
            if catch_unwind(AssertUnwindSafe(|| (c.run)(short))).is_ok() {
                failures.push(format!("{}: buffer {short} one float short was accepted", c.name));
            }
        }
    }
    std::panic::set_hook(hook);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Functions of the Rust sources under `dir` (test modules excluded): name, whether `pub`,
/// signature, body.
fn functions(dir: &std::path::Path, out: &mut Vec<(String, bool, String, String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            functions(&path, out);
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") || path.file_name().unwrap() == "tests.rs" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        // Unit tests sit at the end of a file, behind `#[cfg(test)]`.
        let src = text.split("#[cfg(test)]\nmod tests").next().unwrap();
        let file = path.display().to_string();
        let mut rest = src;
        while let Some(at) = rest.find("fn ") {
            let before = &rest[..at];
            let is_item = before.is_empty() || before.ends_with(' ') || before.ends_with('\n');
            let line_start = before.rfind('\n').map_or(0, |i| i + 1);
            let prefix = before[line_start..].trim();
            rest = &rest[at + 3..];
            if !is_item || prefix.starts_with("//") || prefix.contains('(') || prefix.contains('=')
            {
                continue;
            }
            let name: String =
                rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            // The signature runs to the body's `{` (or a `;` for a trait method without one).
            let Some(open) = rest.find(['{', ';']) else { break };
            if rest.as_bytes()[open] == b';' {
                continue;
            }
            let sig = rest[..open].to_string();
            let mut depth = 0;
            let mut end = open;
            for (i, ch) in rest[open..].char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    end = open + i;
                    break;
                }
            }
            let body = rest[open..=end].to_string();
            let public = prefix.split_whitespace().any(|w| w == "pub");
            out.push((name, public, sig, body, file.clone()));
        }
    }
}

#[test]
fn every_public_kernel_checks_its_lengths() {
    let _hook = HOOK.lock().unwrap_or_else(|e| e.into_inner());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/cpu");
    let mut fns = Vec::new();
    functions(&root, &mut fns);
    // A function checks its lengths when its body asserts, calls a `check*` function, says
    // why no length can be wrong (`// lengths: ...`), or calls a function that checks.
    let direct = |body: &str| {
        body.contains("assert!")
            || body.contains("assert_eq!")
            || body.contains("// lengths:")
            || body.contains("check(")
            || body.contains("check_")
    };
    let mut checked: std::collections::HashSet<String> =
        fns.iter().filter(|f| direct(&f.3)).map(|f| f.0.clone()).collect();
    loop {
        let before = checked.len();
        for (name, _, _, body, _) in &fns {
            let calls =
                |c: &String| body.contains(&format!("{c}(")) || body.contains(&format!("{c}::<"));
            if !checked.contains(name) && checked.iter().any(calls) {
                checked.insert(name.clone());
            }
        }
        if checked.len() == before {
            break;
        }
    }
    let buffers = |sig: &str| ["[f32]", "[u32]", "[i32]"].iter().any(|t| sig.contains(t));
    let public: Vec<_> = fns.iter().filter(|f| f.1 && buffers(&f.2)).collect();
    // The scan itself must see the kernels (a broken parser would pass vacuously).
    for known in ["matmul_with", "flash_backward_with", "attention_forward", "copy_block"] {
        assert!(public.iter().any(|f| f.0 == known), "the scan missed {known}");
    }
    let missing: Vec<String> = public
        .iter()
        .filter(|f| !checked.contains(&f.0))
        .map(|f| format!("{} in {}", f.0, f.4))
        .collect();
    assert!(
        missing.is_empty(),
        "public kernels without a length check (add `assert!`s on every buffer before any \
         write, or a `// lengths: ...` comment saying why none is needed):\n{}",
        missing.join("\n")
    );
}
