//! Data-parallel `train base` and `train sft` over MPI (feature `mpi`; needs `mpirun` from
//! OpenMPI): 2 and 3 ranks reach the parameters, optimizer state and losses of one process with
//! the same total batch within 1e-5 relative L2 (the whole model; 1e-4 for each tensor: the
//! gradient sums differ only in order); a resumed run continues bit-identically on the same
//! number of ranks and within those bounds on another number; a dead or hung rank stops the job.
#![cfg(feature = "mpi")]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use femtochat_model::checkpoint::load_model;
use femtochat_model::tokenizer::{ChatMessage, Content, Conversation};

/// The whole parameter vector (and the whole optimizer state), and the losses: within this
/// relative L2 of one process.
const TOL: f64 = 1e-5;
/// Each tensor on its own: Muon and Adam updates do not shrink with the gradient, so a tensor
/// that is still small (the zero-initialised projections) or a scalar summed over every position
/// carries the gradient's summation-order error (a few 1e-6 per step) at its own scale, and the
/// second moments carry it doubled.
const TOL_TENSOR: f64 = 1e-4;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_train")
}

fn ok(out: &Output) -> String {
    let e = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "status {:?}, stderr: {e}", out.status);
    e
}

/// `train ARGS` on `np` ranks (one process, without mpirun, when `np` is 0), one thread each.
fn train(np: usize, args: &[&str]) -> Output {
    let mut cmd = if np == 0 {
        Command::new(bin())
    } else {
        let mut c = Command::new("mpirun");
        c.args(["--allow-run-as-root", "--oversubscribe", "-np", &np.to_string(), bin()]);
        // Containers often forbid the cross-memory attach OpenMPI uses for large messages.
        c.env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
        c
    };
    cmd.args(["--threads", "1"]).args(args).output().unwrap()
}

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data")
}

/// `train base` at depth 3 for 4 steps of 6 micro-batches (2 x 64 tokens), checkpoints every 2 steps.
fn base_args(tok: &Path, out: &Path, total_batch: &str) -> Vec<String> {
    let args = [
        "base",
        "--tokenizer",
        tok.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        // Not 2: at depth 2 the backout layer is the last one, whose output the final norm
        // makes scale-free, so backout_lambda's gradient is rounding noise that Adam turns into
        // full-size steps, different for every order of the gradient sum.
        "--depth",
        "3",
        "--max-seq-len",
        "64",
        "--device-batch-size",
        "2",
        "--total-batch-size",
        total_batch,
        "--num-iterations",
        "4",
        "--warmup-steps",
        "1",
        "--eval-every",
        "0",
        "--eval-tokens",
        "1024",
        "--sample-every",
        "0",
        "--save-every",
        "2",
    ];
    args.iter().map(|s| s.to_string()).collect()
}

fn run_base(np: usize, tok: &Path, out: &Path, extra: &[&str]) -> String {
    let mut args = base_args(tok, out, "768");
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&train(np, &args))
}

fn params(ckpt: &Path) -> BTreeMap<String, Vec<f32>> {
    let (gpt, _) = load_model(&ckpt.join("model.safetensors")).unwrap();
    gpt.params().iter().map(|(k, t)| (k.to_string(), t.to_vec())).collect()
}

fn losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| Some((v["step"].as_u64()?, v["loss"].as_f64()?)))
        .collect()
}

