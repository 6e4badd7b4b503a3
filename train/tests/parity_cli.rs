//! `train parity` end to end: passes on the reference fixtures, fails (exit 1) on a perturbed
//! one, and reports a missing file as an error (exit 2).
use std::path::Path;
use std::process::Command;

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/model")
}

fn train() -> Command {
    Command::new(env!("CARGO_BIN_EXE_train"))
}

#[test]
fn reference_fixtures_pass() {
    let out = train()
        .arg("parity")
        .arg("--json")
        .args(["tiny_mha", "odd_shapes"].map(|n| fixtures().join(format!("{n}.safetensors"))))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() > 50);
    assert!(lines.iter().all(|l| l["ok"] == true));
    assert!(lines.iter().any(|l| l["tensor"] == "grad.lm_head.weight"));
}

/// The multi-step optimizer case: three steps' losses, gradients, updates and parameters.
#[test]
fn optimizer_steps_fixture_passes() {
    let out = train()
        .arg("parity")
        .arg("--json")
        .arg(fixtures().join("optim_steps.safetensors"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3 * (1 + 3 * 21));
    let updates = lines.iter().filter(|l| l["tensor"].as_str().unwrap().starts_with("update.3."));
    assert_eq!(updates.clone().count(), 21);
    assert!(updates.into_iter().all(|l| l["ok"] == true && l["tol"].as_f64() == Some(1e-4)));
}

#[test]
fn perturbed_fixture_fails_and_missing_file_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(fixtures().join("tiny_mha.safetensors")).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x80; // flip the sign of the last stored float
    std::fs::write(dir.path().join("bad.safetensors"), bytes).unwrap();
    std::fs::copy(fixtures().join("tiny_mha.json"), dir.path().join("bad.json")).unwrap();
    let out = train().arg("parity").arg(dir.path().join("bad.safetensors")).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAIL"));

    let out = train().arg("parity").arg(dir.path().join("absent.safetensors")).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("absent.safetensors"));
}

/// The same fixtures through the GPU backend (lavapipe in CI).
#[test]
fn reference_fixtures_pass_on_gpu() {
    let out = train()
        .args(["parity", "--json", "--device", "gpu"])
        .arg(fixtures().join("gqa_window.safetensors"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("no GPU adapter")
        && std::env::var("FEMTOCHAT_SKIP_GPU").as_deref() == Ok("1")
    {
        return;
    }
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() > 40);
    assert!(lines.iter().all(|l| l["ok"] == true));
    let grads = lines.iter().filter(|l| l["tensor"].as_str().unwrap().starts_with("grad."));
    assert!(grads.clone().count() > 10);
    assert!(grads.into_iter().all(|l| l["tol"].as_f64() == Some(femtochat_model::parity::TOL_GPU)));
}

/// `--pool-mib 0` turns the buffer recycler off: the same steps then hold less memory at their
/// peak (the recycler's buffers count); a cap that is not a number is a usage error.
#[test]
fn pool_mib_caps_the_recycled_memory() {
    let peak = |pool: &str| -> u64 {
        let out = train()
            .args(["--pool-mib", pool, "bench", "--depth", "2", "--aspect-ratio", "32"])
            .args(["--head-dim", "32", "--max-seq-len", "128", "--device-batch-size", "4"])
            .args(["--vocab-size", "2048", "--steps", "2", "--recompute", "sublayers"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        last["peak_host_bytes"].as_u64().unwrap()
    };
    let (off, on) = (peak("0"), peak("4096"));
    assert!(off < on, "peak without the recycler {off} B, with it {on} B");
    let bad = train().args(["--pool-mib", "lots", "bench", "--dry-run"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

/// `train bench` prints one JSON line per timed step; CPU and GPU compute the same first loss.
#[test]
fn bench_prints_steps_and_devices_agree() {
    let run = |device: &str| -> Option<Vec<serde_json::Value>> {
        let out = train()
            .args(["bench", "--depth", "1", "--max-seq-len", "32", "--device-batch-size", "2"])
            .args(["--vocab-size", "300", "--steps", "2", "--peak-flops", "1e12"])
            .args(["--device", device])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if device == "gpu"
            && stderr.contains("no GPU adapter")
            && std::env::var("FEMTOCHAT_SKIP_GPU").as_deref() == Ok("1")
        {
            return None;
        }
        assert!(out.status.success(), "{stderr}");
        Some(
            String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect(),
        )
    };
    let cpu = run("cpu").unwrap();
    assert_eq!(cpu.len(), 2);
    for l in &cpu {
        assert!(l["tok_per_s"].as_f64().unwrap() > 0.0 && l["mfu"].as_f64().unwrap() > 0.0);
        assert_eq!(l["device"], "cpu");
    }
    assert!(cpu[0].get("gpu_dispatches").is_none());
    if let Some(gpu) = run("gpu") {
        let (c, g) = (cpu[0]["loss"].as_f64().unwrap(), gpu[0]["loss"].as_f64().unwrap());
        assert!((c - g).abs() < 1e-3 * c, "cpu {c} gpu {g}");
        // Launch diagnostics: the same dispatches every step, recorded within the step's time.
        let n = |l: &serde_json::Value| l["gpu_dispatches"].as_u64().unwrap();
        assert!(n(&gpu[0]) > 50 && n(&gpu[0]) == n(&gpu[1]), "{gpu:?}");
        let (host, ms) = (gpu[0]["host_ms"].as_f64().unwrap(), gpu[0]["ms"].as_f64().unwrap());
        assert!(host > 0.0 && host <= ms, "{gpu:?}");
    }
    let bad = train().args(["bench", "--steps", "0"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

/// With no usable GPU backend (WGPU_BACKEND names one this platform lacks), `--device gpu` fails
/// at startup with the reason and exit code 2, not a panic.
#[test]
fn no_gpu_adapter_is_a_clear_error() {
    let out = train()
        .args(["bench", "--device", "gpu", "--depth", "1", "--steps", "1"])
        .env("WGPU_BACKEND", "dx12")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no GPU adapter found"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
