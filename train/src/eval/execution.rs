//! Running a model's Python program (HumanEval) so that a failing, hanging or hostile one can
//! neither stall nor harm the evaluator.
//!
//! Each program runs in a fresh `python3` child, in its own session and an empty temporary
//! directory, with a scrubbed environment, and these limits set in the child before `exec`:
//! - wall clock: the parent kills the child's whole process group at the deadline; CPU time is
//!   capped too (RLIMIT_CPU), so a process that left the group still dies;
//! - memory: RLIMIT_AS (address space) and RLIMIT_FSIZE (files it writes);
//! - processes: run as root, the child drops to the unprivileged `nobody` user whose process
//!   count RLIMIT_NPROC caps; as another user, the cap is that user's current count plus the
//!   allowance;
//! - network: a new, empty network namespace (no interfaces up), also for unprivileged users
//!   through a user namespace. If neither can be made, the program is not run (an error).
//!
//! On top, `sandbox_guard.py` disables what nanochat's execution.py disables, so both
//! evaluators score the same programs the same way. Output is captured up to a cap.
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

const GUARD: &str = include_str!("sandbox_guard.py");
/// uid/gid of `nobody`, the user a root evaluator runs programs as.
const NOBODY: libc::uid_t = 65534;

/// Limits of one program run.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Wall-clock time (nanochat: 5 s).
    pub timeout: Duration,
    /// Address space in bytes (nanochat: 256 MiB).
    pub max_memory: u64,
    /// Processes and threads the program may add.
    pub max_processes: u64,
    /// Bytes of stdout and of stderr kept.
    pub max_output: usize,
    /// Bytes of any file the program writes.
    pub max_file: u64,
    /// The interpreter.
    pub python: PathBuf,
}

impl Default for Limits {
    fn default() -> Limits {
        let python = ["/usr/bin/python3", "/usr/local/bin/python3"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("python3"));
        Limits {
            timeout: Duration::from_secs(5),
            max_memory: 256 << 20,
            max_processes: 16,
            max_output: 64 << 10,
            max_file: 16 << 20,
            python,
        }
    }
}

/// What happened to one program (the evaluator reads `success`; the rest is for diagnosis).
#[derive(Clone, Debug, Default)]
#[allow(dead_code)]
pub struct Outcome {
    /// Exited with status 0 before the deadline.
    pub success: bool,
    pub timed_out: bool,
    /// Python reported a MemoryError.
    pub memory_exceeded: bool,
    pub stdout: String,
    pub stderr: String,
    /// The last line of stderr of a failed run (e.g. "AssertionError").
    pub error: Option<String>,
}

/// Threads (tasks) the kernel counts against `uid`'s RLIMIT_NPROC now.
fn tasks_of(uid: libc::uid_t) -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0 };
    let mut n = 0;
    for e in dir.flatten() {
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else { continue };
        let field = |k: &str| {
            status.lines().find_map(|l| l.strip_prefix(k)).and_then(|v| v.split_whitespace().next())
        };
        if field("Uid:").and_then(|u| u.parse::<libc::uid_t>().ok()) == Some(uid) {
            n += field("Threads:").and_then(|t| t.parse::<u64>().ok()).unwrap_or(1);
        }
    }
    n
}