fn f32s(view: &safetensors::tensor::TensorView) -> Vec<f32> {
    view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// The optimizer state of a checkpoint: one process's file, or the ranks' shards put together
/// at their offsets.
fn optimizer(ckpt: &Path) -> BTreeMap<String, Vec<f32>> {
    let single = ckpt.join("optimizer.safetensors");
    if single.exists() {
        let bytes = std::fs::read(&single).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        return st.tensors().into_iter().map(|(k, v)| (k, f32s(&v))).collect();
    }
    let mut full: BTreeMap<String, Vec<(usize, Vec<f32>)>> = BTreeMap::new();
    for r in 0.. {
        let path = ckpt.join(format!("optimizer_rank{r}.safetensors"));
        if !path.exists() {
            assert!(r > 1, "{} has no shards", ckpt.display());
            break;
        }
        let bytes = std::fs::read(&path).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().clone().unwrap();
        let offsets: BTreeMap<String, usize> = serde_json::from_str(&meta["offsets"]).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (k, v) in st.tensors() {
            full.entry(k.clone()).or_default().push((offsets[&k], f32s(&v)));
        }
    }
    full.into_iter()
        .map(|(k, mut parts)| {
            parts.sort_by_key(|p| p.0);
            let mut v = Vec::new();
            for (off, part) in parts {
                assert_eq!(off, v.len(), "{k}: parts must tile the buffer");
                v.extend(part);
            }
            (k, v)
        })
        .collect()
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let n: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum();
    (d / n.max(1e-30)).sqrt()
}

fn assert_close(what: &str, got: &BTreeMap<String, Vec<f32>>, want: &BTreeMap<String, Vec<f32>>) {
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{what}");
    for (k, w) in want {
        let e = rel(&got[k], w);
        assert!(e < TOL_TENSOR, "{what}: {k} differs by {e:.3e} relative L2");
    }
    let all = |m: &BTreeMap<String, Vec<f32>>| m.values().flatten().copied().collect::<Vec<_>>();
    let e = rel(&all(got), &all(want));
    assert!(e < TOL, "{what}: the whole differs by {e:.3e} relative L2");
}

fn assert_same_losses(what: &str, got: &[(u64, f64)], want: &[(u64, f64)]) {
    assert_eq!(got.len(), want.len(), "{what}: {got:?} vs {want:?}");
    for ((s, a), (t, b)) in got.iter().zip(want) {
        assert_eq!(s, t);
        assert!((a - b).abs() <= TOL * b.abs(), "{what}: step {s} loss {a} vs {b}");
    }
}

/// Point `latest.json` back at the step-2 checkpoint, as if the run had died after it.
fn rewind(run: &Path) {
    std::fs::remove_dir_all(run.join("step_000004")).unwrap();
    std::fs::write(run.join("latest.json"), r#"{"step":2,"dir":"step_000002"}"#).unwrap();
}

#[test]
fn ranks_train_like_one_process_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("tok");
    let d = data();
    ok(&train(
        0,
        &["tokenizer", "--input", d.to_str().unwrap(), "--vocab-size", "512", "--out"]
            .into_iter()
            .chain([tok.to_str().unwrap()])
            .collect::<Vec<_>>(),
    ));
    let one = dir.path().join("one");
    run_base(0, &tok, &one, &[]);
    let (want_p, want_o, want_l) =
        (params(&one.join("step_000004")), optimizer(&one.join("step_000004")), losses(&one));
    assert_eq!(want_l.len(), 4);

    for np in [2, 3] {
        let run = dir.path().join(format!("np{np}"));
        run_base(np, &tok, &run, &[]);
        let ckpt = run.join("step_000004");
        let what = format!("{np} ranks");
        assert_close(&what, &params(&ckpt), &want_p);
        assert_close(&what, &optimizer(&ckpt), &want_o);
        assert_same_losses(&what, &losses(&run), &want_l);
        // Rank 0 alone wrote the run directory: one model, N optimizer shards.
        assert!(!ckpt.join("optimizer.safetensors").exists());
        assert!(ckpt.join(format!("optimizer_rank{}.safetensors", np - 1)).exists());
    }

    sft_equivalence(dir.path(), &one);
    eval_equivalence(&one);

    // Resuming with the same number of ranks continues bit-identically.
    let run = dir.path().join("np2");
    let uninterrupted = params(&run.join("step_000004"));
    rewind(&run);
    run_base(2, &tok, &run, &["--resume"]);
    assert_eq!(params(&run.join("step_000004")), uninterrupted, "resumed on 2 ranks");
    assert_same_losses("resumed on 2 ranks", &losses(&run), &want_l);
    // With another number of ranks (or one process) the shards are re-split.
    for np in [3, 0] {
        rewind(&run);
        run_base(np, &tok, &run, &["--resume"]);
        let what = format!("resumed from 2 ranks on {np}");
        assert_close(&what, &params(&run.join("step_000004")), &want_p);
        assert_close(&what, &optimizer(&run.join("step_000004")), &want_o);
    }
}

/// `train eval core` and `train eval chat` split their problems over 2 and 3 ranks (13 and 5
/// problems per task: uneven shares) and report exactly what one process reports (summed counts
/// of a greedy evaluation); only rank 0 prints and appends to RUN_DIR/eval/.
fn eval_equivalence(run: &Path) {
    let run = run.to_str().unwrap();
    let core = ["eval", "core", "--checkpoint", run, "--max-per-task", "13"];
    let core = [&core[..], &["--tasks", "copa,bigbench_operators"]].concat();
    let chat = ["eval", "chat", "--checkpoint", run, "--max-problems", "5"];
    let chat = [&chat[..], &["--tasks", "arc-easy,gsm8k", "--max-new-tokens", "6"]].concat();
    for args in [core, chat] {
        let stdout = |np: usize| {
            let out = train(np, &args);
            let err = ok(&out);
            // Each rank says which problems it took: the work is split, not repeated.
            for r in 0..np {
                assert!(err.contains(&format!("rank {r} of {np}: ")), "{np} ranks: {err}");
            }
            String::from_utf8(out.stdout).unwrap()
        };
        let one = stdout(0);
        assert_eq!(one.lines().count(), 3, "two tasks and the summary: {one}");
        for np in [2, 3] {
            assert_eq!(stdout(np), one, "{} on {np} ranks", args[1]);
        }
        let kind = args[1];
        let logged = std::fs::read_to_string(Path::new(run).join(format!("eval/{kind}.jsonl")));
        assert_eq!(logged.unwrap().lines().count(), 3 * 3, "{kind}: one append per run, by rank 0");
    }
}

/// `train sft` from `base` (its latest checkpoint, optimizer warm-started) for 3 steps on
/// `facts`, on `np` ranks.
fn run_sft(np: usize, base: &Path, facts: &Path, out: &Path) -> String {
    let (b, f, o) = (base.to_str().unwrap(), facts.to_str().unwrap(), out.to_str().unwrap());
    let args = [
        "sft",
        "--base",
        b,
        "--out",
        o,
        "--data",
        f,
        "--val",
        f,
        "--num-iterations",
        "3",
        "--eval-every",
        "0",
        "--eval-tokens",
        "256",
        "--save-every",
        "0",
    ];
    ok(&train(np, &args))
}

fn sft_equivalence(dir: &Path, base: &Path) {
    let conv = |u: String, a: String| Conversation {
        messages: vec![
            ChatMessage { role: "user".into(), content: Content::Text(u) },
            ChatMessage { role: "assistant".into(), content: Content::Text(a) },
        ],
    };
    let lines: String = (0..60)
        .map(|i| conv(format!("What is {i} plus {i}?"), format!("{}.", 2 * i)))
        .map(|c| format!("{}\n", serde_json::to_string(&c).unwrap()))
        .collect();
    let facts = dir.join("facts.jsonl");
    std::fs::write(&facts, lines).unwrap();
    let one = dir.join("sft1");
    run_sft(0, base, &facts, &one);
    let want = (params(&one.join("step_000003")), losses(&one));
    assert_eq!(want.1.len(), 3);
    for np in [2, 3] {
        let run = dir.join(format!("sft{np}"));
        let err = run_sft(np, base, &facts, &run);
        assert!(err.contains("warm-started the optimizer"), "{err}");
        let what = format!("sft on {np} ranks");
        assert_close(&what, &params(&run.join("step_000003")), &want.0);
        assert_same_losses(&what, &losses(&run), &want.1);
    }
}

/// A step that does not split over the ranks is refused on every rank with a clear error.
#[test]
fn uneven_accumulation_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("tok");
    let d = data();
    let args = ["tokenizer", "--input", d.to_str().unwrap(), "--vocab-size", "300", "--out"];
    ok(&train(0, &args.into_iter().chain([tok.to_str().unwrap()]).collect::<Vec<_>>()));
    let run = dir.path().join("run");
    // 5 micro-batches per step.
    let args = base_args(&tok, &run, "640");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = train(2, &args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("does not split over 2 ranks"), "{err}");
}

