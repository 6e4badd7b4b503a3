//! Run directories: one writer at a time, no run overwritten by accident, and a record of what
//! a run was started with so that `--resume` can tell the same run from another one.
//!
//! Layout (besides what the trainer writes, see trainer.rs):
//! - `run.lock`: held while a process writes the run: `{"pid", "host", "started", "command"}`.
//!   Created exclusively; a lock whose process is gone (same host, no such PID) is stale and is
//!   taken over with a notice.
//! - `run.json`: written once when the run starts: the run id (every checkpoint of the run
//!   carries it, and only those are ever deleted by the retention), the stage, the arguments,
//!   the derived settings and the fingerprints of the data and tokenizer files.
use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use femtochat_model::checkpoint::write_atomic;
use serde::{Deserialize, Serialize};

pub const LOCK_FILE: &str = "run.lock";
pub const RUN_FILE: &str = "run.json";

/// Files whose presence makes a directory a run (or the remains of one).
const RUN_MARKERS: [&str; 4] = ["metrics.jsonl", "latest.json", RUN_FILE, "tokenizer"];

#[derive(Clone, Debug, Serialize, Deserialize)]
struct LockInfo {
    pid: u32,
    host: String,
    started: u64,
    command: String,
}

/// The exclusive right to write a run directory; released on drop.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_else(|| "unknown-host".into())
}

/// Whether a process with this PID exists on this machine.
fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    #[cfg(unix)]
    {
        // Signal 0 checks existence and permission without delivering anything.
        let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        // Without a portable check, assume the holder is alive: the error tells how to clear it.
        true
    }
}

impl RunLock {
    /// Take `dir/run.lock` (creating `dir`), or explain who holds it.
    pub fn acquire(dir: &Path) -> Result<RunLock> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(LOCK_FILE);
        let info = LockInfo {
            pid: std::process::id(),
            host: hostname(),
            started: now_secs(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
        };
        for _ in 0..2 {
            match fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    f.write_all(serde_json::to_string(&info)?.as_bytes())
                        .and_then(|()| f.sync_all())
                        .with_context(|| format!("writing {}", path.display()))?;
                    return Ok(RunLock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let text = fs::read_to_string(&path).unwrap_or_default();
                    let held: Option<LockInfo> = serde_json::from_str(&text).ok();
                    match held {
                        Some(h) if h.host == info.host && !process_alive(h.pid) => {
                            eprintln!(
                                "note: {} was left by process {} (no longer running); taking it over",
                                path.display(),
                                h.pid
                            );
                            fs::remove_file(&path)
                                .with_context(|| format!("removing stale {}", path.display()))?;
                        }
                        Some(h) => bail!(
                            "{} is in use: process {} on host {} has held it since {} ({}). \
                             Two writers would interleave metrics and delete each other's \
                             checkpoints; wait for it, or delete {} if that process is gone",
                            dir.display(),
                            h.pid,
                            h.host,
                            h.started,
                            h.command,
                            path.display()
                        ),
                        None => bail!(
                            "{} exists but is not a lock this program wrote ({text:?}); delete it \
                             if no other process is writing {}",
                            path.display(),
                            dir.display()
                        ),
                    }
                }
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            }
        }
        bail!("could not take {}", path.display())
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Whether `dir` holds (the remains of) a run.
pub fn is_run(dir: &Path) -> bool {
    RUN_MARKERS.iter().any(|m| dir.join(m).exists())
        || fs::read_dir(dir).is_ok_and(|mut it| {
            it.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("step_")))
        })
}

/// How a stage starts in its `--out`: the flags `train base`, `sft`, `mid` (and later stages) share.
#[derive(clap::Args, Clone, Debug)]
pub struct RunFlags {
    /// Continue the run in --out from its latest checkpoint, with the run's own settings and data.
    /// Flags that would change the model, the batches or the optimizer are refused;
    /// --num-iterations extends (or shortens) the run, and the eval/sample/save cadences may change.
    #[arg(long)]
    pub resume: bool,
    /// Start a new run in an --out that holds one: the old run is moved aside to OUT.old-<time>.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// With --resume: continue even though the data or tokenizer files differ from the ones the
    /// run started with (the batches will differ from an uninterrupted run's).
    #[arg(long, requires = "resume")]
    pub force: bool,
}