fn set_limit(resource: libc::__rlimit_resource_t, value: u64) -> std::io::Result<()> {
    let lim = libc::rlimit { rlim_cur: value, rlim_max: value };
    // SAFETY: setrlimit reads one plain struct; async-signal-safe.
    if unsafe { libc::setrlimit(resource, &lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Read `r` to the end, keeping the first `cap` bytes.
fn drain(mut r: impl Read, cap: usize) -> Vec<u8> {
    let (mut kept, mut buf) = (Vec::new(), [0u8; 8192]);
    while let Ok(n) = r.read(&mut buf) {
        if n == 0 {
            break;
        }
        let room = cap.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
    kept
}

/// Run `program` under `limits`. An `Err` means the sandbox itself failed (no interpreter, no
/// network isolation); whatever the program does is an `Outcome`.
pub fn execute(program: &str, limits: &Limits) -> Result<Outcome> {
    let dir = tempfile::Builder::new().prefix("femtochat-exec").tempdir()?;
    // SAFETY: getuid has no preconditions.
    let root = unsafe { libc::getuid() } == 0;
    if root {
        // The program runs as nobody and may write only here.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))?;
    }
    let nproc = if root {
        limits.max_processes
    } else {
        // SAFETY: as above.
        tasks_of(unsafe { libc::getuid() }) + limits.max_processes
    };
    let cpu_secs = limits.timeout.as_secs() + 1;
    let (mem, fsize) = (limits.max_memory, limits.max_file);
    let mut cmd = Command::new(&limits.python);
    cmd.arg("-c")
        .arg(GUARD)
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure runs in the forked child before exec and calls only async-signal-safe
    // functions (setsid, setrlimit, unshare, setgroups, setgid, setuid); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            set_limit(libc::RLIMIT_AS, mem)?;
            set_limit(libc::RLIMIT_CPU, cpu_secs)?;
            set_limit(libc::RLIMIT_FSIZE, fsize)?;
            set_limit(libc::RLIMIT_CORE, 0)?;
            if libc::unshare(libc::CLONE_NEWNET) != 0
                && libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::other(
                    "cannot isolate the network (unshare CLONE_NEWNET failed; run as root or enable user namespaces)",
                ));
            }
            if root
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(NOBODY) != 0
                    || libc::setuid(NOBODY) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            set_limit(libc::RLIMIT_NPROC, nproc)?;
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting the sandbox ({})", limits.python.display()))?;
    let pid = child.id() as libc::pid_t;

    let mut stdin = child.stdin.take().context("no stdin pipe")?;
    let source = program.to_string();
    // A program larger than the pipe buffer must not block us before the deadline clock runs.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(source.as_bytes());
    });
    let cap = limits.max_output;
    let out = child.stdout.take().context("no stdout pipe")?;
    let err = child.stderr.take().context("no stderr pipe")?;
    let out_reader = std::thread::spawn(move || drain(out, cap));
    let err_reader = std::thread::spawn(move || drain(err, cap));

    let deadline = Instant::now() + limits.timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            // SAFETY: signals our child's process group (setsid made pid its id).
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // Stragglers of the group hold the pipes open; end them so the readers return.
    // SAFETY: as above; ESRCH when none is left is fine.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    let _ = writer.join();
    let stdout = String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    let success = status.success() && !timed_out;
    let error = if success {
        None
    } else if timed_out {
        Some("timed out (process killed)".into())
    } else {
        Some(stderr.trim().lines().last().unwrap_or("execution failed").to_string())
    };
    Ok(Outcome {
        success,
        timed_out,
        memory_exceeded: stderr.contains("MemoryError"),
        stdout,
        stderr,
        error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(src: &str) -> Outcome {
        execute(src, &Limits::default()).unwrap()
    }

    #[test]
    fn a_correct_program_passes_and_a_failing_one_does_not() {
        let ok = run("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('hi')\n");
        assert!(ok.success, "{ok:?}");
        assert_eq!(ok.stdout, "hi\n");
        let bad = run("assert 1 == 2\n");
        assert!(!bad.success);
        assert_eq!(bad.error.as_deref(), Some("AssertionError"));
    }

    #[test]
    fn an_infinite_loop_is_killed_at_the_deadline() {
        let limits = Limits { timeout: Duration::from_millis(500), ..Limits::default() };
        let t0 = Instant::now();
        let o = execute("while True:\n    pass\n", &limits).unwrap();
        assert!(o.timed_out && !o.success);
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    }

    #[test]
    fn a_memory_hog_fails_within_the_limit() {
        let o = run("x = bytearray(1 << 30)\nprint(len(x))\n");
        assert!(!o.success && o.memory_exceeded, "{o:?}");
    }

    /// A bounded attempt (20 children, each sleeping) at more processes than allowed: the
    /// kernel refuses the fork past the cap. ctypes reaches libc's fork past the guard.
    #[test]
    fn more_processes_than_allowed_are_refused() {
        let src = "import ctypes, time\nlibc = ctypes.CDLL(None)\nn = 0\nfor _ in range(20):\n    pid = libc.fork()\n    if pid == 0:\n        time.sleep(2)\n        libc._exit(0)\n    if pid < 0:\n        break\n    n += 1\nprint(n)\nassert n == 20\n";
        let limits = Limits { max_processes: 8, ..Limits::default() };
        let o = execute(src, &limits).unwrap();
        assert!(!o.success, "{o:?}");
        let started: usize = o.stdout.trim().parse().unwrap();
        assert!(started < 8, "started {started} children");
    }

    #[test]
    fn the_network_is_unreachable() {
        let src = "import _socket\ns = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\ns.settimeout(2)\ns.connect(('1.1.1.1', 80))\n";
        let o = run(src);
        assert!(!o.success);
        assert!(o.stderr.contains("unreachable") || o.stderr.contains("Errno"), "{o:?}");
    }

    #[test]
    fn the_guard_disables_what_nanochat_disables() {
        let o = run("import os\nos.getcwd()\n");
        assert!(!o.success && o.error.as_deref().unwrap_or("").contains("NoneType"), "{o:?}");
    }
}