/// The `train` ranks that `launcher` started (its children named `train`).
fn ranks_of(launcher: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        // pid (comm) state ppid ...
        let Some((head, rest)) = stat.rsplit_once(") ") else { continue };
        let ppid: Option<u32> = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if head.ends_with("(train") && ppid == Some(launcher) {
            out.push(head.split_whitespace().next().unwrap().parse().unwrap());
        }
    }
    out
}

/// Start a long 2-rank run and wait until it has logged `steps` steps.
fn start_long_run(tok: &Path, run: &Path, steps: usize, timeout: &str) -> std::process::Child {
    let mut args = base_args(tok, run, "768");
    let n = args.iter().position(|a| a == "--num-iterations").unwrap();
    args[n + 1] = "1000".into();
    let child = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "2", bin(), "--threads", "1"])
        .args(&args)
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .env("FEMTOCHAT_DIST_TIMEOUT", timeout)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while losses(run).len() < steps {
        assert!(t0.elapsed().as_secs() < 300, "the run did not reach step {steps}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    child
}

/// Wait for the job to end; its exit status and stderr, failing after `limit` seconds.
fn wait_ended(mut child: std::process::Child, limit: u64) -> (bool, String) {
    let t0 = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return (status.success(), err);
        }
        if t0.elapsed().as_secs() > limit {
            child.kill().unwrap();
            panic!("the job was still running {limit}s after a rank failed");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// The checkpoint latest.json names is complete: model, state and every rank's shard.
fn assert_complete_checkpoint(run: &Path) {
    let latest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("latest.json")).unwrap()).unwrap();
    let ckpt = run.join(latest["dir"].as_str().unwrap());
    for f in [
        "model.safetensors",
        "state.json",
        "optimizer_rank0.safetensors",
        "optimizer_rank1.safetensors",
    ] {
        assert!(ckpt.join(f).exists(), "{} lacks {f}", ckpt.display());
    }
}

