//! Mutated nanochat files (model, optimizer, tokenizer pickle, token_bytes) fed to the readers:
//! each must give an error or a valid result, never a panic, and never allocate more than a
//! small multiple of the file's size. Its own test binary: the allocation count is process-wide.
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use femtochat::model::GPTConfig;
use femtochat::model::nanochat::{self, optim};
use proptest::prelude::*;

/// Counts live bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            let live = LIVE.fetch_add(new_size - layout.size(), Ordering::Relaxed) + new_size
                - layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        } else {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nanochat_checkpoint").join(rel)
}

fn config() -> GPTConfig {
    GPTConfig {
        sequence_len: 128,
        vocab_size: 607,
        n_layer: 2,
        n_head: 2,
        n_kv_head: 1,
        n_embd: 128,
        window_pattern: "SL".into(),
    }
}

#[derive(Clone, Copy, Debug)]
enum Reader {
    Model,
    Bf16Model,
    Optimizer,
    TokenizerPkl,
    TokenBytes,
}

impl Reader {
    fn file(self) -> &'static str {
        match self {
            Reader::Model => "base_checkpoints/d2/model_000030.pt",
            Reader::Bf16Model => "bf16/base_checkpoints/d2/model_000030.pt",
            Reader::Optimizer => "base_checkpoints/d2/optim_000030_rank0.pt",
            Reader::TokenizerPkl => "tokenizer/tokenizer.pkl",
            Reader::TokenBytes => "tokenizer/token_bytes.pt",
        }
    }

    /// Read `path` as this kind of file; true if it was accepted.
    fn read(self, path: &Path) -> bool {
        match self {
            Reader::Model | Reader::Bf16Model => nanochat::load_state_dict(path, config()).is_ok(),
            Reader::Optimizer => optim::load(&[path.to_path_buf()], &config()).is_ok(),
            Reader::TokenizerPkl => nanochat::load_tokenizer_pkl(path).is_ok(),
            Reader::TokenBytes => nanochat::load_tokenizer_pkl(&fixture("tokenizer/tokenizer.pkl"))
                .map(|tok| nanochat::check_token_bytes(path, &tok).is_ok())
                .unwrap_or(false),
        }
    }
}

/// One change to a file: where it lands matters most in the pickle (the archive's start) and
/// the zip directory (its end), so most mutations go there.
#[derive(Clone, Debug)]
enum Mutation {
    /// Overwrite bytes at a position in the first 4 KiB, the last 4 KiB, or anywhere.
    Write { region: u8, at: usize, bytes: Vec<u8> },
    /// Cut the file at a fraction of its length.
    Truncate { keep: f64 },
    /// A large little-endian number (a size) written over four bytes.
    HugeSize { region: u8, at: usize, value: u32 },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (0u8..3, any::<usize>(), prop::collection::vec(any::<u8>(), 1..4))
            .prop_map(|(region, at, bytes)| Mutation::Write { region, at, bytes }),
        1 => (0.0f64..1.0).prop_map(|keep| Mutation::Truncate { keep }),
        2 => (0u8..3, any::<usize>(), prop::sample::select(vec![u32::MAX, 0x7fff_ffff, 0x10_0000, 4096]))
            .prop_map(|(region, at, value)| Mutation::HugeSize { region, at, value }),
    ]
}

fn apply(data: &mut Vec<u8>, m: &Mutation) {
    let n = data.len();
    if n < 4 {
        data.clear();
        return;
    }
    let pos = |region: u8, at: usize| match region {
        0 => at % n.min(4096),
        1 => n - 1 - at % n.min(4096),
        _ => at % n,
    };
    match m {
        Mutation::Write { region, at, bytes } => {
            let p = pos(*region, *at);
            for (i, b) in bytes.iter().enumerate() {
                if let Some(x) = data.get_mut(p + i) {
                    *x = *b;
                }
            }
        }
        Mutation::Truncate { keep } => data.truncate((n as f64 * keep) as usize),
        Mutation::HugeSize { region, at, value } => {
            let p = pos(*region, *at).min(n - 4);
            data[p..p + 4].copy_from_slice(&value.to_le_bytes());
        }
    }
}

/// Reading is allowed this much memory on top of what was live before: widened f32 tensors
/// are at most 4x the file's bytes, an i64 view of one-byte integers 8x.
fn bound(file_len: usize) -> usize {
    8 * file_len + (8 << 20)
}

/// Read `path` and return the peak bytes allocated on top of what was live before.
fn measure(reader: Reader, path: &Path) -> (bool, usize) {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let accepted = reader.read(path);
    (accepted, PEAK.load(Ordering::Relaxed).saturating_sub(before))
}

const READERS: [Reader; 5] =
    [Reader::Model, Reader::Bf16Model, Reader::Optimizer, Reader::TokenizerPkl, Reader::TokenBytes];

/// One test (the allocation count is process-wide): the fixture files are read within the
/// bound, then mutated copies are errors or valid results, within the bound.
#[test]
fn mutated_files_are_errors_or_valid_never_panics_or_unbounded() {
    for reader in READERS {
        let path = fixture(reader.file());
        let len = std::fs::metadata(&path).unwrap().len() as usize;
        let (accepted, used) = measure(reader, &path);
        assert!(accepted, "{reader:?}");
        assert!(used <= bound(len), "{reader:?}: {used} bytes for {len}");
    }
    let config =
        ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let strategy =
        (prop::sample::select(READERS.to_vec()), prop::collection::vec(mutation(), 1..4));
    let dir = tempfile::tempdir().unwrap();
    let rejected = std::cell::Cell::new(0);
    runner
        .run(&strategy, |(reader, mutations)| {
            let mut data = std::fs::read(fixture(reader.file())).unwrap();
            for m in &mutations {
                apply(&mut data, m);
            }
            let path = dir.path().join(Path::new(reader.file()).file_name().unwrap());
            std::fs::write(&path, &data).unwrap();
            let (accepted, used) = measure(reader, &path);
            rejected.set(rejected.get() + usize::from(!accepted));
            prop_assert!(
                used <= bound(data.len()),
                "{reader:?}: {used} bytes for a {}-byte file",
                data.len()
            );
            Ok(())
        })
        .unwrap();
    // The mutations do reach the checks (most land in the pickle or the zip directory).
    let rejected = rejected.get();
    assert!(rejected > 20, "only {rejected} of 256 mutated files were rejected");
}