/// Prepare `dir` for a new run: refuse an existing run unless `overwrite`, which moves it
/// aside to `DIR.old-<unix time>` (never deletes it). Returns where the old run went.
pub fn prepare_new(dir: &Path, overwrite: bool) -> Result<Option<PathBuf>> {
    if !dir.exists() || !is_run(dir) {
        return Ok(None);
    }
    if !overwrite {
        bail!(
            "{} already holds a run. Continue it with --resume, start the new run in another \
             --out directory, or pass --overwrite to move the old run aside (to {}.old-<time>)",
            dir.display(),
            dir.display()
        );
    }
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let aside = dir.with_file_name(format!("{name}.old-{}", now_secs()));
    if aside.exists() {
        bail!("{} already exists; move it first", aside.display());
    }
    fs::rename(dir, &aside)
        .with_context(|| format!("moving {} aside to {}", dir.display(), aside.display()))?;
    Ok(Some(aside))
}

/// Remove temporary files a crash left behind (`.NAME.tmpPID` from atomic writes) in `dir` and
/// its checkpoint directories. Returns how many were removed.
pub fn clean_temporaries(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    let mut dirs = vec![dir.to_path_buf()];
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step_")) {
            dirs.push(p);
        }
    }
    for d in dirs {
        for e in fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e?.path();
            let name = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            if name.starts_with('.') && name.contains(".tmp") && p.is_file() {
                fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

/// Size and content hash of a file: enough to notice that a resumed run reads other data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub path: String,
    pub size: u64,
    /// FNV-1a 64 of the whole file up to 64 MiB, else of its first and last 32 MiB (stable across
    /// builds and platforms, unlike std's hasher).
    pub hash: String,
}

const FULL_HASH_LIMIT: u64 = 64 << 20;

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

pub fn fingerprint(path: &Path) -> Result<Fingerprint> {
    let mut f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = f.metadata().with_context(|| format!("reading {}", path.display()))?.len();
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut hash_range = |f: &mut fs::File, start: u64, len: u64, h: &mut u64| -> Result<()> {
        f.seek(SeekFrom::Start(start))?;
        let mut left = len;
        while left > 0 {
            let n = f.read(&mut buf[..left.min(1 << 20) as usize])?;
            if n == 0 {
                break;
            }
            *h = fnv1a(*h, &buf[..n]);
            left -= n as u64;
        }
        Ok(())
    };
    let ctx = || format!("reading {}", path.display());
    if size <= FULL_HASH_LIMIT {
        hash_range(&mut f, 0, size, &mut h).with_context(ctx)?;
    } else {
        let half = FULL_HASH_LIMIT / 2;
        hash_range(&mut f, 0, half, &mut h).with_context(ctx)?;
        hash_range(&mut f, size - half, half, &mut h).with_context(ctx)?;
    }
    let shown = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    Ok(Fingerprint { path: shown.display().to_string(), size, hash: format!("{h:016x}") })
}

pub fn fingerprints(files: &[PathBuf]) -> Result<Vec<Fingerprint>> {
    files.iter().map(|f| fingerprint(f)).collect()
}

/// Fingerprints of every file of a directory (a tokenizer), by file name.
pub fn dir_fingerprint(dir: &Path) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.is_file() {
            let name = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            out.insert(name, fingerprint(&p)?.hash);
        }
    }
    Ok(out)
}

/// Differences between recorded and current data fingerprints, as lines for an error. Paths may
/// differ (a moved checkout) as long as sizes and hashes agree file by file.
pub fn data_differences(label: &str, was: &[Fingerprint], now: &[Fingerprint]) -> Vec<String> {
    let mut out = Vec::new();
    if was.len() != now.len() {
        out.push(format!("{label}: the run read {} files, now {} are given", was.len(), now.len()));
    }
    for (a, b) in was.iter().zip(now) {
        if a.size != b.size || a.hash != b.hash {
            out.push(format!(
                "{label}: {} (size {}, hash {}) is now {} (size {}, hash {})",
                a.path, a.size, a.hash, b.path, b.size, b.hash
            ));
        }
    }
    out
}

/// A fresh run id: unique per start of a run, carried by each of its checkpoints.
pub fn new_run_id() -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{:x}-{:x}", nanos, std::process::id())
}

