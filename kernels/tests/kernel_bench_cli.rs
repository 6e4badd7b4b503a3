//! `kernel-bench matmul`, `attention` and `matvec` end to end: JSON lines on the CPU and the GPU, clear errors on bad input.
use std::process::Command;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kernel-bench"))
}

fn lines(out: &std::process::Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn matmul_cpu_and_gpu_print_json() {
    let out = bench()
        .args(["matmul", "--m", "64,65", "--k", "32", "--n", "48", "--reps", "2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let l = lines(&out);
    assert_eq!(l.len(), 2);
    assert!(l.iter().all(|l| l["device"] == "cpu" && l["gflops"].as_f64().unwrap() > 0.0));

    let out = bench()
        .args(["matmul", "--device", "gpu", "--m", "33", "--k", "17", "--n", "40", "--reps", "2"])
        .args(["--tiling", "64,128"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("no GPU adapter")
        && std::env::var("FEMTOCHAT_SKIP_GPU").as_deref() == Ok("1")
    {
        return;
    }
    assert!(out.status.success(), "{stderr}");
    let l = lines(&out);
    assert_eq!(l.len(), 2);
    assert_eq!(
        (l[0]["impl"].as_str(), l[1]["impl"].as_str()),
        (Some("wgsl_tiled_64x64_4x4"), Some("wgsl_tiled_128x128_8x8"))
    );
    assert_eq!(l[0]["device"], "gpu");
    assert!(l[0]["adapter"].as_str().is_some_and(|a| !a.is_empty()));
    assert!(l[0]["ms"].as_f64().unwrap() > 0.0);
}

/// `matvec` with f32 and bf16 weights: a line per case naming the dtype and ISA; bf16 reads
/// half the bytes per call and its outputs agree with f32's to bf16 rounding.
#[test]
fn matvec_prints_both_dtypes() {
    let out = bench()
        .args(["matvec", "--m", "1,6", "--k", "96", "--n", "70", "--dtype", "fp32,bf16"])
        .args(["--reps", "2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let l = lines(&out);
    assert_eq!(l.len(), 4);
    for pair in l.chunks(2) {
        let (f, b) = (&pair[0], &pair[1]);
        assert_eq!((f["dtype"].as_str(), b["dtype"].as_str()), (Some("fp32"), Some("bf16")));
        assert_eq!((f["op"].as_str(), f["m"].as_u64()), (Some("matvec"), b["m"].as_u64()));
        assert!(f["isa"].is_string() && f["weight_gb_per_s"].as_f64().unwrap() > 0.0);
        let (cf, cb) = (f["checksum"].as_f64().unwrap(), b["checksum"].as_f64().unwrap());
        assert!((cf - cb).abs() < 1e-2 * cf && cf != cb, "fp32 {cf} vs bf16 {cb}");
    }
    for bad in [&["--dtype", "int8"][..], &["--reps", "0"], &["--k", "0"]] {
        let out = bench()
            .args(["matvec", "--m", "1", "--k", "8", "--n", "8"])
            .args(bad)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"), "{bad:?}");
    }
}

#[test]
fn bad_arguments_are_errors_not_panics() {
    for args in [
        &["matmul", "--m", "4", "--k", "4", "--n", "4", "--reps", "0"][..],
        &["matmul", "--m", "4", "--k", "4", "--n", "4", "--isa", "bogus"][..],
        &["matmul", "--m", "x"][..],
    ] {
        let out = bench().args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"), "{args:?}");
    }
}

#[test]
fn attention_cpu_and_gpu_print_json() {
    let args = ["attention", "--t", "96", "--d", "16", "--h", "2", "--pass", "fwd,both"];
    let out =
        bench().args(args).args(["--impl", "flash,reference", "--reps", "1"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let l = lines(&out);
    assert_eq!(l.len(), 4);
    assert!(l.iter().all(|l| l["device"] == "cpu" && l["ms"].as_f64().unwrap() > 0.0));

    let out = bench().args(args).args(["--device", "gpu", "--reps", "1"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("no GPU adapter")
        && std::env::var("FEMTOCHAT_SKIP_GPU").as_deref() == Ok("1")
    {
        return;
    }
    assert!(out.status.success(), "{stderr}");
    let l = lines(&out);
    assert_eq!(l.len(), 2);
    assert!(l.iter().all(|l| l["device"].as_str().unwrap().starts_with("gpu")));
    // Backward's only extra buffer is delta (B, Tq, H) floats.
    assert_eq!(l[1]["peak_extra_bytes"], 96 * 2 * 4);
}

/// `FEMTOCHAT_ISA` changes the `isa` that matmul and attention report, and every ISA this CPU
/// runs computes the same results within rounding (checksums within 1e-5 relative).
#[test]
fn forced_isa_is_reported_and_results_agree() {
    use femtochat_kernels::cpu::isa::Isa;
    let isas: Vec<&str> =
        ["avx512", "avx2", "portable"].into_iter().filter(|n| Isa::parse(n).is_ok()).collect();
    let cases: [&[&str]; 2] = [
        &["matmul", "--m", "130", "--k", "70", "--n", "90", "--trans-b", "--reps", "1"],
        &["attention", "--t", "96", "--d", "16", "--h", "4", "--hkv", "2", "--pass", "fwd,both"],
    ];
    for args in cases {
        let mut first: Option<Vec<f64>> = None;
        for isa in &isas {
            let out = bench().args(args).env("FEMTOCHAT_ISA", isa).output().unwrap();
            assert!(out.status.success(), "{isa}: {}", String::from_utf8_lossy(&out.stderr));
            let l = lines(&out);
            assert!(!l.is_empty());
            assert!(l.iter().all(|l| l["isa"] == *isa), "{isa} {args:?}: {l:?}");
            let sums: Vec<f64> = l.iter().map(|l| l["checksum"].as_f64().unwrap()).collect();
            match &first {
                None => first = Some(sums),
                Some(want) => {
                    for (g, w) in sums.iter().zip(want) {
                        assert!(
                            (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                            "{isa} {args:?}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }
    // "scalar" is the portable path.
    let out = bench().args(cases[0]).env("FEMTOCHAT_ISA", "scalar").output().unwrap();
    assert!(lines(&out).iter().all(|l| l["isa"] == "portable"));
    // Unknown names, and ISAs this CPU lacks, are refused up front with a clear error.
    let mut refused = vec!["sse9".to_string()];
    refused.extend(
        ["avx512", "avx2", "neon"].iter().filter(|n| Isa::parse(n).is_err()).map(|n| n.to_string()),
    );
    for bad in refused {
        let out = bench().args(cases[0]).env("FEMTOCHAT_ISA", &bad).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad}");
        assert!(
            stderr.contains("FEMTOCHAT_ISA") && !stderr.contains("panicked"),
            "{bad}: {stderr}"
        );
    }
}

/// `FEMTOCHAT_GPU_INDEX` picks an adapter by index (one GPU per rank of a multi-GPU job): the
/// first adapter runs the kernel and names itself; an index past the last is an error that
/// lists the adapters, not a panic or a silent fallback to another GPU.
#[test]
fn gpu_index_selects_an_adapter_or_names_them() {
    let run = |index: &str| {
        bench()
            .env("FEMTOCHAT_GPU_INDEX", index)
            .args(["matmul", "--device", "gpu", "--m", "8", "--k", "8", "--n", "8", "--reps", "1"])
            .output()
            .unwrap()
    };
    let first = run("0");
    let stderr = String::from_utf8_lossy(&first.stderr);
    if stderr.contains("no GPU adapter")
        && std::env::var("FEMTOCHAT_SKIP_GPU").as_deref() == Ok("1")
    {
        return;
    }
    assert!(first.status.success(), "{stderr}");
    // "name (backend)": the error lists "name (backend, device type)".
    let adapter = lines(&first)[0]["adapter"].as_str().unwrap().to_string();
    let adapter = adapter.rsplit_once(" (").map_or(adapter.as_str(), |(name, _)| name);
    let missing = run("99");
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("GPU adapter 99 does not exist"), "{err}");
    assert!(err.contains(adapter), "the error lists the adapters: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let bad = run("first");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not an adapter index"));
}