/// A rank killed mid-run ends the job; a rank that hangs (stopped) is caught by the others'
/// watchdog within the timeout. Either way the newest checkpoint is complete and resumes.
#[test]
fn a_dead_or_hung_rank_stops_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("tok");
    let d = data();
    let args = ["tokenizer", "--input", d.to_str().unwrap(), "--vocab-size", "300", "--out"];
    ok(&train(0, &args.into_iter().chain([tok.to_str().unwrap()]).collect::<Vec<_>>()));

    let run = dir.path().join("killed");
    let child = start_long_run(&tok, &run, 3, "600");
    let ranks = ranks_of(child.id());
    assert_eq!(ranks.len(), 2, "ranks {ranks:?}");
    // SAFETY: a plain kill(2) of a process this test started.
    assert_eq!(unsafe { libc::kill(ranks[1], libc::SIGKILL) }, 0);
    let (success, _) = wait_ended(child, 60);
    assert!(!success, "the job must fail when a rank dies");
    assert_complete_checkpoint(&run);

    let run = dir.path().join("hung");
    let child = start_long_run(&tok, &run, 3, "5");
    let ranks = ranks_of(child.id());
    assert_eq!(ranks.len(), 2, "ranks {ranks:?}");
    // SAFETY: as above; SIGSTOP freezes the rank without its exiting (a hang).
    assert_eq!(unsafe { libc::kill(ranks[1], libc::SIGSTOP) }, 0);
    let (success, err) = wait_ended(child, 60);
    assert!(!success);
    assert!(err.contains("waited more than 5s"), "{err}");
    assert_complete_checkpoint(&run);
}
