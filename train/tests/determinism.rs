//! Same seed, data, config and device: bit-identical metrics and checkpoints, also across thread
//! counts on the CPU and run to run on the GPU (docs/research.md, "Determinism"). Wall-clock
//! fields are the only ones allowed to differ.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Metrics fields that measure the machine, not the computation: time, and peak memory (which
/// depends on when the loader's and rayon's threads allocate).
const TIMING: [&str; 5] = ["dt_ms", "tok_per_s", "tflops", "peak_host_bytes", "peak_gpu_bytes"];

fn train(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_train")).args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// metrics.jsonl with the timing fields removed, as JSON text (floats as printed, i.e. exact).
fn metrics(run: &Path) -> Vec<String> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(l).unwrap();
            v.retain(|k, _| !TIMING.contains(&k.as_str()));
            serde_json::Value::Object(v).to_string()
        })
        .collect()
}

/// A GPU adapter to test on (lavapipe in CI); FEMTOCHAT_SKIP_GPU=1 skips on machines without one.
fn gpu() -> bool {
    match femtochat_engine::Device::Gpu.ensure_available() {
        Ok(()) => true,
        Err(e) => {
            assert!(std::env::var("FEMTOCHAT_SKIP_GPU").as_deref() == Ok("1"), "{e}");
            false
        }
    }
}

fn same_bytes(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert!(x == y, "{} and {} differ", a.display(), b.display());
}

/// A `train base` checkpoint file without the run's identity: `run_id` is unique per start of a
/// run by design (time and process id), so it is the one field two identical runs differ in.
fn without_run_id(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    let strip = |v: &mut serde_json::Value| {
        if let Some(o) = v.as_object_mut() {
            o.remove("run_id");
        }
    };
    if path.extension().is_some_and(|e| e == "json") {
        let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        strip(&mut v);
        return v.to_string().into_bytes();
    }
    // safetensors: u64 header length, JSON header (free-form "meta" inside), tensor data
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    if let Some(meta) = header["__metadata__"]["meta"].as_str() {
        let mut m: serde_json::Value = serde_json::from_str(meta).unwrap();
        strip(&mut m);
        header["__metadata__"]["meta"] = m.to_string().into();
    }
    let mut out = header.to_string().into_bytes();
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

fn corpus(dir: &Path) -> (PathBuf, PathBuf) {
    let text = "It was the best of times, it was the worst of times, it was the age of wisdom, it \
                was the age of foolishness, it was the epoch of belief.\n\n"
        .repeat(60);
    let (t, v) = (dir.join("a_train.txt"), dir.join("b_val.txt"));
    std::fs::write(&t, &text).unwrap();
    std::fs::write(&v, &text[..2000]).unwrap();
    (t, v)
}

/// A 6-step mini-GPT run with a sample; returns its directory (temporary paths hold no spaces).
fn micro(
    dir: &Path,
    data: &Path,
    name: &str,
    mode: &str,
    threads: &str,
    device: &str,
    seed: &str,
) -> PathBuf {
    let out = dir.join(format!("{mode}-{name}"));
    let (d, o) = (data.display(), out.display());
    let args = format!(
        "--threads {threads} micro --model mini-gpt --mode {mode} --device {device} --data {d} \
         --out {o} --steps 6 --eval-every 3 --eval-windows 4 --prompt It --max-new-tokens 16 \
         --seed {seed}"
    );
    train(&args.split_whitespace().collect::<Vec<_>>());
    out
}

#[test]
fn micro_runs_are_bit_identical_on_both_engines() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = corpus(dir.path());
    for mode in ["scalar", "tensor"] {
        let run = |name: &str, threads: &str, device: &str, seed: &str| {
            micro(dir.path(), &data, name, mode, threads, device, seed)
        };
        let (a, b) = (run("a", "1", "cpu", "7"), run("b", "1", "cpu", "7"));
        assert_eq!(metrics(&a), metrics(&b), "{mode}");
        assert_eq!(metrics(&a).len(), 9);
        same_bytes(&a.join("model.json"), &b.join("model.json"));
        let sample = |d: &Path| -> serde_json::Value {
            let s = std::fs::read(d.join("summary.json")).unwrap();
            serde_json::from_slice::<serde_json::Value>(&s).unwrap()["sample"].clone()
        };
        assert!(sample(&a).is_string());
        assert_eq!(sample(&a), sample(&b));
        // Another seed is another run: the streams really come from the seed.
        assert_ne!(metrics(&a), metrics(&run("c", "1", "cpu", "8")));
        if mode == "tensor" {
            // The CPU kernels split work by output tiles and fixed-size chunks, never by thread.
            let t2 = run("t2", "2", "cpu", "7");
            assert_eq!(metrics(&a), metrics(&t2));
            same_bytes(&a.join("model.json"), &t2.join("model.json"));
            // The WGSL kernels have a fixed summation order and no float atomics.
            if gpu() {
                let (g1, g2) = (run("g1", "1", "gpu", "7"), run("g2", "1", "gpu", "7"));
                assert_eq!(metrics(&g1), metrics(&g2));
                same_bytes(&g1.join("model.json"), &g2.join("model.json"));
            }
        }
    }
}

#[test]
fn base_runs_are_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let (t, v) = corpus(dir.path());
    let tok = dir.path().join("tok");
    train(&[
        "tokenizer",
        "--input",
        t.to_str().unwrap(),
        "--vocab-size",
        "300",
        "--out",
        tok.to_str().unwrap(),
    ]);
    let run_on = |name: &str, threads: &str| {
        let out = dir.path().join(name);
        let (tk, d, val, o) = (tok.display(), t.display(), v.display(), out.display());
        let args = format!(
            "--threads {threads} base --tokenizer {tk} --data {d} --val {val} --out {o} --depth 1 \
             --max-seq-len 32 --device-batch-size 2 --num-iterations 4 --warmup-steps 1 \
             --eval-every 2 --eval-tokens 256 --sample-every 0 --save-every 2"
        );
        train(&args.split_whitespace().collect::<Vec<_>>());
        out
    };
    let (a, b, t2) = (run_on("a", "1"), run_on("b", "1"), run_on("t2", "2"));
    assert!(metrics(&a).len() >= 6, "{:?}", metrics(&a));
    for other in [&b, &t2] {
        assert_eq!(metrics(&a), metrics(other));
        for f in ["model.safetensors", "optimizer.safetensors", "state.json"] {
            let (x, y) = (a.join("step_000004").join(f), other.join("step_000004").join(f));
            assert!(without_run_id(&x) == without_run_id(&y), "{} differs", y.display());
        }
    }
}
