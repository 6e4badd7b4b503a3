//! The serve image's Dockerfile, checked without a container engine (CI has none): its RUN steps
//! are scripts under docker/ (which `.ci/docker` runs on the host), what it copies exists and is
//! not ignored, its base images match the pinned toolchain and one Debian release, and the
//! binary started with the image's exact ENTRYPOINT + CMD (the mounted /model swapped for a tiny
//! run directory) answers /health and a chat completion.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use femtochat_serve::fixture::write_run;
use serde_json::{Value, json};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The Dockerfile's instructions as (KEYWORD, rest): comments dropped, `\` continuations joined.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && pending.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => pending.push_str(head),
            None => {
                pending.push_str(line);
                let (key, rest) = pending.split_once(' ').unwrap_or((&pending, ""));
                out.push((key.to_uppercase(), rest.trim().to_string()));
                pending.clear();
            }
        }
    }
    out
}

/// An exec-form argument list (`["a", "b"]`).
fn exec_form(rest: &str) -> Vec<String> {
    serde_json::from_str(rest).unwrap_or_else(|e| panic!("not exec form ({e}): {rest}"))
}

/// .dockerignore's patterns (plain top-level names are all this project uses).
fn ignored(path: &str) -> bool {
    let text = std::fs::read_to_string(root().join(".dockerignore")).expect(".dockerignore");
    let first = path.trim_start_matches("./").split('/').next().unwrap_or("");
    text.lines().map(str::trim).any(|p| !p.is_empty() && !p.starts_with('#') && p == first)
}

struct Image {
    steps: Vec<(String, String)>,
}

impl Image {
    fn load() -> Image {
        let text = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
        Image { steps: instructions(&text) }
    }

    fn all(&self, key: &str) -> Vec<&str> {
        self.steps.iter().filter(|(k, _)| k == key).map(|(_, r)| r.as_str()).collect()
    }

    fn one(&self, key: &str) -> &str {
        let all = self.all(key);
        assert_eq!(all.len(), 1, "expected one {key}, found {all:?}");
        all[0]
    }
}

#[test]
fn base_images_match_the_toolchain_and_one_debian_release() {
    let image = Image::load();
    let froms = image.all("FROM");
    assert_eq!(froms.len(), 2, "a build stage and a runtime stage: {froms:?}");
    let (build, runtime) = (froms[0], froms[1]);
    assert!(build.ends_with(" AS build"), "the first stage is named build: {build}");
    let toolchain = std::fs::read_to_string(root().join("rust-toolchain.toml")).unwrap();
    let channel = toolchain
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel = "))
        .expect("channel")
        .trim_matches('"');
    assert!(
        build.starts_with(&format!("rust:{channel}-slim-")),
        "the build image carries the pinned toolchain {channel}: {build}"
    );
    // The binary links glibc dynamically: build and run on the same Debian release.
    let release = build.split_whitespace().next().unwrap().rsplit('-').next().unwrap();
    assert_eq!(runtime, format!("debian:{release}-slim"), "runtime on the build's release");
}

#[test]
fn every_step_is_a_checked_script_and_every_copy_exists() {
    let image = Image::load();
    // Where each COPY put which source file: RUN may name a script by its copied path.
    let mut copied: Vec<(String, String)> = Vec::new();
    for rest in image.all("COPY") {
        let args: Vec<&str> = rest.split_whitespace().collect();
        if args[0].starts_with("--from=") {
            assert_eq!(args[0], "--from=build", "only the build stage is copied from");
            continue;
        }
        let (src, dst) = (args[0], args[args.len() - 1]);
        assert!(root().join(src).exists(), "COPY source {src} is missing");
        assert!(!ignored(src) || src == ".", "COPY source {src} is in .dockerignore");
        copied.push((dst.to_string(), src.to_string()));
    }
    for rest in image.all("RUN") {
        let script = rest.split_whitespace().next().unwrap();
        let source = copied
            .iter()
            .find(|(dst, _)| dst == script)
            .map(|(_, src)| src.clone())
            .unwrap_or_else(|| script.to_string());
        assert!(
            source.starts_with("docker/") && source.ends_with(".sh"),
            "RUN must call a script under docker/ (which CI runs on the host): {rest}"
        );
        let path = root().join(&source);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap_or_else(|e| panic!("{source}: {e}")).permissions(),
        );
        assert!(mode & 0o111 != 0, "{source} is not executable");
        let ci = std::fs::read_to_string(root().join(".ci/docker")).expect(".ci/docker");
        let name = Path::new(&source).file_name().unwrap().to_str().unwrap();
        assert!(ci.contains(name), ".ci/docker does not run {source}");
    }
    // The runtime copies what the build stage installed.
    let build_dest = image
        .all("RUN")
        .iter()
        .find_map(|r| r.strip_prefix("docker/build.sh "))
        .expect("the build stage runs docker/build.sh DEST")
        .trim()
        .to_string();
    let from_build = image.all("COPY").into_iter().find(|r| r.starts_with("--from=build")).unwrap();
    assert!(
        from_build.contains(&format!("{build_dest}/serve ")),
        "the runtime copies {build_dest}/serve: {from_build}"
    );
    for must_skip in ["target", "runs", ".git"] {
        assert!(ignored(must_skip), ".dockerignore keeps {must_skip} out of the build context");
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn the_image_command_serves_a_mounted_run_directory() {
    let image = Image::load();
    let entrypoint = exec_form(image.one("ENTRYPOINT"));
    assert_eq!(entrypoint, ["serve"], "subcommands (chat, generate) stay reachable");
    let mut cmd = exec_form(image.one("CMD"));
    let exposed: u16 = image.one("EXPOSE").parse().expect("EXPOSE PORT");
    assert!(image.one("ENV").starts_with("XDG_RUNTIME_DIR="), "the Vulkan loader's runtime dir");

    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("model");
    write_run(&run, &model(), &tokenizer()).unwrap();
    let port = free_port();
    let at =
        |flag: &str| cmd.iter().position(|a| a == flag).unwrap_or_else(|| panic!("CMD {flag}"));
    let (c, p) = (at("--checkpoint"), at("--port"));
    assert_eq!(cmd[c + 1], "/model", "the run directory is mounted at /model");
    assert_eq!(cmd[p + 1], exposed.to_string(), "CMD listens on the EXPOSEd port");
    assert_eq!(cmd[at("--host") + 1], "0.0.0.0", "reachable through a published port");
    cmd[c + 1] = run.to_str().unwrap().to_string();
    cmd[p + 1] = port.to_string();

    let child = Command::new(env!("CARGO_BIN_EXE_serve"))
        .args(&cmd)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let _guard = Kill(child);
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(&base);
    let body = json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4});
    let reply = post(&base, "/v1/chat/completions", &body);
    assert_eq!(reply.status, 200, "{}", reply.text);
    let v: Value = reply.json();
    assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
}
