//! The terminal front ends and the command line's checks, on a tiny run directory (context 512):
//! zero token counts refused everywhere, the trained context by default, a prompt over it is a
//! one-line error that does not echo it, and chat survives a line of invalid UTF-8.
mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::*;
use femtochat_serve::fixture::write_run;

fn tiny_run(dir: &Path) -> PathBuf {
    let run = dir.join("run");
    write_run(&run, &model(), &tokenizer()).unwrap();
    run
}

fn serve(args: &[&str], run: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_serve"))
        .args(args)
        .arg("--checkpoint")
        .arg(run)
        .output()
        .unwrap()
}

/// `serve chat` with `input` on stdin.
fn chat(args: &[&str], run: &Path, input: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_serve"))
        .arg("chat")
        .args(args)
        .arg("--checkpoint")
        .arg(run)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// --max-tokens 0 and --context 0 (and --max-batch 0) are refused by every interface with the
/// same words, before any model is loaded; the HTTP API's max_tokens 0 is a 400 (tests/http.rs).
#[test]
fn zero_counts_are_refused_by_every_interface() {
    let dir = tempfile::tempdir().unwrap();
    let run = tiny_run(dir.path());
    for args in [
        &["generate", "--prompt", "hi", "--max-tokens", "0"][..],
        &["generate", "--prompt", "hi", "--context", "0"],
        &["chat", "--max-tokens", "0"],
        &["chat", "--context", "0"],
        &["--context", "0"],
        &["--max-batch", "0"],
    ] {
        let out = serve(args, &run);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(stderr(&out).contains("must be at least 1"), "{args:?}: {}", stderr(&out));
    }
}

/// `generate` uses the model's trained context (512) by default, as the HTTP API does, not the
/// rotary tables. 10x: a 630-token prompt is refused in one line that names the sizes and does
/// not echo the prompt; with --context 1024 it runs.
#[test]
fn generate_keeps_to_the_trained_context() {
    let dir = tempfile::tempdir().unwrap();
    let run = tiny_run(dir.path());
    let prompt = "lorem ipsum ".repeat(90); // about 630 tokens
    let out = serve(&["generate", "--max-tokens", "2", "--prompt", &prompt], &run);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("the prompt is") && err.contains("the context holds 512"), "{err}");
    assert!(!err.contains("lorem"), "the error echoes the prompt: {err}");
    assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));

    let out =
        serve(&["generate", "--max-tokens", "2", "--context", "1024", "--prompt", &prompt], &run);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("lorem ipsum"));
}

/// A line of invalid UTF-8 is reported and skipped; the session goes on (two replies), and a
/// conversation that outgrows --context is a one-line error that keeps the session too.
#[test]
fn chat_survives_invalid_utf8_and_an_overlong_turn() {
    let dir = tempfile::tempdir().unwrap();
    let run = tiny_run(dir.path());
    let out = chat(&["--max-tokens", "3"], &run, b"hello\n\xff\xfe oops\nagain\n/quit\n");
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("not valid UTF-8"), "{err}");
    assert_eq!(err.matches("bot>").count(), 2, "{err}");

    let long = format!("{}\nshort\n/quit\n", "many words here ".repeat(40));
    let out = chat(&["--max-tokens", "3", "--context", "64"], &run, long.as_bytes());
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    let line = err.lines().find(|l| l.contains("error:")).unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains("the conversation is") && line.contains("holds 64"), "{err}");
    assert!(!err.contains("many words"), "{err}");
    assert_eq!(err.matches("bot>").count(), 1, "{err}");
}

/// `--dtype bf16` converts the f32 checkpoint (and says so) and generates; it is CPU-only, and
/// an unknown dtype is a usage error.
#[test]
fn generate_with_bf16_weights() {
    let dir = tempfile::tempdir().unwrap();
    let run = tiny_run(dir.path());
    let out =
        serve(&["generate", "--dtype", "bf16", "--max-tokens", "4", "--prompt", "lorem"], &run);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("stores F32 weights; converted to bf16"), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("lorem"));

    let out = serve(&["generate", "--dtype", "bf16", "--device", "gpu", "--prompt", "x"], &run);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("CPU only"), "{}", stderr(&out));
    let out = serve(&["generate", "--dtype", "int4", "--prompt", "x"], &run);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("expected fp32 or bf16"), "{}", stderr(&out));
}
