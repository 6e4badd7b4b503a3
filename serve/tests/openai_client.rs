//! The `serve` binary end to end with the official Python `openai` client: start the binary on a
//! tiny run directory, wait for /health, run `openai_client.py` against it. Without python3 and
//! the `openai` package the test is skipped with a message, except in CI (FEMTOCHAT_CI set),
//! where it must run.
mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use femtochat_serve::fixture::write_run;

fn python_has_openai() -> bool {
    Command::new("python3")
        .args(["-c", "import openai"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn serve_bin(run: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_serve"))
        .arg("--checkpoint")
        .arg(run)
        .args(extra)
        .output()
        .unwrap()
}

/// The `serve` binary on a tiny run directory `DIR/tiny-run`, once /health answers.
fn spawn_server(dir: &Path) -> (Kill, String) {
    let run = dir.join("tiny-run");
    write_run(&run, &model(), &tokenizer()).unwrap();
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_serve"))
        .arg("--checkpoint")
        .arg(&run)
        .args(["--port", &port.to_string(), "--max-batch", "4", "--http-workers", "2"])
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let guard = Kill(child);
    let base = format!("http://127.0.0.1:{port}");
    let t = Instant::now();
    while get(&base, "/health").0 != 200 {
        assert!(t.elapsed() < Duration::from_secs(60), "server did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    (guard, base)
}

/// Skip (with a message) when a tool is missing, except in CI (FEMTOCHAT_CI set).
fn require(available: bool, what: &str) -> bool {
    if !available {
        if std::env::var_os("FEMTOCHAT_CI").is_some() {
            panic!("FEMTOCHAT_CI is set but {what} is not available");
        }
        eprintln!("skipped: {what} is not available");
    }
    available
}

/// The web chat page in headless Chromium (Debian `chromium` + `playwright-core` from npm, both
/// installed by .ci/run): at phone width, send a message and watch the reply stream in, then a
/// screenshot (kept in target/web_page.png).
#[test]
fn web_page_streams_a_reply_in_headless_chromium() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let modules = root.join(".ci/node/node_modules");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let node_ok = Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success());
    if !require(
        node_ok && modules.join("playwright-core").exists() && Path::new(&chromium).exists(),
        "node + .ci/node/node_modules/playwright-core + chromium",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_guard, base) = spawn_server(dir.path());
    let shot = root.join("target/web_page.png");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/web_page.cjs");
    let out = Command::new("node")
        .arg(script)
        .arg(format!("{base}/"))
        .arg(&shot)
        .env("NODE_PATH", &modules)
        .env("CHROMIUM", &chromium)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "web_page.cjs failed:\n{stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["user"], "Hello there");
    assert!(r["reply"].as_str().is_some_and(|t| !t.is_empty()), "{r}");
    // Each streamed chunk rewrites the reply bubble: several updates mean it streamed.
    assert!(r["updates"].as_u64().unwrap() >= 3, "{r}");
    assert!(r["status"].as_str().unwrap().contains('·'), "{r}");
    assert_eq!(r["overflow"], false, "the page scrolls sideways at 375px: {r}");
    assert!(std::fs::metadata(&shot).unwrap().len() > 1000);
}

#[test]
fn openai_python_client_against_the_binary() {
    if !python_has_openai() {
        if std::env::var_os("FEMTOCHAT_CI").is_some() {
            panic!("FEMTOCHAT_CI is set but python3 cannot import openai");
        }
        eprintln!(
            "skipped: python3 with the `openai` package is not available (pip install openai)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_guard, base) = spawn_server(dir.path());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(format!("{base}/v1"))
        .arg("tiny-run") // the default model name: the run directory's name
        .output()
        .unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "openai_client.py failed:\n{text}");
    assert!(text.contains("all checks passed"), "{text}");
}

#[test]
fn bad_runs_fail_at_startup_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let missing = serve_bin(&dir.path().join("nope"), &["--port", "0"]);
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("latest.json"), "{err}");

    // A tokenizer whose vocab does not match the model's.
    let run = dir.path().join("run");
    let small =
        femtochat_model::tokenizer::Tokenizer::train(&["tiny text for a tiny tokenizer"], 300)
            .unwrap();
    write_run(&run, &model(), &small).unwrap();
    let out = serve_bin(&run, &["--port", "0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tokens but the model expects"), "{err}");

    // A tokenizer directory that does not exist.
    write_run(&run, &model(), &tokenizer()).unwrap();
    let out = serve_bin(&run, &["--port", "0", "--tokenizer", "/nonexistent/tok"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/tok"));

    // No checkpoint at all.
    let out = Command::new(env!("CARGO_BIN_EXE_serve")).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--checkpoint"));
}

#[test]
fn terminal_front_ends_still_work() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    write_run(&run, &model(), &tokenizer()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_serve"))
        .args(["generate", "--prompt", "Once", "--max-tokens", "5", "--checkpoint"])
        .arg(&run)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("Once"));

    let mut chat = Command::new(env!("CARGO_BIN_EXE_serve"))
        .args(["chat", "--max-tokens", "5", "--checkpoint"])
        .arg(&run)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    chat.stdin.take().unwrap().write_all(b"hello\n/quit\n").unwrap();
    let out = chat.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bot>"));
}

/// `serve --checkpoint NANOCHAT_DIR`: a checkpoint written by PyTorch nanochat (the repository's
/// fixture) is imported in memory; the terminal front end and the HTTP API both greedily
/// continue "The " with the tokens nanochat itself produced.
#[test]
fn serves_a_nanochat_directory() {
    let nc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/nanochat_checkpoint");
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(nc.join("expected.json")).unwrap()).unwrap();
    let greedy: Vec<u32> = expected["greedy_ids"].as_array().unwrap()[..10]
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let tok = femtochat_model::nanochat::load_tokenizer(&nc.join("tokenizer")).unwrap();
    let want = format!("The {}", tok.decode(&greedy).unwrap());

    let out = Command::new(env!("CARGO_BIN_EXE_serve"))
        .args(["generate", "--prompt", "The ", "--temperature", "0", "--max-tokens", "10"])
        .arg("--checkpoint")
        .arg(&nc)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end_matches('\n'), want);

    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_serve"))
        .arg("--checkpoint")
        .arg(&nc)
        .args(["--port", &port.to_string(), "--model-name", "d2"])
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let _guard = Kill(child);
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(&base);
    let body =
        serde_json::json!({"model": "d2", "prompt": "The ", "max_tokens": 10, "temperature": 0});
    let r = post(&base, "/v1/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text);
    let text = r.json()["choices"][0]["text"].as_str().unwrap().to_string();
    assert_eq!(format!("The {text}"), want);
}
