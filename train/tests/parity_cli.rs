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