/// Read `dir/run.json` as `T`, if the run has one.
pub fn read_run_file<T: for<'de> Deserialize<'de>>(dir: &Path) -> Result<Option<T>> {
    let path = dir.join(RUN_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let v =
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?;
    Ok(Some(v))
}

pub fn write_run_file<T: Serialize>(dir: &Path, run: &T) -> Result<()> {
    let path = dir.join(RUN_FILE);
    write_atomic(&path, &serde_json::to_vec_pretty(run)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// What `run.json` records for a run of any stage.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    pub run_id: String,
    /// `base`, `mid`, `sft`, ...
    pub stage: String,
    pub command: String,
    /// The flags that define the run (arg id -> value as given); `--resume` refuses others.
    pub flags: BTreeMap<String, String>,
    pub data: Vec<Fingerprint>,
    pub val: Vec<Fingerprint>,
    /// Hash of every file of the run's own copy of the tokenizer.
    pub tokenizer: BTreeMap<String, String>,
    /// Validation tokens per evaluation (may change on resume, kept unless given).
    #[serde(default)]
    pub eval_tokens: Option<usize>,
    /// What the stage derived or started from (base: the recipe; sft/mid: the base run).
    #[serde(default)]
    pub details: serde_json::Value,
}

impl RunRecord {
    /// A record for a new run in `dir`, whose tokenizer copy is already written.
    pub fn new(
        dir: &Path,
        stage: &str,
        flags: BTreeMap<String, String>,
        data: &[PathBuf],
        val: &[PathBuf],
        eval_tokens: usize,
        details: serde_json::Value,
    ) -> Result<RunRecord> {
        Ok(RunRecord {
            run_id: new_run_id(),
            stage: stage.into(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            flags,
            data: fingerprints(data)?,
            val: fingerprints(val)?,
            tokenizer: dir_fingerprint(&dir.join("tokenizer"))?,
            eval_tokens: Some(eval_tokens),
            details,
        })
    }
}

/// Start a new run in `dir`: refuse (or, with `overwrite`, move aside) an existing run, then
/// lock the directory.
pub fn begin_new(dir: &Path, overwrite: bool) -> Result<RunLock> {
    if let Some(aside) = prepare_new(dir, overwrite)? {
        eprintln!("moved the previous run in {} to {}", dir.display(), aside.display());
    }
    RunLock::acquire(dir)
}

/// Open a run in `dir` to resume it: it must have a checkpoint; lock it, clean what a crash
/// left, and read its record (None for runs of older versions and imports, with a note).
pub fn begin_resume(dir: &Path) -> Result<(RunLock, Option<RunRecord>)> {
    if !dir.join("latest.json").exists() {
        bail!(
            "--resume: {} has no checkpoint (no latest.json); start a new run without --resume",
            dir.display()
        );
    }
    let lock = RunLock::acquire(dir)?;
    let removed = clean_temporaries(dir)?;
    if removed > 0 {
        eprintln!("removed {removed} temporary files left by an interrupted write");
    }
    let record: Option<RunRecord> = read_run_file(dir)?;
    if record.is_none() {
        eprintln!(
            "note: {} has no run.json (a run from an older version or an import): the data and \
             settings it started with cannot be checked",
            dir.display()
        );
    }
    Ok((lock, record))
}

/// What a resumed run is given now, to compare with what it started with.
pub struct ResumeInputs<'a> {
    /// Arg ids the user passed on this command line.
    pub explicit: &'a std::collections::BTreeSet<String>,
    /// The fixed flags as this command line gives them.
    pub flags: &'a BTreeMap<String, String>,
    pub data: &'a [PathBuf],
    pub val: &'a [PathBuf],
    /// A tokenizer the user named (checked against the run's).
    pub tokenizer: Option<&'a Path>,
    /// Continue despite different inputs (with a warning).
    pub force: bool,
}

/// Refuse flags that contradict the run (listing them all), and inputs that differ from the
/// ones it started with unless `force`.
pub fn check_resume(dir: &Path, record: &RunRecord, now: &ResumeInputs) -> Result<()> {
    let mut problems = Vec::new();
    for id in now.explicit {
        if let (Some(was), Some(is)) = (record.flags.get(id), now.flags.get(id))
            && was != is
        {
            problems.push(format!("--{} {is} (the run has {was})", id.replace('_', "-")));
        }
    }
    if !problems.is_empty() {
        bail!(
            "--resume continues a run with its own settings; these flags contradict it:\n  {}\n\
             drop them, or start a new run in another --out",
            problems.join("\n  ")
        );
    }
    let mut warnings = data_differences("data", &record.data, &fingerprints(now.data)?);
    warnings.extend(data_differences("val", &record.val, &fingerprints(now.val)?));
    if let Some(t) = now.tokenizer
        && dir_fingerprint(t)? != record.tokenizer
    {
        warnings.push(format!("tokenizer: {} differs from the run's", t.display()));
    }
    let own = dir.join("tokenizer");
    if dir_fingerprint(&own)? != record.tokenizer {
        warnings.push(format!("tokenizer: {} was changed since the run started", own.display()));
    }
    if !warnings.is_empty() {
        if !now.force {
            bail!(
                "--resume: the inputs differ from the ones this run started with:\n  {}\nthe \
                 batches would differ from an uninterrupted run's; pass the original files, or \
                 --force to continue anyway",
                warnings.join("\n  ")
            );
        }
        eprintln!("warning (--force): {}", warnings.join("; "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let lock = RunLock::acquire(dir.path()).unwrap();
        let err = RunLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("is in use") && err.contains(&std::process::id().to_string()),
            "{err}"
        );
        drop(lock);
        assert!(!dir.path().join(LOCK_FILE).exists());
        RunLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn stale_lock_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        // A PID far above any real one on this host.
        let stale = LockInfo { pid: 4_000_000, host: hostname(), started: 1, command: "x".into() };
        fs::write(dir.path().join(LOCK_FILE), serde_json::to_string(&stale).unwrap()).unwrap();
        let _lock = RunLock::acquire(dir.path()).unwrap();
        let now: LockInfo =
            serde_json::from_str(&fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap()).unwrap();
        assert_eq!(now.pid, std::process::id());
    }

    #[test]
    fn foreign_host_lock_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let other = LockInfo { pid: 1, host: "elsewhere".into(), started: 1, command: "x".into() };
        fs::write(dir.path().join(LOCK_FILE), serde_json::to_string(&other).unwrap()).unwrap();
        let err = RunLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(err.contains("elsewhere"), "{err}");
    }

    #[test]
    fn existing_run_is_refused_or_moved_aside() {
        let root = tempfile::tempdir().unwrap();
        let run = root.path().join("run");
        assert_eq!(prepare_new(&run, false).unwrap(), None, "a missing directory is fine");
        fs::create_dir_all(&run).unwrap();
        assert_eq!(prepare_new(&run, false).unwrap(), None, "an empty directory is fine");
        fs::write(run.join("metrics.jsonl"), "{}\n").unwrap();
        let err = prepare_new(&run, false).unwrap_err().to_string();
        assert!(err.contains("--resume") && err.contains("--overwrite"), "{err}");
        let aside = prepare_new(&run, true).unwrap().unwrap();
        assert!(aside.join("metrics.jsonl").exists() && !run.exists());
    }

    #[test]
    fn temporaries_are_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let step = dir.path().join("step_000003");
        fs::create_dir_all(&step).unwrap();
        fs::write(step.join(".model.safetensors.tmp123"), "x").unwrap();
        fs::write(dir.path().join(".latest.json.tmp9"), "x").unwrap();
        fs::write(step.join("model.safetensors"), "keep").unwrap();
        assert_eq!(clean_temporaries(dir.path()).unwrap(), 2);
        assert!(step.join("model.safetensors").exists());
    }

    #[test]
    fn fingerprints_see_content_changes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.txt");
        fs::write(&f, "hello").unwrap();
        let a = fingerprint(&f).unwrap();
        fs::write(&f, "hellp").unwrap();
        let b = fingerprint(&f).unwrap();
        assert_eq!(a.size, b.size);
        assert_ne!(a.hash, b.hash);
        let same = std::slice::from_ref(&a);
        assert_eq!(data_differences("data", same, same), Vec::<String>::new());
        assert_eq!(data_differences("data", &[a], &[b]).len(), 1);
    }
}
