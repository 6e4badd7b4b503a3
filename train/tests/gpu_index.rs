//! `train --gpu-index N` opens the N-th GPU adapter; under a launcher (mpirun, srun) the default
//! is the rank's local rank modulo the adapters, so the ranks of a multi-GPU machine each get
//! their own. An index past the last adapter is a one-line error listing them (exit 2 or 1),
//! never a silent fallback to another GPU. Runs on lavapipe (one adapter).
use std::process::{Command, Output};

fn bench(gpu_index: Option<&str>, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_train"));
    if let Some(i) = gpu_index {
        cmd.args(["--gpu-index", i]);
    }
    cmd.args(["bench", "--device", "gpu", "--depth", "1", "--max-seq-len", "16"])
        .args(["--device-batch-size", "1", "--vocab-size", "64", "--steps", "1"])
        .env_remove("FEMTOCHAT_GPU_INDEX")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn no_gpu(out: &Output) -> bool {
    String::from_utf8_lossy(&out.stderr).contains("no GPU adapter")
        && std::env::var("FEMTOCHAT_SKIP_GPU").as_deref() == Ok("1")
}

#[test]
fn gpu_index_picks_an_adapter_or_lists_them() {
    let first = bench(Some("0"), &[]);
    if no_gpu(&first) {
        return;
    }
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));

    let missing = bench(Some("7"), &[]);
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success());
    assert!(err.contains("GPU adapter 7 does not exist; this machine has"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // Launched as local rank 7 of a one-process job: rank 7 modulo the adapters, not an error
    // (several ranks may share a GPU when there are fewer GPUs than ranks).
    let rank = bench(None, &[("OMPI_COMM_WORLD_SIZE", "1"), ("OMPI_COMM_WORLD_LOCAL_RANK", "7")]);
    assert!(rank.status.success(), "{}", String::from_utf8_lossy(&rank.stderr));
}
