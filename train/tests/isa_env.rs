//! `FEMTOCHAT_ISA` is checked when `train` starts: an unknown instruction set, or one this CPU
//! lacks, is a one-line error (exit 2) naming the variable, not a panic deep inside a kernel.
use std::process::Command;

#[test]
fn a_bad_isa_is_refused_at_startup() {
    use femtochat_engine::cpu_isa::Isa;
    let mut bad = vec!["sse9"];
    bad.extend(["avx512", "avx2", "neon"].into_iter().filter(|n| Isa::parse(n).is_err()));
    for isa in bad {
        let out = Command::new(env!("CARGO_BIN_EXE_train"))
            .args(["bench", "--depth", "1", "--steps", "1"])
            .env("FEMTOCHAT_ISA", isa)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{isa}: {stderr}");
        assert!(
            stderr.contains("FEMTOCHAT_ISA") && !stderr.contains("panicked"),
            "{isa}: {stderr}"
        );
    }
}
